//! `xlb daemon`: loads or adopts the dataplane like `xlb run`, then stays to
//! run health checks and drain deadlines and to serve the control socket.
//!
//! Shape (after bpfman and mini-redis): [`run`] binds the socket and hands it
//! with a shutdown future to [`serve`]; all state lives in one [`Lb`] behind
//! a mutex. SIGTERM/SIGINT end the daemon and leave the dataplane attached
//! (`xlb detach` is the explicit way to stop forwarding); SIGHUP reloads.

pub mod health;
pub mod lb;
pub mod limits;
pub mod metrics;
pub mod source;
pub mod state;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};

use crate::api::{MAX_REQUEST_BYTES, Request, Response};
use crate::config::Config;
use crate::dataplane::{self, Attachment};
use crate::pins::PinnedMaps;
use health::Checks;
use lb::Lb;
use state::State;

/// How often drain deadlines and session counts are looked at.
const TICK: Duration = Duration::from_secs(1);
/// Most control connections served at once.
const MAX_CONNECTIONS: usize = 64;

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
    limits::raise_nofile_limit_logged();
    let sources = source::SourceDefaults::detect(&config).await;
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
        checks: Mutex::new(Checks::new(sources)),
        metrics: metrics::Metrics::default(),
    });
    sync_checks(&shared);
    let metrics_task = match metrics_address {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            tracing::info!(address = %addr, "serving Prometheus metrics at /metrics");
            Some(tokio::spawn(metrics::serve(listener, shared.clone())))
        }
        None => None,
    };

    let listener = bind_socket(&opts.socket)?;
    tracing::info!(socket = %opts.socket.display(), "serving the control socket");

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
    serve(listener, shared.clone(), shutdown).await;

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

/// Binds the control socket with mode 0600, replacing a stale socket file
/// but refusing to steal one a live daemon answers on.
pub fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating socket directory {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting the mode of {}", dir.display()))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt as _;
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                );
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another xlb daemon is serving {} (stop it first, or use --socket)",
                    path.display()
                );
            }
            tracing::info!(socket = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Serves control requests on `listener` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("accepting a control connection: {e}");
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().acquire_owned().await else { return };
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &shared).await {
                        tracing::debug!("control connection: {e:#}");
                    }
                    drop(permit);
                });
            }
        }
    }
}

async fn connection(stream: UnixStream, shared: &Arc<Shared>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .context("no request within 10 s")?
        .context("reading the request")?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handle(req, shared),
        Err(e) => Response::Error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&response).context("encoding the answer")?;
    out.push(b'\n');
    write.write_all(&out).await.context("sending the answer")?;
    write.shutdown().await.context("closing")?;
    Ok(())
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
