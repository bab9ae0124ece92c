//! Health checks: how one check of one backend runs. The tasks that run
//! them are in `checks.rs`; the rise/fall state machine in `desired.rs`;
//! checks through the tunnel (`via = "tunnel"`) in `tunnel_check.rs`.
//!
//! A check says [`CheckOutcome::Pass`], [`CheckOutcome::Fail`] (the backend's
//! fault, or no answer within the timeout) or [`CheckOutcome::NotRun`] (this
//! host could not run it: no descriptors, no buffers, no route, source address
//! gone). Only Pass and Fail are evidence about the backend.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::Empty;
use hyper::body::Bytes;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use super::lb::BackendRef;
use super::tunnel_check;
use crate::config::{HealthConfig, HealthKind};

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The backend answered as expected, within the timeout; how long the check took.
    Pass(Duration),
    /// The backend did not answer as expected, or not within the timeout; why, in words.
    Fail(String),
    /// The check could not be run here (a local error); says nothing about the backend.
    NotRun(String),
}

/// Why a check did not pass.
#[derive(Debug)]
pub(super) enum Problem {
    /// The backend's fault (refused, reset, wrong answer).
    Backend(String),
    /// This host's: the check never really reached the backend.
    Local(String),
}

/// Where an I/O error happened: errors creating or binding a socket are always local.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Stage {
    /// socket(2), bind(2).
    Setup,
    /// connect, send, receive.
    Exchange,
}

/// errno values that say this host could not run the check: out of descriptors, buffers
/// or memory, the source address gone or no port left, no route.
const LOCAL_ERRNOS: [i32; 6] = [
    libc::EMFILE,
    libc::ENFILE,
    libc::ENOBUFS,
    libc::ENOMEM,
    libc::EADDRNOTAVAIL,
    libc::ENETUNREACH,
];

/// Whether `errno` at `stage` is a local error rather than the backend's answer.
fn is_local(errno: Option<i32>, stage: Stage) -> bool {
    // Every errno of socket() and bind() is local; EADDRINUSE there means no free port.
    stage == Stage::Setup || errno.is_some_and(|e| LOCAL_ERRNOS.contains(&e))
}

pub(super) fn io_problem(what: &str, e: &std::io::Error, stage: Stage) -> Problem {
    let why = format!("{what}: {e}");
    if is_local(e.raw_os_error(), stage) {
        Problem::Local(why)
    } else {
        Problem::Backend(why)
    }
}

/// The first OS error code in an error's source chain (hyper wraps I/O errors).
fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let Some(io) = err.downcast_ref::<std::io::Error>() else {
            cur = err.source();
            continue;
        };
        if let Some(code) = io.raw_os_error() {
            return Some(code);
        }
        // A custom io::Error's source() skips the error it wraps; look inside it.
        cur = match io.get_ref() {
            Some(inner) => Some(inner),
            None => err.source(),
        };
    }
    None
}

fn http_problem(what: &str, e: &hyper::Error) -> Problem {
    let why = format!("{what}: {e}");
    match os_error(e) {
        Some(code) if is_local(Some(code), Stage::Exchange) => Problem::Local(why),
        Some(code) => Problem::Backend(format!(
            "{why} ({})",
            std::io::Error::from_raw_os_error(code)
        )),
        None => Problem::Backend(why),
    }
}

/// Runs one check of `addr`, leaving from `source` when given (else the kernel chooses).
///
/// Its duration starts when the check first runs, not when it was scheduled; a check
/// that ends after `spec.timeout` fails even if it got its answer (its task was held up,
/// so the answer is no evidence of a healthy backend within the timeout).
pub async fn check(addr: SocketAddr, spec: &HealthConfig, source: Option<IpAddr>) -> CheckOutcome {
    timed(spec, run(addr, &spec.kind, source)).await
}

/// Runs one check of `backend` through the tunnel (`via = "tunnel"`): the probe goes to
/// `vip` (the VIP and the checked port) encapsulated IP-in-IP to `backend`, from `source`
/// (else the kernel's source towards `backend`). Timed as [`check`]; kinds tcp and udp.
pub async fn check_tunnelled(
    backend: IpAddr,
    vip: SocketAddr,
    spec: &HealthConfig,
    source: Option<IpAddr>,
) -> CheckOutcome {
    timed(spec, async {
        let source = match source {
            Some(src) => src,
            None => route_source(backend).await?,
        };
        tunnel_check::run(backend, vip, &spec.kind, source).await
    })
    .await
}

/// The source address the kernel would pick towards `to` (a UDP connect sends nothing).
async fn route_source(to: IpAddr) -> Result<IpAddr, Problem> {
    let any = match to {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let sock = UdpSocket::bind(SocketAddr::new(any, 0))
        .await
        .map_err(|e| io_problem("creating a socket", &e, Stage::Setup))?;
    sock.connect(SocketAddr::new(to, 9))
        .await
        .map_err(|e| Problem::Local(format!("finding a source towards {to}: {e}")))?;
    sock.local_addr()
        .map(|a| a.ip())
        .map_err(|e| Problem::Local(format!("finding a source towards {to}: {e}")))
}

/// Runs `probe` within `spec.timeout` and says what it found.
async fn timed(
    spec: &HealthConfig,
    probe: impl std::future::Future<Output = Result<(), Problem>>,
) -> CheckOutcome {
    let start = Instant::now();
    let result = tokio::time::timeout(spec.timeout, probe).await;
    let elapsed = start.elapsed();
    let timeout = humantime::format_duration(spec.timeout);
    match result {
        Ok(Err(Problem::Local(why))) => CheckOutcome::NotRun(why),
        Err(_) => CheckOutcome::Fail(format!("timeout after {timeout}")),
        Ok(Err(Problem::Backend(why))) => CheckOutcome::Fail(why),
        Ok(Ok(())) if elapsed > spec.timeout => CheckOutcome::Fail(format!(
            "answered after {elapsed:?}, more than the timeout {timeout}"
        )),
        Ok(Ok(())) => CheckOutcome::Pass(elapsed),
    }
}

async fn run(addr: SocketAddr, kind: &HealthKind, source: Option<IpAddr>) -> Result<(), Problem> {
    if let Some(src) = source {
        if src.is_ipv4() != addr.is_ipv4() {
            return Err(Problem::Local(format!(
                "source {src} is not of the family of {addr}"
            )));
        }
    }
    match kind {
        HealthKind::Tcp => {
            connect(addr, source).await?;
            Ok(())
        }
        HealthKind::Http { path, status } => http(addr, source, path, *status).await,
        HealthKind::Udp { send, expect } => udp(addr, source, send, expect).await,
    }
}

/// A TCP connection to `addr` from `source` (port chosen by the kernel).
async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, Problem> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| io_problem("creating a socket", &e, Stage::Setup))?;
    if let Some(src) = source {
        bind_address_no_port(&sock);
        sock.bind(SocketAddr::new(src, 0))
            .map_err(|e| io_problem(&format!("binding source {src}"), &e, Stage::Setup))?;
    }
    sock.connect(addr)
        .await
        .map_err(|e| io_problem("connect", &e, Stage::Exchange))
}

/// Lets the kernel pick the source port at connect time, by destination: a bound socket
/// otherwise reserves a port of its own at bind, and checks in TIME_WAIT would use up the
/// ephemeral range (`IP_BIND_ADDRESS_NO_PORT`, also honoured on IPv6 sockets).
fn bind_address_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int we own, on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of_val(&one) as libc::socklen_t,
        )
    };
    if rc != 0 {
        // Not fatal: bind then reserves a port, as without the option.
        tracing::debug!(
            "IP_BIND_ADDRESS_NO_PORT: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `GET path` with hyper's HTTP/1 client over a connection made by [`connect`]; passes
/// when the answer's status is `status`.
async fn http(
    addr: SocketAddr,
    source: Option<IpAddr>,
    path: &str,
    status: u16,
) -> Result<(), Problem> {
    let stream = connect(addr, source).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| http_problem("HTTP handshake", &e))?;
    let host = match (addr.ip(), addr.port()) {
        (IpAddr::V4(a), 80) => a.to_string(),
        (IpAddr::V6(a), 80) => format!("[{a}]"),
        _ => addr.to_string(),
    };
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "xlb-health")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        // The path was validated with the config; a failure here is ours, not the backend's.
        .map_err(|e| Problem::Local(format!("building the request for {path:?}: {e}")))?;
    // The connection does the I/O; it is polled beside the request, in this task, so a
    // timeout that drops the check drops the connection too. With `Connection: close` it
    // may end as soon as it has handed over the answer: then the answer is waiting.
    let send = sender.send_request(request);
    tokio::pin!(conn, send);
    let answer = tokio::select! {
        biased;
        answer = &mut send => answer,
        ended = &mut conn => match ended {
            Err(e) => return Err(http_problem("HTTP connection", &e)),
            Ok(()) => send.await,
        },
    };
    let code = answer
        .map_err(|e| http_problem("HTTP request", &e))?
        .status()
        .as_u16();
    if code != status {
        return Err(Problem::Backend(format!(
            "HTTP status {code} (expected {status})"
        )));
    }
    Ok(())
}

/// Sends `send` from `source` and passes on a reply containing `expect`.
async fn udp(
    addr: SocketAddr,
    source: Option<IpAddr>,
    send: &str,
    expect: &str,
) -> Result<(), Problem> {
    let local = match (source, addr) {
        (Some(src), _) => SocketAddr::new(src, 0),
        (None, SocketAddr::V4(_)) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        (None, SocketAddr::V6(_)) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let sock = UdpSocket::bind(local)
        .await
        .map_err(|e| io_problem(&format!("binding source {}", local.ip()), &e, Stage::Setup))?;
    // Connected, so an ICMP port unreachable fails the check at once.
    sock.connect(addr)
        .await
        .map_err(|e| io_problem("connect", &e, Stage::Exchange))?;
    sock.send(send.as_bytes())
        .await
        .map_err(|e| io_problem("send", &e, Stage::Exchange))?;
    let mut buf = [0u8; 2048];
    let n = sock
        .recv(&mut buf)
        .await
        .map_err(|e| io_problem("receive", &e, Stage::Exchange))?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    if !reply.contains(expect) {
        return Err(Problem::Backend(format!(
            "reply {:?} lacks {expect:?}",
            reply.chars().take(60).collect::<String>()
        )));
    }
    Ok(())
}

/// Lets one warning through per `every`, counting the ones held back: a host out of
/// descriptors fails every check of every backend at once, and the log must not flood.
struct LogLimit {
    /// Milliseconds since `epoch` of the last warning let through, plus one (0: never).
    last: AtomicU64,
    held: AtomicU64,
    every: Duration,
}

impl LogLimit {
    const fn new(every: Duration) -> Self {
        Self {
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
            every,
        }
    }

    /// At `now_ms` (any monotonic milliseconds): `Some(held back since the last one)` if
    /// a warning may be logged now, else `None` (and it is counted).
    fn allow(&self, now_ms: u64) -> Option<u64> {
        let stamp = now_ms.saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        let every = u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || stamp.saturating_sub(last) >= every;
        if due
            && self
                .last
                .compare_exchange(last, stamp, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Warnings about checks not run, for all backends together.
static NOT_RUN_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// Milliseconds since the first call (for [`LogLimit`]).
fn monotonic_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Logs that a check of `backend` at `addr` was not run (rate-limited for all
/// backends together: a host out of descriptors fails every check at once).
pub fn log_not_run(backend: &BackendRef, addr: SocketAddr, why: &str) {
    if let Some(held) = NOT_RUN_LOG.allow(monotonic_ms()) {
        tracing::warn!(
            backend = %backend,
            "health check of {addr} not run, not counted against the backend: {why} ({held} more not-run warnings held back since the last)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HealthConfig, HealthKind};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    fn spec(kind: HealthKind) -> HealthConfig {
        HealthConfig {
            kind,
            port: 0,
            via: crate::config::HealthVia::Direct,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(300),
            rise: 2,
            fall: 3,
            source: None,
        }
    }

    fn http(status: u16) -> HealthKind {
        HealthKind::Http {
            path: "/".into(),
            status,
        }
    }

    fn udp_kind(expect: &str) -> HealthKind {
        HealthKind::Udp {
            send: "ping".into(),
            expect: expect.into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn failed(o: &CheckOutcome) -> &str {
        match o {
            CheckOutcome::Fail(why) => why,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// Accepts connections for the test's life; answers every request head with
    /// `response` and reports (peer, request head) of each.
    async fn http_server(
        response: &'static [u8],
    ) -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<(SocketAddr, String)>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, peer)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 512];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send((peer, String::from_utf8_lossy(&head).into_owned()));
                let _ = s.write_all(response).await;
            }
        });
        (addr, rx)
    }

    /// A UDP echo on a real OS thread, so it answers while the test's runtime is
    /// blocked; replies "pong" after `delay`, and stops after 5 s without a datagram.
    fn udp_echo(delay: Duration) -> (SocketAddr, std::sync::mpsc::Receiver<SocketAddr>) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            for _ in 0..100 {
                let Ok((_, from)) = sock.recv_from(&mut buf) else {
                    return;
                };
                let _ = tx.send(from);
                std::thread::sleep(delay);
                let _ = sock.send_to(b"pong b1", from);
            }
        });
        (addr, rx)
    }

    /// Each kind against real sockets on loopback: up when answered, down
    /// with a reason when refused or answered wrongly.
    #[tokio::test]
    async fn every_kind_tells_up_from_down() {
        let (addr, _) =
            http_server(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        assert!(matches!(
            check(addr, &spec(HealthKind::Tcp), None).await,
            CheckOutcome::Pass(_)
        ));
        assert!(matches!(
            check(addr, &spec(http(503)), None).await,
            CheckOutcome::Pass(_)
        ));
        let wrong = check(addr, &spec(http(200)), None).await;
        assert!(
            failed(&wrong).contains("HTTP status 503 (expected 200)"),
            "{wrong:?}"
        );

        // A port nobody listens on: refused, the backend's fault.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let refused = check(closed, &spec(HealthKind::Tcp), None).await;
        assert!(failed(&refused).contains("connect"), "{refused:?}");
        assert!(failed(&check(closed, &spec(http(200)), None).await).contains("connect"));

        let (udp, _) = udp_echo(Duration::ZERO);
        assert!(matches!(
            check(udp, &spec(udp_kind("b1")), None).await,
            CheckOutcome::Pass(_)
        ));
        let lacks = check(udp, &spec(udp_kind("b9")), None).await;
        assert!(failed(&lacks).contains("lacks \"b9\""), "{lacks:?}");
    }

    /// HTTP through hyper: the request is a well-formed GET of the path with a Host
    /// header, and only the expected status passes; non-HTTP answers and closed
    /// connections fail.
    #[tokio::test]
    async fn http_request_and_status() {
        let (addr, mut seen) =
            http_server(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").await;
        let mut s = spec(HealthKind::Http {
            path: "/healthz?full=1".into(),
            status: 204,
        });
        assert!(matches!(check(addr, &s, None).await, CheckOutcome::Pass(_)));
        let (_, head) = seen.recv().await.expect("request seen");
        assert!(
            head.starts_with("GET /healthz?full=1 HTTP/1.1\r\n"),
            "{head:?}"
        );
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains(&format!("\r\nhost: {addr}\r\n")), "{head:?}");
        assert!(lower.contains("\r\nuser-agent: xlb-health\r\n"), "{head:?}");
        s.kind = HealthKind::Http {
            path: "/".into(),
            status: 200,
        };
        let wrong = check(addr, &s, None).await;
        assert!(
            failed(&wrong).contains("HTTP status 204 (expected 200)"),
            "{wrong:?}"
        );

        let (garbage, _) = http_server(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
        failed(&check(garbage, &spec(http(200)), None).await);
        let (silent, _) = http_server(b"").await;
        failed(&check(silent, &spec(http(200)), None).await);
    }

    /// A check bound to 127.0.0.2 reaches the server from 127.0.0.2, for every kind:
    /// the source is chosen by the daemon, never by the kernel.
    #[tokio::test]
    async fn source_address_is_bound() {
        let src = ip("127.0.0.2");
        let (addr, mut seen) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        for kind in [HealthKind::Tcp, http(200)] {
            let outcome = check(addr, &spec(kind.clone()), Some(src)).await;
            assert!(
                matches!(outcome, CheckOutcome::Pass(_)),
                "{kind}: {outcome:?}"
            );
            let (peer, _) = seen.recv().await.expect("connection seen");
            assert_eq!(peer.ip(), src, "{kind}");
        }
        // Without a source the kernel picks 127.0.0.1: the binding above is what changed it.
        assert!(matches!(
            check(addr, &spec(HealthKind::Tcp), None).await,
            CheckOutcome::Pass(_)
        ));
        assert_eq!(seen.recv().await.expect("seen").0.ip(), ip("127.0.0.1"));

        let (udp, from) = udp_echo(Duration::ZERO);
        let outcome = check(udp, &spec(udp_kind("b1")), Some(src)).await;
        assert!(matches!(outcome, CheckOutcome::Pass(_)), "{outcome:?}");
        assert_eq!(from.recv().expect("datagram seen").ip(), src);
    }

    /// No answer within the timeout fails; so does an answer that arrived in time but
    /// was only seen after the timeout because the check's worker was blocked; time
    /// queued before the check starts does not count.
    #[tokio::test]
    async fn timeouts_are_failures() {
        let mut s = spec(HealthKind::Tcp);
        s.timeout = Duration::from_millis(100);

        // Accepts but never answers.
        let (mute, _) = {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let held = tokio::spawn(async move {
                let mut conns = Vec::new();
                while let Ok((c, _)) = listener.accept().await {
                    conns.push(c);
                }
            });
            (addr, held)
        };
        s.kind = http(200);
        let start = Instant::now();
        let outcome = check(mute, &s, None).await;
        assert_eq!(failed(&outcome), "timeout after 100ms");
        assert!(start.elapsed() < Duration::from_secs(1));

        // The echo answers 20 ms after the check's datagram arrives; by then this (single)
        // worker is blocked for 300 ms, as by a lock held elsewhere.
        let (udp, arrived) = udp_echo(Duration::from_millis(20));
        s.kind = udp_kind("b1");
        let (outcome, ()) = tokio::join!(check(udp, &s, None), async {
            let deadline = Instant::now() + Duration::from_secs(2);
            while arrived.try_recv().is_err() && Instant::now() < deadline {
                tokio::task::yield_now().await;
            }
            std::thread::sleep(Duration::from_millis(300));
        });
        assert!(
            failed(&outcome).contains("more than the timeout 100ms"),
            "{outcome:?}"
        );

        // Queued 300 ms before it first runs: the check itself takes about 20 ms.
        let queued = check(udp, &s, None);
        std::thread::sleep(Duration::from_millis(300));
        match queued.await {
            CheckOutcome::Pass(took) => assert!(took < s.timeout, "{took:?}"),
            other => panic!("expected a pass, got {other:?}"),
        }
    }

    /// A source address this host does not have (TEST-NET-1; bound, never sent from)
    /// or of the wrong family: the check is not run, and says why.
    #[tokio::test]
    async fn local_errors_are_not_run() {
        let (addr, _) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let (udp, _) = udp_echo(Duration::ZERO);
        let foreign = ip("192.0.2.1");
        for (kind, to) in [
            (HealthKind::Tcp, addr),
            (http(200), addr),
            (udp_kind(""), udp),
        ] {
            match check(to, &spec(kind.clone()), Some(foreign)).await {
                CheckOutcome::NotRun(why) => {
                    assert!(why.contains("binding source 192.0.2.1"), "{kind}: {why}");
                }
                other => panic!("{kind}: expected not run, got {other:?}"),
            }
        }
        match check(addr, &spec(HealthKind::Tcp), Some(ip("::1"))).await {
            CheckOutcome::NotRun(why) => assert!(why.contains("family"), "{why}"),
            other => panic!("expected not run, got {other:?}"),
        }
    }

    #[test]
    fn errno_classification() {
        for e in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
            libc::ENETUNREACH,
        ] {
            assert!(is_local(Some(e), Stage::Exchange), "{e}");
        }
        // The backend's (or its network's) answers.
        for e in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::EHOSTUNREACH,
            libc::ETIMEDOUT,
            libc::EADDRINUSE,
        ] {
            assert!(!is_local(Some(e), Stage::Exchange), "{e}");
        }
        assert!(!is_local(None, Stage::Exchange));
        // Creating or binding the socket is always this host's business.
        assert!(is_local(Some(libc::EADDRINUSE), Stage::Setup));
        assert!(is_local(None, Stage::Setup));
        // hyper keeps the OS error as its source; an io::Error may wrap one too.
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("connection error")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let emfile = || std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(os_error(&Wrap(emfile())), Some(libc::EMFILE));
        assert_eq!(
            os_error(&Wrap(std::io::Error::other(emfile()))),
            Some(libc::EMFILE)
        );
        assert_eq!(os_error(&Wrap(std::io::Error::other("no code"))), None);
    }

    #[test]
    fn not_run_warnings_are_limited() {
        let limit = LogLimit::new(Duration::from_secs(10));
        assert_eq!(limit.allow(0), Some(0));
        for t in 1..=500 {
            assert_eq!(limit.allow(t), None);
        }
        assert_eq!(limit.allow(9_999), None);
        assert_eq!(limit.allow(10_000), Some(501));
        assert_eq!(limit.allow(10_001), None);
        assert_eq!(limit.allow(25_000), Some(1));
    }
}
