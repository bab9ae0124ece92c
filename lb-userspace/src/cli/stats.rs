//! `xlb stats [--watch]`: from the daemon, or from the pins with `--config`/`--interface`.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use xlb::api::{Request, Response};
use xlb::config::Config;
use xlb::pins::PinnedMaps;
use xlb::stats::{Snapshot, Traffic};

use super::{Ctx, Target, output, print_json, unexpected};

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
    // Names for the direct path come from the config, when one is given.
    let config = args
        .target
        .config
        .as_deref()
        .map(Config::load)
        .transpose()?;
    loop {
        let snap = if args.target.given() {
            let maps = PinnedMaps::open(&args.target.pin_path()?)?;
            let mut snap = xlb::stats::snapshot(&maps)?;
            if let Some(config) = &config {
                snap.name_from_config(&maps, config)?;
            }
            snap
        } else {
            match ctx.call(&Request::Stats)? {
                Response::Stats(s) => s,
                other => return unexpected(&other),
            }
        };
        if ctx.json {
            print_json(&snap)?;
        } else {
            output::write(&text(&snap))?;
        }
        let Some(every) = args.watch else {
            return Ok(());
        };
        std::thread::sleep(Duration::from_secs(every));
        outln!("")?;
    }
}

/// The counters for people: global reasons, then a table of services and
/// backends by name (`#id` where no name is known).
fn text(snap: &Snapshot) -> String {
    let mut out = String::new();
    for (name, value) in &snap.reasons {
        out += &format!("{name:<24} {value:>14}\n");
    }
    let row = |kind: &str, name: String, id: u32, t: &Traffic| {
        vec![
            kind.to_string(),
            name,
            id.to_string(),
            t.packets.to_string(),
            t.bytes.to_string(),
            t.new_sessions.to_string(),
        ]
    };
    let mut rows = Vec::new();
    for (id, t) in &snap.services {
        let name = snap
            .service_names
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("#{id}"));
        rows.push(row("service", name, *id, t));
    }
    for (id, t) in &snap.backends {
        let name = snap.backend_names.get(id).map_or_else(
            || format!("#{id}"),
            |b| format!("{}/{}", b.service, b.backend),
        );
        rows.push(row("backend", name, *id, t));
    }
    if !rows.is_empty() {
        out.push('\n');
        out += &output::table(
            &["KIND", "NAME", "ID", "PACKETS", "BYTES", "NEW SESSIONS"],
            &rows,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_where_known_numbers_elsewhere() {
        let t = |packets| Traffic {
            packets,
            bytes: packets * 100,
            new_sessions: 1,
        };
        let mut snap = Snapshot {
            reasons: vec![("new_session".into(), 3)],
            services: vec![(0, t(5)), (1, t(2))],
            backends: vec![(4, t(3)), (9, t(2))],
            ..Snapshot::default()
        };
        snap.name(
            [(0, "web".to_string()), (7, "unused".to_string())],
            [(4, "web".to_string(), "b1".to_string())],
        );
        assert!(
            !snap.service_names.contains_key(&7),
            "only ids with counters"
        );
        let text = text(&snap);
        assert!(text.contains("new_session"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("service  web") && l.contains(" 500 ")),
            "{text}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("service  #1 ")),
            "{text}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("backend  web/b1 ")),
            "{text}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("backend  #9 ")),
            "{text}"
        );
        let json = serde_json::to_value(&snap).expect("json");
        assert_eq!(json["service_names"]["0"], "web");
        assert_eq!(json["backend_names"]["4"]["backend"], "b1");
        // Older answers without names still decode.
        let old: Snapshot =
            serde_json::from_str(r#"{"reasons":[],"services":[[0,{"packets":1,"bytes":2,"new_sessions":3}]],"backends":[]}"#)
                .expect("old layout");
        assert!(old.service_names.is_empty());
    }
}
