//! The `xlb` command line: clap definitions, one module per subcommand.
//!
//! Subcommands that manage a running load balancer talk to the daemon over
//! its control socket; `run`, `detach`, and `sessions`/`stats` given
//! `--config`/`--interface` work on the pinned dataplane directly.

/// `println!` that returns an error instead of panicking when stdout is
/// closed (see [`output`]); use as `outln!("...")?`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::line(&format!($($arg)*))
    };
}

pub mod backend;
pub mod cluster;
pub mod daemon;
pub mod decap;
pub mod detach;
pub mod output;
pub mod reload;
pub mod run;
pub mod service;
pub mod sessions;
pub mod stats;
pub mod status;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use xlb::api::{self, DEFAULT_SOCKET, Request, Response};
use xlb::config::{Config, DEFAULT_PIN_DIR, validate_pin_dir};

pub use output::{print_json, print_table};

/// Sticky-session layer-4 load balancer on XDP.
#[derive(Parser)]
#[command(name = "xlb", version)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print JSON instead of a table (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand.
#[derive(Subcommand)]
pub enum Command {
    /// Load and attach the dataplane and write the config into it, then exit
    /// (the program stays attached; a second run adopts it, keeping sessions).
    Run(run::RunArgs),
    /// Run the control-plane daemon: health checks, drains, control socket.
    Daemon(daemon::DaemonArgs),
    /// Detach the program from the interface and remove its pinned maps (drops all sessions).
    Detach(Target),
    /// Daemon and dataplane summary.
    Status,
    /// Services.
    #[command(subcommand)]
    Service(service::ServiceCmd),
    /// Backends: list, add, remove, drain, undrain, weight.
    #[command(subcommand)]
    Backend(backend::BackendCmd),
    /// Sticky sessions: list, where, flush (`--config`/`--interface` read the pins directly).
    Sessions(sessions::SessionsArgs),
    /// Dataplane counters (`--config`/`--interface` read the pins directly).
    Stats(stats::StatsArgs),
    /// Make the daemon re-read its config file and apply the difference.
    Reload,
    /// The cluster: `xlb cluster status` (peers, their state, last sync, lag, fingerprints).
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// On a backend: strip the outer header of IP-in-IP packets to the given VIPs
    /// (for kernels without ipip/ip6tnl); `--detach` removes it, `--stats` shows counters.
    Decap(decap::DecapArgs),
}

/// Which dataplane, when reading pins directly: from a config file, or by interface.
#[derive(Args, Default)]
pub struct Target {
    /// Config file naming the interface and pin directory.
    #[arg(long, short, conflicts_with = "interface")]
    pub config: Option<PathBuf>,
    /// Interface the dataplane is attached to.
    #[arg(long, short)]
    pub interface: Option<String>,
    /// Pin root (with --interface).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

impl Target {
    /// Whether a dataplane was named (otherwise the daemon is asked).
    pub fn given(&self) -> bool {
        self.config.is_some() || self.interface.is_some()
    }

    /// The pin directory named by the arguments.
    pub fn pin_path(&self) -> Result<PathBuf> {
        match (&self.config, &self.interface) {
            (Some(path), _) => Ok(Config::load(path)?.pin_path()),
            (None, Some(iface)) => {
                if iface.is_empty() || iface.contains('/') || iface == "." || iface == ".." {
                    bail!("--interface {iface:?} is not an interface name");
                }
                validate_pin_dir("--pin-dir", &self.pin_dir)?;
                Ok(self.pin_dir.join(iface))
            }
            (None, None) => bail!("say which dataplane: --config FILE or --interface IFACE"),
        }
    }
}

/// Runs the chosen subcommand.
pub fn dispatch(cli: Cli) -> Result<()> {
    let ctx = Ctx {
        socket: cli.socket,
        json: cli.json,
    };
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Daemon(args) => daemon::run(args, &ctx),
        Command::Detach(target) => detach::run(target),
        Command::Status => status::run(&ctx),
        Command::Service(cmd) => service::run(cmd, &ctx),
        Command::Backend(cmd) => backend::run(cmd, &ctx),
        Command::Sessions(args) => sessions::run(args, &ctx),
        Command::Stats(args) => stats::run(args, &ctx),
        Command::Reload => reload::run(&ctx),
        Command::Cluster(cmd) => cluster::run(cmd, &ctx),
        Command::Decap(args) => decap::run(args, &ctx),
    }
}

/// What every daemon-facing subcommand needs.
pub struct Ctx {
    /// Control socket path.
    pub socket: PathBuf,
    /// `--json`.
    pub json: bool,
}

impl Ctx {
    /// Sends one request; a daemon-side error becomes this command's error.
    pub fn call(&self, request: &Request) -> Result<Response> {
        call(&self.socket, request)
    }

    /// Sends a change request and prints the daemon's confirmation.
    pub fn change(&self, request: &Request) -> Result<()> {
        match self.call(request)? {
            Response::Done(msg) => {
                if self.json {
                    print_json(&serde_json::json!({ "ok": true, "message": msg }))
                } else {
                    outln!("{msg}")
                }
            }
            other => unexpected(&other),
        }
    }
}

/// Sends one request to the daemon at `socket` (a current-thread runtime: one call, then exit).
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match rt.block_on(api::call(socket, request))? {
        // Typed, so `--json` can say what kind of failure it was.
        Response::Error(failure) => Err(failure.into()),
        other => Ok(other),
    }
}

/// The error for an answer of the wrong kind (a daemon of another version).
pub fn unexpected<T>(response: &Response) -> Result<T> {
    bail!("unexpected answer from the daemon: {response:?}")
}

/// Milliseconds as seconds with one decimal.
pub fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}
