//! `xlb service list`.

use anyhow::Result;
use clap::Subcommand;
use xlb::api::{Request, Response};

use super::{Ctx, print_json, print_table, unexpected};

/// `xlb service ...`.
#[derive(Subcommand)]
pub enum ServiceCmd {
    /// List the services.
    List,
}

/// Runs a `service` subcommand.
pub fn run(cmd: ServiceCmd, ctx: &Ctx) -> Result<()> {
    match cmd {
        ServiceCmd::List => {
            let list = match ctx.call(&Request::ServiceList)? {
                Response::Services(l) => l,
                other => return unexpected(&other),
            };
            if ctx.json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        std::net::SocketAddr::new(s.vip, s.port).to_string(),
                        s.protocol.clone(),
                        format!("{}/{}", s.backends_up, s.backends),
                        if s.panic { "PANIC" } else { "" }.to_string(),
                        s.health.clone().unwrap_or_else(|| "none".into()),
                    ]
                })
                .collect();
            print_table(
                &["SERVICE", "VIP", "PROTO", "UP/ALL", "MODE", "HEALTH CHECK"],
                &rows,
            )
        }
    }
}
