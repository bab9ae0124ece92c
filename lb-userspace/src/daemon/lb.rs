//! [`Lb`]: the one owner of the pinned maps and of the desired state (the
//! config file, the runtime changes of the state file, and backend health).
//! It lives on one thread of its own (`owner.rs`); every control request,
//! health result, tick and reload reaches it as a message, as everything in
//! Katran goes through `KatranLb`.
//!
//! The desired state is recomputed from its inputs ([`Lb::desired`], with
//! the pure decisions of `desired.rs`) and written with `dataplane::apply`,
//! which writes only what differs from the kernel: ids (and so sessions)
//! are kept and each changed Maglev table is swapped atomically. After
//! that, the affinity entries of every backend that has just become
//! unusable are rewritten to their new Maglev choice; entries of other
//! backends are never touched. A failed write leaves the daemon "dirty":
//! [`Lb::reconcile`] retries it with backoff, and also repairs whatever
//! else differs from the desired state (pins, tables, records).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use lb_common::{BACKEND_ACTIVE, BACKEND_CAPACITY, BACKEND_DOWN, BACKEND_DRAINING, PINNED_MAPS};

use super::counts::{Basis, Book, Counted, drain_over};
use super::desired::{Health, Panic, Transition, panic_step};
use super::source::SourceDefaults;
use super::state::{AddedBackend, Admin, State};
pub use super::writer::WORK_BUDGET;
use super::writer::{Held, Progress, Writer};
use crate::api::{Failure, FailureKind};
use crate::bpf_obj;
use crate::config::{
    BackendConfig, BackendState, Config, ForwardMode, HealthConfig, check_not_own_mac, format_mac,
    parse_mac, valid_backend_name, validate_backend_address, validate_deadline, validate_mac,
    validate_weight,
};
use crate::dataplane::{self, Dataplane, Hops, service_key};
use crate::hops::{self, Target};
use crate::lock::PinLock;
use crate::pins::PinnedMaps;
use crate::sessions::ip_from_words;

/// Marks an error as a failure of `kind` for the control protocol (same
/// message), unless it already is one.
pub(super) fn tag(kind: FailureKind) -> impl Fn(anyhow::Error) -> anyhow::Error {
    move |e| {
        if e.chain().any(|c| c.is::<Failure>()) {
            e
        } else {
            Failure::new(kind, format!("{e:#}")).into()
        }
    }
}

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
    /// The service's VIP and the checked port: where tunnelled checks (`via = "tunnel"`) go.
    pub vip: SocketAddr,
    /// The service's check settings.
    pub spec: HealthConfig,
    /// The address the check leaves from (never a VIP); `None`: the kernel's choice.
    pub source: Option<IpAddr>,
}

/// A backend of the effective config with its derived states.
pub(super) struct Derived {
    pub(super) admin: Admin,
    pub(super) health: Option<bool>,
}

/// The owner of the dataplane maps and the desired state.
pub struct Lb {
    pub(super) config_path: PathBuf,
    pub(super) base: Config,
    pub(super) state: State,
    pub(super) health: BTreeMap<BackendRef, Health>,
    pub(super) panic: BTreeMap<String, Panic>,
    /// Backends found in the kernel but in neither the config nor the state
    /// file (a lost state file): kept draining until their clients are idle.
    pub(super) orphans: BTreeMap<String, Vec<BackendConfig>>,
    /// The one writer of the pinned maps.
    pub(super) writer: Writer,
    pub(super) started: Instant,
    pub(super) adopted: bool,
    /// Where health checks leave from when a service does not say.
    pub(super) sources: SourceDefaults,
    /// The backends' resolved next hops (MACs not in the config, egress).
    pub(super) hops: Hops,
    /// This node's part of the cluster (`[cluster]`); inert when alone.
    pub(super) cluster: super::lb_cluster::ClusterSide,
    /// The session counts the counter thread sent (`daemon/counts.rs`).
    counts: Book,
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

pub(super) fn admin_name(admin: Admin) -> &'static str {
    match admin {
        Admin::Active => "active",
        Admin::Draining { .. } => "draining",
        Admin::Maint => "maint",
    }
}

pub(super) fn state_name(state: u8) -> &'static str {
    match state {
        BACKEND_ACTIVE => "active",
        BACKEND_DRAINING => "draining",
        BACKEND_DOWN => "down",
        _ => "empty",
    }
}

impl Lb {
    /// Takes over the pinned maps: health starts from what the kernel holds
    /// (a backend the previous daemon had marked down stays down until it
    /// passes `rise` checks; one the kernel does not know yet starts down),
    /// backends found only in the kernel are kept draining, then the desired
    /// state is applied.
    pub fn new(
        config_path: PathBuf,
        base: Config,
        state: State,
        maps: PinnedMaps,
        dataplane: Dataplane,
        lock: PinLock,
        adopted: bool,
    ) -> Result<Self> {
        let dir = base.pin_path();
        let link = bpf_obj::get(&crate::pins::link_path(&dir)).with_context(|| {
            format!(
                "opening the pinned link {}",
                crate::pins::link_path(&dir).display()
            )
        })?;
        let mut held_maps = Vec::new();
        for name in PINNED_MAPS {
            let fd = bpf_obj::get(&dir.join(name))
                .with_context(|| format!("opening pinned map {}", dir.join(name).display()))?;
            held_maps.push((name, fd));
        }
        let mut lb = Lb {
            config_path,
            writer: Writer::new(
                maps,
                Held {
                    dir,
                    lock,
                    link,
                    maps: held_maps,
                    dataplane,
                },
                base.clone(),
            ),
            base,
            state,
            health: BTreeMap::new(),
            panic: BTreeMap::new(),
            orphans: BTreeMap::new(),
            started: Instant::now(),
            adopted,
            sources: SourceDefaults::default(),
            hops: Hops::new(),
            cluster: super::lb_cluster::ClusterSide::default(),
            counts: Book::default(),
        };
        lb.cluster.enabled = lb.base.cluster.is_some();
        lb.sources = SourceDefaults::detect(&lb.base);
        // Backends of the state file count too: resolve what the whole
        // desired state needs before the first write.
        lb.hops = hops::resolve_now(&lb.effective_config()?, hops::START_WAIT)?;
        let kernel = lb.kernel_backends()?;
        lb.find_orphans(&kernel)?;
        lb.sync_health(&kernel)?;
        lb.apply()
            .and_then(|()| lb.settle())
            .context("applying the desired state")?;
        Ok(lb)
    }

    /// When this daemon started.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// The config file this daemon reads.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Backends in the kernel now: (service name, address) -> (record state, record).
    pub(super) fn kernel_backends(&self) -> Result<HashMap<(String, IpAddr), lb_common::Backend>> {
        let by_addr = self.writer.maps().live_backends()?;
        let mut names: HashMap<u32, String> = HashMap::new();
        for entry in self.writer.maps().services.iter() {
            let (key, svc) = entry.context("reading the service map")?;
            if key.port == 0 {
                continue;
            }
            // The service's name is that of the configured service at the same key.
            if let Some(cfg) = self.base.services.iter().find(|s| service_key(s) == key) {
                names.insert(svc.id, cfg.name.clone());
            }
        }
        let mut out = HashMap::new();
        for ((sid, _), (_, be)) in by_addr {
            if let Some(name) = names.get(&sid) {
                out.insert((name.clone(), ip_from_words(&be.addr, be.family)), be);
            }
        }
        Ok(out)
    }

    /// Backends the kernel has for a configured service but neither the
    /// config nor the state file names (the state file was lost or edited):
    /// dropping them would move their clients, so they are kept draining.
    fn find_orphans(
        &mut self,
        kernel: &HashMap<(String, IpAddr), lb_common::Backend>,
    ) -> Result<()> {
        let cfg = self.effective_config()?;
        self.orphans.clear();
        for ((service, addr), be) in kernel {
            let Some(svc) = cfg.services.iter().find(|s| &s.name == service) else {
                continue;
            };
            if svc.backends.iter().any(|b| b.address == *addr) || be.state == BACKEND_DOWN {
                continue;
            }
            let mut name = addr.to_string();
            if svc.backends.iter().any(|b| b.name == name) {
                name = format!("orphan-{addr}");
            }
            tracing::warn!(
                service = %service,
                backend = %addr,
                "backend {addr} of {service} is in the kernel but in neither the config nor the state file \
                 (was the state file lost?); keeping it draining so its clients stay until idle \
                 (`xlb backend remove {service} {name}` drops it now)"
            );
            self.orphans
                .entry(service.clone())
                .or_default()
                .push(BackendConfig {
                    name,
                    address: *addr,
                    mac: be.mac,
                    weight: be.weight.max(1),
                    state: BackendState::Draining,
                });
        }
        Ok(())
    }

    /// The config with the runtime changes applied (states not yet derived).
    pub(super) fn effective_config(&self) -> Result<Config> {
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
                    mac: if added.mac.is_empty() {
                        [0; 6]
                    } else {
                        parse_mac(&added.mac)
                            .with_context(|| format!("state file: backend {}", added.name))?
                    },
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

    pub(super) fn derived(&self, service: &str, be: &BackendConfig) -> Derived {
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
            health: self.health_of(&r),
        }
    }

    /// The config the kernel should have at `now` (see [`Lb::desired`]).
    pub(super) fn desired_config(&self, now: Instant) -> Result<Config> {
        self.desired(now).map(|(cfg, _)| cfg)
    }

    /// The config as the kernel should see it at `now`: every backend's state
    /// derived from its admin state and health, panic mode decided, orphans
    /// added as draining. Returns the panic memory to keep with it.
    fn desired(&self, now: Instant) -> Result<(Config, BTreeMap<String, Panic>)> {
        let mut cfg = self.effective_config()?;
        let mut panics = BTreeMap::new();
        for svc in &mut cfg.services {
            let derived: Vec<Derived> = svc
                .backends
                .iter()
                .map(|b| self.derived(&svc.name, b))
                .collect();
            let panic = match &svc.health {
                Some(spec) => {
                    let in_service: Vec<Option<bool>> = derived
                        .iter()
                        .filter(|d| d.admin != Admin::Maint)
                        .map(|d| d.health)
                        .collect();
                    let grace = spec.interval.saturating_mul(spec.rise + spec.fall);
                    let prev = self.panic.get(&svc.name).copied().unwrap_or_default();
                    panic_step(prev, &in_service, now, grace)
                }
                None => Panic::default(),
            };
            for (be, d) in svc.backends.iter_mut().zip(&derived) {
                be.state = match d.admin {
                    Admin::Maint => BackendState::Down,
                    // In panic mode black-holing the VIP helps nobody: all are used.
                    _ if d.health == Some(false) && !panic.active => BackendState::Down,
                    Admin::Draining { .. } => BackendState::Draining,
                    Admin::Active => BackendState::Active,
                };
            }
            if let Some(orphans) = self.orphans.get(&svc.name) {
                svc.backends.extend(orphans.iter().cloned());
            }
            if panic != Panic::default() {
                panics.insert(svc.name.clone(), panic);
            }
        }
        Ok((cfg, panics))
    }

    /// Which VIPs this node is ready to serve, and why (see
    /// [`crate::announce::readiness`]): judged on what the kernel was last
    /// given, so a VIP is announced only once its backends are written.
    pub fn vip_readiness(&self) -> BTreeMap<IpAddr, crate::announce::Readiness> {
        let mut ready =
            crate::announce::readiness(&self.writer.effective().services, |service, backend| {
                self.health_of(&BackendRef {
                    service: service.to_string(),
                    backend: backend.to_string(),
                }) == Some(false)
            });
        if self.cluster.enabled && !self.cluster.synced {
            // Announcing before the peers' sessions are here would send their
            // clients with divergent entries to a node that does not know them.
            for r in ready.values_mut() {
                *r = crate::announce::Readiness {
                    ready: false,
                    reason: "waiting for the cluster's full sync".into(),
                };
            }
        }
        ready
    }

    /// Creates health records for checked backends, drops stale ones. A new
    /// record starts as the kernel has the backend: down if it is DOWN there
    /// (a previous daemon marked it), up if it serves there, and down until
    /// it passes `rise` checks if the kernel does not know it yet but knows
    /// other backends of its service (added at runtime or by a reload).
    pub(super) fn sync_health(
        &mut self,
        kernel: &HashMap<(String, IpAddr), lb_common::Backend>,
    ) -> Result<()> {
        let cfg = self.effective_config()?;
        let mut keep = BTreeSet::new();
        for svc in &cfg.services {
            let Some(spec) = &svc.health else { continue };
            let known = kernel.keys().any(|(s, _)| *s == svc.name);
            for be in &svc.backends {
                let r = BackendRef {
                    service: svc.name.clone(),
                    backend: be.name.clone(),
                };
                keep.insert(r.clone());
                if self.health.contains_key(&r) {
                    continue;
                }
                let health = match kernel.get(&(svc.name.clone(), be.address)) {
                    Some(k) if k.state == BACKEND_DOWN => {
                        tracing::warn!(backend = %r, "backend starts down: the previous daemon had marked it down");
                        Health::down("down before the daemon (re)started")
                    }
                    Some(_) => Health::up(),
                    None if !known => Health::up(),
                    None => {
                        tracing::info!(backend = %r, "new backend starts down until {} successful checks", spec.rise);
                        Health::down(format!(
                            "new: waiting for {} successful {} checks",
                            spec.rise, spec.kind
                        ))
                    }
                };
                self.health.insert(r, health);
            }
        }
        self.health.retain(|r, _| keep.contains(r));
        Ok(())
    }

    /// What the health-check tasks should be checking now.
    /// The next hops this daemon knows.
    pub fn hops(&self) -> &Hops {
        &self.hops
    }

    /// The backends whose next hop comes from the kernel.
    pub fn hop_targets(&self) -> Vec<Target> {
        self.effective_config()
            .map(|cfg| hops::targets(&cfg))
            .unwrap_or_default()
    }

    /// Takes a new set of resolved next hops; writes the records it changes.
    pub fn set_hops(&mut self, hops: Hops) -> Result<()> {
        if hops == self.hops {
            return Ok(());
        }
        self.hops = hops;
        self.apply()
    }

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
                    vip: SocketAddr::new(svc.vip, spec.port),
                    spec: spec.clone(),
                    source: self.sources.for_backend(spec.source, be.address),
                });
            }
        }
        out
    }

    /// Writes the desired state; rewrites the sessions of backends that just
    /// became unusable. The backend records are written before this returns;
    /// the rest (the divergent scan, the flip, purges, the rewrite) goes on
    /// in [`Lb::work`] between messages where it walks many sessions. Asked
    /// while another apply is under way: the new backend records are written
    /// at once (a failure is down in the kernel without waiting for those
    /// walks) and the whole apply follows when the one under way is done. On
    /// failure the daemon is dirty and reconcile retries.
    pub fn apply(&mut self) -> Result<()> {
        self.writer.ask();
        if self.writer.applying() {
            let (cfg, _) = self.desired(Instant::now())?;
            return self.writer.write_records(&cfg, &self.hops);
        }
        self.start_apply()?;
        // At lab scale the walks fit one budget: the apply is complete here.
        self.work_for(WORK_BUDGET)
    }

    /// Whether an apply or a sweep is under way (the owner then calls [`Lb::work`]).
    pub fn busy(&self) -> bool {
        self.writer.busy()
    }

    /// Applies asked for so far (see [`Lb::outcome`]).
    pub fn asked(&self) -> u64 {
        self.writer.asked()
    }

    /// How the `generation`th apply ended: `None` while it is under way or
    /// waiting, `Err` with why if writing it failed.
    pub fn outcome(&self, generation: u64) -> Option<Result<(), String>> {
        self.writer.outcome(generation)
    }

    /// Goes on with the apply under way for about `budget` sessions read;
    /// a failure is logged, the daemon is dirty and reconcile retries.
    pub fn work(&mut self, budget: usize) {
        if let Err(e) = self.work_for(budget) {
            tracing::error!("applying the desired state failed (reconcile retries): {e:#}");
        }
    }

    /// Finishes the apply under way, however many sessions it walks.
    pub fn settle(&mut self) -> Result<()> {
        while self.writer.applying() {
            self.work_for(usize::MAX)?;
        }
        Ok(())
    }

    /// [`Lb::work`], with the failure returned.
    fn work_for(&mut self, budget: usize) -> Result<()> {
        if self.writer.work(budget)? == Progress::Again {
            self.start_apply()?;
        }
        Ok(())
    }

    /// Starts an apply of the desired state now, and keeps what it decided
    /// (panic modes, the basis of session counts, the fingerprint).
    fn start_apply(&mut self) -> Result<()> {
        let (cfg, panic) = self.desired(Instant::now())?;
        let was_panic: BTreeSet<&String> = self
            .panic
            .iter()
            .filter(|(_, p)| p.active)
            .map(|(s, _)| s)
            .collect();
        let is_panic: BTreeSet<&String> = panic
            .iter()
            .filter(|(_, p)| p.active)
            .map(|(s, _)| s)
            .collect();
        let entered: Vec<String> = is_panic
            .difference(&was_panic)
            .map(|s| (*s).clone())
            .collect();
        let left: Vec<String> = was_panic
            .difference(&is_panic)
            .map(|s| (*s).clone())
            .collect();
        drop((was_panic, is_panic));
        let fingerprint = crate::cluster::fingerprint::of(&cfg);
        self.writer.start(cfg, &self.hops, entered.clone())?;
        for svc in &entered {
            tracing::error!(
                service = %svc,
                "PANIC MODE: every backend of service {svc} fails its health checks; forwarding to all of them as if healthy rather than dropping the traffic"
            );
        }
        for svc in &left {
            tracing::warn!(service = %svc, "service {svc} left panic mode: its backends pass their checks again (or the grace period for the rest passed)");
        }
        self.panic = panic;
        self.cluster.fingerprint = fingerprint;
        // After the records' write: a count begun before it may miss the
        // clients a just-drained backend drew until then.
        self.counts.note(self.count_basis(), Instant::now());
        Ok(())
    }

    /// Compares the kernel with the desired state and repairs what differs:
    /// missing pins (re-pinned from the descriptors this daemon holds), a
    /// write that failed earlier (retried), and records or tables someone
    /// else changed. Returns the number of repairs.
    pub fn reconcile(&mut self) -> Result<u64> {
        let mut fixed = self.writer.repair_pins()?;
        if self.writer.applying() {
            // The apply under way writes the desired state; compared after it.
            return Ok(fixed);
        }
        if let Some(why) = self.writer.dirty().map(str::to_owned) {
            tracing::info!("retrying the write that failed: {why}");
            self.apply()?;
            self.writer.count_repair("retried_write", 1);
            fixed += 1;
        } else {
            fixed += self.writer.compare(&self.hops)?;
        }
        self.writer.start_sweep()?;
        Ok(fixed)
    }

    /// Before exiting: make sure the link stays pinned, so the dataplane
    /// keeps forwarding without the daemon.
    pub fn shutdown(&mut self) {
        self.writer.shutdown();
    }

    /// The one writer of the pinned maps (ids, repairs, protection totals).
    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// The session counts, as the counter thread last sent them.
    pub(super) fn counts(&self) -> &Book {
        &self.counts
    }

    /// Keeps a count from the counter thread.
    pub fn record_counts(&mut self, counted: Arc<Counted>) {
        self.counts.record(counted);
    }

    /// Whether something waits for session counts: a drain that ends when
    /// its backend has none left, an orphan kept until it has none.
    pub fn wants_counts(&self) -> bool {
        !self.orphans.is_empty() || self.draining().next().is_some()
    }

    /// The backends the state file has draining.
    fn draining(&self) -> impl Iterator<Item = BackendRef> + '_ {
        self.state.services.iter().flat_map(|(svc, over)| {
            over.admin
                .iter()
                .filter(|(_, a)| matches!(a, Admin::Draining { .. }))
                .map(move |(name, _)| BackendRef {
                    service: svc.clone(),
                    backend: name.clone(),
                })
        })
    }

    /// What counts are judged against (see [`Basis`]).
    fn count_basis(&self) -> Basis {
        let mut ids: Vec<(BackendRef, u32)> = self
            .writer
            .backend_ids()
            .iter()
            .map(|(r, id)| (r.clone(), *id))
            .collect();
        ids.sort();
        let draining = self.draining().collect();
        let orphans = self
            .orphans
            .iter()
            .flat_map(|(svc, list)| {
                list.iter().map(move |b| BackendRef {
                    service: svc.clone(),
                    backend: b.name.clone(),
                })
            })
            .collect();
        Basis {
            ids,
            draining,
            orphans,
        }
    }

    /// Feeds one health-check result; true on a transition, which the
    /// caller applies (once for every result queued together).
    pub fn feed_health(&mut self, r: &BackendRef, result: Result<Duration, String>) -> bool {
        let Some(svc) = self.effective_service(&r.service) else {
            return false;
        };
        let Some(spec) = svc.health.clone() else {
            return false;
        };
        let target = svc
            .backends
            .iter()
            .find(|b| b.name == r.backend)
            .map_or_else(
                || r.to_string(),
                |b| SocketAddr::new(b.address, spec.port).to_string(),
            );
        let Some(h) = self.health.get_mut(r) else {
            // A check of a backend removed meanwhile.
            return false;
        };
        if let Err(why) = &result {
            if h.up {
                tracing::debug!(backend = %r, failures = h.failures + 1, "check failed: {why}");
            }
        }
        match h.feed(&result, spec.rise, spec.fall, &spec.kind.to_string()) {
            Some(Transition::Up(why)) => {
                tracing::info!(backend = %r, "backend {target} up: {why}");
            }
            Some(Transition::Down(why)) => {
                tracing::warn!(backend = %r, "backend {target} down: {why}");
            }
            None => return false,
        }
        true
    }

    /// Once a second: finishes drains whose backend has no sessions left or
    /// whose deadline passed, lets go of idle orphans, and ends panic modes
    /// whose grace period passed.
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
        if self.cluster.enabled {
            // Drains end cluster-wide, when no node has sessions left on the
            // backend: the coordinator decides (`daemon/clustering.rs`).
            draining.clear();
        }
        let mut changed = false;
        if !draining.is_empty() || !self.orphans.is_empty() {
            // Only a count begun after the drains and orphans were last set
            // can end one (`counts::Basis`).
            let counts = self.counts.valid();
            let mut finished = Vec::new();
            for (r, deadline) in draining {
                let Some(id) = self.writer.backend_ids().get(&r) else {
                    continue;
                };
                let left = counts.map(|c| c.of(*id));
                if let Some(why) = drain_over(left, deadline, now) {
                    finished.push((r, why));
                }
            }
            if !finished.is_empty() {
                let mut new = self.state.clone();
                for (r, _) in &finished {
                    new.service_mut(&r.service)
                        .admin
                        .insert(r.backend.clone(), Admin::Maint);
                }
                // Saved first: a drain that cannot be recorded is retried next tick.
                self.save(&mut new)
                    .context("finishing a drain: nothing changed, retrying next tick")?;
                for (r, why) in finished {
                    tracing::info!(backend = %r, "drain of {r} finished: {why}; now maint");
                }
                self.state = new;
                changed = true;
            }
            let ids = self.writer.backend_ids();
            let counts = self.counts.valid();
            for (service, list) in &mut self.orphans {
                list.retain(|b| {
                    let r = BackendRef {
                        service: service.clone(),
                        backend: b.name.clone(),
                    };
                    // Uncounted: kept, as if it had sessions.
                    let Some(counts) = counts else {
                        return true;
                    };
                    let left = ids.get(&r).map_or(0, |id| counts.of(*id));
                    if left == 0 {
                        tracing::info!(backend = %r, "orphan backend {r} has no sessions left; removing it");
                        changed = true;
                    }
                    left > 0
                });
            }
            self.orphans.retain(|_, l| !l.is_empty());
        }
        if !changed {
            // A panic mode waiting for its grace period to pass.
            let waiting = self
                .panic
                .values()
                .any(|p| p.active && p.first_up.is_some());
            if waiting {
                let (_, next) = self.desired(Instant::now())?;
                changed = next.values().filter(|p| p.active).count()
                    != self.panic.values().filter(|p| p.active).count();
            }
        }
        if changed {
            self.apply()?;
        }
        Ok(())
    }

    /// Writes `state` to the state file (pruned), atomically.
    pub(super) fn save(&self, state: &mut State) -> Result<()> {
        state.prune();
        state.save(&self.base.state_file)
    }

    /// Backends of every service currently in effect.
    fn backend_count(&self) -> usize {
        self.writer
            .effective()
            .services
            .iter()
            .map(|s| s.backends.len())
            .sum()
    }

    /// After a failed change the previous `what` (state or config) is back
    /// in `self`: writes it to the kernel again, logging if even that fails
    /// (reconcile keeps retrying).
    fn reapply_restored(&mut self, what: &str) {
        if let Err(e) = self
            .kernel_backends()
            .and_then(|k| self.sync_health(&k))
            .and_then(|()| self.apply())
        {
            tracing::error!("restoring the previous {what} failed too: {e:#}");
        }
    }

    /// Service `name` as currently in effect (config plus runtime changes).
    pub(super) fn effective_service(&self, name: &str) -> Option<&crate::config::ServiceConfig> {
        self.writer
            .effective()
            .services
            .iter()
            .find(|s| s.name == name)
    }

    /// Like [`Self::effective_service`], failing with a message naming it.
    fn service(&self, name: &str) -> Result<&crate::config::ServiceConfig> {
        self.effective_service(name).ok_or_else(|| {
            Failure::new(FailureKind::NotFound, format!("no service named {name:?}")).into()
        })
    }

    fn find(&self, service: &str, backend: &str) -> Result<BackendRef> {
        let svc = self.service(service)?;
        if !svc.backends.iter().any(|b| b.name == backend) {
            return Err(Failure::new(
                FailureKind::NotFound,
                format!("service {service:?} has no backend named {backend:?}"),
            )
            .into());
        }
        Ok(BackendRef {
            service: service.to_string(),
            backend: backend.to_string(),
        })
    }

    /// Makes a runtime change as a transaction: `change` edits a copy of the
    /// state, which is written to the state file first (a change that cannot
    /// be recorded is not made, so a restart never silently undoes it), then
    /// to the kernel; if that fails, the previous state is restored on disk
    /// and in the kernel.
    fn change(&mut self, change: impl FnOnce(&mut State)) -> Result<()> {
        let mut new = self.state.clone();
        change(&mut new);
        if self.cluster.proposing {
            // A cluster change: every node applies it after the prepare round.
            self.cluster.proposal = Some(new);
            return Ok(());
        }
        self.save(&mut new)
            .context("the change was not applied: the state file could not be written")?;
        let old = std::mem::replace(&mut self.state, new);
        let result = self
            .kernel_backends()
            .and_then(|k| self.sync_health(&k))
            .and_then(|()| self.apply());
        if let Err(e) = result {
            self.state = old;
            let mut restore = self.state.clone();
            if let Err(se) = self.save(&mut restore) {
                tracing::error!("restoring the previous state file failed: {se:#}");
            }
            self.reapply_restored("state");
            return Err(e.context("the change was rolled back"));
        }
        Ok(())
    }

    /// One runtime change request (`xlb backend add|remove|drain|undrain|weight`);
    /// what the CLI prints.
    pub fn runtime_change(&mut self, req: crate::api::Request) -> Result<String> {
        use crate::api::Request;
        match req {
            Request::BackendAdd {
                service,
                name,
                address,
                mac,
                weight,
            } => self.backend_add(&service, name, address, &mac, weight),
            Request::BackendRemove { service, backend } => self.backend_remove(&service, &backend),
            Request::BackendDrain {
                service,
                backend,
                deadline_ms,
            } => self.backend_drain(&service, &backend, deadline_ms.map(Duration::from_millis)),
            Request::BackendUndrain { service, backend } => {
                self.backend_undrain(&service, &backend)
            }
            Request::BackendWeight {
                service,
                backend,
                weight,
            } => self.backend_weight(&service, &backend, weight),
            other => bail!("{other:?} is not a runtime change"),
        }
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
        let added = self
            .added_backend(service, name, address, mac, weight)
            .map_err(tag(FailureKind::Invalid))?;
        let name = added.name.clone();
        self.change(|st| {
            let s = st.service_mut(service);
            s.removed.retain(|n| *n != name);
            s.admin.remove(&name);
            s.weights.remove(&name);
            s.added.push(added);
        })?;
        Ok(format!("added backend {name} ({address}) to {service}"))
    }

    /// The backend `xlb backend add` asks for, validated against `service`.
    fn added_backend(
        &self,
        service: &str,
        name: Option<String>,
        address: IpAddr,
        mac: &str,
        weight: Option<u16>,
    ) -> Result<AddedBackend> {
        let svc = self.service(service)?;
        let name = name.unwrap_or_else(|| address.to_string());
        if !valid_backend_name(&name) {
            bail!("backend name {name:?} is not valid (1 to 64 of A-Z a-z 0-9 _ . : -)");
        }
        validate_backend_address("address", address, svc.vip, &self.base.vips())?;
        let mac = if mac.is_empty() {
            String::new()
        } else {
            if svc.forward_mode == ForwardMode::Ipip {
                bail!(
                    "service {service} forwards by ipip: its backends' frames go to the next hop of the \
                     kernel's route, so a backend has no MAC to give (leave out --mac)"
                );
            }
            let mac_bytes = validate_mac("mac", mac)?;
            let own_mac = dataplane::interface_mac(&self.base.interface)?;
            check_not_own_mac("mac", mac_bytes, own_mac, &self.base.interface)?;
            format_mac(&mac_bytes)
        };
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
        if self.backend_count() >= BACKEND_CAPACITY as usize {
            bail!("xlb supports at most {BACKEND_CAPACITY} backends in total");
        }
        Ok(AddedBackend {
            name,
            address,
            mac,
            weight,
        })
    }

    /// `xlb backend remove`.
    pub fn backend_remove(&mut self, service: &str, backend: &str) -> Result<String> {
        let r = self.find(service, backend)?;
        if let Some(list) = self.orphans.get_mut(service) {
            if let Some(i) = list.iter().position(|b| b.name == backend) {
                list.remove(i);
                self.orphans.retain(|_, l| !l.is_empty());
                self.apply()?;
                return Ok(format!(
                    "removed orphan backend {r}; its clients move to their Maglev choice"
                ));
            }
        }
        let svc_len = self
            .effective_service(service)
            .map_or(0, |s| s.backends.len());
        if svc_len <= 1 {
            return Err(Failure::new(
                FailureKind::Invalid,
                format!("{r} is the last backend of {service}; a service needs at least one"),
            )
            .into());
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
            validate_deadline(d).map_err(tag(FailureKind::Invalid))?;
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
        validate_weight("weight", weight).map_err(tag(FailureKind::Invalid))?;
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
        // announce_table and [cluster] were once accepted here and silently
        // ignored: every field is now on one side of `boot_changes`.
        let fixed = self.base.boot_changes(&new);
        if !fixed.is_empty() {
            bail!(
                "{} changed: {} cannot change while the daemon runs (restart it; xdp_mode \
                 applies only when XDP is attached anew); nothing applied",
                fixed.join(", "),
                if fixed.len() == 1 { "it" } else { "they" }
            );
        }
        let own_mac = dataplane::interface_mac(&new.interface)?;
        new.check_against_interface(own_mac)?;
        // A backend the config now names itself is the config's from here on.
        let mut state = self.state.clone();
        for svc in &new.services {
            if let Some(over) = state.services.get_mut(&svc.name) {
                over.added.retain(|a| {
                    !svc.backends
                        .iter()
                        .any(|b| b.name == a.name || b.address == a.address)
                });
            }
        }
        state
            .validate(&new)
            .context("the state file does not fit the new config; nothing applied")?;
        if state != self.state {
            self.save(&mut state)
                .context("reload not applied: the state file could not be written")?;
        }
        let old_base = std::mem::replace(&mut self.base, new);
        let old_state = std::mem::replace(&mut self.state, state);
        // VIPs or the configured sources may have changed.
        self.sources = SourceDefaults::detect(&self.base);
        let result = self
            .kernel_backends()
            .and_then(|k| self.sync_health(&k))
            .and_then(|()| self.apply());
        if let Err(e) = result {
            self.base = old_base;
            self.state = old_state;
            let mut restore = self.state.clone();
            if let Err(se) = self.save(&mut restore) {
                tracing::error!("restoring the previous state file failed: {se:#}");
            }
            self.reapply_restored("config");
            return Err(e.context("applying the new config failed; the previous one is back"));
        }
        Ok(format!(
            "reloaded {}: {} services, {} backends",
            self.config_path.display(),
            self.writer.effective().services.len(),
            self.backend_count()
        ))
    }

    /// `xlb sessions flush`.
    pub fn flush(&mut self, service: Option<&str>, backend: Option<&str>) -> Result<String> {
        // An apply under way may be about to protect sessions flushed here.
        self.settle()?;
        let (sid, bids) = self.id_filters(service, backend)?;
        let n = self.writer.flush(sid, bids.as_ref())?;
        tracing::info!(sessions = n, "flushed sessions");
        Ok(format!("flushed {n} sessions"))
    }
}
