//! The cluster mesh: a dialed, write-only TCP link to every peer, read-only accepted links, bounded queues, counters.
//!
//! Links are one-way: each node dials every peer and only writes on the connection it dialed; the
//! connections it accepts are only read. Frames are sealed when written, so sequence order is wire order.
//! A connection task authenticates each frame (stateless); one task owns the [`Opener`] and its replay
//! state for all connections and turns accepted frames into [`Event::Message`]. An empty body is the
//! transport's keepalive (sent on connect and when idle) and is never delivered.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::wire::{self, Header, Opener, Reject, Sealer};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A link that stayed up this long redials at the shortest back-off; shorter-lived ones keep doubling
/// so a peer that accepts and drops us at once is not hammered.
const STABLE_LINK: Duration = Duration::from_secs(1);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Unacknowledged data older than this aborts the connection in the kernel (a silently dead peer).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
const KEEPALIVE: Duration = Duration::from_secs(5);
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// Six missed keepalives: the dialer is gone without a FIN.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const QUEUE_FRAMES: usize = 4096;
const QUEUE_BYTES: usize = 64 * 1024 * 1024;
const WRITE_BATCH_BYTES: usize = 256 * 1024;
const EVENT_QUEUE: usize = 1024;
const INBOUND_QUEUE: usize = 256;
/// Frames at least this large are HMAC-checked on the blocking pool, not on an async worker.
const BLOCKING_AUTH_BYTES: usize = 64 * 1024;

/// Configuration of one node's mesh.
#[derive(Clone)]
pub struct MeshConfig {
    /// This node's id.
    pub node_id: u32,
    /// Address the acceptor listens on.
    pub listen: SocketAddr,
    /// Every other node: id → address it listens on.
    pub peers: BTreeMap<u32, SocketAddr>,
    /// The shared cluster key.
    pub key: Arc<[u8]>,
    /// Largest accepted difference between a frame's send time and this node's clock.
    pub window: Duration,
}

impl fmt::Debug for MeshConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshConfig")
            .field("node_id", &self.node_id)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("key", &"<redacted>")
            .field("window", &self.window)
            .finish()
    }
}

/// What the mesh reports to the logic above it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The outbound link to this peer just came up: send it a full sync.
    Connected(u32),
    /// The outbound link to this peer went down; sends fail until `Connected` again (not sent on shutdown).
    Disconnected(u32),
    /// An authenticated, accepted frame from a peer.
    Message {
        /// The sending peer's node id.
        from: u32,
        /// The opaque body.
        body: Bytes,
    },
}

/// Why `send` did not queue a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The link to the peer is down; the body was dropped (resync on `Connected`).
    NotConnected,
    /// The peer's queue overflowed: it was dropped and the link is being redialed.
    Overflow,
    /// The node id is not a configured peer.
    UnknownPeer,
    /// The body does not fit in one frame.
    TooLarge,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendError::NotConnected => "cluster link to the peer is down",
            SendError::Overflow => "cluster peer's send queue overflowed; the link is being reset",
            SendError::UnknownPeer => "not a configured cluster peer",
            SendError::TooLarge => "message larger than the 16 MiB cluster frame limit",
        })
    }
}

impl std::error::Error for SendError {}

/// Counters of one peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerStats {
    /// The peer's node id.
    pub id: u32,
    /// The address this node dials.
    pub addr: SocketAddr,
    /// Whether the outbound link is up.
    pub out_connected: bool,
    /// Open inbound connections whose first frame came from this peer.
    pub in_connections: usize,
    /// When a frame from this peer was last accepted, unix ms.
    pub last_rx_unix_ms: Option<u64>,
    /// Frames written to the peer, keepalives included.
    pub frames_tx: u64,
    /// Bytes written to the peer, framing included.
    pub bytes_tx: u64,
    /// Frames accepted from the peer, keepalives included.
    pub frames_rx: u64,
    /// Bytes of accepted frames from the peer, framing included.
    pub bytes_rx: u64,
    /// Times the outbound link came up again after the first time.
    pub reconnects: u64,
    /// Times the send queue overflowed and was dropped.
    pub overflows: u64,
}

/// A snapshot of the mesh's counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MeshStats {
    /// Frames with a bad tag (wrong key or corrupted).
    pub rejected_auth: u64,
    /// Authentic frames that were replayed, old, or sent outside the time window.
    pub rejected_replay: u64,
    /// Malformed, oversized or misdirected frames.
    pub rejected_other: u64,
    /// Inbound connections closed at once because the connection limit was reached.
    pub connections_refused: u64,
    /// Per peer, by node id.
    pub peers: Vec<PeerStats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    Down,
    Up,
    Overflowed,
}

struct Queue {
    state: LinkState,
    frames: VecDeque<Bytes>,
    bytes: usize,
}

/// One peer: its outbound queue and its counters, shared by the handle and the tasks.
struct Link {
    id: u32,
    addr: SocketAddr,
    queue: Mutex<Queue>,
    wake: Notify,
    out_connected: AtomicBool,
    in_connections: AtomicUsize,
    /// 0 = never.
    last_rx_unix_ms: AtomicU64,
    frames_tx: AtomicU64,
    bytes_tx: AtomicU64,
    frames_rx: AtomicU64,
    bytes_rx: AtomicU64,
    reconnects: AtomicU64,
    overflows: AtomicU64,
}

enum Batch {
    Frames(Vec<Bytes>),
    Idle,
    Overflowed,
}

// The queue lock is held for a few instructions and never across an await; a panic cannot leave
// the queue inconsistent, so a poisoned lock is simply taken over.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Link {
    fn new(id: u32, addr: SocketAddr) -> Self {
        Link {
            id,
            addr,
            queue: Mutex::new(Queue {
                state: LinkState::Down,
                frames: VecDeque::new(),
                bytes: 0,
            }),
            wake: Notify::new(),
            out_connected: AtomicBool::new(false),
            in_connections: AtomicUsize::new(0),
            last_rx_unix_ms: AtomicU64::new(0),
            frames_tx: AtomicU64::new(0),
            bytes_tx: AtomicU64::new(0),
            frames_rx: AtomicU64::new(0),
            bytes_rx: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
        }
    }

    fn enqueue(&self, body: Bytes) -> Result<(), SendError> {
        let mut q = lock(&self.queue);
        match q.state {
            LinkState::Down => return Err(SendError::NotConnected),
            LinkState::Overflowed => return Err(SendError::Overflow),
            LinkState::Up => {}
        }
        if q.frames.len() >= QUEUE_FRAMES || q.bytes + body.len() > QUEUE_BYTES {
            q.frames.clear();
            q.bytes = 0;
            q.state = LinkState::Overflowed;
            drop(q);
            self.overflows.fetch_add(1, Ordering::Relaxed);
            self.wake.notify_one();
            return Err(SendError::Overflow);
        }
        q.bytes += body.len();
        q.frames.push_back(body);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    /// Sets the link state; the queue starts empty in every state.
    fn set_state(&self, state: LinkState) {
        let mut q = lock(&self.queue);
        q.state = state;
        q.frames.clear();
        q.bytes = 0;
        drop(q);
        self.out_connected
            .store(state == LinkState::Up, Ordering::Relaxed);
    }

    fn take_batch(&self) -> Batch {
        let mut q = lock(&self.queue);
        if q.state == LinkState::Overflowed {
            return Batch::Overflowed;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(front) = q.frames.front() {
            if !out.is_empty() && bytes + front.len() > WRITE_BATCH_BYTES {
                break;
            }
            bytes += front.len();
            if let Some(f) = q.frames.pop_front() {
                out.push(f);
            }
        }
        q.bytes -= bytes;
        if out.is_empty() {
            Batch::Idle
        } else {
            Batch::Frames(out)
        }
    }

    fn stats(&self) -> PeerStats {
        let last = self.last_rx_unix_ms.load(Ordering::Relaxed);
        PeerStats {
            id: self.id,
            addr: self.addr,
            out_connected: self.out_connected.load(Ordering::Relaxed),
            in_connections: self.in_connections.load(Ordering::Relaxed),
            last_rx_unix_ms: (last != 0).then_some(last),
            frames_tx: self.frames_tx.load(Ordering::Relaxed),
            bytes_tx: self.bytes_tx.load(Ordering::Relaxed),
            frames_rx: self.frames_rx.load(Ordering::Relaxed),
            bytes_rx: self.bytes_rx.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            overflows: self.overflows.load(Ordering::Relaxed),
        }
    }
}

/// At most one log line per second for one kind of trouble.
struct RateLimit {
    next_ms: AtomicU64,
}

impl RateLimit {
    const fn new() -> Self {
        RateLimit {
            next_ms: AtomicU64::new(0),
        }
    }

    fn allow(&self) -> bool {
        static START: OnceLock<Instant> = OnceLock::new();
        let now = u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis())
            .unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_ms
                .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

struct Logs {
    auth: RateLimit,
    malformed: RateLimit,
    replay: RateLimit,
    misdirected: RateLimit,
    refused: RateLimit,
    silent: RateLimit,
    accept: RateLimit,
}

/// State shared by the handles and the tasks.
struct Shared {
    node_id: u32,
    local_addr: SocketAddr,
    links: BTreeMap<u32, Arc<Link>>,
    rejected_auth: AtomicU64,
    rejected_replay: AtomicU64,
    rejected_other: AtomicU64,
    connections_refused: AtomicU64,
    logs: Logs,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn shutdown(&self) {
        self.stop.send_replace(true);
        for link in self.links.values() {
            link.set_state(LinkState::Down);
        }
    }
}

/// Shuts the mesh down when the last handle is dropped.
struct HandleInner {
    shared: Arc<Shared>,
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}

/// Sends to peers and reads counters; cheap to clone. Dropping the last clone shuts the mesh down.
#[derive(Clone)]
pub struct MeshHandle {
    inner: Arc<HandleInner>,
}

impl MeshHandle {
    /// Queues `body` for peer `to` without waiting; the body is dropped if the link is down.
    pub fn send(&self, to: u32, body: Bytes) -> Result<(), SendError> {
        let link = self
            .inner
            .shared
            .links
            .get(&to)
            .ok_or(SendError::UnknownPeer)?;
        if body.len() > wire::MAX_BODY {
            return Err(SendError::TooLarge);
        }
        link.enqueue(body)
    }

    /// Queues `body` for every peer whose link is up (others get a full sync when they connect).
    pub fn broadcast(&self, body: Bytes) {
        for &id in self.inner.shared.links.keys() {
            // Per-peer failures are already handled: down links resync on Connected, overflows redial.
            let _ = self.send(id, body.clone());
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MeshStats {
        let s = &self.inner.shared;
        MeshStats {
            rejected_auth: s.rejected_auth.load(Ordering::Relaxed),
            rejected_replay: s.rejected_replay.load(Ordering::Relaxed),
            rejected_other: s.rejected_other.load(Ordering::Relaxed),
            connections_refused: s.connections_refused.load(Ordering::Relaxed),
            peers: s.links.values().map(|l| l.stats()).collect(),
        }
    }

    /// Closes every link and the listener; the tasks end soon after (see [`MeshHandle::closed`]).
    pub fn shutdown(&self) {
        self.inner.shared.shutdown();
    }

    /// Waits until every task of the mesh has ended; returns only after `shutdown`.
    pub async fn closed(&self) {
        let tasks = std::mem::take(&mut *lock(&self.inner.shared.tasks));
        for t in tasks {
            // A task that panicked has ended too.
            let _ = t.await;
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> u32 {
        self.inner.shared.node_id
    }

    /// The address the acceptor is bound to (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.shared.local_addr
    }
}

/// Binds `cfg.listen` and starts the mesh; events arrive on the returned receiver.
pub async fn start(cfg: MeshConfig) -> Result<(MeshHandle, mpsc::Receiver<Event>)> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the cluster listen address {}", cfg.listen))?;
    spawn(cfg, listener)
}

/// Starts the mesh on an already bound listener (`cfg.listen` is then ignored).
pub async fn start_with_listener(
    cfg: MeshConfig,
    listener: std::net::TcpListener,
) -> Result<(MeshHandle, mpsc::Receiver<Event>)> {
    listener
        .set_nonblocking(true)
        .context("making the cluster listener non-blocking")?;
    let listener =
        TcpListener::from_std(listener).context("registering the cluster listener with tokio")?;
    spawn(cfg, listener)
}

fn spawn(cfg: MeshConfig, listener: TcpListener) -> Result<(MeshHandle, mpsc::Receiver<Event>)> {
    if cfg.peers.contains_key(&cfg.node_id) {
        bail!(
            "cluster node id {} is listed among its own peers",
            cfg.node_id
        );
    }
    if cfg.key.is_empty() {
        bail!("the cluster key is empty");
    }
    let local_addr = listener
        .local_addr()
        .context("reading the cluster listener's address")?;
    let incarnation = new_incarnation();
    let (stop, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        node_id: cfg.node_id,
        local_addr,
        links: cfg
            .peers
            .iter()
            .map(|(&id, &addr)| (id, Arc::new(Link::new(id, addr))))
            .collect(),
        rejected_auth: AtomicU64::new(0),
        rejected_replay: AtomicU64::new(0),
        rejected_other: AtomicU64::new(0),
        connections_refused: AtomicU64::new(0),
        logs: Logs {
            auth: RateLimit::new(),
            malformed: RateLimit::new(),
            replay: RateLimit::new(),
            misdirected: RateLimit::new(),
            refused: RateLimit::new(),
            silent: RateLimit::new(),
            accept: RateLimit::new(),
        },
        stop,
        tasks: Mutex::new(Vec::new()),
    });
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let opener = Opener::new(&cfg.key, cfg.node_id, cfg.peers.keys().copied(), cfg.window);

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(open_loop(
        shared.clone(),
        opener,
        inbound_rx,
        events_tx.clone(),
    )));
    tasks.push(tokio::spawn(accept_loop(
        shared.clone(),
        listener,
        cfg.key.clone(),
        inbound_tx,
    )));
    for link in shared.links.values() {
        let sealer = Sealer::new(&cfg.key, cfg.node_id, incarnation);
        tasks.push(tokio::spawn(dial_loop(
            shared.clone(),
            link.clone(),
            sealer,
            events_tx.clone(),
        )));
    }
    *lock(&shared.tasks) = tasks;
    info!(node = cfg.node_id, listen = %local_addr, peers = cfg.peers.len(), incarnation, "cluster mesh started");
    Ok((
        MeshHandle {
            inner: Arc::new(HandleInner { shared }),
        },
        events_rx,
    ))
}

/// The process's start time in unix ns, strictly increasing across meshes started in one process.
fn new_incarnation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let next = |last: u64| last.saturating_add(1).max(now);
    match LAST.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(next(l))) {
        Ok(prev) | Err(prev) => next(prev),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Resolves once the mesh is shut down (or its handles are all gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Delivers an event, waiting while the consumer is behind; false once the mesh is shutting down.
async fn emit(
    events: &mpsc::Sender<Event>,
    event: Event,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        // A consumer that dropped its receiver just does not hear about it.
        _ = events.send(event) => true,
        _ = stopped(stop) => false,
    }
}

/// Why an outbound link went down.
enum Down {
    Shutdown,
    PeerClosed,
    UnexpectedData,
    ReadFailed(io::Error),
    WriteFailed(io::Error),
    WriteTimeout,
    Overflow,
}

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Down::Shutdown => f.write_str("shutting down"),
            Down::PeerClosed => f.write_str("peer closed the connection"),
            Down::UnexpectedData => f.write_str("peer wrote on a write-only link"),
            Down::ReadFailed(e) => write!(f, "connection failed: {e}"),
            Down::WriteFailed(e) => write!(f, "write failed: {e}"),
            Down::WriteTimeout => write!(
                f,
                "peer stopped reading (write blocked for {WRITE_TIMEOUT:?})"
            ),
            Down::Overflow => write!(
                f,
                "send queue overflowed ({QUEUE_FRAMES} frames or {QUEUE_BYTES} bytes)"
            ),
        }
    }
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))?;
    Ok(stream)
}

/// Keeps the outbound link to one peer up: dial, write its queue, redial with back-off.
async fn dial_loop(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut sealer: Sealer,
    events: mpsc::Sender<Event>,
) {
    let mut stop = shared.stop.subscribe();
    let mut backoff = BACKOFF_MIN;
    let mut ups = 0u64;
    let mut failures = 0u64;
    loop {
        let dialed = tokio::select! {
            _ = stopped(&mut stop) => break,
            r = connect(link.addr) => r,
        };
        match dialed {
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    info!(peer = link.id, addr = %link.addr, error = %e, "cluster peer unreachable, retrying");
                } else {
                    debug!(peer = link.id, addr = %link.addr, error = %e, failures, "cluster peer still unreachable");
                }
            }
            Ok(stream) => {
                failures = 0;
                if ups > 0 {
                    link.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                ups += 1;
                link.set_state(LinkState::Up);
                info!(peer = link.id, addr = %link.addr, "cluster link up");
                if !emit(&events, Event::Connected(link.id), &mut stop).await {
                    break;
                }
                let since = Instant::now();
                let why = run_link(&link, stream, &mut sealer, &mut stop).await;
                link.set_state(LinkState::Down);
                if let Down::Shutdown = why {
                    break;
                }
                info!(peer = link.id, addr = %link.addr, reason = %why, "cluster link down");
                if !emit(&events, Event::Disconnected(link.id), &mut stop).await {
                    break;
                }
                if since.elapsed() >= STABLE_LINK {
                    backoff = BACKOFF_MIN;
                }
            }
        }
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    link.set_state(LinkState::Down);
}

/// Writes the peer's queue (and keepalives) on one connection until it fails.
async fn run_link(
    link: &Link,
    stream: TcpStream,
    sealer: &mut Sealer,
    stop: &mut watch::Receiver<bool>,
) -> Down {
    let (mut rd, mut wr) = stream.into_split();
    let mut probe = [0u8; 64];
    let mut buf = Vec::new();
    // The first frame goes out at once: the acceptor closes connections that stay silent.
    let mut keepalive_at = tokio::time::Instant::now();
    loop {
        let frames = match link.take_batch() {
            Batch::Overflowed => return Down::Overflow,
            Batch::Frames(frames) => frames,
            Batch::Idle if tokio::time::Instant::now() >= keepalive_at => vec![Bytes::new()],
            Batch::Idle => {
                tokio::select! {
                    _ = link.wake.notified() => {}
                    _ = tokio::time::sleep_until(keepalive_at) => {}
                    // The peer never writes here: a read ends only with its close or an error.
                    r = rd.read(&mut probe) => return match r {
                        Ok(0) => Down::PeerClosed,
                        Ok(_) => Down::UnexpectedData,
                        Err(e) => Down::ReadFailed(e),
                    },
                    _ = stopped(stop) => return Down::Shutdown,
                }
                continue;
            }
        };
        buf.clear();
        let now = unix_ms();
        for body in &frames {
            buf.extend_from_slice(&sealer.seal(link.id, body, now));
        }
        let written = tokio::select! {
            r = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&buf)) => r,
            _ = stopped(stop) => return Down::Shutdown,
        };
        match written {
            Err(_) => return Down::WriteTimeout,
            Ok(Err(e)) => return Down::WriteFailed(e),
            Ok(Ok(())) => {}
        }
        link.frames_tx
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        link.bytes_tx.fetch_add(buf.len() as u64, Ordering::Relaxed);
        keepalive_at = tokio::time::Instant::now() + KEEPALIVE;
    }
}

/// An authenticated frame on its way to the opener.
struct Inbound {
    header: Header,
    body: Bytes,
    wire_len: usize,
    remote: SocketAddr,
}

/// Accepts inbound connections up to the limit and runs a reader for each.
async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    key: Arc<[u8]>,
    inbound: mpsc::Sender<Inbound>,
) {
    let mut stop = shared.stop.subscribe();
    let limit = Arc::new(Semaphore::new(4 * shared.links.len() + 4));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((stream, remote)) => match limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        conns.spawn(read_conn(shared.clone(), stream, remote, key.clone(), inbound.clone(), permit));
                    }
                    Err(_) => {
                        drop(stream);
                        let n = shared.connections_refused.fetch_add(1, Ordering::Relaxed) + 1;
                        if shared.logs.refused.allow() {
                            warn!(%remote, refused_total = n, "cluster connection refused: too many inbound connections");
                        }
                    }
                },
                Err(e) => {
                    if shared.logs.accept.allow() {
                        warn!(error = %e, "accepting a cluster connection failed");
                    }
                    // Out of descriptors and the like: do not spin on it.
                    tokio::select! {
                        _ = stopped(&mut stop) => break,
                        _ = tokio::time::sleep(BACKOFF_MIN) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}

enum ReadError {
    Io(io::Error),
    BadLength(u32),
}

/// Reads one length-prefixed frame; memory grows only as its bytes actually arrive.
async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Vec<u8>, ReadError> {
    let len = rd.read_u32().await.map_err(ReadError::Io)?;
    let n = len as usize;
    if !(wire::MIN_FRAME..=wire::MAX_FRAME).contains(&n) {
        return Err(ReadError::BadLength(len));
    }
    let mut buf = Vec::with_capacity(n.min(64 * 1024));
    rd.take(u64::from(len))
        .read_to_end(&mut buf)
        .await
        .map_err(ReadError::Io)?;
    if buf.len() != n {
        return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(buf)
}

async fn authenticate(key: Arc<[u8]>, frame: Vec<u8>) -> (Vec<u8>, Result<Header, Reject>) {
    if frame.len() < BLOCKING_AUTH_BYTES {
        let r = wire::authenticate(&key, &frame);
        return (frame, r);
    }
    match tokio::task::spawn_blocking(move || {
        let r = wire::authenticate(&key, &frame);
        (frame, r)
    })
    .await
    {
        Ok(done) => done,
        // Only a panic in HMAC code gets here; treat the frame as unauthenticated.
        Err(_) => (Vec::new(), Err(Reject::Auth)),
    }
}

/// Reads one inbound connection: frames are authenticated here and passed to the opener.
async fn read_conn(
    shared: Arc<Shared>,
    stream: TcpStream,
    remote: SocketAddr,
    key: Arc<[u8]>,
    inbound: mpsc::Sender<Inbound>,
    _permit: OwnedSemaphorePermit,
) {
    let mut stop = shared.stop.subscribe();
    let mut rd = BufReader::with_capacity(64 * 1024, stream);
    let mut peer: Option<&Arc<Link>> = None;
    let mut first = true;
    loop {
        let wait = if first {
            FIRST_FRAME_TIMEOUT
        } else {
            IDLE_TIMEOUT
        };
        let read = tokio::select! {
            _ = stopped(&mut stop) => break,
            r = tokio::time::timeout(wait, read_frame(&mut rd)) => r,
        };
        let frame = match read {
            Ok(Ok(frame)) => frame,
            Err(_) => {
                if shared.logs.silent.allow() {
                    warn!(%remote, ?wait, "cluster connection sent no valid frame in time, closing");
                }
                break;
            }
            Ok(Err(ReadError::BadLength(len))) => {
                let n = shared.rejected_other.fetch_add(1, Ordering::Relaxed) + 1;
                if shared.logs.malformed.allow() {
                    warn!(%remote, len, rejected_other_total = n,
                        "cluster frame rejected: length outside {}..={} bytes, closing the connection",
                        wire::MIN_FRAME, wire::MAX_FRAME);
                }
                break;
            }
            Ok(Err(ReadError::Io(e))) => {
                debug!(%remote, error = %e, "cluster inbound connection ended");
                break;
            }
        };
        let (frame, verdict) = authenticate(key.clone(), frame).await;
        let header = match verdict {
            Ok(h) => h,
            Err(reject) => {
                let (counter, limit) = match reject {
                    Reject::Auth => (&shared.rejected_auth, &shared.logs.auth),
                    _ => (&shared.rejected_other, &shared.logs.malformed),
                };
                let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                if limit.allow() {
                    warn!(%remote, total = n, "cluster frame rejected, closing the connection: {reject}");
                }
                break;
            }
        };
        if first {
            first = false;
            peer = shared.links.get(&header.sender);
            if let Some(link) = peer {
                link.in_connections.fetch_add(1, Ordering::Relaxed);
                debug!(%remote, peer = link.id, "cluster inbound connection from peer");
            }
        }
        let wire_len = wire::LEN_PREFIX + frame.len();
        let body =
            Bytes::from(frame).slice(wire::HEADER_LEN..wire_len - wire::LEN_PREFIX - wire::TAG_LEN);
        let sent = tokio::select! {
            _ = stopped(&mut stop) => break,
            r = inbound.send(Inbound { header, body, wire_len, remote }) => r,
        };
        if sent.is_err() {
            break;
        }
    }
    if let Some(link) = peer {
        link.in_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The single owner of the replay state: accepts or drops authenticated frames from every connection.
async fn open_loop(
    shared: Arc<Shared>,
    mut opener: Opener,
    mut inbound: mpsc::Receiver<Inbound>,
    events: mpsc::Sender<Event>,
) {
    let mut stop = shared.stop.subscribe();
    loop {
        let msg = tokio::select! {
            _ = stopped(&mut stop) => break,
            m = inbound.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let now = unix_ms();
        let from = msg.header.sender;
        match opener.accept(&msg.header, now) {
            Ok(()) => {
                if let Some(link) = shared.links.get(&from) {
                    link.frames_rx.fetch_add(1, Ordering::Relaxed);
                    link.bytes_rx
                        .fetch_add(msg.wire_len as u64, Ordering::Relaxed);
                    link.last_rx_unix_ms.store(now, Ordering::Relaxed);
                }
                if !msg.body.is_empty()
                    && !emit(
                        &events,
                        Event::Message {
                            from,
                            body: msg.body,
                        },
                        &mut stop,
                    )
                    .await
                {
                    break;
                }
            }
            Err(reject) => {
                let (counter, limit) = match reject {
                    Reject::Replay => (&shared.rejected_replay, &shared.logs.replay),
                    _ => (&shared.rejected_other, &shared.logs.misdirected),
                };
                let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                if limit.allow() {
                    let h = &msg.header;
                    warn!(remote = %msg.remote, sender = h.sender, receiver = h.receiver, incarnation = h.incarnation,
                        seq = h.seq, sent_unix_ms = h.sent_unix_ms, total = n, "cluster frame dropped: {reject}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
