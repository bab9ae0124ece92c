//! Hand-built frames for fixtures and benchmarks. Checksums are left zero:
//! the XDP program never reads them, and these frames are never delivered.

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
