//! `xlb daemon`: loads or adopts the dataplane like `xlb run`, then stays to
//! run health checks and drain deadlines and to serve the control socket.
//!
//! Shape: the pin directory is locked (one writer), the dataplane brought
//! up and handed to [`Lb`], which moves to its own thread (`owner.rs`) and
//! is reached by messages only. The tokio runtime runs what waits: health
//! checks, the control socket, the metrics endpoint and signals, each its
//! own task, so a busy listener never delays a signal. SIGTERM/SIGINT end
//! the daemon and leave the dataplane attached (`xlb detach` is the
//! explicit way to stop forwarding); SIGHUP reloads.
//!
//! With `announce_table` set, the VIPs this node is ready to serve are kept
//! as routes there (`announcing.rs`). On SIGTERM/SIGINT the order is:
//! withdraw every route (the BGP speaker withdraws them from the routers),
//! then stop the tasks and the owner and exit. The dataplane stays attached
//! throughout, so what the routers still send while they converge is
//! forwarded as before.

pub mod accept;
pub mod announcing;
pub mod checks;
pub mod clustering;
pub mod control;
pub mod counts;
pub mod desired;
pub mod health;
pub mod http;
pub mod lb;
mod lb_cluster;
pub mod metrics;
pub mod nexthops;
pub mod owner;
mod pin_guard;
pub mod source;
pub mod state;
mod tunnel_check;
pub mod views;
pub mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::api::Request;
use crate::config::Config;
use crate::dataplane::{self, Attachment};
use crate::lock::PinLock;
use crate::pins::PinnedMaps;
use lb::Lb;
use owner::Handle;
use state::State;

/// How long shutdown waits for the VIPs' routes to be withdrawn.
const WITHDRAW_WAIT: Duration = Duration::from_secs(3);

/// What `xlb daemon` was asked to do.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Config file.
    pub config: PathBuf,
    /// Control socket path.
    pub socket: PathBuf,
}

/// Runs the daemon until SIGTERM or SIGINT. Everything that blocks on the
/// kernel happens here, before the runtime starts, or on the owner thread.
pub fn run(opts: DaemonOptions) -> Result<()> {
    // Before anything opens descriptors: under systemd's soft LimitNOFILE=1024 an
    // idle-connection flood would otherwise starve health checks and map opens.
    match accept::raise_open_file_limit() {
        Ok(n) => tracing::info!("open-file limit (RLIMIT_NOFILE): {n}"),
        Err(e) => tracing::warn!(
            "raising the open-file limit: {e}; keeping {}",
            accept::open_file_limit()
        ),
    }
    let config = Config::load(&opts.config)?;
    // Checked before anything is attached: an invalid state file changes nothing.
    let state = State::load(&config.state_file)?;
    state.validate(&config)?;
    state.check_against_interface(&config, dataplane::interface_mac(&config.interface)?)?;
    let lock = PinLock::acquire(&config.pin_path())?;
    let (dp, attachment) = dataplane::bring_up(&config, false)?;
    let maps = PinnedMaps::open(&config.pin_path())?;
    // The session counter's own descriptors: it walks beside the owner.
    let count_maps = PinnedMaps::open(&config.pin_path())?;
    let ingress = dataplane::interface_index(&config.interface)?;
    warn_martian_tunnel_replies(&config);
    let metrics_address = config.metrics_address;
    let announce_table = config.announce_table;
    let cluster = config.cluster.clone();
    let lb = Lb::new(
        opts.config.clone(),
        config,
        state,
        maps,
        dp,
        lock,
        attachment == Attachment::Adopted,
    )?;
    let initial_hops = lb.hops().clone();
    tracing::info!(config = %opts.config.display(), "desired state applied");
    let metrics = Arc::new(metrics::Metrics::default());
    let (targets_tx, targets_rx) = tokio::sync::watch::channel(Vec::new());
    let (hop_targets_tx, hop_targets_rx) = tokio::sync::watch::channel(Vec::new());
    let (readiness_tx, readiness_rx) = tokio::sync::watch::channel(owner::VipReadiness::new());
    let (owner, thread) = owner::spawn(
        lb,
        metrics.clone(),
        owner::Outputs {
            targets: targets_tx,
            hop_targets: hop_targets_tx,
            readiness: readiness_tx,
        },
        count_maps,
    )?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = rt.block_on(serve_until_signal(
        &opts,
        owner.clone(),
        metrics,
        targets_rx,
        metrics_address,
        (hop_targets_rx, ingress, initial_hops),
        Peering {
            announce: announce_table.map(|table| (readiness_rx, table)),
            cluster,
        },
    ));
    // The owner re-pins the link if needed, so the dataplane outlives us.
    rt.block_on(owner.shutdown());
    drop(owner);
    if thread.join().is_err() {
        tracing::error!("the owner thread panicked");
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Tunnelled IPv4 checks are answered from the VIP; a kernel that holds the
/// VIP as a local address drops such answers as martians unless
/// `accept_local` is set on the interface (IPv6 is not affected). Says so
/// at start rather than letting every tunnelled check fail unexplained.
fn warn_martian_tunnel_replies(config: &Config) {
    let tunnelled_v4 = config.services.iter().any(|s| {
        s.vip.is_ipv4()
            && s.health
                .as_ref()
                .is_some_and(|h| h.via == crate::config::HealthVia::Tunnel)
    });
    if !tunnelled_v4 {
        return;
    }
    let read = |scope: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{scope}/accept_local"))
            .map(|v| v.trim() == "1")
            .unwrap_or(false)
    };
    if !read("all") && !read(&config.interface) {
        tracing::warn!(
            interface = %config.interface,
            "IPv4 health checks through the tunnel are answered from the VIP; if the VIP is a \
             local address of this host, the kernel drops those answers unless \
             net.ipv4.conf.{}.accept_local=1 (the checks then fail)",
            config.interface
        );
    }
}

/// How this node talks to routers and to other nodes.
struct Peering {
    /// VIP readiness and the table to announce them in (`announce_table`).
    announce: Option<(tokio::sync::watch::Receiver<owner::VipReadiness>, u32)>,
    /// `[cluster]`.
    cluster: Option<crate::config::ClusterConfig>,
}

async fn serve_until_signal(
    opts: &DaemonOptions,
    owner: Handle,
    metrics: Arc<metrics::Metrics>,
    targets: tokio::sync::watch::Receiver<Vec<lb::CheckTarget>>,
    metrics_address: Option<std::net::SocketAddr>,
    (hop_targets, ingress, initial_hops): (
        tokio::sync::watch::Receiver<Vec<crate::hops::Target>>,
        u32,
        crate::dataplane::Hops,
    ),
    Peering { announce, cluster }: Peering,
) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let mut tasks = Vec::new();
    let announcer = announce.map(|(readiness, table)| {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(announcing::supervise(
            readiness,
            table,
            ingress,
            metrics.clone(),
            stop_rx,
        ));
        (stop_tx, task)
    });
    tasks.push(tokio::spawn(nexthops::supervise(
        hop_targets,
        ingress,
        initial_hops,
        owner.clone(),
    )));
    tasks.push(tokio::spawn(checks::supervise(
        targets,
        owner.clone(),
        metrics.clone(),
    )));
    let (control_max, metrics_max) = accept::connection_budget(accept::open_file_limit());
    if let Some(addr) = metrics_address {
        let listener = metrics::bind(addr).await?;
        tracing::info!(address = %addr, max_connections = metrics_max, "serving Prometheus metrics at /metrics");
        let limits = http::HttpLimits {
            max_connections: metrics_max,
            ..http::HttpLimits::default()
        };
        metrics.add_listener("metrics", limits.stats.clone());
        tasks.push(tokio::spawn(metrics::serve(
            listener,
            owner.clone(),
            limits,
        )));
    }
    let listener = control::bind_socket(&opts.socket)?;
    tracing::info!(socket = %opts.socket.display(), max_connections = control_max, "serving the control socket");
    let limits = control::ControlLimits {
        max_connections: control_max,
        ..control::ControlLimits::default()
    };
    metrics.add_listener("control", limits.stats.clone());
    // With [cluster], runtime changes, flushes and cluster status go through
    // the cluster task (the coordinator makes changes, in a prepare round).
    let mut cluster_task = None;
    let to_cluster = match cluster {
        Some(cfg) => {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
            let owner = owner.clone();
            let metrics = metrics.clone();
            cluster_task = Some((
                stop_tx,
                tokio::spawn(async move {
                    if let Err(e) = clustering::run(cfg, owner, metrics, rx, stop_rx).await {
                        tracing::error!("the cluster task stopped: {e:#}");
                    }
                }),
            ));
            Some(tx)
        }
        None => None,
    };
    let handler = {
        let owner = owner.clone();
        move |req: Request| {
            let owner = owner.clone();
            let to_cluster = to_cluster.clone();
            async move {
                match to_cluster {
                    Some(tx) if clustering::is_cluster_request(&req) => {
                        clustering::ask(&tx, req).await
                    }
                    _ => owner.request(req).await,
                }
            }
        }
    };
    // Its own task: accepting control connections never delays the signals below.
    tasks.push(tokio::spawn(control::serve_control(
        listener, handler, limits,
    )));

    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: exiting; the dataplane stays attached"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: exiting; the dataplane stays attached"); break; }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                // The owner logs the outcome; waiting here would delay other signals.
                let owner = owner.clone();
                tokio::spawn(async move { owner.request(Request::Reload).await });
            }
        }
    }
    // Withdraw first: the routers stop sending new clients here before anything else stops.
    if let Some((stop, task)) = announcer {
        let _ = stop.send(());
        match tokio::time::timeout(WITHDRAW_WAIT, task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("the announcer failed: {e}"),
            Err(_) => tracing::error!(
                "withdrawing the VIPs took longer than {WITHDRAW_WAIT:?}; exiting anyway"
            ),
        }
    }
    if let Some((stop, task)) = cluster_task {
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    for task in tasks {
        task.abort();
    }
    if let Err(e) = std::fs::remove_file(&opts.socket) {
        tracing::warn!("removing {}: {e}", opts.socket.display());
    }
    Ok(())
}
