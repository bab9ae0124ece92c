//! `xlb decap`: attach (or adopt) the IP-in-IP decapsulator on a backend's
//! interface with a VIP set, detach it, or print its counters.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use xlb::config::XdpMode;
use xlb::dataplane::Attachment;
use xlb::decap::{self, DEFAULT_DECAP_PIN_DIR, DecapStats};

use super::{Ctx, output, print_json};

/// Arguments of `xlb decap`.
#[derive(Args)]
pub struct DecapArgs {
    /// Interface the tunnelled packets arrive on.
    #[arg(long, short)]
    interface: String,
    /// A VIP whose IP-in-IP packets are decapsulated (repeat for more). Replaces the
    /// VIP set of an existing attachment. Put the VIPs on `lo` too.
    #[arg(long = "vip", value_name = "ADDR")]
    vips: Vec<String>,
    /// XDP attach mode (only used when attaching anew).
    #[arg(long, value_enum, default_value = "native")]
    xdp_mode: XdpMode,
    /// Detach the decapsulator from the interface and remove its pins.
    #[arg(long, conflicts_with_all = ["vips", "stats"])]
    detach: bool,
    /// Print the VIPs and counters instead of attaching.
    #[arg(long, conflicts_with = "vips")]
    stats: bool,
    /// Pin root; the interface's link and maps live in PIN_DIR/INTERFACE.
    #[arg(long, default_value = DEFAULT_DECAP_PIN_DIR)]
    pin_dir: PathBuf,
}

/// Runs `xlb decap`.
pub fn run(args: DecapArgs, ctx: &Ctx) -> Result<()> {
    if args.detach {
        let removed = decap::detach(&args.pin_dir, &args.interface)?;
        let dir = decap::pin_path(&args.pin_dir, &args.interface)?;
        if ctx.json {
            return print_json(&serde_json::json!({
                "detached": !removed.is_empty(),
                "pin_dir": dir,
                "removed": removed,
            }));
        }
        if removed.is_empty() {
            return outln!("nothing pinned at {}", dir.display());
        }
        return outln!(
            "detached xlb decap from {}; removed {} pins from {}",
            args.interface,
            removed.len(),
            dir.display()
        );
    }
    if args.stats {
        let dir = decap::pin_path(&args.pin_dir, &args.interface)?;
        let stats = decap::stats(&dir)?;
        if ctx.json {
            let counters: serde_json::Map<String, serde_json::Value> = stats
                .counters
                .iter()
                .map(|(name, value)| ((*name).to_string(), (*value).into()))
                .collect();
            return print_json(&serde_json::json!({
                "interface": args.interface,
                "vips": stats.vips,
                "counters": counters,
            }));
        }
        return output::write(&text(&stats));
    }
    let vips = decap::parse_vips(&args.vips)?;
    let up = decap::bring_up(&args.pin_dir, &args.interface, args.xdp_mode, &vips)?;
    let how = match up.attachment {
        Attachment::New => "attached",
        Attachment::Adopted => "adopted",
    };
    if ctx.json {
        return print_json(&serde_json::json!({
            "interface": args.interface,
            "attachment": how,
            "pin_dir": up.pin_dir,
            "vips": vips,
            "added": up.vips.added,
            "removed": up.vips.removed,
        }));
    }
    outln!(
        "xlb decap {how} on {}: decapsulating for {} VIP(s) ({} added, {} removed); pins in {}",
        args.interface,
        vips.len(),
        up.vips.added.len(),
        up.vips.removed.len(),
        up.pin_dir.display()
    )
}

/// The VIPs, then one counter per line, in index order.
fn text(stats: &DecapStats) -> String {
    let vips: Vec<String> = stats.vips.iter().map(ToString::to_string).collect();
    let mut out = format!("vips: {}\n", vips.join(" "));
    for (name, value) in &stats.counters {
        out += &format!("{name:<24} {value:>14}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lists_vips_and_every_counter() {
        let stats = DecapStats {
            vips: vec!["10.0.0.10".parse().expect("v4")],
            counters: vec![("decap_4in4", 3), ("pass_not_vip", 0)],
        };
        let t = text(&stats);
        assert_eq!(t.lines().next(), Some("vips: 10.0.0.10"));
        assert!(
            t.lines()
                .any(|l| l.starts_with("decap_4in4") && l.ends_with(" 3")),
            "{t}"
        );
        assert_eq!(t.lines().count(), 3);
    }
}
