//! Writing the desired config into the pinned maps, touching only what
//! differs from what is there.
//!
//! The order is what keeps sessions correct if a write fails half-way:
//! 1. backend records that are new or changed (new ids never reuse an id
//!    that is still occupied, so no session can point at them yet);
//! 2. each changed service's Maglev table into its idle slot; the sessions
//!    the new table makes divergent are copied into the protected map
//!    (`protect`), before any packet can see the new table;
//! 3. service records that are new or changed, which flips the live slot
//!    (and sets `SERVICE_F_PROTECTED`); then records of services gone from
//!    the config are removed, and the LRU copies of the sessions just
//!    protected are deleted;
//! 4. affinity entries of removed services and backends are deleted (those
//!    of a backend moved off the reserved id 0 are rewritten to its new id);
//! 5. only then are the removed backends' slots cleared, freeing their ids.
//!
//! A failure anywhere leaves the removed backends' slots occupied, so no
//! later apply hands their ids out before their sessions are gone; the next
//! apply finds them still there and repeats steps 4 and 5.
//!
//! Backend id 0 is reserved (`lb_common::RESERVED_BACKEND_ID`): the kernel
//! reads 0 from a never-written Maglev slot. A dataplane pinned by an older
//! xlb may hold a backend there; it is moved like this: a copy of the record
//! at a fresh id (1), tables naming the new id (2, 3), its sessions
//! rewritten to the new id (4; until then they still reach it at 0, which
//! stays active), slot 0 cleared (5). No session of it is lost, and a
//! failure at any step leaves slot 0 occupied, so the next apply repeats it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_common::{
    ADMIT_WINDOW_NS, Affinity, AffinityKey, BACKEND_CAPACITY, BACKEND_EMPTY, Backend, FAMILY_V4,
    FIRST_BACKEND_ID, FORWARD_DSR_L2, FORWARD_IPIP, MAX_BACKENDS, NO_BACKEND, RESERVED_BACKEND_ID,
    SERVICE_F_PROTECTED, Service, ServiceKey, prefix_mask,
};

use super::{
    egress::{self, Hops},
    keys::{ServiceKeyOrd, addr_words, family, service_key},
    protect::{self, NewTable, Protection},
    tables::{Placement, Plan, TableInputs},
};
use crate::{
    bpf_batch,
    config::{Config, ForwardMode, ServiceConfig},
    pins::PinnedMaps,
};

/// What `apply` changed, for the operator, and the ids it assigned.
#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    /// Services in the config (all now in the map).
    pub services: usize,
    /// Backends in the config (all now in the map).
    pub backends: usize,
    /// Services whose key was already in the map (ids kept).
    pub services_kept: usize,
    /// Services removed because the config no longer has them.
    pub services_removed: usize,
    /// Backends removed because the config no longer has them.
    pub backends_removed: usize,
    /// Affinity entries deleted because their service or backend was removed.
    pub sessions_removed: usize,
    /// Backends moved off the reserved id 0 (left there by an older xlb).
    pub backends_moved: usize,
    /// Affinity entries rewritten from id 0 to their backend's new id.
    pub sessions_moved: usize,
    /// Service id per service name.
    pub service_ids: BTreeMap<String, u32>,
    /// Backend id per (service name, backend name).
    pub backend_ids: BTreeMap<(String, String), u32>,
    /// Names of the services whose Maglev table was written (swapped) by this apply.
    pub tables_written: Vec<String>,
    /// Maglev entries written (only those that differed from the slot's content).
    pub table_entries_written: usize,
    /// Backend records written (new or changed).
    pub backends_written: usize,
    /// Service records written (new or changed).
    pub services_written: usize,
    /// Egress entries written (new or changed).
    pub egress_written: usize,
    /// What protecting the sessions made divergent by the new tables did
    /// (None when no table of an existing service changed).
    pub protection: Option<Protection>,
    /// LRU sessions the divergent scan read (0: no table of an existing service changed).
    pub sessions_scanned: usize,
    /// Wall time of the divergent scan, other work between its chunks included.
    pub scan_took: std::time::Duration,
}

/// Writes `config` into the pinned maps, keeping the ids (and so the
/// sessions) of services and backends that already exist, and writing only
/// what differs: a service whose table is unchanged is not touched, a
/// changed table goes into the idle slot in one syscall and is made live by
/// one update of the service record, so no packet sees a half-written table.
pub fn apply(maps: &mut PinnedMaps, config: &Config) -> Result<ApplyReport> {
    apply_with(maps, config, &Hops::new())
}

/// [`apply`] with resolved next hops: a backend without a MAC in the config
/// gets its resolved one (all-zero while unresolved: the kernel then drops
/// its frames, counted), and `ipip` backends get their egress entries.
/// All steps at once: for callers without a mailbox to serve meanwhile.
pub fn apply_with(maps: &mut PinnedMaps, config: &Config, hops: &Hops) -> Result<ApplyReport> {
    let mut staged = prepare(maps, config, hops)?;
    while !staged.step(maps, usize::MAX)? {}
    Ok(staged.into_report())
}

/// Steps 1 and 2 of an apply (ids, egress, backend records, each changed
/// table into its idle slot); the rest, with its walks of the sessions, is
/// left to [`Staged::step`]. The backend records are live when this
/// returns: a backend that went down is down in the kernel already.
pub fn prepare(maps: &mut PinnedMaps, config: &Config, hops: &Hops) -> Result<Staged> {
    let table_size = config.maglev_table_size;
    let capacity = maps.maglev.len();
    let mut report = ApplyReport {
        services: config.services.len(),
        backends: config.services.iter().map(|s| s.backends.len()).sum(),
        ..ApplyReport::default()
    };

    // What is there now: service records by key, and every backend slot
    // (one batch read). Port 0 is never a service: an entry there is the
    // fragment entry of an older xlb, deleted below.
    let mut current: BTreeMap<ServiceKeyOrd, Service> = BTreeMap::new();
    let mut legacy_frag: Vec<ServiceKey> = Vec::new();
    for entry in maps.services.iter() {
        let (key, svc) = entry.context("reading the service map")?;
        if key.port != 0 {
            current.insert(ServiceKeyOrd(key), svc);
        } else {
            legacy_frag.push(key);
        }
    }
    let live = maps.backend_records()?;
    let mut existing: BTreeSet<u32> = BTreeSet::new();
    let mut by_addr: HashMap<(u32, [u32; 4]), u32> = HashMap::new();
    for (id, be) in (0u32..).zip(&live) {
        if be.state != BACKEND_EMPTY {
            existing.insert(id);
            if id == RESERVED_BACKEND_ID {
                // Never kept: the backend gets a fresh id (see the module doc).
                continue;
            }
            by_addr
                .entry((u32::from(be.service_id), be.addr))
                .or_insert(id);
        }
    }

    // Service ids: keep existing; new services get the lowest id that no
    // record holds, so the region of a service removed in this same apply
    // (live until its record goes) is not written into. Only when every id
    // is held does a new service take the id of one being removed; that
    // one is then taken out (record, sessions) before its region is reused.
    let wanted: Vec<(ServiceKey, &ServiceConfig)> = config
        .services
        .iter()
        .map(|s| (service_key(s), s))
        .collect();
    let held: BTreeSet<u32> = current.values().map(|s| s.id).collect();
    let mut used_ids: BTreeSet<u32> = BTreeSet::new();
    let mut service_ids = Vec::with_capacity(wanted.len());
    for (key, _) in &wanted {
        let id = current.get(&ServiceKeyOrd(*key)).map(|s| s.id);
        if let Some(id) = id {
            used_ids.insert(id);
            report.services_kept += 1;
        }
        service_ids.push(id);
    }
    let mut reused: BTreeSet<u32> = BTreeSet::new();
    let mut fresh_services = Vec::new();
    for id in service_ids.iter_mut() {
        if id.is_none() {
            let free = (0..config.max_services)
                .find(|i| !used_ids.contains(i) && !held.contains(i))
                .or_else(|| {
                    (0..config.max_services).find(|i| !used_ids.contains(i) && held.contains(i))
                })
                .ok_or_else(|| {
                    anyhow!("more services than max_services = {}", config.max_services)
                })?;
            if held.contains(&free) {
                reused.insert(free);
            }
            used_ids.insert(free);
            fresh_services.push(free);
            *id = Some(free);
        }
    }
    let service_ids: Vec<u32> = service_ids.into_iter().flatten().collect();
    for id in &service_ids {
        let end = (u64::from(*id) * 2 + 2) * u64::from(table_size);
        if end > u64::from(capacity) {
            bail!(
                "service id {id} needs Maglev entries up to {end} but the pinned map holds {capacity}: \
                 max_services or maglev_table_size changed; run `xlb detach` first"
            );
        }
    }

    // Backend ids: keep (service id, address) -> id; new ones take free
    // slots. An occupied slot is never handed out, so an id being removed
    // here is not reused before its sessions are deleted and it is cleared.
    let mut backend_ids: Vec<Vec<u32>> = Vec::with_capacity(wanted.len());
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let mut pending = Vec::new();
    for (si, (_, svc)) in wanted.iter().enumerate() {
        let mut ids = Vec::with_capacity(svc.backends.len());
        // A reused service id's backends belong to the service leaving.
        let fresh = reused.contains(&service_ids[si]);
        for (bi, be) in svc.backends.iter().enumerate() {
            match by_addr
                .get(&(service_ids[si], addr_words(be.address)))
                .filter(|_| !fresh)
            {
                Some(id) if taken.insert(*id) => ids.push(*id),
                _ => {
                    pending.push((si, bi));
                    ids.push(NO_BACKEND);
                }
            }
        }
        backend_ids.push(ids);
    }
    let mut free = (FIRST_BACKEND_ID..MAX_BACKENDS)
        .filter(|i| !taken.contains(i) && !existing.contains(i))
        .collect::<Vec<_>>()
        .into_iter();
    let mut fresh_backends = Vec::new();
    for (si, bi) in pending {
        let id = free
            .next()
            .ok_or_else(|| anyhow!("more than {BACKEND_CAPACITY} backends in total"))?;
        backend_ids[si][bi] = id;
        taken.insert(id);
        fresh_backends.push(id);
    }
    // The kernel counts traffic per id: an id handed out again starts at
    // zero, not with the counts of whoever held it before.
    zero_counters(&mut maps.service_stats, &fresh_services, "service");
    zero_counters(&mut maps.backend_stats, &fresh_backends, "backend");
    let removed_backends: BTreeSet<u32> = existing.difference(&taken).copied().collect();
    // A backend at the reserved id that the config still has: (service id,
    // its new id). Its sessions follow it in step 4.
    let legacy = live
        .get(RESERVED_BACKEND_ID as usize)
        .filter(|b| b.state != BACKEND_EMPTY)
        .and_then(|b| {
            let sid = u32::from(b.service_id);
            wanted.iter().enumerate().find_map(|(si, (_, svc))| {
                (service_ids[si] == sid && !reused.contains(&sid))
                    .then(|| {
                        svc.backends
                            .iter()
                            .position(|be| addr_words(be.address) == b.addr)
                            .map(|bi| (sid, backend_ids[si][bi]))
                    })
                    .flatten()
            })
        });
    for (si, (_, svc)) in wanted.iter().enumerate() {
        report.service_ids.insert(svc.name.clone(), service_ids[si]);
        for (bi, be) in svc.backends.iter().enumerate() {
            report
                .backend_ids
                .insert((svc.name.clone(), be.name.clone()), backend_ids[si][bi]);
        }
    }

    // 1. Egress entries, then backend records that differ from their slot.
    let mut egress_wanted = Vec::new();
    for (si, (_, svc)) in wanted.iter().enumerate() {
        for (bi, be) in svc.backends.iter().enumerate() {
            egress_wanted.push((
                backend_ids[si][bi],
                egress::egress_of(config, svc, be, hops),
            ));
        }
    }
    report.egress_written = egress::write(maps, &egress_wanted)?;
    let mut be_keys = Vec::new();
    let mut be_values = Vec::new();
    for (si, (_, svc)) in wanted.iter().enumerate() {
        let service_id = u16::try_from(service_ids[si]).context("service id exceeds u16")?;
        for (bi, be) in svc.backends.iter().enumerate() {
            let id = backend_ids[si][bi];
            let record = backend_record(be, service_id, hops);
            if live.get(id as usize) != Some(&record) {
                be_keys.push(id);
                be_values.push(record);
            }
        }
    }
    bpf_batch::update_array(&mut maps.backends, &be_keys, &be_values)
        .context("writing backend records")?;
    report.backends_written = be_keys.len();

    // A reused id: the service leaving it goes first (its records, then
    // its sessions), so no packet reads the region while it is rewritten.
    if !reused.is_empty() {
        let leaving: Vec<ServiceKeyOrd> = current
            .iter()
            .filter(|(_, r)| reused.contains(&r.id))
            .map(|(k, _)| *k)
            .collect();
        for key in leaving {
            maps.services
                .remove(&key.0)
                .context("removing a service whose id is reused")?;
            current.remove(&key);
            report.services_removed += 1;
        }
        let mut purge = Purge::new(reused.clone(), BTreeSet::new());
        while !purge.step(maps, usize::MAX)? {}
        report.sessions_removed += purge.removed;
        for id in &reused {
            maps.known_tables.forget(*id);
        }
    }

    // 2. Tables that changed, into their idle slot.
    let mut live_slot: Vec<u32> = Vec::with_capacity(wanted.len());
    let mut new_tables: Vec<(u32, std::sync::Arc<[u32]>, u64)> = Vec::new();
    for (si, (key, svc)) in wanted.iter().enumerate() {
        let id = service_ids[si];
        let old = current.get(&ServiceKeyOrd(*key));
        let inputs = TableInputs::of(svc, &backend_ids[si], table_size);
        let plan = maps
            .known_tables
            .plan(&maps.maglev, id, old, &inputs)
            .with_context(|| format!("comparing the Maglev table of service {}", svc.name))?;
        match plan {
            Plan::Keep => live_slot.push(old.map_or(0, |r| r.active_slot & 1)),
            Plan::Write {
                slot,
                both,
                table,
                inputs,
            } => {
                report.table_entries_written += maps
                    .known_tables
                    .write(&mut maps.maglev, id, slot, both, &table, &inputs)
                    .with_context(|| format!("writing the Maglev table of service {}", svc.name))?;
                report.tables_written.push(svc.name.clone());
                live_slot.push(slot);
                if old.is_some() {
                    let timeout = svc.affinity_timeout_ns();
                    new_tables.push((id, table, timeout));
                }
            }
        }
    }

    // The sessions the new tables make divergent are protected before any
    // packet sees those tables (`Stage::Scan`). Backends as they are once
    // this apply is done.
    let stage = if new_tables.is_empty() {
        Stage::Flip
    } else {
        let mut after = live.clone();
        for (id, record) in be_keys.iter().zip(&be_values) {
            if let Some(slot) = after.get_mut(*id as usize) {
                *slot = *record;
            }
        }
        for id in &removed_backends {
            if let Some(slot) = after.get_mut(*id as usize) {
                *slot = Backend::default();
            }
        }
        let tables: Vec<NewTable> = new_tables
            .into_iter()
            .map(|(service_id, table, timeout_ns)| NewTable {
                service_id,
                table,
                timeout_ns,
            })
            .collect();
        Stage::Scan(
            protect::Scan::new(maps, tables, after, crate::sessions::monotonic_ns())
                .context("protecting the sessions the new Maglev tables make divergent")?,
        )
    };
    let records = wanted
        .iter()
        .enumerate()
        .map(|(si, (key, svc))| {
            (
                *key,
                service_record(svc, service_ids[si], table_size, live_slot[si]),
                svc.name.clone(),
            )
        })
        .collect();
    Ok(Staged {
        report,
        stage,
        records,
        current,
        legacy_frag,
        removed_backends,
        legacy,
        live_ids: service_ids.iter().copied().collect(),
        pending: None,
        removed_services: BTreeSet::new(),
        prepared: std::time::Instant::now(),
    })
}

/// An apply under way: [`prepare`] has written the backend records and the
/// new tables into their idle slots; [`Staged::step`] does the rest, a
/// bounded piece at a time, so whoever drives it can do other work between
/// pieces. An error ends it: the caller drops it, and the next apply finds
/// whatever it left (occupied slots, idle tables) and repeats it.
pub struct Staged {
    report: ApplyReport,
    stage: Stage,
    /// Every wanted service record, by key, with the service's name (the
    /// protected flag is decided at the flip).
    records: Vec<(ServiceKey, Service, String)>,
    current: BTreeMap<ServiceKeyOrd, Service>,
    legacy_frag: Vec<ServiceKey>,
    removed_backends: BTreeSet<u32>,
    legacy: Option<(u32, u32)>,
    live_ids: BTreeSet<u32>,
    pending: Option<protect::Pending>,
    /// Services the flip removed (their sessions are purged).
    removed_services: BTreeSet<u32>,
    /// When `prepare` finished: the divergent scan starts then.
    prepared: std::time::Instant,
}

/// What is left of a [`Staged`] apply.
enum Stage {
    /// Finding the sessions the new tables make divergent (a walk).
    Scan(protect::Scan),
    /// Writing the protected copies of those sessions (and releases).
    Protect(protect::Writing),
    /// Step 3: the service records, which make the new tables live.
    Flip,
    /// Deleting the LRU copies of the sessions just protected.
    Unprotect(protect::Pending),
    /// Step 4: deleting the sessions of removed services and backends (a walk).
    Purge(Purge),
    /// Step 5: freeing the removed backends' slots.
    Free,
    Done,
}

impl Staged {
    /// What the apply did so far; its ids are final from the start.
    pub fn report(&self) -> &ApplyReport {
        &self.report
    }

    /// What the apply did.
    pub fn into_report(self) -> ApplyReport {
        self.report
    }

    /// What it is doing now, for logs.
    pub fn doing(&self) -> String {
        match &self.stage {
            Stage::Scan(scan) => format!(
                "finding the sessions the new tables make divergent ({} read)",
                scan.seen()
            ),
            Stage::Protect(_) => "protecting the divergent sessions".into(),
            Stage::Flip => "making the new tables live".into(),
            Stage::Unprotect(_) => "deleting the LRU copies of protected sessions".into(),
            Stage::Purge(p) => format!(
                "deleting the sessions of removed services and backends ({} read)",
                p.cursor.seen()
            ),
            Stage::Free => "freeing removed backend ids".into(),
            Stage::Done => "done".into(),
        }
    }

    /// Goes on for about `budget` sessions read (whole chunks) and every
    /// step that walks nothing; true once the apply is complete.
    pub fn step(&mut self, maps: &mut PinnedMaps, budget: usize) -> Result<bool> {
        loop {
            self.stage = match std::mem::replace(&mut self.stage, Stage::Done) {
                Stage::Scan(mut scan) => {
                    if !scan.step(maps, budget)? {
                        self.stage = Stage::Scan(scan);
                        return Ok(false);
                    }
                    self.report.sessions_scanned = scan.seen();
                    self.report.scan_took = self.prepared.elapsed();
                    Stage::Protect(scan.into_writing())
                }
                Stage::Protect(mut writing) => {
                    if !writing
                        .step(maps, budget)
                        .context("protecting the sessions the new Maglev tables make divergent")?
                    {
                        self.stage = Stage::Protect(writing);
                        return Ok(false);
                    }
                    let (protection, pending) = writing.finish();
                    self.report.protection = Some(protection);
                    self.pending = Some(pending);
                    Stage::Flip
                }
                Stage::Flip => {
                    self.flip(maps)?;
                    match self.pending.take() {
                        Some(pending) => Stage::Unprotect(pending),
                        None => self.after_unprotect(maps)?,
                    }
                }
                Stage::Unprotect(mut pending) => {
                    if !pending.step(maps, budget)? {
                        self.stage = Stage::Unprotect(pending);
                        return Ok(false);
                    }
                    self.after_unprotect(maps)?
                }
                Stage::Purge(mut purge) => {
                    if !purge.step(maps, budget)? {
                        self.stage = Stage::Purge(purge);
                        return Ok(false);
                    }
                    self.report.sessions_removed += purge.removed;
                    Stage::Free
                }
                Stage::Free => {
                    // 5. Free the removed backends' slots, now that nothing refers to them.
                    let gone: Vec<u32> = self.removed_backends.iter().copied().collect();
                    let empty = vec![Backend::default(); gone.len()];
                    bpf_batch::update_array(&mut maps.backends, &gone, &empty)
                        .context("clearing removed backends")?;
                    self.report.backends_removed = gone.len() - self.report.backends_moved;
                    Stage::Done
                }
                Stage::Done => return Ok(true),
            };
        }
    }

    /// Step 3: the service records, which make the new tables live.
    fn flip(&mut self, maps: &mut PinnedMaps) -> Result<()> {
        // 3. Service records that differ: this flips the changed tables live.
        for (key, record, name) in &mut self.records {
            let protected = match &self.report.protection {
                Some(p) => p.per_service.get(&record.id).is_some_and(|n| *n > 0),
                None => self
                    .current
                    .get(&ServiceKeyOrd(*key))
                    .is_some_and(|r| r.id == record.id && r.flags & SERVICE_F_PROTECTED != 0),
            };
            if protected {
                record.flags |= SERVICE_F_PROTECTED;
            }
            if self.current.get(&ServiceKeyOrd(*key)) != Some(record) {
                maps.services
                    .insert(*key, *record, 0)
                    .with_context(|| format!("writing service {name}"))?;
                maps.known_tables.flipped(record.id, record.active_slot);
                self.report.services_written += 1;
            }
        }
        let mut removed_services = BTreeSet::new();
        for (key, old) in &self.current {
            if !self
                .records
                .iter()
                .any(|(k, _, _)| ServiceKeyOrd(*k) == *key)
            {
                if !self.live_ids.contains(&old.id) {
                    removed_services.insert(old.id);
                }
                maps.services
                    .remove(&key.0)
                    .context("removing a service gone from the config")?;
                self.report.services_removed += 1;
            }
        }
        // The kernel never looks port 0 up (fragments use `XLB_FRAGS_V1`), so
        // an older xlb's fragment entries are dead weight holding a service id.
        for key in &self.legacy_frag {
            match maps.services.remove(key) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    return Err(e).context("removing a port-0 fragment entry of an older xlb");
                }
            }
        }
        for id in &removed_services {
            maps.known_tables.forget(*id);
        }
        self.removed_services = removed_services;
        Ok(())
    }

    /// Step 4, once the LRU copies of the protected sessions are gone.
    fn after_unprotect(&mut self, maps: &mut PinnedMaps) -> Result<Stage> {
        // 4. Sessions of removed services/backends would otherwise point at ids
        //    that a later config may give to someone else. Those of a backend
        //    leaving id 0 follow it first; whatever else points at 0 goes.
        if let Some((service_id, new_id)) = self.legacy {
            self.report.sessions_moved =
                move_sessions(maps, service_id, RESERVED_BACKEND_ID, new_id)?;
            self.report.backends_moved = 1;
        }
        Ok(
            if self.removed_services.is_empty() && self.removed_backends.is_empty() {
                Stage::Free
            } else {
                Stage::Purge(Purge::new(
                    std::mem::take(&mut self.removed_services),
                    self.removed_backends.clone(),
                ))
            },
        )
    }
}

/// Zeroes the per-CPU traffic counters of `ids` in `map`; a failure is
/// only logged (the counts are wrong, the forwarding is not).
fn zero_counters(
    map: &mut aya::maps::PerCpuArray<aya::maps::MapData, lb_common::TrafficStats>,
    ids: &[u32],
    what: &str,
) {
    if ids.is_empty() {
        return;
    }
    let cpus = match aya::util::nr_cpus() {
        Ok(n) => n,
        Err((_, e)) => {
            tracing::warn!("not zeroing the counters of new {what} ids: counting CPUs: {e}");
            return;
        }
    };
    for id in ids {
        let zeros =
            match aya::maps::PerCpuValues::try_from(vec![lb_common::TrafficStats::default(); cpus])
            {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("not zeroing the counters of {what} id {id}: {e}");
                    continue;
                }
            };
        if let Err(e) = map.set(*id, zeros, 0) {
            tracing::warn!("zeroing the counters of {what} id {id} failed: {e}");
        }
    }
}

/// The kernel's record of backend `be` of service id `service_id`.
fn backend_record(be: &crate::config::BackendConfig, service_id: u16, hops: &Hops) -> Backend {
    Backend {
        addr: addr_words(be.address),
        mac: egress::mac_of(be, hops),
        state: be.state.to_abi(),
        family: family(be.address),
        weight: be.weight,
        service_id,
    }
}

/// The backend records of `config`, written at once while an apply is
/// under way (a health transition must not wait for its walks): only for
/// backends the kernel already holds at the id `ids` names (same address;
/// its service id kept), so no id is handed out and nothing is removed.
/// Everything else (tables, new backends) waits for the next apply.
/// Returns how many records were written.
pub fn write_records(
    maps: &mut PinnedMaps,
    config: &Config,
    hops: &Hops,
    ids: &BTreeMap<(String, String), u32>,
) -> Result<usize> {
    let live = maps.backend_records()?;
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for svc in &config.services {
        for be in &svc.backends {
            let Some(id) = ids.get(&(svc.name.clone(), be.name.clone())) else {
                continue;
            };
            let Some(held) = live
                .get(*id as usize)
                .filter(|b| b.state != BACKEND_EMPTY && b.addr == addr_words(be.address))
            else {
                continue;
            };
            let record = backend_record(be, held.service_id, hops);
            if record != *held {
                keys.push(*id);
                values.push(record);
            }
        }
    }
    bpf_batch::update_array(&mut maps.backends, &keys, &values)
        .context("writing backend records")?;
    Ok(keys.len())
}

/// Rewrites the sessions (LRU and protected) of service `service_id` that
/// point at backend `from` to point at `to`; returns how many.
fn move_sessions(maps: &mut PinnedMaps, service_id: u32, from: u32, to: u32) -> Result<usize> {
    let mut moved = 0;
    for map in [&mut maps.affinity, &mut maps.protected] {
        let mut moving: Vec<(AffinityKey, Affinity)> = Vec::new();
        bpf_batch::visit_hash(map, |key, value| {
            if key.service_id == service_id && value.backend_id == from {
                moving.push((key, value));
            }
            Ok(())
        })
        .context("reading the sessions")?;
        for (key, value) in moving {
            let value = Affinity {
                backend_id: to,
                ..value
            };
            // BPF_EXIST: an entry evicted meanwhile stays gone (the client gets
            // its Maglev choice, which is this backend's new id or its peer's).
            const BPF_EXIST: u64 = 2;
            match map.insert(key, value, BPF_EXIST) {
                Ok(()) => moved += 1,
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("moving a session off the reserved backend id 0"),
            }
        }
    }
    Ok(moved)
}

/// Deletes the sessions (LRU and protected) of `services` and of
/// `backends`, a chunk at a time.
struct Purge {
    services: BTreeSet<u32>,
    backends: BTreeSet<u32>,
    cursor: crate::pins::SessionCursor,
    /// Sessions deleted so far.
    removed: usize,
}

impl Purge {
    fn new(services: BTreeSet<u32>, backends: BTreeSet<u32>) -> Self {
        Self {
            services,
            backends,
            cursor: crate::pins::SessionCursor::default(),
            removed: 0,
        }
    }

    /// Goes on for about `budget` sessions read; true once both maps are done.
    fn step(&mut self, maps: &mut PinnedMaps, budget: usize) -> Result<bool> {
        if self.services.is_empty() && self.backends.is_empty() {
            return Ok(true);
        }
        let mut left = budget.max(1);
        while let Some((protected, chunk)) = self.cursor.next_chunk(maps)? {
            left = left.saturating_sub(chunk.len());
            let doomed: Vec<AffinityKey> = chunk
                .into_iter()
                .filter(|(key, value)| {
                    self.services.contains(&key.service_id)
                        || self.backends.contains(&value.backend_id)
                })
                .map(|(key, _)| key)
                .collect();
            // Already gone (LRU eviction) is fine.
            self.removed += bpf_batch::delete_keys(maps.session_map(protected), &doomed)
                .context("deleting removed sessions")?;
            if left == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Admission budget per `ADMIT_WINDOW_NS` for a rate per second, rounded
/// up so that any non-zero rate admits something in every window.
fn admit_per_window(rate: u32) -> u32 {
    let windows_per_sec = 1_000_000_000 / ADMIT_WINDOW_NS;
    u32::try_from(u64::from(rate).div_ceil(windows_per_sec)).unwrap_or(u32::MAX)
}

/// The service record of `svc` with id `id`, its table live in `slot`.
fn service_record(svc: &ServiceConfig, id: u32, table_size: u32, slot: u32) -> Service {
    let bits = if family(svc.vip) == FAMILY_V4 {
        32
    } else {
        128
    };
    let prefix = if bits == 32 {
        svc.affinity_prefix_v4
    } else {
        svc.affinity_prefix_v6
    };
    let timeout_ns = svc.affinity_timeout_ns();
    Service {
        id,
        flags: 0,
        timeout_ns,
        // Refresh at 1/8 of the timeout, at most once a second: a hit
        // rarely writes, and an entry can never look idle for more than
        // 1/8 of the timeout longer than it really is.
        refresh_ns: (timeout_ns / 8).min(1_000_000_000),
        mask: prefix_mask(prefix, bits),
        maglev_base: Placement::for_id(id, table_size).base,
        table_size,
        active_slot: slot,
        prefix_v4: svc.affinity_prefix_v4,
        prefix_v6: svc.affinity_prefix_v6,
        forward_mode: match svc.forward_mode {
            ForwardMode::Dsr => FORWARD_DSR_L2,
            ForwardMode::Ipip => FORWARD_IPIP,
        },
        _pad: 0,
        admit_per_window: admit_per_window(svc.affinity_admit_rate),
    }
}
