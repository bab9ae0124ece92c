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

use xlb_tests::Proto;
use xlb_tests::cluster_lab::{ClusterLab, ClusterOptions};
use xlb_tests::daemon::assert_root;
use xlb_tests::probes::{ProbeOptions, ProbeRecord, Probers, Summary, failure_lines};

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

/// Prints the summary and the failures (one line each), returns the summary.
fn report(what: &str, records: &[ProbeRecord]) -> Summary {
    let s = Summary::of(records);
    eprintln!("{what}: {s}");
    for line in failure_lines(records) {
        eprintln!("  failed probe: {line}");
    }
    s
}

/// The backend each client's connections and flows reached (one per client, asserted).
fn backend_per_client(records: &[ProbeRecord]) -> BTreeMap<IpAddr, String> {
    let mut out: BTreeMap<IpAddr, String> = BTreeMap::new();
    for r in records {
        for b in &r.backends {
            let first = out.entry(r.client).or_insert_with(|| b.clone());
            assert_eq!(first, b, "client {} reached two backends", r.client);
        }
    }
    out
}

/// Node index -> clients with a session in `service` on that node (`xlb sessions list`).
fn sessions_by_node(lab: &ClusterLab, services: &[&str]) -> BTreeMap<usize, BTreeSet<IpAddr>> {
    let mut out = BTreeMap::new();
    for n in lab.nodes.iter().filter(|n| n.alive()) {
        let mut clients = BTreeSet::new();
        for svc in services {
            let list = lab
                .node_cli(n.index, &["sessions", "list", "--service", svc])
                .expect("sessions list");
            for s in list.as_array().into_iter().flatten() {
                let c: IpAddr = s["client"].as_str().expect("client").parse().expect("ip");
                clients.insert(c);
            }
        }
        out.insert(n.index, clients);
    }
    out
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
