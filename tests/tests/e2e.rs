//! End-to-end: real TCP (HTTP) and UDP from 32 client addresses (16 IPv4,
//! 16 IPv6) through the real `xlb` binary's XDP program on a veth, to three
//! backend namespaces whose servers answer with their own name.
//!
//! Needs root (namespaces, XDP); run by `cargo xtask test`, which sets
//! `XLB_BIN`. Every lab deletes its namespaces and pins on drop, also when
//! an assertion fails.

use std::collections::{BTreeMap, BTreeSet};

use xlb_tests::{
    Lab, LabOptions, Proto, Servers,
    driver::{self, Mode},
};

fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("end-to-end tests create namespaces and load XDP: run `cargo xtask test` as root");
    }
}

/// The whole dataplane promise in one mode: every client sticks to one
/// backend over TCP and UDP, all backends get clients, `xlb sessions`
/// agrees with what the clients saw, and a second `xlb run` changes nothing.
fn sticky_end_to_end(tag: &str, mode: Mode) {
    assert_root();
    let lab = Lab::new(tag, LabOptions::default()).expect("building the lab");
    let _servers = Servers::start(&lab).expect("starting backend servers");
    if mode == Mode::Native {
        lab.attach_lb_peer_pass().expect("XDP_PASS on the lb0 peer");
    }
    let config = driver::write_lab_config(&lab, mode).expect("config");
    let config_arg = config.to_str().expect("utf-8 path");
    let out = driver::xlb(&lab, &["run", "--config", config_arg]).expect("xlb run");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("attached xlb"), "first run must attach: {log}");

    // The kernel reports the mode we asked for.
    let link = lab
        .lb
        .ip(&["-d", "link", "show", lab.lb_if])
        .expect("ip link");
    match mode {
        Mode::Native => assert!(
            link.contains("xdp ") && !link.contains("xdpgeneric"),
            "{link}"
        ),
        Mode::Generic => assert!(link.contains("xdpgeneric"), "{link}"),
    }

    let protos = [Proto::Tcp, Proto::Udp];
    let mapping = driver::observe(&lab, &protos, 3).expect("sticky traffic");
    assert_eq!(mapping.len(), lab.client_addrs().len() * protos.len());
    for proto in protos {
        for v4 in [true, false] {
            let used: BTreeSet<&String> = mapping
                .iter()
                .filter(|((src, p), _)| *p == proto && src.is_ipv4() == v4)
                .map(|(_, b)| b)
                .collect();
            assert_eq!(
                used.len(),
                lab.backends.len(),
                "{proto:?} ipv4={v4}: every backend should get clients, got {used:?}"
            );
        }
    }

    // The kernel's sessions say the same as the clients.
    let sessions = driver::sessions(&lab, &config).expect("xlb sessions");
    let mut by_client: BTreeMap<(std::net::IpAddr, bool), String> = BTreeMap::new();
    for s in &sessions {
        let backend = s.backend.expect("session points at a live backend");
        let name = driver::backend_name(&lab, backend).expect("backend is a lab backend");
        by_client.insert((s.client, s.service.ends_with("/tcp")), name);
    }
    for ((src, proto), name) in &mapping {
        let key = (*src, *proto == Proto::Tcp);
        assert_eq!(
            by_client.get(&key),
            Some(name),
            "xlb sessions disagrees for {src} {proto:?}"
        );
    }
    assert_eq!(
        sessions.len(),
        mapping.len(),
        "one session per client and service"
    );

    // The dataplane counted one new session per client and service, then hits.
    let stats = driver::xlb(&lab, &["stats", "--config", config_arg, "--json"]).expect("stats");
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("stats JSON");
    let reason = |name: &str| {
        stats["reasons"]
            .as_array()
            .and_then(|r| r.iter().find(|e| e[0] == name))
            .and_then(|e| e[1].as_u64())
            .unwrap_or_else(|| panic!("counter {name} missing: {stats}"))
    };
    assert_eq!(reason("new_session"), mapping.len() as u64);
    assert!(reason("affinity_hit") > mapping.len() as u64 * 2, "{stats}");
    assert_eq!(reason("drop_no_backend"), 0);

    // Run again: adopts the pinned program and maps; nobody moves.
    let out = driver::xlb(&lab, &["run", "--config", config_arg]).expect("second xlb run");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("adopted"), "second run must adopt: {log}");
    let again = driver::observe(&lab, &protos, 2).expect("traffic after re-run");
    assert_eq!(
        again, mapping,
        "the client -> backend mapping changed across xlb runs"
    );

    // Detach removes program and pins.
    driver::xlb(&lab, &["detach", "--config", config_arg]).expect("xlb detach");
    let pins = lab.bpffs_dir().join(lab.lb_if);
    assert!(!pins.exists(), "{} left after detach", pins.display());
    let _ = std::fs::remove_file(&config);
}

#[test]
fn sticky_sessions_native_xdp() {
    sticky_end_to_end("e2en", Mode::Native);
}

#[test]
fn sticky_sessions_generic_xdp() {
    sticky_end_to_end("e2eg", Mode::Generic);
}

#[test]
fn bad_config_is_refused_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("xlb-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "interface = \"lo\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.10\"\nport = 80\n\
         protocol = \"tcp\"\n[[service.backend]]\naddress = \"10.0.0.21\"\nmac = \"zz:00:00:00:00:01\"\n",
    )
    .expect("writing the config");
    let out = std::process::Command::new(driver::xlb_bin().expect("xlb binary"))
        .args(["run", "--config", path.to_str().expect("utf-8")])
        .output()
        .expect("running xlb");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad config must fail: {err}");
    assert!(
        err.contains("backend[0].mac"),
        "error must name the field: {err}"
    );
    assert!(
        err.contains("zz:00:00:00:00:01"),
        "error must show the value: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
}

#[test]
fn native_attach_failure_suggests_generic() {
    assert_root();
    // Loopback has no native XDP: the error must say what to do instead.
    let lab = Lab::new("e2enat", LabOptions::default()).expect("lab");
    let path = std::env::temp_dir().join(format!("{}-lo.toml", lab.id));
    std::fs::write(
        &path,
        format!(
            "interface = \"lo\"\npin_dir = \"{}\"\n[[service]]\nname = \"web\"\nvip = \"10.77.0.10\"\n\
             port = 80\nprotocol = \"tcp\"\n[[service.backend]]\naddress = \"10.77.0.21\"\n\
             mac = \"02:00:00:00:00:11\"\n",
            lab.bpffs_dir().display()
        ),
    )
    .expect("config");
    let err = driver::xlb(&lab, &["run", "--config", path.to_str().expect("utf-8")])
        .expect_err("native XDP on lo must fail");
    let _ = std::fs::remove_file(&path);
    let msg = format!("{err:#}");
    assert!(msg.contains("--xdp-mode generic"), "{msg}");
    assert!(msg.contains("lo"), "{msg}");
    // Nothing stays attached or pinned after the failure.
    let link = lab.lb.ip(&["link", "show", "lo"]).expect("ip link");
    assert!(!link.contains("xdp"), "{link}");
    assert!(!lab.bpffs_dir().join("lo").join("link").exists());
}
