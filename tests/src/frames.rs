//! Hand-built frames for fixtures and benchmarks. Checksums of [`Frame`] are
//! left zero: the XDP program never reads them, and these frames are never
//! delivered. [`IcmpError`] computes its outer IPv4 and ICMP checksums, so
//! its frames are what a router really sends. [`Encap`] wraps a frame's IP
//! packet in an outer IPv4 (valid checksum) or IPv6 header, as IP-in-IP
//! forwarding does; [`fill_checksums`] makes an inner packet deliverable.

use std::net::IpAddr;

/// MAC the fixture dataplane believes is its own interface's.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xff, 0x01];
/// MAC of the client that sends the frames.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xcc, 0x01];

/// L4 protocol of a built frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP SYN.
    Tcp,
    /// A UDP datagram.
    Udp,
}

/// A frame under construction; every field can be bent to make it malformed.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Destination MAC (default: the fixture LB's).
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// One 802.1Q tag with this TCI.
    pub vlan: Option<u16>,
    /// Client address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport protocol.
    pub l4: L4,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// L4 payload.
    pub payload: Vec<u8>,
    /// IPv4 only: extra option bytes (multiple of 4).
    pub ip_options: Vec<u8>,
    /// IPv4 only: the raw `frags` field (flags + offset).
    pub frags: u16,
    /// IPv6 only: insert a Fragment header with this offset (in 8-byte units) and M set.
    pub v6_fragment: Option<u16>,
    /// IP identification: IPv4 takes the low 16 bits, the IPv6 Fragment header all 32.
    pub ip_id: u32,
}

impl Frame {
    /// A frame from `src` to `dst:dport` with a 5-byte payload.
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4, dport: u16) -> Self {
        Self {
            dst_mac: LB_MAC,
            src_mac: CLIENT_MAC,
            vlan: None,
            src,
            dst,
            l4,
            sport: 40000,
            dport,
            payload: b"hello".to_vec(),
            ip_options: Vec::new(),
            frags: 0,
            v6_fragment: None,
            ip_id: 0x1234,
        }
    }

    /// A TCP SYN from text addresses.
    pub fn tcp(src: &str, dst: &str, dport: u16) -> Self {
        Self::new(ip(src), ip(dst), L4::Tcp, dport)
    }

    /// A UDP datagram from text addresses.
    pub fn udp(src: &str, dst: &str, dport: u16) -> Self {
        Self::new(ip(src), ip(dst), L4::Udp, dport)
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(self.sport.to_be_bytes());
        b.extend(self.dport.to_be_bytes());
        match self.l4 {
            L4::Tcp => {
                b.extend([0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
                b.extend([0x50, 0x02, 0xff, 0xff]); // data offset 5, SYN, window
                b.extend([0, 0, 0, 0]); // checksum, urgent
            }
            L4::Udp => {
                b.extend(((8 + self.payload.len()) as u16).to_be_bytes());
                b.extend([0, 0]);
            }
        }
        b.extend(&self.payload);
        b
    }

    fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp => 6,
            L4::Udp => 17,
        }
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(self.dst_mac);
        f.extend(self.src_mac);
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        if let Some(tci) = self.vlan {
            f.extend(0x8100u16.to_be_bytes());
            f.extend(tci.to_be_bytes());
        }
        f.extend(ethertype.to_be_bytes());
        let l4 = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let hdr_len = 20 + self.ip_options.len();
                f.push(0x40 | (hdr_len / 4) as u8);
                f.push(0);
                f.extend(((hdr_len + l4.len()) as u16).to_be_bytes());
                f.extend((self.ip_id as u16).to_be_bytes());
                f.extend(self.frags.to_be_bytes());
                f.push(64);
                f.push(self.proto());
                f.extend([0, 0]);
                f.extend(s.octets());
                f.extend(d.octets());
                f.extend(&self.ip_options);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let frag_len = if self.v6_fragment.is_some() { 8 } else { 0 };
                f.extend([0x60, 0, 0, 0]);
                f.extend(((l4.len() + frag_len) as u16).to_be_bytes());
                f.push(if self.v6_fragment.is_some() {
                    44
                } else {
                    self.proto()
                });
                f.push(64);
                f.extend(s.octets());
                f.extend(d.octets());
                if let Some(offset) = self.v6_fragment {
                    f.push(self.proto());
                    f.push(0);
                    f.extend(((offset << 3) | 1).to_be_bytes());
                    f.extend(self.ip_id.to_be_bytes());
                }
            }
            _ => panic!("mixed address families in a test frame"),
        }
        f.extend(l4);
        f
    }
}

/// Parses a literal test address (panics on a typo).
pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
}

/// An ICMP error from a router to `dst`, quoting the IP datagram of `quote`
/// (its Ethernet header dropped), cut to `quote_len` bytes.
#[derive(Clone, Debug)]
pub struct IcmpError {
    /// Destination MAC (default: the fixture LB's).
    pub dst_mac: [u8; 6],
    /// Source MAC (default: the client's, standing in for the router's).
    pub src_mac: [u8; 6],
    /// The router.
    pub src: IpAddr,
    /// Where the error is sent: the quoted datagram's source.
    pub dst: IpAddr,
    /// ICMP type (3 "destination unreachable" / ICMPv6 2 "packet too big" by default).
    pub icmp_type: u8,
    /// ICMP code (4 "fragmentation needed" for IPv4, 0 for IPv6 by default).
    pub code: u8,
    /// The next-hop MTU the router reports.
    pub mtu: u32,
    /// The datagram that did not fit; its frame's Ethernet header (no VLAN tag) is dropped.
    pub quote: Frame,
    /// How many bytes of the quoted datagram to include (capped at its length).
    pub quote_len: usize,
}

impl IcmpError {
    /// "Fragmentation needed" (IPv4) / "packet too big" (IPv6) with MTU 1400
    /// about `quote`, sent by `router` to the quote's source; quotes the IP
    /// header plus 8 bytes for IPv4 (the RFC 792 minimum), all of it for IPv6.
    pub fn too_big(router: &str, quote: Frame) -> Self {
        let v4 = quote.src.is_ipv4();
        let quote_len = if v4 {
            20 + quote.ip_options.len() + 8
        } else {
            usize::MAX
        };
        Self {
            dst_mac: LB_MAC,
            src_mac: CLIENT_MAC,
            src: ip(router),
            dst: quote.src,
            icmp_type: if v4 { 3 } else { 2 },
            code: if v4 { 4 } else { 0 },
            mtu: 1400,
            quote,
            quote_len,
        }
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let quoted = self.quote.build();
        let quoted = &quoted[14..];
        let quoted = &quoted[..self.quote_len.min(quoted.len())];
        let mut icmp = vec![self.icmp_type, self.code, 0, 0];
        match self.src {
            // RFC 1191: unused 16 bits, then the next-hop MTU.
            IpAddr::V4(_) => icmp.extend((self.mtu as u16 as u32).to_be_bytes()),
            IpAddr::V6(_) => icmp.extend(self.mtu.to_be_bytes()),
        }
        icmp.extend(quoted);

        let mut f = Vec::new();
        f.extend(self.dst_mac);
        f.extend(self.src_mac);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let sum = checksum(&[&icmp]);
                icmp[2..4].copy_from_slice(&sum.to_be_bytes());
                f.extend(0x0800u16.to_be_bytes());
                let mut hdr = vec![0x45, 0xc0];
                hdr.extend(((20 + icmp.len()) as u16).to_be_bytes());
                hdr.extend([0, 0, 0, 0, 64, 1, 0, 0]);
                hdr.extend(s.octets());
                hdr.extend(d.octets());
                let sum = checksum(&[&hdr]);
                hdr[10..12].copy_from_slice(&sum.to_be_bytes());
                f.extend(hdr);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                // RFC 4443: the checksum covers the IPv6 pseudo-header.
                let mut pseudo = Vec::new();
                pseudo.extend(s.octets());
                pseudo.extend(d.octets());
                pseudo.extend((icmp.len() as u32).to_be_bytes());
                pseudo.extend([0, 0, 0, 58]);
                let sum = checksum(&[&pseudo, &icmp]);
                icmp[2..4].copy_from_slice(&sum.to_be_bytes());
                f.extend(0x86ddu16.to_be_bytes());
                f.extend([0x60, 0, 0, 0]);
                f.extend((icmp.len() as u16).to_be_bytes());
                f.extend([58, 64]);
                f.extend(s.octets());
                f.extend(d.octets());
            }
            _ => panic!("mixed address families in a test frame"),
        }
        f.extend(icmp);
        f
    }
}

/// IANA protocol number of IPv4 in IP (RFC 2003).
pub const PROTO_IPIP: u8 = 4;
/// IANA protocol number of IPv6 in IP (RFC 2473).
pub const PROTO_IPV6: u8 = 41;

/// An IP-in-IP frame: the IP packet of `inner` (its Ethernet header and
/// VLAN tag dropped) behind an outer IPv4 header (protocol 4 or 41, valid
/// header checksum) or IPv6 header (next header 4 or 41), in a frame with
/// this builder's own Ethernet header and optional 802.1Q tag. Any outer
/// and inner family combine; the outer protocol follows the inner family.
#[derive(Clone, Debug)]
pub struct Encap {
    /// Destination MAC (default: the fixture LB's).
    pub dst_mac: [u8; 6],
    /// Source MAC (default: the client's).
    pub src_mac: [u8; 6],
    /// One 802.1Q tag with this TCI.
    pub vlan: Option<u16>,
    /// Outer source (the load balancer).
    pub src: IpAddr,
    /// Outer destination (the backend).
    pub dst: IpAddr,
    /// IPv4 TTL / IPv6 hop limit of the outer header.
    pub ttl: u8,
    /// IPv4 TOS / IPv6 traffic class of the outer header.
    pub tos: u8,
    /// Outer IPv4 identification.
    pub id: u16,
    /// Outer IPv4 `frags` field (flags + offset); 0x4000 (DF) by default.
    pub frags: u16,
    /// Outer IPv4 only: option bytes (multiple of 4), covered by the checksum.
    pub ip_options: Vec<u8>,
    /// The encapsulated packet.
    pub inner: Frame,
    /// Fill in the inner packet's IPv4 header and TCP/UDP checksums (see
    /// [`fill_checksums`]), for frames a real stack must accept; off by
    /// default, like every [`Frame`].
    pub inner_checksums: bool,
}

impl Encap {
    /// `inner` encapsulated from `src` to `dst` (text addresses), TTL 64, DF set.
    pub fn new(src: &str, dst: &str, inner: Frame) -> Self {
        Self {
            dst_mac: LB_MAC,
            src_mac: CLIENT_MAC,
            vlan: None,
            src: ip(src),
            dst: ip(dst),
            ttl: 64,
            tos: 0,
            id: 0x4242,
            frags: 0x4000,
            ip_options: Vec::new(),
            inner,
            inner_checksums: false,
        }
    }

    /// The inner IP packet exactly as it is carried (no Ethernet header).
    pub fn inner_packet(&self) -> Vec<u8> {
        let f = self.inner.build();
        let l2 = if self.inner.vlan.is_some() { 18 } else { 14 };
        let mut packet = f[l2..].to_vec();
        if self.inner_checksums {
            fill_checksums(&mut packet);
        }
        packet
    }

    /// The outer protocol number: 4 for an inner IPv4 packet, 41 for IPv6.
    pub fn proto(&self) -> u8 {
        if self.inner.src.is_ipv4() {
            PROTO_IPIP
        } else {
            PROTO_IPV6
        }
    }

    /// The outer IP header alone.
    pub fn outer_header(&self) -> Vec<u8> {
        let payload = self.inner_packet().len();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let hdr_len = 20 + self.ip_options.len();
                assert!(
                    self.ip_options.len().is_multiple_of(4) && hdr_len <= 60,
                    "IPv4 options must be a multiple of 4 bytes, at most 40"
                );
                let mut h = vec![0x40 | (hdr_len / 4) as u8, self.tos];
                h.extend(((hdr_len + payload) as u16).to_be_bytes());
                h.extend(self.id.to_be_bytes());
                h.extend(self.frags.to_be_bytes());
                h.extend([self.ttl, self.proto(), 0, 0]);
                h.extend(s.octets());
                h.extend(d.octets());
                h.extend(&self.ip_options);
                let sum = checksum(&[&h]);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut h = vec![0x60 | (self.tos >> 4), self.tos << 4, 0, 0];
                h.extend((payload as u16).to_be_bytes());
                h.extend([self.proto(), self.ttl]);
                h.extend(s.octets());
                h.extend(d.octets());
                h
            }
            _ => panic!("mixed address families in an outer header"),
        }
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(self.dst_mac);
        f.extend(self.src_mac);
        if let Some(tci) = self.vlan {
            f.extend(0x8100u16.to_be_bytes());
            f.extend(tci.to_be_bytes());
        }
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        f.extend(ethertype.to_be_bytes());
        f.extend(self.outer_header());
        f.extend(self.inner_packet());
        f
    }

    /// The frame a decapsulator makes of [`Encap::build`]: the same
    /// Ethernet header and tag, the inner family's EtherType, the inner
    /// packet unchanged.
    pub fn decapsulated(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(self.dst_mac);
        f.extend(self.src_mac);
        if let Some(tci) = self.vlan {
            f.extend(0x8100u16.to_be_bytes());
            f.extend(tci.to_be_bytes());
        }
        let ethertype: u16 = if self.inner.src.is_ipv4() {
            0x0800
        } else {
            0x86dd
        };
        f.extend(ethertype.to_be_bytes());
        f.extend(self.inner_packet());
        f
    }
}

/// Computes, in place, the checksums of an IP packet (no Ethernet header)
/// that carries TCP or UDP directly: the IPv4 header checksum, and the
/// TCP/UDP checksum over the pseudo-header (an IPv6 UDP checksum of 0 is
/// sent as 0xffff, RFC 8200). Other packets keep their L4 bytes.
pub fn fill_checksums(packet: &mut [u8]) {
    let (l4_at, proto, pseudo) = match packet[0] >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            packet[10..12].copy_from_slice(&[0, 0]);
            let sum = checksum(&[&packet[..ihl]]);
            packet[10..12].copy_from_slice(&sum.to_be_bytes());
            let proto = packet[9];
            let mut pseudo = packet[12..20].to_vec();
            pseudo.extend([0, proto]);
            pseudo.extend(((packet.len() - ihl) as u16).to_be_bytes());
            (ihl, proto, pseudo)
        }
        6 => {
            let proto = packet[6];
            let mut pseudo = packet[8..40].to_vec();
            pseudo.extend(((packet.len() - 40) as u32).to_be_bytes());
            pseudo.extend([0, 0, 0, proto]);
            (40, proto, pseudo)
        }
        v => panic!("not an IP packet (version {v})"),
    };
    let at = match proto {
        6 => l4_at + 16,
        17 => l4_at + 6,
        _ => return,
    };
    packet[at..at + 2].copy_from_slice(&[0, 0]);
    let mut sum = checksum(&[&pseudo, &packet[l4_at..]]);
    if sum == 0 && proto == 17 {
        sum = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// The Internet checksum (RFC 1071) over the concatenated parts, each of
/// even length except possibly the last.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let quote = Frame::tcp("10.0.0.10", "10.0.0.100", 40000);
        let f = IcmpError::too_big("10.0.0.1", quote).build();
        assert_eq!(checksum(&[&f[14..34]]), 0, "IPv4 header");
        assert_eq!(checksum(&[&f[34..]]), 0, "ICMP");
        assert_eq!(f.len(), 14 + 20 + 8 + 28);

        let quote = Frame::tcp("fd00::10", "fd00::100", 40000);
        let f = IcmpError::too_big("fd00::1", quote).build();
        let mut pseudo = f[22..54].to_vec();
        pseudo.extend(((f.len() - 54) as u32).to_be_bytes());
        pseudo.extend([0, 0, 0, 58]);
        assert_eq!(checksum(&[&pseudo, &f[54..]]), 0, "ICMPv6");
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3's sample bytes sum to 0xddf2.
        assert_eq!(
            checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            !0xddf2
        );
    }

    #[test]
    fn encap_headers() {
        let inner = Frame::udp("10.0.0.50", "10.0.0.10", 53);
        let mut e = Encap::new("192.168.1.1", "192.168.2.2", inner.clone());
        e.ip_options = vec![1, 1, 1, 0];
        let f = e.build();
        let inner_bytes = &inner.build()[14..];
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[14], 0x46, "version 4, IHL 6");
        assert_eq!(f[14 + 9], PROTO_IPIP);
        assert_eq!(checksum(&[&f[14..38]]), 0, "outer IPv4 header checksum");
        assert_eq!(
            u16::from_be_bytes([f[16], f[17]]) as usize,
            24 + inner_bytes.len()
        );
        assert_eq!(&f[38..], inner_bytes);
        assert_eq!(&e.decapsulated()[14..], inner_bytes);

        let inner = Frame::tcp("fd00::50", "fd00::10", 80);
        let mut e = Encap::new("fd01::1", "fd02::2", inner.clone());
        e.vlan = Some(7);
        let f = e.build();
        assert_eq!(&f[12..18], &[0x81, 0x00, 0, 7, 0x86, 0xdd]);
        assert_eq!(f[18 + 6], PROTO_IPV6);
        assert_eq!(&f[18 + 40..], &inner.build()[14..]);
        let d = e.decapsulated();
        assert_eq!(&d[..18], &f[..18]);
        assert_eq!(&d[18..], &inner.build()[14..]);

        // Cross: IPv6 inside IPv4.
        let e = Encap::new("192.168.1.1", "192.168.2.2", inner);
        let f = e.build();
        assert_eq!(f[14 + 9], PROTO_IPV6);
        assert_eq!(&e.decapsulated()[12..14], &[0x86, 0xdd]);
    }

    #[test]
    fn filled_checksums_verify() {
        let mut e = Encap::new(
            "192.168.1.1",
            "192.168.2.2",
            Frame::udp("10.0.0.50", "10.0.0.10", 53),
        );
        e.inner_checksums = true;
        let p = e.inner_packet();
        assert_eq!(checksum(&[&p[..20]]), 0, "inner IPv4 header");
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend([0, 17]);
        pseudo.extend(((p.len() - 20) as u16).to_be_bytes());
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0, "UDP over IPv4");

        let mut e = Encap::new("fd01::1", "fd02::2", Frame::tcp("fd00::50", "fd00::10", 80));
        e.inner_checksums = true;
        let p = e.inner_packet();
        let mut pseudo = p[8..40].to_vec();
        pseudo.extend(((p.len() - 40) as u32).to_be_bytes());
        pseudo.extend([0, 0, 0, 6]);
        assert_eq!(checksum(&[&pseudo, &p[40..]]), 0, "TCP over IPv6");
        assert_ne!(&p[56..58], &[0, 0]);
    }
}
