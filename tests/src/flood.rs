//! A bounded flood of spoofed sources: pre-built Ethernet frames (TCP SYN or
//! UDP, IPv4 or IPv6, valid checksums) to a VIP, sent through an `AF_PACKET`
//! socket in a lab namespace, straight to the load balancer's MAC.
//!
//! Sources come from [`SPOOF_V4`] / [`SPOOF_V6`], ranges no lab namespace
//! owns or routes: backends drop their answers for lack of a route, so
//! nothing leaves the lab and nobody answers the flood. Every flood is
//! bounded by its frame count and by a time limit, and paced so the veths
//! do not drop frames before the load balancer sees them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::frames::{Frame, L4, checksum};
use crate::lab::{Lab, MacAddr};
use crate::netns::NetNs;

/// First spoofed IPv4 source (10.78.0.0/15: outside the lab's 10.77.0.0/24).
pub const SPOOF_V4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 0);
/// First spoofed IPv6 source (fd00:78::/64: outside the lab's fd00:77::/64).
pub const SPOOF_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x78, 0, 0, 0, 0, 0, 0);
/// Most spoofed sources per family (the size of the IPv4 range).
pub const MAX_SOURCES: u32 = 1 << 17;
/// Most frames one flood may send, whatever it asks for.
pub const MAX_FRAMES: u64 = 4 << 20;
/// Frames sent between two looks at the clock.
const PACE_BATCH: usize = 64;
/// Attempts per frame when the socket reports a full queue.
const SEND_ATTEMPTS: usize = 3;

/// Spoofed source number `n` (0-based) in the family of `like`.
pub fn spoofed_source(like: IpAddr, n: u32) -> Result<IpAddr> {
    if n >= MAX_SOURCES {
        bail!("spoofed source {n} is past the range of {MAX_SOURCES}");
    }
    Ok(match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::from(SPOOF_V4) + n)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(u128::from(SPOOF_V6) + u128::from(n))),
    })
}

/// One flood: `sources` spoofed clients, `per_source` frames each (sent back
/// to back, so each source's entry is referenced once it exists), to
/// `vip:port`.
#[derive(Clone, Debug)]
pub struct Flood {
    /// Destination MAC: the load balancer's interface.
    pub dst_mac: MacAddr,
    /// Source MAC: the sending interface's, so the bridge learns nothing new.
    pub src_mac: MacAddr,
    /// Destination address (a VIP); sources take its family.
    pub vip: IpAddr,
    /// Destination port.
    pub port: u16,
    /// TCP SYNs or UDP datagrams.
    pub l4: L4,
    /// Number of the first spoofed source (see [`spoofed_source`]), so that
    /// successive floods can use fresh sources.
    pub first_source: u32,
    /// How many sources.
    pub sources: u32,
    /// Frames per source.
    pub per_source: u32,
    /// Frames per second (> 0).
    pub rate: u32,
    /// The flood stops when this much time has passed, sent or not.
    pub time_limit: Duration,
}

/// What [`Flood::send`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodReport {
    /// Frames the flood was asked to send.
    pub frames: u64,
    /// Frames the socket accepted.
    pub sent: u64,
    /// Frames the socket refused (after retries).
    pub failed: u64,
    /// How long sending took.
    pub elapsed: Duration,
    /// Whether the time limit cut the flood short.
    pub timed_out: bool,
}

impl Flood {
    /// A flood from the lab's client interface to the load balancer's MAC:
    /// `sources` sources from number `first_source`, 2 frames each, 50 000
    /// frames per second, at most 30 s.
    pub fn to_lab(
        lab: &Lab,
        vip: IpAddr,
        port: u16,
        l4: L4,
        first_source: u32,
        sources: u32,
    ) -> Self {
        Self {
            dst_mac: lab.lb_mac,
            src_mac: lab.client_mac,
            vip,
            port,
            l4,
            first_source,
            sources,
            per_source: 2,
            rate: 50_000,
            time_limit: Duration::from_secs(30),
        }
    }

    /// Total frames: sources × frames per source.
    pub fn frame_count(&self) -> u64 {
        u64::from(self.sources) * u64::from(self.per_source)
    }

    /// Every frame of the flood, in sending order (each source's frames back
    /// to back), with valid IP and L4 checksums.
    pub fn frames(&self) -> Result<Vec<Vec<u8>>> {
        let total = self.frame_count();
        if total > MAX_FRAMES {
            bail!("a flood of {total} frames is above the limit of {MAX_FRAMES}");
        }
        let last = u64::from(self.first_source) + u64::from(self.sources);
        if last > u64::from(MAX_SOURCES) {
            bail!(
                "sources {}..{last} are past the range of {MAX_SOURCES}",
                self.first_source
            );
        }
        let mut out = Vec::with_capacity(total as usize);
        for i in 0..self.sources {
            let n = self.first_source + i;
            let src = spoofed_source(self.vip, n)?;
            let mut frame = Frame::new(src, self.vip, self.l4, self.port);
            frame.dst_mac = self.dst_mac.octets();
            frame.src_mac = self.src_mac.octets();
            // Ports spread like real clients'; the source address is what is new.
            frame.sport = 1024 + (n % 64_000) as u16;
            frame.ip_id = n;
            let mut bytes = frame.build();
            fill_checksums(&mut bytes)?;
            for _ in 0..self.per_source {
                out.push(bytes.clone());
            }
        }
        Ok(out)
    }

    /// Sends the flood out of `ifname` in `ns`; returns once every frame was
    /// handed to the socket or the time limit passed.
    pub fn send(&self, ns: &NetNs, ifname: &str) -> Result<FloodReport> {
        let frames = self.frames()?;
        send_frames(ns, ifname, &frames, self.rate, self.time_limit)
    }
}

/// Sends `frames` out of `ifname` in `ns` through an `AF_PACKET` socket, at
/// most `rate` per second, stopping at `time_limit`.
pub fn send_frames(
    ns: &NetNs,
    ifname: &str,
    frames: &[Vec<u8>],
    rate: u32,
    time_limit: Duration,
) -> Result<FloodReport> {
    if rate == 0 {
        bail!("a flood needs a rate above 0");
    }
    if frames.len() as u64 > MAX_FRAMES {
        bail!(
            "{} frames are above the limit of {MAX_FRAMES}",
            frames.len()
        );
    }
    ns.run(|| {
        let sock = packet_socket(ifname)?;
        let mut report = FloodReport {
            frames: frames.len() as u64,
            ..FloodReport::default()
        };
        let start = Instant::now();
        for (i, frame) in frames.iter().enumerate() {
            if i % PACE_BATCH == 0 {
                let now = Instant::now();
                if now - start > time_limit {
                    report.timed_out = true;
                    break;
                }
                let due = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            if send_one(&sock, frame)? {
                report.sent += 1;
            } else {
                report.failed += 1;
            }
        }
        report.elapsed = start.elapsed();
        Ok(report)
    })
    .with_context(|| format!("flooding out of {ifname} in {}", ns.name()))
}

/// A raw `AF_PACKET` socket bound to `ifname` for sending only (protocol 0:
/// it receives nothing).
pub(crate) fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname).context("interface name with a NUL")?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("no interface {ifname}"));
    }
    // SAFETY: socket(2) with constant arguments; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening an AF_PACKET socket");
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields set below make it an address.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    // SAFETY: bind(2) with a pointer to a live sockaddr_ll and its size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding to {ifname}"));
    }
    Ok(sock)
}

/// Sends one frame; false if the kernel kept refusing it for lack of buffer
/// space, an error for anything else.
fn send_one(sock: &OwnedFd, frame: &[u8]) -> Result<bool> {
    for attempt in 0..SEND_ATTEMPTS {
        // SAFETY: send(2) reads frame.len() bytes from a live slice.
        let rc = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if rc >= 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOBUFS | libc::EAGAIN) if attempt + 1 < SEND_ATTEMPTS => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Some(libc::ENOBUFS | libc::EAGAIN) => return Ok(false),
            _ => return Err(err).context("sending a flood frame"),
        }
    }
    Ok(false)
}

/// Fills the IPv4 header checksum and the TCP/UDP checksum of an untagged
/// frame built by [`Frame::build`] without IPv4 options or fragments.
pub fn fill_checksums(frame: &mut [u8]) -> Result<()> {
    if frame.len() < 14 {
        bail!("frame shorter than an Ethernet header");
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (l4_start, proto, pseudo) = match ethertype {
        0x0800 => {
            let ip = frame
                .get_mut(14..34)
                .context("frame ends inside the IPv4 header")?;
            if ip[0] != 0x45 {
                bail!("IPv4 header with options: not supported");
            }
            ip[10..12].copy_from_slice(&[0, 0]);
            let sum = checksum(&[ip]);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            let proto = ip[9];
            let l4_len = (frame.len() - 34) as u32;
            let mut pseudo = frame[26..34].to_vec();
            pseudo.extend([0, proto]);
            pseudo.extend((l4_len as u16).to_be_bytes());
            (34, proto, pseudo)
        }
        0x86dd => {
            let ip = frame
                .get(14..54)
                .context("frame ends inside the IPv6 header")?;
            let proto = ip[6];
            let l4_len = (frame.len() - 54) as u32;
            let mut pseudo = ip[8..40].to_vec();
            pseudo.extend(l4_len.to_be_bytes());
            pseudo.extend([0, 0, 0, proto]);
            (54, proto, pseudo)
        }
        other => bail!("EtherType {other:#06x} is neither IPv4 nor IPv6"),
    };
    let offset = match proto {
        6 => 16,
        17 => 6,
        other => bail!("IP protocol {other} is neither TCP nor UDP"),
    };
    let l4 = &mut frame[l4_start..];
    if l4.len() < offset + 2 {
        bail!("frame ends inside the L4 header");
    }
    l4[offset..offset + 2].copy_from_slice(&[0, 0]);
    let mut sum = checksum(&[&pseudo, l4]);
    if proto == 17 && sum == 0 {
        // RFC 768: a computed zero is sent as all ones (zero means "none").
        sum = 0xffff;
    }
    l4[offset..offset + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flood(vip: &str, l4: L4) -> Flood {
        Flood {
            dst_mac: MacAddr([2, 0, 0, 0, 0xff, 1]),
            src_mac: MacAddr([2, 0, 0, 0, 0xcc, 1]),
            vip: vip.parse().expect("vip"),
            port: 80,
            l4,
            first_source: 10,
            sources: 300,
            per_source: 2,
            rate: 1000,
            time_limit: Duration::from_secs(1),
        }
    }

    /// Source address of a built frame.
    fn source(f: &[u8]) -> IpAddr {
        match u16::from_be_bytes([f[12], f[13]]) {
            0x0800 => IpAddr::from(<[u8; 4]>::try_from(&f[26..30]).expect("4 bytes")),
            _ => IpAddr::from(<[u8; 16]>::try_from(&f[22..38]).expect("16 bytes")),
        }
    }

    #[test]
    fn sources_are_fresh_outside_the_lab_and_sent_twice_back_to_back() {
        for (vip, lab_net) in [("10.77.0.10", "10.77.0."), ("fd00:77::10", "fd00:77::")] {
            let frames = flood(vip, L4::Udp).frames().expect("frames");
            assert_eq!(frames.len(), 600);
            let sources: Vec<IpAddr> = frames.iter().map(|f| source(f)).collect();
            for pair in sources.chunks(2) {
                assert_eq!(pair[0], pair[1]);
            }
            let distinct: std::collections::BTreeSet<_> = sources.iter().collect();
            assert_eq!(distinct.len(), 300);
            assert!(sources.iter().all(|s| !s.to_string().starts_with(lab_net)));
            assert_eq!(sources[0], spoofed_source(sources[0], 10).expect("source"));
            assert!(frames.iter().all(|f| f[..6] == [2, 0, 0, 0, 0xff, 1]));
        }
        assert_eq!(
            spoofed_source(IpAddr::V4(Ipv4Addr::LOCALHOST), MAX_SOURCES - 1).expect("last"),
            "10.79.255.255".parse::<IpAddr>().expect("ip")
        );
        assert!(spoofed_source(IpAddr::V4(Ipv4Addr::LOCALHOST), MAX_SOURCES).is_err());
        let mut too_many = flood("10.77.0.10", L4::Tcp);
        too_many.first_source = MAX_SOURCES - 1;
        assert!(too_many.frames().is_err());
    }

    #[test]
    fn checksums_verify() {
        for (vip, l4) in [
            ("10.77.0.10", L4::Tcp),
            ("10.77.0.10", L4::Udp),
            ("fd00:77::10", L4::Tcp),
            ("fd00:77::10", L4::Udp),
        ] {
            let f = &flood(vip, l4).frames().expect("frames")[0];
            let (l4_start, pseudo) = if vip.contains('.') {
                assert_eq!(checksum(&[&f[14..34]]), 0, "IPv4 header");
                let mut p = f[26..34].to_vec();
                p.extend([0, f[23]]);
                p.extend(((f.len() - 34) as u16).to_be_bytes());
                (34, p)
            } else {
                let mut p = f[22..54].to_vec();
                p.extend(((f.len() - 54) as u32).to_be_bytes());
                p.extend([0, 0, 0, f[20]]);
                (54, p)
            };
            assert_eq!(checksum(&[&pseudo, &f[l4_start..]]), 0, "{vip} {l4:?}");
            let at = l4_start + if l4 == L4::Tcp { 16 } else { 6 };
            assert_ne!(&f[at..at + 2], &[0, 0], "{vip} {l4:?}: no checksum");
        }
    }
}
