//! `xlb daemon`: the control plane (the runtime and logging are set up in main).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use xlb::daemon::{self, DaemonOptions};

use super::Ctx;

/// Log line format of the daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable lines.
    #[default]
    Human,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Arguments of `xlb daemon`.
#[derive(Args)]
pub struct DaemonArgs {
    /// Config file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// `xlb daemon`: runs until SIGTERM/SIGINT.
pub fn run(args: DaemonArgs, ctx: &Ctx) -> Result<()> {
    daemon::run(DaemonOptions {
        config: args.config,
        socket: ctx.socket.clone(),
    })
}
