//! Packet parsing: Ethernet (one 802.1Q tag), IPv4 (with options), IPv6 (fixed
//! header plus Fragment), TCP and UDP. All reads go through [`ptr_at`].
//!
//! Policy for what cannot be parsed: frames the kernel would discard anyway
//! (truncated, bad version/IHL/length) are dropped here with a reason;
//! anything well-formed that is not TCP/UDP, and IPv6 with extension headers
//! other than Fragment, passes to the stack untouched.

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, stat};
use network_types::{ip::Ipv4Hdr, ip::Ipv6Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::verdict::Verdict;

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_FRAG_LEN: usize = 8;
/// IPv4 `frags` bits that make a packet a fragment: MF and the offset.
const IPV4_FRAG_MASK: u16 = 0x3fff;

/// The one bounds-checked accessor: a pointer to a `T` at `offset` bytes into
/// the frame, or `None` if the frame is too short. Callers read and write it
/// unaligned (`network_types` headers are byte arrays).
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// What the rest of the program needs from a frame addressed to an IP host.
pub struct Packet {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Destination port as on the wire; 0 for fragments.
    pub dport: u16,
    /// IPv4 fragment, or IPv6 with a Fragment header.
    pub fragment: bool,
    /// Source address in key layout (`lb_common::ServiceKey::addr`).
    pub src: [u32; 4],
    /// Destination address in key layout.
    pub dst: [u32; 4],
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize, missing: Verdict) -> Result<T, Verdict> {
    let p = ptr_at::<T>(ctx, offset).ok_or(missing)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes at p are inside the frame.
    Ok(unsafe { p.read_unaligned() })
}

/// Parses up to the L4 ports, or says what to do with the frame instead.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Verdict> {
    let mut l3 = ETH_LEN;
    let mut ethertype = u16::from_be(read::<u16>(
        ctx,
        12,
        Verdict::drop(stat::DROP_TRUNCATED_ETH),
    )?);
    if ethertype == ETH_P_8021Q {
        ethertype = u16::from_be(read::<u16>(
            ctx,
            ETH_LEN + 2,
            Verdict::drop(stat::DROP_BAD_VLAN),
        )?);
        l3 += VLAN_LEN;
    }
    match ethertype {
        ETH_P_IPV4 => parse_v4(ctx, l3),
        ETH_P_IPV6 => parse_v6(ctx, l3),
        _ => Err(Verdict::pass(stat::PASS_NOT_IP)),
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize) -> Result<Packet, Verdict> {
    let ip: Ipv4Hdr = read(ctx, l3, Verdict::drop(stat::DROP_TRUNCATED_IP))?;
    if ip.vihl >> 4 != 4 {
        return Err(Verdict::drop(stat::DROP_BAD_VERSION));
    }
    // Masked to 4 bits so the verifier sees hdr_len <= 60.
    let hdr_len = ((ip.vihl & 0x0f) as usize) * 4;
    if hdr_len < Ipv4Hdr::LEN {
        return Err(Verdict::drop(stat::DROP_BAD_IHL));
    }
    let frame_left = ctx.data_end() - ctx.data() - l3;
    if hdr_len > frame_left {
        return Err(Verdict::drop(stat::DROP_TRUNCATED_IP));
    }
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < hdr_len || tot_len > frame_left {
        return Err(Verdict::drop(stat::DROP_BAD_LENGTH));
    }
    let fragment = u16::from_be_bytes(ip.frags) & IPV4_FRAG_MASK != 0;
    let src = [u32::from_ne_bytes(ip.src_addr), 0, 0, 0];
    let dst = [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0];
    finish(ctx, FAMILY_V4, ip.proto, l3 + hdr_len, fragment, src, dst)
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize) -> Result<Packet, Verdict> {
    let ip: Ipv6Hdr = read(ctx, l3, Verdict::drop(stat::DROP_TRUNCATED_IP))?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Verdict::drop(stat::DROP_BAD_VERSION));
    }
    let frame_left = ctx.data_end() - ctx.data() - l3 - Ipv6Hdr::LEN;
    if u16::from_be_bytes(ip.payload_len) as usize > frame_left {
        return Err(Verdict::drop(stat::DROP_BAD_LENGTH));
    }
    let src = words(&ip.src_addr);
    let dst = words(&ip.dst_addr);
    let mut l4 = l3 + Ipv6Hdr::LEN;
    let mut next = ip.next_hdr;
    let mut fragment = false;
    if next == IPV6_FRAGMENT {
        // Fragment header: next header (1 byte), reserved, offset/flags, id.
        next = read::<u8>(ctx, l4, Verdict::drop(stat::DROP_TRUNCATED_IP))?;
        if ptr_at::<[u8; IPV6_FRAG_LEN]>(ctx, l4).is_none() {
            return Err(Verdict::drop(stat::DROP_TRUNCATED_IP));
        }
        l4 += IPV6_FRAG_LEN;
        fragment = true;
    } else if is_v6_extension(next) {
        return Err(Verdict::pass(stat::PASS_V6_EXT_HEADER));
    }
    finish(ctx, FAMILY_V6, next, l4, fragment, src, dst)
}

/// IPv6 extension headers (RFC 8200 and successors) other than Fragment.
#[inline(always)]
fn is_v6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 50 | 51 | 60 | 135 | 139 | 140)
}

#[inline(always)]
fn words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[inline(always)]
fn finish(
    ctx: &XdpContext,
    family: u8,
    proto: u8,
    l4: usize,
    fragment: bool,
    src: [u32; 4],
    dst: [u32; 4],
) -> Result<Packet, Verdict> {
    let header_len = match proto {
        PROTO_TCP => TcpHdr::LEN,
        PROTO_UDP => UdpHdr::LEN,
        _ => return Err(Verdict::pass(stat::PASS_NOT_L4)),
    };
    // Fragments are steered by address only: non-first ones have no ports,
    // and the first must go where the rest go.
    let dport = if fragment {
        0
    } else {
        if ptr_at::<u8>(ctx, l4 + header_len - 1).is_none() {
            return Err(Verdict::drop(stat::DROP_TRUNCATED_L4));
        }
        // TCP and UDP both carry the destination port at bytes 2..4.
        read::<u16>(ctx, l4 + 2, Verdict::drop(stat::DROP_TRUNCATED_L4))?
    };
    Ok(Packet {
        family,
        proto,
        dport,
        fragment,
        src,
        dst,
    })
}
