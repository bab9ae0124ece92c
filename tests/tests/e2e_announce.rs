//! Announcing VIPs by health (`announce_table`): the daemon keeps a host route
//! (proto 120) per ready VIP in table 100 of the LB namespace, withdraws a VIP
//! whose backends all fail (panic mode does not count as ready), announces it
//! again when they recover, and withdraws everything on SIGTERM before it exits.
//!
//! Needs root; run alone:
//! `cargo test --release -p xlb-tests --test e2e_announce -- --test-threads=1`.
//! The lab, daemon and servers are removed on drop, also when an assertion fails.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use xlb_tests::{
    Lab, LabOptions,
    daemon::{Daemon, HealthOptions, METRICS, assert_root, sample, scrape, start_lab},
};

const TABLE: &str = "100";
const BACKENDS: [&str; 2] = ["b1", "b2"];
const SERVICES: [&str; 4] = ["http-v4", "echo-v4", "http-v6", "echo-v6"];

/// The VIPs with an xlb route (proto 120, host prefix, dev lb0) in table 100.
fn announced(lab: &Lab) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for family in ["-4", "-6"] {
        let routes = lab
            .lb
            .ip_json(&[family, "route", "show", "table", TABLE])
            .expect("ip route show table 100");
        for r in routes.as_array().into_iter().flatten() {
            let proto = r["protocol"].to_string().trim_matches('"').to_string();
            if proto != "120" {
                continue;
            }
            assert_eq!(r["dev"], lab.lb_if, "{r}");
            let dst: IpAddr = r["dst"]
                .as_str()
                .and_then(|d| d.parse().ok())
                .unwrap_or_else(|| panic!("a host route: {r}"));
            out.insert(dst);
        }
    }
    out
}

/// Polls until table 100 holds exactly `want`; returns how long it took.
fn wait_announced(
    lab: &Lab,
    want: &BTreeSet<IpAddr>,
    within: Duration,
    log: impl Fn() -> String,
) -> Duration {
    let start = Instant::now();
    loop {
        let now = announced(lab);
        if &now == want {
            return start.elapsed();
        }
        if start.elapsed() > within {
            panic!(
                "table {TABLE} holds {now:?}, expected {want:?} within {within:?}\n{}",
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn vips_are_announced_by_health_and_withdrawn_before_exit() {
    assert_root();
    let opts = LabOptions {
        backends: 2,
        clients_v4: 1,
        clients_v6: 1,
    };
    let (lab, mut servers, d) = start_lab("ann", opts, 2, &HealthOptions::default(), |text| {
        format!("announce_table = {TABLE}\nmetrics_address = \"{METRICS}\"\n{text}")
    })
    .expect("lab");
    let both: BTreeSet<IpAddr> = lab.vips().into_iter().collect();
    let log = || d.child.log();

    let took = wait_announced(&lab, &both, Duration::from_secs(5), log);
    eprintln!("both VIPs announced {took:?} after the daemon answered");
    let metrics = scrape(&lab);
    for vip in &both {
        let series = format!("xlb_vip_announced{{vip=\"{vip}\"}}");
        assert_eq!(sample(&metrics, &series), Some(1.0), "{series}\n{metrics}");
    }

    // Every backend down: every service enters panic mode (still forwarding to
    // all), but panic is not ready: both VIPs are withdrawn.
    for b in BACKENDS {
        servers.stop_backend(b).expect("stop servers");
    }
    let took = wait_announced(&lab, &BTreeSet::new(), Duration::from_secs(8), log);
    eprintln!("both VIPs withdrawn {took:?} after every backend's servers stopped");
    let metrics = scrape(&lab);
    for svc in SERVICES {
        let series = format!("xlb_service_panic{{service=\"{svc}\"}}");
        assert_eq!(sample(&metrics, &series), Some(1.0), "{series}\n{metrics}");
    }
    for vip in &both {
        let series = format!("xlb_vip_announced{{vip=\"{vip}\"}}");
        assert_eq!(sample(&metrics, &series), Some(0.0), "{series}\n{metrics}");
    }
    let text = d.child.log();
    assert!(
        text.contains("withdrew VIP") && text.contains("panic mode"),
        "the withdraw is logged with its reason:\n{text}"
    );

    // One backend back: both VIPs (served by b1 in every service) are announced again.
    servers.start_backend(&lab, "b1").expect("restart b1");
    let took = wait_announced(&lab, &both, Duration::from_secs(8), log);
    eprintln!("both VIPs announced again {took:?} after b1 came back");

    let config = d.config.clone();
    // SIGTERM: the routes are withdrawn by the daemon itself (nothing else removes
    // them: they outlive a killed process), so they are gone once it has exited.
    let (status, text) = d.child.stop().expect("stopping the daemon");
    assert!(status.success(), "{status}\n{text}");
    assert_eq!(
        announced(&lab),
        BTreeSet::new(),
        "routes left after SIGTERM\n{text}"
    );
    let stopping = text.matches("the daemon is stopping").count();
    assert_eq!(stopping, 2, "one withdraw line per VIP:\n{text}");

    // A route of xlb's left by an earlier run (as after kill -9) for a VIP not
    // in the config is removed at start; a route of another protocol is not touched.
    let ip = |args: &[&str]| lab.lb.ip(args).expect("ip route add");
    ip(&[
        "route",
        "add",
        "10.77.9.9/32",
        "dev",
        lab.lb_if,
        "table",
        TABLE,
        "proto",
        "120",
    ]);
    ip(&[
        "route",
        "add",
        "10.77.9.10/32",
        "dev",
        lab.lb_if,
        "table",
        TABLE,
        "proto",
        "static",
    ]);
    let d = Daemon::start(&lab, &config).expect("restarting the daemon");
    let took = wait_announced(&lab, &both, Duration::from_secs(5), || d.child.log());
    eprintln!("after a restart: stale route gone, both VIPs announced within {took:?}");
    let kept = lab
        .lb
        .ip(&["route", "show", "table", TABLE, "10.77.9.10/32"])
        .expect("ip route show");
    assert!(
        kept.contains("10.77.9.10"),
        "a route not of xlb's was removed"
    );
    assert!(
        d.child
            .log()
            .contains("withdrew VIP 10.77.9.9: a route left by an earlier run"),
        "{}",
        d.child.log()
    );
}
