//! `xlb cluster status`.

use anyhow::Result;
use clap::Subcommand;
use xlb::api::{Request, Response};

use super::{Ctx, print_json, unexpected};

/// `xlb cluster ...`.
#[derive(Subcommand)]
pub enum ClusterCmd {
    /// This node, its peers (state, last Hello, version lag, fingerprint) and the replication totals.
    Status,
}

/// Runs `xlb cluster ...`.
pub fn run(cmd: ClusterCmd, ctx: &Ctx) -> Result<()> {
    match cmd {
        ClusterCmd::Status => status(ctx),
    }
}

fn status(ctx: &Ctx) -> Result<()> {
    let c = match ctx.call(&Request::ClusterStatus)? {
        Response::Cluster(c) => c,
        other => return unexpected(&other),
    };
    if ctx.json {
        return print_json(&c);
    }
    outln!(
        "node {}  version {}  fingerprint {}  coordinator {}{}",
        c.node_id,
        c.version,
        c.fingerprint,
        c.coordinator,
        if c.synced {
            ""
        } else {
            "  (waiting for the peers' full sync: not announcing)"
        }
    )?;
    if let Some(r) = &c.round {
        outln!("round in progress: {r}")?;
    }
    if !c.drift.is_empty() {
        outln!(
            "CONFIG DRIFT: nodes {:?} run this version with other services, backends or tables",
            c.drift
        )?;
    }
    outln!(
        "{:<6} {:<24} {:<10} {:>10} {:>8} {:>5} {:<17} {:<6} {:>12} {:>12}",
        "PEER",
        "ADDRESS",
        "STATE",
        "LAST HELLO",
        "VERSION",
        "LAG",
        "FINGERPRINT",
        "SYNCED",
        "SENT",
        "RECEIVED"
    )?;
    for p in &c.peers {
        outln!(
            "{:<6} {:<24} {:<10} {:>10} {:>8} {:>5} {:<17} {:<6} {:>12} {:>12}",
            p.id,
            p.address,
            p.state,
            p.last_hello_ms
                .map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0))
                .unwrap_or_else(|| "never".into()),
            p.version.as_deref().unwrap_or("-"),
            p.lag,
            p.fingerprint.as_deref().unwrap_or("-"),
            if p.sync_received { "yes" } else { "no" },
            format!("{} B", p.bytes_sent),
            format!("{} B", p.bytes_received),
        )?;
    }
    outln!(
        "rounds {} ({} without every peer's Done); sessions sent {}, received {}, imported {}, \
         lost to fresher local {}, unknown {}",
        c.rounds,
        c.rounds_gave_up,
        c.sessions_sent,
        c.sessions_received,
        c.sessions_imported,
        c.sessions_conflicts_lost,
        c.sessions_unknown
    )?;
    outln!(
        "rejected frames: {} bad HMAC, {} replayed, {} other",
        c.rejected_auth,
        c.rejected_replay,
        c.rejected_other
    )?;
    Ok(())
}
