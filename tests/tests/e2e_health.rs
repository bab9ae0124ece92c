//! Health checks in the lab as operators set it up: the IPv6 VIP is an ordinary
//! *preferred* /128 on the load balancer's interface. The kernel would choose it
//! as the source of the LB's own connections to on-link backends, which hold the
//! VIP on `lo` and would answer themselves; the daemon must bind its checks to
//! the interface's own address instead, so every backend of both families stays
//! up.
//!
//! Needs root; run by `cargo xtask test`, or alone:
//! `cargo test --release -p xlb-tests --test e2e_health -- --test-threads=1`.
//! The lab, daemon and servers are removed on drop, also when an assertion fails.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use xlb_tests::{
    Lab, LabOptions, Proto, Servers,
    daemon::{Daemon, HealthOptions, METRICS, daemon_config, sample, scrape},
    driver::Mode,
    who_serves,
};

const SERVICES: [&str; 4] = ["http-v4", "echo-v4", "http-v6", "echo-v6"];
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];
fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("e2e_health creates namespaces and loads XDP: run it as root");
    }
}

/// (service, backend) -> health, from `xlb backend list --json`.
fn healths(lab: &Lab, d: &Daemon) -> Vec<(String, String, String)> {
    let list = d.ctl(lab, &["backend", "list"]).expect("backend list");
    list.as_array()
        .expect("a list")
        .iter()
        .map(|b| {
            let s = |k: &str| b[k].as_str().unwrap_or_default().to_string();
            (s("service"), s("name"), s("health"))
        })
        .collect()
}

fn not_up(all: &[(String, String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for svc in SERVICES {
        for be in BACKENDS {
            let h = all
                .iter()
                .find(|(s, b, _)| s == svc && b == be)
                .map_or("missing", |(_, _, h)| h.as_str());
            if h != "up" {
                out.push(format!("{svc}/{be}: {h}"));
            }
        }
    }
    out
}

#[test]
fn checks_pass_with_a_preferred_ipv6_vip() {
    assert_root();
    let lab = Lab::new("hsrc", LabOptions::default()).expect("building the lab");
    // The lab's VIP is not hidden from source selection any more.
    let deprecated = lab
        .lb
        .ip(&["-6", "addr", "show", "dev", lab.lb_if, "deprecated"])
        .expect("ip addr");
    assert!(
        !deprecated.contains(&lab.vip6.to_string()),
        "the lab's IPv6 VIP must be a preferred address: {deprecated}"
    );

    let _servers = Servers::start(&lab).expect("starting backend servers");
    let health = HealthOptions::default();
    let config = lab.work_dir().join("xlb.toml");
    let text = format!(
        "metrics_address = \"{METRICS}\"\n{}",
        daemon_config(&lab, Mode::Generic, BACKENDS.len(), &health)
    );
    std::fs::write(&config, text).expect("writing the config");
    let d = Daemon::start(&lab, &config).expect("starting xlb daemon");
    let interval = Duration::from_millis(500);
    assert_eq!(health.interval, "500ms");
    let fall = health.fall;

    // Up within a few intervals (rise checks plus the start spread), whether backends
    // start up or start down.
    let start = Instant::now();
    loop {
        let missing = not_up(&healths(&lab, &d));
        if missing.is_empty() {
            break;
        }
        if start.elapsed() > interval * 10 {
            panic!(
                "not up within {:?}: {missing:?}\ndaemon log:\n{}",
                interval * 10,
                d.child.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // And still up over twice fall × interval: failing checks would have taken any of
    // them down by then.
    let watch = interval * fall * 2;
    let start = Instant::now();
    while start.elapsed() < watch {
        let missing = not_up(&healths(&lab, &d));
        assert!(
            missing.is_empty(),
            "went down: {missing:?}\ndaemon log:\n{}",
            d.child.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Up because checks pass, not merely because none has failed yet: every backend of
    // every service has passing checks on record, and none was "not run".
    let m = scrape(&lab);
    for svc in SERVICES {
        for be in BACKENDS {
            let labels = format!("{{service=\"{svc}\",backend=\"{be}\"}}");
            let passed = sample(
                &m,
                &format!("xlb_health_check_duration_seconds_count{labels}"),
            )
            .unwrap_or(0.0);
            assert!(
                passed >= f64::from(fall),
                "{svc}/{be}: {passed} passes\n{m}"
            );
            let not_run = sample(&m, &format!("xlb_health_checks_not_run_total{labels}"));
            assert!(not_run.is_none_or(|n| n == 0.0), "{svc}/{be}: {not_run:?}");
        }
    }
    // The checks left from the interface's own address, which the daemon says it found.
    let log = d.child.log();
    assert!(
        log.contains(&format!(
            "IPv6 health checks leave from {} (detected on {})",
            lab.lb_ipv6, lab.lb_if
        )),
        "{log}"
    );

    // And the service works for IPv6 clients through the preferred VIP.
    let client = IpAddr::V6(lab.client_v6[0]);
    for proto in [Proto::Tcp, Proto::Udp] {
        let name = who_serves(&lab, client, proto)
            .unwrap_or_else(|e| panic!("{proto:?} from {client}: {e:#}"));
        assert!(
            lab.backend(&name).is_some(),
            "{proto:?} answered by {name:?}"
        );
    }
}
