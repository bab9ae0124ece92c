//! Forwarding by IP-in-IP (layer-3 direct server return): the client's IP
//! packet goes unchanged inside an outer header addressed to the backend,
//! towards the next hop userspace resolved from the kernel's routes.
//!
//! Outer header: IPv4 (protocol 4) for IPv4 VIPs, IPv6 (next header 41) for
//! IPv6 VIPs. Its DSCP and ECN are the inner packet's (RFC 6040 normal
//! mode: the tunnel is invisible to congestion marking); TTL / hop limit 64,
//! a fresh hop count for the tunnel, so the inner TTL reaches the backend
//! as the client sent it; IPv4 DF set (identification 0, RFC 6864), since
//! a backend could not reassemble outer fragments; IPv6 flow label 0.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Backend, Egress, FAMILY_V4, IPIP_V4_OVERHEAD, IPIP_V6_OVERHEAD, stat};

use crate::{
    forward::write_macs,
    maps::{DEVMAP, EGRESS},
    parse::{Packet, ptr_at, read_opt},
    verdict::Verdict,
};

const ETH_P_IPV4: [u8; 2] = 0x0800u16.to_be_bytes();
const ETH_P_IPV6: [u8; 2] = 0x86ddu16.to_be_bytes();
/// Outer TTL / hop limit.
const OUTER_TTL: u8 = 64;
/// IPv4 protocol / IPv6 next header of an IPv4 packet inside.
const IPPROTO_IPIP: u8 = 4;
/// IPv6 next header of an IPv6 packet inside.
const IPPROTO_IPV6: u8 = 41;

/// Encapsulates the frame's IP packet for `backend` (id `id`) and returns
/// the action that sends it: `XDP_TX` when it leaves by the interface it
/// came in on, else `XDP_REDIRECT` to the egress interface.
#[inline(always)]
pub fn ipip(
    ctx: &XdpContext,
    pkt: &Packet,
    backend: &Backend,
    id: u32,
    own_mac: &[u8; 6],
    reason: u32,
) -> Result<Verdict, Verdict> {
    let egress: Egress = *EGRESS
        .get(id)
        .ok_or(Verdict::drop(stat::DROP_ENCAP_TOO_BIG))?;
    let v4 = backend.family == FAMILY_V4;
    let overhead = if v4 {
        IPIP_V4_OVERHEAD
    } else {
        IPIP_V6_OVERHEAD
    } as usize;
    // An unwritten entry has MTU 0: nothing fits until userspace knows the route.
    if pkt.ip_len + overhead > egress.mtu as usize {
        return Err(Verdict::drop(stat::DROP_ENCAP_TOO_BIG));
    }
    let tagged = pkt.l3 != 14;
    // The 802.1Q tag (TPID + TCI) stays; the inner DSCP/ECN goes outside.
    let vlan: [u8; 4] = if tagged {
        read_opt(ctx, 12).ok_or(Verdict::drop(stat::DROP_BAD_VLAN))?
    } else {
        [0; 4]
    };
    let tos = if tagged {
        inner_tos(ctx, 18, v4)
    } else {
        inner_tos(ctx, 14, v4)
    }
    .ok_or(Verdict::drop(stat::DROP_TRUNCATED_IP))?;

    // SAFETY: the helper checks the new head lies inside the headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Err(Verdict::drop(stat::DROP_ENCAP_FAILED));
    }
    let smac = if egress.ifindex == 0 {
        *own_mac
    } else {
        egress.smac
    };
    let written = match (tagged, v4) {
        (false, true) => write_headers::<14, 34>(ctx, backend, &smac, None, &egress, pkt, tos),
        (false, false) => write_headers::<14, 54>(ctx, backend, &smac, None, &egress, pkt, tos),
        (true, true) => write_headers::<18, 38>(ctx, backend, &smac, Some(vlan), &egress, pkt, tos),
        (true, false) => {
            write_headers::<18, 58>(ctx, backend, &smac, Some(vlan), &egress, pkt, tos)
        }
    };
    if !written {
        return Err(Verdict::drop(stat::DROP_ENCAP_FAILED));
    }
    if egress.ifindex == 0 {
        return Ok(Verdict::tx(reason));
    }
    match DEVMAP.redirect(egress.ifindex, 0) {
        Ok(action) if action == xdp_action::XDP_REDIRECT => Ok(Verdict { action, reason }),
        _ => Err(Verdict::drop(stat::DROP_ENCAP_FAILED)),
    }
}

/// The inner packet's DSCP + ECN byte (IPv4 TOS, IPv6 traffic class).
#[inline(always)]
fn inner_tos(ctx: &XdpContext, l3: usize, v4: bool) -> Option<u8> {
    let b: [u8; 2] = read_opt(ctx, l3)?;
    Some(if v4 { b[1] } else { (b[0] << 4) | (b[1] >> 4) })
}

/// Writes Ethernet (+ tag) and the outer header into the `L3`-byte L2 header
/// and the room `bpf_xdp_adjust_head` made; `END` is where the inner packet
/// starts. Constant offsets keep every access provable to the verifier.
#[inline(always)]
fn write_headers<const L3: usize, const END: usize>(
    ctx: &XdpContext,
    backend: &Backend,
    smac: &[u8; 6],
    vlan: Option<[u8; 4]>,
    egress: &Egress,
    pkt: &Packet,
    tos: u8,
) -> bool {
    if !write_macs(ctx, backend, smac) {
        return false;
    }
    if let Some(tag) = vlan {
        let Some(p) = ptr_at::<[u8; 4]>(ctx, 12) else {
            return false;
        };
        // SAFETY: ptr_at checked the bytes are inside the frame.
        unsafe { p.write_unaligned(tag) };
    }
    let Some(ethertype) = ptr_at::<[u8; 2]>(ctx, L3 - 2) else {
        return false;
    };
    let v4 = END - L3 == IPIP_V4_OVERHEAD as usize;
    // SAFETY: as above.
    unsafe { ethertype.write_unaligned(if v4 { ETH_P_IPV4 } else { ETH_P_IPV6 }) };
    if v4 {
        let Some(outer) = ptr_at::<[u8; 20]>(ctx, L3) else {
            return false;
        };
        let total = (pkt.ip_len + IPIP_V4_OVERHEAD as usize) as u16;
        // SAFETY: as above.
        unsafe { outer.write_unaligned(ipv4_header(tos, total, &egress.src, &backend.addr)) };
    } else {
        let Some(outer) = ptr_at::<[u8; 40]>(ctx, L3) else {
            return false;
        };
        // SAFETY: as above.
        unsafe {
            outer.write_unaligned(ipv6_header(
                tos,
                pkt.ip_len as u16,
                &egress.src,
                &backend.addr,
            ))
        };
    }
    true
}

/// An outer IPv4 header with its checksum.
#[inline(always)]
fn ipv4_header(tos: u8, total: u16, src: &[u32; 4], dst: &[u32; 4]) -> [u8; 20] {
    let t = total.to_be_bytes();
    let s = src[0].to_ne_bytes();
    let d = dst[0].to_ne_bytes();
    let mut h = [
        0x45,
        tos,
        t[0],
        t[1],
        0,
        0,
        0x40, // DF
        0,
        OUTER_TTL,
        IPPROTO_IPIP,
        0,
        0,
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3],
    ];
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let c = (!(sum as u16)).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    h
}

/// An outer IPv6 header carrying `payload` bytes of an inner IPv6 packet.
#[inline(always)]
fn ipv6_header(tc: u8, payload: u16, src: &[u32; 4], dst: &[u32; 4]) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60 | (tc >> 4);
    h[1] = tc << 4;
    let p = payload.to_be_bytes();
    h[4] = p[0];
    h[5] = p[1];
    h[6] = IPPROTO_IPV6;
    h[7] = OUTER_TTL;
    let mut i = 0;
    while i < 4 {
        let s = src[i].to_ne_bytes();
        let d = dst[i].to_ne_bytes();
        let mut j = 0;
        while j < 4 {
            h[8 + i * 4 + j] = s[j];
            h[24 + i * 4 + j] = d[j];
            j += 1;
        }
        i += 1;
    }
    h
}
