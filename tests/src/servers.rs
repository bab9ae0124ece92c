//! Backend servers: HTTP on TCP 80 and an echo-my-name service on UDP 7000, in every backend namespace.
//!
//! Each backend gets one thread that polls its listening sockets with a short timeout and
//! checks a stop flag, so dropping [`Servers`] ends every thread within a fraction of a second
//! (plus at most one I/O timeout for a connection being served).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::lab::Lab;
use crate::netns;

/// TCP port of the backends' HTTP server.
pub const HTTP_PORT: u16 = 80;
/// UDP port of the backends' name service.
pub const UDP_PORT: u16 = 7000;
/// How often a server thread wakes up to look at its stop flag.
const POLL_MS: i32 = 50;
/// Read/write timeout for one HTTP connection.
const CONN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest one HTTP request head may take to arrive (also how long a keep-alive
/// connection may idle between requests).
const CONN_DEADLINE: Duration = Duration::from_secs(5);
/// How often a connection waiting for a request looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// Most connections or datagrams handled per socket between two looks at the stop flag.
const BATCH: usize = 256;
/// Stack size of a connection thread (it only parses a request head).
const CONN_STACK: usize = 128 * 1024;
/// Largest request head the HTTP server reads.
const MAX_REQUEST: usize = 8192;
/// How long `start` waits for a backend to bind its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests a backend has answered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Backend name (`b1`...).
    pub name: String,
    /// HTTP responses sent.
    pub tcp: u64,
    /// UDP replies sent.
    pub udp: u64,
}

/// Counters shared between a server thread and its handle.
#[derive(Default)]
struct Counters {
    tcp: AtomicU64,
    udp: AtomicU64,
}

/// What one backend's servers need: for labs other than [`Lab`] (e.g. the routed lab).
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// The backend's name: what its servers answer.
    pub name: String,
    /// Its namespace (`/run/netns/NAME`).
    pub netns: PathBuf,
    /// The addresses its UDP server binds (replies leave from the bound address).
    pub udp_addrs: Vec<IpAddr>,
}

/// One backend's running server thread.
struct BackendServer {
    name: String,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl BackendServer {
    /// Asks the thread to stop and waits for it.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("xlb-tests: server thread of {} panicked", self.name);
            }
        }
    }
}

/// The servers of every backend of a lab; stopped when dropped.
pub struct Servers {
    backends: Vec<BackendServer>,
}

impl Servers {
    /// Starts HTTP and UDP servers in every backend of `lab`; returns once all sockets are bound.
    pub fn start(lab: &Lab) -> Result<Self> {
        let mut servers = Self {
            backends: Vec::new(),
        };
        for b in &lab.backends {
            // On error `servers` drops here and stops the backends already started.
            servers.backends.push(start_backend(spec(lab, b))?);
        }
        Ok(servers)
    }

    /// Starts HTTP and UDP servers for each of `specs`; returns once all sockets are bound.
    pub fn start_specs(specs: Vec<ServerSpec>) -> Result<Self> {
        let mut servers = Self {
            backends: Vec::new(),
        };
        for spec in specs {
            // On error `servers` drops here and stops the backends already started.
            servers.backends.push(start_backend(spec)?);
        }
        Ok(servers)
    }

    /// Starts the servers of `spec.name` again after [`Servers::stop_backend`]; its
    /// counters restart at zero.
    pub fn start_spec(&mut self, spec: ServerSpec) -> Result<()> {
        let slot = self
            .backends
            .iter_mut()
            .find(|s| s.name == spec.name)
            .ok_or_else(|| anyhow!("no backend server named {}", spec.name))?;
        if slot.thread.is_some() {
            bail!("the servers of {} are running already", spec.name);
        }
        *slot = start_backend(spec)?;
        Ok(())
    }

    /// Starts the servers of backend `name` again after [`Servers::stop_backend`] (it comes
    /// back up); its counters restart at zero.
    pub fn start_backend(&mut self, lab: &Lab, name: &str) -> Result<()> {
        let b = lab
            .backend(name)
            .ok_or_else(|| anyhow!("no lab backend named {name}"))?;
        let slot = self
            .backends
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow!("no backend server named {name}"))?;
        if slot.thread.is_some() {
            bail!("the servers of {name} are running already");
        }
        *slot = start_backend(spec(lab, b))?;
        Ok(())
    }

    /// Requests served so far, per backend in lab order.
    pub fn served(&self) -> Vec<Served> {
        self.backends
            .iter()
            .map(|b| Served {
                name: b.name.clone(),
                tcp: b.counters.tcp.load(Ordering::Relaxed),
                udp: b.counters.udp.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Requests served so far by backend `name`.
    pub fn served_by(&self, name: &str) -> Option<Served> {
        self.served().into_iter().find(|s| s.name == name)
    }

    /// Stops the servers of one backend (a backend going down); its sockets close.
    pub fn stop_backend(&mut self, name: &str) -> Result<()> {
        let b = self
            .backends
            .iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| anyhow!("no backend server named {name}"))?;
        b.stop();
        Ok(())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        // Flag every thread first so they wind down in parallel, then join.
        for b in &self.backends {
            b.stop.store(true, Ordering::Relaxed);
        }
        for b in &mut self.backends {
            b.stop();
        }
    }
}

/// What the servers of lab backend `b` bind.
fn spec(lab: &Lab, b: &crate::lab::Backend) -> ServerSpec {
    ServerSpec {
        name: b.name.clone(),
        netns: b.netns.path().to_owned(),
        // UDP replies leave from the socket's bound address, so bind each address
        // explicitly: the VIPs for balanced traffic, the own ones for direct checks.
        udp_addrs: vec![
            IpAddr::V4(lab.vip4),
            IpAddr::V6(lab.vip6),
            IpAddr::V4(b.ipv4),
            IpAddr::V6(b.ipv6),
        ],
    }
}

/// Spawns one backend's thread and waits until it has bound its sockets.
fn start_backend(spec: ServerSpec) -> Result<BackendServer> {
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let (ready_tx, ready_rx) = mpsc::channel();
    let name = spec.name.clone();
    let thread = thread::Builder::new()
        .name(format!("srv-{name}"))
        .spawn({
            let stop = stop.clone();
            let counters = counters.clone();
            move || serve(spec, &stop, &counters, ready_tx)
        })
        .context("spawning a server thread")?;
    let mut server = BackendServer {
        name: name.clone(),
        stop,
        counters,
        thread: Some(thread),
    };
    match ready_rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok(())) => Ok(server),
        Ok(Err(e)) => {
            server.stop();
            Err(e.context(format!("starting servers of {name}")))
        }
        Err(_) => {
            server.stop();
            bail!("servers of {name} did not start within {START_TIMEOUT:?}")
        }
    }
}

/// The sockets one backend listens on.
struct Sockets {
    tcp: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
}

/// Joins the namespace and binds every socket.
fn bind_all(spec: &ServerSpec) -> Result<Sockets> {
    netns::enter(&spec.netns)?;
    let tcp = vec![
        tcp_listener(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            HTTP_PORT,
        ))?,
        tcp_listener(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            HTTP_PORT,
        ))?,
    ];
    let udp = spec
        .udp_addrs
        .iter()
        .map(|a| udp_socket(SocketAddr::new(*a, UDP_PORT)))
        .collect::<Result<_>>()?;
    Ok(Sockets { tcp, udp })
}

/// A non-blocking listener on `addr` (IPv6 ones are v6-only so both families can bind port 80).
fn tcp_listener(addr: SocketAddr) -> Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())
        .with_context(|| format!("binding TCP {addr}"))?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// A non-blocking UDP socket bound to `addr`.
fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())
        .with_context(|| format!("binding UDP {addr}"))?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// The body of a backend's server thread.
fn serve(
    spec: ServerSpec,
    stop: &AtomicBool,
    counters: &Counters,
    ready: mpsc::Sender<Result<()>>,
) {
    let sockets = match bind_all(&spec) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let name = spec.name.as_str();
    let mut fds: Vec<libc::pollfd> = sockets
        .tcp
        .iter()
        .map(AsRawFd::as_raw_fd)
        .chain(sockets.udp.iter().map(AsRawFd::as_raw_fd))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // Connection threads are scoped: the scope ends only after each has finished its
    // (time-bounded) exchange, so none outlives the server.
    thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: fds is a live, correctly sized array of pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
            if n <= 0 {
                continue;
            }
            for l in &sockets.tcp {
                // Bounded per wake-up so a connection storm cannot keep the stop flag unread.
                for _ in 0..BATCH {
                    match l.accept() {
                        Ok((stream, _)) => {
                            // Small stacks: a load test may hold many connections at once. If
                            // no thread can be had, the connection is dropped (client sees it).
                            let _ = thread::Builder::new().stack_size(CONN_STACK).spawn_scoped(
                                scope,
                                move || {
                                    // A client that gave up is not the server's failure: only
                                    // completed answers are counted (inside serve_http).
                                    let _ = serve_http(stream, name, stop, counters);
                                },
                            );
                        }
                        // WouldBlock: the backlog is empty; anything else: retry next wake-up.
                        Err(_) => break,
                    }
                }
            }
            for u in &sockets.udp {
                answer_udp(u, name, counters);
            }
        }
    });
}

/// Answers `200 OK` with the backend's name to each request on the connection; keeps it
/// open (HTTP/1.1 keep-alive, so load generators can measure both ways) unless the client
/// asks to close or speaks HTTP/1.0, and closes it when the server stops.
fn serve_http(
    mut stream: TcpStream,
    name: &str,
    stop: &AtomicBool,
    counters: &Counters,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    // Short reads let an idle keep-alive connection notice the stop flag (a stopped backend
    // must drop its connections like a killed server); data still returns at once.
    stream.set_read_timeout(Some(STOP_CHECK))?;
    stream.set_write_timeout(Some(CONN_TIMEOUT))?;
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut pending: Vec<u8> = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        // A trickling client (or an idle keep-alive one) is bounded by the deadline.
        let deadline = Instant::now() + CONN_DEADLINE;
        let end = loop {
            if let Some(pos) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return if pending.is_empty() {
                    Ok(())
                } else {
                    Err(io::ErrorKind::TimedOut.into())
                };
            }
            match stream.read(&mut buf) {
                // EOF between requests is a client done with keep-alive, not an error.
                Ok(0) if pending.is_empty() => return Ok(()),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
            if pending.len() > MAX_REQUEST {
                return Err(io::Error::other("request head too large"));
            }
        };
        let head: Vec<u8> = pending.drain(..end).collect();
        let close = wants_close(&head);
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             X-Backend: {name}\r\nX-Client: {peer}\r\nConnection: {}\r\n\r\n{name}",
            name.len(),
            if close { "close" } else { "keep-alive" }
        );
        stream.write_all(response.as_bytes())?;
        stream.flush()?;
        counters.tcp.fetch_add(1, Ordering::Relaxed);
        if close {
            return Ok(());
        }
    }
}

/// Whether a request head ends its connection: `Connection: close`, or HTTP/1.0 without
/// `Connection: keep-alive`.
fn wants_close(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let mut lines = text.lines();
    let http10 = lines
        .next()
        .is_some_and(|l| l.trim_end().ends_with("http/1.0"));
    let connection = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "connection").then(|| v.trim().to_owned())
    });
    match connection.as_deref() {
        Some(v) if v.contains("close") => true,
        Some(v) if v.contains("keep-alive") => false,
        _ => http10,
    }
}

/// Replies to every queued datagram with the backend's name, from the bound address.
fn answer_udp(sock: &UdpSocket, name: &str, counters: &Counters) {
    let mut buf = [0u8; 2048];
    // Bounded per wake-up so a datagram flood cannot keep the stop flag unread.
    for _ in 0..BATCH {
        match sock.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if sock.send_to(name.as_bytes(), peer).is_ok() {
                    counters.udp.fetch_add(1, Ordering::Relaxed);
                }
            }
            // WouldBlock ends the batch; other errors (ICMP-reported) are the peer's business.
            Err(_) => return,
        }
    }
}
