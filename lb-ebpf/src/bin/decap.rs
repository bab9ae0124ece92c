//! `xlb_decap`: the IP-in-IP decapsulator for backends whose kernel has no
//! ipip/ip6tnl device (`xlb decap`). A frame carrying IPv4 or IPv6 in an
//! outer IPv4 (protocol 4/41) or IPv6 (next header 4/41) header, whose inner
//! destination is a configured VIP, loses its outer header: the Ethernet
//! header (and one 802.1Q tag) moves forward over it, its EtherType becomes
//! the inner family's, and the inner packet goes up the stack unchanged.
//!
//! Every verdict is XDP_PASS: this runs on a backend, and anything it does
//! not decapsulate (truncated, malformed, fragments, extension headers, no
//! VIP) is the host's own business. Every frame moves one counter.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V4, FAMILY_V6,
    decap::{DecapVip, MAX_VIPS, stat},
    words_from_bytes,
};

/// Inner destinations to decapsulate for (`lb_common::decap::MAP_VIPS`).
#[map(name = "XLB_DECAP_VIPS_V1")]
static VIPS: HashMap<DecapVip, u32> = HashMap::pinned(MAX_VIPS, 0);

/// Per-reason counters (`lb_common::decap::MAP_STATS`).
#[map(name = "XLB_DECAP_STATS_V1")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::CAPACITY, 0);

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
/// IANA protocol number of IPv4 in IP (RFC 2003).
const PROTO_IPIP: u8 = 4;
/// IANA protocol number of IPv6 in IP (RFC 2473, RFC 4213).
const PROTO_IPV6: u8 = 41;
const IPV6_FRAGMENT: u8 = 44;
/// IPv4 `frags` bits that make a packet a fragment: MF and the offset.
const IPV4_FRAG_MASK: u16 = 0x3fff;
/// Most IPv4 option words (IHL 15 minus the 5 of the fixed header).
const MAX_OPTION_WORDS: usize = 10;

/// Counts the frame's reason and passes it, decapsulated or not.
#[xdp]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    let reason = match try_decap(&ctx) {
        Ok(r) | Err(r) => r,
    };
    if let Some(c) = STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, u32> {
    let p = ptr_at::<T>(ctx, offset).ok_or(stat::PASS_MALFORMED)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes at p are inside the frame.
    Ok(unsafe { p.read_unaligned() })
}

/// The outer header: how long it is, where its datagram ends (frame
/// offset), and what it carries.
struct Outer {
    v4: bool,
    len: usize,
    end: usize,
    proto: u8,
}

/// Decapsulates, returning the counter to move either way.
#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<u32, u32> {
    let mut l3 = ETH_LEN;
    let mut ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let vlan = ethertype == ETH_P_8021Q;
    if vlan {
        ethertype = u16::from_be(read::<u16>(ctx, ETH_LEN + 2)?);
        l3 += VLAN_LEN;
    }
    let outer = match ethertype {
        ETH_P_IPV4 => outer_v4(ctx, l3)?,
        ETH_P_IPV6 => outer_v6(ctx, l3)?,
        _ => return Err(stat::PASS_NOT_IP),
    };
    let inner_at = l3 + outer.len;
    let (vip, inner_ethertype, reason) = match outer.proto {
        PROTO_IPIP => {
            let h: [u8; IPV4_LEN] = read(ctx, inner_at)?;
            if h[0] >> 4 != 4 || h[0] & 0x0f < 5 || inner_at + IPV4_LEN > outer.end {
                return Err(stat::PASS_MALFORMED);
            }
            let vip = DecapVip {
                addr: [u32::from_ne_bytes([h[16], h[17], h[18], h[19]]), 0, 0, 0],
                family: FAMILY_V4,
                _pad: [0; 3],
            };
            let reason = if outer.v4 {
                stat::DECAP_4IN4
            } else {
                stat::DECAP_4IN6
            };
            (vip, ETH_P_IPV4, reason)
        }
        PROTO_IPV6 => {
            let h: [u8; IPV6_LEN] = read(ctx, inner_at)?;
            if h[0] >> 4 != 6 || inner_at + IPV6_LEN > outer.end {
                return Err(stat::PASS_MALFORMED);
            }
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&h[24..40]);
            let vip = DecapVip {
                addr: words_from_bytes(&dst),
                family: FAMILY_V6,
                _pad: [0; 3],
            };
            let reason = if outer.v4 {
                stat::DECAP_6IN4
            } else {
                stat::DECAP_6IN6
            };
            (vip, ETH_P_IPV6, reason)
        }
        _ => return Err(stat::PASS_NOT_IPIP),
    };
    // SAFETY: a map lookup; the value is not touched.
    if unsafe { VIPS.get(vip) }.is_none() {
        return Err(stat::PASS_NOT_VIP);
    }
    strip(ctx, vlan, outer.len, inner_ethertype)?;
    Ok(reason)
}

/// An outer IPv4 header at `l3` carrying IPv4 or IPv6, checked as the
/// stack would (version, IHL, lengths, checksum), not a fragment.
#[inline(always)]
fn outer_v4(ctx: &XdpContext, l3: usize) -> Result<Outer, u32> {
    let h: [u8; IPV4_LEN] = read(ctx, l3)?;
    if h[0] >> 4 != 4 {
        return Err(stat::PASS_MALFORMED);
    }
    // Masked to 4 bits so the verifier sees len <= 60.
    let len = ((h[0] & 0x0f) as usize) * 4;
    if len < IPV4_LEN {
        return Err(stat::PASS_MALFORMED);
    }
    let frame_left = ctx.data_end() - ctx.data() - l3;
    let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    if len > frame_left || tot_len < len || tot_len > frame_left {
        return Err(stat::PASS_MALFORMED);
    }
    let proto = h[9];
    if proto != PROTO_IPIP && proto != PROTO_IPV6 {
        return Err(stat::PASS_NOT_IPIP);
    }
    if u16::from_be_bytes([h[6], h[7]]) & IPV4_FRAG_MASK != 0 {
        return Err(stat::PASS_OUTER_FRAGMENT);
    }
    // Only for tunnelled packets: the host's other traffic pays nothing.
    if !checksum_ok(ctx, l3, &h, len) {
        return Err(stat::PASS_BAD_CHECKSUM);
    }
    Ok(Outer {
        v4: true,
        len,
        end: l3 + tot_len,
        proto,
    })
}

/// Whether the IPv4 header (`fixed` is its first 20 bytes, `len` its length
/// with options, already checked to be inside the frame) sums to all ones.
/// The ones' complement sum is byte-order independent (RFC 1071), so native
/// words do.
#[inline(always)]
fn checksum_ok(ctx: &XdpContext, l3: usize, fixed: &[u8; IPV4_LEN], len: usize) -> bool {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < IPV4_LEN {
        sum += u32::from(u16::from_ne_bytes([fixed[i], fixed[i + 1]]));
        i += 2;
    }
    let mut w = 0;
    while w < MAX_OPTION_WORDS {
        let at = IPV4_LEN + w * 4;
        if at >= len {
            break;
        }
        let Ok(word) = read::<[u8; 4]>(ctx, l3 + at) else {
            return false;
        };
        sum += u32::from(u16::from_ne_bytes([word[0], word[1]]));
        sum += u32::from(u16::from_ne_bytes([word[2], word[3]]));
        w += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// An outer IPv6 header at `l3` followed directly by IPv4 or IPv6.
#[inline(always)]
fn outer_v6(ctx: &XdpContext, l3: usize) -> Result<Outer, u32> {
    let h: [u8; IPV6_LEN] = read(ctx, l3)?;
    if h[0] >> 4 != 6 {
        return Err(stat::PASS_MALFORMED);
    }
    let frame_left = ctx.data_end() - ctx.data() - l3 - IPV6_LEN;
    let payload_len = u16::from_be_bytes([h[4], h[5]]) as usize;
    if payload_len > frame_left {
        return Err(stat::PASS_MALFORMED);
    }
    let proto = h[6];
    match proto {
        PROTO_IPIP | PROTO_IPV6 => Ok(Outer {
            v4: false,
            len: IPV6_LEN,
            end: l3 + IPV6_LEN + payload_len,
            proto,
        }),
        IPV6_FRAGMENT => Err(stat::PASS_OUTER_FRAGMENT),
        // Extension headers (RFC 8200 and successors) other than Fragment.
        0 | 43 | 50 | 51 | 60 | 135 | 139 | 140 => Err(stat::PASS_V6_EXT_HEADER),
        _ => Err(stat::PASS_NOT_IPIP),
    }
}

/// Removes `outer_len` bytes after the link-layer header: copies the
/// Ethernet header (with its tag) forward over the outer IP header, then
/// moves the frame start there. Nothing of the frame changes before the
/// head moves, so a refused move leaves it intact.
#[inline(always)]
fn strip(ctx: &XdpContext, vlan: bool, outer_len: usize, ethertype: u16) -> Result<(), u32> {
    if vlan {
        let mut hdr: [u8; ETH_LEN + VLAN_LEN] = read(ctx, 0)?;
        adjust_head(ctx, outer_len)?;
        hdr[16..18].copy_from_slice(&ethertype.to_be_bytes());
        write(ctx, hdr)
    } else {
        let mut hdr: [u8; ETH_LEN] = read(ctx, 0)?;
        adjust_head(ctx, outer_len)?;
        hdr[12..14].copy_from_slice(&ethertype.to_be_bytes());
        write(ctx, hdr)
    }
}

#[inline(always)]
fn adjust_head(ctx: &XdpContext, by: usize) -> Result<(), u32> {
    // SAFETY: the helper checks the new start against the frame itself;
    // `by` is at most 60, so the cast cannot wrap.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, by as i32) } != 0 {
        return Err(stat::PASS_ADJUST_FAILED);
    }
    Ok(())
}

/// Writes the link-layer header at the (moved) frame start.
#[inline(always)]
fn write<T: Copy>(ctx: &XdpContext, hdr: T) -> Result<(), u32> {
    // Never fails: the inner IP header the frame still holds is longer than
    // the header written; the check is for the verifier.
    let p = ptr_at::<T>(ctx, 0).ok_or(stat::PASS_MALFORMED)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes at p are inside the frame.
    unsafe { p.write_unaligned(hdr) };
    Ok(())
}

lb_ebpf::program_boilerplate!();
