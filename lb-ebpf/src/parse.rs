//! Packet parsing: Ethernet (one 802.1Q tag), IPv4 (with options), IPv6 (fixed
//! header plus Fragment), TCP and UDP, and the datagram an ICMP "fragmentation
//! needed" / ICMPv6 "packet too big" quotes. All reads go through [`ptr_at`].
//!
//! Policy for what cannot be parsed: frames the kernel would discard anyway
//! (truncated, bad version/IHL/length, a TCP/UDP header past the end of the
//! IP datagram) are dropped here with a reason; anything well-formed that is
//! not TCP/UDP, and IPv6 with extension headers other than Fragment, passes
//! to the stack untouched. So does an ICMP error whose quote cannot be read
//! (it may be the load balancer host's own ICMP).

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, stat, words_from_bytes};
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
/// IPv4 `frags` bits of the fragment offset: zero in a first fragment.
const IPV4_OFFSET_MASK: u16 = 0x1fff;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// ICMP type and code of "fragmentation needed and DF set" (RFC 792/1191).
const ICMP_FRAG_NEEDED: [u8; 2] = [3, 4];
/// ICMPv6 type of "packet too big" (RFC 4443; the code is always 0).
const ICMPV6_TOO_BIG: u8 = 2;
/// ICMP/ICMPv6 error header: type, code, checksum, 4 bytes (MTU/unused).
const ICMP_HDR_LEN: usize = 8;
/// Bytes of the quoted L4 header an ICMP error is sure to carry.
const QUOTED_L4_LEN: usize = 8;

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

/// Whether a datagram is whole or which kind of fragment it is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not a fragment.
    Whole,
    /// Offset 0 with more to come: carries the ports and records them.
    First,
    /// Any other fragment: no ports, found through the fragment map.
    Later,
}

/// What the rest of the program needs from a frame addressed to an IP host.
pub struct Packet {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Destination port as on the wire: never 0, except 0 for a later fragment.
    pub dport: u16,
    /// Source port as on the wire; 0 for a later fragment.
    pub sport: u16,
    /// Whole datagram, first or later fragment.
    pub fragment: Fragment,
    /// IP identification in host order (IPv4 16 bits, IPv6 32); 0 when whole.
    pub id: u32,
    /// Source address in key layout (`lb_common::ServiceKey::addr`).
    pub src: [u32; 4],
    /// Destination address in key layout.
    pub dst: [u32; 4],
    /// Offset of the IP header in the frame (after Ethernet and any 802.1Q tag).
    pub l3: usize,
    /// Length of the IP packet as its header says (IPv4 total length, IPv6
    /// 40 + payload length): what an encapsulation carries (frame padding
    /// past it is not part of the packet).
    pub ip_len: usize,
    /// An ICMP "fragmentation needed" / ICMPv6 "packet too big" about a
    /// datagram a backend sent from a VIP. The other fields then describe
    /// the quoted datagram turned around, as the client's traffic would
    /// look: `src` is the client (the quote's destination), `dst` the VIP
    /// (the quote's source, equal to the ICMP's destination), `dport` the
    /// service port (the quote's source port); always `Fragment::Whole`.
    pub too_big: bool,
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
    let frags = u16::from_be_bytes(ip.frags);
    let frag = Frag {
        fragment: frags & IPV4_FRAG_MASK != 0,
        first: frags & IPV4_OFFSET_MASK == 0,
        id: u32::from(u16::from_be_bytes(ip.id)),
    };
    let src = [u32::from_ne_bytes(ip.src_addr), 0, 0, 0];
    let dst = [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0];
    let l4 = L4At {
        l3,
        start: l3 + hdr_len,
        end: l3 + tot_len,
    };
    finish(ctx, FAMILY_V4, ip.proto, l4, frag, src, dst)
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize) -> Result<Packet, Verdict> {
    let ip: Ipv6Hdr = read(ctx, l3, Verdict::drop(stat::DROP_TRUNCATED_IP))?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Verdict::drop(stat::DROP_BAD_VERSION));
    }
    let frame_left = ctx.data_end() - ctx.data() - l3 - Ipv6Hdr::LEN;
    let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
    if payload_len > frame_left {
        return Err(Verdict::drop(stat::DROP_BAD_LENGTH));
    }
    let src = words_from_bytes(&ip.src_addr);
    let dst = words_from_bytes(&ip.dst_addr);
    let mut l4 = L4At {
        l3,
        start: l3 + Ipv6Hdr::LEN,
        end: l3 + Ipv6Hdr::LEN + payload_len,
    };
    let mut next = ip.next_hdr;
    let mut frag = Frag {
        fragment: false,
        first: true,
        id: 0,
    };
    if next == IPV6_FRAGMENT {
        // Fragment header: next header (1 byte), reserved, offset (13 bits)
        // and flags, identification.
        let fh: [u8; IPV6_FRAG_LEN] = read(ctx, l4.start, Verdict::drop(stat::DROP_TRUNCATED_IP))?;
        l4.start += IPV6_FRAG_LEN;
        if l4.start > l4.end {
            // The payload length does not even cover the Fragment header.
            return Err(Verdict::drop(stat::DROP_BAD_LENGTH));
        }
        next = fh[0];
        frag = Frag {
            fragment: true,
            first: u16::from_be_bytes([fh[2], fh[3]]) >> 3 == 0,
            id: u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]),
        };
    } else if is_v6_extension(next) {
        return Err(Verdict::pass(stat::PASS_V6_EXT_HEADER));
    }
    finish(ctx, FAMILY_V6, next, l4, frag, src, dst)
}

/// IPv6 extension headers (RFC 8200 and successors) other than Fragment.
#[inline(always)]
fn is_v6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 50 | 51 | 60 | 135 | 139 | 140)
}

/// Where the L4 part of the IP datagram lies in the frame: from `start` to
/// `end` (exclusive) as the IP length field says; `end` is inside the frame.
struct L4At {
    /// Where the IP header starts.
    l3: usize,
    start: usize,
    end: usize,
}

/// Whether the datagram is a fragment, and if so whether the first, and its id.
struct Frag {
    fragment: bool,
    first: bool,
    id: u32,
}

#[inline(always)]
fn finish(
    ctx: &XdpContext,
    family: u8,
    proto: u8,
    l4: L4At,
    frag: Frag,
    src: [u32; 4],
    dst: [u32; 4],
) -> Result<Packet, Verdict> {
    let header_len = match proto {
        PROTO_TCP => TcpHdr::LEN,
        PROTO_UDP => UdpHdr::LEN,
        // A fragmented ICMP error is no router's: it passes like other ICMP.
        PROTO_ICMP if family == FAMILY_V4 && !frag.fragment => {
            return too_big_v4(ctx, l4, dst).ok_or(Verdict::pass(stat::PASS_NOT_L4));
        }
        PROTO_ICMPV6 if family == FAMILY_V6 && !frag.fragment => {
            return too_big_v6(ctx, l4, dst).ok_or(Verdict::pass(stat::PASS_NOT_L4));
        }
        _ => return Err(Verdict::pass(stat::PASS_NOT_L4)),
    };
    // A later fragment has no ports: the fragment map supplies them. Whatever
    // starts an L4 header (a whole datagram, a first fragment) must hold all
    // of it inside the datagram: bytes past the IP length are padding, not
    // ports.
    if frag.fragment && !frag.first {
        return Ok(Packet {
            family,
            proto,
            dport: 0,
            sport: 0,
            fragment: Fragment::Later,
            id: frag.id,
            src,
            dst,
            l3: l4.l3,
            ip_len: l4.end - l4.l3,
            too_big: false,
        });
    }
    if l4.start + header_len > l4.end {
        return Err(Verdict::drop(stat::DROP_TRUNCATED_L4));
    }
    // TCP and UDP both carry the source port at bytes 0..2, the destination at 2..4.
    let ports = read::<[u16; 2]>(ctx, l4.start, Verdict::drop(stat::DROP_TRUNCATED_L4))?;
    if ports[1] == 0 {
        // Never a service, and never recorded for later fragments.
        return Err(Verdict::pass(stat::PASS_PORT_ZERO));
    }
    Ok(Packet {
        family,
        proto,
        dport: ports[1],
        sport: ports[0],
        fragment: if frag.fragment {
            Fragment::First
        } else {
            Fragment::Whole
        },
        id: frag.id,
        src,
        dst,
        l3: l4.l3,
        ip_len: l4.end - l4.l3,
        too_big: false,
    })
}

/// The `T` at `offset` in the frame, or `None` if the frame is too short.
#[inline(always)]
pub fn read_opt<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes at p are inside the frame.
    Some(unsafe { p.read_unaligned() })
}

/// An IPv4 "fragmentation needed" to `dst` quoting a TCP/UDP datagram (IPv4
/// header with options, then at least 8 bytes of its L4 header inside the
/// ICMP datagram) sent from `dst`; `None` for other ICMP or a bad quote.
#[inline(always)]
fn too_big_v4(ctx: &XdpContext, l4: L4At, dst: [u32; 4]) -> Option<Packet> {
    let icmp: [u8; 2] = read_opt(ctx, l4.start)?;
    if icmp != ICMP_FRAG_NEEDED {
        return None;
    }
    let inner_at = l4.start + ICMP_HDR_LEN;
    let inner: Ipv4Hdr = read_opt(ctx, inner_at)?;
    if inner.vihl >> 4 != 4 {
        return None;
    }
    // Masked to 4 bits so the verifier sees hdr_len <= 60.
    let hdr_len = ((inner.vihl & 0x0f) as usize) * 4;
    // A quoted later fragment has no ports where they would be.
    if hdr_len < Ipv4Hdr::LEN || u16::from_be_bytes(inner.frags) & IPV4_OFFSET_MASK != 0 {
        return None;
    }
    let src = [u32::from_ne_bytes(inner.dst_addr), 0, 0, 0];
    let vip = [u32::from_ne_bytes(inner.src_addr), 0, 0, 0];
    quoted(
        ctx,
        l4,
        inner_at + hdr_len,
        FAMILY_V4,
        inner.proto,
        src,
        vip,
        dst,
    )
}

/// The ICMPv6 "packet too big" equivalent of [`too_big_v4`]; the quoted
/// IPv6 header must be followed directly by TCP/UDP.
#[inline(always)]
fn too_big_v6(ctx: &XdpContext, l4: L4At, dst: [u32; 4]) -> Option<Packet> {
    let icmp_type: u8 = read_opt(ctx, l4.start)?;
    if icmp_type != ICMPV6_TOO_BIG {
        return None;
    }
    let inner_at = l4.start + ICMP_HDR_LEN;
    let inner: Ipv6Hdr = read_opt(ctx, inner_at)?;
    if inner.vcf[0] >> 4 != 6 {
        return None;
    }
    let src = words_from_bytes(&inner.dst_addr);
    let vip = words_from_bytes(&inner.src_addr);
    quoted(
        ctx,
        l4,
        inner_at + Ipv6Hdr::LEN,
        FAMILY_V6,
        inner.next_hdr,
        src,
        vip,
        dst,
    )
}

/// The quoted datagram's ports at `at`, checked to lie inside the ICMP
/// datagram, and its source checked to be the ICMP's destination.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn quoted(
    ctx: &XdpContext,
    l4: L4At,
    at: usize,
    family: u8,
    proto: u8,
    client: [u32; 4],
    vip: [u32; 4],
    dst: [u32; 4],
) -> Option<Packet> {
    if (proto != PROTO_TCP && proto != PROTO_UDP) || vip != dst {
        return None;
    }
    // Read before the length test: that test implies this one is in the
    // frame, so LLVM would drop the bounds check the verifier needs.
    let ports: [u16; 2] = read_opt(ctx, at)?;
    if at + QUOTED_L4_LEN > l4.end {
        return None;
    }
    if ports[0] == 0 {
        return None;
    }
    Some(Packet {
        family,
        proto,
        dport: ports[0],
        sport: ports[1],
        fragment: Fragment::Whole,
        id: 0,
        src: client,
        dst: vip,
        l3: l4.l3,
        ip_len: l4.end - l4.l3,
        too_big: true,
    })
}
