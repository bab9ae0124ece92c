//! Part 5: failover under load. One client address probes the VIP every 50 ms with a new
//! TCP connection per probe; after a second the servers of the backend it sticks to are
//! stopped, and a few seconds later started again. Per contender: the failed probes, the
//! time from the kill until the client is served again (by another backend), whether it
//! moves back once its backend returns, and the share of all clients that changed backend
//! (asked once before the failure, once during it, once after the restore).
//!
//! Contenders: xlb through `xlb daemon` with health checks, nftables DNAT (no health
//! checks at all), HAProxy with `check`, nginx stream (passive checks only). They run in
//! one lab, interleaved round by round, started before and stopped after their round.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{
    Budget, Series,
    contenders::{Contender, Lineup, ensure_packages, no_time_wait_on_backends, wait_served},
    progress,
};
use crate::{
    Lab, LabOptions, Proto, Servers, client,
    daemon::{Daemon, HealthOptions},
    netns,
    servers::HTTP_PORT,
    who_serves,
};

/// Backends in the lab (N in the ideal share of moved clients, 1/N).
const BACKENDS: usize = 3;
/// Client addresses asked before, during and after the failure (the issue asks for ≥ 16).
const CLIENT_ADDRS: usize = 32;
/// Time between two probes.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// Longest one probe (connect, request, answer) may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Probing before the kill: long enough to see which backend the client sticks to. Half a
/// probe interval more, so the kill (and the restore, a multiple of 50 ms later) never
/// races a probe starting at the same moment.
const KILL_AFTER: Duration = Duration::from_millis(1025);
/// The clients are asked during the failure once the prober is served by another backend,
/// and at the latest this long before the restore.
const ASK_BEFORE_RESTORE: Duration = Duration::from_millis(500);
/// How often the control thread looks at the probes while waiting for the failover.
const POLL: Duration = Duration::from_millis(20);
/// HAProxy's checks: as close as HAProxy allows to xlb's (interval 500 ms, fall 3, rise 2).
const HAPROXY_CHECK: &str = "check inter 500ms fall 3 rise 2";

/// The contenders, in the order they run within a round.
const LINEUP: Lineup = Lineup {
    all: &[
        Contender::XlbDaemon,
        Contender::Nft,
        Contender::Haproxy,
        Contender::Nginx,
    ],
    haproxy_check: HAPROXY_CHECK,
};

/// One probe of the pinned client.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Probe {
    /// When it started, ms after probing began.
    pub at_ms: f64,
    /// The backend that answered; `None` if the probe failed.
    pub backend: Option<String>,
    /// Why it failed (the root cause), if it did.
    pub error: Option<String>,
}

/// How the backends of all clients compare between two asks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClientShift {
    /// Clients answered in the first ask (the others cannot be compared).
    pub clients: usize,
    /// Of them, clients the dead backend answered in the first ask.
    pub on_dead: usize,
    /// Clients answered by another backend in the second ask.
    pub moved: usize,
    /// Of the moved ones, clients that were not on the dead backend (ideally none).
    pub moved_from_healthy: usize,
    /// Clients not answered in the second ask.
    pub unserved: usize,
}

/// One contender's failover in one round, raw.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverRun {
    /// Contender name.
    pub contender: String,
    /// Round number (0-based).
    pub round: usize,
    /// The pinned client address.
    pub client: String,
    /// The backend that was killed (the one the client stuck to).
    pub killed: String,
    /// When its servers were stopped, ms after probing began.
    pub kill_ms: f64,
    /// When they were started again.
    pub restore_ms: f64,
    /// Probes sent.
    pub probes: usize,
    /// Probes that failed.
    pub errors: usize,
    /// Of them, probes that failed before the kill (ideally none).
    pub errors_before_kill: usize,
    /// From the kill until the first probe started after it was answered, in ms.
    pub served_again_ms: Option<f64>,
    /// Which backend answered that probe.
    pub served_again_by: Option<String>,
    /// Whether the client went back to the restored backend (`None`: it never left).
    pub moved_back: Option<bool>,
    /// The backend that answered the last answered probe.
    pub final_backend: Option<String>,
    /// How often the answering backend changed from one answered probe to the next.
    pub backend_changes: usize,
    /// All clients: before the kill against during the failure.
    pub during: ClientShift,
    /// All clients: before the kill against after the restore.
    pub after_restore: ClientShift,
    /// xlb only: from the kill until the killed backend was DOWN in the kernel's own
    /// backend map, per service, ms (`None`: not within the failure).
    pub kernel_down_ms: BTreeMap<String, Option<f64>>,
    /// Every probe, in order.
    pub probe_log: Vec<Probe>,
}

/// One row of the failover table: a contender over all rounds.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverRow {
    /// Contender name.
    pub contender: String,
    /// How it notices a dead backend.
    pub health_checks: String,
    /// Rounds measured.
    pub rounds: usize,
    /// Failed probes per round.
    pub errors: Series,
    /// Kill to served again per round, ms (rounds where the client was served again).
    pub served_again_ms: Series,
    /// Rounds in which another backend served the client before the restore.
    pub failed_over: usize,
    /// Of those, rounds in which the client went back to the restored backend.
    pub moved_back: usize,
    /// Changes of the pinned client's backend per round (1: failed over and stayed).
    pub backend_changes: Series,
    /// Share of all clients on another backend during the failure, %.
    pub moved_during_pct: Series,
    /// Share of all clients the dead backend held before the kill, %.
    pub dead_share_pct: Series,
    /// Clients that moved though their backend was healthy, summed over rounds.
    pub moved_from_healthy: usize,
    /// Share of all clients not answered during the failure, %.
    pub unserved_during_pct: Series,
    /// Share of all clients on another backend than before, after the restore, %.
    pub moved_after_pct: Series,
}

/// The failover table.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverTable {
    /// What it shows, one paragraph.
    pub about: String,
    /// Backends in the lab (N).
    pub backends: usize,
    /// One row per contender.
    pub rows: Vec<FailoverRow>,
    /// xlb: kill to DOWN in the kernel per service, ms, over the rounds.
    pub xlb_kernel_down_ms: BTreeMap<String, Series>,
    /// The bound for it: fall × interval + 100 ms.
    pub xlb_kernel_down_bound_ms: f64,
}

/// What part 5 produced.
#[derive(Debug, Default)]
pub struct FailoverOutcome {
    /// The table, if any contender ran.
    pub table: Option<FailoverTable>,
    /// Every run, raw.
    pub runs: Vec<FailoverRun>,
    /// Contenders that could not run, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// Runs part 5: `budget.failover_rounds` rounds of every contender.
pub fn part5(budget: Budget) -> Result<FailoverOutcome> {
    let mut out = FailoverOutcome::default();
    if budget.failover_probes == 0 || budget.failover_rounds == 0 {
        bail!("the budget has no failover probes or rounds");
    }
    let down = Duration::from_millis(budget.failover_down_ms);
    let probing = PROBE_EVERY * budget.failover_probes as u32;
    if KILL_AFTER + down >= probing {
        bail!("the restore ({down:?} after the kill) must fall within the {probing:?} of probing");
    }
    let missing = ensure_packages();
    let mut failed = LINEUP.unavailable(missing.as_deref());

    let lab = Lab::new(
        "failover",
        LabOptions {
            backends: BACKENDS,
            clients_v4: CLIENT_ADDRS,
            clients_v6: 0,
        },
    )?;
    no_time_wait_on_backends(&lab)?;
    let mut servers = Servers::start(&lab)?;
    // xlb's native XDP_TX needs XDP on lb0's peer; it stays for every contender (as in
    // part 4) so all of them see the same lb0.
    lab.attach_lb_peer_pass()?;

    LINEUP.rounds("part 5", budget.failover_rounds, &mut failed, |c, round| {
        let run = match measure(&lab, &mut servers, c, round, budget) {
            Ok(run) => run,
            Err(e) => {
                // The next contender needs every backend up; a restore that failed inside
                // the run is tried once more here ("running already" is fine).
                for b in &lab.backends {
                    let _ = servers.start_backend(&lab, &b.name);
                }
                return Err(e);
            }
        };
        progress(&format!(
            "part 5: {}: {} errors, served again after {}, moved back: {}",
            c.name(),
            run.errors,
            run.served_again_ms
                .map_or("never".to_owned(), |ms| format!("{ms:.0} ms")),
            run.moved_back
                .map_or("– (never left)", |b| if b { "yes" } else { "no" })
        ));
        out.runs.push(run);
        Ok(())
    });

    // A contender that failed in a later round keeps no samples: rows must be comparable.
    out.runs
        .retain(|r| !failed.iter().any(|(c, _)| c.name() == r.contender));
    for (c, why) in &failed {
        out.skipped
            .push((format!("failover: {}", c.name()), why.clone()));
    }
    let rows: Vec<FailoverRow> = LINEUP
        .all
        .iter()
        .filter_map(|c| row(*c, &out.runs))
        .collect();
    if !rows.is_empty() {
        out.table = Some(FailoverTable {
            about: about(budget),
            backends: BACKENDS,
            rows,
            xlb_kernel_down_ms: kernel_down(&out.runs),
            xlb_kernel_down_bound_ms: kernel_down_bound_ms(),
        });
    }
    Ok(out)
}

/// One round of contender `c`: start it, probe, kill, restore, stop it.
fn measure(
    lab: &Lab,
    servers: &mut Servers,
    c: Contender,
    round: usize,
    budget: Budget,
) -> Result<FailoverRun> {
    let running = LINEUP.start(lab, c)?;
    let watch = match running.daemon() {
        Some(d) => Some(KernelWatch::new(lab, d)?),
        None => None,
    };
    let vip = IpAddr::V4(lab.vip4);
    wait_served(lab, vip)?;
    let pinned = IpAddr::V4(*lab.client_v4.first().context("the lab has no client")?);
    let clients = lab.client_addrs();
    let before = ask_all(lab, &clients);

    let log: Mutex<Vec<Probe>> = Mutex::new(Vec::with_capacity(budget.failover_probes));
    let down = Duration::from_millis(budget.failover_down_ms);
    let t0 = Instant::now();
    let control = thread::scope(|s| {
        let probes = &log;
        let dst = SocketAddr::new(vip, HTTP_PORT);
        s.spawn(move || {
            prober(
                s,
                lab.client.path(),
                pinned,
                dst,
                budget.failover_probes,
                t0,
                probes,
            )
        });
        // On an error the scope still waits for the prober, whose probes are bounded.
        kill_and_restore(
            lab,
            servers,
            probes,
            t0,
            down,
            &clients,
            &before,
            pinned,
            watch.as_ref(),
        )
    })?;
    let after = ask_all(lab, &clients);
    running.stop()?;

    let mut probe_log = log.into_inner().unwrap_or_else(|p| p.into_inner());
    probe_log.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    let summary = summarise(&probe_log, control.kill_ms, &control.killed);
    Ok(FailoverRun {
        contender: c.name().to_owned(),
        round,
        client: pinned.to_string(),
        during: compare(&before, &control.during, &control.killed),
        after_restore: compare(&before, &after, &control.killed),
        killed: control.killed,
        kill_ms: control.kill_ms,
        restore_ms: control.restore_ms,
        probes: probe_log.len(),
        errors: summary.errors,
        errors_before_kill: summary.errors_before_kill,
        served_again_ms: summary.served_again_ms,
        served_again_by: summary.served_again_by,
        moved_back: summary.moved_back,
        final_backend: summary.final_backend,
        backend_changes: summary.backend_changes,
        kernel_down_ms: control.kernel_down_ms,
        probe_log,
    })
}

/// Reads the killed backend's record of every service straight from xlb's pinned
/// backend map: when it is DOWN in the kernel, not when a CLI call notices.
pub(super) struct KernelWatch {
    maps: xlb::pins::PinnedMaps,
    /// (service, backend name, backend id) of every backend of every service.
    ids: Vec<(String, String, u32)>,
}

impl KernelWatch {
    pub(super) fn new(lab: &Lab, d: &Daemon) -> Result<Self> {
        let status = d.ctl(lab, &["status"])?;
        let pins = status["pins"].as_str().context("status without pins")?;
        let maps = xlb::pins::PinnedMaps::open(Path::new(pins))?;
        let list = d.ctl(lab, &["backend", "list"])?;
        let ids = list
            .as_array()
            .context("backend list is not an array")?
            .iter()
            .filter_map(|b| {
                Some((
                    b["service"].as_str()?.to_owned(),
                    b["name"].as_str()?.to_owned(),
                    u32::try_from(b["id"].as_u64()?).ok()?,
                ))
            })
            .collect();
        Ok(Self { maps, ids })
    }

    /// The dataplane id of backend `name` in `service`.
    pub(super) fn id(&self, service: &str, name: &str) -> Option<u32> {
        self.ids
            .iter()
            .find(|(s, n, _)| s == service && n == name)
            .map(|(_, _, id)| *id)
    }

    /// Records in `seen` each service whose `dead` backend is DOWN now.
    pub(super) fn poll(
        &self,
        dead: &str,
        kill_at: Instant,
        seen: &mut BTreeMap<String, Option<f64>>,
    ) {
        for (svc, name, id) in &self.ids {
            if name != dead || seen.get(svc).is_some_and(Option::is_some) {
                continue;
            }
            let down = self
                .maps
                .backends
                .get(id, 0)
                .is_ok_and(|b| b.state == lb_common::BACKEND_DOWN);
            seen.insert(svc.clone(), down.then(|| ms(kill_at.elapsed())));
        }
    }

    /// The first backend that is not ACTIVE in the kernel's backend map or not
    /// in its service's live Maglev table (`None`: every backend of every
    /// service serves): the state to wait for after a failure, drain or weight
    /// change is undone, before the next measurement starts.
    pub(super) fn not_live(&self) -> Result<Option<String>> {
        let mut tables: BTreeMap<u32, std::collections::BTreeSet<u32>> = BTreeMap::new();
        for entry in self.maps.services.iter() {
            let (key, record) = entry.context("reading the service map")?;
            // Port 0 is never a service (see lb_common::ServiceKey).
            if key.port != 0 {
                let table = crate::plant::live_table(&self.maps, &record)?;
                tables.insert(record.id, table.into_iter().collect());
            }
        }
        for (svc, name, id) in &self.ids {
            let b = self
                .maps
                .backends
                .get(id, 0)
                .with_context(|| format!("reading backend record {id}"))?;
            let in_table = tables
                .get(&u32::from(b.service_id))
                .is_some_and(|t| t.contains(id));
            if b.state != lb_common::BACKEND_ACTIVE || !in_table {
                return Ok(Some(format!(
                    "{svc}/{name} (id {id}): kernel state {}, in the live table: {in_table}",
                    b.state
                )));
            }
        }
        Ok(None)
    }

    pub(super) fn all_seen(seen: &BTreeMap<String, Option<f64>>) -> bool {
        !seen.is_empty() && seen.values().all(Option::is_some)
    }
}

/// What the control thread did and saw.
struct Control {
    killed: String,
    kill_ms: f64,
    restore_ms: f64,
    during: Vec<Option<String>>,
    kernel_down_ms: BTreeMap<String, Option<f64>>,
}

/// Kills the pinned client's backend after [`KILL_AFTER`], asks every client once the
/// client is served elsewhere (or shortly before the restore), restores it after `down`.
#[allow(clippy::too_many_arguments)]
fn kill_and_restore(
    lab: &Lab,
    servers: &mut Servers,
    probes: &Mutex<Vec<Probe>>,
    t0: Instant,
    down: Duration,
    clients: &[IpAddr],
    before: &[Option<String>],
    pinned: IpAddr,
    watch: Option<&KernelWatch>,
) -> Result<Control> {
    sleep_until(t0 + KILL_AFTER);
    let seen = lock(probes).clone();
    let dead = sticky_backend(&seen)
        .or_else(|| {
            let i = clients.iter().position(|c| *c == pinned)?;
            before.get(i)?.clone()
        })
        .context("the pinned client was never served before the kill")?;
    // The kill starts here: stopping the servers closes their sockets at once but returns
    // only when the server thread has wound down.
    let kill_at = Instant::now();
    let mut killed = Killed::kill(servers, lab, &dead)?;
    let kill_ms = ms(kill_at - t0);
    let restore_at = kill_at + down;
    // Failover done (or given up on): the prober got an answer from another backend.
    let ask_by = restore_at
        .checked_sub(ASK_BEFORE_RESTORE)
        .unwrap_or(kill_at);
    let mut kernel_down_ms = BTreeMap::new();
    while Instant::now() < ask_by {
        let moved = lock(probes)
            .iter()
            .any(|p| p.at_ms >= kill_ms && p.backend.as_deref().is_some_and(|b| b != dead));
        let watched = match watch {
            Some(w) => {
                w.poll(&dead, kill_at, &mut kernel_down_ms);
                KernelWatch::all_seen(&kernel_down_ms)
            }
            None => true,
        };
        if moved && watched {
            break;
        }
        // Fine-grained while the kernel is watched, so the figure is not the poll's.
        thread::sleep(if watched {
            POLL
        } else {
            Duration::from_millis(2)
        });
    }
    let during = ask_all(lab, clients);
    sleep_until(restore_at);
    killed.restore()?;
    Ok(Control {
        killed: dead,
        kill_ms,
        restore_ms: ms(t0.elapsed()),
        during,
        kernel_down_ms,
    })
}

/// Starts `count` probes, one every [`PROBE_EVERY`] from `t0`, each on its own thread in the
/// namespace at `ns`, so a slow probe never delays the next; results go to `probes`.
fn prober<'s>(
    s: &'s thread::Scope<'s, '_>,
    ns: &'s Path,
    src: IpAddr,
    dst: SocketAddr,
    count: usize,
    t0: Instant,
    probes: &'s Mutex<Vec<Probe>>,
) {
    for i in 0..count {
        sleep_until(t0 + PROBE_EVERY * i as u32);
        let spawned = thread::Builder::new()
            .name(format!("probe-{i}"))
            .stack_size(128 * 1024)
            .spawn_scoped(s, move || {
                let result = netns::enter(ns);
                let at_ms = ms(t0.elapsed());
                let result = result.and_then(|()| client::http_get_within(src, dst, PROBE_TIMEOUT));
                lock(probes).push(probe(at_ms, result));
            });
        if let Err(e) = spawned {
            lock(probes).push(probe(
                ms(t0.elapsed()),
                Err(anyhow::Error::new(e).context("spawning a probe thread")),
            ));
        }
    }
}

/// A probe record from a GET's result.
fn probe(at_ms: f64, result: Result<String>) -> Probe {
    match result {
        Ok(body) => Probe {
            at_ms,
            backend: Some(body),
            error: None,
        },
        Err(e) => Probe {
            at_ms,
            backend: None,
            error: Some(e.root_cause().to_string()),
        },
    }
}

/// The backend that answered most of `probes` (the one the client sticks to).
fn sticky_backend(probes: &[Probe]) -> Option<String> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for b in probes.iter().filter_map(|p| p.backend.as_deref()) {
        match counts.iter_mut().find(|(n, _)| *n == b) {
            Some((_, k)) => *k += 1,
            None => counts.push((b, 1)),
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, k)| *k)
        .map(|(b, _)| b.to_owned())
}

/// Which backend answers each of `clients` (`None`: no answer), one request each.
fn ask_all(lab: &Lab, clients: &[IpAddr]) -> Vec<Option<String>> {
    clients
        .iter()
        .map(|c| who_serves(lab, *c, Proto::Tcp).ok())
        .collect()
}

/// What the probes say about one run.
#[derive(Debug, PartialEq)]
struct Summary {
    errors: usize,
    errors_before_kill: usize,
    served_again_ms: Option<f64>,
    served_again_by: Option<String>,
    moved_back: Option<bool>,
    final_backend: Option<String>,
    backend_changes: usize,
}

/// Reads one run's probes (sorted by start time): the kill was at `kill_ms`, of `dead`.
fn summarise(probes: &[Probe], kill_ms: f64, dead: &str) -> Summary {
    let errors = probes.iter().filter(|p| p.backend.is_none()).count();
    let errors_before_kill = probes
        .iter()
        .filter(|p| p.backend.is_none() && p.at_ms < kill_ms)
        .count();
    // Only probes started after the kill: one in flight at the kill may still have been
    // answered by the dead backend.
    let again = probes
        .iter()
        .find(|p| p.at_ms >= kill_ms && p.backend.is_some());
    let served_again_by = again.and_then(|p| p.backend.clone());
    let final_backend = probes.iter().rev().find_map(|p| p.backend.clone());
    // Served first by another backend: did it end on the restored one?
    let moved_back = match &served_again_by {
        Some(b) if b != dead => Some(final_backend.as_deref() == Some(dead)),
        _ => None,
    };
    let answered: Vec<&str> = probes.iter().filter_map(|p| p.backend.as_deref()).collect();
    let backend_changes = answered.windows(2).filter(|w| w[0] != w[1]).count();
    Summary {
        backend_changes,
        errors,
        errors_before_kill,
        served_again_ms: again.map(|p| p.at_ms - kill_ms),
        served_again_by,
        moved_back,
        final_backend,
    }
}

/// Compares two asks of the same clients; `dead` is the killed backend.
fn compare(first: &[Option<String>], second: &[Option<String>], dead: &str) -> ClientShift {
    let mut s = ClientShift::default();
    for (a, b) in first.iter().zip(second) {
        let Some(a) = a else { continue };
        s.clients += 1;
        if a == dead {
            s.on_dead += 1;
        }
        match b {
            None => s.unserved += 1,
            Some(b) if b != a => {
                s.moved += 1;
                if a != dead {
                    s.moved_from_healthy += 1;
                }
            }
            Some(_) => {}
        }
    }
    s
}

/// The table row of contender `c`, if it has runs.
fn row(c: Contender, runs: &[FailoverRun]) -> Option<FailoverRow> {
    let rs: Vec<&FailoverRun> = runs.iter().filter(|r| r.contender == c.name()).collect();
    if rs.is_empty() {
        return None;
    }
    let pct = |n: usize, of: usize| 100.0 * n as f64 / of.max(1) as f64;
    let series = |unit: &str, f: &dyn Fn(&FailoverRun) -> f64| {
        Series::new(c.name(), unit, rs.iter().map(|r| f(r)).collect())
    };
    let failed_over: Vec<&&FailoverRun> = rs.iter().filter(|r| r.moved_back.is_some()).collect();
    Some(FailoverRow {
        contender: c.name().to_owned(),
        health_checks: LINEUP.health_checks(c),
        rounds: rs.len(),
        errors: series("probes", &|r| r.errors as f64),
        served_again_ms: Series::new(
            c.name(),
            "ms",
            rs.iter().filter_map(|r| r.served_again_ms).collect(),
        ),
        failed_over: failed_over.len(),
        moved_back: failed_over
            .iter()
            .filter(|r| r.moved_back == Some(true))
            .count(),
        backend_changes: series("changes", &|r| r.backend_changes as f64),
        moved_during_pct: series("%", &|r| pct(r.during.moved, r.during.clients)),
        dead_share_pct: series("%", &|r| pct(r.during.on_dead, r.during.clients)),
        moved_from_healthy: rs.iter().map(|r| r.during.moved_from_healthy).sum(),
        unserved_during_pct: series("%", &|r| pct(r.during.unserved, r.during.clients)),
        moved_after_pct: series("%", &|r| {
            pct(r.after_restore.moved, r.after_restore.clients)
        }),
    })
}

/// fall × interval + 100 ms of the daemon's checks: how soon a dead backend must be
/// DOWN in the kernel, in every service.
pub fn kernel_down_bound_ms() -> f64 {
    let h = HealthOptions::default();
    let interval = humantime_ms(h.interval);
    f64::from(h.fall) * interval + 100.0
}

/// "500ms" / "2s" -> ms (the lab's check intervals are written that way).
fn humantime_ms(text: &str) -> f64 {
    if let Some(ms) = text.strip_suffix("ms") {
        ms.parse().unwrap_or(f64::NAN)
    } else if let Some(s) = text.strip_suffix('s') {
        s.parse::<f64>().map_or(f64::NAN, |s| s * 1000.0)
    } else {
        f64::NAN
    }
}

/// Per service, xlb's kill-to-kernel-DOWN times over the rounds.
fn kernel_down(runs: &[FailoverRun]) -> BTreeMap<String, Series> {
    let mut per: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in runs
        .iter()
        .filter(|r| r.contender == Contender::XlbDaemon.name())
    {
        for (svc, t) in &r.kernel_down_ms {
            per.entry(svc.clone())
                .or_default()
                .push(t.unwrap_or(f64::INFINITY));
        }
    }
    per.into_iter()
        .map(|(svc, v)| {
            let s = Series::new(Contender::XlbDaemon.name(), "ms", v);
            (svc, s)
        })
        .collect()
}

/// The paragraph under the table.
fn about(budget: Budget) -> String {
    let h = HealthOptions::default();
    format!(
        "One client address ({CLIENT_ADDRS} in the lab, {BACKENDS} backends) probes the IPv4 VIP every \
         {every} ms, {n} probes, each a new TCP connection with an HTTP GET that fails after {timeout} ms. \
         After {kill} ms of probing (between two probes) the servers of the backend that client sticks to are stopped (sockets \
         closed: new connections to it are refused), and {down} ms later started again; {rounds} round(s), \
         contenders interleaved, each started before and stopped after its round. Errors: failed probes. \
         Served again: from the kill to the first probe started after it that was answered (by another \
         backend, or — where nothing fails over — by the restored one, only after the restore). Moved back: \
         in how many of the rounds where the client failed over it was on the restored backend again at the \
         end, {after} ms after the restore (xlb keeps sessions where they are: moving back breaks them a \
         second time). Backend changes: how often the answering backend changed from one answered probe \
         to the next (1: failed over once and stayed; more: the client bounced). All {CLIENT_ADDRS} clients are asked which backend serves them before the kill, once \
         during the failure (when the prober is served elsewhere, at the latest {ask} ms before the restore) \
         and once after the probing: `moved during` is the share that changed backend during the failure \
         (ideal: only the dead backend's clients, ≤ 1/N + 1% = {ideal:.1}% on average; `dead held` is that \
         backend's actual share of these clients), `from healthy` counts clients that moved though their \
         backend was up (ideal 0), `unserved` the share that got no answer during the failure, and `moved \
         after restore` the share on another backend than before once the backend is back. xlb: `xlb daemon` \
         with HTTP health checks every {interval}, timeout {htimeout}, fall {fall}, rise {rise}, native XDP. \
         nftables: the DNAT `jhash` rule of part 4; it has no health checks, so the dead backend's clients \
         fail until it returns. HAProxy: part 4's config with `{HAPROXY_CHECK}` (TCP connect checks; no \
         `option redispatch`, HAProxy's default, so a connection already sent to the dead server is retried \
         there). nginx: part 4's config; open-source nginx has passive checks only (`max_fails=1 \
         fail_timeout=2s`), and by default (`proxy_next_upstream on`) retries a refused connection on the \
         next server of the hash ring.",
        every = PROBE_EVERY.as_millis(),
        n = budget.failover_probes,
        timeout = PROBE_TIMEOUT.as_millis(),
        kill = KILL_AFTER.as_millis(),
        down = budget.failover_down_ms,
        rounds = budget.failover_rounds,
        after = (PROBE_EVERY * budget.failover_probes as u32)
            .saturating_sub(KILL_AFTER + Duration::from_millis(budget.failover_down_ms))
            .as_millis(),
        ask = ASK_BEFORE_RESTORE.as_millis(),
        ideal = 100.0 / BACKENDS as f64 + 1.0,
        interval = h.interval,
        htimeout = h.timeout,
        fall = h.fall,
        rise = h.rise,
    )
}

/// A backend whose servers are stopped; started again on [`Killed::restore`] or on drop.
pub(super) struct Killed<'s, 'l> {
    servers: &'s mut Servers,
    lab: &'l Lab,
    name: String,
    down: bool,
}

impl<'s, 'l> Killed<'s, 'l> {
    pub(super) fn kill(servers: &'s mut Servers, lab: &'l Lab, name: &str) -> Result<Self> {
        servers
            .stop_backend(name)
            .with_context(|| format!("stopping the servers of {name}"))?;
        Ok(Self {
            servers,
            lab,
            name: name.to_owned(),
            down: true,
        })
    }

    pub(super) fn restore(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.down) {
            return Ok(());
        }
        self.servers
            .start_backend(self.lab, &self.name)
            .with_context(|| format!("starting the servers of {} again", self.name))
    }
}

impl Drop for Killed<'_, '_> {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("bench: {e:#}");
        }
    }
}

/// Locks a mutex, ignoring poisoning (a panicked probe thread leaves a usable Vec).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sleeps until `t` (returns at once if it has passed).
fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// A duration in (fractional) milliseconds.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(at_ms: f64, backend: Option<&str>) -> Probe {
        Probe {
            at_ms,
            backend: backend.map(str::to_owned),
            error: backend.is_none().then(|| "refused".to_owned()),
        }
    }

    #[test]
    fn summarises_a_failover_that_stays() {
        let probes = vec![
            p(0.0, Some("b2")),
            p(50.0, Some("b2")),
            p(100.0, None),
            p(150.0, None),
            p(200.0, Some("b3")),
            p(250.0, Some("b3")),
        ];
        assert_eq!(sticky_backend(&probes[..2]).as_deref(), Some("b2"));
        let s = summarise(&probes, 90.0, "b2");
        assert_eq!(s.errors, 2);
        assert_eq!(s.errors_before_kill, 0);
        assert_eq!(s.served_again_ms, Some(110.0));
        assert_eq!(s.served_again_by.as_deref(), Some("b3"));
        assert_eq!(s.moved_back, Some(false));
        assert_eq!(s.backend_changes, 1);
    }

    #[test]
    fn summarises_no_failover_and_moving_back() {
        // Nothing fails over: served again only by the restored backend.
        let probes = vec![p(0.0, Some("b1")), p(50.0, None), p(100.0, Some("b1"))];
        let s = summarise(&probes, 40.0, "b1");
        assert_eq!(s.served_again_by.as_deref(), Some("b1"));
        assert_eq!(s.moved_back, None);
        // Fails over, then returns.
        let probes = vec![
            p(0.0, Some("b1")),
            p(50.0, Some("b2")),
            p(100.0, Some("b1")),
        ];
        let s = summarise(&probes, 40.0, "b1");
        assert_eq!((s.moved_back, s.backend_changes), (Some(true), 2));
        // Never served again.
        let probes = vec![p(0.0, Some("b1")), p(50.0, None)];
        let s = summarise(&probes, 40.0, "b1");
        assert_eq!((s.served_again_ms, s.moved_back), (None, None));
    }

    #[test]
    fn rows_render_as_a_table() {
        let run = |round, moved_back| FailoverRun {
            contender: Contender::XlbDaemon.name().to_owned(),
            round,
            client: "10.77.0.100".into(),
            killed: "b2".into(),
            kill_ms: 1025.0,
            restore_ms: 3775.0,
            probes: 120,
            errors: 20 + round,
            errors_before_kill: 0,
            served_again_ms: Some(1000.0 + 10.0 * round as f64),
            served_again_by: Some("b3".into()),
            moved_back: Some(moved_back),
            final_backend: Some("b3".into()),
            backend_changes: 1,
            during: ClientShift {
                clients: 32,
                on_dead: 8,
                moved: 8,
                moved_from_healthy: 0,
                unserved: 0,
            },
            after_restore: ClientShift::default(),
            kernel_down_ms: BTreeMap::new(),
            probe_log: Vec::new(),
        };
        let runs = vec![run(0, false), run(1, false), run(2, true)];
        let r = row(Contender::XlbDaemon, &runs).expect("a row");
        assert_eq!((r.rounds, r.failed_over, r.moved_back), (3, 3, 1));
        assert_eq!(r.errors.median, 21.0);
        assert_eq!(r.moved_during_pct.median, 25.0);
        assert!(row(Contender::Nft, &runs).is_none());
        let report = crate::bench::Report {
            failover: Some(FailoverTable {
                about: about(Budget::QUICK),
                backends: BACKENDS,
                rows: vec![r],
                xlb_kernel_down_ms: BTreeMap::from([(
                    "http-v4".to_string(),
                    Series::new("xlb", "ms", vec![1200.0, 1300.0]),
                )]),
                xlb_kernel_down_bound_ms: 1600.0,
            }),
            ..Default::default()
        };
        let md = crate::bench::report::markdown(&report);
        assert!(md.contains("### Failover under load"), "{md}");
        assert!(md.contains("| xlb daemon (native XDP) |"), "{md}");
        assert!(md.contains("| http-v4 | 1250 (1200–1300) | 1600 |"), "{md}");
        assert!(
            md.contains("| 21 (20–22) | 1010 (1000–1020) | in 1/3 rounds |"),
            "{md}"
        );
    }

    #[test]
    fn compares_client_asks() {
        let s = |v: &[Option<&str>]| -> Vec<Option<String>> {
            v.iter().map(|b| b.map(str::to_owned)).collect()
        };
        let before = s(&[Some("b1"), Some("b2"), Some("b2"), Some("b3"), None]);
        let during = s(&[Some("b1"), Some("b3"), None, Some("b1"), Some("b1")]);
        let shift = compare(&before, &during, "b2");
        assert_eq!(
            shift,
            ClientShift {
                clients: 4,
                on_dead: 2,
                moved: 2,
                moved_from_healthy: 1,
                unserved: 1,
            }
        );
    }
}
