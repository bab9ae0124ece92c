//! Divergent sessions, kept where no LRU eviction reaches them.
//!
//! A session whose backend equals its service's Maglev answer loses nothing
//! when the LRU evicts it: the client's next packet gets the same backend
//! again. A session whose backend differs ("divergent") would move. Sessions
//! become divergent only when a table changes (a backend added, weighted,
//! drained, back up): the clients it would move keep their backend through
//! their entry. So whenever `apply` is about to make a new table live, it
//! finds the service's live sessions that differ from the new table's answer
//! and moves them into `XLB_PROTECTED_V1`, a plain hash map nothing but
//! userspace adds to, which a spoofed-source flood cannot evict from:
//!
//! 1. before the flip: copy them into the protected map (the LRU copy still
//!    serves them meanwhile); protected entries the new table makes equal,
//!    or whose backend is gone, leave it;
//! 2. the flip also sets `SERVICE_F_PROTECTED` on the service record, so an
//!    LRU miss looks in the protected map;
//! 3. after the flip: delete their LRU copies, so each client has one entry.
//!
//! Finding them reads the affinity map once (batched): a table change is
//! rare, and the sessions it affects can only be found by looking at them.
//! Protected entries age like the others: [`sweep`] deletes the expired and
//! those whose backend is gone, and clears the flag when none are left.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context as _, Result};
use aya::maps::{IterableMap as _, MapError};
use lb_common::{
    AffinityKey, BACKEND_ACTIVE, BACKEND_DRAINING, Backend, NO_BACKEND, SERVICE_F_PROTECTED,
    Service,
};

use crate::{bpf_batch, maglev, pins::PinnedMaps};

/// A service whose new Maglev table an apply is about to make live.
pub(crate) struct NewTable {
    /// Service id.
    pub service_id: u32,
    /// The table that becomes live.
    pub table: std::sync::Arc<[u32]>,
    /// The service's affinity timeout: older sessions are not worth keeping.
    pub timeout_ns: u64,
}

/// What one protection pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Protection {
    /// Sessions moved into the protected map.
    pub kept: usize,
    /// Protected sessions released (equal to the new answer: back to the
    /// LRU; or backend gone, expired: deleted).
    pub released: usize,
    /// Divergent sessions left in the LRU because the protected map was full.
    pub overflow: usize,
    /// Protected sessions per service id after the pass.
    pub per_service: BTreeMap<u32, usize>,
}

/// The LRU copies to delete once the new tables are live (step 3).
#[derive(Debug, Default)]
pub(crate) struct Pending {
    keys: Vec<AffinityKey>,
    /// How many are deleted so far.
    done: usize,
}

/// Whether a session may keep backend `id`: it exists, belongs to the
/// session's service and takes existing clients. `backends` indexed by id.
fn keeps(backends: &[Backend], id: u32, service_id: u32) -> bool {
    backends.get(id as usize).is_some_and(|b| {
        (b.state == BACKEND_ACTIVE || b.state == BACKEND_DRAINING)
            && u32::from(b.service_id) == service_id
    })
}

/// The table's answer for a masked client (`NO_BACKEND` for an empty table).
pub fn answer(table: &[u32], addr: &[u32; 4]) -> u32 {
    let size = u32::try_from(table.len()).unwrap_or(u32::MAX);
    if size == 0 {
        return NO_BACKEND;
    }
    table[maglev::slot(addr, size) as usize]
}

/// The decision of step 1, apart from the maps: which LRU sessions to
/// protect, which protected ones to release (to the LRU when `Some`), and
/// how many stay protected per service. Pure, so it is unit-tested.
pub(crate) struct Decision {
    /// LRU sessions to copy into the protected map.
    pub protect: Vec<(AffinityKey, lb_common::Affinity)>,
    /// Protected sessions to delete, with the LRU entry to restore if any.
    pub release: Vec<(AffinityKey, Option<lb_common::Affinity>)>,
    /// Protected sessions that stay, per service id (every service).
    pub stay: BTreeMap<u32, usize>,
}

/// The decision of step 1, built from the protected map first, then fed the
/// LRU one entry at a time: a walk of millions of sessions keeps only the
/// divergent ones.
pub(crate) struct Decider {
    by_id: HashMap<u32, NewTable>,
    backends: Vec<Backend>,
    now: u64,
    already: HashSet<AffinityKey>,
    decision: Decision,
}

impl Decider {
    /// Sorts the protected map's entries into those that stay and those the
    /// new `tables` release.
    pub(crate) fn new(
        tables: Vec<NewTable>,
        backends: Vec<Backend>,
        protected: &[(AffinityKey, lb_common::Affinity)],
        now: u64,
    ) -> Self {
        let mut d = Self {
            by_id: tables.into_iter().map(|t| (t.service_id, t)).collect(),
            backends,
            now,
            already: HashSet::new(),
            decision: Decision {
                protect: Vec::new(),
                release: Vec::new(),
                stay: BTreeMap::new(),
            },
        };
        for (key, value) in protected {
            let Some(t) = d.by_id.get(&key.service_id) else {
                *d.decision.stay.entry(key.service_id).or_default() += 1;
                d.already.insert(*key);
                continue;
            };
            let live = Self::live(now, t, value);
            let kept = keeps(&d.backends, value.backend_id, key.service_id);
            let new = answer(&t.table, &key.addr);
            if live && kept && new != value.backend_id {
                *d.decision.stay.entry(key.service_id).or_default() += 1;
                d.already.insert(*key);
            } else if live && kept {
                // Equal now: an ordinary session again, safe in the LRU.
                d.decision.release.push((*key, Some(*value)));
            } else if live && new != NO_BACKEND {
                // Its backend can no longer keep it (down, removed): it moves to
                // its answer, as the LRU's sessions of that backend do, and is
                // ordinary there (equal to the answer).
                let moved = lb_common::Affinity {
                    backend_id: new,
                    ..*value
                };
                d.decision.release.push((*key, Some(moved)));
            } else {
                // Expired, or nowhere to go.
                d.decision.release.push((*key, None));
            }
        }
        d
    }

    fn live(now: u64, t: &NewTable, v: &lb_common::Affinity) -> bool {
        now.saturating_sub(v.last_seen_ns) <= t.timeout_ns
    }

    /// Takes one LRU entry: kept for protection if a new table makes it divergent.
    pub(crate) fn lru_entry(&mut self, key: AffinityKey, value: lb_common::Affinity) {
        let divergent = self.by_id.get(&key.service_id).is_some_and(|t| {
            Self::live(self.now, t, &value)
                && keeps(&self.backends, value.backend_id, key.service_id)
                && answer(&t.table, &key.addr) != value.backend_id
                && !self.already.contains(&key)
        });
        if divergent {
            self.decision.protect.push((key, value));
        }
    }

    /// The decision.
    pub(crate) fn finish(self) -> Decision {
        self.decision
    }
}

/// Decides step 1 for `tables` from a snapshot of both maps.
#[cfg(test)]
pub(crate) fn decide(
    tables: Vec<NewTable>,
    backends: Vec<Backend>,
    lru: &[(AffinityKey, lb_common::Affinity)],
    protected: &[(AffinityKey, lb_common::Affinity)],
    now: u64,
) -> Decision {
    let mut d = Decider::new(tables, backends, protected, now);
    for (key, value) in lru {
        d.lru_entry(*key, *value);
    }
    d.finish()
}

/// Step 1, a chunk at a time: finds the sessions `tables` make divergent
/// (one walk of the LRU, which the owner may interrupt between chunks to
/// serve its mailbox), then protects them and releases the protected ones
/// the tables make ordinary ([`Scan::write`]).
pub(crate) struct Scan {
    decider: Decider,
    cursor: bpf_batch::HashCursor<AffinityKey, lb_common::Affinity>,
}

impl Scan {
    /// Reads the protected map (small: only divergent sessions live there).
    /// `backends` are the records as they will be once the apply is done
    /// (indexed by id).
    pub(crate) fn new(
        maps: &PinnedMaps,
        tables: Vec<NewTable>,
        backends: Vec<Backend>,
        now: u64,
    ) -> Result<Self> {
        let protected =
            bpf_batch::read_hash(&maps.protected).context("reading the protected session map")?;
        Ok(Self {
            decider: Decider::new(tables, backends, &protected, now),
            cursor: bpf_batch::HashCursor::new(),
        })
    }

    /// Reads at least `budget` more LRU sessions (whole chunks); true once
    /// the whole LRU has been read.
    pub(crate) fn step(&mut self, maps: &PinnedMaps, budget: usize) -> Result<bool> {
        let until = self.cursor.seen().saturating_add(budget.max(1));
        while self.cursor.seen() < until {
            let Some(chunk) = self
                .cursor
                .next_chunk(&maps.affinity)
                .context("reading the affinity map")?
            else {
                return Ok(true);
            };
            for (key, value) in chunk {
                self.decider.lru_entry(key, value);
            }
        }
        Ok(false)
    }

    /// Sessions read so far.
    pub(crate) fn seen(&self) -> usize {
        self.cursor.seen()
    }

    /// What to write: protect the divergent sessions found, release the
    /// protected ones the new tables make ordinary (or move away from a
    /// backend that can no longer keep them).
    pub(crate) fn into_writing(self) -> Writing {
        Writing::new(self.decider.finish())
    }
}

/// Writing a [`Decision`], a bounded piece at a time: releases first, then
/// the protected copies (one batch a piece). Nothing is live before the
/// flip, so pieces may be interleaved with other work.
pub(crate) struct Writing {
    decision: Decision,
    released: usize,
    protected: usize,
    /// The protected map was full: the rest stay in the LRU.
    full: bool,
    report: Protection,
}

impl Writing {
    fn new(decision: Decision) -> Self {
        Self {
            report: Protection {
                per_service: decision.stay.clone(),
                ..Protection::default()
            },
            decision,
            released: 0,
            protected: 0,
            full: false,
        }
    }

    /// Writes about `budget` more entries; true once all are written.
    pub(crate) fn step(&mut self, maps: &mut PinnedMaps, budget: usize) -> Result<bool> {
        let budget = budget.max(1);
        let release = &self.decision.release;
        let end = release.len().min(self.released.saturating_add(budget));
        for (key, restore) in &release[self.released..end] {
            if let Some(value) = restore {
                // NOEXIST: a fresher LRU entry (the kernel's) wins.
                const BPF_NOEXIST: u64 = 1;
                match maps.affinity.insert(*key, *value, BPF_NOEXIST) {
                    Ok(()) => {}
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e).context("returning a session to the affinity map"),
                }
            }
            remove(&mut maps.protected, key).context("releasing a protected session")?;
            self.report.released += 1;
        }
        self.released = end;
        if self.released < release.len() {
            return Ok(false);
        }
        let protect = &self.decision.protect;
        if self.full || self.protected == protect.len() {
            return Ok(true);
        }
        let end = protect.len().min(self.protected.saturating_add(budget));
        let keys: Vec<AffinityKey> = protect[self.protected..end]
            .iter()
            .map(|(k, _)| *k)
            .collect();
        let values: Vec<lb_common::Affinity> = protect[self.protected..end]
            .iter()
            .map(|(_, v)| *v)
            .collect();
        let written = match bpf_batch::update(maps.protected.map().fd(), &keys, &values) {
            Ok(()) => keys.len(),
            Err(bpf_batch::BatchError::Failed { done, error })
                if matches!(error.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)) =>
            {
                self.full = true;
                done
            }
            Err(bpf_batch::BatchError::Unsupported(_)) => {
                let mut n = 0;
                for (k, v) in keys.iter().zip(&values) {
                    match maps.protected.insert(*k, *v, 0) {
                        Ok(()) => n += 1,
                        Err(MapError::SyscallError(e))
                            if matches!(
                                e.io_error.raw_os_error(),
                                Some(libc::E2BIG | libc::ENOMEM)
                            ) =>
                        {
                            self.full = true;
                            break;
                        }
                        Err(e) => return Err(e).context("writing a protected session"),
                    }
                }
                n
            }
            Err(e) => return Err(anyhow::Error::new(e)).context("writing protected sessions"),
        };
        for key in &keys[..written] {
            *self.report.per_service.entry(key.service_id).or_default() += 1;
        }
        self.protected += written;
        Ok(self.full || self.protected == protect.len())
    }

    /// What was done, and the LRU copies to delete after the flip.
    pub(crate) fn finish(mut self) -> (Protection, Pending) {
        let wanted = self.decision.protect.len();
        self.report.kept = self.protected;
        self.report.overflow = wanted - self.protected;
        if self.report.overflow > 0 {
            tracing::warn!(
                left_in_lru = self.report.overflow,
                "the protected session map is full: these divergent sessions stay in the LRU, \
                 where a flood can evict them (raise affinity_max_entries)"
            );
        }
        self.decision.protect.truncate(self.protected);
        let keys = self.decision.protect.into_iter().map(|(k, _)| k).collect();
        (self.report, Pending { keys, done: 0 })
    }
}

impl Pending {
    /// Step 3, about `budget` keys at a time: deletes the LRU copies of the
    /// sessions step 1 protected (the new tables and flags are live now).
    /// True once all are deleted.
    pub(crate) fn step(&mut self, maps: &mut PinnedMaps, budget: usize) -> Result<bool> {
        let end = self.keys.len().min(self.done.saturating_add(budget.max(1)));
        bpf_batch::delete_keys(&mut maps.affinity, &self.keys[self.done..end])
            .context("removing the LRU copies of protected sessions")?;
        self.done = end;
        Ok(self.done == self.keys.len())
    }
}

/// Deletes `key`; already gone is fine.
fn remove(
    map: &mut aya::maps::HashMap<aya::maps::MapData, AffinityKey, lb_common::Affinity>,
    key: &AffinityKey,
) -> Result<()> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What a sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sweep {
    /// Protected sessions deleted (expired, backend gone, service gone).
    pub deleted: usize,
    /// Protected sessions per service id after the sweep.
    pub per_service: BTreeMap<u32, usize>,
    /// Services whose `SERVICE_F_PROTECTED` flag was cleared (none left).
    pub cleared: Vec<u32>,
}

/// Deletes the protected sessions that expired or whose backend is gone,
/// and clears the flag of services left without any: work proportional to
/// the protected map, never to the LRU. `records` are the live service
/// records by key; `backends` indexed by id. All at once: see [`Sweeping`].
pub fn sweep(
    maps: &mut PinnedMaps,
    records: &[(lb_common::ServiceKey, Service)],
    backends: &[Backend],
    now: u64,
) -> Result<Sweep> {
    let mut run = Sweeping::new(records.to_vec(), backends.to_vec(), now);
    while !run.step(maps, usize::MAX)? {}
    run.finish(maps)
}

/// A [`sweep`] a chunk at a time: after a table change at millions of
/// sessions the protected map can hold millions too. No apply may run
/// between its steps (an apply protects sessions whose flag this would
/// clear): the owner drops a sweep when an apply starts.
pub struct Sweeping {
    records: Vec<(lb_common::ServiceKey, Service)>,
    timeouts: HashMap<u32, u64>,
    backends: Vec<Backend>,
    now: u64,
    cursor: bpf_batch::HashCursor<AffinityKey, lb_common::Affinity>,
    out: Sweep,
}

impl Sweeping {
    /// A sweep against these service records and backends (indexed by id).
    pub fn new(
        records: Vec<(lb_common::ServiceKey, Service)>,
        backends: Vec<Backend>,
        now: u64,
    ) -> Self {
        Self {
            timeouts: records.iter().map(|(_, r)| (r.id, r.timeout_ns)).collect(),
            records,
            backends,
            now,
            cursor: bpf_batch::HashCursor::new(),
            out: Sweep::default(),
        }
    }

    /// Goes on for about `budget` protected sessions; true once all are read.
    pub fn step(&mut self, maps: &mut PinnedMaps, budget: usize) -> Result<bool> {
        let until = self.cursor.seen().saturating_add(budget.max(1));
        while self.cursor.seen() < until {
            let Some(chunk) = self
                .cursor
                .next_chunk(&maps.protected)
                .context("reading the protected session map")?
            else {
                return Ok(true);
            };
            let mut stale = Vec::new();
            for (key, value) in chunk {
                let keep = self.timeouts.get(&key.service_id).is_some_and(|t| {
                    self.now.saturating_sub(value.last_seen_ns) <= *t
                        && keeps(&self.backends, value.backend_id, key.service_id)
                });
                if keep {
                    *self.out.per_service.entry(key.service_id).or_default() += 1;
                } else {
                    stale.push(key);
                }
            }
            self.out.deleted += bpf_batch::delete_keys(&mut maps.protected, &stale)
                .context("deleting stale protected sessions")?;
        }
        Ok(false)
    }

    /// Clears the flag of services left without protected sessions.
    pub fn finish(mut self, maps: &mut PinnedMaps) -> Result<Sweep> {
        for (key, record) in &self.records {
            if record.flags & SERVICE_F_PROTECTED != 0
                && !self.out.per_service.contains_key(&record.id)
            {
                let cleared = Service {
                    flags: record.flags & !SERVICE_F_PROTECTED,
                    ..*record
                };
                // EXIST: a service removed meanwhile stays removed.
                const BPF_EXIST: u64 = 2;
                match maps.services.insert(*key, cleared, BPF_EXIST) {
                    Ok(()) => self.out.cleared.push(record.id),
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e).context("clearing a service's protected flag"),
                }
            }
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{Affinity, FAMILY_V4};

    use super::*;

    fn backend(service_id: u16, state: u8) -> Backend {
        Backend {
            state,
            family: FAMILY_V4,
            service_id,
            ..Backend::default()
        }
    }

    fn key(service_id: u32, n: u32) -> AffinityKey {
        AffinityKey {
            service_id,
            addr: [n, 0, 0, 0],
        }
    }

    fn session(backend_id: u32, last_seen_ns: u64) -> Affinity {
        Affinity {
            backend_id,
            _pad: 0,
            last_seen_ns,
        }
    }

    /// A 7-slot table: clients whose slot is even get backend 1, odd 2.
    fn table() -> Vec<u32> {
        (0..7).map(|i| if i % 2 == 0 { 1 } else { 2 }).collect()
    }

    fn answer_of(n: u32) -> u32 {
        answer(&table(), &[n, 0, 0, 0])
    }

    #[test]
    fn protects_exactly_the_live_divergent_sessions_of_changed_services() {
        let t = table();
        let tables = || {
            vec![NewTable {
                service_id: 1,
                table: t.clone().into(),
                timeout_ns: 100,
            }]
        };
        let backends = vec![
            Backend::default(),
            backend(1, BACKEND_ACTIVE),
            backend(1, BACKEND_DRAINING),
            backend(2, BACKEND_ACTIVE),
            backend(1, lb_common::BACKEND_DOWN),
        ];
        let now = 1000;
        let mut lru = Vec::new();
        for n in 0..40 {
            // Each client once on backend 1 and once on 2 (different services).
            let other = if answer_of(n) == 1 { 2 } else { 1 };
            lru.push((key(1, n), session(other, now)));
            lru.push((
                key(1, 100 + n),
                session(answer(&t, &[100 + n, 0, 0, 0]), now),
            ));
        }
        // Expired, down backend, foreign backend, unchanged service: never protected.
        lru.push((key(1, 500), session(3 - answer_of(500).min(2), 800)));
        lru.push((key(1, 501), session(4, now)));
        lru.push((key(1, 502), session(3, now)));
        lru.push((key(2, 503), session(3, now)));
        let d = decide(tables(), backends.clone(), &lru, &[], now);
        let keys: HashSet<AffinityKey> = d.protect.iter().map(|(k, _)| *k).collect();
        let expected: HashSet<AffinityKey> = (0..40).map(|n| key(1, n)).collect();
        assert_eq!(keys, expected);
        assert!(d.release.is_empty());
    }

    /// On a machine booted less than a timeout ago the clock reads below the
    /// timeout: no session can have been idle that long, not even one stamped
    /// at boot. And one stamped after `now` was read (the kernel refreshes
    /// entries while the map is read) is idle for 0, not for 2^64 - 1 ns.
    #[test]
    fn sessions_are_live_while_the_clock_reads_below_the_timeout() {
        let t = table();
        let tables = || {
            vec![NewTable {
                service_id: 1,
                table: t.clone().into(),
                timeout_ns: 1000,
            }]
        };
        let backends = vec![
            Backend::default(),
            backend(1, BACKEND_ACTIVE),
            backend(1, BACKEND_ACTIVE),
        ];
        let divergent =
            |n: u32, last_seen_ns: u64| (key(1, n), session(3 - answer_of(n), last_seen_ns));
        let lru = [divergent(1, 0), divergent(2, 0), divergent(3, 500)];
        for now in [0, 400, 1000] {
            let d = decide(tables(), backends.clone(), &lru, &[], now);
            let keys: HashSet<AffinityKey> = d.protect.iter().map(|(k, _)| *k).collect();
            let stamped_by_then: HashSet<AffinityKey> = lru.iter().map(|(k, _)| *k).collect();
            assert_eq!(keys, stamped_by_then, "now {now}");
        }
        // Once the clock is past the timeout, the ones stamped at boot expire.
        let d = decide(tables(), backends.clone(), &lru, &[], 1001);
        let keys: Vec<AffinityKey> = d.protect.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![key(1, 3)]);
    }

    #[test]
    fn releases_protected_sessions_the_new_table_makes_ordinary() {
        let t = table();
        let tables = || {
            vec![NewTable {
                service_id: 1,
                table: t.clone().into(),
                timeout_ns: 100,
            }]
        };
        let backends = vec![
            Backend::default(),
            backend(1, BACKEND_ACTIVE),
            backend(1, BACKEND_ACTIVE),
        ];
        let now = 1000;
        let equal = (key(1, 1), session(answer_of(1), now));
        let diverging = (key(1, 2), session(3 - answer_of(2), now));
        let expired = (key(1, 3), session(3 - answer_of(3), 10));
        let untouched = (key(7, 4), session(9, now));
        let d = decide(
            tables(),
            backends,
            &[diverging],
            &[equal, diverging, expired, untouched],
            now,
        );
        assert_eq!(d.release.len(), 2);
        // The equal one goes back to the LRU, the expired one is dropped.
        assert!(d.release.contains(&(equal.0, Some(equal.1))));
        assert!(d.release.contains(&(expired.0, None)));
        // Already protected: not written again.
        assert!(d.protect.is_empty());
        assert_eq!(d.stay.get(&1), Some(&1));
        assert_eq!(d.stay.get(&7), Some(&1));
    }

    /// A protected session whose backend went down moves to its client's
    /// answer in the new table, as the LRU's sessions of that backend do:
    /// deleting it would lose its stickiness (the client follows the table
    /// back when the backend recovers).
    #[test]
    fn protected_sessions_of_a_backend_that_went_down_move_to_the_new_answer() {
        // Backend 2 is down: the new table names only 1.
        let t: Vec<u32> = vec![1; 7];
        let tables = vec![NewTable {
            service_id: 1,
            table: t.clone().into(),
            timeout_ns: 100,
        }];
        let backends = vec![
            Backend::default(),
            backend(1, BACKEND_ACTIVE),
            backend(1, lb_common::BACKEND_DOWN),
        ];
        let now = 1000;
        let on_down = (key(1, 5), session(2, now - 10));
        let expired_on_down = (key(1, 6), session(2, 10));
        let d = decide(tables, backends, &[], &[on_down, expired_on_down], now);
        let moved = Affinity {
            backend_id: 1,
            ..on_down.1
        };
        assert!(
            d.release.contains(&(on_down.0, Some(moved))),
            "moved to the answer, idle as it was: {:?}",
            d.release
        );
        assert!(
            d.release.contains(&(expired_on_down.0, None)),
            "expired: deleted"
        );
        assert!(d.protect.is_empty());
    }
}
