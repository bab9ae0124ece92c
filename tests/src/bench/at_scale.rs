//! Part 8: a backend failure with millions of sessions. The failover lab's
//! daemon (4 services, HTTP and UDP checks every 500 ms, fall 3), its
//! affinity map planted with `N` synthetic sessions of the IPv4 HTTP
//! service (each on its Maglev answer, as real clients would be), then one
//! backend killed while `xlb status` and a metrics scrape run ten times a
//! second: how long until that backend is DOWN in the kernel in every
//! service (against fall × interval + 100 ms), how long status and the
//! scrape took meanwhile, and the daemon's memory. At lab scale every walk
//! of the sessions is cheap; here they are what an operator meets.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use xlb::pins::PinnedMaps;

use super::{
    Budget, Series, Table,
    failover::{KernelWatch, Killed, kernel_down_bound_ms},
    progress,
};
use crate::{
    HTTP_PORT, Lab, LabOptions, Servers,
    daemon::{Daemon, HealthOptions, METRICS, SERVICES, daemon_config, try_scrape},
    driver::Mode,
};

/// Backends of the lab (each in every service).
const BACKENDS: usize = 3;
/// How often status and the scrape are asked while the failure runs.
const MONITOR_EVERY: Duration = Duration::from_millis(100);
/// The longest the kernel is watched for DOWN after the kill.
const WATCH_FOR: Duration = Duration::from_secs(30);
/// How long status may take to count the planted sessions.
const COUNT_WAIT: Duration = Duration::from_secs(90);
/// How long a backend may take to come up after the daemon starts.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One failure at one session count.
struct Run {
    sessions: u32,
    down_ms: BTreeMap<String, Option<f64>>,
    status_ms: Vec<f64>,
    scrape_ms: Vec<f64>,
    rss_mib: f64,
    plant_ms: f64,
}

/// Part 8: failure → DOWN, status and scrape latency at each of
/// `budget.at_scale_sessions`.
pub fn part_at_scale(budget: Budget) -> Result<Table> {
    if budget.at_scale_sessions.is_empty() {
        bail!("the budget has no session counts for the at-scale part");
    }
    let mut runs = Vec::new();
    for &n in budget.at_scale_sessions {
        progress(&format!("at scale: a backend failure with {n} sessions"));
        runs.push(one(n).with_context(|| format!("{n} sessions"))?);
    }
    Ok(table(&runs))
}

fn one(n: u32) -> Result<Run> {
    let lab = Lab::new(
        "atscale",
        LabOptions {
            backends: BACKENDS,
            clients_v4: 4,
            clients_v6: 0,
        },
    )?;
    let mut servers = Servers::start(&lab)?;
    lab.attach_lb_peer_pass()?;
    let config = lab.work_dir().join("xlb-atscale.toml");
    // Room for every planted session and the lab's own clients.
    let text = format!(
        "affinity_max_entries = {}\nmetrics_address = \"{METRICS}\"\n{}",
        n.saturating_add(n / 4).max(1024),
        daemon_config(&lab, Mode::Native, BACKENDS, &HealthOptions::default())
    );
    fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    let daemon = Daemon::start(&lab, &config)?;
    for svc in SERVICES {
        for b in &lab.backends {
            daemon.wait_backend(&lab, svc, &b.name, READY_TIMEOUT, |v| v["health"] == "up")?;
        }
    }
    let planted = Instant::now();
    plant(&lab, &daemon, n)?;
    let plant_ms = ms(planted.elapsed());
    let watch = KernelWatch::new(&lab, &daemon)?;
    let dead = lab.backends[0].name.clone();

    let stop = AtomicBool::new(false);
    let lat: Mutex<(Vec<f64>, Vec<f64>)> = Mutex::new((Vec::new(), Vec::new()));
    let down_ms = thread::scope(|s| -> Result<BTreeMap<String, Option<f64>>> {
        s.spawn(|| monitor(&lab, &daemon, &stop, &lat));
        // Let the monitor run a little before the kill, as an operator's would.
        thread::sleep(Duration::from_millis(500));
        let kill_at = Instant::now();
        let mut killed = Killed::kill(&mut servers, &lab, &dead)?;
        let mut seen = BTreeMap::new();
        while kill_at.elapsed() < WATCH_FOR {
            watch.poll(&dead, kill_at, &mut seen);
            if KernelWatch::all_seen(&seen) {
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::Relaxed);
        killed.restore()?;
        Ok(seen)
    })?;
    let rss_mib = rss_mib(daemon.child.pid());
    let (status_ms, scrape_ms) = lat.into_inner().unwrap_or_else(|p| p.into_inner());
    drop(daemon);
    Ok(Run {
        sessions: n,
        down_ms,
        status_ms,
        scrape_ms,
        rss_mib,
        plant_ms,
    })
}

/// Asks status and scrapes every [`MONITOR_EVERY`] until `stop`, recording
/// how long each took (a failed one counts as the time it took to fail).
fn monitor(lab: &Lab, d: &Daemon, stop: &AtomicBool, lat: &Mutex<(Vec<f64>, Vec<f64>)>) {
    while !stop.load(Ordering::Relaxed) {
        let next = Instant::now() + MONITOR_EVERY;
        let t = Instant::now();
        let _ = d.ctl(lab, &["status"]);
        let status = ms(t.elapsed());
        let t = Instant::now();
        let _ = try_scrape(lab, Duration::from_secs(10));
        let scrape = ms(t.elapsed());
        if let Ok(mut l) = lat.lock() {
            l.0.push(status);
            l.1.push(scrape);
        }
        if let Some(rest) = next.checked_duration_since(Instant::now()) {
            thread::sleep(rest);
        }
    }
}

/// Plants `n` sessions of the IPv4 HTTP service into the daemon's affinity
/// map, each on its client's Maglev answer, and checks status counts them.
fn plant(lab: &Lab, d: &Daemon, n: u32) -> Result<()> {
    let st = d.ctl(lab, &["status"])?;
    let pins = st["pins"].as_str().context("status without pins")?;
    let maps = PinnedMaps::open(std::path::Path::new(pins))?;
    let record = crate::plant::tcp_service(&maps, IpAddr::V4(lab.vip4), HTTP_PORT)?;
    // 100.64.0.0/10 and up: no lab client is there.
    let first = Ipv4Addr::new(100, 64, 0, 0);
    let (keys, values) = crate::plant::maglev_sessions(&maps, &record, first, n)?;
    crate::plant::sessions(&maps.affinity, &keys, &values, |done| {
        progress(&format!("  planted {done}/{n} sessions"));
    })?;
    // At millions of sessions a count takes seconds and status answers with
    // the latest: wait for one that includes the planted sessions.
    let deadline = Instant::now() + COUNT_WAIT;
    loop {
        let counted = d.ctl(lab, &["status"])?["sessions"].as_u64().unwrap_or(0);
        if counted >= u64::from(n) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "planted {n} sessions but status counts {counted} after {COUNT_WAIT:?}: \
                 the LRU evicted some, or nothing counted them"
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// Resident memory of process `pid` in MiB (NaN if unreadable).
fn rss_mib(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn table(runs: &[Run]) -> Table {
    let bound = kernel_down_bound_ms();
    let mut rows = Vec::new();
    let mut extra = Vec::new();
    for r in runs {
        let down: Vec<f64> = r
            .down_ms
            .values()
            .map(|t| t.unwrap_or(f64::INFINITY))
            .collect();
        let name = format!(
            "{} sessions: kill → DOWN in the kernel, each service",
            r.sessions
        );
        let slowest = down.iter().copied().fold(0.0, f64::max);
        extra.push((name.clone(), "bound ms".into(), format!("{bound:.0}")));
        extra.push((
            name.clone(),
            "within the bound".into(),
            format!(
                "{} of {}",
                down.iter().filter(|t| **t <= bound).count(),
                down.len()
            ),
        ));
        extra.push((
            name.clone(),
            "slowest ms".into(),
            if slowest.is_finite() {
                format!("{slowest:.0}")
            } else {
                format!("never (watched {} s)", WATCH_FOR.as_secs())
            },
        ));
        extra.push((
            name.clone(),
            "daemon RSS MiB".into(),
            format!("{:.0}", r.rss_mib),
        ));
        extra.push((
            name.clone(),
            "planting s".into(),
            format!("{:.1}", r.plant_ms / 1000.0),
        ));
        rows.push(Series::new(name, "ms", down));
        for (what, samples) in [
            ("xlb status", &r.status_ms),
            ("metrics scrape", &r.scrape_ms),
        ] {
            let name = format!("{} sessions: {what} meanwhile", r.sessions);
            extra.push((name.clone(), "calls".into(), samples.len().to_string()));
            rows.push(Series::new(name, "ms", samples.clone()));
        }
    }
    let h = HealthOptions::default();
    Table {
        title: "A backend failure with millions of sessions".into(),
        about: format!(
            "The daemon of the failover lab ({BACKENDS} backends in 4 services, checks every {} \
             with fall {}, so the bound is fall × interval + 100 ms = {bound:.0} ms), its affinity \
             map planted with the given number of sessions of the IPv4 HTTP service (batched \
             writes, each session on its client's Maglev answer), then one backend's servers \
             stopped while `xlb status` and a metrics scrape run every {} ms. Rows: the time from \
             the kill until that backend is DOWN in the kernel's backend map in each service \
             (median and min–max over the 4 services), and how long each status call (the CLI \
             process included) and scrape took meanwhile. One run per session count.",
            h.interval,
            h.fall,
            MONITOR_EVERY.as_millis(),
        ),
        baseline: rows.first().map(|r| r.name.clone()).unwrap_or_default(),
        rows,
        extra,
    }
}
