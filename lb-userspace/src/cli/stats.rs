//! `xlb stats [--watch]`: from the daemon, or from the pins with `--config`/`--interface`.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use xlb::api::{Request, Response};
use xlb::pins::PinnedMaps;
use xlb::stats::Snapshot;

use super::{Ctx, Target, print_json, unexpected};

/// Arguments of `xlb stats`.
#[derive(Args)]
pub struct StatsArgs {
    /// Read the pinned maps directly instead of asking the daemon.
    #[command(flatten)]
    target: Target,
    /// Print again every this many seconds until interrupted.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    watch: Option<u64>,
}

/// Runs `xlb stats`.
pub fn run(args: StatsArgs, ctx: &Ctx) -> Result<()> {
    loop {
        let snap = if args.target.given() {
            xlb::stats::snapshot(&PinnedMaps::open(&args.target.pin_path()?)?)?
        } else {
            match ctx.call(&Request::Stats)? {
                Response::Stats(s) => s,
                other => return unexpected(&other),
            }
        };
        if ctx.json {
            print_json(&snap)?;
        } else {
            print(&snap);
        }
        let Some(every) = args.watch else {
            return Ok(());
        };
        std::thread::sleep(Duration::from_secs(every));
        println!();
    }
}

fn print(snap: &Snapshot) {
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
}
