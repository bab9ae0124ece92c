//! `xlb backend list|add|remove|drain|undrain|weight`.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Subcommand;
use xlb::api::{Request, Response};
use xlb::config::parse_mac;

use super::{Ctx, print_json, print_table, secs, unexpected};

/// `xlb backend ...`.
#[derive(Subcommand)]
pub enum BackendCmd {
    /// List backends with admin state, health, kernel state and session counts.
    List {
        /// Only this service.
        service: Option<String>,
    },
    /// Add a backend to a service (kept across restarts in the state file).
    Add {
        /// Service name.
        service: String,
        /// Backend address (same family as the VIP).
        address: IpAddr,
        /// Backend MAC.
        #[arg(long)]
        mac: String,
        /// Backend name (default: the address).
        #[arg(long)]
        name: Option<String>,
        /// Maglev weight.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        weight: Option<u16>,
    },
    /// Remove a backend; only its clients move.
    Remove {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
    },
    /// Drain a backend: it keeps its clients but gets no new ones; maint when
    /// its sessions are gone or at the deadline (leftovers move then).
    Drain {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        /// Move the leftover clients after this long (e.g. 30s, 5m).
        #[arg(long, value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
    },
    /// Make a draining or maint backend active again.
    Undrain {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
    },
    /// Change a backend's Maglev weight.
    Weight {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        /// New weight, 1..=65535.
        #[arg(value_parser = clap::value_parser!(u16).range(1..))]
        weight: u16,
    },
}

/// Runs a `backend` subcommand.
pub fn run(cmd: BackendCmd, ctx: &Ctx) -> Result<()> {
    let request = match cmd {
        BackendCmd::List { service } => return list(service, ctx),
        BackendCmd::Add {
            service,
            address,
            mac,
            name,
            weight,
        } => {
            // Checked here too, so a typo never reaches the daemon.
            parse_mac(&mac)?;
            Request::BackendAdd {
                service,
                name,
                address,
                mac,
                weight,
            }
        }
        BackendCmd::Remove { service, backend } => Request::BackendRemove { service, backend },
        BackendCmd::Drain {
            service,
            backend,
            deadline,
        } => {
            if deadline.is_some_and(|d| d.is_zero()) {
                bail!(
                    "--deadline must be more than 0 (use `xlb backend remove` to move clients now)"
                );
            }
            Request::BackendDrain {
                service,
                backend,
                deadline_ms: deadline.map(|d| d.as_millis() as u64),
            }
        }
        BackendCmd::Undrain { service, backend } => Request::BackendUndrain { service, backend },
        BackendCmd::Weight {
            service,
            backend,
            weight,
        } => Request::BackendWeight {
            service,
            backend,
            weight,
        },
    };
    ctx.change(&request)
}

fn list(service: Option<String>, ctx: &Ctx) -> Result<()> {
    let list = match ctx.call(&Request::BackendList { service })? {
        Response::Backends(l) => l,
        other => return unexpected(&other),
    };
    if ctx.json {
        return print_json(&list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            vec![
                b.service.clone(),
                b.name.clone(),
                b.address.to_string(),
                b.weight.to_string(),
                b.admin.clone(),
                b.health.clone(),
                b.state.clone(),
                b.sessions.to_string(),
                b.drain_left_ms.map(secs).unwrap_or_default(),
                b.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "SERVICE",
            "BACKEND",
            "ADDRESS",
            "WEIGHT",
            "ADMIN",
            "HEALTH",
            "KERNEL",
            "SESSIONS",
            "DRAIN LEFT",
            "LAST CHANGE",
        ],
        &rows,
    );
    Ok(())
}
