//! `xlb sessions list|where|flush`, and `xlb sessions --config FILE` reading the pins directly.

use std::net::IpAddr;

use anyhow::Result;
use clap::{Args, Subcommand};
use xlb::api::{Request, Response};
use xlb::pins::PinnedMaps;

use super::{Ctx, Target, print_json, print_table, secs, unexpected};

/// Arguments of `xlb sessions`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SessionsArgs {
    #[command(subcommand)]
    cmd: Option<SessionsCmd>,
    /// Read the pinned maps directly instead of asking the daemon.
    #[command(flatten)]
    target: Target,
}

/// `xlb sessions ...`.
#[derive(Subcommand)]
pub enum SessionsCmd {
    /// List sticky sessions: client -> backend, idle time.
    List {
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Only this backend (by name).
        #[arg(long)]
        backend: Option<String>,
    },
    /// Which backend a client goes to, and why (its session, or the Maglev table).
    Where {
        /// Client address.
        client: IpAddr,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
    },
    /// Delete sessions (their clients are re-balanced on their next packet).
    Flush {
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Only this backend (by name).
        #[arg(long)]
        backend: Option<String>,
    },
}

/// Runs `xlb sessions`.
pub fn run(args: SessionsArgs, ctx: &Ctx) -> Result<()> {
    if args.target.given() {
        return direct(&args.target, ctx.json);
    }
    match args.cmd.unwrap_or(SessionsCmd::List {
        service: None,
        backend: None,
    }) {
        SessionsCmd::List { service, backend } => {
            let list = match ctx.call(&Request::SessionsList { service, backend })? {
                Response::Sessions(l) => l,
                other => return unexpected(&other),
            };
            if ctx.json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|s| {
                    vec![
                        s.service.clone(),
                        format!("{}/{}", s.client, s.prefix),
                        s.backend.clone(),
                        s.backend_address.map(|a| a.to_string()).unwrap_or_default(),
                        secs(s.idle_ms),
                    ]
                })
                .collect();
            print_table(&["SERVICE", "CLIENT", "BACKEND", "ADDRESS", "IDLE"], &rows);
            println!("{} sessions", list.len());
            Ok(())
        }
        SessionsCmd::Where { client, service } => {
            let list = match ctx.call(&Request::SessionsWhere { client, service })? {
                Response::Where(l) => l,
                other => return unexpected(&other),
            };
            if ctx.json {
                return print_json(&list);
            }
            for w in &list {
                let backend = match (&w.backend, w.backend_address) {
                    (Some(n), Some(a)) => format!("{n} ({a})"),
                    (Some(n), None) => n.clone(),
                    (None, _) => "no usable backend".to_string(),
                };
                let why = match (w.source.as_str(), w.idle_ms) {
                    ("session", Some(idle)) if w.expired => {
                        format!(
                            "session idle {} (expired: the next packet re-selects)",
                            secs(idle)
                        )
                    }
                    ("session", Some(idle)) => format!("session, idle {}", secs(idle)),
                    _ => "no session: Maglev choice".to_string(),
                };
                println!("{}: {} -> {backend}: {why}", w.service, w.client);
            }
            Ok(())
        }
        SessionsCmd::Flush { service, backend } => {
            ctx.change(&Request::SessionsFlush { service, backend })
        }
    }
}

/// The pre-daemon `xlb sessions --config FILE`: decodes the pinned affinity map.
fn direct(target: &Target, json: bool) -> Result<()> {
    let maps = PinnedMaps::open(&target.pin_path()?)?;
    let list = xlb::sessions::list(&maps)?;
    if json {
        return print_json(&list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            let backend = match s.backend {
                Some(ip) => format!("{ip} (#{})", s.backend_id),
                None => format!("#{} (gone)", s.backend_id),
            };
            vec![
                s.service.clone(),
                format!("{}/{}", s.client, s.prefix),
                backend,
                secs(s.idle_ms),
            ]
        })
        .collect();
    print_table(&["SERVICE", "CLIENT", "BACKEND", "IDLE"], &rows);
    println!("{} sessions", list.len());
    Ok(())
}
