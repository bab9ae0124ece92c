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

pub mod checks;
pub mod desired;
pub mod health;
pub mod lb;
pub mod metrics;
pub mod owner;
pub mod state;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};

use crate::api::{MAX_REQUEST_BYTES, Request, Response};
use crate::config::Config;
use crate::dataplane::{self, Attachment};
use crate::lock::PinLock;
use crate::pins::PinnedMaps;
use lb::Lb;
use owner::Handle;
use state::State;

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
    let config = Config::load(&opts.config)?;
    let lock = PinLock::acquire(&config.pin_path())?;
    let (dp, attachment) = dataplane::bring_up(&config, false)?;
    let maps = PinnedMaps::open(&config.pin_path())?;
    let state = State::load(&config.state_file)?;
    let metrics_address = config.metrics_address;
    let lb = Lb::new(
        opts.config.clone(),
        config,
        state,
        maps,
        dp,
        lock,
        attachment == Attachment::Adopted,
    )?;
    tracing::info!(config = %opts.config.display(), "desired state applied");
    let metrics = Arc::new(metrics::Metrics::default());
    let (targets_tx, targets_rx) = tokio::sync::watch::channel(Vec::new());
    let (owner, thread) = owner::spawn(lb, metrics.clone(), targets_tx)?;

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

async fn serve_until_signal(
    opts: &DaemonOptions,
    owner: Handle,
    metrics: Arc<metrics::Metrics>,
    targets: tokio::sync::watch::Receiver<Vec<lb::CheckTarget>>,
    metrics_address: Option<std::net::SocketAddr>,
) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(checks::supervise(
        targets,
        owner.clone(),
        metrics.clone(),
    )));
    if let Some(addr) = metrics_address {
        let listener = metrics::bind(addr).await?;
        tracing::info!(address = %addr, "serving Prometheus metrics at /metrics");
        tasks.push(tokio::spawn(metrics::serve(listener, owner.clone())));
    }
    let listener = bind_socket(&opts.socket)?;
    tracing::info!(socket = %opts.socket.display(), "serving the control socket");
    tasks.push(tokio::spawn(serve(listener, owner.clone())));

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
    for task in tasks {
        task.abort();
    }
    if let Err(e) = std::fs::remove_file(&opts.socket) {
        tracing::warn!("removing {}: {e}", opts.socket.display());
    }
    Ok(())
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

/// Most control connections served at once; beyond, new ones are closed at once.
const MAX_CONNECTIONS: usize = 4096;

/// Serves control requests on `listener` (until the task is aborted).
pub async fn serve(listener: UnixListener, owner: Handle) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accepting a control connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let owner = owner.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &owner).await {
                tracing::debug!("control connection: {e:#}");
            }
            drop(permit);
        });
    }
}

async fn connection(stream: UnixStream, owner: &Handle) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .context("no request within 10 s")?
        .context("reading the request")?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => owner.request(req).await,
        Err(e) => Response::Error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&response).context("encoding the answer")?;
    out.push(b'\n');
    write.write_all(&out).await.context("sending the answer")?;
    write.shutdown().await.context("closing")?;
    Ok(())
}
