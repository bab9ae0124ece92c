//! Prometheus metrics at `http://<metrics_address>/metrics`.
//!
//! Kernel counters are read at scrape time (they live in per-CPU maps, so
//! there is nothing to keep in userspace) into a fresh registry; only the
//! health-check latency histograms, which exist nowhere else, are kept
//! between scrapes. Encoding is prometheus-client's; the HTTP side is
//! [`super::http`].

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::accept::ServerStats;
use super::health::CheckOutcome;
use super::http::{self, HttpLimits};
use super::lb::{BackendRef, Lb};
use super::owner::Handle;
use lb_common::stat;

type Labels = Vec<(String, String)>;

fn histogram() -> Histogram {
    // 0.5 ms .. ~4 s: a local check is sub-millisecond, a timeout is seconds.
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// Metrics kept between scrapes.
pub struct Metrics {
    /// The daemon's listeners (control socket, metrics endpoint) and their counters.
    listeners: std::sync::Mutex<Vec<(&'static str, Arc<ServerStats>)>>,
    check_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    check_failures: Family<Labels, Counter>,
    /// Checks this host could not run (local errors): never counted as failures.
    checks_not_run: Family<Labels, Counter>,
    /// VIPs announced in `announce_table` (set by the announcer); `None`: not announcing.
    announced: std::sync::Mutex<Option<std::collections::BTreeSet<std::net::IpAddr>>>,
    /// The cluster as last seen by the cluster task; `None`: no `[cluster]`.
    cluster: std::sync::Mutex<Option<crate::api::ClusterInfo>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            check_seconds: Family::new_with_constructor(histogram as fn() -> Histogram),
            check_failures: Family::default(),
            checks_not_run: Family::default(),
            listeners: std::sync::Mutex::new(Vec::new()),
            announced: std::sync::Mutex::new(None),
            cluster: std::sync::Mutex::new(None),
        }
    }
}

fn labels(r: &BackendRef) -> Labels {
    vec![
        ("service".to_string(), r.service.clone()),
        ("backend".to_string(), r.backend.clone()),
    ]
}

impl Metrics {
    /// Exports the counters of a listener (`control`, `metrics`).
    pub fn add_listener(&self, name: &'static str, stats: Arc<ServerStats>) {
        self.listeners().push((name, stats));
    }

    fn listeners(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, Arc<ServerStats>)>> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records which VIPs are announced now (held only for the assignment).
    pub fn set_announced(&self, vips: std::collections::BTreeSet<std::net::IpAddr>) {
        *self.announced.lock().unwrap_or_else(|p| p.into_inner()) = Some(vips);
    }

    /// Records the cluster's state (once a second, from the cluster task).
    pub fn set_cluster(&self, info: crate::api::ClusterInfo) {
        *self.cluster.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
    }

    /// Records one health-check outcome.
    pub fn observe_check(&self, r: &BackendRef, outcome: &CheckOutcome) {
        match outcome {
            CheckOutcome::Pass(latency) => {
                self.check_seconds
                    .get_or_create(&labels(r))
                    .observe(latency.as_secs_f64());
            }
            CheckOutcome::Fail(_) => {
                self.check_failures.get_or_create(&labels(r)).inc();
            }
            CheckOutcome::NotRun(_) => {
                self.checks_not_run.get_or_create(&labels(r)).inc();
            }
        }
    }

    /// The whole exposition text.
    pub fn render(&self, lb: &Lb) -> Result<String> {
        let mut reg = Registry::with_prefix("xlb");
        let snap = lb.stats()?;
        let services = lb.services();
        let backends = lb.backends(None)?;

        let verdicts = Family::<Labels, Counter>::default();
        let drops = Family::<Labels, Counter>::default();
        let reselect = Family::<Labels, Counter>::default();
        let hits = Counter::<u64>::default();
        let misses = Counter::<u64>::default();
        let protected_hits = Counter::<u64>::default();
        let admitted = Counter::<u64>::default();
        let skipped = Counter::<u64>::default();
        for (i, (name, value)) in snap.reasons.iter().enumerate() {
            verdicts
                .get_or_create(&vec![("reason".to_string(), name.clone())])
                .inc_by(*value);
            if let Some(reason) = name.strip_prefix("drop_") {
                drops
                    .get_or_create(&vec![("reason".to_string(), reason.to_string())])
                    .inc_by(*value);
            }
            match i as u32 {
                stat::AFFINITY_HIT => {
                    hits.inc_by(*value);
                }
                stat::AFFINITY_HIT_PROTECTED => {
                    hits.inc_by(*value);
                    protected_hits.inc_by(*value);
                }
                stat::AFFINITY_ADMITTED => {
                    admitted.inc_by(*value);
                }
                stat::AFFINITY_ADMISSION_SKIPPED => {
                    skipped.inc_by(*value);
                }
                stat::NEW_SESSION => {
                    misses.inc_by(*value);
                }
                stat::RESELECT_EXPIRED => {
                    reselect
                        .get_or_create(&vec![("reason".to_string(), "expired".to_string())])
                        .inc_by(*value);
                }
                stat::RESELECT_DOWN => {
                    reselect
                        .get_or_create(&vec![("reason".to_string(), "backend_down".to_string())])
                        .inc_by(*value);
                }
                stat::RESELECT_FOREIGN => {
                    reselect
                        .get_or_create(&vec![("reason".to_string(), "foreign_backend".to_string())])
                        .inc_by(*value);
                }
                _ => {}
            }
        }
        reg.register(
            "frames",
            "Frames by dataplane verdict or reason (every frame counts once)",
            verdicts,
        );
        reg.register("drops", "Frames dropped, by reason", drops);
        reg.register("affinity_hits", "Frames that found their session", hits);
        reg.register(
            "affinity_misses",
            "Frames of clients without a session (Maglev choice recorded)",
            misses,
        );
        reg.register(
            "affinity_reselections",
            "Sessions re-selected by the kernel, by reason",
            reselect,
        );
        reg.register(
            "affinity_protected_hits",
            "Frames whose session was found in the protected map (backend differs from the Maglev answer)",
            protected_hits,
        );
        reg.register(
            "affinity_admitted",
            "Sessions inserted into the affinity LRU",
            admitted,
        );
        reg.register(
            "affinity_admission_skipped",
            "New clients forwarded by their Maglev answer without a session: the service's per-CPU admission budget (affinity_admit_rate) was spent",
            skipped,
        );
        let p = lb.writer().protection();
        let kept = Counter::<u64>::default();
        kept.inc_by(p.kept);
        reg.register(
            "affinity_divergent_kept",
            "Sessions moved into the protected map because a new Maglev table would have moved them",
            kept,
        );
        let released = Counter::<u64>::default();
        released.inc_by(p.released + p.swept);
        reg.register(
            "affinity_protected_released",
            "Protected sessions released (equal to the Maglev answer again, expired, or backend gone)",
            released,
        );
        let full = Counter::<u64>::default();
        full.inc_by(p.overflow);
        reg.register(
            "affinity_protected_full",
            "Divergent sessions left in the LRU because the protected map was full",
            full,
        );
        let entries = Family::<Labels, Gauge>::default();
        for svc in &services {
            let n = p.per_service.get(&svc.id).copied().unwrap_or(0);
            entries
                .get_or_create(&vec![("service".to_string(), svc.name.clone())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        reg.register(
            "affinity_protected_entries",
            "Sessions in the protected map, per service (as of the last table change or sweep)",
            entries,
        );

        let svc_packets = Family::<Labels, Counter>::default();
        let svc_bytes = Family::<Labels, Counter>::default();
        let svc_new = Family::<Labels, Counter>::default();
        let panic = Family::<Labels, Gauge>::default();
        for svc in &services {
            let l = vec![("service".to_string(), svc.name.clone())];
            panic.get_or_create(&l).set(i64::from(svc.panic));
            if let Some((_, t)) = snap.services.iter().find(|(id, _)| *id == svc.id) {
                svc_packets.get_or_create(&l).inc_by(t.packets);
                svc_bytes.get_or_create(&l).inc_by(t.bytes);
                svc_new.get_or_create(&l).inc_by(t.new_sessions);
            }
        }
        reg.register(
            "service_packets",
            "Frames forwarded per service",
            svc_packets,
        );
        reg.register("service_bytes", "Bytes forwarded per service", svc_bytes);
        reg.register(
            "service_new_sessions",
            "Sessions created per service",
            svc_new,
        );
        reg.register(
            "service_panic",
            "1 while every backend of the service fails its checks (all used anyway)",
            panic,
        );

        let announced = self
            .announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(announced) = announced {
            let vips = Family::<Labels, Gauge>::default();
            let configured = lb.vip_readiness().into_keys();
            for vip in configured.chain(announced.iter().copied()) {
                let l = vec![("vip".to_string(), vip.to_string())];
                vips.get_or_create(&l)
                    .set(i64::from(announced.contains(&vip)));
            }
            reg.register(
                "vip_announced",
                "1 while the VIP's route is in announce_table (this node is ready to serve it)",
                vips,
            );
        }

        let cluster = self
            .cluster
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(info) = cluster {
            register_cluster(&mut reg, &info);
        }

        let be_packets = Family::<Labels, Counter>::default();
        let be_bytes = Family::<Labels, Counter>::default();
        let be_new = Family::<Labels, Counter>::default();
        let be_sessions = Family::<Labels, Gauge>::default();
        let be_healthy = Family::<Labels, Gauge>::default();
        let be_state = Family::<Labels, Gauge>::default();
        for b in &backends {
            let l = vec![
                ("service".to_string(), b.service.clone()),
                ("backend".to_string(), b.name.clone()),
            ];
            if let Some((_, t)) = snap.backends.iter().find(|(id, _)| *id == b.id) {
                be_packets.get_or_create(&l).inc_by(t.packets);
                be_bytes.get_or_create(&l).inc_by(t.bytes);
                be_new.get_or_create(&l).inc_by(t.new_sessions);
            }
            be_sessions
                .get_or_create(&l)
                .set(i64::try_from(b.sessions).unwrap_or(i64::MAX));
            if b.health != "unchecked" {
                be_healthy
                    .get_or_create(&l)
                    .set(i64::from(b.health == "up"));
            }
            for state in ["active", "draining", "down"] {
                let mut ls = l.clone();
                ls.push(("state".to_string(), state.to_string()));
                be_state.get_or_create(&ls).set(i64::from(b.state == state));
            }
        }
        reg.register(
            "backend_packets",
            "Frames forwarded per backend",
            be_packets,
        );
        reg.register("backend_bytes", "Bytes forwarded per backend", be_bytes);
        reg.register(
            "backend_new_sessions",
            "Sessions created per backend",
            be_new,
        );
        reg.register(
            "backend_sessions",
            "Fresh sessions (affinity entries) pointing at the backend",
            be_sessions,
        );
        reg.register(
            "backend_healthy",
            "1 if the backend passes its health checks, 0 if not (checked backends only)",
            be_healthy,
        );
        reg.register(
            "backend_state",
            "The backend's state in the kernel (1 for the current one)",
            be_state,
        );

        let repairs = Family::<Labels, Counter>::default();
        for (what, n) in lb.writer().repairs() {
            repairs
                .get_or_create(&vec![("what".to_string(), (*what).to_string())])
                .inc_by(*n);
        }
        reg.register(
            "reconcile_repairs",
            "Differences between the kernel and the desired state that reconcile repaired, by what",
            repairs,
        );
        let write_failures = Counter::<u64>::default();
        write_failures.inc_by(lb.writer().write_failures());
        reg.register(
            "dataplane_write_failures",
            "Writes to the kernel that failed (each is retried by reconcile)",
            write_failures,
        );
        let in_sync = Gauge::<i64>::default();
        in_sync.set(i64::from(lb.writer().dirty().is_none()));
        reg.register(
            "dataplane_in_sync",
            "1 when the kernel holds the desired state, 0 while a failed write waits for its retry",
            in_sync,
        );

        let conns = Family::<Labels, Counter>::default();
        let accept_errors = Family::<Labels, Counter>::default();
        for (name, st) in self.listeners().iter() {
            for (outcome, counter) in [("served", &st.served), ("refused", &st.refused)] {
                conns
                    .get_or_create(&vec![
                        ("listener".to_string(), (*name).to_string()),
                        ("outcome".to_string(), outcome.to_string()),
                    ])
                    .inc_by(ServerStats::get(counter));
            }
            accept_errors
                .get_or_create(&vec![("listener".to_string(), (*name).to_string())])
                .inc_by(ServerStats::get(&st.accept_errors));
        }
        reg.register(
            "listener_connections",
            "Connections to the control socket and the metrics endpoint: served, or refused over the cap",
            conns,
        );
        reg.register(
            "listener_accept_errors",
            "accept() calls that failed (out of descriptors, ...); each backs the accept loop off",
            accept_errors,
        );

        let mut out = String::new();
        encode_registry(&mut out, &reg).context("encoding metrics")?;
        let mut kept = Registry::with_prefix("xlb");
        kept.register(
            "health_check_duration_seconds",
            "Latency of successful health checks",
            self.check_seconds.clone(),
        );
        kept.register(
            "health_check_failures",
            "Failed health checks",
            self.check_failures.clone(),
        );
        kept.register(
            "health_checks_not_run",
            "Health checks not run for a local error (no descriptors, buffers or route; source address gone); not counted against the backend",
            self.checks_not_run.clone(),
        );
        encode_registry(&mut out, &kept).context("encoding metrics")?;
        encode_eof(&mut out).context("encoding metrics")?;
        Ok(out)
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .context("creating the metrics socket")?;
    socket
        .set_reuseaddr(true)
        .context("setting SO_REUSEADDR on the metrics socket")?;
    socket
        .bind(addr)
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    // A burst of connections larger than tokio's default backlog (128) would
    // have SYNs dropped and their clients wait a second for the retry.
    socket
        .listen(LISTEN_BACKLOG)
        .with_context(|| format!("listening on the metrics endpoint {addr}"))
}

/// Listen backlog of the metrics endpoint.
const LISTEN_BACKLOG: u32 = 1024;

/// Serves `/metrics` (see [`super::http`]) until the task is aborted; the
/// text is rendered on the owner thread, where the kernel counters are read.
pub async fn serve(listener: TcpListener, owner: Handle, limits: HttpLimits) {
    let render = move || {
        let owner = owner.clone();
        async move { owner.metrics().await }
    };
    http::serve_metrics(listener, render, limits).await;
}

/// The `xlb_cluster_*` metrics: this node, each peer, the replication totals.
fn register_cluster(reg: &mut Registry, info: &crate::api::ClusterInfo) {
    let gauge = |v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        g
    };
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    reg.register(
        "cluster_synced",
        "1 once this node has its peers' full sync (it announces only then)",
        gauge(i64::from(info.synced)),
    );
    reg.register(
        "cluster_coordinator",
        "Node id of the cluster's coordinator as this node sees it",
        gauge(i64::from(info.coordinator)),
    );
    let version = info
        .version
        .split('.')
        .next()
        .and_then(|c| c.parse::<i64>().ok())
        .unwrap_or(0);
    reg.register(
        "cluster_version",
        "Counter of the cluster document version this node runs",
        gauge(version),
    );
    reg.register(
        "cluster_rounds",
        "Cluster versions made live on this node",
        counter(info.rounds),
    );
    reg.register(
        "cluster_rounds_gave_up",
        "Versions swapped in without some live peer's Done (timeout or death)",
        counter(info.rounds_gave_up),
    );
    reg.register(
        "cluster_sessions_sent",
        "Sessions sent to peers (each peer counted)",
        counter(info.sessions_sent),
    );
    reg.register(
        "cluster_sessions_received",
        "Sessions received from peers",
        counter(info.sessions_received),
    );
    reg.register(
        "cluster_sessions_imported",
        "Received sessions written into the protected map",
        counter(info.sessions_imported),
    );
    let rejected = Family::<Labels, Counter>::default();
    for (reason, n) in [
        ("auth", info.rejected_auth),
        ("replay", info.rejected_replay),
        ("other", info.rejected_other),
    ] {
        rejected
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc_by(n);
    }
    reg.register("cluster_rejected", "Replication frames refused: bad HMAC (auth), replayed or stale (replay), misdirected or malformed (other)", rejected);
    let bytes = Family::<Labels, Counter>::default();
    for (dir, n) in [("sent", info.bytes_sent), ("received", info.bytes_received)] {
        bytes
            .get_or_create(&vec![("direction".to_string(), dir.to_string())])
            .inc_by(n);
    }
    reg.register(
        "cluster_bytes",
        "Replication bytes (frames) to and from all peers",
        bytes,
    );
    let up = Family::<Labels, Gauge>::default();
    let lag = Family::<Labels, Gauge>::default();
    let drift = Family::<Labels, Gauge>::default();
    let hello = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for p in &info.peers {
        let l = vec![("peer".to_string(), p.id.to_string())];
        up.get_or_create(&l).set(i64::from(p.state == "live"));
        lag.get_or_create(&l).set(p.lag);
        drift
            .get_or_create(&l)
            .set(i64::from(info.drift.contains(&p.id)));
        if let Some(ms) = p.last_hello_ms {
            hello.get_or_create(&l).set(ms as f64 / 1000.0);
        }
    }
    reg.register(
        "cluster_peer_up",
        "1 while the peer's Hello arrives (within 3 s)",
        up,
    );
    reg.register(
        "cluster_peer_lag_versions",
        "Versions the peer is behind this node",
        lag,
    );
    reg.register(
        "cluster_peer_fingerprint_mismatch",
        "1 while the peer's services, backends or tables differ (config drift)",
        drift,
    );
    reg.register(
        "cluster_peer_last_hello_seconds",
        "Seconds since the peer's last Hello",
        hello,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each outcome lands in its own family: a check not run is never a failure.
    #[test]
    fn outcomes_are_counted_apart() {
        let m = Metrics::default();
        let r = BackendRef {
            service: "web".into(),
            backend: "b1".into(),
        };
        m.observe_check(&r, &CheckOutcome::NotRun("Too many open files".into()));
        m.observe_check(&r, &CheckOutcome::NotRun("No buffer space".into()));
        m.observe_check(&r, &CheckOutcome::Fail("refused".into()));
        m.observe_check(&r, &CheckOutcome::Pass(std::time::Duration::from_millis(1)));
        let l = labels(&r);
        assert_eq!(m.checks_not_run.get_or_create(&l).get(), 2);
        assert_eq!(m.check_failures.get_or_create(&l).get(), 1);
        let mut kept = Registry::with_prefix("xlb");
        kept.register("health_checks_not_run", "x", m.checks_not_run.clone());
        let mut out = String::new();
        encode_registry(&mut out, &kept).expect("encode");
        assert!(
            out.contains("xlb_health_checks_not_run_total{service=\"web\",backend=\"b1\"} 2"),
            "{out}"
        );
    }

    /// The cluster's figures reach the exposition under their documented names.
    #[test]
    fn cluster_metrics_are_rendered_per_peer_and_reason() {
        let info = crate::api::ClusterInfo {
            node_id: 1,
            coordinator: 1,
            version: "7.2".into(),
            synced: true,
            rejected_auth: 3,
            rejected_replay: 2,
            bytes_sent: 100,
            drift: vec![3],
            peers: vec![
                crate::api::PeerInfo {
                    id: 2,
                    state: "live".into(),
                    lag: 1,
                    last_hello_ms: Some(500),
                    ..Default::default()
                },
                crate::api::PeerInfo {
                    id: 3,
                    state: "down".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mut reg = Registry::with_prefix("xlb");
        register_cluster(&mut reg, &info);
        let mut out = String::new();
        encode_registry(&mut out, &reg).expect("encode");
        for line in [
            "xlb_cluster_synced 1",
            "xlb_cluster_version 7",
            "xlb_cluster_rejected_total{reason=\"auth\"} 3",
            "xlb_cluster_rejected_total{reason=\"replay\"} 2",
            "xlb_cluster_bytes_total{direction=\"sent\"} 100",
            "xlb_cluster_peer_up{peer=\"2\"} 1",
            "xlb_cluster_peer_up{peer=\"3\"} 0",
            "xlb_cluster_peer_lag_versions{peer=\"2\"} 1",
            "xlb_cluster_peer_fingerprint_mismatch{peer=\"3\"} 1",
            "xlb_cluster_peer_last_hello_seconds{peer=\"2\"} 0.5",
        ] {
            assert!(out.contains(line), "{line} missing:\n{out}");
        }
    }
}
