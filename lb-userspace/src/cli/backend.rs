//! `xlb backend list|add|remove|drain|undrain|weight`.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use xlb::api::{Request, Response};
use xlb::config::{validate_deadline, validate_mac, validate_unicast_backend};

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
        /// Backend MAC ("dsr" services only; default: resolved from the
        /// kernel's neighbours and kept current).
        #[arg(long)]
        mac: Option<String>,
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
        /// Move the leftover clients after this long (e.g. 30s, 5m; at most 30 days).
        #[arg(long, value_parser = parse_deadline)]
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
            // Checked here too, so a typo never reaches the daemon (which
            // checks again, with the VIPs and its interface's MAC).
            validate_unicast_backend("address", address)?;
            if let Some(mac) = &mac {
                validate_mac("--mac", mac)?;
            }
            Request::BackendAdd {
                service,
                name,
                address,
                mac: mac.unwrap_or_default(),
                weight,
            }
        }
        BackendCmd::Remove { service, backend } => Request::BackendRemove { service, backend },
        BackendCmd::Drain {
            service,
            backend,
            deadline,
        } => Request::BackendDrain {
            service,
            backend,
            // parse_deadline bounds it to 30 days: the milliseconds fit.
            deadline_ms: deadline.map(|d| d.as_millis() as u64),
        },
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

/// `--deadline`: a humantime duration, more than 0 and at most 30 days.
fn parse_deadline(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    validate_deadline(d).map_err(|e| format!("{e:#}"))?;
    Ok(d)
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
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_bounded() {
        assert_eq!(parse_deadline("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(
            parse_deadline("30days"),
            Ok(Duration::from_secs(30 * 24 * 3600))
        );
        let e = parse_deadline("31days").expect_err("too long");
        assert!(e.contains("is longer than 30days"), "{e}");
        assert!(parse_deadline("584000000years").is_err());
        assert!(
            parse_deadline("0s")
                .expect_err("zero")
                .contains("more than 0")
        );
        assert!(parse_deadline("soon").is_err());
    }
}
