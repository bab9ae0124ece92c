//! [`Writer`]: the one writer of the pinned maps. [`Lb`](super::lb::Lb)
//! decides what the kernel should hold (the desired config); the writer
//! makes it so, in the steps of `dataplane::Staged` and then the rewrite of
//! the clients of backends that became unusable, a bounded piece at a time
//! ([`Writer::work`]), so the owner serves its mailbox between pieces. While
//! one apply is under way a newer desired state writes only its backend
//! records ([`Writer::write_records`]): a failure is down in the kernel at
//! once, and the whole apply follows when the one under way ends.
//!
//! It also puts the pins back from the daemon's own descriptors
//! (`repair_pins`, with `pin_guard.rs`), compares the kernel with what it
//! wrote (`compare`), and sweeps the protected map between applies.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use lb_common::{AffinityKey, Service};

use super::lb::BackendRef;
pub use super::pin_guard::Held;
use crate::config::{BackendState, Config};
use crate::dataplane::{self, Hops};
use crate::maglev;
use crate::pins::PinnedMaps;
use crate::sessions::monotonic_ns;

/// Sessions an apply reads before the owner serves its mailbox again:
/// a few batched reads, a few milliseconds.
pub const WORK_BUDGET: usize = 16 * 1024;

/// An apply that took longer is logged at info, with its divergent scan's share.
const SLOW_APPLY: Duration = Duration::from_millis(100);

/// An apply under way: what `dataplane::Staged` has left, then the rewrite
/// of the sessions of backends that became unusable.
struct Job {
    staged: Option<dataplane::Staged>,
    rewrite: Option<dataplane::Rewrite>,
    /// Backends that went down with this apply (their clients move).
    newly_down: HashSet<u32>,
    /// Backends of services that entered panic mode (their clients re-spread).
    respread: HashSet<u32>,
    entered: Vec<String>,
    /// Another apply was asked for meanwhile: it starts when this one ends.
    again: bool,
    /// Which apply this is (`Writer::asked` when it started).
    generation: u64,
    started: Instant,
}

/// How far [`Writer::work`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Nothing under way, or still under way.
    Working,
    /// The apply ended and another was asked for meanwhile: start it.
    Again,
}

/// Totals of the protected-session bookkeeping, for metrics and status.
#[derive(Debug, Default, Clone)]
pub struct ProtectionStats {
    /// Sessions moved into the protected map because a new table would move them.
    pub kept: u64,
    /// Protected sessions released by a later table (equal again, or backend gone).
    pub released: u64,
    /// Divergent sessions left in the LRU because the protected map was full.
    pub overflow: u64,
    /// Protected sessions deleted by sweeps (expired, backend gone).
    pub swept: u64,
    /// Protected sessions per service id, as last counted.
    pub per_service: BTreeMap<u32, usize>,
}

/// The one writer of the pinned maps.
pub struct Writer {
    maps: PinnedMaps,
    held: Held,
    /// The config last written (its backend records at least).
    effective: Config,
    service_ids: BTreeMap<String, u32>,
    backend_ids: HashMap<BackendRef, u32>,
    /// The last write to the kernel failed (why): reconcile retries it.
    dirty: Option<String>,
    /// Differences reconcile found and repaired, by what.
    repairs: BTreeMap<&'static str, u64>,
    /// Writes to the kernel that failed.
    write_failures: u64,
    /// Compares run (each re-reads one service's tables, in turn).
    compares: u64,
    /// What protecting divergent sessions has done so far.
    protection: ProtectionStats,
    /// The apply under way, if its walks did not fit one [`WORK_BUDGET`].
    job: Option<Job>,
    /// The sweep of the protected map under way (never beside an apply).
    sweep: Option<dataplane::Sweeping>,
    /// Applies asked for; `done` and `failed` say how far they got.
    asked: u64,
    done: u64,
    failed: Option<(u64, String)>,
}

/// The state of each backend of `cfg`, by name.
fn states(cfg: &Config) -> HashMap<BackendRef, BackendState> {
    cfg.services
        .iter()
        .flat_map(|s| {
            s.backends.iter().map(move |b| {
                (
                    BackendRef {
                        service: s.name.clone(),
                        backend: b.name.clone(),
                    },
                    b.state,
                )
            })
        })
        .collect()
}

impl Writer {
    /// The writer of `maps`; `effective` is what they are taken to hold.
    pub fn new(maps: PinnedMaps, held: Held, effective: Config) -> Self {
        Self {
            maps,
            held,
            effective,
            service_ids: BTreeMap::new(),
            backend_ids: HashMap::new(),
            dirty: None,
            repairs: BTreeMap::new(),
            write_failures: 0,
            compares: 0,
            protection: ProtectionStats::default(),
            job: None,
            sweep: None,
            asked: 0,
            done: 0,
            failed: None,
        }
    }

    /// The maps, to read.
    pub fn maps(&self) -> &PinnedMaps {
        &self.maps
    }

    /// The maps, to write sessions (cluster imports) between applies.
    pub fn maps_mut(&mut self) -> &mut PinnedMaps {
        &mut self.maps
    }

    /// The config last written.
    pub fn effective(&self) -> &Config {
        &self.effective
    }

    /// Service ids by name, as the last apply assigned them.
    pub fn service_ids(&self) -> &BTreeMap<String, u32> {
        &self.service_ids
    }

    /// Backend ids, as the last apply assigned them.
    pub fn backend_ids(&self) -> &HashMap<BackendRef, u32> {
        &self.backend_ids
    }

    /// Why the last write failed, while it is not repaired.
    pub fn dirty(&self) -> Option<&str> {
        self.dirty.as_deref()
    }

    /// Repairs made by reconcile, by what.
    pub fn repairs(&self) -> &BTreeMap<&'static str, u64> {
        &self.repairs
    }

    /// Writes to the kernel that failed since start.
    pub fn write_failures(&self) -> u64 {
        self.write_failures
    }

    /// Totals of the protected-session bookkeeping.
    pub fn protection(&self) -> &ProtectionStats {
        &self.protection
    }

    /// A backend's name by id (`#id` if unknown).
    pub fn backend_name(&self, id: u32) -> String {
        self.backend_ids
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(r, _)| r.to_string())
            .unwrap_or_else(|| format!("#{id}"))
    }

    /// Service records by service id (port-0 fragment entries of older builds left out).
    pub fn service_records(&self) -> Result<HashMap<u32, Service>> {
        let mut out = HashMap::new();
        for entry in self.maps.services.iter() {
            let (key, svc) = entry.context("reading the service map")?;
            if key.port != 0 {
                out.insert(svc.id, svc);
            }
        }
        Ok(out)
    }

    /// The live Maglev table's answer for a masked client.
    pub fn maglev_choice(&self, record: &Service, masked: &[u32; 4]) -> Result<u32> {
        let slot = maglev::slot(masked, record.table_size);
        let base = record.maglev_base[(record.active_slot & 1) as usize];
        self.maps
            .maglev
            .get(&(base + slot), 0)
            .context("reading the Maglev table")
    }

    /// Counts one apply asked for; returns its generation.
    pub fn ask(&mut self) -> u64 {
        self.asked += 1;
        self.asked
    }

    /// Applies asked for so far (see [`Writer::outcome`]).
    pub fn asked(&self) -> u64 {
        self.asked
    }

    /// Whether an apply is under way.
    pub fn applying(&self) -> bool {
        self.job.is_some()
    }

    /// Whether an apply or a sweep is under way (the owner then calls `work`).
    pub fn busy(&self) -> bool {
        self.job.is_some() || self.sweep.is_some()
    }

    /// How the `generation`th apply ended: `None` while it is under way or
    /// waiting, `Err` with why if writing it failed.
    pub fn outcome(&self, generation: u64) -> Option<Result<(), String>> {
        if self.done >= generation {
            return Some(Ok(()));
        }
        if let Some((failed, why)) = &self.failed {
            if *failed >= generation {
                return Some(Err(why.clone()));
            }
        }
        // Nothing under way and not done: nothing to wait for.
        self.job.is_none().then_some(Ok(()))
    }

    /// What the apply under way is doing, if one is.
    pub fn doing(&self) -> Option<String> {
        let job = self.job.as_ref()?;
        Some(match (&job.staged, &job.rewrite) {
            (Some(staged), _) => staged.doing(),
            (None, Some(rw)) => format!(
                "moving the clients of unusable backends ({} sessions read)",
                rw.seen()
            ),
            (None, None) => "done".into(),
        })
    }

    fn failed_write(&mut self, e: &anyhow::Error) {
        let why = format!("{e:#}");
        self.write_failures += 1;
        self.dirty = Some(why.clone());
        self.failed = Some((self.asked, why));
    }

    /// While an apply is under way: `cfg`'s backend records now, and the
    /// whole of it once the apply under way ends.
    pub fn write_records(&mut self, cfg: &Config, hops: &Hops) -> Result<()> {
        if let Some(job) = &mut self.job {
            job.again = true;
        }
        let ids: BTreeMap<(String, String), u32> = self
            .backend_ids
            .iter()
            .map(|(r, id)| ((r.service.clone(), r.backend.clone()), *id))
            .collect();
        match dataplane::write_records(&mut self.maps, cfg, hops, &ids) {
            Ok(0) => Ok(()),
            Ok(n) => {
                tracing::info!(
                    records = n,
                    "wrote {n} backend records at once; their tables follow when the apply under way \
                     ({}) is done",
                    self.doing().unwrap_or_default()
                );
                Ok(())
            }
            Err(e) => {
                self.write_failures += 1;
                self.dirty = Some(format!("{e:#}"));
                Err(e.context("writing backend records (reconcile will retry)"))
            }
        }
    }

    /// Starts writing `cfg` (steps 1 and 2: its backend records are live when
    /// this returns); the clients of `entered` services (just in panic mode)
    /// are re-spread and those of backends that go down move, in `work`.
    pub fn start(&mut self, cfg: Config, hops: &Hops, entered: Vec<String>) -> Result<()> {
        let started = Instant::now();
        let generation = self.asked;
        // A sweep clears flags an apply is about to need: it starts again later.
        self.sweep = None;
        let before = states(&self.effective);
        let staged = match dataplane::prepare(&mut self.maps, &cfg, hops) {
            Ok(s) => s,
            Err(e) => {
                self.failed_write(&e);
                return Err(e.context("writing the dataplane (reconcile will retry)"));
            }
        };
        let report = staged.report();
        self.service_ids = report.service_ids.clone();
        self.backend_ids = report
            .backend_ids
            .iter()
            .map(|((s, b), id)| {
                (
                    BackendRef {
                        service: s.clone(),
                        backend: b.clone(),
                    },
                    *id,
                )
            })
            .collect();
        let newly_down: HashSet<u32> = states(&cfg)
            .iter()
            .filter(|(r, s)| {
                **s == BackendState::Down
                    && before.get(*r).is_some_and(|b| *b != BackendState::Down)
            })
            .filter_map(|(r, _)| self.backend_ids.get(r).copied())
            .collect();
        // Entering panic mode: every backend is failing, so no session is
        // worth more than another. The failures leading here moved each
        // dead backend's clients onto the survivors, crowding them all onto
        // the last to fail; every session goes back to its Maglev choice
        // over all backends, so whichever recover find their clients spread.
        let respread: HashSet<u32> = self
            .backend_ids
            .iter()
            .filter(|(r, _)| entered.contains(&r.service))
            .map(|(_, id)| *id)
            .collect();
        self.effective = cfg;
        self.job = Some(Job {
            staged: Some(staged),
            rewrite: None,
            newly_down,
            respread,
            entered,
            again: false,
            generation,
            started,
        });
        Ok(())
    }

    /// Goes on with the apply (or else the sweep) under way for about
    /// `budget` sessions read. On failure the daemon is dirty.
    pub fn work(&mut self, budget: usize) -> Result<Progress> {
        let Some(mut job) = self.job.take() else {
            self.sweep_for(budget)?;
            return Ok(Progress::Working);
        };
        match self.advance(&mut job, budget) {
            Ok(false) => {
                self.job = Some(job);
                Ok(Progress::Working)
            }
            Ok(true) => {
                self.done = job.generation;
                if self.dirty.take().is_some() {
                    tracing::info!("the kernel matches the desired state again");
                }
                Ok(if job.again {
                    Progress::Again
                } else {
                    Progress::Working
                })
            }
            Err(e) => {
                self.failed_write(&e);
                Err(e.context("writing the dataplane (reconcile will retry)"))
            }
        }
    }

    /// Takes `job` on by about `budget` sessions; true once it is complete.
    fn advance(&mut self, job: &mut Job, budget: usize) -> Result<bool> {
        if let Some(staged) = &mut job.staged {
            if !staged.step(&mut self.maps, budget)? {
                return Ok(false);
            }
            if let Some(staged) = job.staged.take() {
                self.finished_tables(&staged.into_report(), job.started.elapsed());
            }
            let ids: HashSet<u32> = job.newly_down.union(&job.respread).copied().collect();
            if !ids.is_empty() {
                job.rewrite = Some(dataplane::Rewrite::new(&self.maps, ids)?);
            }
        }
        if let Some(rw) = &mut job.rewrite {
            if !rw.step(&mut self.maps, budget)? {
                return Ok(false);
            }
            let moved = rw.moved().clone();
            job.rewrite = None;
            if !job.entered.is_empty() {
                let n: u64 = job.respread.iter().filter_map(|id| moved.get(id)).sum();
                tracing::warn!(
                    services = ?job.entered,
                    sessions = n,
                    "panic mode: sessions re-spread to their Maglev choice over all backends"
                );
            }
            for id in &job.newly_down {
                let name = self.backend_name(*id);
                tracing::info!(
                    backend = %name,
                    moved = moved.get(id).copied().unwrap_or(0),
                    took = ?job.started.elapsed(),
                    "moved the clients of {name} to their Maglev choice"
                );
            }
        }
        Ok(true)
    }

    /// Logs (and accounts for) what the table part of an apply did.
    fn finished_tables(&mut self, report: &dataplane::ApplyReport, took: Duration) {
        self.note_protection(report);
        if report.backends_removed > 0 || report.services_removed > 0 {
            tracing::info!(
                backends_removed = report.backends_removed,
                services_removed = report.services_removed,
                sessions_removed = report.sessions_removed,
                "removed from the dataplane"
            );
        }
        if took >= SLOW_APPLY {
            // What an operator with millions of sessions wants to see.
            tracing::info!(
                tables = ?report.tables_written,
                took_ms = took.as_millis() as u64,
                scanned = report.sessions_scanned,
                scan_ms = report.scan_took.as_millis() as u64,
                "new tables live after {took:?}: the divergent scan read {} sessions in {:?} \
                 (other work served between its chunks)",
                report.sessions_scanned,
                report.scan_took
            );
        } else {
            tracing::debug!(
                tables = ?report.tables_written,
                backends_written = report.backends_written,
                took = ?took,
                "applied"
            );
        }
    }

    /// Accounts for (and logs) what an apply did to protect sessions.
    fn note_protection(&mut self, report: &dataplane::ApplyReport) {
        let Some(p) = &report.protection else {
            return;
        };
        let stats = &mut self.protection;
        stats.kept += p.kept as u64;
        stats.released += p.released as u64;
        stats.overflow += p.overflow as u64;
        stats.per_service = p.per_service.clone();
        if p.kept > 0 || p.released > 0 {
            tracing::info!(
                services = ?report.tables_written,
                protected = p.kept,
                released = p.released,
                total_protected = p.per_service.values().sum::<usize>(),
                "new Maglev tables: protected the sessions they would move (their backend \
                 differs from the new answer), released those they no longer move"
            );
        }
    }

    /// Compares the kernel with the config last written and rewrites what
    /// someone else changed (records, tables: one service's tables are
    /// re-read from the kernel a run, in turn); returns the repairs.
    pub fn compare(&mut self, hops: &Hops) -> Result<u64> {
        // What a sweep under way read may be stale after this write.
        self.sweep = None;
        self.compares += 1;
        // One service's tables a run (about 28 ms each), in turn: a table
        // rewritten by someone else is found within one round of the
        // services, and the owner never stops for all of them at once
        // (seconds at 256 services).
        let ids: Vec<u32> = self.service_ids.values().copied().collect();
        if !ids.is_empty() {
            let turn = usize::try_from(self.compares).unwrap_or(0) % ids.len();
            self.maps.forget_table(ids[turn]);
        }
        let report = match dataplane::apply_with(&mut self.maps, &self.effective, hops) {
            Ok(r) => r,
            Err(e) => {
                self.write_failures += 1;
                self.dirty = Some(format!("{e:#}"));
                return Err(e.context("reconcile: writing the dataplane"));
            }
        };
        self.note_protection(&report);
        let found = [
            ("backend", report.backends_written as u64),
            ("table", report.tables_written.len() as u64),
            ("service", report.services_written as u64),
            (
                "stale",
                (report.backends_removed + report.services_removed) as u64,
            ),
        ];
        let mut fixed = 0;
        for (what, n) in found {
            if n > 0 {
                tracing::warn!(
                    repaired = n,
                    "reconcile: {n} {what} entries in the kernel differed from the desired state \
                     (written by another program?) and were rewritten"
                );
                self.count_repair(what, n);
                fixed += n;
            }
        }
        Ok(fixed)
    }

    /// Starts a sweep of the protected sessions (expired, or backend gone;
    /// services left without any lose their protected flag), which `work`
    /// runs a chunk at a time; one under way is left to go on.
    pub fn start_sweep(&mut self) -> Result<()> {
        if self.sweep.is_some() || self.job.is_some() {
            // Never beside an apply: the next reconcile sweeps.
            return Ok(());
        }
        let mut keyed = Vec::new();
        for entry in self.maps.services.iter() {
            let (key, svc) = entry.context("reading the service map")?;
            if key.port != 0 {
                keyed.push((key, svc));
            }
        }
        let backends = self.maps.backend_records()?;
        self.sweep = Some(dataplane::Sweeping::new(keyed, backends, monotonic_ns()));
        Ok(())
    }

    /// Takes the sweep under way on by about `budget` protected sessions.
    fn sweep_for(&mut self, budget: usize) -> Result<()> {
        let Some(mut run) = self.sweep.take() else {
            return Ok(());
        };
        if !run
            .step(&mut self.maps, budget)
            .context("sweeping the protected session map")?
        {
            self.sweep = Some(run);
            return Ok(());
        }
        let sweep = run
            .finish(&mut self.maps)
            .context("sweeping the protected session map")?;
        if sweep.deleted > 0 || !sweep.cleared.is_empty() {
            tracing::info!(
                deleted = sweep.deleted,
                services_without_protected = sweep.cleared.len(),
                "swept protected sessions that expired or lost their backend"
            );
        }
        self.protection.swept += sweep.deleted as u64;
        self.protection.per_service = sweep.per_service;
        Ok(())
    }

    /// Counts `n` repairs of `what`.
    pub fn count_repair(&mut self, what: &'static str, n: u64) {
        *self.repairs.entry(what).or_default() += n;
    }

    /// Puts back what someone removed of the pin directory, its lock and
    /// the pins (`pin_guard.rs`); returns how many were put back.
    pub fn repair_pins(&mut self) -> Result<u64> {
        let fixed = self.held.repair()?;
        for what in &fixed {
            self.count_repair(what, 1);
        }
        Ok(fixed.len() as u64)
    }

    /// Before exiting: make sure the link stays pinned, so the dataplane
    /// keeps forwarding without the daemon.
    pub fn shutdown(&mut self) {
        if let Some(doing) = self.doing() {
            tracing::warn!("exiting with an apply under way ({doing}): the next start finishes it");
        }
        match self.repair_pins() {
            Ok(0) => {}
            Ok(n) => tracing::warn!("re-created {n} missing pins before exiting"),
            Err(e) => tracing::error!(
                "could not make sure the XDP link stays pinned ({e:#}); the program may be detached when this process exits"
            ),
        }
    }

    /// Deletes the sessions of service id `sid` (all if `None`) whose
    /// backend is one of `bids` (any if `None`); returns how many. No apply
    /// may be under way (it could protect sessions deleted here).
    pub fn flush(&mut self, sid: Option<u32>, bids: Option<&HashSet<u32>>) -> Result<usize> {
        let mut n = 0;
        let mut cursor = self.maps.session_cursor();
        while let Some((protected, chunk)) = cursor.next_chunk(&self.maps)? {
            let doomed: Vec<AffinityKey> = chunk
                .into_iter()
                .filter(|(key, value)| {
                    sid.is_none_or(|id| key.service_id == id)
                        && bids.is_none_or(|ids| ids.contains(&value.backend_id))
                })
                .map(|(key, _)| key)
                .collect();
            n += crate::bpf_batch::delete_keys(self.maps.session_map(protected), &doomed)
                .context("deleting sessions")?;
        }
        Ok(n)
    }
}
