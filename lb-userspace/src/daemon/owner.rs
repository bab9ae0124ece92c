//! The owner thread: [`Lb`] lives on one OS thread of its own and is
//! reached only by messages, so no lock is ever held across an `.await` and
//! no blocking map syscall runs on a tokio worker. Health checks, the
//! control socket, the metrics endpoint and signals all send [`Msg`]s; the
//! thread also runs the once-a-second tick and the periodic reconcile
//! (sooner, with backoff, after a failed write).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use tokio::sync::{oneshot, watch};

use super::counts::{self, Counted, Reader};
use super::lb::{BackendRef, CheckTarget, Lb};
use super::lb_cluster::{ImportTotals, Proposal};
use super::metrics::Metrics;
use super::state::State;
use super::views::SessionLister;
use crate::announce::Readiness;
use crate::api::{Failure, FailureKind, Request, Response, StatusInfo};
use crate::cluster::msg::{Doc, Hello, WireSession};
use crate::hops::Target;
use crate::pins::PinnedMaps;

/// Every VIP with whether this node is ready to serve it, and why.
pub type VipReadiness = std::collections::BTreeMap<std::net::IpAddr, Readiness>;

/// How often drain deadlines, idle orphans and panic grace periods are looked at.
const TICK: Duration = Duration::from_secs(1);
/// How often the kernel is compared with the desired state when all is well.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
/// First retry after a failed write; doubled up to [`RECONCILE_EVERY`].
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Most health results taken from the mailbox for one write.
const CHECKS_PER_APPLY: usize = 1024;
/// While an apply walks the sessions, the longest a stream of messages
/// may hold it back (it otherwise goes on whenever the mailbox is empty).
const WORK_AT_LEAST_EVERY: Duration = Duration::from_millis(20);

/// A message to the owner thread.
pub enum Msg {
    /// A control request and where to send its answer.
    Request(Request, oneshot::Sender<Response>),
    /// One health-check result (`Ok(latency)` or `Err(why)`).
    Check(BackendRef, Result<Duration, String>),
    /// A metrics scrape.
    Metrics(oneshot::Sender<Result<String>>),
    /// Exit after making sure the dataplane stays pinned.
    Shutdown(oneshot::Sender<()>),
    /// The backends' next hops changed (resolved, or a MAC re-learned).
    Hops(crate::dataplane::Hops),
    /// Work for the owner from the cluster task (`clustering.rs`).
    Cluster(ClusterCall),
    /// A session count from the counter thread (`counts.rs`).
    Counted(Arc<Counted>),
    /// What `xlb sessions list` needs to walk the maps beside the owner.
    Lister {
        service: Option<String>,
        backend: Option<String>,
        reply: oneshot::Sender<Result<SessionLister>>,
    },
}

/// A cheap, cloneable way to reach the owner thread.
#[derive(Clone)]
pub struct Handle {
    tx: Sender<Msg>,
    counts: Reader,
    status: watch::Receiver<Option<Snapshot>>,
}

/// What the owner last published of its status, and when it started.
type Snapshot = Arc<(StatusInfo, Instant)>;

impl Handle {
    /// Sends a control request and waits for its answer.
    pub async fn request(&self, req: Request) -> Response {
        if matches!(req, Request::Status) {
            if let Some(info) = self.status().await {
                return Response::Status(info);
            }
        }
        if let Request::SessionsList { service, backend } = req {
            return self.list_sessions(service, backend).await;
        }
        if matches!(req, Request::BackendList { .. }) {
            // Their session counts: a walk begun after the request where walks
            // are cheap, else the latest with its age. The owner has the count
            // before the reader sees it, so the request finds it there.
            self.counts.fresh(Instant::now()).await;
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Request(req, tx)).is_err() {
            return Response::error(FailureKind::ShuttingDown, "the daemon is shutting down");
        }
        rx.await.unwrap_or_else(|_| {
            Response::error(FailureKind::ShuttingDown, "the daemon is shutting down")
        })
    }

    /// `xlb sessions list`: the owner names the ids and checks the filter;
    /// the walk (seconds at millions of sessions) runs on a blocking thread
    /// with descriptors of its own.
    async fn list_sessions(&self, service: Option<String>, backend: Option<String>) -> Response {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Lister {
            service,
            backend,
            reply,
        };
        if self.tx.send(msg).is_err() {
            return Response::error(FailureKind::ShuttingDown, "the daemon is shutting down");
        }
        let lister = match rx.await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Response::Error(Failure::of(&e, FailureKind::Failed)),
            Err(_) => {
                return Response::error(FailureKind::ShuttingDown, "the daemon is shutting down");
            }
        };
        match tokio::task::spawn_blocking(move || lister.list()).await {
            Ok(Ok(list)) => Response::Sessions(list),
            Ok(Err(e)) => Response::Error(Failure::of(&e, FailureKind::Failed)),
            Err(e) => Response::error(FailureKind::Failed, format!("listing sessions: {e}")),
        }
    }

    /// `xlb status` without the owner: what it published after the last
    /// message it handled (a change is published before its answer is sent)
    /// with the session counts of [`Reader::fresh`], so status answers while
    /// the owner is busy (a session walk of millions). `None` before the
    /// first publication.
    async fn status(&self) -> Option<StatusInfo> {
        let counted = self.counts.fresh(Instant::now()).await;
        let snapshot = self.status.borrow().clone()?;
        let (mut info, started) = (snapshot.0.clone(), snapshot.1);
        info.uptime_s = started.elapsed().as_secs();
        if let Some(c) = counted {
            info.sessions = c.sessions;
            info.protected_sessions = c.protected;
            info.sessions_counted_ms_ago = Some(c.age_ms());
        }
        // (No count yet: the snapshot's own zero counts and no age.)
        Some(info)
    }

    /// Renders the metrics on the owner thread (the kernel counters are read there).
    pub async fn metrics(&self) -> Result<String> {
        self.counts.fresh(Instant::now()).await;
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Metrics(tx))
            .map_err(|_| anyhow!("the daemon is shutting down"))?;
        rx.await.context("the daemon is shutting down")?
    }

    /// Hands over one health-check result; never waits.
    pub fn check(&self, backend: BackendRef, result: Result<Duration, String>) {
        let _ = self.tx.send(Msg::Check(backend, result));
    }

    /// Hands over a new set of resolved next hops; never waits.
    pub fn hops(&self, hops: crate::dataplane::Hops) {
        let _ = self.tx.send(Msg::Hops(hops));
    }

    /// Sends the cluster task's call `make(reply)` and waits for its answer,
    /// e.g. `owner.cluster(ClusterCall::Hello)`.
    pub async fn cluster<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> ClusterCall,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Cluster(make(tx)))
            .map_err(|_| anyhow!("the daemon is shutting down"))?;
        rx.await.context("the daemon is shutting down")
    }

    /// Asks the owner to stop, and waits until it has.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// What the cluster task (`clustering.rs`) asks of the owner: a closed set,
/// each with where its answer goes.
pub enum ClusterCall {
    /// The state file's runtime changes, as the cluster document starts from.
    State(oneshot::Sender<State>),
    /// What this node tells its peers in a Hello (session counts as last counted).
    Hello(oneshot::Sender<Result<Hello>>),
    /// This node holds its peers' sessions now.
    SetSynced(oneshot::Sender<()>),
    /// The sessions worth replicating: all, or those changed since last asked.
    Replicable {
        changed_only: bool,
        reply: oneshot::Sender<Result<Vec<WireSession>>>,
    },
    /// Sessions a peer sent.
    Import {
        entries: Vec<WireSession>,
        reply: oneshot::Sender<Result<ImportTotals>>,
    },
    /// A flush, asked for by a peer or by this node's cluster-wide request.
    Flush {
        service: Option<String>,
        backend: Option<String>,
        reply: oneshot::Sender<Result<String>>,
    },
    /// A round's prepare: the sessions the proposed document makes divergent.
    Prepare {
        doc: Doc,
        reply: oneshot::Sender<Result<Vec<WireSession>>>,
    },
    /// A runtime change proposed on this node: the state it would make.
    Propose {
        request: Request,
        reply: oneshot::Sender<Result<Proposal>>,
    },
    /// A round's document, made live on this node.
    Adopt {
        doc: Doc,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The applied fingerprint and import totals, for `xlb cluster status`.
    Info(oneshot::Sender<(String, ImportTotals)>),
}

impl ClusterCall {
    /// Whether it reads or writes the sessions and tables as they are live,
    /// so an apply under way is finished first (and the one it starts, after).
    fn needs_settled(&self) -> bool {
        matches!(
            self,
            Self::Replicable { .. }
                | Self::Import { .. }
                | Self::Flush { .. }
                | Self::Prepare { .. }
                | Self::Adopt { .. }
        )
    }

    /// Runs it on `lb` and sends the answer.
    fn run(self, lb: &mut Lb) {
        match self {
            Self::State(reply) => {
                let _ = reply.send(lb.cluster_state().clone());
            }
            Self::Hello(reply) => {
                let _ = reply.send(lb.cluster_hello());
            }
            Self::SetSynced(reply) => {
                lb.set_synced();
                let _ = reply.send(());
            }
            Self::Replicable {
                changed_only,
                reply,
            } => {
                let _ = reply.send(lb.replicable(changed_only));
            }
            Self::Import { entries, reply } => {
                let _ = reply.send(lb.import_sessions(&entries));
            }
            Self::Flush {
                service,
                backend,
                reply,
            } => {
                let _ = reply.send(lb.flush(service.as_deref(), backend.as_deref()));
            }
            Self::Prepare { doc, reply } => {
                let _ = reply.send(lb.prepare(&doc));
            }
            Self::Propose { request, reply } => {
                let _ = reply.send(lb.propose(request));
            }
            Self::Adopt { doc, reply } => {
                let _ = reply.send(lb.adopt(&doc));
            }
            Self::Info(reply) => {
                let _ = reply.send(lb.cluster_info());
            }
        }
    }
}

/// The channels the owner publishes on.
pub struct Outputs {
    /// What the health checks check.
    pub targets: watch::Sender<Vec<CheckTarget>>,
    /// The backends whose next hops need resolving.
    pub hop_targets: watch::Sender<Vec<Target>>,
    /// Which VIPs are ready to be announced.
    pub readiness: watch::Sender<VipReadiness>,
}

/// Starts the owner thread with `lb`, publishing on `outputs`, and the
/// session counter beside it, walking `count_maps` (its own descriptors).
pub fn spawn(
    lb: Lb,
    metrics: Arc<Metrics>,
    outputs: Outputs,
    count_maps: PinnedMaps,
) -> Result<(Handle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let counts = counts::spawn(count_maps, tx.clone())?;
    let owner_counts = counts.clone();
    let (status_tx, status) = watch::channel(None);
    let thread = std::thread::Builder::new()
        .name("xlb-owner".into())
        .spawn(move || {
            let snapshot = Published::new(status_tx);
            run(lb, rx, &metrics, &outputs, &owner_counts, &snapshot);
        })
        .context("starting the owner thread")?;
    Ok((Handle { tx, counts, status }, thread))
}

/// The owner's side of the status snapshot.
struct Published {
    tx: watch::Sender<Option<Snapshot>>,
}

impl Published {
    fn new(tx: watch::Sender<Option<Snapshot>>) -> Self {
        Self { tx }
    }

    /// Publishes `lb`'s status if it changed (cheap: no session walk).
    fn publish(&self, lb: &Lb) {
        match lb.status() {
            Ok(mut info) => {
                // Uptime and the counts' age are the reader's to compute: without
                // them, equal states compare equal and are published once.
                info.uptime_s = 0;
                info.sessions_counted_ms_ago = None;
                let started = lb.started_at();
                let changed = self
                    .tx
                    .borrow()
                    .as_ref()
                    .is_none_or(|s| s.0 != info || s.1 != started);
                if changed {
                    self.tx.send_replace(Some(Arc::new((info, started))));
                }
            }
            Err(e) => tracing::debug!("status snapshot not published: {e:#}"),
        }
    }
}

fn run(
    mut lb: Lb,
    rx: Receiver<Msg>,
    metrics: &Metrics,
    outputs: &Outputs,
    counts: &Reader,
    status: &Published,
) {
    let Outputs {
        targets,
        hop_targets,
        readiness,
    } = outputs;
    // Lb::new applied the desired state: what is judged here is in the kernel.
    let mut published_ready = lb.vip_readiness();
    readiness.send_replace(published_ready.clone());
    let mut published = lb.check_targets();
    targets.send_replace(published.clone());
    let mut published_hops = lb.hop_targets();
    hop_targets.send_replace(published_hops.clone());
    status.publish(&lb);
    let now = Instant::now();
    let mut next_tick = now + TICK;
    let mut next_reconcile = now + RECONCILE_EVERY;
    let mut retry = RETRY_MIN;
    // A message taken from the mailbox while gathering health results.
    let mut pending: Option<Msg> = None;
    // Answers of changes whose apply is still under way, by its generation.
    let mut awaiting: Vec<(u64, oneshot::Sender<Response>, Response)> = Vec::new();
    let mut last_work = Instant::now();
    loop {
        // An apply under way goes on whenever nothing else waits.
        let wait = if lb.busy() {
            Duration::ZERO
        } else {
            next_tick
                .min(next_reconcile)
                .saturating_duration_since(Instant::now())
        };
        let mut targets_may_change = false;
        let next = match pending.take() {
            Some(msg) => Ok(msg),
            None => rx.recv_timeout(wait),
        };
        match next {
            Ok(Msg::Shutdown(done)) => {
                lb.shutdown();
                let _ = done.send(());
                return;
            }
            Ok(Msg::Request(req, reply)) => {
                targets_may_change = changes_targets(&req);
                let asked = lb.asked();
                let answer = handle(&mut lb, req);
                // Before the answer: whoever asks status after it sees the change.
                status.publish(&lb);
                let live = lb.outcome(lb.asked()).is_some();
                if lb.asked() > asked && !live && !matches!(answer, Response::Error(_)) {
                    // Live on this node once its apply is done, not before.
                    awaiting.push((lb.asked(), reply, answer));
                } else {
                    let _ = reply.send(answer);
                }
            }
            Ok(Msg::Check(backend, result)) => {
                // Every result already queued (a rack failing together) makes
                // one write, not one write (and its session walks) each.
                let (checks, next) = gather_checks((backend, result), &rx, CHECKS_PER_APPLY);
                pending = next;
                let transitions = checks
                    .into_iter()
                    .map(|(b, r)| lb.feed_health(&b, r))
                    .filter(|moved| *moved)
                    .count();
                if transitions > 1 {
                    tracing::info!(
                        "{transitions} health transitions queued together: applying them in one write"
                    );
                }
                if transitions > 0 {
                    if let Err(e) = lb.apply() {
                        tracing::error!(
                            "applying {transitions} health transition(s) failed: {e:#}"
                        );
                    }
                }
            }
            Ok(Msg::Metrics(reply)) => {
                let _ = reply.send(metrics.render(&lb));
            }
            Ok(Msg::Cluster(call)) => {
                // Cluster work can adopt a new state: targets may change.
                targets_may_change = true;
                let settle = call.needs_settled();
                // Rounds and replication reason about what is live: nothing half-applied.
                if settle {
                    if let Err(e) = lb.settle() {
                        tracing::error!(
                            "applying the desired state failed (reconcile retries): {e:#}"
                        );
                    }
                }
                call.run(&mut lb);
                if settle {
                    if let Err(e) = lb.settle() {
                        tracing::error!(
                            "applying the desired state failed (reconcile retries): {e:#}"
                        );
                    }
                }
            }
            Ok(Msg::Counted(c)) => {
                lb.record_counts(c);
                // Drains and orphans waiting for this count end now, not a tick later.
                if lb.wants_counts() {
                    if let Err(e) = lb.tick() {
                        tracing::error!("tick (drains, orphans, panic grace) failed: {e:#}");
                    }
                }
            }
            Ok(Msg::Lister {
                service,
                backend,
                reply,
            }) => {
                let _ = reply.send(lb.session_lister(service.as_deref(), backend.as_deref()));
            }
            Ok(Msg::Hops(hops)) => {
                if let Err(e) = lb.set_hops(hops) {
                    tracing::error!("writing new next hops failed (reconcile retries): {e:#}");
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if lb.busy() {
                    lb.work(super::lb::WORK_BUDGET);
                    last_work = Instant::now();
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                lb.shutdown();
                return;
            }
        }
        if lb.busy() && last_work.elapsed() >= WORK_AT_LEAST_EVERY {
            lb.work(super::lb::WORK_BUDGET);
            last_work = Instant::now();
        }
        answer_settled(&lb, &mut awaiting);
        let now = Instant::now();
        if now >= next_tick {
            // Asked for here, once a tick, and used when it arrives.
            if lb.wants_counts() {
                counts.kick();
            }
            if let Err(e) = lb.tick() {
                tracing::error!("tick (drains, orphans, panic grace) failed: {e:#}");
            }
            next_tick = now + TICK;
        }
        if lb.writer().dirty().is_some() {
            next_reconcile = next_reconcile.min(now + retry);
        }
        if now >= next_reconcile {
            match lb.reconcile() {
                Ok(_) => {
                    retry = RETRY_MIN;
                    next_reconcile = now + RECONCILE_EVERY;
                }
                Err(e) => {
                    tracing::error!(
                        "reconcile failed, retrying in {}: {e:#}",
                        humantime::format_duration(retry)
                    );
                    next_reconcile = now + retry;
                    retry = (retry * 2).min(RECONCILE_EVERY);
                }
            }
        }
        status.publish(&lb);
        // Health results, ticks, reconciles and requests all can change it; it is cheap.
        let now_ready = lb.vip_readiness();
        if now_ready != published_ready {
            readiness.send_replace(now_ready.clone());
            published_ready = now_ready;
        }
        if targets_may_change {
            let now_targets = lb.check_targets();
            if now_targets != published {
                targets.send_replace(now_targets.clone());
                published = now_targets;
            }
            let now_hops = lb.hop_targets();
            if now_hops != published_hops {
                hop_targets.send_replace(now_hops.clone());
                published_hops = now_hops;
            }
        }
    }
}

/// Sends the answers whose apply has ended: as they were where it was
/// written, an error where writing it failed part-way.
fn answer_settled(lb: &Lb, awaiting: &mut Vec<(u64, oneshot::Sender<Response>, Response)>) {
    let mut i = 0;
    while i < awaiting.len() {
        let Some(outcome) = lb.outcome(awaiting[i].0) else {
            i += 1;
            continue;
        };
        let (_, reply, answer) = awaiting.swap_remove(i);
        let _ = reply.send(match outcome {
            Ok(()) => answer,
            Err(why) => Response::error(
                FailureKind::UnknownOutcome,
                format!(
                    "the change is recorded, but writing it to the kernel failed part-way: {why}; \
                 the daemon retries it (reconcile)"
                ),
            ),
        });
    }
}

/// One health-check result of one backend, as the checks send it.
type CheckResult = (BackendRef, Result<Duration, String>);

/// The health results queued behind `first`, up to `limit` in all, and the
/// first message of another kind if one ended the run (it must be handled
/// next, in order).
fn gather_checks(
    first: CheckResult,
    rx: &Receiver<Msg>,
    limit: usize,
) -> (Vec<CheckResult>, Option<Msg>) {
    let mut checks = vec![first];
    while checks.len() < limit {
        match rx.try_recv() {
            Ok(Msg::Check(b, r)) => checks.push((b, r)),
            Ok(other) => return (checks, Some(other)),
            Err(_) => break,
        }
    }
    (checks, None)
}

/// Whether a request can change which backends are checked: targets follow the
/// config, the runtime changes and the source addresses, which only requests
/// (add, remove, reload) change; ticks and reconciles never do.
fn changes_targets(req: &Request) -> bool {
    matches!(
        req,
        Request::BackendAdd { .. } | Request::BackendRemove { .. } | Request::Reload
    )
}

/// Answers one control request against the owner's state.
pub fn handle(lb: &mut Lb, req: Request) -> Response {
    // What a failure means when nothing says otherwise: a change that fails
    // changed nothing (the state file and kernel are rolled back).
    let default = if is_change(&req) {
        FailureKind::NotApplied
    } else {
        FailureKind::Failed
    };
    let result: Result<Response> = (|| {
        Ok(match req {
            Request::Status => Response::Status(lb.status()?),
            Request::ServiceList => Response::Services(lb.services()),
            Request::BackendList { service } => {
                Response::Backends(lb.backends(service.as_deref())?)
            }
            req @ (Request::BackendAdd { .. }
            | Request::BackendRemove { .. }
            | Request::BackendDrain { .. }
            | Request::BackendUndrain { .. }
            | Request::BackendWeight { .. }) => Response::Done(lb.runtime_change(req)?),
            Request::SessionsList { service, backend } => Response::Sessions(
                lb.session_lister(service.as_deref(), backend.as_deref())?
                    .list()?,
            ),
            Request::SessionsWhere { client, service } => {
                Response::Where(lb.where_is(client, service.as_deref())?)
            }
            Request::SessionsFlush { service, backend } => {
                Response::Done(lb.flush(service.as_deref(), backend.as_deref())?)
            }
            Request::Stats => Response::Stats(lb.stats()?),
            Request::Reload => Response::Done(lb.reload()?),
            Request::ClusterStatus => {
                return Err(Failure::new(
                    FailureKind::Invalid,
                    "this node has no [cluster] section: it is not part of a cluster",
                )
                .into());
            }
        })
    })();
    match result {
        Ok(r) => {
            if let Response::Done(msg) = &r {
                tracing::info!("{msg}");
            }
            r
        }
        Err(e) => {
            let failure = Failure::of(&e, default);
            tracing::warn!(
                kind = failure.kind.name(),
                "control request refused: {failure}"
            );
            Response::Error(failure)
        }
    }
}

/// Whether `req` asks for a change (else it only reads).
fn is_change(req: &Request) -> bool {
    req.is_backend_change() || matches!(req, Request::SessionsFlush { .. } | Request::Reload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, ok: bool) -> Msg {
        let r = BackendRef {
            service: "web".into(),
            backend: name.into(),
        };
        Msg::Check(
            r,
            if ok {
                Ok(Duration::ZERO)
            } else {
                Err("refused".into())
            },
        )
    }

    fn first(name: &str) -> CheckResult {
        match check(name, false) {
            Msg::Check(b, r) => (b, r),
            _ => unreachable!(),
        }
    }

    fn names(checks: &[CheckResult]) -> Vec<&str> {
        checks.iter().map(|(b, _)| b.backend.as_str()).collect()
    }

    #[test]
    fn queued_health_results_are_taken_together_up_to_another_message() {
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(check("b2", false)).expect("send");
        tx.send(check("b3", true)).expect("send");
        let (done, _) = oneshot::channel();
        tx.send(Msg::Shutdown(done)).expect("send");
        tx.send(check("b4", false)).expect("send");

        let (checks, next) = gather_checks(first("b1"), &rx, CHECKS_PER_APPLY);
        assert_eq!(names(&checks), ["b1", "b2", "b3"]);
        assert!(checks[2].1.is_ok(), "each result kept as it came");
        assert!(
            matches!(next, Some(Msg::Shutdown(_))),
            "the message that ended the run is handed back, not lost"
        );
        // What came after it stays queued, in order.
        assert!(matches!(rx.try_recv(), Ok(Msg::Check(b, _)) if b.backend == "b4"));
    }

    #[test]
    fn gathering_is_bounded_and_stops_at_an_empty_mailbox() {
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..5 {
            tx.send(check(&format!("q{i}"), false)).expect("send");
        }
        let (checks, next) = gather_checks(first("b1"), &rx, 3);
        assert_eq!(names(&checks), ["b1", "q0", "q1"]);
        assert!(next.is_none());
        let (checks, next) = gather_checks(first("b1"), &rx, 100);
        assert_eq!(names(&checks), ["b1", "q2", "q3", "q4"]);
        assert!(next.is_none());
    }
}
