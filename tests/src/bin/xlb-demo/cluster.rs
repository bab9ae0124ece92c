//! `cargo xtask demo -- cluster`: the replicated cluster in a namespace lab. Three xlb
//! nodes behind a BIRD router (BGP, BFD, ECMP hashed on layer 4), 64 clients probing
//! continuously; a backend is added on one node and reaches the others, the clients it
//! would move keep their backend through replicated sessions, then a node dies silently
//! and no connection breaks. Everything is removed at the end, also on error, panic or
//! Ctrl-C (the lab's Drop and signal watcher).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use xlb_tests::cluster_lab::{ClusterLab, ClusterOptions, SERVICES};
use xlb_tests::cluster_ops::Answer;
use xlb_tests::probes::{self, ProbeOptions, ProbeRecord, Probers, Summary};

/// The lab tag (namespaces `xlb-cdemo-*`): no test uses it.
const TAG: &str = "cdemo";
/// Steps of this demo.
const STEPS: usize = 5;
/// Budget for the nodes to agree (synced, one version, peers live).
const AGREE_TIMEOUT: Duration = Duration::from_secs(15);
/// Budget for a change made on one node to show on the others.
const SPREAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Budget for the router to drop a dead node (BFD detects it in about 300 ms).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the probers keep going after the death, so TCP retransmits what was lost.
const AFTER_DEATH: Duration = Duration::from_secs(3);
/// Services that hold the clients' sessions.
const ALL_SERVICES: [&str; 4] = SERVICES;

fn step(n: usize, what: &str) {
    println!("[{n}/{STEPS}] {what}");
}

/// A narration or table line, indented under its step.
fn say(line: &str) {
    println!("      {}", line.trim_end());
}

/// Runs the cluster demo.
pub fn run() -> Result<()> {
    let started = Instant::now();
    step(
        1,
        "building the lab: a router (BIRD: BGP, BFD, ECMP), 3 xlb nodes, 4 backends, 64 clients",
    );
    let mut lab =
        ClusterLab::new(TAG, ClusterOptions::replicated()).context("building the cluster lab")?;
    let converged = started.elapsed();
    say(&format!(
        "The nodes announce both VIPs over BGP; the router spreads connections over them \
         ({converged:.1?} from start to every next hop)."
    ));
    next_hops_table(&lab)?;
    let agreed = lab.wait_cluster(AGREE_TIMEOUT)?;
    say(&format!(
        "Each node replicates to the others over an authenticated TCP mesh (all agree {:.1?} later):",
        agreed
    ));
    status_table(&lab)?;

    step(
        2,
        "every client opens 4 TCP connections and 1 UDP flow and asks \"who are you?\" every 200 ms",
    );
    let clients = lab.client_addrs();
    let opts = ProbeOptions {
        tcp_per_client: 4,
        udp_per_client: 1,
        every: Duration::from_millis(200),
        timeout: Duration::from_secs(3),
        max_duration: Duration::from_secs(45),
        ..ProbeOptions::default()
    };
    let probers = Probers::start(&lab.client, &clients, ClusterLab::vip_for, &opts)
        .context("starting the probers")?;
    std::thread::sleep(Duration::from_secs(1));
    let before = probes::backend_per_client(&probers.snapshot())?;
    if before.len() != clients.len() {
        bail!(
            "only {} of {} clients got an answer",
            before.len(),
            clients.len()
        );
    }
    let by_node = lab.sessions_by_node(&ALL_SERVICES)?;
    let nodes_of = |c: &IpAddr| by_node.values().filter(|s| s.contains(c)).count();
    say("client -> backend (nodes its connections went through):");
    clients_table(&clients, |c| {
        format!(
            "{} ({})",
            before.get(c).map_or("-", String::as_str),
            nodes_of(c)
        )
    });
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for b in before.values() {
        *per_backend.entry(b).or_default() += 1;
    }
    let spread: Vec<String> = (1..=3)
        .map(|n| {
            let k = clients.iter().filter(|c| nodes_of(c) == n).count();
            format!("{k} on {n}")
        })
        .collect();
    say(&format!(
        "Clients per backend: {}. Clients by nodes used: {}.",
        join(per_backend.iter().map(|(b, n)| format!("{b} {n}"))),
        spread.join(", ")
    ));
    say("Every node computes the same Maglev table, so each client sticks to one backend.");

    step(
        3,
        "xlb backend add <svc> be4 on node 1, for all four services",
    );
    let t = Instant::now();
    lab.add_backend_everywhere(1, "be4", 4)?;
    let added = t.elapsed();
    say(&format!(
        "Node 1 took the change in {added:.1?}; it replicates it to the others:"
    ));
    let seen = wait_backend_everywhere(&lab, "be4", t)?;
    say(&format!(
        "{:<6} {:<28} {:<28}",
        "node", "be4 in `backend list` after", "be4 active (health) after"
    ));
    for (i, (listed, active)) in &seen {
        say(&format!(
            "{:<6} {:<28} {:<28}",
            format!("lb{i}"),
            format!("{listed:.1?} (all 4 services)"),
            format!("{active:.1?}")
        ));
    }
    lab.wait_cluster(SPREAD_TIMEOUT)?;
    let s1 = lab.cluster_status(1)?;
    say(&format!(
        "All nodes agree again: version {}, fingerprint {}.",
        s1["version"].as_str().unwrap_or("-"),
        s1["fingerprint"].as_str().unwrap_or("-")
    ));
    let (answers, stable) = wait_divergence_agrees(&lab, &clients, &before)?;
    say("Adding be4 changes some clients' Maglev answer. Their sessions keep the old backend,");
    say("and the nodes replicate those sessions, so every node answers alike (sessions where):");
    say(&format!(
        "{:<6} {:<26} {:<26} {:<26}",
        "node", "Maglev answer changed", "kept by a session", "answer = probed backend"
    ));
    for (i, a) in &answers {
        let changed = a
            .iter()
            .filter(|(c, x)| before.get(*c) != Some(&x.maglev_backend))
            .count();
        let divergent = a.values().filter(|x| x.divergent()).count();
        let same = a
            .iter()
            .filter(|(c, x)| before.get(*c) == Some(&x.backend))
            .count();
        say(&format!(
            "{:<6} {:<26} {:<26} {:<26}",
            format!("lb{i}"),
            changed,
            divergent,
            format!("{same} of {}", clients.len())
        ));
    }
    if !stable {
        say("(the nodes did not all agree within the time budget: the table shows the last look)");
    }
    std::thread::sleep(Duration::from_secs(1));
    let moved = moved_clients(&probers.snapshot(), &before);
    say(&format!(
        "Probes since step 2: {moved} clients changed backend."
    ));

    step(
        4,
        "node 2 dies silently (its link is cut, daemon and BIRD killed; no BGP withdraw)",
    );
    let cut = lab.kill_node(2)?;
    say(&format!(
        "{:<10} {:<32} {:<14}",
        "VIP", "next hops", "after the cut"
    ));
    let mut slowest = Duration::ZERO;
    for vip in lab.vips() {
        let (hops, _) = lab.wait_next_hops(vip, 2, CONVERGE_TIMEOUT)?;
        let took = cut.elapsed();
        slowest = slowest.max(took);
        say(&format!(
            "{:<10} {:<32} {:<14}",
            vip.to_string(),
            join(hops.iter().map(|h| node_name(&lab, *h))),
            format!("{took:.0?}")
        ));
    }
    say(&format!(
        "BFD noticed the silence; the router dropped node 2 {slowest:.0?} after the cut."
    ));
    std::thread::sleep(AFTER_DEATH);
    let probed = probers.elapsed();
    let records = probers.stop();
    let s = Summary::of(&records);
    let moved = moved_clients(&records, &before);
    say(&format!(
        "Probes over {probed:.0?} ({} TCP connections, {} UDP flows, {} answers):",
        s.tcp, s.udp, s.answered
    ));
    say(&format!(
        "{:<18} {:<16} {:<16} {:<20}",
        "connections reset", "backend changes", "clients moved", "failed probes"
    ));
    say(&format!(
        "{:<18} {:<16} {:<16} {:<20}",
        s.resets + s.eofs,
        s.changed_backend,
        moved,
        format!(
            "{} (tcp {}, udp {})",
            s.failed(),
            s.tcp_timeouts + s.resets + s.eofs + s.errors,
            s.udp_timeouts
        )
    ));
    say("Failed probes are questions sent through node 2 before the router dropped it: TCP");
    say("retransmits them through a live node (late, not lost); such a UDP question is lost.");

    step(
        STEPS,
        "cleaning up: daemons, BIRDs and servers stopped, namespaces and pins removed",
    );
    let total = started.elapsed();
    let t = Instant::now();
    drop(lab);
    say(&format!("removed in {:.1?}", t.elapsed()));
    println!(
        "done in {total:.0?}: be4 joined through one node, a node died; {} resets, {} backend changes, \
         {moved} clients moved.",
        s.resets + s.eofs,
        s.changed_backend
    );
    Ok(())
}

/// Prints the router's next hops for both VIPs.
fn next_hops_table(lab: &ClusterLab) -> Result<()> {
    say(&format!("{:<10} {}", "VIP", "router's ECMP next hops"));
    for vip in lab.vips() {
        let hops = lab.router_next_hops(vip)?;
        say(&format!(
            "{:<10} {}",
            vip.to_string(),
            join(hops.iter().map(|h| node_name(lab, *h)))
        ));
    }
    Ok(())
}

/// `lb<i> (address)` for a next hop.
fn node_name(lab: &ClusterLab, hop: IpAddr) -> String {
    match lab.node_of(hop) {
        Some(i) => format!("lb{i} {hop}"),
        None => hop.to_string(),
    }
}

/// Prints each live node's `xlb cluster status`: version, fingerprint, synced, peers live.
fn status_table(lab: &ClusterLab) -> Result<()> {
    say(&format!(
        "{:<6} {:<9} {:<18} {:<7} {:<10}",
        "node", "version", "fingerprint", "synced", "peers live"
    ));
    for i in lab.alive_nodes() {
        let s = lab.cluster_status(i)?;
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        let live = peers.iter().filter(|p| p["state"] == "live").count();
        say(&format!(
            "{:<6} {:<9} {:<18} {:<7} {:<10}",
            format!("lb{i}"),
            s["version"].as_str().unwrap_or("-"),
            s["fingerprint"].as_str().unwrap_or("-"),
            if s["synced"] == true { "yes" } else { "no" },
            format!("{live} of {}", peers.len())
        ));
    }
    Ok(())
}

/// Prints `(client, cell)` pairs four to a line.
fn clients_table(clients: &[IpAddr], cell: impl Fn(&IpAddr) -> String) {
    for row in clients.chunks(4) {
        let line: Vec<String> = row
            .iter()
            .map(|c| format!("{:<12} {:<9}", c.to_string(), cell(c)))
            .collect();
        say(line.join("  ").trim_end());
    }
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// Waits until every live node's `backend list` names `name` in every service, and
/// then shows it active (health checks passed) in every service; returns, per node, the
/// time since `since` of both.
fn wait_backend_everywhere(
    lab: &ClusterLab,
    name: &str,
    since: Instant,
) -> Result<BTreeMap<usize, (Duration, Duration)>> {
    let nodes = lab.alive_nodes();
    let mut listed: BTreeMap<usize, Duration> = BTreeMap::new();
    let mut active: BTreeMap<usize, Duration> = BTreeMap::new();
    // Bounded by SPREAD_TIMEOUT; each look is one CLI call per node not done yet.
    while active.len() < nodes.len() {
        let pending: Vec<usize> = nodes
            .iter()
            .copied()
            .filter(|i| !active.contains_key(i))
            .collect();
        for i in pending {
            let list = lab.node_cli(i, &["backend", "list"])?;
            let mine: Vec<&serde_json::Value> = list
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["name"] == name)
                .collect();
            if mine.len() == SERVICES.len() {
                listed.entry(i).or_insert_with(|| since.elapsed());
                if mine.iter().all(|b| b["state"] == "active") {
                    active.insert(i, since.elapsed());
                }
            }
        }
        if since.elapsed() > SPREAD_TIMEOUT && active.len() < nodes.len() {
            bail!(
                "{name} is not listed and active in every service of every node after \
                 {SPREAD_TIMEOUT:?} (listed on {listed:?}, active on {active:?})"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(nodes
        .iter()
        .filter_map(|i| Some((*i, (*listed.get(i)?, *active.get(i)?))))
        .collect())
}

/// Each live node's answers for every client, once every node has the same divergent
/// clients and answers each client's probed backend (true), or the last look when the
/// time budget ran out (false).
#[allow(clippy::type_complexity)]
fn wait_divergence_agrees(
    lab: &ClusterLab,
    clients: &[IpAddr],
    before: &BTreeMap<IpAddr, String>,
) -> Result<(BTreeMap<usize, BTreeMap<IpAddr, Answer>>, bool)> {
    let start = Instant::now();
    // Bounded by SPREAD_TIMEOUT; each look is one CLI call per node and client.
    loop {
        let mut all = BTreeMap::new();
        for i in lab.alive_nodes() {
            all.insert(i, lab.answers(i, clients)?);
        }
        let divergent: BTreeSet<Vec<&IpAddr>> = all
            .values()
            .map(|a| {
                a.iter()
                    .filter(|(_, x)| x.divergent())
                    .map(|(c, _)| c)
                    .collect()
            })
            .collect();
        let faithful = all
            .values()
            .all(|a| a.iter().all(|(c, x)| before.get(c) == Some(&x.backend)));
        if divergent.len() == 1 && faithful {
            return Ok((all, true));
        }
        if start.elapsed() > SPREAD_TIMEOUT {
            return Ok((all, false));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Clients that some connection or flow saw answered by another backend than `before`.
fn moved_clients(records: &[ProbeRecord], before: &BTreeMap<IpAddr, String>) -> usize {
    let moved: BTreeSet<IpAddr> = records
        .iter()
        .filter(|r| r.backends.iter().any(|b| before.get(&r.client) != Some(b)))
        .map(|r| r.client)
        .collect();
    moved.len()
}
