//! The cluster: three xlb nodes behind a BIRD 2 router (BGP, BFD 100 ms × 3, ECMP with
//! layer-4 hashing), identical configs and no replication. Because every node computes
//! the same Maglev table, a client reaches the same backend whichever node the router
//! hashes a connection to: connections survive a node dying, a node leaving on SIGTERM
//! and a node coming back.
//!
//! Needs root and bird2 (`cargo xtask setup`); run alone:
//! `cargo test --release -p xlb-tests --test e2e_cluster -- --test-threads=1`.
//! Everything (namespaces, daemons, BIRDs, pins, files) is removed on drop, also when an
//! assertion fails; the router's and nodes' BIRD state is printed then.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use xlb_tests::cluster_lab::{ClusterLab, ClusterOptions};
use xlb_tests::daemon::assert_root;
use xlb_tests::probes::{self, ProbeOptions, ProbeRecord, Probers, report};

/// The lab tag of this tier (namespaces `xlb-cluster-*`).
const TAG: &str = "cluster";
/// BFD detects a silent death in 300 ms; BIRD and the kernel add little.
const CONVERGE_BOUND: Duration = Duration::from_secs(2);

fn lab() -> ClusterLab {
    assert_root();
    ClusterLab::new(TAG, ClusterOptions::default()).expect("cluster lab")
}

fn probers(lab: &ClusterLab, opts: &ProbeOptions) -> Probers {
    Probers::start(&lab.client, &lab.client_addrs(), ClusterLab::vip_for, opts).expect("probers")
}

/// The backend each client's connections and flows reached (one per client, asserted).
fn backend_per_client(records: &[ProbeRecord]) -> BTreeMap<IpAddr, String> {
    probes::backend_per_client(records).expect("one backend per client")
}

/// Node index -> clients with a session in `services` on that node (`xlb sessions list`).
fn sessions_by_node(lab: &ClusterLab, services: &[&str]) -> BTreeMap<usize, BTreeSet<IpAddr>> {
    lab.sessions_by_node(services).expect("sessions list")
}

#[test]
fn steady_state_spreads_clients_over_nodes_and_keeps_them_on_one_backend() {
    let lab = lab();
    for vip in lab.vips() {
        let hops = lab.router_next_hops(vip).expect("next hops");
        assert_eq!(hops.len(), 3, "{vip}: {hops:?}\n{}", lab.debug_dump());
    }
    let opts = ProbeOptions {
        tcp_per_client: 4,
        udp_per_client: 1,
        ..ProbeOptions::default()
    };
    let p = probers(&lab, &opts);
    std::thread::sleep(Duration::from_secs(2));
    let records = p.stop();
    let s = report("steady state", &records);
    assert_eq!(s.tcp, 64 * 4, "{s}");
    assert_eq!(s.failed(), 0, "{s}");
    assert_eq!(s.changed_backend, 0, "{s}");
    assert_eq!(
        s.split_clients, 0,
        "every connection of a client on one backend: {s}"
    );
    let backends = backend_per_client(&records);
    assert_eq!(backends.len(), 64);
    let used: BTreeSet<&String> = backends.values().collect();
    eprintln!("backends used by the 64 clients: {used:?}");

    // Layer-4 hashing: one client's connections land on several nodes. Each node that
    // saw a packet of a client holds a session for it.
    let by_node = sessions_by_node(&lab, &["http-v4", "http-v6"]);
    for (node, clients) in &by_node {
        eprintln!(
            "node lb{node}: sessions of {} clients (http)",
            clients.len()
        );
        assert!(!clients.is_empty(), "node lb{node} got no connection");
    }
    let nodes_per_client: BTreeMap<IpAddr, usize> = backends
        .keys()
        .map(|c| (*c, by_node.values().filter(|s| s.contains(c)).count()))
        .collect();
    let spread = nodes_per_client.values().filter(|n| **n > 1).count();
    eprintln!("clients whose 4 connections reached more than one node: {spread} of 64");
    // With 4 connections hashed over 3 nodes, 1 in 27 clients lands on one node only.
    assert!(
        spread >= 48,
        "layer-4 spreading: only {spread} of 64 clients on >1 node"
    );

    // Every node that knows a client answers the same backend for it, the one it serves.
    let mut checked = 0;
    for (client, want) in &backends {
        let svc = if client.is_ipv4() {
            "http-v4"
        } else {
            "http-v6"
        };
        for (node, clients) in &by_node {
            if !clients.contains(client) {
                continue;
            }
            let c = client.to_string();
            let w = lab
                .node_cli(*node, &["sessions", "where", &c, "--service", svc])
                .expect("sessions where");
            let row = &w[0];
            assert_eq!(row["source"], "session", "lb{node} {client}: {w}");
            assert_eq!(
                row["backend"].as_str(),
                Some(want.as_str()),
                "lb{node} {client}: {w}"
            );
            checked += 1;
        }
    }
    eprintln!("sessions where: {checked} (node, client) pairs agree with the served backend");
}

/// Probing long enough around an event for TCP to retransmit what was lost.
fn event_probe_options() -> ProbeOptions {
    ProbeOptions {
        tcp_per_client: 4,
        udp_per_client: 1,
        every: Duration::from_millis(200),
        timeout: Duration::from_secs(3),
        max_duration: Duration::from_secs(40),
        ..ProbeOptions::default()
    }
}

/// Waits for `n` next hops of both VIPs; returns the slower time, measured from `since`.
fn converged(lab: &ClusterLab, n: usize, since: Instant, timeout: Duration) -> Duration {
    let mut slowest = Duration::ZERO;
    for vip in lab.vips() {
        lab.wait_next_hops(vip, n, timeout)
            .expect("router converges");
        let took = since.elapsed();
        eprintln!("router: {n} next hops for {vip} {took:?} after the event");
        slowest = slowest.max(took);
    }
    slowest
}

#[test]
fn a_silent_node_death_is_detected_by_bfd_and_breaks_no_connection() {
    let mut lab = lab();
    let p = probers(&lab, &event_probe_options());
    std::thread::sleep(Duration::from_secs(1));
    let cut = lab.kill_node(2).expect("kill lb2");
    eprintln!("lb2 killed at {:?} on the probers' clock", p.elapsed());
    // Polls every 5 ms: the figure is the router's kernel route, not BIRD's view.
    let took = converged(&lab, 2, cut, Duration::from_secs(10));
    eprintln!("convergence after a silent death (link removed): {took:?}");
    for vip in lab.vips() {
        let hops = lab.router_next_hops(vip).expect("hops");
        assert!(
            hops.iter().all(|h| lab.node_of(*h) != Some(2)),
            "{vip}: {hops:?}"
        );
    }
    // TCP retransmits what the dead node swallowed (RTO ≥ 200 ms, doubling).
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("probes stopped at {:?} on the probers' clock", p.elapsed());
    let records = p.stop();
    let s = report("node death", &records);
    assert!(
        took < CONVERGE_BOUND,
        "convergence took {took:?}\n{}",
        lab.debug_dump()
    );
    assert_eq!(s.resets + s.eofs + s.errors, 0, "{s}");
    assert_eq!(s.changed_backend, 0, "{s}");
    assert_eq!(s.split_clients, 0, "{s}");
    // Probes hashed to lb2 before the router knew it was gone got no answer in time.
    eprintln!(
        "failed probes during the death: {} tcp timeouts, {} udp timeouts",
        s.tcp_timeouts, s.udp_timeouts
    );
}

#[test]
fn sigterm_withdraws_the_node_before_it_stops_and_no_probe_fails() {
    let mut lab = lab();
    let p = probers(&lab, &event_probe_options());
    std::thread::sleep(Duration::from_secs(1));
    let sent = lab.sigterm_daemon(3).expect("SIGTERM lb3");
    // Watch the router and the daemon together: the routes must leave the router while
    // lb3's dataplane (and BIRD) still carries what the router sends it.
    let mut withdrawn: BTreeMap<IpAddr, Duration> = BTreeMap::new();
    let mut exited = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while (withdrawn.len() < 2 || exited.is_none()) && Instant::now() < deadline {
        for vip in lab.vips() {
            if let std::collections::btree_map::Entry::Vacant(slot) = withdrawn.entry(vip) {
                let hops = lab.router_next_hops(vip).expect("hops");
                if hops.iter().all(|h| lab.node_of(*h) != Some(3)) {
                    slot.insert(sent.elapsed());
                }
            }
        }
        if exited.is_none() && lab.daemon_exited(3).expect("poll").is_some() {
            exited = Some(sent.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (status, log) = lab
        .wait_daemon_exit(3, Duration::from_secs(5))
        .expect("lb3 exits");
    assert!(status.success(), "{status}\n{log}");
    assert_eq!(
        log.matches("the daemon is stopping").count(),
        2,
        "one withdraw per VIP:\n{log}"
    );
    for (vip, at) in &withdrawn {
        eprintln!("router: lb3 withdrawn for {vip} {at:?} after SIGTERM");
    }
    eprintln!("lb3's daemon exited {exited:?} after SIGTERM");
    assert_eq!(
        withdrawn.len(),
        2,
        "lb3 still a next hop\n{}",
        lab.debug_dump()
    );
    for vip in lab.vips() {
        assert_eq!(lab.router_next_hops(vip).expect("hops").len(), 2, "{vip}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let records = p.stop();
    let s = report("SIGTERM", &records);
    assert_eq!(
        s.failed(),
        0,
        "no probe may fail when a node leaves in order: {s}"
    );
    assert_eq!(s.changed_backend, 0, "{s}");
    assert_eq!(s.split_clients, 0, "{s}");
}

#[test]
fn a_restarted_node_comes_back_as_next_hop_and_no_client_moves() {
    let mut lab = lab();
    let p = probers(&lab, &event_probe_options());
    std::thread::sleep(Duration::from_secs(1));
    let cut = lab.kill_node(1).expect("kill lb1");
    eprintln!("lb1 killed at {:?} on the probers' clock", p.elapsed());
    converged(&lab, 2, cut, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    eprintln!("lb1 restarted at {:?} on the probers' clock", p.elapsed());
    lab.restart_node(1).expect("restart lb1");
    let daemon_up = start.elapsed();
    let took = converged(&lab, 3, start, Duration::from_secs(20));
    lab.wait_all_next_hops(Duration::from_secs(1))
        .expect("lb1 among the next hops");
    eprintln!("restart: daemon answering after {daemon_up:?}, lb1 a next hop again after {took:?}");
    std::thread::sleep(Duration::from_secs(2));
    let records = p.stop();
    let s = report("death and restart", &records);
    assert_eq!(s.resets + s.eofs + s.errors, 0, "{s}");
    assert_eq!(s.changed_backend, 0, "{s}");
    assert_eq!(s.split_clients, 0, "{s}");
    // The restarted node carries traffic again, and agrees on the backends.
    let by_node = sessions_by_node(&lab, &["http-v4", "http-v6"]);
    let on_lb1 = by_node.get(&1).map_or(0, BTreeSet::len);
    eprintln!("restarted lb1 holds sessions of {on_lb1} clients");
    assert!(on_lb1 > 0, "no connection moved to the restarted lb1");
    let backends = backend_per_client(&records);
    let list = lab
        .node_cli(1, &["sessions", "list"])
        .expect("sessions list");
    for sess in list.as_array().into_iter().flatten() {
        let c: IpAddr = sess["client"]
            .as_str()
            .expect("client")
            .parse()
            .expect("ip");
        if let Some(want) = backends.get(&c) {
            assert_eq!(sess["backend"].as_str(), Some(want.as_str()), "lb1 {sess}");
        }
    }
}

#[test]
fn backends_can_be_added_and_removed_through_a_node_cli() {
    let lab = lab();
    // be3 out of http-v4 on lb1 only: that node no longer lists it; the others still do.
    lab.remove_backend(1, "http-v4", "be3").expect("remove");
    let names = |i: usize| -> Vec<String> {
        let list = lab
            .node_cli(i, &["backend", "list", "http-v4"])
            .expect("list");
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["name"].as_str().map(str::to_owned))
            .collect()
    };
    assert!(!names(1).contains(&"be3".to_string()), "{:?}", names(1));
    assert!(names(2).contains(&"be3".to_string()), "{:?}", names(2));
    let addr: IpAddr = "10.77.0.23".parse().expect("ip");
    lab.add_backend(1, "http-v4", "be3", addr).expect("add");
    assert!(names(1).contains(&"be3".to_string()), "{:?}", names(1));
}
