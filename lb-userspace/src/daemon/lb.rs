//! [`Lb`]: the one owner of the pinned maps and of the desired state (the
//! config file, the runtime changes of the state file, and backend health).
//! Every control request, health result and drain deadline goes through it,
//! as everything in Katran goes through `KatranLb`.
//!
//! The desired state is always recomputed as a whole ([`Lb::effective`])
//! and written with `dataplane::apply`, which keeps ids (and so sessions) and
//! swaps each Maglev table atomically. After that, the affinity entries of
//! every backend that has just become unusable are rewritten to their new
//! Maglev choice; entries of other backends are never touched.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use lb_common::{
    AffinityKey, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_EMPTY, FAMILY_V4,
    MAX_BACKENDS, NO_BACKEND, Service, mask_addr,
};

use super::state::{AddedBackend, Admin, State};
use crate::api::{BackendInfo, ServiceInfo, SessionInfo, StatusInfo, WhereInfo};
use crate::config::{
    BackendConfig, BackendState, Config, HealthConfig, check_not_own_mac, format_mac, parse_mac,
    valid_backend_name, validate_backend_address, validate_deadline, validate_mac, validate_weight,
};
use crate::dataplane::{self, addr_words, service_key};
use crate::maglev;
use crate::pins::PinnedMaps;
use crate::sessions::{ip_from_words, monotonic_ns};
use crate::stats;

/// A backend of a service, by names (stable across reloads and restarts).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendRef {
    /// Service name.
    pub service: String,
    /// Backend name.
    pub backend: String,
}

impl std::fmt::Display for BackendRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.service, self.backend)
    }
}

/// What a health-check task checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckTarget {
    /// Which backend.
    pub backend: BackendRef,
    /// Its own address and the checked port.
    pub addr: SocketAddr,
    /// The service's check settings.
    pub spec: HealthConfig,
}

/// Health of one checked backend (HAProxy's rise/fall counters).
#[derive(Debug, Clone)]
struct Health {
    up: bool,
    successes: u32,
    failures: u32,
    reason: Option<String>,
}

/// A backend of the effective config with its derived states.
struct Derived {
    admin: Admin,
    health: Option<bool>,
}

/// The owner of the dataplane maps and the desired state.
pub struct Lb {
    config_path: PathBuf,
    base: Config,
    state: State,
    health: BTreeMap<BackendRef, Health>,
    panic: BTreeSet<String>,
    maps: PinnedMaps,
    service_ids: BTreeMap<String, u32>,
    backend_ids: HashMap<BackendRef, u32>,
    effective: Config,
    started: Instant,
    adopted: bool,
}

/// Milliseconds since the Unix epoch (drain deadlines survive restarts, so wall clock).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn admin_of_config(state: BackendState) -> Admin {
    match state {
        BackendState::Active => Admin::Active,
        BackendState::Draining => Admin::Draining {
            deadline_unix_ms: None,
        },
        BackendState::Down => Admin::Maint,
    }
}

fn admin_name(admin: Admin) -> &'static str {
    match admin {
        Admin::Active => "active",
        Admin::Draining { .. } => "draining",
        Admin::Maint => "maint",
    }
}

fn state_name(state: u8) -> &'static str {
    match state {
        BACKEND_ACTIVE => "active",
        BACKEND_DRAINING => "draining",
        BACKEND_DOWN => "down",
        _ => "empty",
    }
}

impl Lb {
    /// Takes over the pinned maps: health starts from what the pins say (a
    /// backend the previous daemon had marked down stays down until it
    /// passes `rise` checks), then the desired state is applied.
    pub fn new(
        config_path: PathBuf,
        base: Config,
        state: State,
        maps: PinnedMaps,
        adopted: bool,
    ) -> Result<Self> {
        let mut lb = Lb {
            config_path,
            effective: base.clone(),
            base,
            state,
            health: BTreeMap::new(),
            panic: BTreeSet::new(),
            maps,
            service_ids: BTreeMap::new(),
            backend_ids: HashMap::new(),
            started: Instant::now(),
            adopted,
        };
        let pinned_down = lb.pinned_down()?;
        lb.sync_health(&pinned_down)?;
        lb.apply().context("applying the desired state")?;
        Ok(lb)
    }

    /// The config file this daemon reads.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Backends whose pinned state is DOWN (set by a previous daemon).
    fn pinned_down(&self) -> Result<HashSet<BackendRef>> {
        let by_addr = self.maps.live_backends()?;
        let mut down = HashSet::new();
        let cfg = self.effective_config()?;
        for svc in &cfg.services {
            let Ok(record) = self.maps.services.get(&service_key(svc), 0) else {
                continue;
            };
            for be in &svc.backends {
                let pinned = by_addr.get(&(record.id, addr_words(be.address)));
                if pinned.map(|(_, b)| b.state) == Some(BACKEND_DOWN) {
                    down.insert(BackendRef {
                        service: svc.name.clone(),
                        backend: be.name.clone(),
                    });
                }
            }
        }
        Ok(down)
    }

    /// The config with the runtime changes applied (states not yet derived).
    fn effective_config(&self) -> Result<Config> {
        let mut cfg = self.base.clone();
        for svc in &mut cfg.services {
            let Some(over) = self.state.services.get(&svc.name) else {
                continue;
            };
            svc.backends.retain(|b| !over.removed.contains(&b.name));
            for added in &over.added {
                if svc
                    .backends
                    .iter()
                    .any(|b| b.name == added.name || b.address == added.address)
                {
                    continue;
                }
                svc.backends.push(BackendConfig {
                    name: added.name.clone(),
                    address: added.address,
                    mac: parse_mac(&added.mac)
                        .with_context(|| format!("state file: backend {}", added.name))?,
                    weight: added.weight,
                    state: BackendState::Active,
                });
            }
            for be in &mut svc.backends {
                if let Some(w) = over.weights.get(&be.name) {
                    be.weight = *w;
                }
            }
        }
        Ok(cfg)
    }

    fn derived(&self, service: &str, be: &BackendConfig) -> Derived {
        let r = BackendRef {
            service: service.to_string(),
            backend: be.name.clone(),
        };
        let admin = self
            .state
            .services
            .get(service)
            .and_then(|s| s.admin.get(&be.name))
            .copied()
            .unwrap_or_else(|| admin_of_config(be.state));
        Derived {
            admin,
            health: self.health.get(&r).map(|h| h.up),
        }
    }

    /// The config as the kernel should see it: every backend's state derived
    /// from its admin state and health, with panic mode applied.
    fn effective(&self) -> Result<(Config, BTreeSet<String>)> {
        let mut cfg = self.effective_config()?;
        let mut panic = BTreeSet::new();
        for svc in &mut cfg.services {
            let derived: Vec<Derived> = svc
                .backends
                .iter()
                .map(|b| self.derived(&svc.name, b))
                .collect();
            let in_service: Vec<&Derived> =
                derived.iter().filter(|d| d.admin != Admin::Maint).collect();
            // Panic mode: when every backend in service fails its checks,
            // black-holing the VIP helps nobody; use them all as if healthy.
            let all_failing = svc.health.is_some()
                && !in_service.is_empty()
                && in_service.iter().all(|d| d.health == Some(false));
            if all_failing {
                panic.insert(svc.name.clone());
            }
            for (be, d) in svc.backends.iter_mut().zip(&derived) {
                be.state = match d.admin {
                    Admin::Maint => BackendState::Down,
                    _ if d.health == Some(false) && !all_failing => BackendState::Down,
                    Admin::Draining { .. } => BackendState::Draining,
                    Admin::Active => BackendState::Active,
                };
            }
        }
        Ok((cfg, panic))
    }

    /// Creates health records for checked backends (up unless `down`), drops stale ones.
    fn sync_health(&mut self, down: &HashSet<BackendRef>) -> Result<()> {
        let cfg = self.effective_config()?;
        let mut keep = BTreeSet::new();
        for svc in &cfg.services {
            if svc.health.is_none() {
                continue;
            }
            for be in &svc.backends {
                let r = BackendRef {
                    service: svc.name.clone(),
                    backend: be.name.clone(),
                };
                keep.insert(r.clone());
                self.health.entry(r.clone()).or_insert_with(|| {
                    let up = !down.contains(&r);
                    if !up {
                        tracing::warn!(backend = %r, "backend starts down: the previous daemon had marked it down");
                    }
                    Health {
                        up,
                        successes: 0,
                        failures: 0,
                        reason: (!up).then(|| "down before the daemon (re)started".to_string()),
                    }
                });
            }
        }
        self.health.retain(|r, _| keep.contains(r));
        Ok(())
    }

    /// What the health-check tasks should be checking now.
    pub fn check_targets(&self) -> Vec<CheckTarget> {
        let Ok(cfg) = self.effective_config() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for svc in &cfg.services {
            let Some(spec) = &svc.health else { continue };
            for be in &svc.backends {
                out.push(CheckTarget {
                    backend: BackendRef {
                        service: svc.name.clone(),
                        backend: be.name.clone(),
                    },
                    addr: SocketAddr::new(be.address, spec.port),
                    spec: spec.clone(),
                });
            }
        }
        out
    }

    /// Backend states as the kernel sees them now, by id.
    fn kernel_states(&self) -> Result<HashMap<u32, u8>> {
        let mut out = HashMap::new();
        for id in self.backend_ids.values() {
            let be = self
                .maps
                .backends
                .get(id, 0)
                .with_context(|| format!("reading backend {id}"))?;
            out.insert(*id, be.state);
        }
        Ok(out)
    }

    /// Writes the desired state; rewrites the sessions of backends that just became unusable.
    pub fn apply(&mut self) -> Result<()> {
        let (cfg, panic) = self.effective()?;
        let before = self.kernel_states()?;
        let report = dataplane::apply(&mut self.maps, &cfg)?;
        self.effective = cfg;
        self.refresh_ids()?;
        for svc in panic.difference(&self.panic) {
            tracing::error!(
                service = %svc,
                "PANIC MODE: every backend of service {svc} fails its health checks; forwarding to all of them as if healthy rather than dropping the traffic"
            );
        }
        for svc in self.panic.difference(&panic) {
            tracing::warn!(service = %svc, "service {svc} left panic mode: a backend passes its checks again");
        }
        self.panic = panic;
        let after = self.kernel_states()?;
        let newly_down: HashSet<u32> = after
            .iter()
            .filter(|(id, s)| {
                **s == BACKEND_DOWN && before.get(id).is_some_and(|b| *b != BACKEND_DOWN)
            })
            .map(|(id, _)| *id)
            .collect();
        if report.backends_removed > 0 || report.services_removed > 0 {
            tracing::info!(
                backends_removed = report.backends_removed,
                services_removed = report.services_removed,
                sessions_removed = report.sessions_removed,
                "removed from the dataplane"
            );
        }
        if !newly_down.is_empty() {
            let moved = self.rewrite_sessions(&newly_down)?;
            for id in &newly_down {
                let name = self.backend_name(*id);
                tracing::info!(
                    backend = %name,
                    moved = moved.get(id).copied().unwrap_or(0),
                    "moved the clients of {name} to their Maglev choice"
                );
            }
        }
        Ok(())
    }

    fn refresh_ids(&mut self) -> Result<()> {
        let mut service_ids = BTreeMap::new();
        let mut backend_ids = HashMap::new();
        let by_addr = self.maps.live_backends()?;
        for svc in &self.effective.services {
            let record = self
                .maps
                .services
                .get(&service_key(svc), 0)
                .with_context(|| {
                    format!("service {} missing from the map after apply", svc.name)
                })?;
            service_ids.insert(svc.name.clone(), record.id);
            for be in &svc.backends {
                if let Some((id, _)) = by_addr.get(&(record.id, addr_words(be.address))) {
                    backend_ids.insert(
                        BackendRef {
                            service: svc.name.clone(),
                            backend: be.name.clone(),
                        },
                        *id,
                    );
                }
            }
        }
        self.service_ids = service_ids;
        self.backend_ids = backend_ids;
        Ok(())
    }

    fn backend_name(&self, id: u32) -> String {
        self.backend_ids
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(r, _)| r.to_string())
            .unwrap_or_else(|| format!("#{id}"))
    }

    /// Service records by service id (port-0 fragment entries left out).
    fn service_records(&self) -> Result<HashMap<u32, Service>> {
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
    fn maglev_choice(&self, record: &Service, masked: &[u32; 4]) -> Result<u32> {
        let slot = maglev::slot(masked, record.table_size);
        let base = record.maglev_base[(record.active_slot & 1) as usize];
        self.maps
            .maglev
            .get(&(base + slot), 0)
            .context("reading the Maglev table")
    }

    /// Points every session of `ids` at its client's current Maglev choice
    /// (deleted when the service has no usable backend). Returns moves per id.
    fn rewrite_sessions(&mut self, ids: &HashSet<u32>) -> Result<HashMap<u32, u64>> {
        let records = self.service_records()?;
        let mut doomed = Vec::new();
        for entry in self.maps.affinity.iter() {
            let (key, value) = entry.context("reading the affinity map")?;
            if ids.contains(&value.backend_id) {
                doomed.push((key, value));
            }
        }
        let mut moved: HashMap<u32, u64> = HashMap::new();
        for (key, mut value) in doomed {
            let old = value.backend_id;
            let choice = match records.get(&key.service_id) {
                Some(record) => self.maglev_choice(record, &key.addr)?,
                None => NO_BACKEND,
            };
            if choice == NO_BACKEND {
                // Nowhere to go: let the kernel decide on the next packet.
                let _ = self.maps.affinity.remove(&key);
            } else {
                value.backend_id = choice;
                // Keeps last_seen: the client is as idle as it was.
                if let Err(e) = self.maps.affinity.insert(key, value, 0) {
                    tracing::warn!("rewriting a session failed: {e}");
                    continue;
                }
            }
            *moved.entry(old).or_default() += 1;
        }
        Ok(moved)
    }

    /// Fresh sessions (idle less than their service's timeout) per backend id.
    fn session_counts(&self) -> Result<HashMap<u32, u64>> {
        let records = self.service_records()?;
        let now = monotonic_ns();
        let mut out: HashMap<u32, u64> = HashMap::new();
        for entry in self.maps.affinity.iter() {
            let (key, value) = entry.context("reading the affinity map")?;
            let timeout = records.get(&key.service_id).map_or(0, |r| r.timeout_ns);
            if now.saturating_sub(value.last_seen_ns) < timeout {
                *out.entry(value.backend_id).or_default() += 1;
            }
        }
        Ok(out)
    }

    /// Feeds one health-check result; on a transition, applies the new state.
    pub fn health_result(
        &mut self,
        r: &BackendRef,
        result: Result<Duration, String>,
    ) -> Result<()> {
        let Some(svc) = self.effective_service(&r.service) else {
            return Ok(());
        };
        let Some(spec) = svc.health.clone() else {
            return Ok(());
        };
        let addr = svc
            .backends
            .iter()
            .find(|b| b.name == r.backend)
            .map(|b| SocketAddr::new(b.address, spec.port));
        let Some(h) = self.health.get_mut(r) else {
            // A check of a backend removed meanwhile.
            return Ok(());
        };
        let target = addr.map_or_else(|| r.to_string(), |a| a.to_string());
        let mut changed = false;
        match result {
            Ok(latency) => {
                h.failures = 0;
                h.successes = h.successes.saturating_add(1);
                if !h.up && h.successes >= spec.rise {
                    h.up = true;
                    let reason = format!(
                        "{} consecutive successful {} checks (last took {latency:?})",
                        spec.rise, spec.kind
                    );
                    tracing::info!(backend = %r, "backend {target} up: {reason}");
                    h.reason = Some(reason);
                    changed = true;
                }
            }
            Err(why) => {
                h.successes = 0;
                h.failures = h.failures.saturating_add(1);
                if h.up && h.failures >= spec.fall {
                    h.up = false;
                    let reason = format!("{} consecutive failures, last: {why}", spec.fall);
                    tracing::warn!(backend = %r, "backend {target} down: {reason}");
                    h.reason = Some(reason);
                    changed = true;
                } else if h.up {
                    tracing::debug!(backend = %r, failures = h.failures, "check failed: {why}");
                }
            }
        }
        if changed {
            self.apply()?;
        }
        Ok(())
    }

    /// Finishes drains whose backend has no sessions left or whose deadline passed.
    pub fn tick(&mut self) -> Result<()> {
        let now = unix_ms();
        let mut draining = Vec::new();
        for (svc, over) in &self.state.services {
            for (name, admin) in &over.admin {
                if let Admin::Draining { deadline_unix_ms } = admin {
                    draining.push((
                        BackendRef {
                            service: svc.clone(),
                            backend: name.clone(),
                        },
                        *deadline_unix_ms,
                    ));
                }
            }
        }
        if draining.is_empty() {
            return Ok(());
        }
        let counts = self.session_counts()?;
        let mut changed = false;
        for (r, deadline) in draining {
            let Some(id) = self.backend_ids.get(&r) else {
                continue;
            };
            let left = counts.get(id).copied().unwrap_or(0);
            let why = if left == 0 {
                "no sessions left".to_string()
            } else if deadline.is_some_and(|d| now >= d) {
                format!("drain deadline passed with {left} sessions left; moving them")
            } else {
                continue;
            };
            tracing::info!(backend = %r, "drain of {r} finished: {why}; now maint");
            self.state
                .service_mut(&r.service)
                .admin
                .insert(r.backend.clone(), Admin::Maint);
            changed = true;
        }
        if changed {
            self.save_state()?;
            self.apply()?;
        }
        Ok(())
    }

    fn save_state(&mut self) -> Result<()> {
        self.state.prune();
        self.state.save(&self.base.state_file)
    }

    /// Backends of every service currently in effect.
    fn backend_count(&self) -> usize {
        self.effective
            .services
            .iter()
            .map(|s| s.backends.len())
            .sum()
    }

    /// After a failed change the previous `what` (state or config) is back
    /// in `self`: writes it to the kernel again, logging if even that fails.
    fn reapply_restored(&mut self, what: &str) {
        let _ = self.sync_health(&HashSet::new());
        if let Err(e) = self.apply() {
            tracing::error!("restoring the previous {what} failed too: {e:#}");
        }
    }

    /// Service `name` as currently in effect (config plus runtime changes).
    fn effective_service(&self, name: &str) -> Option<&crate::config::ServiceConfig> {
        self.effective.services.iter().find(|s| s.name == name)
    }

    /// Like [`Self::effective_service`], failing with a message naming it.
    fn service(&self, name: &str) -> Result<&crate::config::ServiceConfig> {
        self.effective_service(name)
            .with_context(|| format!("no service named {name:?}"))
    }

    fn find(&self, service: &str, backend: &str) -> Result<BackendRef> {
        let svc = self.service(service)?;
        if !svc.backends.iter().any(|b| b.name == backend) {
            bail!("service {service:?} has no backend named {backend:?}");
        }
        Ok(BackendRef {
            service: service.to_string(),
            backend: backend.to_string(),
        })
    }

    /// Makes a runtime change: `change` edits the state, which is saved and applied; on a
    /// failure to apply, the previous state is restored.
    fn change(&mut self, change: impl FnOnce(&mut State)) -> Result<()> {
        let old = self.state.clone();
        change(&mut self.state);
        let result = self
            .sync_health(&HashSet::new())
            .and_then(|()| self.apply());
        if let Err(e) = result {
            self.state = old;
            self.reapply_restored("state");
            return Err(e);
        }
        self.save_state()
    }

    /// `xlb backend add`.
    pub fn backend_add(
        &mut self,
        service: &str,
        name: Option<String>,
        address: IpAddr,
        mac: &str,
        weight: Option<u16>,
    ) -> Result<String> {
        let svc = self.service(service)?;
        let name = name.unwrap_or_else(|| address.to_string());
        if !valid_backend_name(&name) {
            bail!("backend name {name:?} is not valid (1 to 64 of A-Z a-z 0-9 _ . : -)");
        }
        validate_backend_address("address", address, svc.vip, &self.base.vips())?;
        let mac_bytes = validate_mac("mac", mac)?;
        let own_mac = dataplane::interface_mac(&self.base.interface)?;
        check_not_own_mac("mac", mac_bytes, own_mac, &self.base.interface)?;
        let mac = format_mac(&mac_bytes);
        let weight = weight.unwrap_or(1);
        validate_weight("weight", weight)?;
        if let Some(b) = svc
            .backends
            .iter()
            .find(|b| b.name == name || b.address == address)
        {
            bail!(
                "service {service} already has backend {} ({})",
                b.name,
                b.address
            );
        }
        if self.backend_count() >= MAX_BACKENDS as usize {
            bail!("xlb supports at most {MAX_BACKENDS} backends in total");
        }
        let added = AddedBackend {
            name: name.clone(),
            address,
            mac,
            weight,
        };
        self.change(|st| {
            let s = st.service_mut(service);
            s.removed.retain(|n| *n != name);
            s.admin.remove(&name);
            s.weights.remove(&name);
            s.added.push(added);
        })?;
        Ok(format!("added backend {name} ({address}) to {service}"))
    }

    /// `xlb backend remove`.
    pub fn backend_remove(&mut self, service: &str, backend: &str) -> Result<String> {
        let r = self.find(service, backend)?;
        let svc_len = self
            .effective_service(service)
            .map_or(0, |s| s.backends.len());
        if svc_len <= 1 {
            bail!("{r} is the last backend of {service}; a service needs at least one");
        }
        let in_config = self
            .base
            .services
            .iter()
            .find(|s| s.name == service)
            .is_some_and(|s| s.backends.iter().any(|b| b.name == backend));
        self.change(|st| {
            let s = st.service_mut(service);
            s.added.retain(|b| b.name != backend);
            s.admin.remove(backend);
            s.weights.remove(backend);
            if in_config && !s.removed.iter().any(|n| n == backend) {
                s.removed.push(backend.to_string());
            }
        })?;
        Ok(format!(
            "removed backend {r}; its clients move to their Maglev choice"
        ))
    }

    /// `xlb backend drain`.
    pub fn backend_drain(
        &mut self,
        service: &str,
        backend: &str,
        deadline: Option<Duration>,
    ) -> Result<String> {
        let r = self.find(service, backend)?;
        if let Some(d) = deadline {
            validate_deadline(d)?;
        }
        let deadline_unix_ms = deadline.map(|d| unix_ms().saturating_add(d.as_millis() as u64));
        self.change(|st| {
            st.service_mut(service)
                .admin
                .insert(backend.to_string(), Admin::Draining { deadline_unix_ms });
        })?;
        Ok(match deadline {
            Some(d) => format!(
                "draining {r}; leftover clients move in {}",
                humantime::format_duration(d)
            ),
            None => format!("draining {r}; maint once its sessions are gone"),
        })
    }

    /// `xlb backend undrain`.
    pub fn backend_undrain(&mut self, service: &str, backend: &str) -> Result<String> {
        let r = self.find(service, backend)?;
        self.change(|st| {
            st.service_mut(service)
                .admin
                .insert(backend.to_string(), Admin::Active);
        })?;
        Ok(format!("{r} is active again"))
    }

    /// `xlb backend weight`.
    pub fn backend_weight(&mut self, service: &str, backend: &str, weight: u16) -> Result<String> {
        let r = self.find(service, backend)?;
        validate_weight("weight", weight)?;
        self.change(|st| {
            st.service_mut(service)
                .weights
                .insert(backend.to_string(), weight);
        })?;
        Ok(format!("{r} now has weight {weight}"))
    }

    /// Re-reads the config file; an invalid one changes nothing.
    pub fn reload(&mut self) -> Result<String> {
        let new = Config::load(&self.config_path)?;
        let old = &self.base;
        let fixed = [
            ("interface", old.interface != new.interface),
            ("pin_dir", old.pin_dir != new.pin_dir),
            (
                "affinity_max_entries",
                old.affinity_max_entries != new.affinity_max_entries,
            ),
            (
                "maglev_table_size",
                old.maglev_table_size != new.maglev_table_size,
            ),
            ("max_services", old.max_services != new.max_services),
            ("state_file", old.state_file != new.state_file),
            (
                "metrics_address",
                old.metrics_address != new.metrics_address,
            ),
        ];
        if let Some((field, _)) = fixed.iter().find(|(_, changed)| *changed) {
            bail!(
                "{field} changed: it cannot change while the daemon runs (restart it); nothing applied"
            );
        }
        let old_base = std::mem::replace(&mut self.base, new);
        let old_state = self.state.clone();
        // A backend the config now names itself is the config's from here on.
        for svc in &self.base.services {
            if let Some(over) = self.state.services.get_mut(&svc.name) {
                over.added.retain(|a| {
                    !svc.backends
                        .iter()
                        .any(|b| b.name == a.name || b.address == a.address)
                });
            }
        }
        let result = self
            .sync_health(&HashSet::new())
            .and_then(|()| self.apply());
        if let Err(e) = result {
            self.base = old_base;
            self.state = old_state;
            self.reapply_restored("config");
            return Err(e.context("applying the new config failed; the previous one is back"));
        }
        self.save_state()?;
        Ok(format!(
            "reloaded {}: {} services, {} backends",
            self.config_path.display(),
            self.effective.services.len(),
            self.backend_count()
        ))
    }

    /// `xlb status`.
    pub fn status(&self) -> Result<StatusInfo> {
        let backends: usize = self
            .effective
            .services
            .iter()
            .map(|s| s.backends.len())
            .sum();
        let up = self
            .effective
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .filter(|b| b.state == BackendState::Active)
            .count();
        let mut sessions = 0;
        for key in self.maps.affinity.keys() {
            key.context("reading the affinity map")?;
            sessions += 1;
        }
        Ok(StatusInfo {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            config: self.config_path.display().to_string(),
            state_file: self.base.state_file.display().to_string(),
            interface: self.base.interface.clone(),
            pins: self.base.pin_path().display().to_string(),
            adopted: self.adopted,
            services: self.effective.services.len(),
            backends,
            backends_up: up,
            panic_services: self.panic.iter().cloned().collect(),
            sessions,
        })
    }

    /// `xlb service list`.
    pub fn services(&self) -> Vec<ServiceInfo> {
        self.effective
            .services
            .iter()
            .map(|s| ServiceInfo {
                name: s.name.clone(),
                id: self.service_ids.get(&s.name).copied().unwrap_or(u32::MAX),
                vip: s.vip,
                port: s.port,
                protocol: s.protocol.to_string(),
                backends: s.backends.len(),
                backends_up: s
                    .backends
                    .iter()
                    .filter(|b| b.state == BackendState::Active)
                    .count(),
                panic: self.panic.contains(&s.name),
                health: s.health.as_ref().map(|h| {
                    format!(
                        "{} port {} every {} (timeout {}, rise {}, fall {})",
                        h.kind,
                        h.port,
                        humantime::format_duration(h.interval),
                        humantime::format_duration(h.timeout),
                        h.rise,
                        h.fall
                    )
                }),
            })
            .collect()
    }

    /// `xlb backend list`.
    pub fn backends(&self, service: Option<&str>) -> Result<Vec<BackendInfo>> {
        if let Some(name) = service {
            if !self.effective.services.iter().any(|s| s.name == name) {
                bail!("no service named {name:?}");
            }
        }
        let counts = self.session_counts()?;
        let now = unix_ms();
        // Admin comes from the configured state: `effective` already holds the derived kernel state.
        let configured = self.effective_config()?;
        let mut out = Vec::new();
        for svc in &self.effective.services {
            if service.is_some_and(|n| n != svc.name) {
                continue;
            }
            for be in &svc.backends {
                let r = BackendRef {
                    service: svc.name.clone(),
                    backend: be.name.clone(),
                };
                let as_configured = configured
                    .services
                    .iter()
                    .find(|s| s.name == svc.name)
                    .and_then(|s| s.backends.iter().find(|b| b.name == be.name));
                let d = self.derived(&svc.name, as_configured.unwrap_or(be));
                let id = self.backend_ids.get(&r).copied().unwrap_or(u32::MAX);
                let health = self.health.get(&r);
                out.push(BackendInfo {
                    service: svc.name.clone(),
                    name: be.name.clone(),
                    id,
                    address: be.address,
                    mac: format_mac(&be.mac),
                    weight: be.weight,
                    admin: admin_name(d.admin).to_string(),
                    health: match health {
                        None => "unchecked",
                        Some(h) if h.up => "up",
                        Some(_) => "down",
                    }
                    .to_string(),
                    state: state_name(be.state.to_abi()).to_string(),
                    sessions: counts.get(&id).copied().unwrap_or(0),
                    drain_left_ms: match d.admin {
                        Admin::Draining {
                            deadline_unix_ms: Some(t),
                        } => Some(t.saturating_sub(now)),
                        _ => None,
                    },
                    reason: health.and_then(|h| h.reason.clone()),
                });
            }
        }
        Ok(out)
    }

    fn id_filters(
        &self,
        service: Option<&str>,
        backend: Option<&str>,
    ) -> Result<(Option<u32>, Option<HashSet<u32>>)> {
        let sid = match service {
            Some(name) => Some(
                *self
                    .service_ids
                    .get(name)
                    .with_context(|| format!("no service named {name:?}"))?,
            ),
            None => None,
        };
        let bids = match backend {
            Some(name) => {
                let ids: HashSet<u32> = self
                    .backend_ids
                    .iter()
                    .filter(|(r, _)| r.backend == name && service.is_none_or(|s| r.service == s))
                    .map(|(_, id)| *id)
                    .collect();
                if ids.is_empty() {
                    bail!("no backend named {name:?}");
                }
                Some(ids)
            }
            None => None,
        };
        Ok((sid, bids))
    }

    /// `xlb sessions list`.
    pub fn sessions(
        &self,
        service: Option<&str>,
        backend: Option<&str>,
    ) -> Result<Vec<SessionInfo>> {
        let (sid, bids) = self.id_filters(service, backend)?;
        let names: HashMap<u32, &BackendRef> =
            self.backend_ids.iter().map(|(r, id)| (*id, r)).collect();
        let svc_names: HashMap<u32, &String> =
            self.service_ids.iter().map(|(n, id)| (*id, n)).collect();
        let list = crate::sessions::list(&self.maps)?;
        Ok(list
            .into_iter()
            .filter(|s| sid.is_none_or(|id| s.service_id == id))
            .filter(|s| bids.as_ref().is_none_or(|ids| ids.contains(&s.backend_id)))
            .map(|s| SessionInfo {
                service: svc_names
                    .get(&s.service_id)
                    .map_or_else(|| format!("#{}", s.service_id), |n| (*n).clone()),
                client: s.client,
                prefix: s.prefix,
                backend: names
                    .get(&s.backend_id)
                    .map_or_else(|| format!("#{}", s.backend_id), |r| r.backend.clone()),
                backend_address: s.backend,
                idle_ms: s.idle_ms,
            })
            .collect())
    }

    /// `xlb sessions where`.
    pub fn where_is(&self, client: IpAddr, service: Option<&str>) -> Result<Vec<WhereInfo>> {
        let records = self.service_records()?;
        let names: HashMap<u32, &BackendRef> =
            self.backend_ids.iter().map(|(r, id)| (*id, r)).collect();
        let mut out = Vec::new();
        let now = monotonic_ns();
        for svc in &self.effective.services {
            if service.is_some_and(|n| n != svc.name) || svc.vip.is_ipv4() != client.is_ipv4() {
                continue;
            }
            let Some(record) = self
                .service_ids
                .get(&svc.name)
                .and_then(|id| records.get(id))
            else {
                continue;
            };
            let masked = mask_addr(&addr_words(client), &record.mask);
            let family = if client.is_ipv4() {
                FAMILY_V4
            } else {
                lb_common::FAMILY_V6
            };
            let key = AffinityKey {
                service_id: record.id,
                addr: masked,
            };
            let maglev = self.maglev_choice(record, &masked)?;
            let (id, source, idle_ms, expired) = match self.maps.affinity.get(&key, 0) {
                Ok(v) => {
                    let idle = now.saturating_sub(v.last_seen_ns);
                    (
                        v.backend_id,
                        "session",
                        Some(idle / 1_000_000),
                        idle >= record.timeout_ns,
                    )
                }
                Err(_) => (maglev, "maglev", None, false),
            };
            let name = |id: u32| {
                (id != NO_BACKEND).then(|| {
                    names
                        .get(&id)
                        .map_or_else(|| format!("#{id}"), |r| r.backend.clone())
                })
            };
            let address = |id: u32| {
                self.maps
                    .backends
                    .get(&id, 0)
                    .ok()
                    .filter(|b| b.state != BACKEND_EMPTY)
                    .map(|b| ip_from_words(&b.addr, b.family))
            };
            out.push(WhereInfo {
                service: svc.name.clone(),
                client: ip_from_words(&masked, family),
                backend: name(id),
                backend_address: address(id),
                source: source.to_string(),
                idle_ms,
                expired,
                maglev_backend: name(maglev),
                maglev_backend_address: address(maglev),
            });
        }
        if out.is_empty() {
            bail!(
                "no service of {client}'s address family{}",
                service.map(|s| format!(" named {s:?}")).unwrap_or_default()
            );
        }
        Ok(out)
    }

    /// `xlb sessions flush`.
    pub fn flush(&mut self, service: Option<&str>, backend: Option<&str>) -> Result<String> {
        let (sid, bids) = self.id_filters(service, backend)?;
        let mut doomed = Vec::new();
        for entry in self.maps.affinity.iter() {
            let (key, value) = entry.context("reading the affinity map")?;
            if sid.is_none_or(|id| key.service_id == id)
                && bids
                    .as_ref()
                    .is_none_or(|ids| ids.contains(&value.backend_id))
            {
                doomed.push(key);
            }
        }
        let mut n = 0;
        for key in &doomed {
            if self.maps.affinity.remove(key).is_ok() {
                n += 1;
            }
        }
        tracing::info!(sessions = n, "flushed sessions");
        Ok(format!("flushed {n} sessions"))
    }

    /// `xlb stats`.
    pub fn stats(&self) -> Result<stats::Snapshot> {
        let mut snap = stats::snapshot(&self.maps)?;
        snap.name(
            self.service_ids.iter().map(|(n, id)| (*id, n.clone())),
            self.backend_ids
                .iter()
                .map(|(r, id)| (*id, r.service.clone(), r.backend.clone())),
        );
        Ok(snap)
    }
}
