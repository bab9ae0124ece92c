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

use xlb_tests::cluster_lab::{ClusterLab, ClusterOptions, SERVICES, backend_v4, backend_v6};
use xlb_tests::daemon::assert_root;
use xlb_tests::probes::{ProbeOptions, ProbeRecord, Probers, Summary, failure_lines};

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
    lab.node_cli(i, &["cluster", "status"])
        .expect("cluster status")
}

/// Waits until every live node is synced, sees every other live node live, and all run
/// one version with one fingerprint.
fn wait_cluster(lab: &ClusterLab, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let alive: Vec<usize> = lab
        .nodes
        .iter()
        .filter(|n| n.alive())
        .map(|n| n.index)
        .collect();
    loop {
        let all: Vec<serde_json::Value> = alive.iter().map(|i| status(lab, *i)).collect();
        let agreed = all.iter().all(|s| {
            s["synced"] == true
                && s["version"] == all[0]["version"]
                && s["fingerprint"] == all[0]["fingerprint"]
                && s["round"].is_null()
                && s["peers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| alive.contains(&(p["id"].as_u64().unwrap_or(0) as usize)))
                    .all(|p| p["state"] == "live")
        });
        if agreed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster did not agree within {timeout:?}: {all:#?}\n{}",
            lab.debug_dump()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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
    let mut out: BTreeMap<IpAddr, String> = BTreeMap::new();
    for r in records {
        for b in &r.backends {
            let first = out.entry(r.client).or_insert_with(|| b.clone());
            assert_eq!(first, b, "client {} reached two backends", r.client);
        }
    }
    out
}

fn http_service(client: IpAddr) -> &'static str {
    if client.is_ipv4() {
        "http-v4"
    } else {
        "http-v6"
    }
}

/// What node `i` answers each client of the http services (`xlb sessions where`):
/// backend, whether a session decides, and the live Maglev answer.
fn answers(lab: &ClusterLab, i: usize, clients: &[IpAddr]) -> BTreeMap<IpAddr, (String, String)> {
    clients
        .iter()
        .map(|c| {
            let cs = c.to_string();
            let w = lab
                .node_cli(
                    i,
                    &["sessions", "where", &cs, "--service", http_service(*c)],
                )
                .expect("sessions where");
            let row = &w[0];
            (
                *c,
                (
                    row["backend"].as_str().unwrap_or("-").to_string(),
                    row["maglev_backend"].as_str().unwrap_or("-").to_string(),
                ),
            )
        })
        .collect()
}

fn add_everywhere(lab: &ClusterLab, node: usize, name: &str, b: usize) {
    for svc in SERVICES {
        let addr: IpAddr = if svc.ends_with("v4") {
            backend_v4(b).into()
        } else {
            backend_v6(b).into()
        };
        lab.add_backend(node, svc, name, addr).expect("backend add");
    }
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
            .filter(|(c, (b, _))| before.get(c) != Some(b))
            .count();
        let divergent = a.iter().filter(|(_, (b, m))| b != m).count();
        eprintln!("node {i}: {differ} differ from probes, {divergent} divergent");
        eprintln!("{}", status(&lab, i));
    }
    eprintln!("{}", lab.nodes[0].daemon_log());
    let _ = (s, BTreeSet::<u8>::new());
}
