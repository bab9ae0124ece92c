//! Part 7: replication volume of the cluster. Three `[cluster]` nodes (the cluster lab:
//! BIRD router, three nodes, five backends of which three are configured); 100 000
//! sessions are written into node 1's affinity map through its pins, each on its
//! client's current Maglev answer of the IPv4 HTTP service, clients that never send a
//! packet. Then be4 is added to that service through node 1's CLI; it joins DOWN (one
//! round), its checks pass, and a second round makes it take clients: the sessions that
//! round makes divergent (about a quarter) go from every node to every peer before any
//! node swaps. Measured: time from the CLI call until be4 is active on every node at one
//! version with no round open, the divergent sessions per node (daemon log), entries and
//! bytes sent and received per node (deltas of `cluster status`), the up-round's duration
//! (log timestamps), peak daemon RSS, and what the next periodic refresh re-sends. A
//! second run loads 100 000 sessions on nodes 2 and 3 as well and adds be5.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use xlb::pins::PinnedMaps;

use super::{Budget, progress};
use crate::{
    cluster_lab::{ClusterLab, ClusterOptions, VIP4, backend_v4},
    servers::HTTP_PORT,
};

/// The lab tag of this part (namespaces `xlb-bcl-*`).
const TAG: &str = "bcl";
/// The service the sessions belong to and the backends are added to.
const SERVICE: &str = "http-v4";
/// Affinity (and protected) map capacity of every node.
const AFFINITY_ENTRIES: u32 = 262_144;
/// Nodes in the lab.
const NODES: usize = 3;
/// Longest wait for the cluster to agree (start, and after an add).
const AGREE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the cluster's state is polled while waiting.
const POLL: Duration = Duration::from_millis(50);
/// How long after a run the periodic refresh is watched: one `REFRESH_EVERY` and a margin.
const REFRESH_WATCH: Duration = Duration::from_millis(11_500);
/// Client addresses of node i start at 10.200.0.0 + (i-1) × 2^17 (room for 131072).
const CLIENT_BASE: u32 = 0x0ac8_0000;

/// Replication counters of one node over one measured span (deltas of `cluster status`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeDelta {
    /// 1-based node index.
    pub node: usize,
    /// Sessions this node loaded before the run (0: none).
    pub loaded: u64,
    /// Sessions it found divergent in the up-round (its daemon log); `None` outside a round.
    pub divergent: Option<u64>,
    /// Session entries sent (each peer counted).
    pub sessions_sent: u64,
    /// Session entries received.
    pub sessions_received: u64,
    /// Received entries written into its protected map.
    pub sessions_imported: u64,
    /// Replication bytes sent (all frames, Hellos included).
    pub bytes_sent: u64,
    /// Replication bytes received.
    pub bytes_received: u64,
    /// Daemon peak RSS (`VmHWM`) after the span, KiB.
    pub vmhwm_kib: Option<u64>,
    /// Sessions in its maps after the span (affinity + protected).
    pub sessions_after: u64,
}

/// The up-round as the daemons logged it.
#[derive(Clone, Debug, Serialize)]
pub struct RoundLog {
    /// Its version ("counter.node").
    pub version: String,
    /// From the first node's "preparing"/"prepared" line to the last node's "is live", ms.
    pub duration_ms: f64,
}

/// One measured backend add.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterRun {
    /// What was loaded and added.
    pub name: String,
    /// Sessions per loaded node.
    pub sessions_per_node: u64,
    /// How long `xlb backend add` took to return (the DOWN join live).
    pub cli_ms: f64,
    /// From the CLI call until the backend is active on every node, versions equal, no round.
    pub live_everywhere_ms: f64,
    /// Rounds node 1 made live during the run.
    pub rounds: u64,
    /// The round that moved sessions (most divergent), if found in the logs.
    pub up_round: Option<RoundLog>,
    /// Per node, over the run.
    pub nodes: Vec<NodeDelta>,
    /// Per node, over the [`REFRESH_WATCH`] after it (the periodic refresh).
    pub refresh: Vec<NodeDelta>,
}

/// The cluster part's result.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterTable {
    /// What was measured, one paragraph.
    pub about: String,
    /// The runs, in order.
    pub runs: Vec<ClusterRun>,
    /// Per node, over one more [`REFRESH_WATCH`] after the last run's, nothing changing.
    pub idle: Vec<NodeDelta>,
}

/// Part 7: replication volume and time of a backend add with many sessions.
pub fn part_cluster(budget: Budget) -> Result<ClusterTable> {
    let n = budget.cluster_sessions;
    let lab = ClusterLab::new(
        TAG,
        ClusterOptions {
            backends: 5,
            configured: Some(3),
            cluster: true,
            clients_v4: 1,
            clients_v6: 1,
            edit: Some(std::sync::Arc::new(|_, text: String| {
                format!("affinity_max_entries = {AFFINITY_ENTRIES}\n{text}")
            })),
            ..ClusterOptions::default()
        },
    )?;
    wait_agreed(&lab, None)?;
    let mut runs = Vec::new();
    for (added, b, loaders) in [("be4", 4, &[1][..]), ("be5", 5, &[2, 3][..])] {
        for &i in loaders {
            load_sessions(&lab, i, n)?;
        }
        let name = if loaders.len() == 1 {
            format!("{added} added; {n} sessions on lb1")
        } else {
            format!("{added} added; {n} sessions on each of lb1..lb{NODES}")
        };
        progress(&format!("cluster: {name}"));
        let loaded: Vec<u64> = (1..=NODES)
            .map(|i| {
                let on = i == 1 || loaders.contains(&i);
                if on { u64::from(n) } else { 0 }
            })
            .collect();
        runs.push(measure_add(&lab, &name, added, b, &loaded, n)?);
    }
    // Nothing changes from here on and no client sends: whatever the nodes send now is
    // background traffic.
    progress("cluster: watching an idle cluster for one more refresh");
    let before = (1..=NODES)
        .map(|i| status(&lab, i))
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(REFRESH_WATCH);
    let after = (1..=NODES)
        .map(|i| status(&lab, i))
        .collect::<Result<Vec<_>>>()?;
    let idle = deltas(&lab, &before, &after)?;
    Ok(ClusterTable {
        about: about(n),
        runs,
        idle,
    })
}

/// `xlb cluster status --json` of node `i`.
fn status(lab: &ClusterLab, i: usize) -> Result<serde_json::Value> {
    lab.node_cli(i, &["cluster", "status"])
}

/// State of backend `name` of [`SERVICE`] on node `i` ("absent" if it has none).
fn backend_state(lab: &ClusterLab, i: usize, name: &str) -> Result<String> {
    let list = lab.node_cli(i, &["backend", "list", SERVICE])?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["name"] == name)
        .and_then(|b| b["state"].as_str())
        .unwrap_or("absent")
        .to_string())
}

/// Polls until every node is synced at one version with no round open (and, with
/// `active`, has that backend active); returns the statuses.
fn wait_agreed(lab: &ClusterLab, active: Option<&str>) -> Result<Vec<serde_json::Value>> {
    let start = Instant::now();
    let mut last = Vec::new();
    while start.elapsed() < AGREE_TIMEOUT {
        let mut ok = true;
        if let Some(name) = active {
            for i in 1..=NODES {
                if backend_state(lab, i, name)? != "active" {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            last = (1..=NODES)
                .map(|i| status(lab, i))
                .collect::<Result<Vec<_>>>()?;
            let agreed = last.iter().all(|s| {
                s["synced"] == true
                    && s["version"] != "0.0"
                    && s["round"].is_null()
                    && s["version"] == last[0]["version"]
            });
            if agreed {
                return Ok(last);
            }
        }
        std::thread::sleep(POLL);
    }
    bail!(
        "the cluster did not agree{} within {AGREE_TIMEOUT:?}: {last:#?}",
        active
            .map(|b| format!(" with {b} active"))
            .unwrap_or_default()
    )
}

/// Writes `n` sessions into node `i`'s affinity map, each on its client's current Maglev
/// answer (so none is divergent before the add), stamped now; checks the daemon counts them.
fn load_sessions(lab: &ClusterLab, i: usize, n: u32) -> Result<()> {
    let st = lab.node_cli(i, &["status"])?;
    let before = st["sessions"].as_u64().unwrap_or(0);
    // The daemon pins below its `pin_dir`; its status names the directory.
    let pins = st["pins"].as_str().context("status without pins")?;
    let maps = PinnedMaps::open(std::path::Path::new(pins))?;
    let record = crate::plant::tcp_service(&maps, IpAddr::V4(VIP4), HTTP_PORT)?;
    let first = Ipv4Addr::from(CLIENT_BASE + ((i as u32 - 1) << 17));
    let (keys, values) = crate::plant::maglev_sessions(&maps, &record, first, n)?;
    crate::plant::sessions(&maps.affinity, &keys, &values, |_| {})
        .with_context(|| format!("writing sessions into lb{i}'s affinity map"))?;
    let after = lab.node_cli(i, &["status"])?["sessions"]
        .as_u64()
        .unwrap_or(0);
    if after < before + u64::from(n) {
        bail!(
            "lb{i} counts {after} sessions after {n} were written to its {before}: the LRU evicted"
        );
    }
    Ok(())
}

/// The counters of [`NodeDelta`] from one status.
fn counters(s: &serde_json::Value) -> [u64; 5] {
    [
        "sessions_sent",
        "sessions_received",
        "sessions_imported",
        "bytes_sent",
        "bytes_received",
    ]
    .map(|k| s[k].as_u64().unwrap_or(0))
}

/// Per-node deltas between two status lists.
fn deltas(
    lab: &ClusterLab,
    before: &[serde_json::Value],
    after: &[serde_json::Value],
) -> Result<Vec<NodeDelta>> {
    let mut out = Vec::new();
    for (k, (b, a)) in before.iter().zip(after).enumerate() {
        let i = k + 1;
        let (b, a) = (counters(b), counters(a));
        let d = |j: usize| a[j].saturating_sub(b[j]);
        let st = lab.node_cli(i, &["status"])?;
        out.push(NodeDelta {
            node: i,
            loaded: 0,
            divergent: None,
            sessions_sent: d(0),
            sessions_received: d(1),
            sessions_imported: d(2),
            bytes_sent: d(3),
            bytes_received: d(4),
            vmhwm_kib: lab.node(i)?.daemon_pid().and_then(vmhwm_kib),
            sessions_after: st["sessions"].as_u64().unwrap_or(0)
                + st["protected_sessions"].as_u64().unwrap_or(0),
        });
    }
    Ok(out)
}

/// Adds backend `added` (be`b`) to [`SERVICE`] through node 1 and measures the run.
fn measure_add(
    lab: &ClusterLab,
    name: &str,
    added: &str,
    b: usize,
    loaded: &[u64],
    n: u32,
) -> Result<ClusterRun> {
    let before = wait_agreed(lab, None)?;
    let t = Instant::now();
    lab.add_backend(1, SERVICE, added, IpAddr::V4(backend_v4(b)))?;
    let cli_ms = ms(t.elapsed());
    let after = wait_agreed(lab, Some(added))?;
    let live_everywhere_ms = ms(t.elapsed());
    let rounds = after[0]["rounds"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(before[0]["rounds"].as_u64().unwrap_or(0));
    let mut nodes = deltas(lab, &before, &after)?;
    let logs: Vec<String> = (1..=NODES)
        .map(|i| lab.node(i).map(|n| n.daemon_log()))
        .collect::<Result<_>>()?;
    let from = before[0]["version"].as_str().unwrap_or("").to_string();
    let to = after[0]["version"].as_str().unwrap_or("").to_string();
    let rounds_logged = rounds_in_logs(&logs, &from, &to);
    // The up-round: the one whose nodes found the most divergent sessions.
    let up = rounds_logged
        .iter()
        .max_by_key(|r| r.divergent.iter().flatten().sum::<u64>());
    for (k, d) in nodes.iter_mut().enumerate() {
        d.loaded = loaded.get(k).copied().unwrap_or(0);
        d.divergent = up.and_then(|r| r.divergent.get(k).copied().flatten());
    }
    let up_round = up.and_then(|r| {
        Some(RoundLog {
            version: r.version.clone(),
            duration_ms: (r.end? - r.start?) * 1000.0,
        })
    });
    progress(&format!(
        "cluster: {added} live everywhere {live_everywhere_ms:.0} ms after the CLI call; watching the refresh"
    ));
    std::thread::sleep(REFRESH_WATCH);
    let later = (1..=NODES)
        .map(|i| status(lab, i))
        .collect::<Result<Vec<_>>>()?;
    let refresh = deltas(lab, &after, &later)?;
    Ok(ClusterRun {
        name: name.to_owned(),
        sessions_per_node: u64::from(n),
        cli_ms,
        live_everywhere_ms,
        rounds,
        up_round,
        nodes,
        refresh,
    })
}

/// One round as read from every node's log.
#[derive(Debug, PartialEq)]
struct LoggedRound {
    version: String,
    /// Per node: the sessions it sent as divergent.
    divergent: Vec<Option<u64>>,
    /// Earliest "preparing"/"prepared" line, seconds since the epoch.
    start: Option<f64>,
    /// Latest "is live" line.
    end: Option<f64>,
}

/// The rounds after version `from` up to `to` in the daemons' logs.
fn rounds_in_logs(logs: &[String], from: &str, to: &str) -> Vec<LoggedRound> {
    let counter = |v: &str| {
        v.split('.')
            .next()
            .and_then(|c| c.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (lo, hi) = (counter(from), counter(to));
    let mut by: BTreeMap<(u64, String), LoggedRound> = BTreeMap::new();
    for (k, log) in logs.iter().enumerate() {
        for line in log.lines() {
            let Some((version, what)) = round_line(line) else {
                continue;
            };
            let c = counter(&version);
            if c <= lo || c > hi {
                continue;
            }
            let r = by
                .entry((c, version.clone()))
                .or_insert_with(|| LoggedRound {
                    version: version.clone(),
                    divergent: vec![None; logs.len()],
                    start: None,
                    end: None,
                });
            let at = line.split_whitespace().next().and_then(timestamp);
            match what {
                Line::Preparing => r.start = min_opt(r.start, at),
                Line::Prepared(n) => {
                    r.start = min_opt(r.start, at);
                    r.divergent[k] = Some(n);
                }
                Line::Live => r.end = max_opt(r.end, at),
            }
        }
    }
    by.into_values().collect()
}

#[derive(Debug, PartialEq)]
enum Line {
    Preparing,
    Prepared(u64),
    Live,
}

/// The version and kind of a daemon log line about a round.
fn round_line(line: &str) -> Option<(String, Line)> {
    if let Some(rest) = line.split("cluster: prepared version ").nth(1) {
        let (version, rest) = rest.split_once(':')?;
        let n = rest.split("sent the ").nth(1)?.split_whitespace().next()?;
        return Some((version.to_string(), Line::Prepared(n.parse().ok()?)));
    }
    if let Some(rest) = line.split("cluster: version ").nth(1) {
        let version = rest
            .strip_suffix(" is live on this node")
            .or_else(|| rest.split_once(" is live on this node").map(|(v, _)| v))?;
        return Some((version.to_string(), Line::Live));
    }
    let rest = line.split(" — preparing version ").nth(1)?;
    let version = rest.split_whitespace().next()?;
    Some((version.to_string(), Line::Preparing))
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Seconds since the epoch of tracing's RFC 3339 UTC timestamp
/// (`2026-11-30T10:11:12.123456Z`).
fn timestamp(text: &str) -> Option<f64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, s) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// Peak resident set of process `pid`, KiB.
fn vmhwm_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The paragraph above the tables.
fn about(n: u32) -> String {
    format!(
        "Three `xlb daemon` nodes with `[cluster]` (the cluster lab: BIRD router, native XDP, \
         `affinity_max_entries = {AFFINITY_ENTRIES}`), identical configs: IPv4 and IPv6 HTTP and \
         UDP services over be1..be3 with health checks (every 500ms, rise 2). {n} sessions are \
         written into a node's affinity map through its pins, one per client address \
         (10.200.0.0/15 for lb1, the next /15s for lb2, lb3), each on its client's current \
         Maglev answer of `{SERVICE}` and stamped now; the clients never send a packet. Then a \
         spare backend that passes its check is added to `{SERVICE}` with `xlb backend add` \
         through lb1: it joins DOWN (a round without table change), its checks pass, and a \
         second round makes it take clients; in that round every node sends the sessions the \
         new table makes divergent to every peer before any node swaps. `live everywhere`: \
         from the CLI call until the backend is active on every node, all at one version with \
         no round open (polled every {poll} ms), health-check rise included. `round`: the \
         up-round from the first node's prepare to the last node's swap (daemon log \
         timestamps). Per node: `divergent` (its log), entries and bytes sent and received \
         (deltas of `xlb cluster status`; bytes are all replication frames, one Hello per peer \
         and second included), peak daemon RSS (`VmHWM`). `refresh`: what the nodes sent in \
         the {watch:.1} s after the run (one periodic refresh of protected sessions).",
        poll = POLL.as_millis(),
        watch = REFRESH_WATCH.as_secs_f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_runs_with_the_rounds_own_volume() {
        let node = |i, divergent, sent| NodeDelta {
            node: i,
            loaded: if i == 1 { 100_000 } else { 0 },
            divergent: Some(divergent),
            sessions_sent: sent,
            bytes_sent: sent * 58,
            ..NodeDelta::default()
        };
        let run = ClusterRun {
            name: "be4 added".into(),
            sessions_per_node: 100_000,
            cli_ms: 50.0,
            live_everywhere_ms: 1600.0,
            rounds: 2,
            up_round: Some(RoundLog {
                version: "2.1".into(),
                duration_ms: 500.0,
            }),
            nodes: vec![node(1, 25_000, 50_000), node(2, 0, 0), node(3, 0, 0)],
            refresh: vec![NodeDelta::default(); 3],
        };
        let report = crate::bench::Report {
            cluster: Some(ClusterTable {
                about: about(100_000),
                runs: vec![run],
                idle: vec![node(1, 0, 7)],
            }),
            ..Default::default()
        };
        let md = crate::bench::report::markdown(&report);
        assert!(
            md.contains("### Cluster: replication of a backend add"),
            "{md}"
        );
        assert!(
            md.contains("Divergent: 25,000 of 100,000 sessions (25.0%)"),
            "{md}"
        );
        assert!(
            md.contains(
                "its 50,000 entries (divergent × 2 peers) make 100,000 entries/s, 5.8 MB/s"
            ),
            "{md}"
        );
        assert!(md.contains("| lb1 | 100,000 | 25,000 | 50,000 |"), "{md}");
        assert!(
            md.contains("one more refresh period: lb1 7 entries (406 bytes)"),
            "{md}"
        );
    }

    #[test]
    fn reads_rfc3339_timestamps() {
        assert_eq!(timestamp("1970-01-01T00:00:00.000000Z"), Some(0.0));
        let a = timestamp("2026-11-30T23:59:59.500000Z").expect("ts");
        let b = timestamp("2026-12-01T00:00:00.250000Z").expect("ts");
        assert!((b - a - 0.75).abs() < 1e-6, "{}", b - a);
        assert_eq!(timestamp("garbage"), None);
    }

    #[test]
    fn finds_the_rounds_between_two_versions() {
        let lb1 = "\
2026-11-30T10:00:00.000000Z  INFO xlb::daemon::clustering: cluster: backend add — preparing version 3.1 version=3.1
2026-11-30T10:00:00.010000Z  INFO xlb::daemon::clustering: cluster: prepared version 3.1: sent the 0 sessions it makes divergent to every peer version=3.1 divergent=0
2026-11-30T10:00:00.020000Z  INFO xlb::daemon::clustering: cluster: version 3.1 is live on this node version=3.1
2026-11-30T10:00:01.000000Z  INFO xlb::daemon::clustering: cluster: be4 up — preparing version 4.1 version=4.1
2026-11-30T10:00:01.200000Z  INFO xlb::daemon::clustering: cluster: prepared version 4.1: sent the 25000 sessions it makes divergent to every peer version=4.1 divergent=25000
2026-11-30T10:00:01.900000Z  INFO xlb::daemon::clustering: cluster: version 4.1 is live on this node version=4.1
"
        .to_string();
        let lb2 = "\
2026-11-30T10:00:01.100000Z  INFO xlb::daemon::clustering: cluster: prepared version 4.1: sent the 3 sessions it makes divergent to every peer version=4.1 divergent=3
2026-11-30T10:00:02.000000Z  INFO xlb::daemon::clustering: cluster: version 4.1 is live on this node version=4.1
"
        .to_string();
        let rounds = rounds_in_logs(&[lb1, lb2], "2.1", "4.1");
        assert_eq!(rounds.len(), 2);
        assert_eq!(rounds[0].divergent, vec![Some(0), None]);
        let up = &rounds[1];
        assert_eq!(up.version, "4.1");
        assert_eq!(up.divergent, vec![Some(25000), Some(3)]);
        let d = up.end.expect("end") - up.start.expect("start");
        assert!((d - 1.0).abs() < 1e-6, "{d}");
        // Nothing outside (from, to].
        assert!(rounds_in_logs(&[String::new()], "4.1", "4.1").is_empty());
    }
}
