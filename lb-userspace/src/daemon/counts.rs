//! Session counts, walked beside the owner rather than on it. Counting the
//! sessions means walking both session maps (~0.5 µs a session: 5 s at 10M),
//! and `xlb status`, `backend list`, every scrape, drain ends and cluster
//! Hellos all want counts. Walked on the owner thread, each of them held back
//! the health transitions queued behind it. Here one thread (`xlb-counts`)
//! with its own map descriptors walks on demand, concurrent demands
//! coalescing into one walk (a slow one rests four times its length before
//! the next), and publishes the result:
//! - to the control path (`Reader::fresh`), which waits for a walk begun
//!   after its request when walks are cheap, and otherwise answers at once
//!   with the latest count and its age;
//! - to the owner (`Msg::Counted`), which keeps it in its [`Book`] for drain
//!   ends, orphans, metrics and Hellos, never walking itself.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use lb_common::Affinity;
use tokio::sync::watch;

use super::lb::BackendRef;
use super::owner::Msg;
use crate::pins::PinnedMaps;
use crate::sessions::monotonic_ns;

/// A walk at most this long is waited for by the control path: its answer is
/// exact. Longer walks (about 200k sessions and up) are not: the answer is
/// the latest count, with its age.
pub const FRESH_WALK: Duration = Duration::from_millis(100);
/// How many times its own duration a slow walk rests before the next.
const REST_PER_WALK: u32 = 4;
/// The longest the control path waits for a count it waits for at all
/// (a cheap walk on a busy machine; the first walk at start).
const FRESH_WAIT: Duration = Duration::from_secs(1);

/// One walk of both session maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    /// Fresh sessions (idle less than their service's timeout) per backend
    /// id, protected ones included (a draining backend's are all protected).
    pub per_backend: HashMap<u32, u64>,
    /// Every entry of both maps, fresh or not.
    pub sessions: usize,
    /// Entries of the protected map.
    pub protected: usize,
    /// When the walk began: every map write finished before it is counted.
    pub started: Instant,
    /// How long the walk took.
    pub took: Duration,
}

impl Counted {
    /// Fresh sessions on backend `id`.
    pub fn of(&self, id: u32) -> u64 {
        self.per_backend.get(&id).copied().unwrap_or(0)
    }

    /// Milliseconds since the walk began.
    pub fn age_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// The pure part of one walk: what each session adds to the counts.
pub struct Tally {
    timeouts: HashMap<u32, u64>,
    now_ns: u64,
    per_backend: HashMap<u32, u64>,
    sessions: usize,
    protected: usize,
}

impl Tally {
    /// A tally against the services' affinity timeouts (ns, by service id)
    /// at the program's clock reading `now_ns`.
    pub fn new(timeouts: HashMap<u32, u64>, now_ns: u64) -> Self {
        Self {
            timeouts,
            now_ns,
            per_backend: HashMap::new(),
            sessions: 0,
            protected: 0,
        }
    }

    /// Counts one session of service `service_id`. A session of a service the
    /// kernel no longer has is counted as an entry but is fresh for nobody.
    pub fn add(&mut self, service_id: u32, value: &Affinity, protected: bool) {
        self.sessions += 1;
        self.protected += usize::from(protected);
        let timeout = self.timeouts.get(&service_id).copied().unwrap_or(0);
        if self.now_ns.saturating_sub(value.last_seen_ns) < timeout {
            *self.per_backend.entry(value.backend_id).or_default() += 1;
        }
    }

    /// The counts, stamped with the walk's start and duration.
    pub fn finish(self, started: Instant, took: Duration) -> Counted {
        Counted {
            per_backend: self.per_backend,
            sessions: self.sessions,
            protected: self.protected,
            started,
            took,
        }
    }
}

/// How long the control path waits for a walk begun after its request:
/// `None` when the last walk was too slow to wait for.
pub fn wait_budget(last: Option<&Counted>) -> Option<Duration> {
    match last {
        Some(c) if c.took > FRESH_WALK => None,
        _ => Some(FRESH_WAIT),
    }
}

/// The control path's side: the latest count, and a way to ask for a new one.
#[derive(Clone)]
pub struct Reader {
    latest: watch::Receiver<Option<Arc<Counted>>>,
    kick: SyncSender<()>,
}

impl Reader {
    /// Asks for a walk; never waits. Asks made while one is pending are one.
    pub fn kick(&self) {
        match self.kick.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => {}
            Err(TrySendError::Disconnected(())) => {
                tracing::debug!("the session counter has stopped");
            }
        }
    }

    /// The latest count, if any walk finished yet.
    pub fn latest(&self) -> Option<Arc<Counted>> {
        self.latest.borrow().clone()
    }

    /// A count begun at or after `since` when walks are cheap enough to wait
    /// for (see [`wait_budget`]), else the latest one.
    pub async fn fresh(&self, since: Instant) -> Option<Arc<Counted>> {
        let latest = self.latest();
        self.kick();
        let Some(budget) = wait_budget(latest.as_deref()) else {
            return latest;
        };
        let mut rx = self.latest.clone();
        let waited = tokio::time::timeout(
            budget,
            rx.wait_for(|c| c.as_ref().is_some_and(|c| c.started >= since)),
        )
        .await;
        match waited {
            Ok(Ok(c)) => c.clone(),
            _ => self.latest(),
        }
    }
}

/// Starts the `xlb-counts` thread, walking `maps` whenever asked and
/// publishing each count to the returned reader and to the owner at `owner`.
/// It stops when the owner is gone.
pub fn spawn(maps: PinnedMaps, owner: Sender<Msg>) -> Result<Reader> {
    let (kick, kicks) = std::sync::mpsc::sync_channel(1);
    let (tx, latest) = watch::channel(None);
    std::thread::Builder::new()
        .name("xlb-counts".into())
        .spawn(move || run(&maps, &kicks, &tx, &owner))
        .context("starting the session counter thread")?;
    let reader = Reader { latest, kick };
    // The first count, so status and drains have one from the start.
    reader.kick();
    Ok(reader)
}

fn run(
    maps: &PinnedMaps,
    kicks: &Receiver<()>,
    latest: &watch::Sender<Option<Arc<Counted>>>,
    owner: &Sender<Msg>,
) {
    while kicks.recv().is_ok() {
        let started = Instant::now();
        match walk(maps, started) {
            Ok(c) => {
                let c = Arc::new(c);
                // The owner first: whoever sees the count published and then
                // asks the owner finds the owner holding it already.
                if owner.send(Msg::Counted(c.clone())).is_err() {
                    return;
                }
                latest.send_replace(Some(c.clone()));
                // A slow walk (millions of sessions) rests four times as long
                // as it took, so counting takes at most a fifth of a core
                // away from the owner's own walks when a failure needs them.
                if c.took > FRESH_WALK {
                    std::thread::sleep(c.took * REST_PER_WALK);
                }
            }
            Err(e) => {
                tracing::warn!("counting the sessions failed (the last count stays): {e:#}");
            }
        }
    }
}

/// One walk of both session maps.
fn walk(maps: &PinnedMaps, started: Instant) -> Result<Counted> {
    let mut timeouts = HashMap::new();
    for entry in maps.services.iter() {
        let (key, svc) = entry.context("reading the service map")?;
        if key.port != 0 {
            timeouts.insert(svc.id, svc.timeout_ns);
        }
    }
    let mut tally = Tally::new(timeouts, monotonic_ns());
    maps.visit_sessions(|key, value, protected| {
        tally.add(key.service_id, &value, protected);
        Ok(())
    })?;
    Ok(tally.finish(started, started.elapsed()))
}

/// What drain ends and orphans are decided against: a count begun before
/// the ids, the draining backends or the orphans last changed may count the
/// wrong sessions (a backend that drew new clients until it began draining,
/// an id handed to another backend), so it cannot end a drain or drop an
/// orphan.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Basis {
    /// Backend ids, sorted.
    pub ids: Vec<(BackendRef, u32)>,
    /// Backends draining.
    pub draining: BTreeSet<BackendRef>,
    /// Orphan backends.
    pub orphans: BTreeSet<BackendRef>,
}

/// The owner's record of the session counts.
#[derive(Debug, Default)]
pub struct Book {
    latest: Option<Arc<Counted>>,
    basis: Basis,
    /// When `basis` last changed: older counts are not valid for drains.
    since: Option<Instant>,
}

impl Book {
    /// Keeps `c` if it is newer than what is kept.
    pub fn record(&mut self, c: Arc<Counted>) {
        if self.latest.as_ref().is_none_or(|l| l.started <= c.started) {
            self.latest = Some(c);
        }
    }

    /// The latest count, whatever it was begun after.
    pub fn latest(&self) -> Option<&Counted> {
        self.latest.as_deref()
    }

    /// The latest count if it began after the basis last changed.
    pub fn valid(&self) -> Option<&Counted> {
        self.latest
            .as_deref()
            .filter(|c| self.since.is_none_or(|s| c.started >= s))
    }

    /// Notes what an apply left at `now`; a change makes older counts invalid.
    pub fn note(&mut self, basis: Basis, now: Instant) {
        if basis != self.basis || self.since.is_none() {
            self.basis = basis;
            self.since = Some(now);
        }
    }
}

/// Whether a drain of a backend with `left` fresh sessions (`None`: not
/// counted since the drain began) and deadline `deadline_ms` is over at
/// `now_ms`, and why.
pub fn drain_over(left: Option<u64>, deadline_ms: Option<u64>, now_ms: u64) -> Option<String> {
    let passed = deadline_ms.is_some_and(|d| now_ms >= d);
    match left {
        Some(0) => Some("no sessions left".into()),
        Some(n) if passed => Some(format!(
            "drain deadline passed with {n} sessions left; moving them"
        )),
        None if passed => {
            Some("drain deadline passed (sessions not counted yet); moving them".into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(backend_id: u32, last_seen_ns: u64) -> Affinity {
        Affinity {
            backend_id,
            _pad: 0,
            last_seen_ns,
        }
    }

    fn counted(started: Instant, took: Duration) -> Counted {
        Tally::new(HashMap::new(), 0).finish(started, took)
    }

    fn backend(name: &str) -> BackendRef {
        BackendRef {
            service: "web".into(),
            backend: name.into(),
        }
    }

    #[test]
    fn tally_counts_fresh_sessions_per_backend_and_every_entry() {
        // Service 1 times out after 100 ns; service 2 is gone from the kernel.
        let mut t = Tally::new(HashMap::from([(1, 100)]), 1_000);
        t.add(1, &session(7, 950), false); // idle 50: fresh
        t.add(1, &session(7, 901), true); // idle 99: fresh, protected
        t.add(1, &session(7, 900), false); // idle 100: expired
        t.add(1, &session(8, 2_000), false); // stamped after `now`: idle 0
        t.add(2, &session(9, 1_000), false); // no service: fresh for nobody
        let c = t.finish(Instant::now(), Duration::ZERO);
        assert_eq!(c.of(7), 2);
        assert_eq!(c.of(8), 1);
        assert_eq!(c.of(9), 0);
        assert_eq!(c.sessions, 5);
        assert_eq!(c.protected, 1);
    }

    #[test]
    fn the_control_path_waits_only_for_cheap_walks() {
        let now = Instant::now();
        assert_eq!(wait_budget(None), Some(FRESH_WAIT), "the first count");
        let cheap = counted(now, Duration::from_millis(2));
        assert_eq!(wait_budget(Some(&cheap)), Some(FRESH_WAIT));
        let at_limit = counted(now, FRESH_WALK);
        assert_eq!(wait_budget(Some(&at_limit)), Some(FRESH_WAIT));
        let slow = counted(now, Duration::from_secs(5));
        assert_eq!(wait_budget(Some(&slow)), None);
    }

    #[test]
    fn a_count_older_than_a_change_of_the_basis_decides_nothing() {
        let t0 = Instant::now();
        let mut book = Book::default();
        let basis = Basis {
            ids: vec![(backend("a"), 1)],
            ..Basis::default()
        };
        book.note(basis.clone(), t0);
        book.record(Arc::new(counted(t0, Duration::ZERO)));
        assert!(book.valid().is_some(), "begun when the basis was set");

        // A backend begins draining: the count before it cannot end the drain.
        let t1 = t0 + Duration::from_millis(10);
        let mut draining = basis.clone();
        draining.draining.insert(backend("a"));
        book.note(draining.clone(), t1);
        assert!(book.valid().is_none());
        assert!(book.latest().is_some(), "status still shows it");

        // The same basis again (a health transition): counts stay valid.
        let t2 = t1 + Duration::from_millis(10);
        book.record(Arc::new(counted(t2, Duration::ZERO)));
        book.note(draining, t2 + Duration::from_millis(10));
        assert_eq!(book.valid().map(|c| c.started), Some(t2));

        // An older count arriving late does not replace a newer one.
        book.record(Arc::new(counted(t0, Duration::ZERO)));
        assert_eq!(book.latest().map(|c| c.started), Some(t2));
    }

    #[test]
    fn a_drain_ends_on_no_sessions_or_at_its_deadline() {
        assert_eq!(
            drain_over(Some(0), None, 5).as_deref(),
            Some("no sessions left")
        );
        assert_eq!(drain_over(Some(3), None, 5), None, "no deadline: waits");
        assert_eq!(drain_over(Some(3), Some(10), 5), None, "deadline ahead");
        assert!(drain_over(Some(3), Some(5), 5).is_some_and(|w| w.contains("3 sessions")));
        assert_eq!(drain_over(None, Some(10), 5), None, "uncounted: waits");
        assert!(drain_over(None, Some(5), 5).is_some_and(|w| w.contains("not counted")));
        assert_eq!(drain_over(None, None, 5), None);
    }
}
