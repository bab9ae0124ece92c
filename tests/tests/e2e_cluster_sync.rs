//! The replicated cluster: three xlb nodes with `[cluster]` behind a BIRD 2 router (BGP,
//! BFD, ECMP, layer-4 hashing). Where `e2e_cluster` shows that Maglev alone keeps nodes
//! in agreement while nothing changes, this tier changes things — a backend added on one
//! node, a node dying or rejoining, a backend failing — and checks that every node still
//! answers every client the same way: the clients the change makes divergent keep their
//! backend whichever node their next connection hits.
//!
//! Needs root and bird2 (`cargo xtask setup`); run alone:
//! `cargo test --release -p xlb-tests --test e2e_cluster_sync -- --test-threads=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use xlb_tests::cluster_lab::{ClusterLab, ClusterOptions};
use xlb_tests::cluster_ops::Answer;
use xlb_tests::daemon::assert_root;
use xlb_tests::probes::{self, ProbeOptions, ProbeRecord, Probers, Summary, failure_lines};

/// The lab tag of this tier (namespaces `xlb-csync-*`).
const TAG: &str = "csync";

fn lab() -> ClusterLab {
    assert_root();
    let lab = ClusterLab::new(
        TAG,
        ClusterOptions {
            backends: 4,
            configured: Some(3),
            cluster: true,
            ..ClusterOptions::default()
        },
    )
    .expect("cluster lab");
    wait_cluster(&lab, Duration::from_secs(15));
    lab
}

/// `xlb cluster status --json` of node `i`.
fn status(lab: &ClusterLab, i: usize) -> serde_json::Value {
    lab.cluster_status(i).expect("cluster status")
}

/// Waits until the live nodes agree (synced, one version and fingerprint, peers live).
fn wait_cluster(lab: &ClusterLab, timeout: Duration) {
    lab.wait_cluster(timeout).expect("the cluster agrees");
}

fn probers(lab: &ClusterLab, opts: &ProbeOptions) -> Probers {
    Probers::start(&lab.client, &lab.client_addrs(), ClusterLab::vip_for, opts).expect("probers")
}

fn report(what: &str, records: &[ProbeRecord]) -> Summary {
    let s = Summary::of(records);
    eprintln!("{what}: {s}");
    for line in failure_lines(records).into_iter().take(20) {
        eprintln!("  failed probe: {line}");
    }
    s
}

/// The backend each client reached (one per client, asserted).
fn backend_per_client(records: &[ProbeRecord]) -> BTreeMap<IpAddr, String> {
    probes::backend_per_client(records).expect("one backend per client")
}

/// What node `i` answers each client of the http services (`xlb sessions where`).
fn answers(lab: &ClusterLab, i: usize, clients: &[IpAddr]) -> BTreeMap<IpAddr, Answer> {
    lab.answers(i, clients).expect("sessions where")
}

fn add_everywhere(lab: &ClusterLab, node: usize, name: &str, b: usize) {
    lab.add_backend_everywhere(node, name, b)
        .expect("backend add");
}

#[test]
fn smoke() {
    let lab = lab();
    for i in 1..=3 {
        eprintln!("{}", status(&lab, i));
    }
    let p = probers(&lab, &ProbeOptions::default());
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    add_everywhere(&lab, 2, "be4", 4);
    eprintln!("added in {:?}", t.elapsed());
    std::thread::sleep(Duration::from_secs(5));
    wait_cluster(&lab, Duration::from_secs(10));
    let records = p.stop();
    let s = report("add", &records);
    let clients = lab.client_addrs();
    let before = backend_per_client(&records);
    for i in 1..=3 {
        let a = answers(&lab, i, &clients);
        let differ = a
            .iter()
            .filter(|(c, a)| before.get(c) != Some(&a.backend))
            .count();
        let divergent = a.values().filter(|a| a.divergent()).count();
        eprintln!("node {i}: {differ} differ from probes, {divergent} divergent");
        eprintln!("{}", status(&lab, i));
    }
    eprintln!("{}", lab.nodes[0].daemon_log());
    let _ = (s, BTreeSet::<u8>::new());
}
