//! `xlb`: load, attach and inspect the xlb XDP load balancer.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use xlb::{
    config::{Config, DEFAULT_PIN_DIR, XdpMode, format_mac},
    dataplane::{self, Attachment, Dataplane, LoadOptions},
    pins::PinnedMaps,
    sessions, stats,
};

/// Sticky-session layer-4 load balancer on XDP.
#[derive(Parser)]
#[command(name = "xlb", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the dataplane and write the config into it, then exit
    /// (the program stays attached; a second run adopts it, keeping sessions).
    Run(RunArgs),
    /// Detach the program from the interface and remove its pinned maps (drops all sessions).
    Detach(Target),
    /// Print the sticky sessions: client -> backend, idle time.
    Sessions(ShowArgs),
    /// Print the dataplane counters.
    Stats(ShowArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Config file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// Override the config's xdp_mode (only used when attaching anew).
    #[arg(long, value_enum)]
    xdp_mode: Option<XdpMode>,
    /// Log every new session from the kernel and stay in the foreground until Ctrl-C.
    #[arg(long)]
    debug: bool,
}

/// Which dataplane: from a config file, or by interface.
#[derive(Args)]
struct Target {
    /// Config file naming the interface and pin directory.
    #[arg(long, short, conflicts_with = "interface")]
    config: Option<PathBuf>,
    /// Interface the dataplane is attached to.
    #[arg(long, short)]
    interface: Option<String>,
    /// Pin root (with --interface).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

impl Target {
    fn pin_path(&self) -> Result<PathBuf> {
        match (&self.config, &self.interface) {
            (Some(path), _) => Ok(Config::load(path)?.pin_path()),
            (None, Some(iface)) => {
                if iface.is_empty() || iface.contains('/') || iface == "." || iface == ".." {
                    bail!("--interface {iface:?} is not an interface name");
                }
                Ok(self.pin_dir.join(iface))
            }
            (None, None) => bail!("say which dataplane: --config FILE or --interface IFACE"),
        }
    }
}

#[derive(Args)]
struct ShowArgs {
    #[command(flatten)]
    target: Target,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Detach(target) => detach(target),
        Command::Sessions(args) => show_sessions(args),
        Command::Stats(args) => show_stats(args),
    };
    if let Err(e) = result {
        eprintln!("xlb: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: RunArgs) -> Result<()> {
    let mut config = Config::load(&args.config)?;
    if let Some(mode) = args.xdp_mode {
        config.xdp_mode = mode;
    }
    let mac = dataplane::interface_mac(&config.interface)?;
    let opts = LoadOptions::from_config(&config, mac, args.debug);
    let mut dp = Dataplane::load(opts)?;
    let attachment = dp.attach(&config.interface, config.xdp_mode)?;
    match attachment {
        Attachment::New => tracing::info!(
            interface = %config.interface,
            mode = ?config.xdp_mode,
            mac = %format_mac(&mac),
            pins = %config.pin_path().display(),
            "attached xlb"
        ),
        Attachment::Adopted => tracing::info!(
            interface = %config.interface,
            pins = %config.pin_path().display(),
            "adopted the existing xlb dataplane (sessions kept, program replaced)"
        ),
    }
    let mut maps = PinnedMaps::open(&config.pin_path())?;
    let report = dataplane::apply(&mut maps, &config)?;
    tracing::info!(
        services = report.services,
        backends = report.backends,
        services_kept = report.services_kept,
        services_removed = report.services_removed,
        backends_removed = report.backends_removed,
        sessions_removed = report.sessions_removed,
        "config applied"
    );
    if args.debug {
        let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
        rt.block_on(async {
            // Keep the logger (and so the process) alive until Ctrl-C.
            let _logger =
                aya_log::EbpfLogger::init(dp.ebpf_mut()).context("attaching the kernel logger")?;
            tracing::info!("debug: logging new sessions; Ctrl-C to exit (the dataplane stays)");
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            anyhow::Ok(())
        })?;
    }
    Ok(())
}

fn detach(target: Target) -> Result<()> {
    let dir = target.pin_path()?;
    let removed = dataplane::detach(&dir)?;
    if removed.is_empty() {
        println!("nothing pinned at {}", dir.display());
    } else {
        println!(
            "detached; removed {} pins from {}",
            removed.len(),
            dir.display()
        );
    }
    Ok(())
}

fn show_sessions(args: ShowArgs) -> Result<()> {
    let maps = PinnedMaps::open(&args.target.pin_path()?)?;
    let list = sessions::list(&maps)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).context("encoding JSON")?
        );
        return Ok(());
    }
    println!(
        "{:<28} {:<40} {:<28} {:>10}",
        "SERVICE", "CLIENT", "BACKEND", "IDLE"
    );
    for s in &list {
        let backend = match s.backend {
            Some(ip) => format!("{ip} (#{})", s.backend_id),
            None => format!("#{} (gone)", s.backend_id),
        };
        let idle = format!("{:.1}s", s.idle_ms as f64 / 1000.0);
        println!(
            "{:<28} {:<40} {:<28} {:>10}",
            s.service,
            format!("{}/{}", s.client, s.prefix),
            backend,
            idle
        );
    }
    println!("{} sessions", list.len());
    Ok(())
}

fn show_stats(args: ShowArgs) -> Result<()> {
    let maps = PinnedMaps::open(&args.target.pin_path()?)?;
    let snap = stats::snapshot(&maps)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&snap).context("encoding JSON")?
        );
        return Ok(());
    }
    for (name, value) in &snap.reasons {
        println!("{name:<24} {value:>14}");
    }
    for (id, t) in &snap.services {
        println!(
            "service #{id:<4} packets {:>12} bytes {:>14} new sessions {:>10}",
            t.packets, t.bytes, t.new_sessions
        );
    }
    for (id, t) in &snap.backends {
        println!(
            "backend #{id:<4} packets {:>12} bytes {:>14} new sessions {:>10}",
            t.packets, t.bytes, t.new_sessions
        );
    }
    Ok(())
}
