//! Part 8: failures and changes with millions of sessions. The failover
//! lab's daemon with five backends in each of its 4 services (HTTP and UDP
//! checks every 500 ms, fall 3), its affinity map planted with `N`
//! synthetic sessions of the IPv4 HTTP service (each on its Maglev answer,
//! as real clients would be). Then, in this order, at each session count:
//!
//! a) idle: `xlb status`, `xlb backend list`, a metrics scrape and `xlb
//!    sessions where` of a planted client, 20 calls each;
//! b) one backend killed while another service's backend is being drained
//!    (the drain changes that table, so a divergent scan of all `N`
//!    sessions runs): kill → DOWN in the kernel per service, the drain's
//!    time to live, and when the dead backend's planted sessions were moved;
//! c) four of the five backends killed at once: kill → DOWN of each of the
//!    16 (service, backend) pairs;
//! d) a weight change in the planted service (its table changes at `N`
//!    sessions), with a backend killed while it runs: the change's time to
//!    live, its divergent scan's share (from the daemon's log), and the
//!    killed backend's DOWN per service;
//! e) planting time and the daemon's memory.
//!
//! With `XLB_ATSCALE_DEBUG=DIR` set, the daemon's log of each run is kept
//! as `DIR/daemon-N.log` (the lab's own directory is removed with it).
//!
//! `xlb status` and a metrics scrape run ten times a second during b)–d).
//! Everything is undone after each step (servers restarted, drain and
//! weight reverted) and the next step waits until every backend serves
//! again in the kernel; (c) and (d) start from `N` freshly planted
//! sessions (the previous step's flushed). At lab scale every walk of the sessions is cheap;
//! here they are what an operator meets.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_common::{Affinity, AffinityKey};
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

/// Backends of the lab, each in every service: four can fail at once and
/// every service keeps one.
pub const BACKENDS: usize = 5;
/// The service whose sessions are planted.
pub const PLANTED_SERVICE: &str = "http-v4";
/// The service whose backend is drained during the single failure: another
/// one than the planted service, so the drain's scan finds nothing to keep
/// and measures the walk alone.
const DRAINED_SERVICE: &str = "echo-v4";
/// How often status and the scrape are asked while a failure runs.
const MONITOR_EVERY: Duration = Duration::from_millis(100);
/// How long the monitor runs before a failure, as an operator's would.
const MONITOR_LEAD: Duration = Duration::from_millis(500);
/// From the start of a drain or weight change until the kill.
const CHANGE_LEAD: Duration = Duration::from_millis(100);
/// The longest the kernel is watched for DOWN after a kill.
const WATCH_FOR: Duration = Duration::from_secs(30);
/// The longest the dead backend's planted sessions may take to be moved.
const MOVE_WAIT: Duration = Duration::from_secs(60);
/// How often the sampled sessions are looked at while waiting for the move.
const MOVE_POLL: Duration = Duration::from_millis(50);
/// How often the backend map is read while watching for DOWN.
const WATCH_POLL: Duration = Duration::from_millis(2);
/// How long status may take to count the planted sessions.
const COUNT_WAIT: Duration = Duration::from_secs(90);
/// How long a backend may take to come up after the daemon starts.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long every backend may take to serve again after a step is undone
/// (each undo is a table change, so a divergent scan of every session).
const LIVE_WAIT: Duration = Duration::from_secs(180);
/// Connect timeout of one scrape (its read may take twice as long).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls of each idle command.
const IDLE_CALLS: usize = 20;
/// What an operator expects of a status call or scrape, ms.
pub const TARGET_MS: f64 = 50.0;
/// Planted sessions remembered (and looked up after a failure), at most.
const SAMPLE: usize = 20_000;
/// Affinity timeout of the lab's services: the planted sessions must stay
/// fresh for the whole run (minutes at 10M), not the default 300 s.
const AFFINITY_TIMEOUT: &str = "3600s";

/// Which steps [`measure`] runs (planting and memory always).
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// a) idle latencies.
    pub idle: bool,
    /// b) a single failure of the first backend.
    pub single: bool,
    /// b) ... while another service's backend is being drained.
    pub drain_during_single: bool,
    /// c) four backends killed at once.
    pub simultaneous: bool,
    /// d) a weight change in the planted service with a kill during it.
    pub table_change: bool,
}

impl Plan {
    /// Every step: the bench part.
    pub const ALL: Plan = Plan {
        idle: true,
        single: true,
        drain_during_single: true,
        simultaneous: true,
        table_change: true,
    };
    /// A single failure and nothing else: the end-to-end test.
    pub const SINGLE_FAILURE: Plan = Plan {
        idle: false,
        single: true,
        drain_during_single: false,
        simultaneous: false,
        table_change: false,
    };
}

/// One timed call.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    /// Wall time, the CLI process included, ms (a failed call: until it failed).
    pub ms: f64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// The daemon's log line of a slow apply ("new tables live after").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyLog {
    /// The `tables` field as logged, e.g. `["http-v4"]`.
    pub tables: String,
    /// From the apply's start until its new tables were live, ms.
    pub took_ms: u64,
    /// Sessions the divergent scan read.
    pub scanned: u64,
    /// The scan's own time, ms.
    pub scan_ms: u64,
}

/// A drain or weight change that ran during a failure.
#[derive(Clone, Debug)]
pub struct Change {
    /// The command, e.g. `xlb backend drain echo-v4 b5`.
    pub command: String,
    /// Its CLI's wall time: the CLI answers once the change is live.
    pub ms: f64,
    /// Its apply's log line, if the apply was slow enough to be logged.
    pub apply: Option<ApplyLog>,
}

/// Whether the dead backend's planted sessions were moved.
#[derive(Clone, Copy, Debug)]
pub struct Moved {
    /// Sampled planted sessions that were on the dead backend.
    pub sampled: usize,
    /// Of them, still on it at the end of the wait (0: all moved).
    pub left: usize,
    /// Of them, in neither session map at the end of the wait.
    pub gone: usize,
    /// From the kill until none was left on it, ms (`None`: not within the wait).
    pub after_ms: Option<f64>,
}

/// One failure step.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The killed backends, in the order their servers were stopped.
    pub killed: Vec<String>,
    /// From each kill until that backend was DOWN in the kernel, by
    /// (service, backend), ms (`None`: not within [`WATCH_FOR`]).
    pub down_ms: BTreeMap<(String, String), Option<f64>>,
    /// From the first kill to the last.
    pub kill_spread_ms: f64,
    /// `xlb status` calls from [`MONITOR_LEAD`] before the kill until the end.
    pub status: Vec<Call>,
    /// Metrics scrapes over the same time.
    pub scrape: Vec<Call>,
    /// The drain or weight change that ran meanwhile.
    pub change: Option<Change>,
    /// The single failure: the dead backend's planted sessions.
    pub moved: Option<Moved>,
}

/// Everything measured at one session count.
#[derive(Clone, Debug)]
pub struct ScaleRun {
    /// Planted sessions.
    pub sessions: u32,
    /// Writing them into the affinity map, ms: the first planting and each
    /// re-planting before (c) and (d).
    pub plant_ms: Vec<f64>,
    /// Daemon resident memory after the run, MiB.
    pub rss_mib: f64,
    /// Its peak (`VmHWM`), MiB.
    pub peak_rss_mib: f64,
    /// a) idle calls, by command.
    pub idle: Vec<(String, Vec<Call>)>,
    /// b) the single failure.
    pub single: Option<Failure>,
    /// c) the simultaneous failures.
    pub simultaneous: Option<Failure>,
    /// d) the weight change with a failure during it.
    pub table_change: Option<Failure>,
}

/// Part 8 at each of `budget.at_scale_sessions`.
pub fn part_at_scale(budget: Budget) -> Result<Table> {
    if budget.at_scale_sessions.is_empty() {
        bail!("the budget has no session counts for the at-scale part");
    }
    let mut runs = Vec::new();
    for &n in budget.at_scale_sessions {
        progress(&format!("at scale: failures and changes with {n} sessions"));
        runs.push(measure("atscale", n, Plan::ALL).with_context(|| format!("{n} sessions"))?);
    }
    Ok(table(&runs))
}

/// A lab named `tag` with `n` planted sessions, through the steps of `plan`;
/// the raw measurements. Everything it starts is gone when it returns.
pub fn measure(tag: &str, n: u32, plan: Plan) -> Result<ScaleRun> {
    let lab = Lab::new(
        tag,
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
    )
    .replace(
        "\nprotocol = ",
        &format!("\naffinity_timeout = \"{AFFINITY_TIMEOUT}\"\nprotocol = "),
    );
    fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    let daemon = Daemon::start(&lab, &config)?;
    for svc in SERVICES {
        for b in &lab.backends {
            daemon.wait_backend(&lab, svc, &b.name, READY_TIMEOUT, |v| v["health"] == "up")?;
        }
    }
    let st = daemon.ctl(&lab, &["status"])?;
    let pins = st["pins"].as_str().context("status without pins")?;
    let maps = PinnedMaps::open(std::path::Path::new(pins))?;
    let watch = KernelWatch::new(&lab, &daemon)?;
    let mut cx = Cx {
        lab: &lab,
        d: &daemon,
        watch: &watch,
        maps: &maps,
        n,
        sample: Vec::new(),
        plant_ms: Vec::new(),
    };
    cx.plant()?;
    wait_live(&cx)?;

    let idle = if plan.idle {
        progress("  idle calls");
        idle_calls(&cx)
    } else {
        Vec::new()
    };
    let single = if plan.single {
        progress("  a single failure");
        Some(single_failure(&cx, &mut servers, plan.drain_during_single)?)
    } else {
        None
    };
    let simultaneous = if plan.simultaneous {
        progress("  simultaneous failures");
        if plan.single {
            cx.replant()?;
        }
        Some(simultaneous_failures(&cx, &mut servers)?)
    } else {
        None
    };
    let table_change = if plan.table_change {
        progress("  a weight change with a failure during it");
        if plan.single || plan.simultaneous {
            cx.replant()?;
        }
        Some(weight_change(&cx, &mut servers)?)
    } else {
        None
    };
    if let Some(dir) = std::env::var_os("XLB_ATSCALE_DEBUG") {
        let _ = fs::write(
            std::path::Path::new(&dir).join(format!("daemon-{n}.log")),
            daemon.child.log(),
        );
    }
    let (rss_mib, peak_rss_mib) = (
        mib(daemon.child.pid(), "VmRSS:"),
        mib(daemon.child.pid(), "VmHWM:"),
    );
    Ok(ScaleRun {
        sessions: n,
        plant_ms: cx.plant_ms,
        rss_mib,
        peak_rss_mib,
        idle,
        single,
        simultaneous,
        table_change,
    })
}

/// What the steps share.
struct Cx<'a> {
    lab: &'a Lab,
    d: &'a Daemon,
    watch: &'a KernelWatch,
    maps: &'a PinnedMaps,
    /// Sessions planted each time.
    n: u32,
    /// The planted sessions (client, key, value as planted), a sample.
    sample: Vec<(Ipv4Addr, AffinityKey, Affinity)>,
    /// How long each planting took, ms.
    plant_ms: Vec<f64>,
}

impl Cx<'_> {
    /// Plants `n` sessions of [`PLANTED_SERVICE`] into the daemon's
    /// affinity map, each on its client's answer in the live Maglev table,
    /// keeps a sample of them and waits until status counts them (a count
    /// begun after the planting, at least `n`).
    fn plant(&mut self) -> Result<()> {
        let (lab, n) = (self.lab, self.n);
        let record = crate::plant::tcp_service(self.maps, IpAddr::V4(lab.vip4), HTTP_PORT)?;
        // 100.64.0.0/10 and up: no lab client is there.
        let first = Ipv4Addr::new(100, 64, 0, 0);
        let (keys, values) = crate::plant::maglev_sessions(self.maps, &record, first, n)?;
        let started = Instant::now();
        crate::plant::sessions(&self.maps.affinity, &keys, &values, |done| {
            progress(&format!("  planted {done}/{n} sessions"));
        })?;
        let planted = Instant::now();
        self.plant_ms.push(ms(planted - started));
        let mut picked = crate::plant::sample(SAMPLE, n, 0x5ca1e);
        picked.sort_unstable();
        picked.dedup();
        self.sample = picked
            .iter()
            .map(|&i| {
                let client = Ipv4Addr::from(u32::from(first) + i);
                (client, keys[i as usize], values[i as usize])
            })
            .collect();
        drop((keys, values));
        // At millions of sessions a count takes seconds and status answers
        // with the latest: wait for one begun after the planting.
        let deadline = planted + COUNT_WAIT;
        loop {
            let st = self.d.ctl(lab, &["status"])?;
            let counted = st["sessions"].as_u64().unwrap_or(0);
            let fresh = st["sessions_counted_ms_ago"]
                .as_u64()
                .is_some_and(|ago| u128::from(ago) < planted.elapsed().as_millis());
            if fresh && counted >= u64::from(n) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "planted {n} sessions but status counts {counted} (fresh: {fresh}) after \
                     {COUNT_WAIT:?}: the LRU evicted some, or nothing counted them"
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Flushes the planted service's sessions (the previous step moved and
    /// protected some, and deleted others) and plants `n` fresh ones, so
    /// every step starts from the same map. The flush finishes any apply
    /// still under way first.
    fn replant(&mut self) -> Result<()> {
        self.d.ctl(
            self.lab,
            &["sessions", "flush", "--service", PLANTED_SERVICE],
        )?;
        self.plant()
    }
}

/// The `i`th lab backend's name.
fn backend(lab: &Lab, i: usize) -> Result<String> {
    lab.backends
        .get(i)
        .map(|b| b.name.clone())
        .with_context(|| format!("the lab has no backend {i}"))
}

/// a) [`IDLE_CALLS`] calls of each idle command, one after another.
fn idle_calls(cx: &Cx) -> Vec<(String, Vec<Call>)> {
    let (lab, d) = (cx.lab, cx.d);
    let clients: Vec<String> = (0..IDLE_CALLS)
        .map(|k| {
            let i = (k * cx.sample.len() / IDLE_CALLS).min(cx.sample.len().saturating_sub(1));
            cx.sample
                .get(i)
                .map(|s| s.0)
                .unwrap_or(Ipv4Addr::UNSPECIFIED)
        })
        .map(|c| c.to_string())
        .collect();
    let times = |f: &dyn Fn(usize) -> bool| -> Vec<Call> {
        (0..IDLE_CALLS)
            .map(|k| {
                let t = Instant::now();
                let ok = f(k);
                Call {
                    ms: ms(t.elapsed()),
                    ok,
                }
            })
            .collect()
    };
    vec![
        (
            "xlb status".into(),
            times(&|_| d.ctl(lab, &["status"]).is_ok()),
        ),
        (
            "xlb backend list".into(),
            times(&|_| d.ctl(lab, &["backend", "list"]).is_ok()),
        ),
        ("metrics scrape".into(), times(&|_| scrape_ok(lab))),
        (
            "xlb sessions where (a planted client)".into(),
            times(&|k| {
                d.ctl(
                    lab,
                    &[
                        "sessions",
                        "where",
                        &clients[k],
                        "--service",
                        PLANTED_SERVICE,
                    ],
                )
                .is_ok()
            }),
        ),
    ]
}

/// b) The first backend killed (while [`DRAINED_SERVICE`]'s last backend is
/// being drained, if `drain`); undone before it returns.
fn single_failure(cx: &Cx, servers: &mut Servers, drain: bool) -> Result<Failure> {
    let dead = backend(cx.lab, 0)?;
    let drained = backend(cx.lab, BACKENDS - 1)?;
    let drain_args = ["backend", "drain", DRAINED_SERVICE, drained.as_str()];
    let (lab, d) = (cx.lab, cx.d);
    type Out = (
        BTreeMap<(String, String), Option<f64>>,
        Option<Change>,
        Option<Moved>,
    );
    let ((down_ms, change, moved), status, scrape) = with_monitor(lab, d, || {
        thread::scope(|s| -> Result<Out> {
            let cli = drain.then(|| s.spawn(move || timed(lab, d, &drain_args)));
            if cli.is_some() {
                thread::sleep(CHANGE_LEAD);
            }
            let mut killed = Killed::kill(servers, lab, &dead)?;
            // Timed from here: the stop returns once the servers' sockets are closed.
            let kill_at = Instant::now();
            let down = watch_down(cx.watch, &[(dead.clone(), kill_at)]);
            let moved = wait_moved(cx, &dead, kill_at);
            killed.restore()?;
            let change = cli.map(|h| finish(h, &drain_args)).transpose()?;
            Ok((down, change, moved))
        })
    })?;
    if drain {
        d.ctl(lab, &["backend", "undrain", DRAINED_SERVICE, &drained])?;
    }
    wait_live(cx)?;
    Ok(Failure {
        killed: vec![dead],
        down_ms,
        kill_spread_ms: 0.0,
        status,
        scrape,
        change,
        moved,
    })
}

/// c) Every backend but the last killed at once (their servers stopped one
/// after another); undone before it returns.
fn simultaneous_failures(cx: &Cx, servers: &mut Servers) -> Result<Failure> {
    let names = (0..BACKENDS - 1)
        .map(|i| backend(cx.lab, i))
        .collect::<Result<Vec<_>>>()?;
    let ((down_ms, kill_spread_ms), status, scrape) = with_monitor(cx.lab, cx.d, || {
        let mut killed = KilledSet::new(servers, cx.lab);
        let mut kills = Vec::new();
        for name in &names {
            killed.kill(name)?;
            kills.push((name.clone(), Instant::now()));
        }
        let spread = kills
            .last()
            .zip(kills.first())
            .map_or(0.0, |(l, f)| ms(l.1 - f.1));
        let down = watch_down(cx.watch, &kills);
        killed.restore()?;
        Ok((down, spread))
    })?;
    wait_live(cx)?;
    Ok(Failure {
        killed: names,
        down_ms,
        kill_spread_ms,
        status,
        scrape,
        change: None,
        moved: None,
    })
}

/// d) A weight change of the planted service's second backend, the last
/// backend killed while it runs; both undone before it returns.
fn weight_change(cx: &Cx, servers: &mut Servers) -> Result<Failure> {
    let (lab, d) = (cx.lab, cx.d);
    let weighted = backend(lab, 1)?;
    let dead = backend(lab, BACKENDS - 1)?;
    let was = d.backend(lab, PLANTED_SERVICE, &weighted)?["weight"]
        .as_u64()
        .context("backend list without a weight")?;
    let weight = if was < 32_768 { was * 2 } else { was / 2 }.to_string();
    let was = was.to_string();
    let args = [
        "backend",
        "weight",
        PLANTED_SERVICE,
        weighted.as_str(),
        weight.as_str(),
    ];
    let logged_before = slow_applies(&d.child.log()).len();
    type Out = (BTreeMap<(String, String), Option<f64>>, Change);
    let ((down_ms, mut change), status, scrape) = with_monitor(lab, d, || {
        thread::scope(|s| -> Result<Out> {
            let cli = s.spawn(move || timed(lab, d, &args));
            thread::sleep(CHANGE_LEAD);
            let mut killed = Killed::kill(servers, lab, &dead)?;
            // Timed from here: the stop returns once the servers' sockets are closed.
            let kill_at = Instant::now();
            let down = watch_down(cx.watch, &[(dead.clone(), kill_at)]);
            killed.restore()?;
            Ok((down, finish(cli, &args)?))
        })
    })?;
    // The first slow apply after the call that wrote only this table (the
    // kill's own apply, which writes every service's, follows it).
    let only = format!("[\"{PLANTED_SERVICE}\"]");
    let applies: Vec<ApplyLog> = slow_applies(&d.child.log())
        .into_iter()
        .skip(logged_before)
        .collect();
    change.apply = applies.iter().find(|a| a.tables == only).cloned();
    d.ctl(
        lab,
        &["backend", "weight", PLANTED_SERVICE, &weighted, &was],
    )?;
    wait_live(cx)?;
    Ok(Failure {
        killed: vec![dead],
        down_ms,
        kill_spread_ms: 0.0,
        status,
        scrape,
        change: Some(change),
        moved: None,
    })
}

/// Runs `f` while `xlb status` and a scrape are asked every
/// [`MONITOR_EVERY`] (each on its own thread, so a slow scrape does not
/// hold up status), from [`MONITOR_LEAD`] before `f` until it returns.
fn with_monitor<T>(
    lab: &Lab,
    d: &Daemon,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<Call>, Vec<Call>)> {
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let status = s.spawn(|| every(&stop, || d.ctl(lab, &["status"]).is_ok()));
        let scrape = s.spawn(|| every(&stop, || scrape_ok(lab)));
        let out = {
            // Stops the monitor however `f` ends (an error, a panic).
            let _stop = StopOnDrop(&stop);
            thread::sleep(MONITOR_LEAD);
            f()
        };
        let status = status
            .join()
            .map_err(|_| anyhow!("the status monitor panicked"))?;
        let scrape = scrape
            .join()
            .map_err(|_| anyhow!("the scrape monitor panicked"))?;
        Ok((out?, status, scrape))
    })
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Calls `call` every [`MONITOR_EVERY`] until `stop`, timing each call.
fn every(stop: &AtomicBool, call: impl Fn() -> bool) -> Vec<Call> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let ok = call();
        out.push(Call {
            ms: ms(t.elapsed()),
            ok,
        });
        if let Some(rest) = (t + MONITOR_EVERY).checked_duration_since(Instant::now()) {
            thread::sleep(rest);
        }
    }
    out
}

/// Whether a scrape answered 200.
fn scrape_ok(lab: &Lab) -> bool {
    try_scrape(lab, SCRAPE_TIMEOUT).is_ok_and(|t| t.starts_with("HTTP/1.1 200"))
}

/// Runs `xlb ARGS`, timed.
fn timed(lab: &Lab, d: &Daemon, args: &[&str]) -> (f64, Result<serde_json::Value>) {
    let t = Instant::now();
    let out = d.ctl(lab, args);
    (ms(t.elapsed()), out)
}

/// The change a [`timed`] call on another thread made.
fn finish(
    h: thread::ScopedJoinHandle<'_, (f64, Result<serde_json::Value>)>,
    args: &[&str],
) -> Result<Change> {
    let (ms, out) = h
        .join()
        .map_err(|_| anyhow!("the thread of xlb {} panicked", args.join(" ")))?;
    out?;
    Ok(Change {
        command: format!("xlb {}", args.join(" ")),
        ms,
        apply: None,
    })
}

/// Watches the kernel until every (service, backend) of `kills` (backend,
/// when its servers were stopped) is DOWN, at most [`WATCH_FOR`].
fn watch_down(
    watch: &KernelWatch,
    kills: &[(String, Instant)],
) -> BTreeMap<(String, String), Option<f64>> {
    let mut seen: Vec<BTreeMap<String, Option<f64>>> = vec![BTreeMap::new(); kills.len()];
    let start = Instant::now();
    while start.elapsed() < WATCH_FOR {
        for ((name, at), s) in kills.iter().zip(&mut seen) {
            watch.poll(name, *at, s);
        }
        if seen.iter().all(KernelWatch::all_seen) {
            break;
        }
        thread::sleep(WATCH_POLL);
    }
    let mut out = BTreeMap::new();
    for ((name, _), s) in kills.iter().zip(seen) {
        for (svc, t) in s {
            out.insert((svc, name.clone()), t);
        }
    }
    out
}

/// Waits until none of the sampled planted sessions of `dead` still points
/// at it (the daemon rewrites a dead backend's sessions to their Maglev
/// choice), at most [`MOVE_WAIT`]. `None` if no sampled session was on it.
fn wait_moved(cx: &Cx<'_>, dead: &str, kill_at: Instant) -> Option<Moved> {
    let id = cx.watch.id(PLANTED_SERVICE, dead)?;
    let keys: Vec<AffinityKey> = cx
        .sample
        .iter()
        .filter(|(_, _, v)| v.backend_id == id)
        .map(|(_, k, _)| *k)
        .collect();
    if keys.is_empty() {
        return None;
    }
    let deadline = Instant::now() + MOVE_WAIT;
    loop {
        let (mut left, mut gone) = (0, 0);
        for k in &keys {
            let lru = cx.maps.affinity.get(k, 0).ok();
            let kept = cx.maps.protected.get(k, 0).ok();
            if lru.is_none() && kept.is_none() {
                gone += 1;
            } else if lru.iter().chain(&kept).any(|a| a.backend_id == id) {
                left += 1;
            }
        }
        let done = left == 0;
        if done || Instant::now() >= deadline {
            return Some(Moved {
                sampled: keys.len(),
                left,
                gone,
                after_ms: done.then(|| ms(kill_at.elapsed())),
            });
        }
        thread::sleep(MOVE_POLL);
    }
}

/// Waits until every backend of every service serves again in the kernel.
fn wait_live(cx: &Cx) -> Result<()> {
    let start = Instant::now();
    loop {
        let Some(why) = cx.watch.not_live()? else {
            return Ok(());
        };
        if start.elapsed() > LIVE_WAIT {
            bail!(
                "not every backend serves again within {LIVE_WAIT:?}: {why}\ndaemon log:\n{}",
                crate::cmd::tail(cx.d.child.log().as_bytes())
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Backends whose servers are stopped; started again on
/// [`KilledSet::restore`] or on drop (so a failed step leaves none dead).
struct KilledSet<'s, 'l> {
    servers: &'s mut Servers,
    lab: &'l Lab,
    down: Vec<String>,
}

impl<'s, 'l> KilledSet<'s, 'l> {
    fn new(servers: &'s mut Servers, lab: &'l Lab) -> Self {
        Self {
            servers,
            lab,
            down: Vec::new(),
        }
    }

    fn kill(&mut self, name: &str) -> Result<()> {
        self.servers
            .stop_backend(name)
            .with_context(|| format!("stopping the servers of {name}"))?;
        self.down.push(name.to_owned());
        Ok(())
    }

    /// Starts every stopped backend again; the first failure is returned
    /// after all were tried.
    fn restore(&mut self) -> Result<()> {
        let mut first = None;
        for name in std::mem::take(&mut self.down) {
            if let Err(e) = self.servers.start_backend(self.lab, &name) {
                first.get_or_insert(e.context(format!("starting the servers of {name} again")));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for KilledSet<'_, '_> {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("bench: {e:#}");
        }
    }
}

/// The daemon's "new tables live after" lines in `log`, in order.
pub fn slow_applies(log: &str) -> Vec<ApplyLog> {
    log.lines()
        .filter(|l| l.contains("new tables live after"))
        .filter_map(|l| {
            let num = |key: &str| -> Option<u64> {
                let at = l.find(key)? + key.len();
                let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            };
            let tables = l
                .find("tables=")
                .map(|at| {
                    let rest = &l[at + "tables=".len()..];
                    rest.find(']').map_or(rest, |end| &rest[..=end]).to_owned()
                })
                .unwrap_or_default();
            Some(ApplyLog {
                tables,
                took_ms: num(" took_ms=")?,
                scanned: num(" scanned=")?,
                scan_ms: num(" scan_ms=")?,
            })
        })
        .collect()
}

/// A line of `/proc/PID/status` in kB, as MiB (NaN if unreadable).
fn mib(pid: u32, field: &str) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Extra columns, in the order the table shows them.
const TARGET: &str = "target ms";
const WITHIN: &str = "within target";
const SLOWEST: &str = "slowest ms";
const CALLS: &str = "calls";
const NOTE: &str = "note";

/// Row names, shared with the tests that look rows up.
pub mod rows {
    /// a) an idle command at `n` sessions.
    pub fn idle(n: u32, what: &str) -> String {
        format!("{n} sessions, idle: {what}")
    }
    /// b) the single failure's DOWN row.
    pub fn single_down(n: u32, dead: &str, during_drain: bool) -> String {
        let during = if during_drain { " during a drain" } else { "" };
        format!("{n} sessions, {dead} killed{during}: kill → DOWN in the kernel, each service")
    }
    /// b) the drain's time to live.
    pub fn drain(n: u32, command: &str) -> String {
        format!("{n} sessions, during that failure: {command}, time to live")
    }
    /// c) the simultaneous failures' DOWN row.
    pub fn simultaneous_down(n: u32, first: &str, last: &str, pairs: usize) -> String {
        format!(
            "{n} sessions, {first}..{last} killed at once: kill → DOWN in the kernel, \
             each of {pairs} (service, backend)"
        )
    }
    /// d) the weight change's time to live.
    pub fn weight(n: u32, command: &str) -> String {
        format!("{n} sessions, a table change: {command}, time to live")
    }
    /// d) the DOWN of the backend killed during it.
    pub fn weight_down(n: u32, dead: &str) -> String {
        format!(
            "{n} sessions, {dead} killed during the table change: kill → DOWN in the kernel, each service"
        )
    }
    /// b)–d) status or scrape while the failures ran.
    pub fn meanwhile(n: u32, what: &str) -> String {
        format!("{n} sessions, during the failures: {what}")
    }
    /// e) planting.
    pub fn planting(n: u32) -> String {
        format!("{n} sessions: planting (batched writes)")
    }
}

/// `k of n` calls that succeeded within [`TARGET_MS`].
fn within_target(calls: &[Call]) -> String {
    let ok = calls.iter().filter(|c| c.ok && c.ms <= TARGET_MS).count();
    format!("{ok} of {}", calls.len())
}

fn failed_note(calls: &[Call]) -> String {
    match calls.iter().filter(|c| !c.ok).count() {
        0 => String::new(),
        k => format!("{k} failed"),
    }
}

/// Rows and extras being built.
#[derive(Default)]
struct Builder {
    rows: Vec<Series>,
    extra: Vec<(String, String, String)>,
}

impl Builder {
    fn row(&mut self, name: String, samples: Vec<f64>, extras: &[(&str, String)]) {
        for (col, v) in extras {
            if !v.is_empty() {
                self.extra
                    .push((name.clone(), (*col).to_owned(), v.clone()));
            }
        }
        self.rows.push(Series::new(name, "ms", samples));
    }

    fn calls(&mut self, name: String, calls: &[Call]) {
        let samples = calls.iter().map(|c| c.ms).collect();
        self.row(
            name,
            samples,
            &[
                (TARGET, format!("{TARGET_MS:.0}")),
                (WITHIN, within_target(calls)),
                (CALLS, calls.len().to_string()),
                (NOTE, failed_note(calls)),
            ],
        );
    }

    fn down(&mut self, name: String, f: &Failure, note: String) {
        let bound = kernel_down_bound_ms();
        let down: Vec<f64> = f
            .down_ms
            .values()
            .map(|t| t.unwrap_or(f64::INFINITY))
            .collect();
        let slowest = down.iter().copied().fold(0.0, f64::max);
        let over: Vec<String> = f
            .down_ms
            .iter()
            .filter(|(_, t)| t.is_none_or(|t| t > bound))
            .map(|((svc, be), t)| match t {
                Some(t) => format!("{svc}/{be} {t:.0}"),
                None => format!("{svc}/{be} never"),
            })
            .collect();
        let note = if over.is_empty() {
            note
        } else {
            format!("{note}; over the bound: {}", over.join(", "))
        };
        self.row(
            name,
            down.clone(),
            &[
                (TARGET, format!("{bound:.0} (bound)")),
                (
                    WITHIN,
                    format!(
                        "{} of {}",
                        down.iter().filter(|t| **t <= bound).count(),
                        down.len()
                    ),
                ),
                (
                    SLOWEST,
                    if slowest.is_finite() {
                        format!("{slowest:.0}")
                    } else {
                        format!("never (watched {} s)", WATCH_FOR.as_secs())
                    },
                ),
                (NOTE, note),
            ],
        );
    }
}

/// The note of a weight change: its apply's log line.
fn apply_note(c: &Change) -> String {
    match &c.apply {
        Some(a) => format!(
            "apply live after {} ms, of which the divergent scan {} ms ({:.0}%) over {} sessions",
            a.took_ms,
            a.scan_ms,
            100.0 * a.scan_ms as f64 / a.took_ms.max(1) as f64,
            a.scanned
        ),
        None => "no slow-apply line: the apply took under 100 ms".into(),
    }
}

fn moved_note(m: Option<&Moved>) -> String {
    let Some(m) = m else {
        return "no sampled planted session was on it".into();
    };
    match m.after_ms {
        Some(t) => format!(
            "its {} sampled planted sessions all moved {:.0} ms after the kill",
            m.sampled, t
        ),
        None => format!(
            "{} of its {} sampled planted sessions still on it after {} s ({} gone)",
            m.left,
            m.sampled,
            MOVE_WAIT.as_secs(),
            m.gone
        ),
    }
}

fn table(runs: &[ScaleRun]) -> Table {
    let mut b = Builder::default();
    for r in runs {
        let n = r.sessions;
        for (what, calls) in &r.idle {
            b.calls(rows::idle(n, what), calls);
        }
        let mut status = Vec::new();
        let mut scrape = Vec::new();
        if let Some(f) = &r.single {
            let dead = f.killed.join(",");
            b.down(
                rows::single_down(n, &dead, f.change.is_some()),
                f,
                moved_note(f.moved.as_ref()),
            );
            if let Some(c) = &f.change {
                b.row(
                    rows::drain(n, &c.command),
                    vec![c.ms],
                    &[(
                        NOTE,
                        format!(
                            "{DRAINED_SERVICE} has no planted session; its table change still \
                             scans all {n}"
                        ),
                    )],
                );
            }
            status.extend_from_slice(&f.status);
            scrape.extend_from_slice(&f.scrape);
        }
        if let Some(f) = &r.simultaneous {
            let first = f.killed.first().map_or("", String::as_str);
            let last = f.killed.last().map_or("", String::as_str);
            b.down(
                rows::simultaneous_down(n, first, last, f.down_ms.len()),
                f,
                format!(
                    "servers stopped one after another within {:.0} ms; each DOWN timed from that backend's own stop",
                    f.kill_spread_ms
                ),
            );
            status.extend_from_slice(&f.status);
            scrape.extend_from_slice(&f.scrape);
        }
        if let Some(f) = &r.table_change {
            if let Some(c) = &f.change {
                b.row(
                    rows::weight(n, &c.command),
                    vec![c.ms],
                    &[(NOTE, apply_note(c))],
                );
                let dead = f.killed.join(",");
                let inside = if c.ms > ms(CHANGE_LEAD) {
                    "inside it"
                } else {
                    "after it was live"
                };
                b.down(
                    rows::weight_down(n, &dead),
                    f,
                    format!(
                        "killed {} ms after the change began: {inside}",
                        CHANGE_LEAD.as_millis()
                    ),
                );
            }
            status.extend_from_slice(&f.status);
            scrape.extend_from_slice(&f.scrape);
        }
        if !status.is_empty() {
            b.calls(rows::meanwhile(n, "xlb status"), &status);
            b.calls(rows::meanwhile(n, "metrics scrape"), &scrape);
        }
        b.row(
            rows::planting(n),
            r.plant_ms.clone(),
            &[(
                NOTE,
                format!(
                    "daemon RSS {:.0} MiB after the run (peak {:.0} MiB)",
                    r.rss_mib, r.peak_rss_mib
                ),
            )],
        );
    }
    let h = HealthOptions::default();
    let bound = kernel_down_bound_ms();
    let counts: Vec<String> = runs.iter().map(|r| r.sessions.to_string()).collect();
    Table {
        title: "Failures and changes with millions of sessions".into(),
        about: format!(
            "The daemon of the failover lab ({BACKENDS} backends b1..b{BACKENDS} in each of 4 \
             services, checks every {interval} with fall {fall}, so the bound is fall × interval \
             + 100 ms = {bound:.0} ms; affinity timeout {AFFINITY_TIMEOUT} so no planted session \
             expires during the run), its affinity map planted with N sessions of {PLANTED_SERVICE} \
             (batched writes, each on its client's Maglev answer; N = {counts}, one run each, rows \
             named by N). In this order: (a) idle: {IDLE_CALLS} calls each of `xlb status`, `xlb \
             backend list`, a metrics scrape and `xlb sessions where` of planted clients, one \
             after another, every call's wall time with the CLI process, against a {TARGET_MS:.0} \
             ms target. (b) `xlb backend drain {DRAINED_SERVICE} b{BACKENDS}` is started (its table \
             changes, so a divergent scan reads all N sessions) and {lead} ms later b1's servers \
             are stopped: the time from the kill (when the stop returned: the servers' sockets are \
             closed, which takes up to 50 ms after it is asked) until b1 is DOWN in the kernel's backend map \
             (read from the pins every {poll} ms) in each service, against the bound; the \
             drain's CLI time (it answers once the change is live); the note says when b1's \
             sampled planted sessions no longer pointed at it. b1 is restarted and b{BACKENDS} \
             undrained. Before (c) and before (d) the planted service's sessions are flushed (`xlb \
             sessions flush`, which also lets any apply still under way finish) and N fresh ones \
             planted, so each step starts from N sessions on the live table and none protected. \
             (c) b1..b{last_dead} stopped at once (one after another, each timed \
             from its own stop): DOWN of each of the 16 (service, backend) pairs; b{BACKENDS} \
             keeps every service up. (d) `xlb backend weight {PLANTED_SERVICE} b2` doubled (the \
             planted service's table changes at N sessions), and {lead} ms later b{BACKENDS} \
             killed: the change's CLI time with its apply's log line (`took_ms`, `scan_ms`: the \
             divergent scan's share), and b{BACKENDS}'s DOWN per service against the bound (other \
             services' transitions must not wait for that scan). After each of (b)–(d) every \
             backend must serve again in the kernel before the next starts. During (b)–(d), from \
             {mlead} ms before each kill until its DOWN (in (b) until the sessions moved), `xlb \
             status` and a scrape each run every {every} ms on their own threads: their rows pool \
             the three. (e) planting time (each of the three plantings) and the daemon's RSS after the run. ∞ / never: not DOWN \
             within {watch} s.",
            interval = h.interval,
            fall = h.fall,
            counts = counts.join(", "),
            lead = CHANGE_LEAD.as_millis(),
            poll = WATCH_POLL.as_millis(),
            last_dead = BACKENDS - 1,
            mlead = MONITOR_LEAD.as_millis(),
            every = MONITOR_EVERY.as_millis(),
            watch = WATCH_FOR.as_secs(),
        ),
        baseline: b.rows.first().map(|r| r.name.clone()).unwrap_or_default(),
        rows: b.rows,
        extra: b.extra,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_slow_apply_lines() {
        let log = "\
2026-12-08T10:00:00.1Z  INFO xlb::daemon::lb: new tables live after 1.2s: the divergent scan read 1000000 sessions in 900ms (other work served between its chunks) tables=[\"http-v4\"] took_ms=1234 scanned=1000000 scan_ms=900
2026-12-08T10:00:01.1Z  INFO xlb::daemon::lb: moved the clients of b5 to their Maglev choice
2026-12-08T10:00:02.1Z  INFO xlb::daemon::lb: new tables live after 2s: ... tables=[\"http-v4\", \"echo-v4\"] took_ms=2000 scanned=1000001 scan_ms=1500
";
        let got = slow_applies(log);
        assert_eq!(
            got,
            vec![
                ApplyLog {
                    tables: "[\"http-v4\"]".into(),
                    took_ms: 1234,
                    scanned: 1_000_000,
                    scan_ms: 900,
                },
                ApplyLog {
                    tables: "[\"http-v4\", \"echo-v4\"]".into(),
                    took_ms: 2000,
                    scanned: 1_000_001,
                    scan_ms: 1500,
                },
            ]
        );
    }

    fn failure(killed: &[&str], down: &[(&str, &str, Option<f64>)]) -> Failure {
        Failure {
            killed: killed.iter().map(|s| s.to_string()).collect(),
            down_ms: down
                .iter()
                .map(|(s, b, t)| ((s.to_string(), b.to_string()), *t))
                .collect(),
            kill_spread_ms: 120.0,
            status: vec![Call { ms: 4.0, ok: true }, Call { ms: 70.0, ok: true }],
            scrape: vec![Call { ms: 8.0, ok: false }],
            change: None,
            moved: None,
        }
    }

    #[test]
    fn every_step_makes_its_rows() {
        let mut single = failure(
            &["b1"],
            &[("http-v4", "b1", Some(1100.0)), ("echo-v4", "b1", None)],
        );
        single.change = Some(Change {
            command: "xlb backend drain echo-v4 b5".into(),
            ms: 900.0,
            apply: None,
        });
        single.moved = Some(Moved {
            sampled: 400,
            left: 0,
            gone: 0,
            after_ms: Some(1900.0),
        });
        let mut weight = failure(&["b5"], &[("http-v4", "b5", Some(1200.0))]);
        weight.change = Some(Change {
            command: "xlb backend weight http-v4 b2 2".into(),
            ms: 1500.0,
            apply: Some(ApplyLog {
                tables: "[\"http-v4\"]".into(),
                took_ms: 1400,
                scanned: 1_000_000,
                scan_ms: 1050,
            }),
        });
        let run = ScaleRun {
            sessions: 1000,
            plant_ms: vec![12.0],
            rss_mib: 20.0,
            peak_rss_mib: 30.0,
            idle: vec![("xlb status".into(), vec![Call { ms: 4.0, ok: true }])],
            single: Some(single),
            simultaneous: Some(failure(
                &["b1", "b2"],
                &[
                    ("http-v4", "b1", Some(1000.0)),
                    ("http-v4", "b2", Some(1500.0)),
                ],
            )),
            table_change: Some(weight),
        };
        let t = table(&[run]);
        let names: Vec<&str> = t.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                rows::idle(1000, "xlb status"),
                rows::single_down(1000, "b1", true),
                rows::drain(1000, "xlb backend drain echo-v4 b5"),
                rows::simultaneous_down(1000, "b1", "b2", 2),
                rows::weight(1000, "xlb backend weight http-v4 b2 2"),
                rows::weight_down(1000, "b5"),
                rows::meanwhile(1000, "xlb status"),
                rows::meanwhile(1000, "metrics scrape"),
                rows::planting(1000),
            ]
        );
        let extra = |row: String, col: &str| {
            t.extra
                .iter()
                .find(|(r, c, _)| *r == row && c == col)
                .map(|(_, _, v)| v.clone())
        };
        assert_eq!(
            extra(rows::single_down(1000, "b1", true), WITHIN).as_deref(),
            Some("1 of 2")
        );
        assert!(
            extra(rows::single_down(1000, "b1", true), SLOWEST)
                .is_some_and(|v| v.starts_with("never"))
        );
        assert_eq!(
            extra(rows::meanwhile(1000, "xlb status"), WITHIN).as_deref(),
            Some("3 of 6")
        );
        assert_eq!(
            extra(rows::meanwhile(1000, "metrics scrape"), NOTE).as_deref(),
            Some("3 failed")
        );
        assert!(
            extra(rows::weight(1000, "xlb backend weight http-v4 b2 2"), NOTE)
                .is_some_and(|v| v.contains("1050 ms (75%)"))
        );
        let md = crate::bench::report::markdown(&crate::bench::Report {
            tables: vec![t],
            ..Default::default()
        });
        assert!(
            md.contains("| 1000 sessions, idle: xlb status | 4.00 |"),
            "{md}"
        );
    }
}
