//! The control plane end to end: the real `xlb daemon` in a lab's LB
//! namespace, real backend servers, real traffic from the client namespace.
//! Health checks go from the LB namespace to each backend's own address.
//!
//! Needs root; run by `cargo xtask test`. Labs, daemons, sockets and state
//! files are removed on drop, also when an assertion fails.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::time::{Duration, Instant};

use xlb_tests::{
    Lab, LabOptions, Proto, Servers,
    daemon::{
        Daemon, HealthOptions, METRICS, PROTOS, SERVICES, ask, assert_root, ctl_output,
        daemon_config, only_moved_from, sample, scrape, start_lab,
    },
    driver::{self, Mode},
};

/// A lab with servers and a running daemon over its first `backends` backends.
fn setup(tag: &str, opts: LabOptions, backends: usize) -> (Lab, Servers, Daemon) {
    setup_with(tag, opts, backends, |c| c)
}

/// Like [`setup`], with the config text passed through `edit` first.
fn setup_with(
    tag: &str,
    opts: LabOptions,
    backends: usize,
    edit: impl Fn(String) -> String,
) -> (Lab, Servers, Daemon) {
    assert_root();
    start_lab(tag, opts, backends, &HealthOptions::default(), edit)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until `backend` has `field == value` in every service.
fn wait_all(lab: &Lab, d: &Daemon, backend: &str, field: &str, value: &str) -> Duration {
    d.wait_all(lab, backend, field, value)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`ask`], panicking with the error.
fn ask_ok(lab: &Lab, clients: &[IpAddr], proto: Proto) -> BTreeMap<IpAddr, String> {
    ask(lab, clients, proto).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn cli_against_live_daemon() {
    let (lab, _servers, d) = setup_with("dcli", LabOptions::default(), 3, |c| {
        format!("metrics_address = \"{METRICS}\"\n{c}")
    });

    // The control socket is a socket, mode 0600.
    let meta = std::fs::metadata(&d.socket).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");

    let status = d.ctl(&lab, &["status"]).expect("status");
    assert_eq!(status["services"], 4, "{status}");
    assert_eq!(status["backends"], 12, "{status}");
    assert_eq!(status["adopted"], false, "{status}");
    let services = d.ctl(&lab, &["service", "list"]).expect("service list");
    let names: Vec<&str> = services
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, SERVICES);
    wait_all(&lab, &d, "b1", "health", "up");

    let mapping = driver::observe(&lab, &PROTOS, 1).expect("traffic");
    let sessions = d.ctl(&lab, &["sessions", "list"]).expect("sessions list");
    assert_eq!(sessions.as_array().map(Vec::len), Some(mapping.len()));
    // Counted beside the owner, but at this size waited for: exact, and fresh.
    let status = d.ctl(&lab, &["status"]).expect("status");
    assert_eq!(status["sessions"], mapping.len(), "{status}");
    assert!(
        status["sessions_counted_ms_ago"]
            .as_u64()
            .is_some_and(|ms| ms < 1_000),
        "a count begun after the request: {status}"
    );
    let listed = d.ctl(&lab, &["backend", "list"]).expect("backend list");
    let per_backend: u64 = listed
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|b| b["sessions"].as_u64())
        .sum();
    assert_eq!(per_backend, mapping.len() as u64, "{listed}");
    let web4 = d
        .ctl(&lab, &["sessions", "list", "--service", "http-v4"])
        .expect("sessions list --service");
    assert_eq!(web4.as_array().map(Vec::len), Some(lab.client_v4.len()));
    let on_b1 = d
        .ctl(&lab, &["sessions", "list", "--backend", "b1"])
        .expect("sessions list --backend");
    let on_b1 = on_b1.as_array().expect("list");
    assert!(!on_b1.is_empty());
    assert!(on_b1.iter().all(|s| s["backend"] == "b1"));
    // Every session agrees with what its client saw.
    for s in sessions.as_array().expect("list") {
        let client: IpAddr = s["client"].as_str().expect("client").parse().expect("ip");
        let proto = if s["service"].as_str().is_some_and(|n| n.starts_with("http")) {
            Proto::Tcp
        } else {
            Proto::Udp
        };
        assert_eq!(s["backend"], mapping[&(client, proto)].as_str(), "{s}");
    }

    // `where`: a known client by its session, an unknown one by the Maglev table.
    let c = lab.client_addrs()[0];
    let w = d
        .ctl(
            &lab,
            &["sessions", "where", &c.to_string(), "--service", "http-v4"],
        )
        .expect("where");
    assert_eq!(w[0]["source"], "session", "{w}");
    assert_eq!(w[0]["backend"], mapping[&(c, Proto::Tcp)].as_str(), "{w}");
    let w = d
        .ctl(&lab, &["sessions", "where", "10.77.0.250"])
        .expect("where");
    assert_eq!(w.as_array().map(Vec::len), Some(2), "both v4 services: {w}");
    assert!(
        w.as_array()
            .expect("list")
            .iter()
            .all(|x| x["source"] == "maglev")
    );

    let stats = d.ctl(&lab, &["stats"]).expect("stats");
    let new_sessions = stats["reasons"]
        .as_array()
        .and_then(|r| r.iter().find(|e| e[0] == "new_session"))
        .and_then(|e| e[1].as_u64());
    assert_eq!(new_sessions, Some(mapping.len() as u64), "{stats}");

    // Metrics: counters match the traffic (UDP may retry; TCP sends several frames each).
    let m = scrape(&lab);
    assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
    assert_eq!(
        sample(&m, "xlb_affinity_misses_total"),
        Some(mapping.len() as f64),
        "{m}"
    );
    for svc in SERVICES {
        let new = sample(
            &m,
            &format!("xlb_service_new_sessions_total{{service=\"{svc}\"}}"),
        );
        assert_eq!(new, Some(16.0), "{svc}: {m}");
        let packets = sample(
            &m,
            &format!("xlb_service_packets_total{{service=\"{svc}\"}}"),
        )
        .unwrap_or_else(|| panic!("no packets of {svc}: {m}"));
        let (lo, hi) = if svc.starts_with("echo") {
            (16.0, 48.0)
        } else {
            (16.0 * 4.0, 16.0 * 10.0)
        };
        assert!((lo..=hi).contains(&packets), "{svc}: {packets} frames");
    }
    assert_eq!(
        sample(&m, "xlb_drops_total{reason=\"no_backend\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "xlb_backend_healthy{service=\"http-v4\",backend=\"b1\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        m.contains("xlb_health_check_duration_seconds_bucket"),
        "{m}"
    );
    // The kernel holds what the daemon wants, nothing needed repairing, and the
    // control socket's served connections are counted (this test made many).
    assert_eq!(sample(&m, "xlb_dataplane_in_sync"), Some(1.0), "{m}");
    assert_eq!(
        sample(&m, "xlb_dataplane_write_failures_total"),
        Some(0.0),
        "{m}"
    );
    let served = sample(
        &m,
        "xlb_listener_connections_total{listener=\"control\",outcome=\"served\"}",
    )
    .unwrap_or_else(|| panic!("no control listener counter: {m}"));
    assert!(served >= 5.0, "{served} control connections: {m}");
    assert!(m.contains("xlb_backend_sessions{"), "{m}");

    // Changes: weight, add, remove; invalid arguments change nothing.
    d.ctl(&lab, &["backend", "weight", "http-v4", "b1", "3"])
        .expect("weight");
    assert_eq!(d.backend(&lab, "http-v4", "b1").expect("b1")["weight"], 3);
    let bad = ctl_output(
        &lab,
        &d.socket,
        &["backend", "add", "http-v4", "10.77.0.29", "--mac", "zz"],
    )
    .expect("run xlb");
    assert!(!bad.status.success());
    let bad = ctl_output(
        &lab,
        &d.socket,
        &[
            "backend",
            "add",
            "http-v4",
            "fd00:77::29",
            "--mac",
            "02:00:00:00:00:29",
        ],
    )
    .expect("run xlb");
    assert!(!bad.status.success(), "wrong family accepted");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("family"));
    // --json says what kind of failure it was, for scripts.
    let kind = |out: &std::process::Output| {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(v["ok"], false, "{v}");
        v["error"]["kind"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(kind(&bad), "invalid");
    let missing =
        ctl_output(&lab, &d.socket, &["backend", "drain", "http-v4", "nosuch"]).expect("run xlb");
    assert!(!missing.status.success());
    assert_eq!(kind(&missing), "not_found");
    let missing =
        ctl_output(&lab, &d.socket, &["backend", "weight", "no-svc", "b1", "2"]).expect("run xlb");
    assert_eq!(kind(&missing), "not_found");
    let count = |d: &Daemon| {
        d.ctl(&lab, &["backend", "list", "http-v4"])
            .expect("list")
            .as_array()
            .map_or(0, Vec::len)
    };
    assert_eq!(count(&d), 3);
    d.ctl(
        &lab,
        &[
            "backend",
            "add",
            "http-v4",
            "10.77.0.29",
            "--mac",
            "02:00:00:00:00:29",
            "--name",
            "b9",
        ],
    )
    .expect("add");
    assert_eq!(count(&d), 4);
    // Nothing answers at .29: its checks take it down.
    d.wait_backend(&lab, "http-v4", "b9", Duration::from_secs(10), |b| {
        b["state"] == "down"
    })
    .expect("b9 goes down");
    d.ctl(&lab, &["backend", "remove", "http-v4", "b9"])
        .expect("remove");
    assert_eq!(count(&d), 3);
    let after = driver::observe(&lab, &PROTOS, 1).expect("traffic");
    assert_eq!(after, mapping, "weight/add/remove moved clients");

    let flushed = d
        .ctl(
            &lab,
            &[
                "sessions",
                "flush",
                "--service",
                "http-v4",
                "--backend",
                "b1",
            ],
        )
        .expect("flush");
    assert_eq!(flushed["ok"], true);
    let left = d
        .ctl(
            &lab,
            &[
                "sessions",
                "list",
                "--service",
                "http-v4",
                "--backend",
                "b1",
            ],
        )
        .expect("list");
    assert_eq!(left.as_array().map(Vec::len), Some(0));

    // Human tables print too.
    let out = lab
        .run_in_lb(&[
            driver::xlb_bin().expect("bin").to_str().expect("utf-8"),
            "--socket",
            d.socket.to_str().expect("utf-8"),
            "backend",
            "list",
        ])
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains("SESSIONS"));

    // No daemon: one line, non-zero exit.
    let none = lab.work_dir().join("none.sock");
    let out = ctl_output(&lab, &none, &["status"]).expect("run xlb");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no xlb daemon is running"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert_eq!(v["error"]["kind"], "unavailable", "{v}");

    // SIGTERM: the daemon exits cleanly, removes its socket, the dataplane keeps forwarding.
    let socket = d.socket.clone();
    let (status, log) = d.child.stop().expect("stopping the daemon");
    assert!(status.success(), "{status}\n{log}");
    assert!(!socket.exists(), "socket left behind");
    let again = driver::observe(&lab, &[Proto::Udp], 1).expect("traffic after the daemon");
    for ((c, p), b) in &again {
        assert_eq!(&mapping[&(*c, *p)], b);
    }
}

#[test]
fn backend_failure_moves_only_its_clients() {
    let (lab, mut servers, d) = setup("dfail", LabOptions::default(), 3);
    wait_all(&lab, &d, "b2", "health", "up");
    let before = driver::observe(&lab, &PROTOS, 2).expect("traffic");
    let on_b2 = before.values().filter(|b| *b == "b2").count();
    assert!(on_b2 > 0, "no client on b2: {before:?}");

    // The kernel's own backend records, read directly from the pins: the
    // moment each service's b2 is DOWN there, not when a CLI call notices.
    let status = d.ctl(&lab, &["status"]).expect("status");
    let pins = status["pins"].as_str().expect("pins path").to_string();
    let maps = xlb::pins::PinnedMaps::open(std::path::Path::new(&pins)).expect("opening pins");
    let ids: Vec<(&str, u32)> = SERVICES
        .iter()
        .map(|svc| {
            let b = d.backend(&lab, svc, "b2").expect("b2 listed");
            (*svc, b["id"].as_u64().expect("id") as u32)
        })
        .collect();

    servers.stop_backend("b2").expect("stopping b2");
    let t0 = Instant::now();
    let mut detected: BTreeMap<&str, Duration> = BTreeMap::new();
    while detected.len() < ids.len() && t0.elapsed() < Duration::from_secs(15) {
        for (svc, id) in &ids {
            if detected.contains_key(svc) {
                continue;
            }
            let rec = maps.backends.get(id, 0).expect("reading a backend record");
            if rec.state == lb_common::BACKEND_DOWN {
                detected.insert(svc, t0.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let opts = HealthOptions::default();
    // fall × interval + 100 ms: a failed check reaches the kernel at once,
    // for every service, however many fail together.
    let bound = Duration::from_millis(u64::from(opts.fall) * 500 + 100);
    eprintln!("failure to kernel, per service: {detected:?} (bound {bound:?})");
    for (svc, _) in &ids {
        let took = detected
            .get(svc)
            .unwrap_or_else(|| panic!("{svc}/b2 never DOWN in the kernel\n{}", d.child.log()));
        assert!(
            *took <= bound,
            "{svc}: b2 DOWN in the kernel after {took:?} > {bound:?}"
        );
    }
    wait_all(&lab, &d, "b2", "state", "down");
    let log = d.child.log();
    assert!(log.contains("down: 3 consecutive failures"), "{log}");

    let after = driver::observe(&lab, &PROTOS, 2).expect("traffic after the failure");
    let moved = only_moved_from(&before, &after, "b2").unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "failure: {moved} of {} client/service pairs moved (all were on b2)",
        before.len()
    );
    assert_eq!(moved, on_b2);
    // The dead backend's sessions were rewritten by the daemon, not left to chance.
    let left = d
        .ctl(&lab, &["sessions", "list", "--backend", "b2"])
        .expect("list");
    assert_eq!(left.as_array().map(Vec::len), Some(0), "{left}");

    servers.start_backend(&lab, "b2").expect("restarting b2");
    wait_all(&lab, &d, "b2", "state", "active");
    let back = driver::observe(&lab, &PROTOS, 2).expect("traffic after recovery");
    assert_eq!(back, after, "recovery moved clients");
}

#[test]
fn drain_with_deadline() {
    let opts = LabOptions {
        backends: 3,
        clients_v4: 32,
        clients_v6: 0,
    };
    // Short affinity timeouts so idle clients' sessions run out during the test.
    let (lab, _servers, d) = setup_with("ddrain", opts, 3, |c| {
        c.replace(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\naffinity_timeout = \"2s\"\n",
        )
        .replace(
            "protocol = \"udp\"\n",
            "protocol = \"udp\"\naffinity_timeout = \"2s\"\n",
        )
    });
    wait_all(&lab, &d, "b1", "health", "up");
    let clients = lab.client_addrs();
    let (old, new) = clients.split_at(16);
    let before = ask_ok(&lab, old, Proto::Tcp);
    let on_b1: Vec<IpAddr> = before
        .iter()
        .filter(|(_, b)| *b == "b1")
        .map(|(c, _)| *c)
        .collect();
    assert!(on_b1.len() >= 2, "{before:?}");
    // UDP sessions of b2, for the drain that ends when its sessions are gone.
    let udp = ask_ok(&lab, old, Proto::Udp);
    assert!(udp.values().any(|b| b == "b2"), "{udp:?}");

    d.ctl(
        &lab,
        &["backend", "drain", "http-v4", "b1", "--deadline", "6s"],
    )
    .expect("drain");
    d.ctl(&lab, &["backend", "drain", "echo-v4", "b2"])
        .expect("drain without deadline");
    let b1 = d.backend(&lab, "http-v4", "b1").expect("b1");
    assert_eq!(b1["admin"], "draining", "{b1}");
    assert_eq!(b1["state"], "draining", "{b1}");
    assert_eq!(b1["sessions"], on_b1.len() as u64, "{b1}");
    assert!(
        b1["drain_left_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0 && ms <= 6000),
        "{b1}"
    );

    // New clients never land on b1.
    let fresh = ask_ok(&lab, new, Proto::Tcp);
    assert!(fresh.values().all(|b| b != "b1"), "{fresh:?}");

    // Half of b1's clients keep talking (and stay on b1), the others go quiet: the
    // session count the CLI shows falls to the active half.
    let (active, _idle) = on_b1.split_at(on_b1.len() / 2);
    let start = Instant::now();
    let mut fell = false;
    while start.elapsed() < Duration::from_secs(4) {
        let now = ask_ok(&lab, active, Proto::Tcp);
        assert!(
            now.values().all(|b| b == "b1"),
            "a draining client moved early: {now:?}"
        );
        let n = d.backend(&lab, "http-v4", "b1").expect("b1")["sessions"].as_u64();
        if n == Some(active.len() as u64) {
            fell = true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(fell, "the session count never fell to {}", active.len());
    // The UDP drain ended on its own: its clients were idle, no session was left.
    let b2 = d.backend(&lab, "echo-v4", "b2").expect("b2");
    assert_eq!(b2["admin"], "maint", "{b2}");
    assert!(d.child.log().contains("no sessions left"));

    // At the deadline: maint, and the leftovers (still talking) move to their Maglev
    // choice.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let b1 = d.backend(&lab, "http-v4", "b1").expect("b1");
        if b1["admin"] == "maint" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no maint after the deadline: {b1}"
        );
        let now = ask_ok(&lab, active, Proto::Tcp);
        // A move is fine only if the deadline passed between the two looks.
        let maint = || d.backend(&lab, "http-v4", "b1").expect("b1")["admin"] == "maint";
        assert!(
            now.values().all(|b| b == "b1") || maint(),
            "moved before the deadline: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = d.child.log();
    assert!(log.contains("drain deadline passed"), "{log}");
    let b1 = d.backend(&lab, "http-v4", "b1").expect("b1");
    assert_eq!(b1["sessions"], 0, "{b1}");
    let moved = ask_ok(&lab, active, Proto::Tcp);
    assert!(moved.values().all(|b| b != "b1"), "{moved:?}");

    d.ctl(&lab, &["backend", "undrain", "http-v4", "b1"])
        .expect("undrain");
    let b1 = d.backend(&lab, "http-v4", "b1").expect("b1");
    assert_eq!(
        (b1["admin"].as_str(), b1["state"].as_str()),
        (Some("active"), Some("active"))
    );
    // The clients that moved stay where they are.
    assert_eq!(ask_ok(&lab, active, Proto::Tcp), moved);
}

#[test]
fn kill9_restart_keeps_every_client() {
    let (lab, _servers, d) = setup("dkill", LabOptions::default(), 3);
    wait_all(&lab, &d, "b3", "health", "up");
    let before = driver::observe(&lab, &PROTOS, 2).expect("traffic");
    d.ctl(&lab, &["backend", "weight", "http-v6", "b1", "2"])
        .expect("weight");
    d.ctl(&lab, &["backend", "drain", "echo-v4", "b3"])
        .expect("drain");
    let drained = d.backend(&lab, "echo-v4", "b3").expect("b3")["admin"].clone();

    // A connection open across the restart: the request head is sent in two halves,
    // one before the kill and one after the new daemon is up.
    let c = lab.client_addrs()[0];
    let vip = lab.vip_for(c);
    let mut conn = lab
        .in_client(move || {
            let s = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::new(vip, xlb_tests::HTTP_PORT),
                Duration::from_secs(2),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(s)
        })
        .expect("connecting");
    {
        use std::io::Write as _;
        conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .expect("first half");
    }

    let config = d.config.clone();
    let (_, log) = d.child.kill_hard().expect("kill -9");
    assert!(!log.contains("exiting"), "{log}");
    let state = std::fs::read_to_string(lab.work_dir().join("state.json")).expect("state file");
    assert!(state.contains("\"b3\""), "{state}");

    let t0 = Instant::now();
    let d = Daemon::start(&lab, &config).expect("restarting the daemon");
    eprintln!("restart took {:?}", t0.elapsed());
    {
        use std::io::{Read as _, Write as _};
        conn.write_all(b"Connection: close\r\n\r\n")
            .expect("second half");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).expect("answer");
        let expect = before[&(lab.client_v4[0].into(), Proto::Tcp)].clone();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with(&expect),
            "{answer}"
        );
    }
    let status = d.ctl(&lab, &["status"]).expect("status");
    assert_eq!(status["adopted"], true, "{status}");
    assert_eq!(d.backend(&lab, "http-v6", "b1").expect("b1")["weight"], 2);
    assert_eq!(
        d.backend(&lab, "echo-v4", "b3").expect("b3")["admin"],
        drained
    );
    let after = driver::observe(&lab, &PROTOS, 2).expect("traffic after restart");
    assert_eq!(after, before, "a client moved across kill -9 and restart");
}

#[test]
fn reload_applies_only_the_difference() {
    let opts = LabOptions {
        backends: 4,
        clients_v4: 64,
        clients_v6: 0,
    };
    let (lab, _servers, d) = setup("dreload", opts, 3);
    wait_all(&lab, &d, "b1", "health", "up");
    let clients = lab.client_addrs();
    let (old, new) = clients.split_at(16);
    let before = ask_ok(&lab, old, Proto::Tcp);

    // Add b4 in the file and reload: nobody moves, new clients can land on b4.
    let health = HealthOptions::default();
    std::fs::write(&d.config, daemon_config(&lab, Mode::Generic, 4, &health)).expect("write");
    let done = d.ctl(&lab, &["reload"]).expect("reload");
    assert_eq!(done["ok"], true, "{done}");
    wait_all(&lab, &d, "b4", "state", "active");
    assert_eq!(
        ask_ok(&lab, old, Proto::Tcp),
        before,
        "reload moved clients"
    );
    let fresh = ask_ok(&lab, new, Proto::Tcp);
    assert!(fresh.values().any(|b| b == "b4"), "{fresh:?}");

    // A broken file: a clear message naming the field, nothing applied, still running.
    let good = std::fs::read_to_string(&d.config).expect("read");
    std::fs::write(
        &d.config,
        good.replacen("address = \"", "weight = 0\naddress = \"", 1),
    )
    .expect("write");
    let out = ctl_output(&lab, &d.socket, &["reload"]).expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service[0] (\"http-v4\").backend[0].weight: 0"),
        "{err}"
    );
    assert_eq!(
        d.ctl(&lab, &["backend", "list", "http-v4"])
            .expect("list")
            .as_array()
            .map(Vec::len),
        Some(4)
    );

    // SIGHUP reloads too: back to three backends; only b4's clients move.
    std::fs::write(&d.config, daemon_config(&lab, Mode::Generic, 3, &health)).expect("write");
    // SAFETY: kill(2) on the daemon we started.
    unsafe { libc::kill(d.child.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while d
        .ctl(&lab, &["backend", "list", "http-v4"])
        .expect("list")
        .as_array()
        .map_or(0, Vec::len)
        != 3
    {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            d.child.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ask_ok(&lab, old, Proto::Tcp), before);
    let again = ask_ok(&lab, new, Proto::Tcp);
    for (c, was) in &fresh {
        if was != "b4" {
            assert_eq!(&again[c], was, "{c} moved though its backend stayed");
        }
    }
    assert!(d.child.log().contains("reloaded"));
}
