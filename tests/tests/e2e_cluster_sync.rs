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

use xlb_tests::cluster_lab::{
    CLUSTER_KEY, CLUSTER_PORT, ClusterLab, ClusterOptions, SERVICES, backend_v6, node_v4,
};
use xlb_tests::cluster_ops::Answer;
use xlb_tests::daemon::assert_root;
use xlb_tests::probes::{self, ProbeOptions, ProbeRecord, Probers, Summary, report};

/// The lab tag of this tier (namespaces `xlb-csync-*`).
const TAG: &str = "csync";

fn lab() -> ClusterLab {
    assert_root();
    let lab = ClusterLab::new(TAG, ClusterOptions::replicated()).expect("cluster lab");
    wait_cluster(&lab, Duration::from_secs(15));
    lab
}

/// `xlb cluster status --json` of node `i`.
fn status(lab: &ClusterLab, i: usize) -> serde_json::Value {
    lab.cluster_status(i).expect("cluster status")
}

/// Waits until every live node is synced, sees the others live, and all run one
/// version with one fingerprint.
fn wait_cluster(lab: &ClusterLab, timeout: Duration) {
    if let Err(e) = lab.wait_cluster(timeout) {
        panic!("{e:#}\n{}", lab.debug_dump());
    }
}

fn probers(lab: &ClusterLab, opts: &ProbeOptions) -> Probers {
    Probers::start(&lab.client, &lab.client_addrs(), ClusterLab::vip_for, opts).expect("probers")
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

/// `state` of backend `name` of `service` on node `i` ("active", "down", ...).
fn backend_state(lab: &ClusterLab, i: usize, service: &str, name: &str) -> String {
    let list = lab
        .node_cli(i, &["backend", "list", service])
        .expect("backend list");
    list.as_array()
        .into_iter()
        .flatten()
        .find(|b| b["name"] == name)
        .and_then(|b| b["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

/// Waits until every live node has backend `name` in `state` in every service.
fn wait_backend(lab: &ClusterLab, name: &str, state: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let states: Vec<(usize, &str, String)> = lab
            .nodes
            .iter()
            .filter(|n| n.alive())
            .flat_map(|n| SERVICES.iter().map(move |s| (n.index, *s)))
            .map(|(i, s)| (i, s, backend_state(lab, i, s, name)))
            .collect();
        if states.iter().all(|(_, _, st)| st == state) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{name} not {state} everywhere within {timeout:?}: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every live node's answers for every client; asserts they are one answer per client
/// and returns it with the number of clients whose backend differs from the Maglev answer.
fn agreed_answers(lab: &ClusterLab) -> (BTreeMap<IpAddr, String>, usize) {
    let clients = lab.client_addrs();
    let mut agreed: Option<BTreeMap<IpAddr, Answer>> = None;
    for n in lab.nodes.iter().filter(|n| n.alive()) {
        let a = answers(lab, n.index, &clients);
        match &agreed {
            None => agreed = Some(a),
            Some(first) => {
                for (c, x) in &a {
                    assert_eq!(
                        Some(&x.backend),
                        first.get(c).map(|f| &f.backend),
                        "node lb{} answers {c} otherwise than the first node",
                        n.index
                    );
                }
            }
        }
    }
    let agreed = agreed.expect("a live node");
    let divergent = agreed.values().filter(|a| a.divergent()).count();
    (
        agreed.into_iter().map(|(c, a)| (c, a.backend)).collect(),
        divergent,
    )
}

/// New connections (new source ports, so new ECMP hashes) from every client for a
/// moment: the backend each reached.
fn fresh_connections(lab: &ClusterLab) -> BTreeMap<IpAddr, String> {
    let p = probers(
        lab,
        &ProbeOptions {
            tcp_per_client: 6,
            // One flow each: the UDP services need sessions too, or their clients follow
            // the table while the same clients' HTTP sessions keep theirs.
            udp_per_client: 1,
            every: Duration::from_millis(300),
            timeout: Duration::from_secs(2),
            max_duration: Duration::from_secs(10),
            // Beside long-lived probers that use the default ports.
            udp_base_port: 42000,
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    let records = p.stop();
    let s = report("fresh connections", &records);
    assert_eq!(s.tcp_timeouts, 0, "{s}");
    s.assert_unbroken();
    backend_per_client(&records)
}

/// A backend added on one node, checked and then taking clients: the clients whose
/// Maglev answer it changes keep their backend on every node.
fn add_be4(lab: &ClusterLab, on: usize) -> (BTreeMap<IpAddr, String>, usize) {
    // Sessions first: a client without one has nothing to keep.
    let served = fresh_connections(lab);
    let (before, divergent_before) = agreed_answers(lab);
    assert_eq!(
        served, before,
        "the nodes' answers are not what the clients got"
    );
    let t = Instant::now();
    add_everywhere(lab, on, "be4", 4);
    eprintln!(
        "be4 added through lb{on} in {:?} (four services)",
        t.elapsed()
    );
    let up = wait_backend(lab, "be4", "active", Duration::from_secs(15));
    eprintln!("be4 active on every node {up:?} later");
    wait_cluster(lab, Duration::from_secs(10));
    let (after, divergent) = agreed_answers(lab);
    eprintln!("divergent clients (http): {divergent_before} before the add, {divergent} after");
    assert_eq!(after, before, "a client's backend changed on the add");
    assert!(
        divergent > divergent_before,
        "the add made no client divergent: the test proves nothing"
    );
    (before, divergent)
}

fn totals(lab: &ClusterLab) -> String {
    lab.nodes
        .iter()
        .filter(|n| n.alive())
        .map(|n| {
            let s = status(lab, n.index);
            format!(
                "lb{}: version {}, sessions sent {} received {} imported {}, bytes sent {} received {}",
                n.index,
                s["version"],
                s["sessions_sent"],
                s["sessions_received"],
                s["sessions_imported"],
                s["bytes_sent"],
                s["bytes_received"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_backend_added_on_one_node_reaches_every_node_and_moves_no_client() {
    let lab = lab();
    let p = probers(&lab, &ProbeOptions::default());
    std::thread::sleep(Duration::from_secs(2));
    let (before, _) = add_be4(&lab, 1);
    for i in 2..=3 {
        for svc in SERVICES {
            assert_eq!(backend_state(&lab, i, svc, "be4"), "active", "lb{i} {svc}");
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let records = p.stop();
    let s = report("backend add", &records);
    assert_eq!(s.failed(), 0, "{s}");
    s.assert_unbroken();
    assert_eq!(backend_per_client(&records), before);
    // New connections hash to nodes that may never have seen the client.
    assert_eq!(fresh_connections(&lab), before);
    eprintln!("replication:\n{}", totals(&lab));
}

/// Probes every client through `event` (which returns when it happened): waits for
/// the router to drop to 2 next hops of both VIPs, lets TCP retransmit for `settle`,
/// then asserts no connection was reset or moved and every client kept `before`.
/// Returns the probe summary and the time from the event to the router's convergence.
fn through_event(
    lab: &mut ClusterLab,
    what: &str,
    before: &BTreeMap<IpAddr, String>,
    settle: Duration,
    event: impl FnOnce(&mut ClusterLab) -> Instant,
) -> (Summary, Duration) {
    let p = probers(lab, &ProbeOptions::default());
    std::thread::sleep(Duration::from_secs(1));
    let at = event(lab);
    for vip in lab.vips() {
        lab.wait_next_hops(vip, 2, Duration::from_secs(10))
            .expect("router converges");
    }
    // wait_next_hops polls every few ms: this is the convergence time within that.
    let took = at.elapsed();
    eprintln!("{what}: the router has 2 next hops {took:?} after the event");
    std::thread::sleep(settle);
    let records = p.stop();
    let s = report(what, &records);
    s.assert_unbroken();
    assert_eq!(&backend_per_client(&records), before);
    (s, took)
}

#[test]
fn a_node_dies_and_no_rerouted_connection_breaks_or_moves_even_divergent_ones() {
    let mut lab = lab();
    // Through lb2: a change asked of a node that is not the coordinator (lb1).
    let (before, divergent) = add_be4(&lab, 2);
    // The coordinator dies: lb2 takes over.
    let (s, took) = through_event(
        &mut lab,
        "node death",
        &before,
        Duration::from_secs(4),
        |lab| lab.kill_node(1).expect("kill lb1"),
    );
    assert!(took < Duration::from_secs(2), "convergence took {took:?}");
    eprintln!(
        "failed probes during the death: {} tcp timeouts, {} udp timeouts ({divergent} divergent clients)",
        s.tcp_timeouts, s.udp_timeouts
    );
    for i in 2..=3 {
        assert_eq!(status(&lab, i)["coordinator"], 2, "lb{i}");
    }
    assert_eq!(fresh_connections(&lab), before);
    assert_eq!(agreed_answers(&lab).0, before);
}

#[test]
fn a_rejoining_node_syncs_before_it_announces_and_moves_no_client() {
    let mut lab = lab();
    let (before, divergent) = add_be4(&lab, 1);
    let cut = lab.kill_node(3).expect("kill lb3");
    for vip in lab.vips() {
        lab.wait_next_hops(vip, 2, Duration::from_secs(10))
            .expect("router converges");
    }
    eprintln!(
        "lb3 gone from the router {:?} after its links were removed",
        cut.elapsed()
    );
    let p = probers(&lab, &ProbeOptions::default());
    std::thread::sleep(Duration::from_secs(1));
    let start = Instant::now();
    lab.restart_node(3).expect("restart lb3");
    // The moment lb3 is a next hop again it must already hold the divergent sessions.
    let vip = lab.vips()[0];
    let (_, back) = lab
        .wait_next_hops(vip, 3, Duration::from_secs(20))
        .expect("lb3 back");
    let s3 = status(&lab, 3);
    eprintln!("lb3 a next hop again {back:?} after its restart: {s3}");
    assert_eq!(s3["synced"], true, "announced before its full sync");
    let imported = s3["sessions_imported"].as_u64().unwrap_or(0);
    assert!(
        imported >= divergent as u64,
        "lb3 imported {imported} sessions, fewer than the {divergent} divergent clients"
    );
    eprintln!(
        "rejoin: lb3 synced and announced {:?} after its restart",
        start.elapsed()
    );
    lab.wait_all_next_hops(Duration::from_secs(10))
        .expect("every node a next hop");
    wait_cluster(&lab, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let records = p.stop();
    let s = report("rejoin", &records);
    s.assert_unbroken();
    assert_eq!(backend_per_client(&records), before);
    assert_eq!(agreed_answers(&lab).0, before);
    assert_eq!(fresh_connections(&lab), before);
}

#[test]
fn sigterm_withdraws_first_and_no_probe_fails() {
    let mut lab = lab();
    let (before, _) = add_be4(&lab, 3);
    let (s, _) = through_event(
        &mut lab,
        "SIGTERM",
        &before,
        Duration::from_secs(2),
        |lab| lab.sigterm_daemon(2).expect("SIGTERM lb2"),
    );
    assert_eq!(
        s.failed(),
        0,
        "no probe may fail when a node leaves in order: {s}"
    );
    let (status, log) = lab
        .wait_daemon_exit(2, Duration::from_secs(5))
        .expect("lb2 exits");
    assert!(status.success(), "{status}\n{log}");
}

#[test]
fn a_backend_failure_is_seen_alike_and_its_clients_move_together() {
    let lab = lab();
    let served = fresh_connections(&lab);
    let (before, _) = agreed_answers(&lab);
    assert_eq!(served, before);
    let on_be2: BTreeSet<IpAddr> = before
        .iter()
        .filter(|(_, b)| b.as_str() == "be2")
        .map(|(c, _)| *c)
        .collect();
    assert!(!on_be2.is_empty(), "no client on be2: {before:?}");
    let be2 = &lab.backends[1];
    be2.ip(&["link", "set", "eth0", "down"]).expect("be2 down");
    let took = wait_backend(&lab, "be2", "down", Duration::from_secs(15));
    eprintln!("be2 down on every node {took:?} after its link went down");
    wait_cluster(&lab, Duration::from_secs(10));
    let (during, _) = agreed_answers(&lab);
    for (c, b) in &during {
        if on_be2.contains(c) {
            assert_ne!(b, "be2", "{c} still on the dead be2");
        } else {
            assert_eq!(Some(b), before.get(c), "{c} was not on be2 but moved");
        }
    }
    eprintln!("{} clients of be2 moved, alike on every node", on_be2.len());
    be2.ip(&["link", "set", "eth0", "up"]).expect("be2 up");
    // A link going down takes its routes and its IPv6 addresses along; put them back.
    let v6 = format!("{}/64", backend_v6(2));
    be2.ip(&["-6", "addr", "replace", &v6, "dev", "eth0", "nodad"])
        .expect("be2 v6 address");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v4 = be2.ip(&["route", "replace", "default", "via", "10.77.0.1"]);
        let v6 = be2.ip(&["-6", "route", "replace", "default", "via", "fd77::1"]);
        if v4.is_ok() && v6.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "be2's routes: {v4:?} {v6:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = wait_backend(&lab, "be2", "active", Duration::from_secs(20));
    eprintln!("be2 active again on every node {took:?} later");
    wait_cluster(&lab, Duration::from_secs(10));
    // Its return changes the tables again; the moved clients stay where they went.
    let (after, _) = agreed_answers(&lab);
    assert_eq!(after, during, "a client moved when be2 came back");
}

/// Sends `frame` to node 1's replication port from the router namespace; returns
/// whether node 1 closed the connection within a second.
fn send_frame(lab: &ClusterLab, frame: Vec<u8>) -> bool {
    use std::io::{Read as _, Write as _};
    let target = std::net::SocketAddr::new(node_v4(1).into(), CLUSTER_PORT);
    lab.router
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            s.write_all(&frame)?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut buf = [0u8; 16];
            Ok(matches!(s.read(&mut buf), Ok(0) | Err(_)))
        })
        .expect("send a frame")
}

#[test]
fn forged_and_replayed_frames_change_nothing_and_are_counted() {
    use xlb::cluster::msg::{Doc, Message, Version};
    use xlb::cluster::wire::Sealer;
    let lab = lab();
    let p = probers(&lab, &ProbeOptions::default());
    std::thread::sleep(Duration::from_secs(1));
    let records = p.stop();
    report("before", &records).assert_unbroken();
    let sessions =
        |lab: &ClusterLab| lab.node_cli(1, &["status"]).expect("status")["sessions"].clone();
    let had = sessions(&lab);
    let (answers_before, _) = agreed_answers(&lab);
    let s0 = status(&lab, 1);
    // Harmful if accepted: a far newer version without any backend, and a flush.
    let mut state = xlb::daemon::state::State {
        version: xlb::daemon::state::STATE_VERSION,
        ..Default::default()
    };
    for svc in SERVICES {
        state.service_mut(svc).removed = vec!["be1".into(), "be2".into(), "be3".into()];
    }
    let doc = Message::Doc {
        doc: Doc {
            version: Version {
                counter: 1_000_000,
                node: 2,
            },
            state,
            down: BTreeSet::new(),
        },
        prepare: false,
    }
    .encode();
    let flush = Message::Flush {
        service: None,
        backend: None,
    }
    .encode();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    let now_ns = now_ms() * 1_000_000;
    // A wrong key: refused at the HMAC, the connection closed.
    let mut forger = Sealer::new(b"not-the-cluster-key-but-long-enough!!", 2, now_ns);
    let mut frame = forger.seal(1, &doc, now_ms());
    frame.extend(forger.seal(1, &flush, now_ms()));
    assert!(
        send_frame(&lab, frame),
        "node 1 kept a connection that sent a forged frame"
    );
    // The right key but an old incarnation of node 2 (as a captured frame replayed after
    // node 2 restarted would be): authentic, refused as a replay.
    let mut old = Sealer::new(CLUSTER_KEY.as_bytes(), 2, 1);
    let mut frame = old.seal(1, &doc, now_ms());
    frame.extend(old.seal(1, &flush, now_ms()));
    send_frame(&lab, frame);
    // Authentic and fresh but sent ten minutes ago: outside the window (30 s
    // either way, so ten minutes ahead where the wall clock is too close to
    // 1970 to go back).
    let mut stale = Sealer::new(CLUSTER_KEY.as_bytes(), 2, now_ns);
    let outside = now_ms()
        .checked_sub(600_000)
        .unwrap_or_else(|| now_ms() + 600_000);
    send_frame(&lab, stale.seal(1, &flush, outside));
    std::thread::sleep(Duration::from_millis(500));
    let s1 = status(&lab, 1);
    let delta = |k: &str| s1[k].as_u64().unwrap_or(0) - s0[k].as_u64().unwrap_or(0);
    eprintln!(
        "rejected: {} bad HMAC, {} replayed",
        delta("rejected_auth"),
        delta("rejected_replay")
    );
    assert!(delta("rejected_auth") >= 1, "{s1}");
    assert_eq!(delta("rejected_replay"), 3, "{s1}");
    assert_eq!(s1["version"], s0["version"], "a forged version was adopted");
    for svc in SERVICES {
        assert_eq!(backend_state(&lab, 1, svc, "be1"), "active", "{svc}");
    }
    assert_eq!(sessions(&lab), had, "sessions were flushed");
    wait_cluster(&lab, Duration::from_secs(5));
    assert_eq!(agreed_answers(&lab).0, answers_before);
}

#[test]
fn config_drift_is_reported_by_every_node() {
    assert_root();
    // lb3's config gives be1 of http-v4 another weight: its table differs.
    let edit: xlb_tests::cluster_lab::ConfigEdit = std::sync::Arc::new(|i, text: String| {
        if i != 3 {
            return text;
        }
        text.replacen(
            "name = \"be1\"\naddress = \"10.77.0.21\"\n",
            "name = \"be1\"\naddress = \"10.77.0.21\"\nweight = 3\n",
            1,
        )
    });
    let lab = ClusterLab::new(
        TAG,
        ClusterOptions {
            cluster: true,
            edit: Some(edit),
            ..ClusterOptions::default()
        },
    )
    .expect("cluster lab");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s1 = status(&lab, 1);
        let s3 = status(&lab, 3);
        if s1["drift"] == serde_json::json!([3]) && s3["drift"] == serde_json::json!([1, 2]) {
            eprintln!(
                "drift: lb1 reports {}, lb3 reports {}",
                s1["drift"], s3["drift"]
            );
            assert_ne!(s1["fingerprint"], s3["fingerprint"]);
            assert_eq!(status(&lab, 2)["drift"], serde_json::json!([3]));
            // Status answers from the peers' Hellos at once; the loud log line
            // comes with the node's next cluster tick (once a second).
            let logged_by = Instant::now() + Duration::from_secs(3);
            loop {
                let log = lab.nodes[0].daemon_log();
                if log.contains("CONFIG DRIFT: node 3") {
                    return;
                }
                assert!(Instant::now() < logged_by, "drift never logged: {log}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        assert!(Instant::now() < deadline, "no drift reported: {s1}\n{s3}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Field `field` of backend `name` in `service` on node `i` (`xlb backend list`).
fn backend_field(lab: &ClusterLab, i: usize, service: &str, name: &str, field: &str) -> String {
    let list = lab
        .node_cli(i, &["backend", "list", service])
        .expect("backend list");
    list.as_array()
        .into_iter()
        .flatten()
        .find(|b| b["name"] == name)
        .map(|b| b[field].to_string().trim_matches('"').to_string())
        .unwrap_or_else(|| "absent".into())
}

/// Waits until every live node shows `want` as `field` of `name` in http-v4.
fn wait_field(lab: &ClusterLab, name: &str, field: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got: Vec<String> = (1..=3)
            .map(|i| backend_field(lab, i, "http-v4", name, field))
            .collect();
        if got.iter().all(|g| g == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}.{field}: want {want} on every node, got {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn runtime_changes_made_on_any_node_reach_every_node() {
    let lab = lab();
    let served = fresh_connections(&lab);
    let cli = |i: usize, args: &[&str]| {
        lab.node_cli(i, args).expect("change");
    };
    cli(3, &["backend", "weight", "http-v4", "be1", "3"]);
    wait_field(&lab, "be1", "weight", "3");
    cli(2, &["backend", "drain", "http-v4", "be2"]);
    wait_field(&lab, "be2", "admin", "draining");
    cli(1, &["backend", "undrain", "http-v4", "be2"]);
    wait_field(&lab, "be2", "admin", "active");
    cli(3, &["backend", "remove", "http-v4", "be3"]);
    wait_field(&lab, "be3", "name", "absent");
    wait_cluster(&lab, Duration::from_secs(10));
    // Through all of it, the clients of the backends that stayed kept them.
    let (after, _) = agreed_answers(&lab);
    for (c, b) in &served {
        if c.is_ipv4() && b != "be3" {
            assert_eq!(after.get(c), Some(b), "{c} moved");
        }
    }
    let before: u64 = (1..=3)
        .map(|i| {
            lab.node_cli(i, &["status"]).expect("status")["sessions"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    cli(2, &["sessions", "flush", "--service", "http-v4"]);
    std::thread::sleep(Duration::from_millis(500));
    for i in 1..=3 {
        let left = lab
            .node_cli(i, &["sessions", "list", "--service", "http-v4"])
            .expect("sessions list");
        assert_eq!(
            left.as_array().map_or(0, Vec::len),
            0,
            "lb{i} kept http-v4 sessions"
        );
    }
    eprintln!(
        "runtime changes through lb1..lb3 reached every node; a flush through lb2 emptied http-v4 on all ({before} sessions before)"
    );
}

#[test]
fn generic_xdp_nodes_keep_divergent_clients_through_a_node_death() {
    assert_root();
    let mut lab = ClusterLab::new(
        TAG,
        ClusterOptions {
            mode: xlb_tests::driver::Mode::Generic,
            ..ClusterOptions::replicated()
        },
    )
    .expect("cluster lab");
    wait_cluster(&lab, Duration::from_secs(15));
    // The operator's table, not only the JSON the other tests read.
    let node = lab.node(2).expect("lb2");
    let bin = xlb_tests::driver::xlb_bin().expect("xlb binary");
    let bin = bin.to_str().expect("utf-8 path");
    let socket = node.socket();
    let socket = socket.to_str().expect("utf-8 path");
    let out = node
        .ns()
        .expect("lb2 namespace")
        .exec_ok(&[bin, "--socket", socket, "cluster", "status"])
        .expect("xlb cluster status");
    eprintln!("{out}");
    assert!(out.starts_with("node 2  version "), "{out}");
    assert_eq!(out.matches(" live ").count(), 2, "{out}");
    assert!(
        out.contains("rejected frames: 0 bad HMAC, 0 replayed"),
        "{out}"
    );

    let (before, divergent) = add_be4(&lab, 3);
    let (s, _) = through_event(
        &mut lab,
        "generic XDP node death",
        &before,
        Duration::from_secs(4),
        |lab| lab.kill_node(3).expect("kill lb3"),
    );
    eprintln!(
        "generic XDP: {divergent} divergent clients, {} udp timeouts",
        s.udp_timeouts
    );
    assert_eq!(fresh_connections(&lab), before);
}

#[test]
fn one_nodes_failing_checks_do_not_take_a_backend_from_the_cluster() {
    let lab = lab();
    let served = fresh_connections(&lab);
    let (before, _) = agreed_answers(&lab);
    assert_eq!(served, before);
    // lb1 alone loses its own path to be2 (its checks fail); lb2 and lb3 still reach it.
    let lb1 = lab.node(1).expect("lb1").ns().expect("lb1 namespace");
    lb1.ip(&["route", "add", "blackhole", "10.77.0.22/32"])
        .expect("blackhole v4");
    lb1.ip(&["-6", "route", "add", "blackhole", "fd77::22/128"])
        .expect("blackhole v6");
    // Long enough for lb1's checks to fall (3 × 500 ms) and the verdict to be taken.
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend_field(&lab, 1, "http-v4", "be2", "health") != "down" {
        assert!(Instant::now() < deadline, "lb1's own checks never failed");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    for i in 1..=3 {
        for svc in SERVICES {
            assert_eq!(
                backend_state(&lab, i, svc, "be2"),
                "active",
                "lb{i} {svc}: one node of three must not take be2 away"
            );
        }
    }
    assert_eq!(agreed_answers(&lab).0, before, "a client moved");
    let log = lab.nodes[0].daemon_log();
    assert!(!log.contains("changed the cluster's verdict"), "{log}");
    eprintln!("lb1 sees be2 down by its own checks; the cluster keeps it up on all three nodes");
}
