//! Long-lived probes through a VIP: keep-alive HTTP connections and fixed-port UDP flows
//! that ask "who are you?" every period and record every answer and every failure.
//!
//! Each client address gets one thread (in the client namespace) driving its TCP
//! connections and UDP flows; several connections per client let layer-4 multipath
//! hashing spread one client over several load balancers. Every loop is bounded in
//! time and count.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::{self, Proto};
use crate::netns::{self, NetNs};
use crate::servers::{HTTP_PORT, UDP_PORT};

/// First fixed source port of a client's UDP flows.
pub const UDP_BASE_PORT: u16 = 41000;
/// Most failures kept per connection (the counters count them all).
const MAX_FAILURES_KEPT: usize = 8;
/// Largest HTTP answer read.
const MAX_RESPONSE: usize = 16 * 1024;
/// Stack of a prober thread (it holds a few sockets and buffers).
const STACK: usize = 256 * 1024;

/// What to probe and how often.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Keep-alive TCP (HTTP) connections per client address.
    pub tcp_per_client: usize,
    /// UDP flows (each with its own fixed source port) per client address.
    pub udp_per_client: usize,
    /// Time between two questions on one connection or flow.
    pub every: Duration,
    /// A question unanswered after this long counts as a timeout.
    pub timeout: Duration,
    /// The probers stop by themselves after this long.
    pub max_duration: Duration,
    /// First source port of each client's UDP flows (two probers running at once
    /// need ranges of their own).
    pub udp_base_port: u16,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            tcp_per_client: 4,
            udp_per_client: 1,
            every: Duration::from_millis(200),
            timeout: Duration::from_secs(3),
            max_duration: Duration::from_secs(60),
            udp_base_port: UDP_BASE_PORT,
        }
    }
}

/// One failed question.
#[derive(Clone, Debug)]
pub struct Failure {
    /// When the failed question was sent (a broken connection: when it was seen), from
    /// the start of the probers.
    pub at: Duration,
    /// What happened.
    pub what: String,
}

/// What one connection or flow saw.
#[derive(Clone, Debug)]
pub struct ProbeRecord {
    /// The client address.
    pub client: IpAddr,
    /// The local socket address (fixed for the connection's or flow's life).
    pub local: SocketAddr,
    /// TCP connection or UDP flow.
    pub proto: Proto,
    /// Every backend that answered, in order of first answer.
    pub backends: Vec<String>,
    /// Questions answered.
    pub answered: u64,
    /// Questions unanswered within the timeout (TCP: the answer may still come late).
    pub timeouts: u64,
    /// TCP: the connection was reset (ECONNRESET, EPIPE).
    pub resets: u64,
    /// TCP: the server closed the connection (EOF).
    pub eofs: u64,
    /// Other errors (send failures, unreachable).
    pub errors: u64,
    /// The first failures, with their time.
    pub failures: Vec<Failure>,
}

impl ProbeRecord {
    fn new(client: IpAddr, local: SocketAddr, proto: Proto) -> Self {
        Self {
            client,
            local,
            proto,
            backends: Vec::new(),
            answered: 0,
            timeouts: 0,
            resets: 0,
            eofs: 0,
            errors: 0,
            failures: Vec::new(),
        }
    }

    /// Whether more than one backend answered.
    pub fn changed_backend(&self) -> bool {
        self.backends.len() > 1
    }

    /// Failed questions of any kind.
    pub fn failed(&self) -> u64 {
        self.timeouts + self.resets + self.eofs + self.errors
    }

    fn answer(&mut self, name: &str) {
        self.answered += 1;
        if !self.backends.iter().any(|b| b == name) {
            self.backends.push(name.to_owned());
        }
    }

    fn fail(&mut self, at: Duration, what: String) {
        if self.failures.len() < MAX_FAILURES_KEPT {
            self.failures.push(Failure { at, what });
        }
    }
}

/// Totals over many records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// TCP connections.
    pub tcp: usize,
    /// UDP flows.
    pub udp: usize,
    /// Questions answered (both protocols).
    pub answered: u64,
    /// TCP questions that timed out.
    pub tcp_timeouts: u64,
    /// UDP questions that timed out.
    pub udp_timeouts: u64,
    /// TCP resets.
    pub resets: u64,
    /// TCP connections closed by the server.
    pub eofs: u64,
    /// Other errors.
    pub errors: u64,
    /// Connections or flows answered by more than one backend.
    pub changed_backend: usize,
    /// Clients whose connections and flows were answered by more than one backend.
    pub split_clients: usize,
}

impl Summary {
    /// Totals of `records`.
    pub fn of(records: &[ProbeRecord]) -> Self {
        let mut s = Self::default();
        let mut per_client: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
        for r in records {
            match r.proto {
                Proto::Tcp => {
                    s.tcp += 1;
                    s.tcp_timeouts += r.timeouts;
                }
                Proto::Udp => {
                    s.udp += 1;
                    s.udp_timeouts += r.timeouts;
                }
            }
            s.answered += r.answered;
            s.resets += r.resets;
            s.eofs += r.eofs;
            s.errors += r.errors;
            s.changed_backend += usize::from(r.changed_backend());
            let names = per_client.entry(r.client).or_default();
            for b in &r.backends {
                if !names.contains(&b.as_str()) {
                    names.push(b);
                }
            }
        }
        s.split_clients = per_client.values().filter(|n| n.len() > 1).count();
        s
    }

    /// Failed questions of any kind.
    pub fn failed(&self) -> u64 {
        self.tcp_timeouts + self.udp_timeouts + self.resets + self.eofs + self.errors
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tcp connections + {} udp flows: {} answered, timeouts tcp {} udp {}, \
             resets {}, eofs {}, errors {}, changed backend {}, clients on >1 backend {}",
            self.tcp,
            self.udp,
            self.answered,
            self.tcp_timeouts,
            self.udp_timeouts,
            self.resets,
            self.eofs,
            self.errors,
            self.changed_backend,
            self.split_clients
        )
    }
}

/// Prints `what`'s summary and its failures (at most 40 lines); returns the summary.
pub fn report(what: &str, records: &[ProbeRecord]) -> Summary {
    let s = Summary::of(records);
    eprintln!("{what}: {s}");
    for line in failure_lines(records).into_iter().take(40) {
        eprintln!("  failed probe: {line}");
    }
    s
}

impl Summary {
    /// Asserts no connection was reset or closed, none changed backend, and no
    /// client reached two backends.
    pub fn assert_unbroken(&self) {
        assert_eq!(self.resets + self.eofs + self.errors, 0, "{self}");
        assert_eq!(self.changed_backend, 0, "{self}");
        assert_eq!(self.split_clients, 0, "{self}");
    }
}

/// The failures of `records`, one line each (for test output).
pub fn failure_lines(records: &[ProbeRecord]) -> Vec<String> {
    records
        .iter()
        .flat_map(|r| {
            r.failures.iter().map(move |f| {
                format!(
                    "{:?} {} {}: at {:?}: {}",
                    r.proto, r.client, r.local, f.at, f.what
                )
            })
        })
        .collect()
}

/// The backend each client's connections and flows reached; fails if a client reached
/// two (one client, one backend is what sticky sessions promise).
pub fn backend_per_client(records: &[ProbeRecord]) -> Result<BTreeMap<IpAddr, String>> {
    let mut out: BTreeMap<IpAddr, String> = BTreeMap::new();
    for r in records {
        for b in &r.backends {
            let first = out.entry(r.client).or_insert_with(|| b.clone());
            if first != b {
                bail!("client {} reached two backends: {first} and {b}", r.client);
            }
        }
    }
    Ok(out)
}

/// One prober thread's records as of its last finished round (read while it runs).
type LiveSlot = Arc<Mutex<Vec<ProbeRecord>>>;

/// Locks a slot; a prober that panicked must not hide what the others saw.
fn lock(slot: &LiveSlot) -> MutexGuard<'_, Vec<ProbeRecord>> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Probers running in a namespace; stopped (and joined) by [`Probers::stop`] or on drop.
pub struct Probers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<ProbeRecord>>>,
    live: Vec<LiveSlot>,
    started: Instant,
}

impl Probers {
    /// Starts one thread per client in `ns`: each opens its connections and flows to the
    /// VIP of its family (`vip_for`), and returns once every connection and flow has had
    /// its first answer (or fails, stopping them all).
    pub fn start(
        ns: &NetNs,
        clients: &[IpAddr],
        vip_for: impl Fn(IpAddr) -> IpAddr,
        opts: &ProbeOptions,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let mut probers = Self {
            stop: stop.clone(),
            threads: Vec::new(),
            live: Vec::new(),
            started,
        };
        for &client in clients {
            let live = LiveSlot::default();
            probers.live.push(live.clone());
            let job = Job {
                live,
                netns: ns.path().to_owned(),
                client,
                vip: vip_for(client),
                opts: opts.clone(),
                stop: stop.clone(),
                started,
            };
            let ready = ready_tx.clone();
            let handle = thread::Builder::new()
                .name(format!("probe-{client}"))
                .stack_size(STACK)
                .spawn(move || job.run(ready))
                .context("spawning a prober thread")?;
            probers.threads.push(handle);
        }
        drop(ready_tx);
        // Every first answer within connect + one timeout (plus slack for a busy machine).
        let deadline = Instant::now() + client::CONNECT_TIMEOUT + opts.timeout * 2;
        for _ in clients {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready_rx.recv_timeout(left) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.context("starting the probers")),
                Err(_) => bail!("the probers did not all get a first answer within {left:?}"),
            }
        }
        Ok(probers)
    }

    /// How long the probers have been running.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// What each connection and flow saw up to its prober's last finished round, while
    /// the probers keep running (a round lasts at most one probe timeout).
    pub fn snapshot(&self) -> Vec<ProbeRecord> {
        self.live
            .iter()
            .flat_map(|slot| lock(slot).clone())
            .collect()
    }

    /// Stops every prober and returns what each connection and flow saw.
    pub fn stop(mut self) -> Vec<ProbeRecord> {
        self.finish()
    }

    fn finish(&mut self) -> Vec<ProbeRecord> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(records) => out.extend(records),
                Err(_) => eprintln!("xlb-tests: a prober thread panicked"),
            }
        }
        out
    }
}

impl Drop for Probers {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One client's connections and flows.
struct Job {
    /// Where the records are published after every round.
    live: LiveSlot,
    netns: PathBuf,
    client: IpAddr,
    vip: IpAddr,
    opts: ProbeOptions,
    stop: Arc<AtomicBool>,
    started: Instant,
}

/// A keep-alive HTTP connection and its question in flight.
struct TcpProbe {
    stream: TcpStream,
    record: ProbeRecord,
    /// Bytes of the answer read so far.
    pending: Vec<u8>,
    /// When the question in flight was sent, and whether it was already counted late.
    in_flight: Option<(Instant, bool)>,
    dead: bool,
}

/// A UDP flow with a fixed source port.
struct UdpProbe {
    sock: UdpSocket,
    record: ProbeRecord,
    /// When the last question was sent.
    sent: Instant,
}

impl Job {
    fn run(self, ready: mpsc::Sender<Result<()>>) -> Vec<ProbeRecord> {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        let opened = self.open(&mut tcp, &mut udp);
        let first = opened.and_then(|()| {
            // The first round must succeed everywhere: a broken lab, not a failure to count.
            self.round(&mut tcp, &mut udp);
            let failed: Vec<String> = failure_lines(
                &tcp.iter()
                    .map(|t| t.record.clone())
                    .chain(udp.iter().map(|u| u.record.clone()))
                    .collect::<Vec<_>>(),
            );
            if failed.is_empty() {
                Ok(())
            } else {
                bail!("first round from {}: {}", self.client, failed.join("; "))
            }
        });
        let ok = first.is_ok();
        self.publish(&tcp, &udp);
        let _ = ready.send(first);
        if ok {
            let max_rounds = (self.opts.max_duration.as_millis()
                / self.opts.every.as_millis().max(1)) as usize
                + 1;
            let mut next = Instant::now() + self.opts.every;
            for _ in 0..max_rounds {
                if self.stop.load(Ordering::Relaxed)
                    || self.started.elapsed() > self.opts.max_duration
                {
                    break;
                }
                // Sleep in small steps so a stop request is seen quickly.
                while Instant::now() < next && !self.stop.load(Ordering::Relaxed) {
                    thread::sleep((next - Instant::now()).min(Duration::from_millis(20)));
                }
                if self.stop.load(Ordering::Relaxed) {
                    break;
                }
                next += self.opts.every;
                self.round(&mut tcp, &mut udp);
                self.publish(&tcp, &udp);
            }
        }
        tcp.into_iter()
            .map(|t| t.record)
            .chain(udp.into_iter().map(|u| u.record))
            .collect()
    }

    /// Publishes a copy of the records for [`Probers::snapshot`].
    fn publish(&self, tcp: &[TcpProbe], udp: &[UdpProbe]) {
        let records = tcp
            .iter()
            .map(|t| t.record.clone())
            .chain(udp.iter().map(|u| u.record.clone()))
            .collect();
        *lock(&self.live) = records;
    }

    /// Joins the namespace and opens every connection and flow.
    fn open(&self, tcp: &mut Vec<TcpProbe>, udp: &mut Vec<UdpProbe>) -> Result<()> {
        netns::enter(&self.netns)?;
        let http = SocketAddr::new(self.vip, HTTP_PORT);
        for _ in 0..self.opts.tcp_per_client {
            let stream = client::connect(
                SocketAddr::new(self.client, 0),
                http,
                client::CONNECT_TIMEOUT,
            )
            .with_context(|| format!("connecting {} -> {http}", self.client))?;
            stream.set_nodelay(true)?;
            let local = stream.local_addr()?;
            tcp.push(TcpProbe {
                stream,
                record: ProbeRecord::new(self.client, local, Proto::Tcp),
                pending: Vec::new(),
                in_flight: None,
                dead: false,
            });
        }
        let echo = SocketAddr::new(self.vip, UDP_PORT);
        for k in 0..self.opts.udp_per_client {
            let local = SocketAddr::new(self.client, self.opts.udp_base_port + k as u16);
            let sock = UdpSocket::bind(local).with_context(|| format!("binding UDP {local}"))?;
            sock.connect(echo)
                .with_context(|| format!("UDP {local} -> {echo}"))?;
            udp.push(UdpProbe {
                sock,
                record: ProbeRecord::new(self.client, local, Proto::Udp),
                sent: Instant::now(),
            });
        }
        Ok(())
    }

    /// One question on every live connection and flow, all sent before any answer is read.
    fn round(&self, tcp: &mut [TcpProbe], udp: &mut [UdpProbe]) {
        let at = || self.started.elapsed();
        for t in tcp.iter_mut().filter(|t| !t.dead && t.in_flight.is_none()) {
            match t.stream.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n") {
                Ok(()) => t.in_flight = Some((Instant::now(), false)),
                Err(e) => t.broken(&e, at()),
            }
        }
        for u in udp.iter_mut() {
            // Late answers of earlier questions first: they still say who serves.
            let mut buf = [0u8; 512];
            let _ = u.sock.set_nonblocking(true);
            for _ in 0..16 {
                match u.sock.recv(&mut buf) {
                    Ok(n) => u.record.backends_only(&String::from_utf8_lossy(&buf[..n])),
                    Err(_) => break,
                }
            }
            let _ = u.sock.set_nonblocking(false);
            u.sent = Instant::now();
            if let Err(e) = u.sock.send(b"who are you?") {
                u.record.errors += 1;
                u.record.fail(at(), format!("send: {e}"));
            }
        }
        for t in tcp.iter_mut().filter(|t| !t.dead && t.in_flight.is_some()) {
            t.read_answer(self.opts.timeout, self.started);
        }
        for u in udp.iter_mut() {
            // Failures are dated by when the question left.
            let asked = u.sent.saturating_duration_since(self.started);
            let left = (u.sent + self.opts.timeout)
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let _ = u.sock.set_read_timeout(Some(left));
            let mut buf = [0u8; 512];
            match u.sock.recv(&mut buf) {
                Ok(n) => u.record.answer(&String::from_utf8_lossy(&buf[..n])),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    u.record.timeouts += 1;
                    u.record
                        .fail(at(), format!("no answer within {:?}", self.opts.timeout));
                }
                Err(e) => {
                    u.record.errors += 1;
                    u.record.fail(asked, format!("recv: {e}"));
                }
            }
        }
    }
}

impl ProbeRecord {
    /// A late UDP answer: who answered counts, the question was already counted.
    fn backends_only(&mut self, name: &str) {
        if !self.backends.iter().any(|b| b == name) {
            self.backends.push(name.to_owned());
        }
    }
}

impl TcpProbe {
    /// Counts a send or receive error; the connection is given up.
    fn broken(&mut self, e: &io::Error, at: Duration) {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => self.record.resets += 1,
            _ => self.record.errors += 1,
        }
        self.record.fail(at, format!("{e}"));
        self.dead = true;
    }

    /// Reads the answer in flight until it is complete or its time is up. A late answer
    /// stays in flight (it is read next round) and is counted as one timeout. Failures
    /// are dated by when the question was sent, from `started`.
    fn read_answer(&mut self, timeout: Duration, started: Instant) {
        let Some((sent, late)) = self.in_flight else {
            return;
        };
        let at = sent.saturating_duration_since(started);
        let deadline = sent + timeout;
        let mut buf = [0u8; 2048];
        loop {
            if let Some(len) = complete_response(&self.pending) {
                let answer: Vec<u8> = self.pending.drain(..len).collect();
                match client::parse_response(&answer) {
                    Ok(name) => self.record.answer(&name),
                    Err(e) => {
                        self.record.errors += 1;
                        self.record.fail(at, format!("bad answer: {e:#}"));
                    }
                }
                self.in_flight = None;
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.pending.len() > MAX_RESPONSE {
                if !late {
                    self.record.timeouts += 1;
                    self.record
                        .fail(at, format!("no answer within {timeout:?}"));
                    self.in_flight = Some((sent, true));
                }
                return;
            }
            let _ = self
                .stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.record.eofs += 1;
                    self.record.fail(at, "closed by the server (EOF)".into());
                    self.dead = true;
                    return;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.broken(&e, at);
                    return;
                }
            }
        }
    }
}

/// The length of the first complete HTTP response in `buf` (head + Content-Length body).
fn complete_response(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some(head_end + length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_complete_only_with_its_whole_body() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbe1HTTP/1.1";
        assert_eq!(complete_response(r), Some(41));
        assert_eq!(complete_response(&r[..40]), None);
        assert_eq!(complete_response(b"HTTP/1.1 200 OK\r\nContent-Len"), None);
    }

    #[test]
    fn summary_counts_split_clients_and_changed_connections() {
        let c: IpAddr = "10.78.0.100".parse().expect("ip");
        let local = SocketAddr::new(c, 1);
        let mut a = ProbeRecord::new(c, local, Proto::Tcp);
        a.answer("be1");
        let mut b = ProbeRecord::new(c, local, Proto::Tcp);
        b.answer("be2");
        b.timeouts = 1;
        let s = Summary::of(&[a.clone(), b]);
        assert_eq!(
            (s.split_clients, s.changed_backend, s.tcp_timeouts),
            (1, 0, 1)
        );
        a.answer("be3");
        assert_eq!(Summary::of(&[a]).changed_backend, 1);
    }
}
