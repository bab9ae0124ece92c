//! Client requests with a chosen source address, run in the calling thread's namespace.
//!
//! Call these inside [`Lab::in_client`] (or use [`Lab::http_get`] / [`Lab::udp_ask`], which
//! hop into the client namespace for one request).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::lab::Lab;
use crate::servers::{HTTP_PORT, UDP_PORT};

/// TCP connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Per-read/write timeout on an HTTP connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a whole HTTP exchange may take after connecting.
pub const HTTP_DEADLINE: Duration = Duration::from_secs(5);
/// How long one UDP attempt waits for the reply.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(1);
/// UDP attempts before giving up.
pub const UDP_ATTEMPTS: usize = 3;
/// Largest HTTP response accepted.
const MAX_RESPONSE: usize = 64 * 1024;

/// Which protocol a request uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// HTTP GET over TCP port 80.
    Tcp,
    /// A datagram to UDP port 7000.
    Udp,
}

/// HTTP GET `/` from `src` (kernel-chosen port) to `dst:port`; returns the body of a 200 answer.
pub fn http_get(src: IpAddr, dst: IpAddr, port: u16) -> Result<String> {
    http_get_from(SocketAddr::new(src, 0), SocketAddr::new(dst, port))
}

/// HTTP GET `/` from exactly `src` (a fixed port keeps the same 5-tuple) to `dst`.
pub fn http_get_from(src: SocketAddr, dst: SocketAddr) -> Result<String> {
    let what = || format!("HTTP GET {src} -> {dst}");
    let stream = connect(src, dst, CONNECT_TIMEOUT).with_context(what)?;
    exchange(stream, dst, IO_TIMEOUT, Instant::now() + HTTP_DEADLINE).with_context(what)
}

/// HTTP GET `/` from `src` (kernel-chosen port) to `dst`, the whole exchange (connect
/// included) bounded by `limit`: for probes that must fail fast rather than wait out a
/// dead server.
pub fn http_get_within(src: IpAddr, dst: SocketAddr, limit: Duration) -> Result<String> {
    let what = || format!("HTTP GET {src} -> {dst} within {limit:?}");
    let deadline = Instant::now() + limit;
    let stream = connect(SocketAddr::new(src, 0), dst, limit).with_context(what)?;
    exchange(stream, dst, limit, deadline).with_context(what)
}

/// Opens a TCP connection bound to `src`, waiting at most `timeout` for the handshake.
pub(crate) fn connect(src: SocketAddr, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    if src.is_ipv4() != dst.is_ipv4() {
        bail!("source and destination are of different families");
    }
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if src.port() == 0 {
        // Defers the port choice to connect(), which knows the destination and may reuse
        // ports whose TIME_WAIT is towards elsewhere; bind() alone would exhaust them.
        set_bind_address_no_port(&sock)?;
    } else {
        sock.set_reuse_address(true)?;
    }
    sock.bind(&src.into())
        .context("binding the source address")?;
    sock.connect_timeout(&dst.into(), timeout)
        .context("connecting")?;
    Ok(sock.into())
}

/// Sets IP_BIND_ADDRESS_NO_PORT (socket2 has no setter for it).
fn set_bind_address_no_port(sock: &Socket) -> Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting IP_BIND_ADDRESS_NO_PORT");
    }
    Ok(())
}

/// Sends the request, reads to EOF and returns the body of a 200 response; each read or
/// write waits at most `io_timeout`, and never past `deadline`.
fn exchange(
    mut stream: TcpStream,
    dst: SocketAddr,
    io_timeout: Duration,
    deadline: Instant,
) -> Result<String> {
    let host = match dst.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xlb-tests\r\nConnection: close\r\n\r\n"
    );
    // Both timeouts shrink to what is left before the deadline, so the deadline holds
    // even for a server that trickles or stays silent (zero would mean "block forever").
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .min(io_timeout)
            .max(Duration::from_millis(1))
    };
    stream.set_write_timeout(Some(left()))?;
    stream.write_all(request.as_bytes()).context("sending")?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if Instant::now() > deadline {
            bail!("no complete answer before the deadline");
        }
        stream.set_read_timeout(Some(left()))?;
        let n = stream.read(&mut buf).context("receiving")?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        if response.len() > MAX_RESPONSE {
            bail!("answer larger than {MAX_RESPONSE} bytes");
        }
    }
    parse_response(&response)
}

/// Checks the status line and Content-Length and returns the body.
pub(crate) fn parse_response(response: &[u8]) -> Result<String> {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("incomplete answer: {text:?}");
    };
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200 ") && !status.starts_with("HTTP/1.0 200 ") {
        bail!("unexpected status line {status:?}");
    }
    let length = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    if let Some(len) = length {
        if body.len() != len {
            bail!("body is {} bytes, Content-Length says {len}", body.len());
        }
    }
    Ok(body.to_owned())
}

/// Sends a datagram from `src` (kernel-chosen port) to `dst:port` and returns the reply text.
pub fn udp_ask(src: IpAddr, dst: IpAddr, port: u16) -> Result<String> {
    udp_ask_from(SocketAddr::new(src, 0), SocketAddr::new(dst, port))
}

/// Sends a datagram from exactly `src` to `dst`; only a reply from `dst` itself counts.
pub fn udp_ask_from(src: SocketAddr, dst: SocketAddr) -> Result<String> {
    let what = || format!("UDP {src} -> {dst}");
    if src.is_ipv4() != dst.is_ipv4() {
        bail!(
            "{}: source and destination are of different families",
            what()
        );
    }
    let sock =
        UdpSocket::bind(src).with_context(|| format!("{}: binding the source address", what()))?;
    // Connecting filters out datagrams from any other source: a reply from a backend's own
    // address instead of the VIP would break direct server return, and must fail.
    sock.connect(dst).with_context(what)?;
    sock.set_read_timeout(Some(UDP_TIMEOUT))
        .with_context(what)?;
    let mut buf = [0u8; 2048];
    let mut last_err = None;
    for _ in 0..UDP_ATTEMPTS {
        sock.send(b"who are you?").with_context(what)?;
        match sock.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => last_err = Some(e),
        }
    }
    match last_err {
        Some(e) => {
            Err(e).with_context(|| format!("{}: no reply after {UDP_ATTEMPTS} attempts", what()))
        }
        None => bail!("{}: no reply", what()),
    }
}

/// Which backend answers `src` on the VIP of its family, over HTTP or UDP.
pub fn who_serves(lab: &Lab, src: IpAddr, proto: Proto) -> Result<String> {
    let vip = lab.vip_for(src);
    match proto {
        Proto::Tcp => lab.http_get(src, vip, HTTP_PORT),
        Proto::Udp => lab.udp_ask(src, vip, UDP_PORT),
    }
}
