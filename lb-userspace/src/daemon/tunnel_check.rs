//! Health checks through the tunnel (`via = "tunnel"`, Katran's tunnelled checks):
//! the probe is addressed to the VIP and sent IP-in-IP to the backend's own address,
//! exactly as the dataplane forwards a client's packet, so a pass proves that the
//! backend decapsulates and accepts VIP traffic, not just that its own address answers.
//!
//! The inner packet (S → V:P, S the check's source) is built here, and the kernel adds
//! the outer header: a raw socket of protocol IPIP (IPv4) or IPV6 (41, IPv6) sends to
//! the backend's address. The backend answers from V straight to S, not through a tunnel:
//! - tcp: a TCP socket bound to (S, 0) reserves the source port without listening, so
//!   no connection of this host uses the same four-tuple and the kernel answers the
//!   SYN-ACK with a reset; the answer itself is read from a raw TCP socket bound to S
//!   (which sees every TCP segment to S: filtered by addresses, ports and sequence).
//!   However the check ends (SYN-ACK, timeout), unless refused, a reset follows the SYN
//!   through the tunnel, so the backend's half-open connection ends even where the
//!   kernel's own reset cannot reach it.
//! - udp: the datagram leaves "from" a UDP socket bound to (S, 0), which receives the reply.
//!
//! Everything waits on tokio's reactor (non-blocking sockets under `AsyncFd`): no
//! blocking syscall on a worker, and the caller's timeout drops the sockets with the check.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};

use etherparse::{Ipv4Slice, PacketBuilder, PacketBuilderStep, TcpSlice, ip_number};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;

use super::health::{Problem, Stage, io_problem};
use crate::config::HealthKind;

/// TTL / hop limit of the inner packet: the backend sees it after decapsulation.
const INNER_TTL: u8 = 64;
/// Receive window advertised in the SYN (any non-zero value; no data follows).
const SYN_WINDOW: u16 = 64240;
/// Largest packet read from the raw sockets (answers are headers only, or a short datagram).
const RECV_BUF: usize = 2048;

/// Runs one tunnelled check of `backend`: the probe goes to `vip` (the VIP and checked
/// port) inside IP-in-IP to `backend`, from `source`. Unbounded in time: the caller's
/// timeout ends it (every wait is a cancellable await).
pub(super) async fn run(
    backend: IpAddr,
    vip: SocketAddr,
    kind: &HealthKind,
    source: IpAddr,
) -> Result<(), Problem> {
    if backend.is_ipv4() != vip.is_ipv4() || source.is_ipv4() != vip.is_ipv4() {
        return Err(Problem::Local(format!(
            "backend {backend}, vip {vip} and source {source} are not of one family"
        )));
    }
    match kind {
        HealthKind::Tcp => tcp(backend, vip, source).await,
        HealthKind::Udp { send, expect } => udp(backend, vip, source, send, expect).await,
        // Refused by the config's validation; never counted against the backend.
        HealthKind::Http { .. } => Err(Problem::Local(
            "kind \"http\" is not checked through the tunnel".to_string(),
        )),
    }
}

/// A SYN to `vip` through the tunnel: SYN-ACK passes, a reset is "refused".
async fn tcp(backend: IpAddr, vip: SocketAddr, source: IpAddr) -> Result<(), Problem> {
    let domain = Domain::for_address(vip);
    // Reserves the port (and makes the kernel reset the SYN-ACK): bound, never listening.
    let holder = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| io_problem("creating a TCP socket", &e, Stage::Setup))?;
    holder
        .bind(&SocketAddr::new(source, 0).into())
        .map_err(|e| io_problem(&format!("binding source {source}"), &e, Stage::Setup))?;
    let from = holder
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| Problem::Local("reading the bound source port".to_string()))?;
    // Opened before the SYN leaves, so the answer cannot arrive before it.
    let answers = raw_socket(domain, libc::IPPROTO_TCP, source, "a raw TCP socket")?;
    // Every TCP segment to `source` is copied to this socket; let the kernel keep only
    // those from the VIP's port (the userspace filter below still decides).
    if let Err(e) = answers.get_ref().attach_filter(&answer_filter(vip)) {
        tracing::debug!("filter on the raw TCP socket: {e}");
    }
    let tunnel = tunnel_socket(source)?;
    let isn = random_u32();
    send(&tunnel, &tcp_segment(from, vip, isn, Flags::Syn)?, backend)?;
    // From here on the backend may hold a half-open connection: however the check ends
    // (SYN-ACK, timeout, cancelled), a reset goes after the SYN, unless it was refused.
    let mut reset = ResetOnDrop {
        tunnel: &tunnel,
        packet: tcp_segment(from, vip, isn.wrapping_add(1), Flags::Rst).ok(),
        backend,
    };
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let (n, peer) = recv_from(&answers, &mut buf).await?;
        let Some(answer) = tcp_answer(&buf[..n], peer, from, vip, isn) else {
            continue;
        };
        return match answer {
            Answer::SynAck => Ok(()),
            Answer::Reset => {
                reset.packet = None;
                Err(Problem::Backend(format!(
                    "refused: {vip} answered the tunnelled SYN with a reset"
                )))
            }
        };
    }
}

/// Sends a reset after the SYN through the tunnel when dropped, so the backend's
/// half-open connection ends at once rather than after its SYN-ACK retries: the kernel's
/// own reset to the SYN-ACK goes to the VIP by this host's route, which may not reach
/// the backend (or may be this host, where it holds the VIP).
struct ResetOnDrop<'a> {
    tunnel: &'a AsyncFd<Socket>,
    /// The inner reset; `None` when there is nothing to end.
    packet: Option<Vec<u8>>,
    backend: IpAddr,
}

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        // A non-blocking sendto; best effort, the check's outcome does not depend on it.
        if let Some(packet) = self.packet.take() {
            if let Err(e) = send(self.tunnel, &packet, self.backend) {
                tracing::debug!("tunnelled reset via {}: {}", self.backend, e.text());
            }
        }
    }
}

/// `send` to `vip` through the tunnel, from a UDP socket bound to `source`; passes on a
/// reply from `vip` containing `expect`.
async fn udp(
    backend: IpAddr,
    vip: SocketAddr,
    source: IpAddr,
    send_text: &str,
    expect: &str,
) -> Result<(), Problem> {
    let sock = UdpSocket::bind(SocketAddr::new(source, 0))
        .await
        .map_err(|e| io_problem(&format!("binding source {source}"), &e, Stage::Setup))?;
    let from = sock
        .local_addr()
        .map_err(|e| io_problem("reading the bound source port", &e, Stage::Setup))?;
    let tunnel = tunnel_socket(source)?;
    send(
        &tunnel,
        &udp_datagram(from, vip, send_text.as_bytes())?,
        backend,
    )?;
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        // Not connected: connect would need a route to the VIP, which this host may own.
        let (n, peer) = sock
            .recv_from(&mut buf)
            .await
            .map_err(|e| Problem::Local(format!("receive: {e}")))?;
        if peer != vip {
            continue;
        }
        let reply = String::from_utf8_lossy(&buf[..n]);
        if !reply.contains(expect) {
            return Err(Problem::Backend(format!(
                "reply {:?} lacks {expect:?}",
                reply.chars().take(60).collect::<String>()
            )));
        }
        return Ok(());
    }
}

/// A non-blocking raw socket of `protocol`, bound to `source` (so it only sees packets to it).
fn raw_socket(
    domain: Domain,
    protocol: libc::c_int,
    source: IpAddr,
    what: &str,
) -> Result<AsyncFd<Socket>, Problem> {
    let setup =
        |e: io::Error, doing: &str| io_problem(&format!("{doing} {what}"), &e, Stage::Setup);
    let sock = Socket::new(domain, Type::RAW, Some(Protocol::from(protocol)))
        .map_err(|e| setup(e, "creating"))?;
    sock.bind(&SocketAddr::new(source, 0).into())
        .map_err(|e| setup(e, &format!("binding {source} to")))?;
    sock.set_nonblocking(true)
        .map_err(|e| setup(e, "making non-blocking"))?;
    // SAFETY: the AsyncFd owns the Socket, which owns its descriptor and always returns it.
    unsafe { AsyncFd::register(sock) }.map_err(|e| setup(e.into_parts().1, "registering"))
}

/// The raw socket the probe leaves by: protocol IPIP (4) for IPv4, IPV6 (41) for IPv6; the
/// kernel puts the outer header from `source` to the backend in front of what it is given.
fn tunnel_socket(source: IpAddr) -> Result<AsyncFd<Socket>, Problem> {
    let (domain, protocol) = match source {
        IpAddr::V4(_) => (Domain::IPV4, libc::IPPROTO_IPIP),
        IpAddr::V6(_) => (Domain::IPV6, libc::IPPROTO_IPV6),
    };
    let sock = raw_socket(domain, protocol, source, "the tunnel socket")?;
    // It is never read, but would be handed every IP-in-IP packet to `source`: a filter
    // that accepts nothing keeps them out of its buffer.
    if let Err(e) = sock
        .get_ref()
        .attach_filter(&[insn(libc::BPF_RET | libc::BPF_K, 0, 0, 0)])
    {
        tracing::debug!("filter on the tunnel socket: {e}");
    }
    Ok(sock)
}

/// One classic BPF instruction.
const fn insn(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// A socket filter passing only TCP segments from `vip` (address and port). An IPv4 raw
/// socket's filter sees the IP header first; an IPv6 one's, the TCP header (its source
/// address is not there: the userspace filter checks it).
fn answer_filter(vip: SocketAddr) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_LDX, BPF_MSH, BPF_RET,
        BPF_W,
    };
    let port = u32::from(vip.port());
    let accept = insn(BPF_RET | BPF_K, 0, 0, u32::MAX);
    let drop = insn(BPF_RET | BPF_K, 0, 0, 0);
    match vip.ip() {
        IpAddr::V4(v) => vec![
            // Source address (offset 12); not the VIP: to the drop at the end.
            insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, 12),
            insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 4, u32::from(v)),
            // X = the IP header's length; the TCP source port is at X.
            insn(BPF_LDX | BPF_B | BPF_MSH, 0, 0, 0),
            insn(BPF_LD | BPF_H | BPF_IND, 0, 0, 0),
            insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, port),
            accept,
            drop,
        ],
        IpAddr::V6(_) => vec![
            insn(BPF_LD | BPF_H | BPF_ABS, 0, 0, 0),
            insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, port),
            accept,
            drop,
        ],
    }
}

/// Sends one inner packet to `backend` through the tunnel socket. Every error is this
/// host's (no route, no buffer, a local firewall's EPERM): the probe never left.
fn send(tunnel: &AsyncFd<Socket>, packet: &[u8], backend: IpAddr) -> Result<(), Problem> {
    let to = SockAddr::from(SocketAddr::new(backend, 0));
    match tunnel.get_ref().send_to(packet, &to) {
        Ok(n) if n == packet.len() => Ok(()),
        Ok(n) => Err(Problem::Local(format!(
            "sending through the tunnel to {backend}: {n} of {} bytes sent",
            packet.len()
        ))),
        Err(e) => Err(Problem::Local(format!(
            "sending through the tunnel to {backend}: {e}"
        ))),
    }
}

/// One packet from a raw socket and the address it came from.
async fn recv_from(sock: &AsyncFd<Socket>, buf: &mut [u8]) -> Result<(usize, IpAddr), Problem> {
    loop {
        let mut ready = sock
            .readable()
            .await
            .map_err(|e| Problem::Local(format!("waiting on a raw socket: {e}")))?;
        // SAFETY: u8 and MaybeUninit<u8> have one layout, and recv only writes into it.
        let uninit = unsafe { &mut *(std::ptr::from_mut(buf) as *mut [MaybeUninit<u8>]) };
        match ready.try_io(|s| s.get_ref().recv_from(uninit)) {
            Ok(Ok((n, from))) => {
                let Some(peer) = from.as_socket() else {
                    continue;
                };
                return Ok((n, peer.ip()));
            }
            Ok(Err(e)) => return Err(Problem::Local(format!("reading a raw socket: {e}"))),
            Err(_would_block) => continue,
        }
    }
}

/// The TCP flags of a probe segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flags {
    /// Opens the connection.
    Syn,
    /// Ends the half-open connection after the SYN-ACK.
    Rst,
}

/// The inner IPv4/IPv6 header from `src` to `dst`, or a local problem for mixed families.
fn ip_header(
    src: IpAddr,
    dst: IpAddr,
) -> Result<PacketBuilderStep<etherparse::IpHeaders>, Problem> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            Ok(PacketBuilder::ipv4(s.octets(), d.octets(), INNER_TTL))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            Ok(PacketBuilder::ipv6(s.octets(), d.octets(), INNER_TTL))
        }
        _ => Err(Problem::Local(format!(
            "{src} and {dst} are not of one family"
        ))),
    }
}

/// An inner IP packet carrying a TCP segment `src` → `dst` with sequence `seq`; no
/// options, no data; the IPv4 header and TCP checksums filled in.
fn tcp_segment(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    flags: Flags,
) -> Result<Vec<u8>, Problem> {
    let builder = ip_header(src.ip(), dst.ip())?.tcp(src.port(), dst.port(), seq, SYN_WINDOW);
    let builder = match flags {
        Flags::Syn => builder.syn(),
        Flags::Rst => builder.rst(),
    };
    let mut out = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut out, &[])
        .map_err(|e| Problem::Local(format!("building the TCP probe: {e}")))?;
    Ok(out)
}

/// An inner IP packet carrying a UDP datagram `src` → `dst` with `payload`, checksums filled in.
fn udp_datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Result<Vec<u8>, Problem> {
    let builder = ip_header(src.ip(), dst.ip())?.udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, payload)
        .map_err(|e| Problem::Local(format!("building the UDP probe: {e}")))?;
    Ok(out)
}

/// What the VIP answered to the SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// SYN-ACK: something accepts connections on the VIP.
    SynAck,
    /// Reset: nothing listens there.
    Reset,
}

/// Whether `packet`, read from a raw TCP socket from `peer`, answers the SYN `from` →
/// `vip` with initial sequence `isn`. IPv4 raw sockets hand over the IP header, IPv6
/// ones only the TCP segment (the addresses come from the socket: its source is `peer`,
/// its destination the address the socket is bound to).
fn tcp_answer(
    packet: &[u8],
    peer: IpAddr,
    from: SocketAddr,
    vip: SocketAddr,
    isn: u32,
) -> Option<Answer> {
    if peer != vip.ip() {
        return None;
    }
    let segment = match vip.ip() {
        IpAddr::V4(v) => {
            let ip = Ipv4Slice::from_slice(packet).ok()?;
            let header = ip.header();
            if header.source_addr() != v
                || IpAddr::V4(header.destination_addr()) != from.ip()
                || ip.payload_ip_number() != ip_number::TCP
                || ip.is_payload_fragmented()
            {
                return None;
            }
            ip.payload().payload
        }
        IpAddr::V6(_) => packet,
    };
    let tcp = TcpSlice::from_slice(segment).ok()?;
    if tcp.source_port() != vip.port()
        || tcp.destination_port() != from.port()
        || !tcp.ack()
        || tcp.acknowledgment_number() != isn.wrapping_add(1)
    {
        return None;
    }
    match (tcp.syn(), tcp.rst()) {
        (true, false) => Some(Answer::SynAck),
        (false, true) => Some(Answer::Reset),
        _ => None,
    }
}

/// An initial sequence number nobody can predict from outside: a stale or forged
/// segment must not pass the check (std's hasher keys are random per process and call).
fn random_u32() -> u32 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}

impl Problem {
    /// The problem in words (for logs of best-effort steps).
    fn text(&self) -> &str {
        match self {
            Problem::Backend(why) | Problem::Local(why) => why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    use crate::config::HealthConfig;
    use crate::daemon::health::{CheckOutcome, check_tunnelled};

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    /// RFC 1071 one's-complement sum of 16-bit big-endian words, folded (the reference
    /// the builders are checked against; itself checked on a published header below).
    fn sum16(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.concat();
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// Whether the transport checksum of `segment` (protocol `proto`) from `src` to
    /// `dst` verifies: the sum over the pseudo-header and the segment is all ones.
    fn transport_ok(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> bool {
        let len = segment.len() as u32;
        let pseudo: Vec<u8> = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => [
                &s.octets()[..],
                &d.octets(),
                &[0, proto],
                &(len as u16).to_be_bytes(),
            ]
            .concat(),
            (IpAddr::V6(s), IpAddr::V6(d)) => [
                &s.octets()[..],
                &d.octets(),
                &len.to_be_bytes(),
                &[0, 0, 0, proto],
            ]
            .concat(),
            _ => panic!("mixed families"),
        };
        sum16(&[&pseudo, segment]) == 0xffff
    }

    #[test]
    fn reference_checksum_matches_a_published_header() {
        // The IPv4 header of Wikipedia's "IPv4 header checksum" example: checksum b861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(sum16(&[&header]), 0xffff);
        let mut zeroed = header;
        zeroed[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(!sum16(&[&zeroed]), 0xb861);
    }

    /// The IPv4 probes: header fields and both checksums, for SYN, RST and UDP.
    #[test]
    fn ipv4_probes_are_well_formed() {
        let (from, vip) = (sa("10.1.0.2:40001"), sa("10.9.0.10:80"));
        let syn = tcp_segment(from, vip, 0x0102_0304, Flags::Syn).expect("syn");
        assert_eq!(syn.len(), 40);
        assert_eq!(syn[0], 0x45, "IPv4, no options");
        assert_eq!(u16::from_be_bytes([syn[2], syn[3]]), 40, "total length");
        assert_eq!(syn[9], 6, "protocol TCP");
        assert_eq!(&syn[12..16], &[10, 1, 0, 2]);
        assert_eq!(&syn[16..20], &[10, 9, 0, 10]);
        assert_eq!(sum16(&[&syn[..20]]), 0xffff, "IPv4 header checksum");
        let tcp = &syn[20..];
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 40001);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 80);
        assert_eq!(&tcp[4..8], &[1, 2, 3, 4], "sequence");
        assert_eq!(tcp[12] >> 4, 5, "data offset: no options");
        assert_eq!(tcp[13], 0x02, "SYN only");
        assert!(transport_ok(from.ip(), vip.ip(), 6, tcp));

        let rst = tcp_segment(from, vip, 0x0102_0305, Flags::Rst).expect("rst");
        assert_eq!(rst[20 + 13], 0x04, "RST only");
        assert_eq!(&rst[24..28], &[1, 2, 3, 5]);
        assert_eq!(sum16(&[&rst[..20]]), 0xffff);
        assert!(transport_ok(from.ip(), vip.ip(), 6, &rst[20..]));

        let udp = udp_datagram(from, vip, b"ping").expect("udp");
        assert_eq!(udp.len(), 20 + 8 + 4);
        assert_eq!(udp[9], 17, "protocol UDP");
        assert_eq!(sum16(&[&udp[..20]]), 0xffff);
        assert_eq!(u16::from_be_bytes([udp[24], udp[25]]), 12, "UDP length");
        assert_ne!(&udp[26..28], &[0, 0], "checksum present");
        assert_eq!(&udp[28..], b"ping");
        assert!(transport_ok(from.ip(), vip.ip(), 17, &udp[20..]));
    }

    /// The IPv6 probes: header fields and the transport checksums over the IPv6 pseudo-header.
    #[test]
    fn ipv6_probes_are_well_formed() {
        let (from, vip) = (sa("[fd00:1::2]:40001"), sa("[fd00:9::10]:443"));
        let syn = tcp_segment(from, vip, 7, Flags::Syn).expect("syn");
        assert_eq!(syn.len(), 60);
        assert_eq!(syn[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([syn[4], syn[5]]), 20, "payload length");
        assert_eq!(syn[6], 6, "next header TCP");
        assert_eq!(syn[7], INNER_TTL);
        assert_eq!(
            &syn[8..24],
            &from
                .ip()
                .to_string()
                .parse::<Ipv6Addr>()
                .expect("ip")
                .octets()
        );
        assert_eq!(syn[40 + 13], 0x02);
        assert!(transport_ok(from.ip(), vip.ip(), 6, &syn[40..]));
        // A wrong source in the pseudo-header must not verify: the check above has teeth.
        assert!(!transport_ok(
            sa("[fd00:1::3]:1").ip(),
            vip.ip(),
            6,
            &syn[40..]
        ));

        let udp = udp_datagram(from, vip, b"hello").expect("udp");
        assert_eq!(udp[6], 17);
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 13);
        assert!(transport_ok(from.ip(), vip.ip(), 17, &udp[40..]));

        assert!(matches!(
            tcp_segment(from, sa("10.0.0.1:80"), 1, Flags::Syn),
            Err(Problem::Local(_))
        ));
    }

    /// An answer as the backend would send it: `vip` → `to`, TCP flags and ack number.
    fn answer(vip: SocketAddr, to: SocketAddr, syn: bool, rst: bool, ack: u32) -> Vec<u8> {
        let b = ip_header(vip.ip(), to.ip())
            .expect("family")
            .tcp(vip.port(), to.port(), 999, 1000);
        let b = match (syn, rst) {
            (true, _) => b.syn(),
            (_, true) => b.rst(),
            _ => b,
        }
        .ack(ack);
        let mut out = Vec::new();
        b.write(&mut out, &[]).expect("write");
        out
    }

    /// Only the SYN-ACK or reset of this very probe counts; everything else on the raw
    /// socket (other ports, other peers, other sequence numbers) is ignored.
    #[test]
    fn answers_are_filtered_strictly() {
        let isn = 1000;
        for (from, vip) in [
            (sa("10.1.0.2:40001"), sa("10.9.0.10:80")),
            (sa("[fd00:1::2]:40001"), sa("[fd00:9::10]:80")),
        ] {
            let v6 = vip.is_ipv6();
            // IPv6 raw sockets hand over the TCP segment only.
            let seen = |p: Vec<u8>| if v6 { p[40..].to_vec() } else { p };
            let classify = |p: Vec<u8>, peer: IpAddr| tcp_answer(&seen(p), peer, from, vip, isn);
            let v = vip.ip();
            assert_eq!(
                classify(answer(vip, from, true, false, isn + 1), v),
                Some(Answer::SynAck)
            );
            assert_eq!(
                classify(answer(vip, from, false, true, isn + 1), v),
                Some(Answer::Reset)
            );
            // A stale answer to an earlier probe.
            assert_eq!(classify(answer(vip, from, true, false, isn + 2), v), None);
            // From another port of the VIP, to another local port, from another host.
            let other_port = SocketAddr::new(v, 81);
            assert_eq!(
                classify(answer(other_port, from, true, false, isn + 1), v),
                None
            );
            let other_local = SocketAddr::new(from.ip(), 40002);
            assert_eq!(
                classify(answer(vip, other_local, true, false, isn + 1), v),
                None
            );
            let other_host = if v6 {
                sa("[fd00:9::11]:80")
            } else {
                sa("10.9.0.11:80")
            };
            assert_eq!(
                classify(
                    answer(other_host, from, true, false, isn + 1),
                    other_host.ip()
                ),
                None
            );
            // A bare ACK is neither.
            assert_eq!(classify(answer(vip, from, false, false, isn + 1), v), None);
            // Garbage.
            assert_eq!(tcp_answer(&[0x45, 0, 0], v, from, vip, isn), None);
        }
        // IPv4: the inner addresses are read from the packet, not just the socket's peer.
        let (from, vip) = (sa("10.1.0.2:40001"), sa("10.9.0.10:80"));
        let elsewhere = answer(vip, sa("10.1.0.3:40001"), true, false, 1001);
        assert_eq!(tcp_answer(&elsewhere, vip.ip(), from, vip, 1000), None);
        let udp = udp_datagram(vip, from, b"x").expect("udp");
        assert_eq!(tcp_answer(&udp, vip.ip(), from, vip, 1000), None);
    }

    /// The kernel-side filter of the raw TCP socket, on loopback: segments of other
    /// connections never arrive, the VIP's do. Needs root (raw sockets).
    #[test]
    fn answer_filter_keeps_only_the_vips_port() {
        for lo in ["127.0.0.1", "::1"] {
            let lo: IpAddr = lo.parse().expect("ip");
            let listen = || std::net::TcpListener::bind((lo, 0)).expect("listen");
            let (vip_l, other_l) = (listen(), listen());
            let vip = vip_l.local_addr().expect("addr");
            let raw = match Socket::new(Domain::for_address(vip), Type::RAW, Some(Protocol::TCP)) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    eprintln!("skipped: raw sockets need CAP_NET_RAW ({e})");
                    return;
                }
                Err(e) => panic!("raw socket: {e}"),
            };
            raw.bind(&SocketAddr::new(lo, 0).into()).expect("bind");
            raw.attach_filter(&answer_filter(vip)).expect("filter");
            raw.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            let mut buf = [MaybeUninit::<u8>::uninit(); RECV_BUF];

            let _other = std::net::TcpStream::connect(other_l.local_addr().expect("addr"))
                .expect("connect other");
            let err = raw
                .recv(&mut buf)
                .expect_err("another port's segments are filtered");
            assert!(
                matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "{err}"
            );

            let _to_vip = std::net::TcpStream::connect(vip).expect("connect vip");
            let n = raw.recv(&mut buf).expect("the VIP's SYN-ACK passes");
            // SAFETY: recv initialised the first n bytes.
            let got: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let segment = if vip.is_ipv4() {
                let ip = Ipv4Slice::from_slice(&got).expect("ipv4");
                assert_eq!(IpAddr::V4(ip.header().source_addr()), lo);
                ip.payload().payload.to_vec()
            } else {
                got
            };
            let tcp = TcpSlice::from_slice(&segment).expect("tcp");
            assert_eq!(tcp.source_port(), vip.port(), "{lo}");
        }
    }

    fn spec(kind: HealthKind) -> HealthConfig {
        HealthConfig {
            kind,
            port: 0,
            via: crate::config::HealthVia::Tunnel,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(300),
            rise: 2,
            fall: 3,
            source: None,
        }
    }

    /// Nothing on loopback decapsulates (no ipip module, no decap program), so a
    /// tunnelled check of a listening port fails where a direct one passes: the probe
    /// really goes inside the tunnel. Needs root (raw sockets).
    #[tokio::test]
    async fn loopback_does_not_decapsulate() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let vip = SocketAddr::new(lo, port);
        let direct = crate::daemon::health::check(vip, &spec(HealthKind::Tcp), Some(lo)).await;
        assert!(matches!(direct, CheckOutcome::Pass(_)), "{direct:?}");
        for kind in [
            HealthKind::Tcp,
            HealthKind::Udp {
                send: "ping".into(),
                expect: String::new(),
            },
        ] {
            match check_tunnelled(lo, vip, &spec(kind.clone()), Some(lo)).await {
                CheckOutcome::Fail(why) => assert_eq!(why, "timeout after 300ms", "{kind}"),
                CheckOutcome::NotRun(why) if why.contains("Operation not permitted") => {
                    eprintln!("skipped: raw sockets need CAP_NET_RAW ({why})");
                    return;
                }
                other => panic!("{kind}: expected a failure, got {other:?}"),
            }
        }
    }

    /// A source this host does not have, a family mix, or an "http" kind: not run.
    #[tokio::test]
    async fn local_problems_are_not_run() {
        let vip = sa("127.0.0.1:9");
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let foreign = "192.0.2.1".parse().expect("ip");
        for kind in [
            HealthKind::Tcp,
            HealthKind::Udp {
                send: "ping".into(),
                expect: String::new(),
            },
        ] {
            match check_tunnelled(lo, vip, &spec(kind.clone()), Some(foreign)).await {
                CheckOutcome::NotRun(why) => {
                    assert!(why.contains("binding source 192.0.2.1"), "{kind}: {why}");
                }
                other => panic!("{kind}: expected not run, got {other:?}"),
            }
        }
        let mixed = check_tunnelled(
            lo,
            vip,
            &spec(HealthKind::Tcp),
            Some("::1".parse().expect("ip")),
        )
        .await;
        assert!(
            matches!(&mixed, CheckOutcome::NotRun(w) if w.contains("one family")),
            "{mixed:?}"
        );
        let http = HealthKind::Http {
            path: "/".into(),
            status: 200,
        };
        assert!(matches!(
            check_tunnelled(lo, vip, &spec(http), Some(lo)).await,
            CheckOutcome::NotRun(_)
        ));
    }
}
