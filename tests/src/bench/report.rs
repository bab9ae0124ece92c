//! Writing the report: `report.md` (tables), `report.json` (raw numbers)
//! and SVG plots.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use super::{Report, Series, Table, cluster::ClusterTable, failover::FailoverTable};

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn table_md(t: &Table) -> String {
    let mut s = format!("### {}\n\n{}\n\n", t.title, t.about);
    let unit = t.rows.first().map(|r| r.unit.as_str()).unwrap_or("");
    // Extra columns (e.g. arrived/sent), in first-seen order.
    let mut extra_cols: Vec<&str> = Vec::new();
    for (_, col, _) in &t.extra {
        if !extra_cols.contains(&col.as_str()) {
            extra_cols.push(col);
        }
    }
    let head: String = extra_cols.iter().map(|c| format!(" {c} |")).collect();
    let rule: String = extra_cols.iter().map(|_| "---:|").collect();
    let _ = writeln!(
        s,
        "| contender | median {unit} | min–max | × {} |{head}",
        t.baseline
    );
    let _ = writeln!(s, "|---|---:|---:|---:|{rule}");
    for r in &t.rows {
        let ratio = t
            .ratio(r)
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "–".into());
        let cells: String = extra_cols
            .iter()
            .map(|c| {
                let v = t
                    .extra
                    .iter()
                    .find(|(row, col, _)| *row == r.name && col == c)
                    .map(|(_, _, v)| v.as_str())
                    .unwrap_or("");
                format!(" {v} |")
            })
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {}–{} | {} |{cells}",
            r.name,
            fmt_num(r.median),
            fmt_num(r.min),
            fmt_num(r.max),
            ratio
        );
    }
    s.push('\n');
    s
}

/// `median (min–max)` of a series, just the value for one sample, `–` for none.
fn span(s: &Series, digits: usize) -> String {
    match s.samples.len() {
        0 => "–".to_owned(),
        1 => format!("{:.digits$}", s.median),
        _ => format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            s.median, s.min, s.max
        ),
    }
}

/// The failover table (part 5).
fn failover_md(t: &FailoverTable) -> String {
    let mut s = format!("### Failover under load\n\n{}\n\n", t.about);
    let ideal = 100.0 / t.backends.max(1) as f64 + 1.0;
    let _ = writeln!(
        s,
        "| contender | health checks | errors (failed probes) | served again after kill, ms | \
         moved back after restore | backend changes | moved during, % (ideal ≤ {ideal:.1}) | dead held, % | \
         from healthy | unserved during, % | moved after restore, % |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in &t.rows {
        let served = if r.served_again_ms.samples.is_empty() {
            "never".to_owned()
        } else if r.failed_over == r.rounds {
            span(&r.served_again_ms, 0)
        } else if r.failed_over == 0 {
            format!(
                "{}, only after the restore (no failover)",
                span(&r.served_again_ms, 0)
            )
        } else {
            format!(
                "{}; failed over in {}/{} rounds",
                span(&r.served_again_ms, 0),
                r.failed_over,
                r.rounds
            )
        };
        let back = match (r.failed_over, r.moved_back) {
            (0, _) => "– (never left)".to_owned(),
            (n, 0) => format!("no ({n}/{n} rounds stayed)"),
            (n, k) if k == n => format!("yes ({n}/{n} rounds)"),
            (n, k) => format!("in {k}/{n} rounds"),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {served} | {back} | {} | {} | {} | {} | {} | {} |",
            r.contender,
            r.health_checks,
            span(&r.errors, 0),
            span(&r.backend_changes, 0),
            span(&r.moved_during_pct, 1),
            span(&r.dead_share_pct, 1),
            r.moved_from_healthy,
            span(&r.unserved_during_pct, 1),
            span(&r.moved_after_pct, 1),
        );
    }
    s.push('\n');
    if !t.xlb_kernel_down_ms.is_empty() {
        let _ = writeln!(
            s,
            "xlb: from the kill until the dead backend was DOWN in the kernel's backend map (read \
             from the pins every 2 ms), per service; bound fall × interval + 100 ms. ∞: not DOWN \
             before the restore.\n"
        );
        let _ = writeln!(s, "| service | kill → DOWN in kernel, ms | bound, ms |");
        let _ = writeln!(s, "|---|---:|---:|");
        for (svc, series) in &t.xlb_kernel_down_ms {
            let _ = writeln!(
                s,
                "| {svc} | {} | {:.0} |",
                span(series, 0),
                t.xlb_kernel_down_bound_ms
            );
        }
        s.push('\n');
    }
    s
}

/// Thousands separated by commas (`1234567` -> `1,234,567`).
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The cluster replication part.
fn cluster_md(t: &ClusterTable) -> String {
    let mut s = format!(
        "### Cluster: replication of a backend add\n\n{}\n\n",
        t.about
    );
    for run in &t.runs {
        let sent: u64 = run.nodes.iter().map(|n| n.sessions_sent).sum();
        let bytes: u64 = run.nodes.iter().map(|n| n.bytes_sent).sum();
        let divergent: u64 = run.nodes.iter().filter_map(|n| n.divergent).sum();
        let loaded: u64 = run.nodes.iter().map(|n| n.loaded).sum();
        let _ = write!(
            s,
            "**{}.** `xlb backend add` returned after {:.0} ms (the DOWN join live); the backend \
             was active on every node {:.0} ms after the call, {} round(s). Divergent: {} of {} \
             sessions ({:.1}%), {} entries sent in all ({} bytes, {:.0} bytes per entry).",
            run.name,
            run.cli_ms,
            run.live_everywhere_ms,
            run.rounds,
            grouped(divergent),
            grouped(loaded),
            100.0 * divergent as f64 / loaded.max(1) as f64,
            grouped(sent),
            grouped(bytes),
            bytes as f64 / sent.max(1) as f64,
        );
        if let Some(r) = &run.up_round {
            // The round's own volume: each node's divergent sessions to each peer (the
            // status deltas may include a periodic refresh that fell into the run).
            let peers = run.nodes.len().saturating_sub(1) as u64;
            let entries = divergent * peers;
            let per_entry = bytes as f64 / sent.max(1) as f64;
            let secs = (r.duration_ms / 1000.0).max(1e-9);
            let _ = write!(
                s,
                " Up-round (version {}): {:.0} ms from the first prepare to the last swap; its \
                 {} entries (divergent × {peers} peers) make {} entries/s, {:.1} MB/s over the cluster.",
                r.version,
                r.duration_ms,
                grouped(entries),
                grouped((entries as f64 / secs) as u64),
                entries as f64 * per_entry / secs / 1e6,
            );
        }
        s.push_str("\n\n");
        let _ = writeln!(
            s,
            "| node | sessions loaded | divergent (sent to each peer) | entries sent | entries received \
             | imported | bytes sent | bytes received | sessions after | peak RSS MiB | refresh: entries sent |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (n, r) in run.nodes.iter().zip(&run.refresh) {
            let _ = writeln!(
                s,
                "| lb{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                n.node,
                grouped(n.loaded),
                n.divergent.map_or_else(|| "–".into(), grouped),
                grouped(n.sessions_sent),
                grouped(n.sessions_received),
                grouped(n.sessions_imported),
                grouped(n.bytes_sent),
                grouped(n.bytes_received),
                grouped(n.sessions_after),
                n.vmhwm_kib
                    .map_or_else(|| "–".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
                grouped(r.sessions_sent),
            );
        }
        s.push('\n');
    }
    if !t.idle.is_empty() {
        let line: Vec<String> = t
            .idle
            .iter()
            .map(|n| {
                format!(
                    "lb{} {} entries ({} bytes)",
                    n.node,
                    grouped(n.sessions_sent),
                    grouped(n.bytes_sent)
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "Idle afterwards (nothing changed, no client sent), one more refresh period: {}.\n",
            line.join(", ")
        );
    }
    s
}

/// Renders the Markdown report.
pub fn markdown(report: &Report) -> String {
    let mut s = String::from("# xlb benchmark report\n\n");
    let _ = writeln!(s, "- command: `{}`", report.command);
    let _ = writeln!(s, "- machine: {}", report.machine);
    let _ = writeln!(
        s,
        "- mode: {}\n",
        if report.quick { "quick" } else { "full" }
    );
    for t in &report.tables {
        s.push_str(&table_md(t));
    }
    if !report.scale.is_empty() {
        s.push_str("### Scale: affinity map size\n\n");
        s.push_str(
            "Hit path (one client, `repeat`) and miss path (each new client once) with the \
             affinity map pre-filled from userspace (batched writes), and the kernel memory the \
             maps take (fdinfo `memlock`; an LRU map allocates its whole capacity up front, and \
             the capacity leaves room for every miss frame). The distinct-clients hit runs \
             pre-filled clients drawn at random from the whole map, each frame once, so its \
             lookups meet cache misses; it is compared with the one client run once the same \
             number of times (both include the per-run overhead of `repeat = 1`). Plot: \
             `scale.svg`.\n\n",
        );
        s.push_str(
            "| entries | capacity | hit ns | hit ns, one client once | hit ns, distinct clients once | × one client once | miss ns | affinity map MiB | all maps MiB |\n",
        );
        s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for p in &report.scale {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.2} | {} | {:.1} | {:.1} |",
                p.entries,
                p.capacity,
                fmt_num(p.hit_ns),
                fmt_num(p.hit_once_ns),
                fmt_num(p.hit_distinct_ns),
                p.hit_distinct_ns / p.hit_once_ns,
                fmt_num(p.miss_ns),
                p.affinity_bytes as f64 / 1048576.0,
                p.maps_bytes as f64 / 1048576.0
            );
        }
        s.push('\n');
    }
    if let Some(f) = &report.failover {
        s.push_str(&failover_md(f));
    }
    if let Some(c) = &report.cluster {
        s.push_str(&cluster_md(c));
    }
    if !report.skipped.is_empty() {
        s.push_str("### Not measured\n\n");
        for (what, why) in &report.skipped {
            let _ = writeln!(s, "- {what}: {why}");
        }
    }
    s
}

/// Draws ns/packet against affinity-map size (log scale) as SVG.
pub fn scale_plot(report: &Report, path: &Path) -> Result<()> {
    let pts = &report.scale;
    if pts.is_empty() {
        return Ok(());
    }
    let max_ns = pts
        .iter()
        .map(|p| p.hit_ns.max(p.miss_ns).max(p.hit_distinct_ns))
        .fold(0.0, f64::max)
        * 1.2;
    let min_x = pts.iter().map(|p| p.entries).min().unwrap_or(1).max(1) as f64;
    let max_x = pts.iter().map(|p| p.entries).max().unwrap_or(10).max(10) as f64;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).context("drawing")?;
    let mut chart = ChartBuilder::on(&root)
        .caption("xlb ns/packet vs affinity map entries", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((min_x..max_x * 1.5).log_scale(), 0.0..max_ns)
        .context("building the chart")?;
    chart
        .configure_mesh()
        .x_desc("affinity map entries")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("ns/packet")
        .draw()
        .context("drawing the mesh")?;
    for (name, color, get) in [
        (
            "hit",
            BLUE,
            (|p: &super::ScalePoint| p.hit_ns) as fn(&_) -> f64,
        ),
        (
            "hit, distinct clients once",
            GREEN,
            |p: &super::ScalePoint| p.hit_distinct_ns,
        ),
        ("miss", RED, |p: &super::ScalePoint| p.miss_ns),
    ] {
        let series: Vec<(f64, f64)> = pts.iter().map(|p| (p.entries as f64, get(p))).collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .context("drawing a line")?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                series
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )
            .context("drawing points")?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .context("drawing the legend")?;
    root.present().context("writing the plot")?;
    Ok(())
}

/// Draws the medians of every table measured in `unit` as horizontal bars
/// with min–max whiskers, one panel per table, as SVG.
pub fn throughput_plot(report: &Report, unit: &str, path: &Path) -> Result<bool> {
    let tables: Vec<&Table> = report
        .tables
        .iter()
        .filter(|t| t.rows.first().is_some_and(|r| r.unit == unit))
        .collect();
    if tables.is_empty() {
        return Ok(false);
    }
    let rows: usize = tables.iter().map(|t| t.rows.len()).sum();
    let height = 60 * tables.len() as u32 + 34 * rows as u32;
    let root = SVGBackend::new(path, (860, height)).into_drawing_area();
    root.fill(&WHITE).context("drawing")?;
    let heights: Vec<u32> = tables
        .iter()
        .map(|t| 60 + 34 * t.rows.len() as u32)
        .collect();
    let mut rest = root;
    for (t, h) in tables.iter().zip(heights) {
        let (area, below) = rest.split_vertically(h);
        rest = below;
        let max = t.rows.iter().map(|r| r.max).fold(0.0, f64::max) * 1.1;
        let n = t.rows.len();
        let mut chart = ChartBuilder::on(&area)
            .caption(&t.title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(300)
            .build_cartesian_2d(0.0..max.max(1e-9), (0..n).into_segmented())
            .context("building the chart")?;
        let names: Vec<String> = t.rows.iter().map(|r| r.name.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc(unit)
            .x_label_formatter(&|v| {
                if max >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            })
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .context("drawing the mesh")?;
        chart
            .draw_series(t.rows.iter().enumerate().map(|(i, r)| {
                let color = if r.name == t.baseline { &BLACK } else { &BLUE };
                let mut bar = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (r.median, SegmentValue::Exact(i + 1)),
                    ],
                    color.mix(0.6).filled(),
                );
                bar.set_margin(5, 5, 0, 0);
                bar
            }))
            .context("drawing bars")?;
        chart
            .draw_series(t.rows.iter().enumerate().map(|(i, r)| {
                PathElement::new(
                    vec![
                        (r.min, SegmentValue::CenterOf(i)),
                        (r.max, SegmentValue::CenterOf(i)),
                    ],
                    RED.stroke_width(2),
                )
            }))
            .context("drawing whiskers")?;
    }
    // Every area shares the one backend: presenting any of them writes the file.
    rest.present().context("writing the plot")?;
    Ok(true)
}

/// Writes report.md, report.json and the plots into `dir`.
pub fn write(report: &Report, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("report.md"), markdown(report)).context("writing report.md")?;
    let json = serde_json::to_string_pretty(report).context("encoding report.json")?;
    std::fs::write(dir.join("report.json"), json).context("writing report.json")?;
    scale_plot(report, &dir.join("scale.svg"))?;
    throughput_plot(report, "Mpps", &dir.join("rate.svg"))?;
    throughput_plot(report, "req/s", &dir.join("peers.svg"))?;
    Ok(())
}
