//! `xlb daemon`: loads or adopts the dataplane like `xlb run`, then stays to
//! run health checks and drain deadlines and to serve the control socket.
//!
//! Shape (after bpfman and mini-redis): [`run`] binds the socket and hands it
//! to [`control::serve_control`] on its own task; all state lives in one
//! [`Lb`] behind a mutex. SIGTERM/SIGINT end the daemon and leave the dataplane attached
//! (`xlb detach` is the explicit way to stop forwarding); SIGHUP reloads.

pub mod accept;
pub mod control;
pub mod health;
pub mod http;
pub mod lb;
pub mod metrics;
pub mod state;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::api::{Request, Response};
use crate::config::Config;
use crate::dataplane::{self, Attachment};
use crate::pins::PinnedMaps;
use health::Checks;
use lb::Lb;
use state::State;

/// How often drain deadlines and session counts are looked at.
const TICK: Duration = Duration::from_secs(1);

/// What `xlb daemon` was asked to do.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Config file.
    pub config: PathBuf,
    /// Control socket path.
    pub socket: PathBuf,
}

/// State shared by the socket handlers, the health checks and the ticker.
pub struct Shared {
    lb: Mutex<Lb>,
    checks: Mutex<Checks>,
    /// Metrics kept between scrapes (health-check latencies).
    pub metrics: metrics::Metrics,
}

impl Shared {
    /// The load balancer; a panicked holder does not make it unusable.
    pub fn lock(&self) -> MutexGuard<'_, Lb> {
        self.lb.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn checks(&self) -> MutexGuard<'_, Checks> {
        self.checks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts or stops health checks to match the current desired state.
fn sync_checks(shared: &Arc<Shared>) {
    let targets = shared.lock().check_targets();
    shared.checks().sync(targets, shared);
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(opts: DaemonOptions) -> Result<()> {
    let config = Config::load(&opts.config)?;
    let (dp, attachment) = dataplane::bring_up(&config, false)?;
    let maps = PinnedMaps::open(&config.pin_path())?;
    let state = State::load(&config.state_file)?;
    let metrics_address = config.metrics_address;
    let lb = Lb::new(
        opts.config.clone(),
        config,
        state,
        maps,
        attachment == Attachment::Adopted,
    )?;
    tracing::info!(config = %opts.config.display(), "desired state applied");
    let shared = Arc::new(Shared {
        lb: Mutex::new(lb),
        checks: Mutex::new(Checks::default()),
        metrics: metrics::Metrics::default(),
    });
    sync_checks(&shared);
    match accept::raise_open_file_limit() {
        Ok(n) => tracing::info!("open-file limit (RLIMIT_NOFILE): {n}"),
        Err(e) => tracing::warn!(
            "raising the open-file limit: {e}; keeping {}",
            accept::open_file_limit()
        ),
    }
    let (control_max, metrics_max) = accept::connection_budget(accept::open_file_limit());
    let metrics_task = match metrics_address {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            tracing::info!(address = %addr, max_connections = metrics_max, "serving Prometheus metrics at /metrics");
            let limits = http::HttpLimits {
                max_connections: metrics_max,
                ..http::HttpLimits::default()
            };
            Some(tokio::spawn(metrics::serve(
                listener,
                shared.clone(),
                limits,
            )))
        }
        None => None,
    };

    let listener = control::bind_socket(&opts.socket)?;
    tracing::info!(socket = %opts.socket.display(), max_connections = control_max, "serving the control socket");
    let limits = control::ControlLimits {
        max_connections: control_max,
        ..control::ControlLimits::default()
    };
    let handler = {
        let shared = shared.clone();
        move |req: Request| {
            let shared = shared.clone();
            async move {
                // The owner's lock and map syscalls block: off the async workers.
                tokio::task::spawn_blocking(move || handle(req, &shared))
                    .await
                    .unwrap_or_else(|e| Response::Error(format!("request handler failed: {e}")))
            }
        }
    };
    // Its own task: accepting control connections never delays the signals below.
    let control_task = tokio::spawn(control::serve_control(listener, handler, limits));

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let ticker = tokio::spawn({
        let shared = shared.clone();
        async move {
            let mut t = tokio::time::interval(TICK);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                t.tick().await;
                if let Err(e) = shared.lock().tick() {
                    tracing::error!("drain bookkeeping failed: {e:#}");
                }
            }
        }
    });

    let shutdown = async {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: exiting; the dataplane stays attached"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: exiting; the dataplane stays attached"); break; }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the config");
                    reload(&shared);
                }
            }
        }
    };
    shutdown.await;

    control_task.abort();
    ticker.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    shared.checks().stop_all();
    if let Err(e) = std::fs::remove_file(&opts.socket) {
        tracing::warn!("removing {}: {e}", opts.socket.display());
    }
    // The pinned link keeps the program attached after this process is gone.
    drop(dp);
    Ok(())
}

fn reload(shared: &Arc<Shared>) -> Response {
    let result = shared.lock().reload();
    match result {
        Ok(msg) => {
            tracing::info!("{msg}");
            sync_checks(shared);
            Response::Done(msg)
        }
        Err(e) => {
            tracing::error!("reload refused, still running the previous config: {e:#}");
            Response::Error(format!("{e:#}"))
        }
    }
}

fn handle(req: Request, shared: &Arc<Shared>) -> Response {
    let mut checks_changed = false;
    let result: Result<Response> = (|| {
        let mut lb = shared.lock();
        Ok(match req {
            Request::Status => Response::Status(lb.status()?),
            Request::ServiceList => Response::Services(lb.services()),
            Request::BackendList { service } => {
                Response::Backends(lb.backends(service.as_deref())?)
            }
            Request::BackendAdd {
                service,
                name,
                address,
                mac,
                weight,
            } => {
                checks_changed = true;
                Response::Done(lb.backend_add(&service, name, address, &mac, weight)?)
            }
            Request::BackendRemove { service, backend } => {
                checks_changed = true;
                Response::Done(lb.backend_remove(&service, &backend)?)
            }
            Request::BackendDrain {
                service,
                backend,
                deadline_ms,
            } => Response::Done(lb.backend_drain(
                &service,
                &backend,
                deadline_ms.map(Duration::from_millis),
            )?),
            Request::BackendUndrain { service, backend } => {
                Response::Done(lb.backend_undrain(&service, &backend)?)
            }
            Request::BackendWeight {
                service,
                backend,
                weight,
            } => Response::Done(lb.backend_weight(&service, &backend, weight)?),
            Request::SessionsList { service, backend } => {
                Response::Sessions(lb.sessions(service.as_deref(), backend.as_deref())?)
            }
            Request::SessionsWhere { client, service } => {
                Response::Where(lb.where_is(client, service.as_deref())?)
            }
            Request::SessionsFlush { service, backend } => {
                Response::Done(lb.flush(service.as_deref(), backend.as_deref())?)
            }
            Request::Stats => Response::Stats(lb.stats()?),
            Request::Reload => {
                // Reload takes the lock itself, then restarts checks.
                drop(lb);
                reload(shared)
            }
        })
    })();
    if checks_changed {
        sync_checks(shared);
    }
    match result {
        Ok(r) => {
            if let Response::Done(msg) = &r {
                tracing::info!("{msg}");
            }
            r
        }
        Err(e) => Response::Error(format!("{e:#}")),
    }
}
