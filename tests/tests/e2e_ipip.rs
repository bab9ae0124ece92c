//! Layer-3 direct server return end to end (issue 10's namespace tier): backends in other
//! subnets behind a router, `forward_mode = "ipip"`, `xlb decap` on the backends, the real
//! `xlb daemon` with next hops resolved from the kernel (no MAC anywhere in the config).
//! See `xlb_tests::routed_lab` for the topology. Also the layer-2 (`dsr`) mode's answer to
//! a backend's MAC changing, in the bridge lab.
//!
//! Needs root and the release `xlb` binary (`XLB_BIN`). Run alone:
//! `cargo test --release -p xlb-tests --test e2e_ipip -- --test-threads=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::time::Duration;

use anyhow::Context as _;
use xlb_tests::daemon::{self, HealthOptions, PROTOS, only_moved_from, sample};
use xlb_tests::driver::{self, Mapping, Mode};
use xlb_tests::routed_lab::{
    LB_IPV4, LB_IPV6, RoutedDaemon, RoutedLab, SERVICES, Via, time_to_answer,
};
use xlb_tests::{LabOptions, Proto, Servers, UDP_PORT};

/// Client addresses per family.
const CLIENTS: usize = 16;
/// Backends behind the router.
const BACKENDS: usize = 3;
/// A next hop's new MAC must be followed within this.
const MAC_BOUND: Duration = Duration::from_secs(5);
/// Longest one probe of an outage measurement may take.
const PROBE_LIMIT: Duration = Duration::from_millis(300);
/// How often a pair is probed during an outage.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// Egress MTU of the LB's `lb0` (the veth default).
const LB_MTU: usize = 1500;

/// Health checks slow enough that a next hop being re-learned (≤ 3 s by design) takes no
/// backend down: fall × interval = 5 s. The MAC tests measure forwarding, not failover.
fn patient_health() -> HealthOptions {
    HealthOptions {
        interval: "1s",
        timeout: "500ms",
        rise: 2,
        fall: 5,
    }
}

fn service_of(client: IpAddr, proto: Proto) -> &'static str {
    match (client.is_ipv4(), proto) {
        (true, Proto::Tcp) => "http-v4",
        (true, Proto::Udp) => "echo-v4",
        (false, Proto::Tcp) => "http-v6",
        (false, Proto::Udp) => "echo-v6",
    }
}

/// (service, backend) -> clients, from a mapping.
fn per_backend(mapping: &Mapping) -> BTreeMap<(&'static str, String), u64> {
    let mut out = BTreeMap::new();
    for ((client, proto), name) in mapping {
        *out.entry((service_of(*client, *proto), name.clone()))
            .or_default() += 1;
    }
    out
}

/// A routed lab with servers, `xlb decap` on every backend and a daemon whose backends are
/// all up. Drop order of the tuple's parts is the caller's: daemon, servers, lab.
fn start(tag: &str, health: &HealthOptions, mode: Mode) -> (RoutedLab, Servers, RoutedDaemon) {
    start_via(tag, health, mode, Via::Direct)
}

/// [`start`] with health checks sent `via` the given way.
fn start_via(
    tag: &str,
    health: &HealthOptions,
    mode: Mode,
    via: Via,
) -> (RoutedLab, Servers, RoutedDaemon) {
    daemon::assert_root();
    let lab = RoutedLab::new(tag, BACKENDS, CLIENTS).expect("routed lab");
    let servers = Servers::start_specs(lab.server_specs().expect("specs")).expect("servers");
    if mode == Mode::Native {
        lab.attach_router_pass().expect("XDP_PASS on rl0");
    }
    for b in &lab.backends {
        let out = lab.decap_attach(&b.name, mode).expect("xlb decap");
        assert!(out.contains("attached"), "{out}");
    }
    let d = lab
        .start_daemon(&lab.daemon_config_via(mode, health, via))
        .expect("xlb daemon");
    for b in &lab.backends {
        d.wait_all(&lab, &b.name, "health", "up", Duration::from_secs(15))
            .expect("backends up");
    }
    (lab, servers, d)
}

/// Sends one UDP datagram with DF of `ip_total` bytes (IP header included) from `src` to
/// the VIP and waits `wait` for an answer.
fn oversize_probe(lab: &RoutedLab, src: IpAddr, ip_total: usize, wait: Duration) -> Option<String> {
    let header = if src.is_ipv4() { 20 + 8 } else { 40 + 8 };
    let payload = vec![b'x'; ip_total - header];
    let vip = lab.vip_for(src);
    lab.client
        .run(|| {
            let sock = UdpSocket::bind(SocketAddr::new(src, 0)).context("bind")?;
            // DF, and never fragmented locally: what a PMTU-discovering client sends.
            let (level, opt, val) = if src.is_ipv4() {
                (
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    libc::IP_PMTUDISC_DO,
                )
            } else {
                (
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MTU_DISCOVER,
                    libc::IPV6_PMTUDISC_DO,
                )
            };
            // SAFETY: setsockopt with a pointer to a live c_int and its size.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    level,
                    opt,
                    (&raw const val).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            anyhow::ensure!(rc == 0, "setting DF: {}", std::io::Error::last_os_error());
            sock.connect(SocketAddr::new(vip, UDP_PORT))?;
            sock.set_read_timeout(Some(wait))?;
            let sent = sock.send(&payload).context("sending")?;
            anyhow::ensure!(sent == payload.len(), "short send");
            let mut buf = [0u8; 2048];
            Ok(sock
                .recv(&mut buf)
                .ok()
                .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()))
        })
        .expect("oversize probe")
}

/// Probes every pair of `before` from `ns` until answered and checks each is answered by
/// its backend within [`MAC_BOUND`]; returns each pair's time.
fn assert_recovered(
    what: &str,
    ns: &xlb_tests::NetNs,
    vip_for: impl Fn(IpAddr) -> IpAddr + Sync,
    before: &Mapping,
    pairs: &[(IpAddr, Proto)],
) -> Vec<((IpAddr, Proto), Duration)> {
    let results = time_to_answer(
        ns,
        vip_for,
        pairs,
        PROBE_LIMIT,
        PROBE_EVERY,
        MAC_BOUND + Duration::from_secs(3),
    );
    let mut times = Vec::new();
    for (pair, got) in results {
        let (took, name) = got.unwrap_or_else(|| panic!("{what}: {pair:?} never answered again"));
        assert_eq!(
            &name, &before[&pair],
            "{what}: {pair:?} moved from {} to {name}",
            before[&pair]
        );
        assert!(
            took <= MAC_BOUND,
            "{what}: {pair:?} answered again only after {took:?}"
        );
        times.push((pair, took));
    }
    times
}

/// Prints min, median and max of `times`.
fn report(what: &str, times: &mut [Duration]) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    eprintln!(
        "{what}: {} pairs answered again, min {:?}, median {:?}, max {:?}",
        times.len(),
        at(0.0),
        at(0.5),
        at(1.0)
    );
}

/// Real HTTP and UDP through the router and the LB's IP-in-IP, sticky per client, replies
/// bypassing the LB; the kernel counters; the router's MAC towards the LB changing; the
/// over-MTU drop.
#[test]
fn ipip_routed_traffic_generic() {
    routed_traffic("ipipg", Mode::Generic);
}

/// [`ipip_routed_traffic_generic`] with native XDP on the LB and the backends.
#[test]
fn ipip_routed_traffic_native() {
    routed_traffic("ipipn", Mode::Native);
}

fn routed_traffic(tag: &str, mode: Mode) {
    let (lab, _servers, d) = start(tag, &patient_health(), mode);

    // The reply-path counter, with its positive control: a frame from each VIP sent to
    // the LB's address arrives through the router exactly as a reply routed via the LB
    // would, and is counted.
    lab.count_vip_frames_at_lb().expect("nft counter");
    for vip in lab.vips() {
        lab.send_from_vip_to_lb("b1", vip).expect("control frame");
    }
    xlb_tests::cmd::wait_until(
        "the control frames to be counted at lb0",
        Duration::from_secs(3),
        Duration::from_millis(50),
        || Ok(lab.vip_frames_at_lb()? == (1, 1)),
    )
    .expect("the VIP counter counts frames from the VIPs");

    let mapping = lab.observe(&PROTOS, 3).expect("traffic");
    assert_eq!(mapping.len(), 4 * CLIENTS);
    let spread = per_backend(&mapping);
    eprintln!("clients per (service, backend): {spread:?}");
    for svc in SERVICES {
        for b in &lab.backends {
            assert!(
                spread.get(&(svc, b.name.clone())).is_some_and(|n| *n > 0),
                "{svc}: {} got no client: {spread:?}",
                b.name
            );
        }
    }
    // Every answer came straight from a backend to its client.
    assert_eq!(
        lab.vip_frames_at_lb().expect("counter"),
        (1, 1),
        "replies passed through the LB"
    );

    // The daemon's sessions agree with what clients saw.
    let sessions = d.ctl(&lab, &["sessions", "list"]).expect("sessions");
    let sessions = sessions.as_array().expect("list");
    assert_eq!(sessions.len(), mapping.len());
    for s in sessions {
        let client: IpAddr = s["client"].as_str().expect("client").parse().expect("ip");
        let proto = if s["service"].as_str().is_some_and(|n| n.starts_with("http")) {
            Proto::Tcp
        } else {
            Proto::Udp
        };
        assert_eq!(s["backend"], mapping[&(client, proto)].as_str(), "{s}");
    }

    // Kernel counters: one new session per pair, nothing dropped, every backend's new
    // sessions exactly its clients.
    for (reason, want) in [
        ("new_session", mapping.len() as u64),
        ("drop_nexthop_unresolved", 0),
        ("drop_encap_too_big", 0),
        ("drop_encap_failed", 0),
        ("drop_no_backend", 0),
    ] {
        assert_eq!(
            d.reason(&lab, reason).expect("stats"),
            want,
            "{reason}: {}\ndaemon log:\n{}",
            d.ctl(&lab, &["stats"]).expect("stats"),
            d.child.log()
        );
    }
    let m = lab.scrape().expect("metrics");
    for ((svc, backend), clients) in &spread {
        let series =
            format!("xlb_backend_new_sessions_total{{service=\"{svc}\",backend=\"{backend}\"}}");
        assert_eq!(sample(&m, &series), Some(*clients as f64), "{series}");
    }
    for svc in SERVICES {
        let packets = sample(
            &m,
            &format!("xlb_service_packets_total{{service=\"{svc}\"}}"),
        )
        .unwrap_or_else(|| panic!("no packets of {svc}"));
        // 3 rounds × 16 clients; TCP sends at least SYN, ACK and the request.
        let min = if svc.starts_with("http") { 9.0 } else { 3.0 } * CLIENTS as f64;
        assert!(packets >= min, "{svc}: {packets} frames < {min}");
    }

    // The backends decapsulated what they answered: each request's client packets came
    // in IP-in-IP of the VIP's family, and nothing else did.
    let requests = per_backend(&mapping);
    for b in &lab.backends {
        let stats = lab.decap_stats(&b.name).expect("decap stats");
        let c = &stats["counters"];
        let get = |k: &str| c[k].as_u64().unwrap_or(0);
        let clients = |svc: &str| requests.get(&(svc, b.name.clone())).copied().unwrap_or(0);
        let min4 = 3 * (3 * clients("http-v4") + clients("echo-v4"));
        let min6 = 3 * (3 * clients("http-v6") + clients("echo-v6"));
        assert!(
            get("decap_4in4") >= min4,
            "{}: {stats} (want ≥ {min4})",
            b.name
        );
        assert!(
            get("decap_6in6") >= min6,
            "{}: {stats} (want ≥ {min6})",
            b.name
        );
        assert_eq!(get("decap_6in4") + get("decap_4in6"), 0, "{stats}");
        // Direct health checks and neighbour discovery pass untouched.
        assert!(get("pass_not_ipip") > 0, "{stats}");
    }

    // The LB's next hop (the router's rl0) gets a new MAC; no config change. The LB keeps
    // sending to the old MAC, which the router drops, until the daemon re-learns it.
    let pairs: Vec<(IpAddr, Proto)> = mapping.keys().copied().collect();
    // Twice, a second apart: the daemon re-learns MACs every 2 s, so the two changes
    // fall at different points of its cycle.
    for (round, mac) in [(1, "02:81:00:00:00:99"), (2, "02:81:00:00:00:98")] {
        if round > 1 {
            std::thread::sleep(Duration::from_secs(1));
        }
        lab.set_router_lb_mac(mac).expect("new MAC");
        let times = assert_recovered(
            "ipip next hop MAC change",
            &lab.client,
            |a| lab.vip_for(a),
            &mapping,
            &pairs,
        );
        for (fam, v4) in [("IPv4", true), ("IPv6", false)] {
            let mut t: Vec<Duration> = times
                .iter()
                .filter(|((c, _), _)| c.is_ipv4() == v4)
                .map(|(_, d)| *d)
                .collect();
            report(
                &format!(
                    "ipip ({mode:?}): router MAC towards the LB changed (#{round}), {fam} clients"
                ),
                &mut t,
            );
        }
        let after = lab
            .observe(&PROTOS, 1)
            .expect("traffic after the MAC change");
        assert_eq!(after, mapping, "clients moved after the MAC change");
    }
    let log = d.child.log();
    assert!(
        log.contains("next hop changed"),
        "the daemon did not follow the new MAC:\n{log}"
    );
    assert!(!log.contains(" down: "), "a backend went down:\n{log}");

    // Over the MTU: encapsulated, a datagram of `LB_MTU - overhead + 1` bytes no longer
    // fits lb0 and is dropped and counted; one byte less is answered.
    let v4 = IpAddr::V4(lab.client_v4[0]);
    let v6 = IpAddr::V6(lab.client_v6[0]);
    // Health checks are direct and the servers count them too: what a backend was sent
    // through the tunnel shows in its decapsulator's counters alone.
    let decapsulated = |lab: &RoutedLab| -> u64 {
        lab.backends
            .iter()
            .map(|b| {
                let s = lab.decap_stats(&b.name).expect("decap stats");
                ["decap_4in4", "decap_6in6"]
                    .iter()
                    .map(|k| s["counters"][k].as_u64().unwrap_or(0))
                    .sum::<u64>()
            })
            .sum()
    };
    let decap_before = decapsulated(&lab);
    let too_big_before = d.reason(&lab, "drop_encap_too_big").expect("stats");
    for (src, overhead) in [(v4, 20), (v6, 40)] {
        let fits = LB_MTU - overhead;
        assert_eq!(
            oversize_probe(&lab, src, fits + 1, Duration::from_millis(500)),
            None,
            "{src}: {} bytes answered",
            fits + 1
        );
    }
    assert_eq!(
        d.reason(&lab, "drop_encap_too_big").expect("stats"),
        too_big_before + 2,
        "each oversized datagram dropped and counted once"
    );
    assert_eq!(
        decapsulated(&lab),
        decap_before,
        "a backend got an oversized datagram"
    );
    let m = lab.scrape().expect("metrics");
    assert_eq!(
        sample(&m, "xlb_frames_total{reason=\"drop_encap_too_big\"}"),
        Some((too_big_before + 2) as f64)
    );
    assert_eq!(
        sample(&m, "xlb_drops_total{reason=\"encap_too_big\"}"),
        Some((too_big_before + 2) as f64)
    );
    for (src, overhead) in [(v4, 20), (v6, 40)] {
        let fits = LB_MTU - overhead;
        let answer = oversize_probe(&lab, src, fits, Duration::from_secs(1));
        assert_eq!(
            answer.as_deref(),
            Some(mapping[&(src, Proto::Udp)].as_str()),
            "{src}: a datagram that fits after encapsulation ({fits} bytes)"
        );
    }
    assert_eq!(
        d.reason(&lab, "drop_encap_too_big").expect("stats"),
        too_big_before + 2
    );
    let after = lab
        .observe(&PROTOS, 1)
        .expect("normal traffic after the oversized");
    assert_eq!(after, mapping);
    assert_eq!(
        lab.vip_frames_at_lb().expect("counter"),
        (1, 1),
        "replies passed through the LB"
    );
    drop(d);
}

/// The daemon's direct health checks (the backends' own addresses, routed through the
/// router) take a stopped backend down and bring it back; only its clients move.
#[test]
fn ipip_health_direct() {
    let (lab, mut servers, d) = start("ipiph", &HealthOptions::default(), Mode::Generic);
    let before = lab.observe(&PROTOS, 2).expect("traffic");
    let on_b2 = before.values().filter(|n| *n == "b2").count();
    assert!(on_b2 > 0);

    servers.stop_backend("b2").expect("stop b2");
    let took = d
        .wait_all(&lab, "b2", "state", "down", Duration::from_secs(10))
        .expect("b2 down");
    eprintln!("direct checks: b2 DOWN in every service {took:?} after its servers stopped");
    let after = lab.observe(&PROTOS, 2).expect("traffic after the failure");
    let moved = only_moved_from(&before, &after, "b2").unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(moved, on_b2);

    servers
        .start_spec(lab.server_spec("b2").expect("spec"))
        .expect("restart b2");
    let took = d
        .wait_all(&lab, "b2", "state", "active", Duration::from_secs(10))
        .expect("b2 up");
    eprintln!("direct checks: b2 UP in every service {took:?} after its servers restarted");
    let back = lab.observe(&PROTOS, 2).expect("traffic after recovery");
    assert_eq!(back, after, "recovery moved clients");
    drop(d);
}

/// Layer-2 DSR with MACs resolved from the kernel (the bridge lab, no `mac` in the
/// config): one backend's MAC changes mid-run; its clients stay on it and are answered
/// again within 5 s, nobody else notices.
#[test]
fn dsr_backend_mac_change() {
    daemon::assert_root();
    let (lab, _servers, d) = daemon::start_lab(
        "ipipdsr",
        LabOptions::default(),
        3,
        &patient_health(),
        |t| t,
    )
    .expect("lab and daemon");
    for b in ["b1", "b2", "b3"] {
        d.wait_all(&lab, b, "health", "up").expect("up");
    }
    let before = driver::observe(&lab, &PROTOS, 2).expect("traffic");
    let on_b1: BTreeSet<(IpAddr, Proto)> = before
        .iter()
        .filter(|(_, n)| *n == "b1")
        .map(|(k, _)| *k)
        .collect();
    assert!(!on_b1.is_empty());

    let b1 = lab.backend("b1").expect("b1");
    let pairs: Vec<(IpAddr, Proto)> = before.keys().copied().collect();
    // Twice, a second apart, at different points of the daemon's 2 s re-learning cycle.
    for (round, mac) in [(1, "02:00:00:00:01:11"), (2, "02:00:00:00:02:11")] {
        if round > 1 {
            std::thread::sleep(Duration::from_secs(1));
        }
        b1.netns
            .ip(&["link", "set", "dev", "eth0", "address", mac])
            .expect("new MAC");
        let results = time_to_answer(
            &lab.client,
            |a| lab.vip_for(a),
            &pairs,
            PROBE_LIMIT,
            PROBE_EVERY,
            MAC_BOUND + Duration::from_secs(3),
        );
        let mut b1_times = Vec::new();
        let mut other_times = Vec::new();
        for (pair, got) in results {
            let (took, name) = got.unwrap_or_else(|| panic!("{pair:?} never answered again"));
            assert_eq!(name, before[&pair], "{pair:?} moved");
            assert!(took <= MAC_BOUND, "{pair:?} answered again after {took:?}");
            if on_b1.contains(&pair) {
                b1_times.push(took);
            } else {
                other_times.push(took);
            }
        }
        report(
            &format!("dsr: b1's MAC changed (#{round}), b1's clients"),
            &mut b1_times,
        );
        report(
            &format!("dsr: b1's MAC changed (#{round}), other clients"),
            &mut other_times,
        );
        let after = driver::observe(&lab, &PROTOS, 1).expect("traffic after");
        assert_eq!(after, before, "clients moved");
    }
    let log = d.child.log();
    assert!(log.contains("next hop changed"), "{log}");
    assert!(!log.contains(" down: "), "a backend went down:\n{log}");
}

/// Tunnelled health checks (`via = "tunnel"`: the probe goes to VIP:port inside IP-in-IP)
/// take a backend whose decapsulator is detached down, although its servers still answer
/// on its own address (where a direct check passes), and bring it back up when the
/// decapsulator is attached again; only its clients move, nobody moves back.
#[test]
fn ipip_health_tunnel() {
    let (lab, _servers, d) = start_via(
        "ipiptun",
        &HealthOptions::default(),
        Mode::Generic,
        Via::Tunnel,
    );
    let before = lab.observe(&PROTOS, 2).expect("traffic");
    let on_b2 = before.values().filter(|n| *n == "b2").count();
    assert!(on_b2 > 0);

    let b2 = lab.backend("b2").expect("b2");
    let own = [
        (IpAddr::V4(LB_IPV4), IpAddr::V4(b2.ipv4)),
        (IpAddr::V6(LB_IPV6), IpAddr::V6(b2.ipv6)),
    ];
    // What a direct check sees: b2 answers on its own addresses throughout.
    let direct_ok = || {
        lab.lb
            .run(|| {
                for (src, dst) in own {
                    let http = xlb_tests::client::http_get(src, dst, xlb_tests::HTTP_PORT)?;
                    let udp = xlb_tests::client::udp_ask(src, dst, UDP_PORT)?;
                    anyhow::ensure!(http == "b2" && udp == "b2", "{http} / {udp}");
                }
                Ok(())
            })
            .expect("b2 answers on its own addresses")
    };
    direct_ok();

    lab.decap_detach("b2").expect("detach b2's decapsulator");
    let took = d
        .wait_all(&lab, "b2", "state", "down", Duration::from_secs(10))
        .expect("b2 down through the tunnel");
    eprintln!("tunnel checks: b2 DOWN in every service {took:?} after its decapsulator left");
    direct_ok();
    for b in ["b1", "b3"] {
        d.wait_all(&lab, b, "health", "up", Duration::from_secs(1))
            .expect("the others stay up");
    }
    let after = lab.observe(&PROTOS, 2).expect("traffic after the failure");
    let moved = only_moved_from(&before, &after, "b2").unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(moved, on_b2);

    let out = lab.decap_attach("b2", Mode::Generic).expect("reattach");
    assert!(out.contains("attached"), "{out}");
    let took = d
        .wait_all(&lab, "b2", "state", "active", Duration::from_secs(10))
        .expect("b2 up through the tunnel");
    eprintln!("tunnel checks: b2 UP in every service {took:?} after its decapsulator came back");
    let back = lab.observe(&PROTOS, 2).expect("traffic after recovery");
    assert_eq!(back, after, "recovery moved clients");
    drop(d);
}
