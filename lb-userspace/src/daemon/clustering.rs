//! The replication task: one per daemon with `[cluster]`. It owns the mesh
//! to the peers and this node's view of them, and asks the owner thread
//! (through [`Handle::call`]) for everything that touches the maps.
//!
//! A change (a runtime change from any node's CLI, a health verdict, a
//! drain that finished everywhere) is made only by the coordinator, in a
//! prepare round, so no node swaps tables before it holds every session the
//! new tables make divergent:
//!
//! 1. the coordinator checks the change on its owner (`Lb::propose`) and
//!    sends the new document to every peer with `prepare`;
//! 2. every node (coordinator included) finds its own sessions the new
//!    tables would move (`Lb::prepare`) and sends them to every peer,
//!    then `Done`; TCP keeps them in order on each link;
//! 3. a node swaps (`Lb::adopt`) once every peer live at the start said
//!    `Done`, so it has every node's divergent sessions by then.
//!
//! A link that comes up gets this node's document and all of its protected
//! sessions, then `SyncDone`; a starting node announces its VIPs only after
//! every live peer's `SyncDone` (or `sync_timeout` with none live). Protected
//! sessions seen since the last refresh are sent again every
//! [`REFRESH_EVERY`], so peers' copies do not expire while the client still
//! comes through this node.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use super::owner::{ClusterCall, Handle};
use super::state::Admin;
use crate::api::{ClusterInfo, Failure, FailureKind, PeerInfo, Request, Response};
use crate::cluster::agree::{self, LIVE_FOR, Origin, Round, RoundEnd};
use crate::cluster::mesh::{self, Event, MeshConfig, MeshHandle};
use crate::cluster::msg::{Doc, Hello, Message, SESSIONS_PER_MESSAGE, Version, WireSession};
use crate::cluster::wire;
use crate::config::ClusterConfig;

/// How often a Hello goes to every peer.
const HELLO_EVERY: Duration = Duration::from_secs(1);
/// How often protected sessions seen since the last refresh are re-sent.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// How long a CLI change waits for the cluster to make it live.
const CHANGE_WAIT: Duration = Duration::from_secs(10);
/// Replay window: a frame sent longer ago (or ahead) than this is refused.
const WINDOW: Duration = Duration::from_secs(30);
/// Most changes waiting for their round.
const MAX_QUEUED: usize = 64;

/// A request from this node's control socket for the cluster task.
pub struct LocalRequest {
    /// The request (a runtime change, a flush, or `ClusterStatus`).
    pub request: Request,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Response>,
}

/// Hands `request` to the cluster task and waits for its answer.
pub async fn ask(tx: &mpsc::Sender<LocalRequest>, request: Request) -> Response {
    let (reply, rx) = oneshot::channel();
    if tx.send(LocalRequest { request, reply }).await.is_err() {
        return Response::error(
            FailureKind::NotApplied,
            "the cluster task is not running (see the daemon's log)",
        );
    }
    match tokio::time::timeout(CHANGE_WAIT, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Response::error(
            FailureKind::ShuttingDown,
            "the cluster task dropped the request (shutting down?)",
        ),
        Err(_) => Response::error(
            FailureKind::UnknownOutcome,
            format!(
                "the cluster did not make the change live within {}s (the coordinator may be \
             unreachable); it may still be applied: see `xlb cluster status`",
                CHANGE_WAIT.as_secs()
            ),
        ),
    }
}

/// Whether the cluster task, not the owner alone, answers `req`.
pub fn is_cluster_request(req: &Request) -> bool {
    req.is_backend_change() || matches!(req, Request::SessionsFlush { .. } | Request::ClusterStatus)
}

#[derive(Default)]
struct Peer {
    addr: Option<SocketAddr>,
    hello: Option<Hello>,
    last_hello: Option<Instant>,
    /// Its full sync to us arrived completely since its link came up.
    sync_received: bool,
}

#[derive(Default)]
struct Totals {
    rounds: u64,
    rounds_gave_up: u64,
    sessions_sent: u64,
    sessions_received: u64,
}

struct Node {
    me: u32,
    mesh: MeshHandle,
    owner: Handle,
    metrics: Arc<Metrics>,
    doc: Doc,
    peers: BTreeMap<u32, Peer>,
    round: Option<Round>,
    early_done: BTreeMap<Version, BTreeSet<u32>>,
    queue: VecDeque<(Origin, Request)>,
    waiting: HashMap<u64, oneshot::Sender<Response>>,
    next_id: u64,
    synced: bool,
    sync_deadline: Instant,
    totals: Totals,
    /// The highest version any peer said it runs.
    seen: Version,
    /// Peers reported as drifted (same version, other fingerprint).
    drifted: BTreeSet<u32>,
    /// Whether this process has made a document live (until then the
    /// node's own checks rule, and a peer's equal version is still taken).
    adopted: bool,
}

/// Runs the cluster task until `stop`.
pub async fn run(
    cfg: ClusterConfig,
    owner: Handle,
    metrics: Arc<Metrics>,
    mut local: mpsc::Receiver<LocalRequest>,
    mut stop: oneshot::Receiver<()>,
) -> Result<()> {
    let key = wire::load_key(&cfg.key_file)
        .with_context(|| format!("cluster.key_file {}", cfg.key_file.display()))?;
    let (mesh, mut events) = mesh::start(MeshConfig {
        node_id: cfg.node_id,
        listen: cfg.listen,
        peers: cfg.peers.clone(),
        key: Arc::from(key),
        window: WINDOW,
    })
    .await
    .with_context(|| format!("starting the cluster mesh on {}", cfg.listen))?;
    tracing::info!(
        node = cfg.node_id,
        listen = %cfg.listen,
        peers = ?cfg.peers,
        "cluster: node {} listening; waiting up to {:?} for the peers' full sync before announcing",
        cfg.node_id,
        cfg.sync_timeout
    );
    let state = owner.cluster(ClusterCall::State).await?;
    let mut node = Node {
        me: cfg.node_id,
        mesh,
        owner,
        metrics,
        doc: Doc {
            // The version this node last made live, if its state file says.
            version: state.cluster_version.unwrap_or_default(),
            state,
            down: BTreeSet::new(),
        },
        peers: cfg
            .peers
            .iter()
            .map(|(id, addr)| {
                (
                    *id,
                    Peer {
                        addr: Some(*addr),
                        ..Peer::default()
                    },
                )
            })
            .collect(),
        round: None,
        early_done: BTreeMap::new(),
        queue: VecDeque::new(),
        waiting: HashMap::new(),
        next_id: 1,
        synced: false,
        sync_deadline: Instant::now() + cfg.sync_timeout,
        totals: Totals::default(),
        seen: Version::default(),
        drifted: BTreeSet::new(),
        adopted: false,
    };
    let mut hello = tokio::time::interval(HELLO_EVERY);
    let mut refresh = tokio::time::interval(REFRESH_EVERY);
    refresh.tick().await;
    let result = loop {
        let step = tokio::select! {
            _ = &mut stop => break Ok(()),
            ev = events.recv() => match ev {
                Some(ev) => node.event(ev).await,
                None => break Err(anyhow::anyhow!("the cluster mesh stopped")),
            },
            req = local.recv() => match req {
                Some(r) => node.local(r).await,
                None => break Ok(()),
            },
            _ = hello.tick() => node.tick().await,
            _ = refresh.tick() => node.refresh().await,
        };
        if let Err(e) = step {
            if node.owner_gone(&e) {
                break Ok(());
            }
            tracing::error!("cluster: {e:#}");
        }
        if let Err(e) = node.progress().await {
            tracing::error!("cluster: {e:#}");
        }
    };
    node.mesh.shutdown();
    result
}

impl Node {
    fn owner_gone(&self, e: &anyhow::Error) -> bool {
        format!("{e:#}").contains("the daemon is shutting down")
    }

    fn live(&self) -> BTreeSet<u32> {
        let now = Instant::now();
        self.peers
            .iter()
            .filter(|(_, p)| {
                p.last_hello
                    .is_some_and(|t| now.duration_since(t) < LIVE_FOR)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    fn coordinator(&self) -> u32 {
        agree::coordinator(self.me, self.live())
    }

    fn send(&self, to: u32, msg: &Message) {
        if let Err(e) = self.mesh.send(to, msg.encode()) {
            tracing::debug!(peer = to, "cluster: not sent: {e:?}");
        }
    }

    fn broadcast(&self, msg: &Message) {
        self.mesh.broadcast(msg.encode());
    }

    /// Sends sessions in bounded messages, to one peer or all.
    fn send_sessions(&mut self, to: Option<u32>, entries: Vec<WireSession>) {
        let peers = to.map_or(self.peers.len(), |_| 1) as u64;
        self.totals.sessions_sent += entries.len() as u64 * peers;
        for chunk in entries.chunks(SESSIONS_PER_MESSAGE) {
            let msg = Message::Sessions {
                entries: chunk.to_vec(),
            };
            match to {
                Some(p) => self.send(p, &msg),
                None => self.broadcast(&msg),
            }
        }
    }

    async fn event(&mut self, ev: Event) -> Result<()> {
        match ev {
            Event::Connected(p) => {
                tracing::info!(
                    peer = p,
                    "cluster: link to node {p} is up; sending it a full sync"
                );
                self.send(
                    p,
                    &Message::Doc {
                        doc: self.doc.clone(),
                        prepare: false,
                    },
                );
                let all = self
                    .owner
                    .cluster(|reply| ClusterCall::Replicable {
                        changed_only: false,
                        reply,
                    })
                    .await??;
                let n = all.len();
                self.send_sessions(Some(p), all);
                self.send(p, &Message::SyncDone);
                tracing::info!(
                    peer = p,
                    sessions = n,
                    "cluster: full sync sent to node {p}"
                );
            }
            Event::Disconnected(p) => {
                tracing::warn!(peer = p, "cluster: link to node {p} is down");
                if let Some(peer) = self.peers.get_mut(&p) {
                    peer.sync_received = false;
                }
            }
            Event::Message { from, body } => {
                let msg = Message::decode(&body)?;
                self.message(from, msg).await?;
            }
        }
        Ok(())
    }

    async fn message(&mut self, from: u32, msg: Message) -> Result<()> {
        match msg {
            Message::Hello(h) => {
                self.seen = self.seen.max(h.version);
                let behind = h.version < self.doc.version;
                if let Some(p) = self.peers.get_mut(&from) {
                    if p.last_hello.is_none_or(|t| t.elapsed() >= LIVE_FOR) {
                        tracing::info!(peer = from, version = %h.version, "cluster: node {from} is live");
                    }
                    p.hello = Some(h);
                    p.last_hello = Some(Instant::now());
                }
                // A peer that missed a version (a lost round) gets it now.
                if behind && self.round.is_none() && self.coordinator() == self.me {
                    self.send(
                        from,
                        &Message::Doc {
                            doc: self.doc.clone(),
                            prepare: false,
                        },
                    );
                }
            }
            Message::Doc { doc, prepare } => {
                // A restarted node's file may hold the cluster's version: it still
                // needs the document once, for the health verdict it does not keep.
                let first = !self.adopted
                    && !prepare
                    && doc.version == self.doc.version
                    && doc.version != Version::default();
                if (doc.version <= self.doc.version && !first)
                    || self
                        .round
                        .as_ref()
                        .is_some_and(|r| r.doc.version >= doc.version)
                {
                    return Ok(());
                }
                if prepare {
                    self.start_round(doc, None).await?;
                } else {
                    tracing::info!(from, version = %doc.version, "cluster: adopting node {from}'s newer version {}", doc.version);
                    self.adopt(doc).await?;
                }
            }
            Message::Sessions { entries } => {
                self.totals.sessions_received += entries.len() as u64;
                self.owner
                    .cluster(|reply| ClusterCall::Import { entries, reply })
                    .await??;
            }
            Message::Done { version } => {
                let mine = self.round.as_mut().is_some_and(|r| r.done(from, version));
                if !mine && version > self.doc.version {
                    self.early_done.entry(version).or_default().insert(from);
                    while self.early_done.len() > 16 {
                        self.early_done.pop_first();
                    }
                }
            }
            Message::SyncDone => {
                if let Some(p) = self.peers.get_mut(&from) {
                    p.sync_received = true;
                }
                tracing::info!(peer = from, "cluster: full sync from node {from} complete");
            }
            Message::Change { id, request } => {
                if self.coordinator() != self.me {
                    self.send(
                        from,
                        &Message::ChangeResult {
                            id,
                            result: Err(format!(
                                "node {} is not the coordinator (node {} is); try again",
                                self.me,
                                self.coordinator()
                            )),
                        },
                    );
                } else if self.queue.len() >= MAX_QUEUED {
                    self.send(
                        from,
                        &Message::ChangeResult {
                            id,
                            result: Err("too many changes waiting; try again".into()),
                        },
                    );
                } else {
                    self.queue.push_back((Origin::Peer(from, id), request));
                }
            }
            Message::ChangeResult { id, result } => {
                if let Some(reply) = self.waiting.remove(&id) {
                    let _ = reply.send(match result {
                        Ok(text) => Response::Done(text),
                        Err(e) => Response::error(FailureKind::NotApplied, e),
                    });
                }
            }
            Message::Flush { service, backend } => {
                let text = self
                    .owner
                    .cluster(|reply| ClusterCall::Flush {
                        service,
                        backend,
                        reply,
                    })
                    .await??;
                tracing::info!(from, "cluster: node {from} flushed sessions: {text}");
            }
        }
        Ok(())
    }

    async fn local(&mut self, r: LocalRequest) -> Result<()> {
        match r.request {
            Request::ClusterStatus => {
                let info = self.info().await;
                let _ = r.reply.send(Response::Cluster(info));
            }
            Request::SessionsFlush { service, backend } => {
                let (s, b) = (service.clone(), backend.clone());
                let result = self
                    .owner
                    .cluster(|reply| ClusterCall::Flush {
                        service: s,
                        backend: b,
                        reply,
                    })
                    .await?;
                let response = match result {
                    Ok(text) => {
                        self.broadcast(&Message::Flush { service, backend });
                        Response::Done(format!("{text} (and asked every peer to flush)"))
                    }
                    Err(e) => Response::Error(Failure::of(&e, FailureKind::NotApplied)),
                };
                let _ = r.reply.send(response);
            }
            request => {
                let id = self.next_id;
                self.next_id += 1;
                let coordinator = self.coordinator();
                if coordinator == self.me {
                    if self.queue.len() >= MAX_QUEUED {
                        let _ = r.reply.send(Response::error(
                            FailureKind::Busy,
                            "too many changes waiting; try again",
                        ));
                        return Ok(());
                    }
                    self.queue.push_back((Origin::Local(id), request));
                } else {
                    self.send(coordinator, &Message::Change { id, request });
                }
                self.waiting.insert(id, r.reply);
                self.waiting.retain(|_, tx| !tx.is_closed());
            }
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<()> {
        let mut hello = self.owner.cluster(ClusterCall::Hello).await??;
        hello.version = self.doc.version;
        hello.synced = self.synced;
        self.broadcast(&Message::Hello(hello.clone()));
        self.publish().await;
        if !self.synced {
            let live = self.live();
            let all_synced = !live.is_empty()
                && live
                    .iter()
                    .all(|p| self.peers.get(p).is_some_and(|p| p.sync_received));
            if all_synced || Instant::now() >= self.sync_deadline {
                if !all_synced {
                    tracing::warn!(
                        "cluster: no full sync from every peer within sync_timeout (live: {live:?}); serving with what this node has"
                    );
                }
                self.synced = true;
                self.owner.cluster(ClusterCall::SetSynced).await?;
            }
        }
        if self.synced && self.round.is_none() && self.coordinator() == self.me {
            self.coordinate(&hello).await?;
        }
        Ok(())
    }

    /// The coordinator's periodic duties: the health verdict and drains.
    async fn coordinate(&mut self, own: &Hello) -> Result<()> {
        let live = self.live();
        let peer_hellos: Vec<&Hello> = live
            .iter()
            .filter_map(|p| self.peers.get(p).and_then(|p| p.hello.as_ref()))
            .collect();
        let views = std::iter::once(&own.health).chain(peer_hellos.iter().map(|h| &h.health));
        let reported: BTreeSet<&String> = std::iter::once(&own.health)
            .chain(peer_hellos.iter().map(|h| &h.health))
            .flat_map(|v| v.keys())
            .collect();
        let mut down = agree::verdict(views);
        // Added backends no node checks yet stay down until some do.
        down.extend(
            self.doc
                .down
                .iter()
                .filter(|b| !reported.contains(b))
                .cloned(),
        );
        let mut state = self.doc.state.clone();
        let now_ms = super::lb::unix_ms();
        let mut finished = Vec::new();
        for (svc, over) in &mut state.services {
            for (name, admin) in &mut over.admin {
                if let Admin::Draining { deadline_unix_ms } = admin {
                    let key = format!("{svc}/{name}");
                    let counts = std::iter::once(&own.draining)
                        .chain(peer_hellos.iter().map(|h| &h.draining));
                    let all_report = own.draining.contains_key(&key);
                    if (all_report && agree::drain_finished(&key, counts))
                        || deadline_unix_ms.is_some_and(|d| now_ms >= d)
                    {
                        finished.push(key);
                        *admin = Admin::Maint;
                    }
                }
            }
        }
        // The first coordinator of a fresh cluster makes version 1 even if nothing
        // changed, so every node answers by the cluster's verdict, not its own checks.
        if down != self.doc.down
            || !finished.is_empty()
            || !self.adopted
            || self.doc.version == Version::default()
        {
            let version = agree::next_version(self.me, [self.doc.version, self.seen]);
            let gone: Vec<_> = down.difference(&self.doc.down).collect();
            let back: Vec<_> = self.doc.down.difference(&down).collect();
            if down == self.doc.down && finished.is_empty() {
                tracing::info!(
                    version = %version,
                    down = ?down,
                    "cluster: this node coordinates and no version is live here yet; preparing version \
                     {version} with the nodes' health verdict"
                );
            } else {
                tracing::info!(
                    version = %version,
                    down = ?gone,
                    up = ?back,
                    drains_finished = ?finished,
                    "cluster: the nodes' health checks (or drains) changed the cluster's verdict; preparing version {version}"
                );
            }
            let doc = Doc {
                version,
                state,
                down,
            };
            self.start_round(doc, None).await?;
        }
        Ok(())
    }

    /// Starts (or joins) a prepare round for `doc`.
    async fn start_round(&mut self, doc: Doc, origin: Option<(Origin, String)>) -> Result<()> {
        let mine = doc.version.node == self.me;
        if mine {
            self.broadcast(&Message::Doc {
                doc: doc.clone(),
                prepare: true,
            });
        }
        let d = doc.clone();
        let sessions = self
            .owner
            .cluster(|reply| ClusterCall::Prepare { doc: d, reply })
            .await??;
        let n = sessions.len();
        self.send_sessions(None, sessions);
        self.broadcast(&Message::Done {
            version: doc.version,
        });
        let early = self.early_done.remove(&doc.version).unwrap_or_default();
        self.early_done.retain(|v, _| *v > doc.version);
        tracing::info!(
            version = %doc.version,
            divergent = n,
            "cluster: prepared version {}: sent the {n} sessions it makes divergent to every peer",
            doc.version
        );
        let mut round = Round::new(doc, &self.live(), &early, Instant::now());
        if let Some((origin, text)) = origin {
            round.origin = Some(origin);
            round.text = text;
        }
        self.round = Some(round);
        Ok(())
    }

    /// Ends the round when it may end; starts the next queued change.
    async fn progress(&mut self) -> Result<()> {
        if let Some(round) = &self.round {
            let live = self.live();
            if let Some(end) = round.end(&live, Instant::now()) {
                let Some(round) = self.round.take() else {
                    return Ok(());
                };
                if let RoundEnd::GaveUp(peers) = &end {
                    self.totals.rounds_gave_up += 1;
                    tracing::warn!(
                        version = %round.doc.version,
                        "cluster: swapping to version {} without Done from nodes {peers:?} (not live or too slow): \
                         their clients with divergent sessions may move",
                        round.doc.version
                    );
                }
                let text = self.adopt(round.doc.clone()).await;
                if text.is_ok() {
                    // Sessions that became divergent between the prepare walk and the
                    // swap (new clients meanwhile): the swap protected them here.
                    let late = self
                        .owner
                        .cluster(|reply| ClusterCall::Replicable {
                            changed_only: true,
                            reply,
                        })
                        .await??;
                    if !late.is_empty() {
                        tracing::info!(
                            sessions = late.len(),
                            "cluster: sending the sessions that became divergent during the round"
                        );
                        self.send_sessions(None, late);
                    }
                }
                let result = text.map(|()| {
                    format!(
                        "{} (cluster version {}, live on this node)",
                        round.text, round.doc.version
                    )
                });
                match round.origin {
                    Some(Origin::Local(id)) => {
                        if let Some(reply) = self.waiting.remove(&id) {
                            let _ = reply.send(match &result {
                                Ok(v) => Response::Done(v.clone()),
                                Err(e) => {
                                    Response::error(FailureKind::NotApplied, format!("{e:#}"))
                                }
                            });
                        }
                    }
                    Some(Origin::Peer(node, id)) => self.send(
                        node,
                        &Message::ChangeResult {
                            id,
                            result: result
                                .as_ref()
                                .map(Clone::clone)
                                .map_err(|e| format!("{e:#}")),
                        },
                    ),
                    None => {}
                }
                result?;
            }
        }
        if self.round.is_none() && self.synced && self.coordinator() == self.me {
            if let Some((origin, request)) = self.queue.pop_front() {
                let shown = format!("{request:?}");
                let proposal = self
                    .owner
                    .cluster(|reply| ClusterCall::Propose { request, reply })
                    .await?;
                match proposal {
                    Ok(p) => {
                        let mut down = self.doc.down.clone();
                        down.extend(p.start_down.iter().cloned());
                        let version = agree::next_version(self.me, [self.doc.version, self.seen]);
                        tracing::info!(version = %version, "cluster: {} — preparing version {version}", p.text);
                        let doc = Doc {
                            version,
                            state: p.state,
                            down,
                        };
                        self.start_round(doc, Some((origin, p.text))).await?;
                    }
                    Err(e) => {
                        tracing::warn!("cluster: change refused: {shown}: {e:#}");
                        match origin {
                            Origin::Local(id) => {
                                if let Some(reply) = self.waiting.remove(&id) {
                                    let _ = reply.send(Response::Error(Failure::of(
                                        &e,
                                        FailureKind::NotApplied,
                                    )));
                                }
                            }
                            Origin::Peer(node, id) => self.send(
                                node,
                                &Message::ChangeResult {
                                    id,
                                    result: Err(format!("{e:#}")),
                                },
                            ),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn adopt(&mut self, doc: Doc) -> Result<()> {
        let d = doc.clone();
        self.owner
            .cluster(|reply| ClusterCall::Adopt { doc: d, reply })
            .await??;
        tracing::info!(version = %doc.version, "cluster: version {} is live on this node", doc.version);
        self.totals.rounds += 1;
        self.doc = doc;
        self.adopted = true;
        Ok(())
    }

    async fn refresh(&mut self) -> Result<()> {
        if self.peers.is_empty() {
            return Ok(());
        }
        let changed = self
            .owner
            .cluster(|reply| ClusterCall::Replicable {
                changed_only: true,
                reply,
            })
            .await??;
        if !changed.is_empty() {
            tracing::debug!(
                sessions = changed.len(),
                "cluster: refreshing sessions seen since the last refresh"
            );
            self.send_sessions(None, changed);
        }
        Ok(())
    }

    async fn info(&self) -> ClusterInfo {
        let stats = self.mesh.stats();
        let live = self.live();
        let (fingerprint, imported) = self
            .owner
            .cluster(ClusterCall::Info)
            .await
            .unwrap_or_default();
        let mut info = ClusterInfo {
            node_id: self.me,
            coordinator: self.coordinator(),
            version: self.doc.version.to_string(),
            fingerprint: fingerprint.clone(),
            synced: self.synced,
            round: self
                .round
                .as_ref()
                .map(|r| format!("{} waiting for {:?}", r.doc.version, r.waiting)),
            rounds: self.totals.rounds,
            rounds_gave_up: self.totals.rounds_gave_up,
            sessions_sent: self.totals.sessions_sent,
            sessions_received: self.totals.sessions_received,
            sessions_imported: imported.imported,
            sessions_conflicts_lost: imported.lost_to_local,
            sessions_unknown: imported.unknown,
            rejected_auth: stats.rejected_auth,
            rejected_replay: stats.rejected_replay,
            rejected_other: stats.rejected_other,
            ..ClusterInfo::default()
        };
        for (id, p) in &self.peers {
            let link = stats.peers.iter().find(|s| s.id == *id);
            let hello = p.hello.as_ref();
            let state = if live.contains(id) {
                "live"
            } else if link.is_some_and(|l| l.out_connected) {
                "connected"
            } else {
                "down"
            };
            let fp = hello.map(|h| h.fingerprint.clone());
            if fp.as_ref().is_some_and(|f| *f != fingerprint) && live.contains(id) {
                info.drift.push(*id);
            }
            info.bytes_sent += link.map_or(0, |l| l.bytes_tx);
            info.bytes_received += link.map_or(0, |l| l.bytes_rx);
            info.peers.push(PeerInfo {
                id: *id,
                address: p.addr.map(|a| a.to_string()).unwrap_or_default(),
                state: state.into(),
                last_hello_ms: p.last_hello.map(|t| t.elapsed().as_millis() as u64),
                version: hello.map(|h| h.version.to_string()),
                lag: hello.map_or(0, |h| {
                    self.doc.version.counter as i64 - h.version.counter as i64
                }),
                fingerprint: fp,
                synced: hello.is_some_and(|h| h.synced),
                sync_received: p.sync_received,
                frames_sent: link.map_or(0, |l| l.frames_tx),
                bytes_sent: link.map_or(0, |l| l.bytes_tx),
                frames_received: link.map_or(0, |l| l.frames_rx),
                bytes_received: link.map_or(0, |l| l.bytes_rx),
            });
        }
        info
    }

    /// Publishes the status for metrics; says so loudly when a live peer
    /// at this node's version has another fingerprint (config drift).
    async fn publish(&mut self) {
        let info = self.info().await;
        let same_version: BTreeSet<u32> = info
            .peers
            .iter()
            .filter(|p| p.version.as_deref() == Some(info.version.as_str()))
            .map(|p| p.id)
            .collect();
        let drift: BTreeSet<u32> = info
            .drift
            .iter()
            .copied()
            .filter(|p| same_version.contains(p))
            .collect();
        for p in drift.difference(&self.drifted) {
            let theirs = info
                .peers
                .iter()
                .find(|x| x.id == *p)
                .and_then(|x| x.fingerprint.clone())
                .unwrap_or_default();
            tracing::error!(
                peer = p,
                mine = %info.fingerprint,
                theirs = %theirs,
                "cluster: CONFIG DRIFT: node {p} runs version {} like this node but its services, backends \
                 or tables differ (fingerprint {theirs} vs {}); clients may get different backends through \
                 different nodes: compare the config files",
                info.version,
                info.fingerprint
            );
        }
        for p in self.drifted.difference(&drift) {
            tracing::info!(
                peer = p,
                "cluster: node {p}'s fingerprint matches this node's again"
            );
        }
        self.drifted = drift;
        self.metrics.set_cluster(info);
    }
}
