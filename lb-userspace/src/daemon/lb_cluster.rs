//! [`Lb`]'s side of the cluster: what the replication task
//! (`clustering.rs`) asks of the owner of the maps. Every call is one
//! message to the owner thread, so the maps keep one writer.
//!
//! - [`Lb::propose`] runs a runtime change against a copy of the state
//!   (the same validation as alone) without applying it;
//! - [`Lb::prepare`] finds this node's sessions a new document would make
//!   divergent, by backend name (ids are each node's own);
//! - [`Lb::adopt`] makes a document live (state file, then kernel);
//! - [`Lb::import_sessions`] writes peers' sessions into the protected map,
//!   last writer (by last-seen) winning over what this node has;
//! - [`Lb::replicable`] lists the protected sessions for a full sync, or
//!   those seen since the last refresh.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use aya::maps::MapError;
use lb_common::{Affinity, AffinityKey, SERVICE_F_PROTECTED};

use super::lb::{BackendRef, Lb};
use super::state::State;
use crate::api::Request;
use crate::cluster::msg::{Doc, Hello, WireSession};
use crate::config::BackendState;
use crate::dataplane;
use crate::sessions::monotonic_ns;

/// Ids given to backends a prepared document adds, while they have none:
/// no session can hold them, so every session answered by one is divergent.
const PROVISIONAL_ID: u32 = 0x4000_0000;

/// A received copy of a session this node holds with the same backend is
/// written only if it was seen this much later (a refresh, not rounding).
const SAME_SLACK_NS: u64 = 1_000_000_000;

/// This node's cluster bookkeeping inside [`Lb`].
#[derive(Debug, Default)]
pub struct ClusterSide {
    /// Whether `[cluster]` is configured.
    pub enabled: bool,
    /// The adopted document's health verdict ("service/backend" held down);
    /// `None` until a document is adopted: the node's own checks rule.
    pub down: Option<BTreeSet<String>>,
    /// Whether the node has its peers' full sync (or waited them out).
    pub synced: bool,
    /// Set while [`Lb::propose`] runs: `change` stores instead of applying.
    pub proposing: bool,
    /// What the proposed change would make the state.
    pub proposal: Option<State>,
    /// Fingerprint of what the kernel was last given.
    pub fingerprint: String,
    /// Last-seen of each protected session at its last refresh.
    refreshed: HashMap<AffinityKey, u64>,
    /// Totals for metrics and `xlb cluster status`.
    pub totals: ImportTotals,
}

/// What importing peers' sessions did, since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportTotals {
    /// Sessions written into the protected map.
    pub imported: u64,
    /// Sessions this node already had, with the same backend (last-seen kept fresher).
    pub same: u64,
    /// Sessions that replaced this node's own different answer (theirs was newer).
    pub replaced: u64,
    /// Sessions dropped: this node's own different answer was newer.
    pub lost_to_local: u64,
    /// Sessions naming a service or backend this node lacks, or one not usable.
    pub unknown: u64,
    /// Sessions dropped because the protected map was full.
    pub full: u64,
}

/// A runtime change, checked but not applied.
#[derive(Debug, Clone)]
pub struct Proposal {
    /// The state it makes.
    pub state: State,
    /// What the CLI prints once it is live.
    pub text: String,
    /// Checked backends it adds: down cluster-wide until most nodes see them pass.
    pub start_down: Vec<String>,
}

/// "service/backend", the names the cluster agrees by.
pub fn backend_key(r: &BackendRef) -> String {
    format!("{}/{}", r.service, r.backend)
}

impl Lb {
    /// A backend's health as the desired state uses it: the cluster's
    /// verdict once a document is adopted, else this node's own checks.
    /// `None` for an unchecked backend.
    pub(super) fn health_of(&self, r: &BackendRef) -> Option<bool> {
        match &self.cluster.down {
            // Down by the cluster even before this node has a record (just added).
            Some(down) if down.contains(&backend_key(r)) => Some(false),
            Some(_) => self.health.get(r).map(|_| true),
            None => self.health.get(r).map(|h| h.up),
        }
    }

    /// Backend names by this node's ids.
    fn backend_names(&self) -> HashMap<u32, &str> {
        self.writer
            .backend_ids()
            .iter()
            .map(|(r, id)| (*id, r.backend.as_str()))
            .collect()
    }

    /// This node's heartbeat contents (the version is the task's).
    pub fn cluster_hello(&self) -> Result<Hello> {
        let health = self
            .health
            .iter()
            .map(|(r, h)| (backend_key(r), h.up))
            .collect();
        let mut draining = BTreeMap::new();
        let names: Vec<(BackendRef, u32)> = self
            .writer
            .backend_ids()
            .iter()
            .filter(|(r, _)| {
                self.state
                    .services
                    .get(&r.service)
                    .and_then(|s| s.admin.get(&r.backend))
                    .is_some_and(|a| matches!(a, super::state::Admin::Draining { .. }))
            })
            .map(|(r, id)| (r.clone(), *id))
            .collect();
        // Uncounted since the drain began: reported as sessions left, so no
        // coordinator ends the drain on a count from before it.
        let counts = self.counts().valid();
        for (r, id) in names {
            draining.insert(backend_key(&r), counts.map_or(u64::MAX, |c| c.of(id)));
        }
        Ok(Hello {
            fingerprint: self.cluster.fingerprint.clone(),
            synced: self.cluster.synced,
            health,
            draining,
            ..Hello::default()
        })
    }

    /// The runtime state this node runs (the document's, once adopted).
    pub fn cluster_state(&self) -> &State {
        &self.state
    }

    /// The applied fingerprint and the import totals, for `xlb cluster status`.
    pub fn cluster_info(&self) -> (String, ImportTotals) {
        (self.cluster.fingerprint.clone(), self.cluster.totals)
    }

    /// Checks a runtime change exactly as `xlb backend ...` alone would,
    /// and returns the state it makes, without applying it.
    pub fn propose(&mut self, req: Request) -> Result<Proposal> {
        self.cluster.proposing = true;
        self.cluster.proposal = None;
        let mut start_down = Vec::new();
        if let Request::BackendAdd {
            service,
            name,
            address,
            ..
        } = &req
            && self
                .effective_service(service)
                .is_some_and(|s| s.health.is_some())
        {
            let shown = name.clone().unwrap_or_else(|| address.to_string());
            start_down.push(format!("{service}/{shown}"));
        }
        let result = self.runtime_change(req);
        self.cluster.proposing = false;
        let text = result?;
        let Some(state) = self.cluster.proposal.take() else {
            // A change with nothing to replicate (an orphan removed locally).
            bail!("{text} (on this node only: nothing for the cluster to change)");
        };
        Ok(Proposal {
            state,
            text,
            start_down,
        })
    }

    /// The desired config under `doc`, as this node would write it.
    fn desired_under(&mut self, doc: &Doc) -> Result<crate::config::Config> {
        let state = std::mem::replace(&mut self.state, doc.state.clone());
        let down = self.cluster.down.replace(doc.down.clone());
        let result = self.desired_config(Instant::now());
        self.state = state;
        self.cluster.down = down;
        result
    }

    /// This node's live sessions that `doc`'s tables would answer with
    /// another backend, by name; each peer must hold them before it swaps.
    pub fn prepare(&mut self, doc: &Doc) -> Result<Vec<WireSession>> {
        let cfg = self.desired_under(doc)?;
        let size = self.base.maglev_table_size;
        let mut tables: HashMap<u32, (Vec<u32>, u64, String)> = HashMap::new();
        let mut usable: HashSet<u32> = HashSet::new();
        for svc in &cfg.services {
            let Some(&sid) = self.writer.service_ids().get(&svc.name) else {
                continue;
            };
            let mut ids = Vec::with_capacity(svc.backends.len());
            for (i, b) in svc.backends.iter().enumerate() {
                let r = BackendRef {
                    service: svc.name.clone(),
                    backend: b.name.clone(),
                };
                match self.writer.backend_ids().get(&r) {
                    Some(id) => {
                        if matches!(b.state, BackendState::Active | BackendState::Draining) {
                            usable.insert(*id);
                        }
                        ids.push(*id);
                    }
                    None => ids.push(PROVISIONAL_ID + i as u32),
                }
            }
            let table = dataplane::service_table(svc, &ids, size)?;
            let timeout = svc.affinity_timeout_ns();
            tables.insert(sid, (table, timeout, svc.name.clone()));
        }
        let names = self.backend_names();
        let now = monotonic_ns();
        let mut out = Vec::new();
        let mut sent = Vec::new();
        self.writer.maps().visit_sessions(|key, value, protected| {
            // Protected sessions were replicated when they became divergent
            // (or in a full sync): only the LRU holds news.
            if protected {
                return Ok(());
            }
            let Some((table, timeout, service)) = tables.get(&key.service_id) else {
                return Ok(());
            };
            let age = now.saturating_sub(value.last_seen_ns);
            if age < *timeout
                && usable.contains(&value.backend_id)
                && dataplane::answer(table, &key.addr) != value.backend_id
                && let Some(backend) = names.get(&value.backend_id)
            {
                out.push(WireSession {
                    service: service.clone(),
                    client: key.addr,
                    backend: (*backend).to_string(),
                    age_ms: age / 1_000_000,
                });
                sent.push((key, value.last_seen_ns));
            }
            Ok(())
        })?;
        // Sent now: the refresh after the swap only sends what changed since.
        self.cluster.refreshed.extend(sent);
        Ok(out)
    }

    /// Makes `doc` live here: its state goes to the state file first, then
    /// its state and health verdict to the kernel. On failure nothing changes
    /// (reconcile retries the write if the kernel was half written).
    pub fn adopt(&mut self, doc: &Doc) -> Result<()> {
        doc.state
            .validate(&self.base)
            .with_context(|| format!("cluster version {} is not valid here", doc.version))?;
        let mut new = doc.state.clone();
        new.cluster_version = Some(doc.version);
        self.save(&mut new)
            .context("adopting the cluster's version: the state file could not be written")?;
        let old_state = std::mem::replace(&mut self.state, new);
        let old_down = self.cluster.down.replace(doc.down.clone());
        let result = self
            .kernel_backends()
            .and_then(|k| self.sync_health(&k))
            .and_then(|()| self.apply());
        if let Err(e) = result {
            self.state = old_state;
            self.cluster.down = old_down;
            let mut restore = self.state.clone();
            if let Err(se) = self.save(&mut restore) {
                tracing::error!("restoring the previous state file failed: {se:#}");
            }
            return Err(e.context("adopting the cluster's version"));
        }
        Ok(())
    }

    /// Writes peers' sessions into the protected map. A session this node
    /// holds with another backend keeps the fresher of the two (last-seen;
    /// ties keep this node's); the loser's entry is deleted, so each client
    /// has one.
    pub fn import_sessions(&mut self, entries: &[WireSession]) -> Result<ImportTotals> {
        let now = monotonic_ns();
        let mut t = ImportTotals::default();
        let usable: HashMap<(&str, &str), BackendState> = self
            .writer
            .effective()
            .services
            .iter()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .map(move |b| ((s.name.as_str(), b.name.as_str()), b.state))
            })
            .collect();
        let timeouts: HashMap<&str, u64> = self
            .writer
            .effective()
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.affinity_timeout_ns()))
            .collect();
        let mut flagged: BTreeSet<u32> = BTreeSet::new();
        let mut writes: Vec<(AffinityKey, Affinity, bool)> = Vec::new();
        for e in entries {
            let (Some(&sid), Some(state), Some(&timeout)) = (
                self.writer.service_ids().get(&e.service),
                usable.get(&(e.service.as_str(), e.backend.as_str())),
                timeouts.get(e.service.as_str()),
            ) else {
                t.unknown += 1;
                continue;
            };
            let r = BackendRef {
                service: e.service.clone(),
                backend: e.backend.clone(),
            };
            let Some(&bid) = self.writer.backend_ids().get(&r) else {
                t.unknown += 1;
                continue;
            };
            let age_ns = e.age_ms.saturating_mul(1_000_000);
            if !matches!(state, BackendState::Active | BackendState::Draining) || age_ns >= timeout
            {
                t.unknown += 1;
                continue;
            }
            let key = AffinityKey {
                service_id: sid,
                addr: e.client,
            };
            let theirs = Affinity {
                backend_id: bid,
                _pad: 0,
                last_seen_ns: now.saturating_sub(age_ns),
            };
            match self.writer.maps().session(&key) {
                Some((mine, protected)) if mine.backend_id == bid => {
                    t.same += 1;
                    // Ages travel in whole milliseconds and take time to arrive, so a
                    // copy always looks a little fresher: only a real refresh counts.
                    if protected
                        && theirs.last_seen_ns < mine.last_seen_ns.saturating_add(SAME_SLACK_NS)
                    {
                        continue;
                    }
                    let fresher = Affinity {
                        last_seen_ns: mine.last_seen_ns.max(theirs.last_seen_ns),
                        ..theirs
                    };
                    writes.push((key, fresher, !protected));
                }
                Some((mine, protected)) => {
                    if mine.last_seen_ns >= theirs.last_seen_ns {
                        t.lost_to_local += 1;
                        continue;
                    }
                    t.replaced += 1;
                    writes.push((key, theirs, !protected));
                }
                None => writes.push((key, theirs, false)),
            }
            flagged.insert(sid);
        }
        for (key, value, drop_lru) in writes {
            match self.writer.maps_mut().protected.insert(key, value, 0) {
                Ok(()) => {
                    t.imported += 1;
                    // Written by a peer, not seen here: not this node's to refresh.
                    self.cluster.refreshed.insert(key, value.last_seen_ns);
                }
                Err(MapError::SyscallError(e))
                    if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)) =>
                {
                    t.full += 1;
                    continue;
                }
                Err(e) => return Err(e).context("writing a replicated session"),
            }
            if drop_lru {
                match self.writer.maps_mut().affinity.remove(&key) {
                    Ok(()) => {}
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => {
                        return Err(e).context("removing the LRU copy of a replicated session");
                    }
                }
            }
        }
        if t.full > 0 {
            tracing::warn!(
                dropped = t.full,
                "the protected session map is full: replicated sessions were dropped (raise affinity_max_entries)"
            );
        }
        self.flag_protected(&flagged)?;
        let totals = &mut self.cluster.totals;
        totals.imported += t.imported;
        totals.same += t.same;
        totals.replaced += t.replaced;
        totals.lost_to_local += t.lost_to_local;
        totals.unknown += t.unknown;
        totals.full += t.full;
        Ok(t)
    }

    /// Sets `SERVICE_F_PROTECTED` on these services' records, so an LRU miss
    /// looks in the protected map (apply keeps it while entries remain).
    fn flag_protected(&mut self, ids: &BTreeSet<u32>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut records = Vec::new();
        for entry in self.writer.maps().services.iter() {
            let (key, mut svc) = entry.context("reading the service map")?;
            if ids.contains(&svc.id) && svc.flags & SERVICE_F_PROTECTED == 0 && key.port != 0 {
                svc.flags |= SERVICE_F_PROTECTED;
                records.push((key, svc));
            }
        }
        for (key, svc) in records {
            self.writer
                .maps_mut()
                .services
                .insert(key, svc, 0)
                .context("flagging a service as having protected sessions")?;
        }
        Ok(())
    }

    /// The live protected sessions, by name: all of them (a full sync), or
    /// those seen since the last refresh (`changed_only`), so peers' copies
    /// do not expire while the client still uses this node.
    pub fn replicable(&mut self, changed_only: bool) -> Result<Vec<WireSession>> {
        let entries = crate::bpf_batch::read_hash(&self.writer.maps().protected)
            .context("reading the protected session map")?;
        let services: HashMap<u32, (&str, u64)> = self
            .writer
            .service_ids()
            .iter()
            .filter_map(|(name, id)| {
                let svc = self
                    .writer
                    .effective()
                    .services
                    .iter()
                    .find(|s| s.name == *name)?;
                Some((*id, (name.as_str(), svc.affinity_timeout_ns())))
            })
            .collect();
        let names = self.backend_names();
        let now = monotonic_ns();
        let mut out = Vec::new();
        let mut seen = HashMap::with_capacity(entries.len());
        for (key, value) in &entries {
            let (Some((service, timeout)), Some(backend)) =
                (services.get(&key.service_id), names.get(&value.backend_id))
            else {
                continue;
            };
            let age = now.saturating_sub(value.last_seen_ns);
            if age >= *timeout {
                continue;
            }
            seen.insert(*key, value.last_seen_ns);
            if changed_only && self.cluster.refreshed.get(key) == Some(&value.last_seen_ns) {
                continue;
            }
            out.push(WireSession {
                service: (*service).to_string(),
                client: key.addr,
                backend: (*backend).to_string(),
                age_ms: age / 1_000_000,
            });
        }
        self.cluster.refreshed = seen;
        Ok(out)
    }

    /// Marks the full sync as had: the VIPs may be announced.
    pub fn set_synced(&mut self) {
        if !self.cluster.synced {
            self.cluster.synced = true;
            tracing::info!("cluster: full sync complete; this node may announce its VIPs");
        }
    }
}
