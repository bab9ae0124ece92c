//! `cargo xtask bench [--quick]`: measures xlb side by side with its
//! baselines and writes `target/bench/report.{md,json}` and plots.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result, bail};
use xlb_tests::bench::{
    Budget, Report, at_scale, cluster, failover, generator, machine, peers, prog_cost, progress,
    report, scaling, traffic, transition,
};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn machine() -> String {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "Linux {}, {}, {mem} memory",
        machine::kernel(),
        machine::describe_cpus()
    )
}

/// Part names for `--only` (repeatable), in run order.
const PARTS: [&str; 9] = [
    "cost",
    "scale",
    "rate",
    "scaling",
    "peers",
    "failover",
    "transition",
    "cluster",
    "at-scale",
];

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut budget = Budget::FULL;
    let mut quick = false;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let mut only: Vec<String> = Vec::new();
    let mut pick_generator = None;
    let mut at_scale: Option<&'static [u32]> = None;
    let mut cluster_sessions: Option<u32> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                budget = Budget::QUICK;
                quick = true;
            }
            "--smoke" => {
                budget = Budget::SMOKE;
                quick = true;
            }
            "--generator" => {
                let pick = it
                    .next()
                    .context("--generator needs auto, live-frames or af-packet")?;
                pick_generator = Some(generator::Pick::parse(pick)?);
            }
            "--out" => out = PathBuf::from(it.next().context("--out needs a directory")?),
            "--sessions" => {
                let list = it
                    .next()
                    .context("--sessions needs counts, e.g. 1000000,10000000")?;
                let counts = list
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse::<u32>()
                            .with_context(|| format!("--sessions: {n:?} is not a count"))
                    })
                    .collect::<Result<Vec<u32>>>()?;
                // The budget holds static slices; this one lives as long as the run.
                at_scale = Some(Box::leak(counts.into_boxed_slice()));
            }
            "--cluster-sessions" => {
                let n = it
                    .next()
                    .context("--cluster-sessions needs a count per node, e.g. 1000000")?;
                let n = n
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("--cluster-sessions: {n:?} is not a count"))?;
                cluster_sessions = Some(n);
            }
            "--only" => {
                let part = it.next().context("--only needs a part name")?;
                if !PARTS.contains(&part.as_str()) {
                    bail!("unknown part {part:?} (one of {})", PARTS.join(", "));
                }
                only.push(part.clone());
            }
            other => {
                bail!(
                    "unknown argument {other:?} (use --quick, --smoke, --out DIR, --only PART, \
                     --generator auto|live-frames|af-packet, --sessions N[,N], \
                     --cluster-sessions N)"
                )
            }
        }
    }
    // Applied after the loop: --quick and --smoke replace the whole budget.
    if let Some(pick) = pick_generator {
        budget.generator = pick;
    }
    if let Some(counts) = at_scale {
        budget.at_scale_sessions = counts;
    }
    if let Some(n) = cluster_sessions {
        budget.cluster_sessions = n;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads XDP programs: run it as root");
    }
    let started = Instant::now();
    let mut report = Report {
        command: format!("cargo xtask bench {}", args.join(" "))
            .trim()
            .to_string(),
        machine: machine(),
        quick,
        ..Default::default()
    };
    let want = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    if want("cost") {
        progress("part 1/6: per-packet cost through BPF_PROG_TEST_RUN");
        report.tables.extend(prog_cost::part1(budget)?);
    }
    if want("scale") {
        progress("part 2/6: cost and memory against affinity map size");
        report.scale = prog_cost::part2(budget)?;
    }
    if want("rate") {
        run_rate(budget, &mut report);
    }
    if want("scaling") {
        run_scaling(budget, &mut report);
    }
    if want("peers") {
        run_peers(budget, &mut report);
    }
    if want("failover") {
        run_failover(budget, &mut report);
    }
    if want("transition") {
        progress("part 6/6: transition to kernel (apply after a backend goes down)");
        match transition::part6(budget) {
            Ok(table) => report.tables.push(table),
            Err(e) => report
                .skipped
                .push(("transition to kernel".into(), format!("{e:#}"))),
        }
    }
    if want("cluster") {
        progress("part 7: cluster replication of a backend add with many sessions");
        match cluster::part_cluster(budget) {
            Ok(c) => report.cluster = Some(c),
            Err(e) => report
                .skipped
                .push(("cluster replication".into(), format!("{e:#}"))),
        }
    }
    if want("at-scale") {
        progress("part 8: a backend failure with millions of sessions");
        match at_scale::part_at_scale(budget) {
            Ok(table) => report.tables.push(table),
            Err(e) => report
                .skipped
                .push(("a backend failure at scale".into(), format!("{e:#}"))),
        }
    }
    report::write(&report, &out)?;
    print!("{}", report::markdown(&report));
    progress(&format!(
        "wrote {} in {:.0?}",
        out.join("report.md").display(),
        started.elapsed()
    ));
    Ok(())
}

fn run_rate(budget: Budget, report: &mut Report) {
    progress("part 3/6: packet rate through a veth (live frames where allowed, else AF_PACKET)");
    match traffic::part3(budget) {
        Ok(table) => report.tables.push(table),
        Err(e) => report
            .skipped
            .push(("packet rate through a veth".into(), format!("{e:#}"))),
    }
}

fn run_scaling(budget: Budget, report: &mut Report) {
    progress("part 3b: packet rate against cores, one generator thread and queue per core");
    match scaling::part_scaling(budget) {
        Ok(table) => report.tables.push(table),
        Err(e) => report
            .skipped
            .push(("packet rate against cores".into(), format!("{e:#}"))),
    }
}

fn run_peers(budget: Budget, report: &mut Report) {
    progress("part 4/6: peers (nftables, HAProxy, nginx) on the same namespaces, with wrk");
    match peers::part4(budget) {
        Ok(p) => {
            report.tables.extend(p.tables);
            report.peer_runs = p.runs;
            report.skipped.extend(p.skipped);
        }
        Err(e) => report
            .skipped
            .push(("peers on the same namespaces".into(), format!("{e:#}"))),
    }
}

fn run_failover(budget: Budget, report: &mut Report) {
    progress("part 5/6: failover under load (xlb daemon, nftables, HAProxy, nginx)");
    match failover::part5(budget) {
        Ok(f) => {
            report.failover = f.table;
            report.failover_runs = f.runs;
            report.skipped.extend(f.skipped);
        }
        Err(e) => report
            .skipped
            .push(("failover under load".into(), format!("{e:#}"))),
    }
}
