//! `xlb run`: load (or adopt), attach, write the config; exits.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;
use xlb::{
    config::{Config, XdpMode},
    dataplane,
    lock::PinLock,
    pins::PinnedMaps,
};

/// Arguments of `xlb run`.
#[derive(Args)]
pub struct RunArgs {
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

/// `xlb run`.
pub fn run(args: RunArgs) -> Result<()> {
    let mut config = Config::load(&args.config)?;
    if let Some(mode) = args.xdp_mode {
        config.xdp_mode = mode;
    }
    // One writer: refused while a daemon (or another `xlb run`) manages this dataplane.
    let _lock = PinLock::acquire(&config.pin_path())?;
    let (mut dp, _) = dataplane::bring_up(&config, args.debug)?;
    let mut maps = PinnedMaps::open(&config.pin_path())?;
    let hops = xlb::hops::resolve_now(&config, xlb::hops::START_WAIT)?;
    let report = dataplane::apply_with(&mut maps, &config, &hops)?;
    tracing::info!(
        services = report.services,
        backends = report.backends,
        services_kept = report.services_kept,
        services_removed = report.services_removed,
        backends_removed = report.backends_removed,
        sessions_removed = report.sessions_removed,
        tables_written = report.tables_written.len(),
        backends_written = report.backends_written,
        services_written = report.services_written,
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
