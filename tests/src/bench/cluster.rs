//! Part 7: replication volume of the cluster. Three `[cluster]` nodes (the cluster lab:
//! BIRD router, three nodes, five backends of which three are configured); n sessions
//! (`Budget::cluster_sessions`, `--cluster-sessions N`) are written into node 1's
//! affinity map through its pins, each on its
//! client's current Maglev answer of the IPv4 HTTP service, clients that never send a
//! packet. Then be4 is added to that service through node 1's CLI; it joins DOWN (one
//! round), its checks pass, and a second round makes it take clients: the sessions that
//! round makes divergent (about a quarter) go from every node to every peer before any
//! node swaps. Measured: time from the CLI call until be4 is active on every node at one
//! version with no round open, the divergent sessions per node (daemon log), entries and
//! bytes sent and received per node (deltas of `cluster status`), the up-round's duration
//! (log timestamps), peak daemon RSS, and what the next periodic refresh re-sends. A
//! second run loads n sessions on nodes 2 and 3 as well and adds be5.
//!
//! Per run it also checks what issue 16 accepts: no round given up (the daemons'
//! `rounds_gave_up` and their "swapping to version … without Done" lines), no node
//! losing sight of a peer (a peer's "is live" line logged again, a link down, and the
//! oldest Hello each node's status showed while polled), and no client moved: for a
//! sample of the planted sessions, the backend every node would send the client to
//! after the add (its LRU entry, else its protected entry, else the Maglev answer, as
//! the XDP program chooses) must be the one the client had before.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{
    Affinity, AffinityKey, BACKEND_ACTIVE, BACKEND_DRAINING, Backend, SERVICE_F_PROTECTED, Service,
};
use serde::Serialize;
use xlb::{dataplane, pins::PinnedMaps, sessions::monotonic_ns};

use super::{Budget, progress};
use crate::{
    cluster_lab::{ClusterLab, ClusterOptions, VIP4, backend_v4},
    servers::HTTP_PORT,
};

/// The lab tag of this part (namespaces `xlb-bcl-*`).
const TAG: &str = "bcl";
/// The service the sessions belong to and the backends are added to.
const SERVICE: &str = "http-v4";
/// Nodes in the lab.
const NODES: usize = 3;
/// Longest wait for the cluster to agree (start, and after an add), at 100 000 sessions
/// per node; [`agree_timeout`] adds time for more.
const AGREE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the cluster's state is polled while waiting.
const POLL: Duration = Duration::from_millis(50);
/// How often every node's `cluster status` is polled for the acceptance watch when
/// nothing else asks for it (each call is a process in a namespace: on two cores a
/// tighter watch would slow the daemons it watches).
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// How long after a run the periodic refresh is watched: one `REFRESH_EVERY` and a margin.
const REFRESH_WATCH: Duration = Duration::from_millis(11_500);
/// Client addresses of node i start at 10.128.0.0 + (i-1) × [`client_stride`]; the
/// lab's own addresses (10.77/16, 10.78/16, 10.99/16) are below.
const CLIENT_BASE: u32 = 0x0a80_0000;
/// Room above [`CLIENT_BASE`] inside 10/8 (10.128.0.0/9).
const CLIENT_ROOM: u32 = 1 << 23;
/// Affinity map room beyond the planted sessions: the lab's own clients, and the
/// per-CPU free lists from which the kernel's LRU evicts before it is full.
const AFFINITY_SLACK: u32 = 65_536;
/// Planted sessions per loaded node whose backend is compared before and after an add.
const SAMPLE: usize = 4096;

/// Address block of each node's planted clients: `n` rounded up to a power of two.
fn client_stride(n: u32) -> u32 {
    n.max(1).next_power_of_two()
}

/// Most sessions per node whose [`NODES`] client blocks fit into [`CLIENT_ROOM`].
pub fn max_sessions() -> u32 {
    (CLIENT_ROOM / NODES as u32 + 1).next_power_of_two() / 2
}

/// Affinity (and protected: the daemon makes it the same size) map capacity of every
/// node for `n` sessions per node. The LRU holds a node's own `n` (and the lab's few
/// clients); the protected map every node's divergent sessions, of two adds: at most
/// `n / 4 + 3 × n / 5`. A quarter more than `n` plus [`AFFINITY_SLACK`], rounded up to a
/// power of two: 262 144 for 100 000, 2 097 152 for 1 000 000.
pub fn affinity_entries(n: u32) -> u32 {
    (u64::from(n) + u64::from(n) / 4 + u64::from(AFFINITY_SLACK))
        .next_power_of_two()
        .min(u64::from(xlb::config::MAX_AFFINITY_ENTRIES)) as u32
}

/// [`AGREE_TIMEOUT`] and 1 ms per 100 sessions per node above 100 000 (the prepare walk
/// and the import grow with them).
fn agree_timeout(n: u32) -> Duration {
    AGREE_TIMEOUT + Duration::from_millis(u64::from(n.saturating_sub(100_000)) / 100)
}

/// First planted client of node `i` (1-based).
fn first_client(i: usize, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(CLIENT_BASE + (i as u32 - 1) * client_stride(n))
}

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
    /// Sessions in its maps after the span (affinity + protected; a count walked after it).
    pub sessions_after: u64,
}

/// The up-round as the daemons logged it.
#[derive(Clone, Debug, Serialize)]
pub struct RoundLog {
    /// Its version ("counter.node").
    pub version: String,
    /// From the first node's "preparing"/"prepared" line to the last node's "is live", ms.
    pub duration_ms: f64,
    /// The round's start (first prepare line), ms after the CLI call (wall clocks).
    pub start_after_cli_ms: Option<f64>,
    /// The coordinator's prepare: from its "preparing" to its "prepared" line, ms.
    pub prepare_ms: Option<f64>,
    /// Per node: its "prepared" line (its walk done, its sessions queued), ms after the
    /// round's start.
    pub prepared_at_ms: Vec<Option<f64>>,
    /// Per node: its "is live" line (its swap), ms after the round's start.
    pub live_at_ms: Vec<Option<f64>>,
}

/// What issue 16 accepts of one run: no round given up, no peer seen dead, no client
/// moved.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Acceptance {
    /// Rounds given up during the run, all nodes (deltas of `rounds_gave_up`).
    pub rounds_given_up: u64,
    /// The daemons' "swapping to version … without Done from nodes …" lines of the run.
    pub gave_up_lines: Vec<String>,
    /// Versions prepared by a node other than lb1 (its "preparing version" lines): it saw
    /// no lower node live, coordinated, and its round waited only for the peers it saw
    /// live, possibly none (a round given up without the warning).
    pub takeover_lines: Vec<String>,
    /// Times a node lost sight of a peer during the run: a peer's "is live" line logged
    /// again (its Hellos had been older than `LIVE_FOR`, 3 s, when this node looked), or
    /// a link down.
    pub peers_seen_dead: u64,
    /// Those lines, each prefixed with the node that logged it.
    pub peer_lines: Vec<String>,
    /// Peer states other than "live" that a node's status showed while polled
    /// ("lbI: node P connected").
    pub not_live_seen: Vec<String>,
    /// Per node: the oldest Hello from any peer its status showed while polled, ms.
    pub max_hello_age_ms: Vec<Option<u64>>,
    /// Per node: the slowest `xlb cluster status` answer while polled, ms (its cluster
    /// task was busy that long).
    pub max_status_ms: Vec<f64>,
    /// Status calls that failed while polled (each with its error).
    pub status_errors: Vec<String>,
    /// Per node: every coordinator its polled statuses named (one, node 1, unless a
    /// node lost sight of it and took over).
    pub coordinators_seen: Vec<Vec<u64>>,
    /// Per node: the slowest `xlb backend list` while waiting for the backend to be
    /// active, ms (its owner thread was busy that long).
    pub max_backend_list_ms: Vec<f64>,
    /// Per node: when a polled status last showed its `sessions_received` grow, ms after
    /// the CLI call (replication to it was still arriving then; compare `live_at_ms` of
    /// the up-round and `live_everywhere_ms`).
    pub received_last_ms: Vec<Option<f64>>,
    /// Every status poll of the run after the CLI call: (ms after it, `sessions_received`
    /// per node), the replication's progress.
    pub received_timeline: Vec<(f64, Vec<Option<u64>>)>,
    /// When the moved check (right after agreement) had read every node, ms after the
    /// CLI call.
    /// Planted sessions compared (a sample of each loaded node's).
    pub sampled: u64,
    /// Sampled sessions some node would have sent elsewhere than their own node before
    /// the add (0 unless the lab is broken).
    pub differ_before: u64,
    /// Sampled sessions whose Maglev answer the add changed on some node: those that
    /// move unless their session (replicated if a peer's) holds them.
    pub at_stake: u64,
    pub moved_checked_ms: f64,
    /// Sampled sessions some node sends to another backend after the add than before.
    pub moved: u64,
    /// Per node: the sampled sessions it sends to another backend after the add.
    pub moved_on: Vec<u64>,
    /// As `moved`, after the refresh watch.
    pub moved_after_refresh: u64,
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
    /// Rounds given up, peers seen dead, clients moved.
    pub acceptance: Acceptance,
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
    if n > max_sessions() {
        bail!(
            "{n} sessions per node do not fit {NODES} client blocks into 10.128.0.0/9 (at most {})",
            max_sessions()
        );
    }
    let entries = affinity_entries(n);
    let lab = ClusterLab::new(
        TAG,
        ClusterOptions {
            backends: 5,
            configured: Some(3),
            cluster: true,
            clients_v4: 1,
            clients_v6: 1,
            edit: Some(std::sync::Arc::new(move |_, text: String| {
                format!("affinity_max_entries = {entries}\n{text}")
            })),
            ..ClusterOptions::default()
        },
    )?;
    wait_agreed(&lab, None, agree_timeout(n), &mut Watch::new())?;
    let mut runs = Vec::new();
    for (added, b, loaders) in [("be4", 4, &[1][..]), ("be5", 5, &[2, 3][..])] {
        let mut watch = Watch::new();
        watch.mark(&lab)?;
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
        let run = measure_add(&lab, &name, added, b, &loaded, n, &mut watch)?;
        progress(&format!("cluster: {}", acceptance_line(&run)));
        runs.push(run);
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
    let mut about = about(n);
    about.push_str("\n\n");
    about.push_str(&acceptance_md(&runs));
    Ok(ClusterTable { about, runs, idle })
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

/// What the nodes said about their peers over one run: from their statuses while
/// polled, and from their logs since [`Watch::mark`].
struct Watch {
    /// Per node: its log's length at the mark (bytes).
    marks: Vec<usize>,
    /// Per node: the oldest Hello age of any peer in its status, ms.
    hello_age: Vec<Option<u64>>,
    /// Peer states other than "live" seen.
    not_live: BTreeSet<String>,
    /// Per node: the slowest status answer, ms.
    slowest: Vec<f64>,
    /// Failed status calls.
    errors: Vec<String>,
    /// `rounds_gave_up` per node at its first poll.
    gave_up_at_start: Vec<Option<u64>>,
    /// `rounds_gave_up` per node at the last poll.
    gave_up_now: Vec<u64>,
    /// When the last poll began.
    last_poll: Option<Instant>,
    /// The CLI call the run measures from.
    t0: Option<Instant>,
    /// Per node: `sessions_received` at the last poll.
    received: Vec<Option<u64>>,
    /// Per node: when a poll last saw `sessions_received` grow, ms after `t0`.
    received_grew_ms: Vec<Option<f64>>,
    /// Every poll after `t0`: (ms after it, `sessions_received` per node).
    timeline: Vec<(f64, Vec<Option<u64>>)>,
    /// Per node: the coordinators its statuses named.
    coordinators: Vec<BTreeSet<u64>>,
    /// Per node: the slowest `xlb backend list` (answered by its owner thread), ms.
    slowest_list: Vec<f64>,
}

impl Watch {
    fn new() -> Self {
        Self {
            marks: vec![0; NODES],
            hello_age: vec![None; NODES],
            not_live: BTreeSet::new(),
            slowest: vec![0.0; NODES],
            errors: Vec::new(),
            gave_up_at_start: vec![None; NODES],
            gave_up_now: vec![0; NODES],
            last_poll: None,
            t0: None,
            received: vec![None; NODES],
            received_grew_ms: vec![None; NODES],
            timeline: Vec::new(),
            coordinators: vec![BTreeSet::new(); NODES],
            slowest_list: vec![0.0; NODES],
        }
    }

    /// Whether [`WATCH_EVERY`] passed since the last poll.
    fn due(&self) -> bool {
        self.last_poll.is_none_or(|t| t.elapsed() >= WATCH_EVERY)
    }

    /// Starts the run's log slice here.
    fn mark(&mut self, lab: &ClusterLab) -> Result<()> {
        for i in 1..=NODES {
            self.marks[i - 1] = lab.node(i)?.daemon_log().len();
        }
        Ok(())
    }

    /// Every node's `cluster status`, timed and read for peers not live; `None` for a
    /// node whose call failed (recorded).
    fn poll(&mut self, lab: &ClusterLab) -> Vec<Option<serde_json::Value>> {
        self.last_poll = Some(Instant::now());
        let mut out = Vec::new();
        for i in 1..=NODES {
            let t = Instant::now();
            let s = status(lab, i);
            let took = ms(t.elapsed());
            self.slowest[i - 1] = self.slowest[i - 1].max(took);
            match s {
                Ok(s) => {
                    self.read(i, &s);
                    out.push(Some(s));
                }
                Err(e) => {
                    if self.errors.len() < 16 {
                        self.errors.push(format!("lb{i}: {e:#}"));
                    }
                    out.push(None);
                }
            }
        }
        if let Some(t0) = self.t0 {
            self.timeline
                .push((ms(t0.elapsed()), self.received.clone()));
        }
        out
    }

    fn read(&mut self, i: usize, s: &serde_json::Value) {
        for p in s["peers"].as_array().into_iter().flatten() {
            let id = p["id"].as_u64().unwrap_or(0);
            if let Some(age) = p["last_hello_ms"].as_u64() {
                let a = &mut self.hello_age[i - 1];
                *a = Some(a.map_or(age, |m| m.max(age)));
            }
            let state = p["state"].as_str().unwrap_or("?");
            if state != "live" {
                self.not_live.insert(format!("lb{i}: node {id} {state}"));
            }
        }
        if let Some(c) = s["coordinator"].as_u64() {
            self.coordinators[i - 1].insert(c);
        }
        let g = s["rounds_gave_up"].as_u64().unwrap_or(0);
        self.gave_up_now[i - 1] = g;
        self.gave_up_at_start[i - 1].get_or_insert(g);
        let r = s["sessions_received"].as_u64().unwrap_or(0);
        if let (Some(t0), Some(was)) = (self.t0, self.received[i - 1])
            && r > was
        {
            self.received_grew_ms[i - 1] = Some(ms(t0.elapsed()));
        }
        self.received[i - 1] = Some(r);
    }

    /// Rounds given up since each node's first poll.
    fn gave_up(&self) -> u64 {
        self.gave_up_now
            .iter()
            .zip(&self.gave_up_at_start)
            .map(|(now, start)| now.saturating_sub(start.unwrap_or(*now)))
            .sum()
    }

    /// Keeps polling for `span` (the watch goes on while nothing is asked).
    fn poll_for(&mut self, lab: &ClusterLab, span: Duration) {
        let start = Instant::now();
        while start.elapsed() < span {
            self.poll(lab);
            std::thread::sleep(WATCH_EVERY);
        }
    }

    /// Every node's log since the mark.
    fn logs(&self, lab: &ClusterLab) -> Result<Vec<String>> {
        (1..=NODES)
            .map(|i| {
                let log = lab.node(i)?.daemon_log();
                let from = self.marks[i - 1].min(log.len());
                Ok(log.get(from..).unwrap_or_default().to_string())
            })
            .collect()
    }
}

/// Polls until every node is synced at one version with no round open (and, with
/// `active`, has that backend active); returns the statuses. Every poll feeds `watch`.
fn wait_agreed(
    lab: &ClusterLab,
    active: Option<&str>,
    timeout: Duration,
    watch: &mut Watch,
) -> Result<Vec<serde_json::Value>> {
    let start = Instant::now();
    let mut last = Vec::new();
    while start.elapsed() < timeout {
        let mut ok = true;
        if let Some(name) = active {
            for i in 1..=NODES {
                let t = Instant::now();
                let state = backend_state(lab, i, name)?;
                watch.slowest_list[i - 1] = watch.slowest_list[i - 1].max(ms(t.elapsed()));
                if state != "active" {
                    ok = false;
                    break;
                }
            }
        }
        // Polled (less often) while the backend is not active yet, for the watch.
        if !ok && !watch.due() {
            std::thread::sleep(POLL);
            continue;
        }
        let polled = watch.poll(lab);
        if ok && polled.iter().all(Option::is_some) {
            last = polled.into_iter().flatten().collect();
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
        "the cluster did not agree{} within {timeout:?}: {last:#?}",
        active
            .map(|b| format!(" with {b} active"))
            .unwrap_or_default()
    )
}

/// Writes `n` sessions into node `i`'s affinity map, each on its client's current Maglev
/// answer (so none is divergent before the add), stamped now; checks the daemon counts them.
fn load_sessions(lab: &ClusterLab, i: usize, n: u32) -> Result<()> {
    let before = counted_sessions(lab, i, Instant::now())?;
    let maps = node_maps(lab, i)?;
    let record = crate::plant::tcp_service(&maps, IpAddr::V4(VIP4), HTTP_PORT)?;
    let (keys, values) = crate::plant::maglev_sessions(&maps, &record, first_client(i, n), n)?;
    crate::plant::sessions(&maps.affinity, &keys, &values, |_| {})
        .with_context(|| format!("writing sessions into lb{i}'s affinity map"))?;
    let after = counted_sessions(lab, i, Instant::now())?;
    if after < before + u64::from(n) {
        bail!(
            "lb{i} counts {after} sessions after {n} were written to its {before}: the LRU evicted"
        );
    }
    Ok(())
}

/// Longest wait for a node's session count to be walked after a point.
const COUNT_WAIT: Duration = Duration::from_secs(30);

/// The sessions (both maps) node `i` counted in a walk begun after `since`. Above about
/// 200 000 sessions `xlb status` answers at once with the latest walk's count and its age
/// (lb-userspace/src/daemon/counts.rs), so this polls until that walk is recent enough.
fn counted_sessions(lab: &ClusterLab, i: usize, since: Instant) -> Result<u64> {
    Ok(counted_status(lab, i, since)?["sessions"]
        .as_u64()
        .unwrap_or(0))
}

/// Node `i`'s `xlb status` once its session count is of a walk begun after `since`.
fn counted_status(lab: &ClusterLab, i: usize, since: Instant) -> Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        let st = lab.node_cli(i, &["status"])?;
        let age = st["sessions_counted_ms_ago"].as_u64();
        if age.is_some_and(|a| u128::from(a) < since.elapsed().as_millis()) {
            return Ok(st);
        }
        if start.elapsed() > COUNT_WAIT {
            bail!("lb{i} walked no session count within {COUNT_WAIT:?}: {st}");
        }
        std::thread::sleep(POLL);
    }
}

/// Node `i`'s pinned maps (its status names the directory).
fn node_maps(lab: &ClusterLab, i: usize) -> Result<PinnedMaps> {
    let st = lab.node_cli(i, &["status"])?;
    let pins = st["pins"].as_str().context("status without pins")?;
    PinnedMaps::open(std::path::Path::new(pins))
        .with_context(|| format!("opening lb{i}'s pinned maps"))
}

/// The sampled planted clients: [`SAMPLE`] of each loaded node's (reproducible).
fn sample_clients(loaded: &[u64], n: u32) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for (k, &l) in loaded.iter().enumerate() {
        if l == 0 {
            continue;
        }
        let first = u32::from(first_client(k + 1, n));
        let mut picks = crate::plant::sample(SAMPLE, n, 0x5eed + k as u64);
        picks.sort_unstable();
        picks.dedup();
        out.extend(picks.into_iter().map(|x| Ipv4Addr::from(first + x)));
    }
    out
}

/// A backend address, in key word layout.
type Addr = [u32; 4];
/// Per sampled client, one address per node: `[client][node]`.
type PerNode = Vec<Vec<Addr>>;

/// Per sampled client, the backend address each node would send it to now, and each
/// node's Maglev answer for it.
fn where_now(lab: &ClusterLab, clients: &[Ipv4Addr]) -> Result<(PerNode, PerNode)> {
    let mut by_node = Vec::new();
    for i in 1..=NODES {
        let maps = node_maps(lab, i)?;
        let record = crate::plant::tcp_service(&maps, IpAddr::V4(VIP4), HTTP_PORT)?;
        let table = crate::plant::live_table(&maps, &record)?;
        let backends = maps.backend_records()?;
        let now = monotonic_ns();
        by_node.push(
            clients
                .iter()
                .map(|c| choose(&maps, &record, &table, &backends, now, *c))
                .collect::<Vec<_>>(),
        );
    }
    let pick = |f: fn(&(Addr, Addr)) -> Addr| -> PerNode {
        (0..clients.len())
            .map(|c| by_node.iter().map(|v| f(&v[c])).collect())
            .collect()
    };
    Ok((pick(|w| w.0), pick(|w| w.1)))
}

/// The backend address the XDP program would choose for `client` (lb-ebpf's
/// `select::choose` without its side effects): its LRU entry, else (when the service has
/// protected sessions) its protected entry, if not expired and its backend is usable;
/// otherwise its Maglev answer. Returns the choice and the Maglev answer.
fn choose(
    maps: &PinnedMaps,
    record: &Service,
    table: &[u32],
    backends: &[Backend],
    now: u64,
    client: Ipv4Addr,
) -> ([u32; 4], [u32; 4]) {
    let words = dataplane::addr_words(IpAddr::V4(client));
    let mut addr = [0u32; 4];
    for (a, (w, m)) in addr.iter_mut().zip(words.iter().zip(&record.mask)) {
        *a = w & m;
    }
    let key = AffinityKey {
        service_id: record.id,
        addr,
    };
    let entry: Option<Affinity> = maps.affinity.get(&key, 0).ok().or_else(|| {
        (record.flags & SERVICE_F_PROTECTED != 0)
            .then(|| maps.protected.get(&key, 0).ok())
            .flatten()
    });
    let usable = |id: u32| {
        backends.get(id as usize).filter(|b| {
            (b.state == BACKEND_ACTIVE || b.state == BACKEND_DRAINING)
                && u32::from(b.service_id) == record.id
        })
    };
    let id = dataplane::answer(table, &addr);
    let maglev = backends.get(id as usize).map_or([u32::MAX; 4], |b| b.addr);
    if let Some(e) = entry
        && now.saturating_sub(e.last_seen_ns) <= record.timeout_ns
        && let Some(b) = usable(e.backend_id)
    {
        return (b.addr, maglev);
    }
    (maglev, maglev)
}

/// Sampled clients whose backend on some node differs from `reference[client]`, and the
/// count per node.
fn differing(reference: &[[u32; 4]], now: &[Vec<[u32; 4]>]) -> (u64, Vec<u64>) {
    let mut any = 0;
    let mut per = vec![0u64; NODES];
    for (r, nodes) in reference.iter().zip(now) {
        let mut moved = false;
        for (k, b) in nodes.iter().enumerate() {
            if b != r {
                per[k] += 1;
                moved = true;
            }
        }
        any += u64::from(moved);
    }
    (any, per)
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
    let end = Instant::now();
    for (k, (b, a)) in before.iter().zip(after).enumerate() {
        let i = k + 1;
        let (b, a) = (counters(b), counters(a));
        let d = |j: usize| a[j].saturating_sub(b[j]);
        let st = counted_status(lab, i, end)?;
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
            // `sessions` counts both maps (`protected_sessions` is the part of it).
            sessions_after: st["sessions"].as_u64().unwrap_or(0),
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
    watch: &mut Watch,
) -> Result<ClusterRun> {
    let timeout = agree_timeout(n);
    let before = wait_agreed(lab, None, timeout, watch)?;
    let clients = sample_clients(loaded, n);
    let (was, _) = where_now(lab, &clients)?;
    // A client's backend before the add: what its own node's entry says.
    let owner = |c: &Ipv4Addr| ((u32::from(*c) - CLIENT_BASE) / client_stride(n)) as usize;
    let reference: Vec<[u32; 4]> = clients
        .iter()
        .zip(&was)
        .map(|(c, nodes)| nodes[owner(c)])
        .collect();
    let (differ_before, _) = differing(&reference, &was);
    let t = Instant::now();
    let cli_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    watch.t0 = Some(t);
    lab.add_backend(1, SERVICE, added, IpAddr::V4(backend_v4(b)))?;
    let cli_ms = ms(t.elapsed());
    let after = wait_agreed(lab, Some(added), timeout, watch)?;
    let live_everywhere_ms = ms(t.elapsed());
    let (now, maglev) = where_now(lab, &clients)?;
    let moved_checked_ms = ms(t.elapsed());
    let (moved, moved_on) = differing(&reference, &now);
    // The clients only their sessions keep: the new tables answer another backend.
    let (at_stake, _) = differing(&reference, &maglev);
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
        let start = r.start?;
        let rel = |v: &[Option<f64>]| {
            v.iter()
                .map(|t| t.map(|t| (t - start) * 1000.0))
                .collect::<Vec<_>>()
        };
        Some(RoundLog {
            version: r.version.clone(),
            duration_ms: (r.end? - start) * 1000.0,
            start_after_cli_ms: (cli_wall > 0.0).then_some((start - cli_wall) * 1000.0),
            prepare_ms: r.prepare_ms,
            prepared_at_ms: rel(&r.prepared_at),
            live_at_ms: rel(&r.live_at),
        })
    });
    progress(&format!(
        "cluster: {added} live everywhere {live_everywhere_ms:.0} ms after the CLI call; watching the refresh"
    ));
    watch.poll_for(lab, REFRESH_WATCH);
    let later = (1..=NODES)
        .map(|i| status(lab, i))
        .collect::<Result<Vec<_>>>()?;
    let refresh = deltas(lab, &after, &later)?;
    let (moved_after_refresh, _) = differing(&reference, &where_now(lab, &clients)?.0);
    watch.poll(lab);
    let mut acceptance = read_logs(&watch.logs(lab)?);
    acceptance.rounds_given_up = watch.gave_up();
    acceptance.not_live_seen = watch.not_live.iter().cloned().collect();
    acceptance.max_hello_age_ms = watch.hello_age.clone();
    acceptance.max_status_ms = watch.slowest.clone();
    acceptance.status_errors = watch.errors.clone();
    acceptance.received_last_ms = watch.received_grew_ms.clone();
    acceptance.received_timeline = watch.timeline.clone();
    acceptance.coordinators_seen = watch
        .coordinators
        .iter()
        .map(|c| c.iter().copied().collect())
        .collect();
    acceptance.max_backend_list_ms = watch.slowest_list.clone();
    acceptance.moved_checked_ms = moved_checked_ms;
    acceptance.sampled = clients.len() as u64;
    acceptance.differ_before = differ_before;
    acceptance.at_stake = at_stake;
    acceptance.moved = moved;
    acceptance.moved_on = moved_on;
    acceptance.moved_after_refresh = moved_after_refresh;
    Ok(ClusterRun {
        name: name.to_owned(),
        sessions_per_node: u64::from(n),
        cli_ms,
        live_everywhere_ms,
        rounds,
        up_round,
        nodes,
        refresh,
        acceptance,
    })
}

/// The given-up rounds and lost peers in the nodes' log slices (`logs[node - 1]`).
fn read_logs(logs: &[String]) -> Acceptance {
    let mut a = Acceptance::default();
    for (k, log) in logs.iter().enumerate() {
        for line in log.lines() {
            let shown = || format!("lb{}: {}", k + 1, line.trim());
            if line.contains("cluster: swapping to version ") && line.contains("without Done") {
                a.gave_up_lines.push(shown());
            } else if k > 0 && matches!(round_line(line), Some((_, Line::Preparing))) {
                // Only the coordinator prepares; lb1 is it while it is live to everyone.
                a.takeover_lines.push(shown());
            } else if peer_lost_line(line) {
                a.peers_seen_dead += 1;
                a.peer_lines.push(shown());
            }
        }
    }
    a
}

/// Whether a daemon log line says this node had lost sight of a peer: a peer logged live
/// again (the daemon logs "is live" only for a peer unheard for `LIVE_FOR` or never
/// heard), a link down, or a peer unreachable.
fn peer_lost_line(line: &str) -> bool {
    let relive = line
        .split("cluster: node ")
        .nth(1)
        .and_then(|rest| rest.split_once(' '))
        .is_some_and(|(id, rest)| id.parse::<u32>().is_ok() && rest.starts_with("is live"));
    relive
        || (line.contains("cluster: link to node ") && line.contains(" is down"))
        || line.contains("cluster link down")
        || line.contains("cluster peer unreachable")
}

/// One line per run for the progress output.
fn acceptance_line(run: &ClusterRun) -> String {
    let a = &run.acceptance;
    format!(
        "{}: rounds given up {}, versions by another node {}, peers seen dead {}, clients moved {} of {} sampled ({} with a new \
         Maglev answer; {} moved after the refresh), oldest Hello seen {} ms, slowest status {:.0} ms",
        run.name,
        a.rounds_given_up.max(a.gave_up_lines.len() as u64),
        a.takeover_lines.len(),
        a.peers_seen_dead + a.not_live_seen.len() as u64,
        a.moved,
        a.sampled,
        a.at_stake,
        a.moved_after_refresh,
        a.max_hello_age_ms
            .iter()
            .flatten()
            .max()
            .copied()
            .unwrap_or(0),
        a.max_status_ms.iter().copied().fold(0.0, f64::max),
    )
}

/// The acceptance paragraph under [`about`]: one sentence per run, and the log lines of
/// anything that went wrong.
fn acceptance_md(runs: &[ClusterRun]) -> String {
    let mut s = String::from(
        "Acceptance (issue 16: no round given up, no peer seen dead, no client moved):\n",
    );
    for run in runs {
        let a = &run.acceptance;
        let per_node = |v: &[Option<u64>]| {
            v.iter()
                .enumerate()
                .map(|(k, x)| format!("lb{} {}", k + 1, x.map_or("–".into(), |x| x.to_string())))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = std::fmt::Write::write_fmt(
            &mut s,
            format_args!(
                "\n- **{}**: {} round(s) given up; {} version(s) prepared by a node other than \
                 lb1; {} time(s) a node lost sight of a peer \
                 (log), peers not live in a polled status: {}; oldest Hello a node's status \
                 showed (ms): {}; slowest `cluster status` (ms): {}; slowest `backend list` \
                 (ms): {}; coordinators named: {}; clients moved (read {:.0} ms after the CLI call, at \
                 agreement): {} of {} \
                 sampled planted sessions on some node, {} of them with a new Maglev answer \
                 ({} per node; {} after the refresh; {} differed before the add).",
                run.name,
                a.rounds_given_up.max(a.gave_up_lines.len() as u64),
                a.takeover_lines.len(),
                a.peers_seen_dead,
                if a.not_live_seen.is_empty() {
                    "none".to_string()
                } else {
                    a.not_live_seen.join("; ")
                },
                per_node(&a.max_hello_age_ms),
                a.max_status_ms
                    .iter()
                    .enumerate()
                    .map(|(k, x)| format!("lb{} {x:.0}", k + 1))
                    .collect::<Vec<_>>()
                    .join(", "),
                a.max_backend_list_ms
                    .iter()
                    .enumerate()
                    .map(|(k, x)| format!("lb{} {x:.0}", k + 1))
                    .collect::<Vec<_>>()
                    .join(", "),
                a.coordinators_seen
                    .iter()
                    .enumerate()
                    .map(|(k, c)| format!(
                        "lb{} {}",
                        k + 1,
                        c.iter().map(u64::to_string).collect::<Vec<_>>().join("+")
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                a.moved_checked_ms,
                a.moved,
                a.sampled,
                a.at_stake,
                a.moved_on
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join("/"),
                a.moved_after_refresh,
                a.differ_before,
            ),
        );
        if let Some(r) = &run.up_round {
            let after_cli = |v: &[Option<f64>]| {
                v.iter()
                    .enumerate()
                    .map(|(k, x)| {
                        let at = x.zip(r.start_after_cli_ms).map(|(x, s)| x + s);
                        format!(
                            "lb{} {}",
                            k + 1,
                            at.map_or("–".into(), |t| format!("{t:.0}"))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = std::fmt::Write::write_fmt(
                &mut s,
                format_args!(
                    " Up-round {} (ms after the CLI call): prepared {}; swapped {}; \
                     replicated sessions last seen arriving {}; live everywhere {:.0}.",
                    r.version,
                    after_cli(&r.prepared_at_ms),
                    after_cli(&r.live_at_ms),
                    a.received_last_ms
                        .iter()
                        .enumerate()
                        .map(|(k, x)| format!(
                            "lb{} {}",
                            k + 1,
                            x.map_or("–".into(), |t| format!("{t:.0}"))
                        ))
                        .collect::<Vec<_>>()
                        .join(", "),
                    run.live_everywhere_ms,
                ),
            );
        }
        let lines = a.gave_up_lines.iter().chain(&a.takeover_lines);
        for line in lines.chain(&a.peer_lines).take(16) {
            let _ = std::fmt::Write::write_fmt(&mut s, format_args!("\n  - `{line}`"));
        }
    }
    s
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
    /// The coordinator's "preparing" line: (node index, time).
    preparing: Option<(usize, f64)>,
    /// Per node: its "prepared" line.
    prepared_at: Vec<Option<f64>>,
    /// Per node: its "is live" line.
    live_at: Vec<Option<f64>>,
    /// The coordinator's prepare, "preparing" to "prepared", ms.
    prepare_ms: Option<f64>,
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
                    preparing: None,
                    prepared_at: vec![None; logs.len()],
                    live_at: vec![None; logs.len()],
                    prepare_ms: None,
                });
            let at = line.split_whitespace().next().and_then(timestamp);
            match what {
                Line::Preparing => {
                    r.start = min_opt(r.start, at);
                    r.preparing = at.map(|t| (k, t));
                }
                Line::Prepared(n) => {
                    r.start = min_opt(r.start, at);
                    r.divergent[k] = Some(n);
                    r.prepared_at[k] = at;
                }
                Line::Live => {
                    r.end = max_opt(r.end, at);
                    r.live_at[k] = at;
                }
            }
        }
    }
    let mut rounds: Vec<LoggedRound> = by.into_values().collect();
    for r in &mut rounds {
        r.prepare_ms = r
            .preparing
            .and_then(|(k, t)| Some((r.prepared_at[k]? - t) * 1000.0));
    }
    rounds
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
    // A CLI change: "… — preparing version V"; the health verdict or a first version:
    // "…; preparing version V".
    let rest = line
        .split(" — preparing version ")
        .nth(1)
        .or_else(|| line.split("; preparing version ").nth(1))?;
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
         `affinity_max_entries = {entries}`, the protected map as large), identical configs: IPv4 and IPv6 HTTP and \
         UDP services over be1..be3 with health checks (every 500ms, rise 2). {n} sessions are \
         written into a node's affinity map through its pins, one per client address \
         (10.128.0.0/{prefix} for lb1, the next /{prefix}s for lb2, lb3), each on its client's current \
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
         the {watch:.1} s after the run (one periodic refresh of protected sessions). \
         Acceptance, per run: rounds given up (deltas of `rounds_gave_up`, and the daemons' \
         \"swapping to version … without Done\" lines); a node losing sight of a peer (its log \
         saying a peer \"is live\" again, which it does only after `LIVE_FOR` = 3 s without \
         its Hello, or a link down), peer states and Hello ages in every status polled during \
         the run; clients moved: {sample} planted sessions of each loaded node, and for each \
         the backend every node would choose after the add (LRU entry, else protected entry, \
         else Maglev answer, as the XDP program does) against the one it had before.",
        poll = POLL.as_millis(),
        watch = REFRESH_WATCH.as_secs_f64(),
        entries = affinity_entries(n),
        prefix = 32 - client_stride(n).trailing_zeros(),
        sample = SAMPLE,
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
                start_after_cli_ms: Some(1200.0),
                prepare_ms: Some(100.0),
                prepared_at_ms: vec![Some(100.0); 3],
                live_at_ms: vec![Some(500.0); 3],
            }),
            nodes: vec![node(1, 25_000, 50_000), node(2, 0, 0), node(3, 0, 0)],
            refresh: vec![NodeDelta::default(); 3],
            acceptance: Acceptance {
                sampled: 4096,
                moved_on: vec![0; 3],
                max_hello_age_ms: vec![Some(1000); 3],
                max_status_ms: vec![20.0; 3],
                ..Acceptance::default()
            },
        };
        let report = crate::bench::Report {
            cluster: Some(ClusterTable {
                about: format!(
                    "{}\n\n{}",
                    about(100_000),
                    acceptance_md(std::slice::from_ref(&run))
                ),
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
        assert!(
            md.contains(
                "- **be4 added**: 0 round(s) given up; 0 version(s) prepared by a node other than lb1; 0 time(s) a node lost sight of a peer"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "clients moved (read 0 ms after the CLI call, at agreement): 0 of 4096 sampled"
            ),
            "{md}"
        );
        assert!(md.contains("affinity_max_entries = 262144"), "{md}");
    }

    #[test]
    fn sizes_maps_and_client_blocks_from_the_session_count() {
        assert_eq!(affinity_entries(2_000), 131_072);
        assert_eq!(affinity_entries(100_000), 262_144);
        assert_eq!(affinity_entries(1_000_000), 2_097_152);
        for n in [1, 2_000, 100_000, 1_000_000, 2_097_152] {
            // Room for the node's own sessions and every divergent one of two adds.
            assert!(u64::from(affinity_entries(n)) >= u64::from(n) + u64::from(n) / 4);
            assert!(client_stride(n) >= n);
        }
        assert_eq!(first_client(1, 1_000_000), Ipv4Addr::new(10, 128, 0, 0));
        assert_eq!(first_client(2, 1_000_000), Ipv4Addr::new(10, 144, 0, 0));
        assert_eq!(first_client(3, 100_000), Ipv4Addr::new(10, 132, 0, 0));
        // The last block of the largest count ends inside 10/8; one more does not fit.
        assert_eq!(max_sessions(), 2_097_152);
        let top = u32::from(first_client(NODES, max_sessions())) + client_stride(max_sessions());
        assert!(top - 1 <= u32::from(Ipv4Addr::new(10, 255, 255, 255)));
        assert!(client_stride(max_sessions() + 1) * NODES as u32 > CLIENT_ROOM);
        assert!(sample_clients(&[1, 0, 1], 2_000).len() > 1_000);
    }

    #[test]
    fn reads_given_up_rounds_and_lost_peers_from_the_logs() {
        let lb1 = "\
2026-11-30T10:00:00.000000Z  INFO xlb::daemon::clustering: cluster: node 2 is live peer=2 version=3.1
2026-11-30T10:00:00.100000Z  INFO xlb::daemon::clustering: cluster: version 3.1 is live on this node version=3.1
2026-11-30T10:00:01.000000Z  WARN xlb::daemon::clustering: cluster: swapping to version 4.1 without Done from nodes {3} (not live or too slow): their clients with divergent sessions may move version=4.1
"
        .to_string();
        let lb2 = "\
2026-11-30T10:00:02.000000Z  WARN xlb::daemon::clustering: cluster: link to node 3 is down peer=3
2026-11-30T10:00:02.000000Z  INFO xlb::cluster::mesh: cluster link down peer=3 addr=10.77.0.13:7946 reason=eof
2026-11-30T10:00:02.500000Z  INFO xlb::daemon::clustering: cluster: full sync from node 1 complete peer=1
"
        .to_string();
        let lb3 = "\
2026-11-30T10:00:03.000000Z  INFO xlb::daemon::clustering: cluster: the nodes' health checks (or drains) changed the cluster's verdict; preparing version 5.3 version=5.3 down=[] up=[\"http-v4/be5\"] drains_finished=[]
2026-11-30T10:00:03.100000Z  INFO xlb::daemon::clustering: cluster: prepared version 5.3: sent the 7 sessions it makes divergent to every peer version=5.3 divergent=7
"
        .to_string();
        let a = read_logs(&[lb1, lb2, lb3]);
        assert_eq!(a.takeover_lines.len(), 1, "{a:?}");
        assert!(a.takeover_lines[0].starts_with("lb3: "), "{a:?}");
        assert_eq!(a.gave_up_lines.len(), 1, "{a:?}");
        assert!(a.gave_up_lines[0].starts_with("lb1: "), "{a:?}");
        assert_eq!(a.peers_seen_dead, 3, "{a:?}");
        assert!(a.peer_lines[0].contains("node 2 is live"), "{a:?}");
        assert!(read_logs(&[String::new()]).peer_lines.is_empty());
    }

    #[test]
    fn counts_clients_whose_backend_differs_on_any_node() {
        let (a, b) = ([1, 0, 0, 0], [2, 0, 0, 0]);
        let reference = vec![a, a, b];
        let now = vec![vec![a, a, a], vec![a, b, b], vec![b, b, b]];
        assert_eq!(differing(&reference, &now), (1, vec![0, 1, 1]));
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
2026-11-30T10:00:01.000000Z  INFO xlb::daemon::clustering: cluster: the nodes' health checks (or drains) changed the cluster's verdict; preparing version 4.1 version=4.1 down=[] up=[\"http-v4/be4\"] drains_finished=[]
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
        // The coordinator's prepare: its "preparing" to its "prepared" line.
        let p = up.prepare_ms.expect("prepare");
        assert!((p - 200.0).abs() < 1e-3, "{p}");
        assert_eq!(rounds[0].preparing.map(|(k, _)| k), Some(0));
        // Nothing outside (from, to].
        assert!(rounds_in_logs(&[String::new()], "4.1", "4.1").is_empty());
    }
}
