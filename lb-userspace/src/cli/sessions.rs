//! `xlb sessions list|where|flush`, and `xlb sessions --config FILE` reading the pins directly.

use std::net::IpAddr;

use anyhow::Result;
use clap::{Args, Subcommand};
use xlb::api::{Request, Response, WhereInfo};
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
            if list.len() >= xlb::api::MAX_SESSIONS_LISTED {
                eprintln!(
                    "xlb: showing the first {} sessions (the daemon lists no more at once); \
                     narrow it with a service and backend, or ask `xlb sessions where CLIENT`",
                    list.len()
                );
            }
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
                        if s.protected { "yes" } else { "" }.to_string(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "SERVICE",
                    "CLIENT",
                    "BACKEND",
                    "ADDRESS",
                    "IDLE",
                    "PROTECTED",
                ],
                &rows,
            )?;
            outln!("{} sessions", list.len())
        }
        SessionsCmd::Where { client, service } => {
            let list = match ctx.call(&Request::SessionsWhere { client, service })? {
                Response::Where(l) => l,
                other => return unexpected(&other),
            };
            if ctx.json {
                return print_json(&list);
            }
            print_table(
                &["SERVICE", "CLIENT", "SESSION", "IDLE", "MAGLEV", "NOTE"],
                &where_rows(&list),
            )
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
                if s.protected { "yes" } else { "" }.to_string(),
            ]
        })
        .collect();
    print_table(
        &["SERVICE", "CLIENT", "BACKEND", "IDLE", "PROTECTED"],
        &rows,
    )?;
    outln!("{} sessions", list.len())
}

/// `xlb sessions where` as table rows: the sticky backend (if a session
/// exists) beside the Maglev answer, and whether the client depends on its
/// session (the two differ).
fn where_rows(list: &[WhereInfo]) -> Vec<Vec<String>> {
    let show = |name: &Option<String>, address: Option<IpAddr>| match (name, address) {
        (Some(n), Some(a)) if *n != a.to_string() => format!("{n} ({a})"),
        (Some(n), _) => n.clone(),
        (None, _) => "no usable backend".to_string(),
    };
    list.iter()
        .map(|w| {
            let maglev = show(&w.maglev_backend, w.maglev_backend_address);
            let (session, idle, note) = match (w.source.as_str(), w.idle_ms) {
                ("session", Some(idle)) => {
                    let note = if w.expired {
                        "expired: the next packet takes the Maglev answer"
                    } else if w.backend == w.maglev_backend {
                        "same backend"
                    } else if w.protected {
                        "differs: the client depends on its session (protected)"
                    } else {
                        "differs: the client depends on its session"
                    };
                    (show(&w.backend, w.backend_address), secs(idle), note)
                }
                _ => ("-".to_string(), String::new(), "no session: Maglev decides"),
            };
            vec![
                w.service.clone(),
                w.client.to_string(),
                session,
                idle,
                maglev,
                note.to_string(),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(source: &str, backend: &str, maglev: &str, expired: bool) -> WhereInfo {
        let addr = |n: &str| match n {
            "b1" => Some("10.0.0.21".parse().expect("ip")),
            "b2" => Some("10.0.0.22".parse().expect("ip")),
            _ => None,
        };
        let name = |n: &str| (!n.is_empty()).then(|| n.to_string());
        WhereInfo {
            service: "web".into(),
            client: "10.1.2.3".parse().expect("ip"),
            backend: name(backend),
            backend_address: addr(backend),
            source: source.into(),
            protected: false,
            idle_ms: (source == "session").then_some(1500),
            expired,
            maglev_backend: name(maglev),
            maglev_backend_address: addr(maglev),
        }
    }

    #[test]
    fn where_shows_session_and_maglev_side_by_side() {
        let rows = where_rows(&[
            info("session", "b1", "b2", false),
            info("session", "b2", "b2", false),
            info("session", "b1", "b2", true),
            info("maglev", "b2", "b2", false),
            info("maglev", "", "", false),
        ]);
        let cols = |r: &Vec<String>| (r[2].clone(), r[3].clone(), r[4].clone(), r[5].clone());
        assert_eq!(
            cols(&rows[0]),
            (
                "b1 (10.0.0.21)".into(),
                "1.5s".into(),
                "b2 (10.0.0.22)".into(),
                "differs: the client depends on its session".into()
            )
        );
        assert_eq!(rows[1][5], "same backend");
        assert!(rows[2][5].starts_with("expired"), "{:?}", rows[2]);
        assert_eq!(
            cols(&rows[3]),
            (
                "-".into(),
                String::new(),
                "b2 (10.0.0.22)".into(),
                "no session: Maglev decides".into()
            )
        );
        assert_eq!(rows[4][4], "no usable backend");
    }
}
