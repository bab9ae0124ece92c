//! Spoofed-source floods against sticky sessions (issue 8, item 1): after
//! a backend add, during a drain and after a failure and recovery, some real
//! clients are on a backend other than the current Maglev answer (or on a
//! draining one) and depend on their session. A bounded flood of spoofed
//! sources, 4 × `affinity_max_entries` of them with 2 frames each (the
//! second makes each entry "referenced", so the LRU evicts real ones), on
//! every service (TCP and UDP, IPv4 and IPv6), must not move any of them;
//! nor may a UDP flood on one service move another service's TCP clients.
//! The flood-protection counters must say what happened: divergent sessions
//! kept by userspace, new sources admitted or skipped by the admission
//! budget, protected hits for the real clients afterwards.
//!
//! Needs root; run by `cargo xtask test`, or alone:
//! `cargo test --release -p xlb-tests --test e2e_flood -- --test-threads=1`.
//! Labs, daemons and servers are removed on drop, also when an assertion fails.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use xlb_tests::{
    HTTP_PORT, Lab, LabOptions, Proto, Servers, UDP_PORT,
    daemon::{
        Daemon, HealthOptions, METRICS, PROTOS, SERVICES, ask, assert_root, daemon_config,
        only_moved_from, sample, scrape,
    },
    driver::{self, Mapping, Mode},
    flood::Flood,
    frames::L4,
};

/// `affinity_max_entries`: small, so 4× of it floods in about a second.
const CAPACITY: u32 = 2048;
/// Spoofed sources per flooded service: 4 × the affinity capacity.
const SOURCES: u32 = 4 * CAPACITY;
/// Frames per spoofed source: two, so every flood entry gets referenced.
const PER_SOURCE: u32 = 2;
/// `affinity_admit_rate` of the IPv4 services (new entries per second per
/// CPU): far below the flood's rate, so admission must skip most of their
/// flood sources.
const ADMIT_RATE: u32 = 1000;
/// `affinity_admit_rate` of the IPv6 services: no limit, so their floods
/// turn the whole affinity LRU over several times and only the protected
/// map can keep the divergent sessions (of every service: the LRU is shared).
const ADMIT_UNLIMITED: u32 = 0;
/// Flood frames per second (paced so the veths lose nothing).
const FLOOD_RATE: u32 = 50_000;
/// Real client addresses per family.
const CLIENTS: usize = 32;

/// A client address and the protocol it speaks: one session per service.
type Pair = (IpAddr, Proto);

/// A lab with a daemon; fields drop in order (daemon, servers, lab).
struct Fl {
    d: Daemon,
    servers: Servers,
    lab: Lab,
    /// Number of the next unused spoofed source: every flood uses fresh ones.
    next_source: u32,
}

/// The config: metrics on, a small affinity map, a low admission rate in
/// the IPv4 services and none in the IPv6 ones.
fn config_text(base: &str) -> String {
    let mut text =
        format!("metrics_address = \"{METRICS}\"\naffinity_max_entries = {CAPACITY}\n{base}");
    for svc in SERVICES {
        let line = format!("name = \"{svc}\"\n");
        let rate = admit_rate(svc);
        text = text.replace(&line, &format!("{line}affinity_admit_rate = {rate}\n"));
    }
    text
}

/// The `affinity_admit_rate` the test gives a service.
fn admit_rate(svc: &str) -> u32 {
    if svc.ends_with("v4") {
        ADMIT_RATE
    } else {
        ADMIT_UNLIMITED
    }
}

/// A lab of `lab_backends` backends (all serving) and 32 + 32 clients, with a
/// daemon over the first `daemon_backends`, every backend up.
fn setup(tag: &str, lab_backends: usize, daemon_backends: usize) -> Fl {
    assert_root();
    let t0 = Instant::now();
    let opts = LabOptions {
        backends: lab_backends,
        clients_v4: CLIENTS,
        clients_v6: CLIENTS,
    };
    let lab = Lab::new(tag, opts).unwrap_or_else(|e| panic!("{e:#}"));
    let servers = Servers::start(&lab).unwrap_or_else(|e| panic!("{e:#}"));
    let config = lab.work_dir().join("xlb.toml");
    let base = daemon_config(
        &lab,
        Mode::Generic,
        daemon_backends,
        &HealthOptions::default(),
    );
    let text = config_text(&base);
    assert_eq!(
        text.matches("affinity_admit_rate").count(),
        SERVICES.len(),
        "{text}"
    );
    write(&config, &text);
    let d = Daemon::start(&lab, &config).unwrap_or_else(|e| panic!("{e:#}"));
    let fl = Fl {
        d,
        servers,
        lab,
        next_source: 0,
    };
    for b in 1..=daemon_backends {
        fl.wait_all(&format!("b{b}"), "health", "up");
    }
    eprintln!("{tag}: lab and daemon ready in {:?}", t0.elapsed());
    fl
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// The lab service a pair's session belongs to.
fn service(pair: &Pair) -> &'static str {
    match (pair.0.is_ipv4(), pair.1) {
        (true, Proto::Tcp) => "http-v4",
        (true, Proto::Udp) => "echo-v4",
        (false, Proto::Tcp) => "http-v6",
        (false, Proto::Udp) => "echo-v6",
    }
}

/// A service's VIP, port and protocol, by name.
fn endpoint(lab: &Lab, svc: &str) -> (IpAddr, u16, L4) {
    let vip = if svc.ends_with("v4") {
        IpAddr::V4(lab.vip4)
    } else {
        IpAddr::V6(lab.vip6)
    };
    if svc.starts_with("http") {
        (vip, HTTP_PORT, L4::Tcp)
    } else {
        (vip, UDP_PORT, L4::Udp)
    }
}

/// Kernel reasons (`xlb stats`) and the metrics text at one moment.
struct Snap {
    reasons: BTreeMap<String, u64>,
    metrics: String,
}

impl Snap {
    /// A kernel reason's count; absent counts as 0.
    fn reason(&self, name: &str) -> u64 {
        self.reasons.get(name).copied().unwrap_or(0)
    }

    /// A metric sample; absent counts as 0.
    fn metric(&self, series: &str) -> f64 {
        sample(&self.metrics, series).unwrap_or(0.0)
    }
}

impl Fl {
    fn ctl(&self, args: &[&str]) -> serde_json::Value {
        self.d
            .ctl(&self.lab, args)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn wait_all(&self, backend: &str, field: &str, value: &str) {
        self.d
            .wait_all(&self.lab, backend, field, value)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Every client's backend over TCP and UDP (one request each).
    fn observe(&self) -> Mapping {
        driver::observe(&self.lab, &PROTOS, 1).unwrap_or_else(|e| panic!("traffic: {e:#}"))
    }

    fn snap(&self) -> Snap {
        let stats = self.ctl(&["stats"]);
        let reasons = stats["reasons"]
            .as_array()
            .unwrap_or_else(|| panic!("stats without reasons: {stats}"))
            .iter()
            .filter_map(|r| Some((r[0].as_str()?.to_string(), r[1].as_u64()?)))
            .collect();
        Snap {
            reasons,
            metrics: scrape(&self.lab),
        }
    }

    /// `xlb sessions where` for every client: the pairs whose session backend
    /// differs from the live Maglev answer. Each session must agree with what
    /// its client saw in `mapping`.
    fn divergent(&self, mapping: &Mapping) -> BTreeSet<Pair> {
        let mut out = BTreeSet::new();
        for c in self.lab.client_addrs() {
            let list = self.ctl(&["sessions", "where", &c.to_string()]);
            for w in list.as_array().unwrap_or_else(|| panic!("where: {list}")) {
                let proto = if w["service"].as_str().is_some_and(|s| s.starts_with("http")) {
                    Proto::Tcp
                } else {
                    Proto::Udp
                };
                let seen = &mapping[&(c, proto)];
                assert_eq!(
                    w["backend"].as_str(),
                    Some(seen.as_str()),
                    "{c} {proto:?}: {w}"
                );
                if w["backend"] != w["maglev_backend"] {
                    out.insert((c, proto));
                }
            }
        }
        out
    }

    /// The real clients' sessions `xlb sessions list` marks protected.
    fn protected(&self) -> BTreeSet<Pair> {
        let clients: BTreeSet<IpAddr> = self.lab.client_addrs().into_iter().collect();
        let list = self.ctl(&["sessions", "list"]);
        list.as_array()
            .unwrap_or_else(|| panic!("sessions list: {list}"))
            .iter()
            .filter(|s| s["protected"] == true)
            .filter_map(|s| {
                let client: IpAddr = s["client"].as_str()?.parse().ok()?;
                let proto = if s["service"].as_str()?.starts_with("http") {
                    Proto::Tcp
                } else {
                    Proto::Udp
                };
                clients.contains(&client).then_some((client, proto))
            })
            .collect()
    }

    /// Problems if the protected sessions are not exactly `at_risk`.
    fn check_protected(&self, what: &str, at_risk: &BTreeSet<Pair>, problems: &mut Vec<String>) {
        let protected = self.protected();
        if protected != *at_risk {
            problems.push(format!(
                "{what}: `xlb sessions list` protects {} sessions, {} are at risk; unprotected at risk: {:?}; protected not at risk: {:?}",
                protected.len(),
                at_risk.len(),
                at_risk.difference(&protected).collect::<Vec<_>>(),
                protected.difference(at_risk).collect::<Vec<_>>()
            ));
        }
    }

    /// Floods each of `services` with [`SOURCES`] fresh spoofed sources ×
    /// [`PER_SOURCE`] frames; checks that the load balancer saw them. Returns
    /// the number of sources sent to services with an admission limit and
    /// to services without.
    fn flood(&mut self, services: &[&str]) -> Sources {
        let mut sources = Sources::default();
        for svc in services {
            let (vip, port, l4) = endpoint(&self.lab, svc);
            let mut f = Flood::to_lab(&self.lab, vip, port, l4, self.next_source, SOURCES);
            f.per_source = PER_SOURCE;
            f.rate = FLOOD_RATE;
            self.next_source += SOURCES;
            let packets = format!("xlb_service_packets_total{{service=\"{svc}\"}}");
            let before = sample(&scrape(&self.lab), &packets).unwrap_or(0.0);
            let report = f
                .send(&self.lab.client, self.lab.client_if)
                .unwrap_or_else(|e| panic!("{e:#}"));
            let seen = sample(&scrape(&self.lab), &packets).unwrap_or(0.0) - before;
            eprintln!(
                "flood {svc}: {SOURCES} sources x {PER_SOURCE}: {report:?}, the LB counted {seen}"
            );
            assert!(
                report.sent == report.frames && !report.timed_out,
                "flood of {svc} incomplete: {report:?}"
            );
            // The flood must really reach the load balancer (real traffic is
            // idle meanwhile), else a pass proves nothing.
            assert!(
                seen >= 0.95 * report.frames as f64,
                "the LB counted {seen} of {} flood frames on {svc}",
                report.frames
            );
            if admit_rate(svc) == ADMIT_UNLIMITED {
                sources.unlimited += u64::from(SOURCES);
            } else {
                sources.limited += u64::from(SOURCES);
            }
        }
        sources
    }
}

/// Spoofed sources sent by a flood, by the admission limit of their service.
#[derive(Clone, Copy, Debug, Default)]
struct Sources {
    /// To services with an `affinity_admit_rate`.
    limited: u64,
    /// To services without.
    unlimited: u64,
}

/// What one scenario saw, checked by [`verify`].
struct Run<'a> {
    what: &'static str,
    /// Every pair's backend before the flood.
    reference: &'a Mapping,
    /// Pairs whose backend differs from the live Maglev answer (`where`).
    divergent: &'a BTreeSet<Pair>,
    /// Pairs that depend on their session: `divergent`, and the clients of
    /// a draining backend.
    at_risk: &'a BTreeSet<Pair>,
    before_change: &'a Snap,
    after_change: &'a Snap,
    before_flood: &'a Snap,
    after_flood: &'a Snap,
    /// The observation after the flood.
    after: &'a Mapping,
    end: &'a Snap,
    /// Spoofed sources sent in the flood between `before_flood` and `after_flood`.
    sources: Sources,
}

/// Checks a run: nobody moved, and every flood-protection counter moved as
/// it should. Collects every problem into `problems`.
fn verify(run: &Run, problems: &mut Vec<String>) {
    let what = run.what;
    let moved: Vec<String> = run
        .reference
        .iter()
        .filter(|(k, was)| run.after.get(k) != Some(was))
        .map(|(k, was)| {
            let risk = if run.at_risk.contains(k) {
                " (at risk)"
            } else {
                ""
            };
            format!("{} {:?} {was} -> {:?}{risk}", k.0, k.1, run.after.get(k))
        })
        .collect();
    let moved_at_risk = run
        .at_risk
        .iter()
        .filter(|k| run.after.get(k) != run.reference.get(k))
        .count();
    eprintln!(
        "{what}: {} divergent, {} at risk of {} pairs; after the flood {} moved ({moved_at_risk} of them at risk)",
        run.divergent.len(),
        run.at_risk.len(),
        run.reference.len(),
        moved.len()
    );
    if !moved.is_empty() {
        problems.push(format!(
            "{what}: the flood moved {} of {} pairs ({moved_at_risk} of {} at risk): {moved:#?}",
            moved.len(),
            run.reference.len(),
            run.at_risk.len()
        ));
    }

    let mut check = |ok: bool, text: String| {
        if !ok {
            problems.push(format!("{what}: {text}"));
        }
    };
    // The change: userspace moved the divergent sessions where no flood reaches.
    let need = run.divergent.len().max(1) as f64;
    let kept = run.after_change.metric("xlb_affinity_divergent_kept_total")
        - run
            .before_change
            .metric("xlb_affinity_divergent_kept_total");
    check(
        kept >= need,
        format!("xlb_affinity_divergent_kept_total moved by {kept} at the change, want >= {need}"),
    );
    for svc in SERVICES {
        let want = run.at_risk.iter().filter(|p| service(p) == svc).count() as f64;
        let gauge = format!("xlb_affinity_protected_entries{{service=\"{svc}\"}}");
        for (when, snap) in [
            ("after the change", run.after_change),
            ("at the end", run.end),
        ] {
            let have = snap.metric(&gauge);
            check(
                have >= want,
                format!("{gauge} is {have} {when}, want >= {want} (its sessions at risk)"),
            );
        }
    }
    let protected: f64 = SERVICES
        .iter()
        .map(|svc| {
            run.after_change.metric(&format!(
                "xlb_affinity_protected_entries{{service=\"{svc}\"}}"
            ))
        })
        .sum();
    check(
        protected > 0.0,
        format!("no protected entry after the change ({protected})"),
    );

    // The flood: every new source is admitted or skipped; the low admission
    // rate skips most of its services' sources, the services without a limit
    // admit all of theirs (and so turn the whole LRU over).
    let fd = |r: &str| {
        run.after_flood
            .reason(r)
            .saturating_sub(run.before_flood.reason(r))
    };
    let admitted = fd("affinity_admitted");
    let skipped = fd("affinity_admission_skipped");
    let Sources { limited, unlimited } = run.sources;
    eprintln!(
        "{what}: flood of {limited} sources (limited) + {unlimited} (unlimited): admitted {admitted}, admission skipped {skipped}, new_session {}",
        fd("new_session")
    );
    check(
        admitted > 0,
        format!("affinity_admitted moved by {admitted} during the flood"),
    );
    check(
        skipped > 0,
        format!("affinity_admission_skipped moved by {skipped} during the flood"),
    );
    check(
        (admitted + skipped) as f64 >= 0.9 * (limited + unlimited) as f64,
        format!(
            "admitted {admitted} + skipped {skipped} < 90% of the {} flood sources",
            limited + unlimited
        ),
    );
    check(
        skipped as f64 >= 0.5 * limited as f64,
        format!("only {skipped} of {limited} flood sources skipped at {ADMIT_RATE}/s per CPU"),
    );
    check(
        admitted as f64 >= 0.9 * unlimited as f64 && unlimited >= 4 * u64::from(CAPACITY),
        format!(
            "admitted {admitted}: the {unlimited} sources without a limit did not turn the LRU of {CAPACITY} over 4 times"
        ),
    );
    for (metric, kernel) in [
        ("xlb_affinity_admitted_total", admitted),
        ("xlb_affinity_admission_skipped_total", skipped),
        ("xlb_frames_total{reason=\"affinity_admitted\"}", admitted),
        (
            "xlb_frames_total{reason=\"affinity_admission_skipped\"}",
            skipped,
        ),
    ] {
        let d = run.after_flood.metric(metric) - run.before_flood.metric(metric);
        // Read moments apart while nothing flows: the two must agree.
        check(
            d > 0.0 && d >= 0.9 * kernel as f64,
            format!("{metric} moved by {d} during the flood; the kernel counted {kernel}"),
        );
    }

    // Afterwards: the at-risk clients were served from the protected map.
    let need = run.divergent.len().max(1);
    let hits = run
        .end
        .reason("affinity_hit_protected")
        .saturating_sub(run.after_flood.reason("affinity_hit_protected"));
    check(
        hits >= need as u64,
        format!("affinity_hit_protected moved by {hits} for {need} divergent clients"),
    );
    for metric in [
        "xlb_affinity_protected_hits_total",
        "xlb_frames_total{reason=\"affinity_hit_protected\"}",
    ] {
        let d = run.end.metric(metric) - run.after_flood.metric(metric);
        check(
            d >= need as f64,
            format!("{metric} moved by {d} for {need} divergent clients"),
        );
    }
}

/// Panics listing every problem, if any.
fn conclude(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// A backend added to every service: clients whose Maglev answer is now the
/// new backend stay where they were through a UDP-only flood (checked on the
/// TCP services: another service's flood) and through a flood of everything.
#[test]
fn flood_after_backend_add() {
    let t0 = Instant::now();
    let mut fl = setup("fladd", 4, 3);
    let mut problems = Vec::new();
    let before = fl.observe();
    let s0 = fl.snap();

    let b4 = fl.lab.backend("b4").expect("b4");
    let (addr4, addr6, mac) = (b4.ipv4.to_string(), b4.ipv6.to_string(), b4.mac.to_string());
    for svc in SERVICES {
        let addr = if svc.ends_with("v4") { &addr4 } else { &addr6 };
        fl.ctl(&["backend", "add", svc, addr, "--mac", &mac, "--name", "b4"]);
    }
    fl.wait_all("b4", "state", "active");
    let after_add = fl.observe();
    assert_eq!(after_add, before, "the add itself moved clients");
    let divergent = fl.divergent(&before);
    eprintln!(
        "add: {} of {} pairs now differ from Maglev",
        divergent.len(),
        before.len()
    );
    assert!(
        divergent.iter().filter(|p| p.1 == Proto::Tcp).count() >= 2,
        "too few divergent TCP clients to test: {divergent:?}"
    );
    let s1 = fl.snap();
    fl.check_protected("add, after the change", &divergent, &mut problems);

    // Another service's flood: UDP only, then look at the TCP clients.
    fl.flood(&["echo-v4", "echo-v6"]);
    let clients = fl.lab.client_addrs();
    let tcp = ask(&fl.lab, &clients, Proto::Tcp).unwrap_or_else(|e| panic!("{e:#}"));
    let tcp_moved: Vec<String> = tcp
        .iter()
        .filter(|(c, b)| before[&(**c, Proto::Tcp)] != **b)
        .map(|(c, b)| format!("{c}: {} -> {b}", before[&(*c, Proto::Tcp)]))
        .collect();
    eprintln!("add: a UDP flood moved {} TCP clients", tcp_moved.len());
    if !tcp_moved.is_empty() {
        problems.push(format!(
            "add: a UDP-only flood moved TCP clients: {tcp_moved:#?}"
        ));
    }

    let s2 = fl.snap();
    let sources = fl.flood(&SERVICES);
    let s3 = fl.snap();
    let after = fl.observe();
    let end = fl.snap();
    fl.check_protected("add, after the flood", &divergent, &mut problems);
    verify(
        &Run {
            what: "add",
            reference: &before,
            divergent: &divergent,
            at_risk: &divergent,
            before_change: &s0,
            after_change: &s1,
            before_flood: &s2,
            after_flood: &s3,
            after: &after,
            end: &end,
            sources,
        },
        &mut problems,
    );
    eprintln!("flood_after_backend_add took {:?}", t0.elapsed());
    conclude("flood after a backend add", &problems);
}

/// b1 draining in every service: its clients keep it through the flood, and
/// the drain does not end for lack of sessions.
#[test]
fn flood_during_drain() {
    let t0 = Instant::now();
    let mut fl = setup("fldrain", 3, 3);
    let mut problems = Vec::new();
    let before = fl.observe();
    let on_b1: BTreeSet<Pair> = before
        .iter()
        .filter(|(_, b)| *b == "b1")
        .map(|(k, _)| *k)
        .collect();
    assert!(on_b1.len() >= 4, "too few clients on b1: {before:?}");
    let s0 = fl.snap();

    for svc in SERVICES {
        fl.ctl(&["backend", "drain", svc, "b1"]);
    }
    fl.wait_all("b1", "state", "draining");
    let during = fl.observe();
    assert_eq!(during, before, "the drain itself moved clients");
    let divergent = fl.divergent(&before);
    let at_risk: BTreeSet<Pair> = divergent.union(&on_b1).copied().collect();
    eprintln!(
        "drain: {} pairs on b1, {} differ from Maglev",
        on_b1.len(),
        divergent.len()
    );
    let s1 = fl.snap();
    fl.check_protected("drain, after the change", &at_risk, &mut problems);

    let s2 = s1;
    let sources = fl.flood(&SERVICES);
    let s3 = fl.snap();
    let after = fl.observe();
    let end = fl.snap();
    fl.check_protected("drain, after the flood", &at_risk, &mut problems);
    for svc in SERVICES {
        let b1 =
            fl.d.backend(&fl.lab, svc, "b1")
                .unwrap_or_else(|e| panic!("{e:#}"));
        if b1["admin"] != "draining" {
            problems.push(format!(
                "drain: {svc}/b1 stopped draining during the flood: {b1}"
            ));
        }
    }
    verify(
        &Run {
            what: "drain",
            reference: &before,
            divergent: &divergent,
            at_risk: &at_risk,
            before_change: &s0,
            after_change: &s2,
            before_flood: &s2,
            after_flood: &s3,
            after: &after,
            end: &end,
            sources,
        },
        &mut problems,
    );
    eprintln!("flood_during_drain took {:?}", t0.elapsed());
    conclude("flood during a drain", &problems);
}

/// b2 fails (its clients move) and recovers (the moved clients now differ
/// from Maglev, which answers b2 again): they keep their current backend
/// through the flood.
#[test]
fn flood_after_failure_and_recovery() {
    let t0 = Instant::now();
    let mut fl = setup("flfail", 3, 3);
    let mut problems = Vec::new();
    let before = fl.observe();
    let s0 = fl.snap();

    fl.servers
        .stop_backend("b2")
        .unwrap_or_else(|e| panic!("{e:#}"));
    fl.wait_all("b2", "state", "down");
    let failed = fl.observe();
    let moved = only_moved_from(&before, &failed, "b2").unwrap_or_else(|e| panic!("{e:#}"));
    assert!(moved >= 4, "too few clients moved off b2: {moved}");
    let moved_pairs: BTreeSet<Pair> = before
        .iter()
        .filter(|(_, b)| *b == "b2")
        .map(|(k, _)| *k)
        .collect();

    fl.servers
        .start_backend(&fl.lab, "b2")
        .unwrap_or_else(|e| panic!("{e:#}"));
    fl.wait_all("b2", "state", "active");
    let recovered = fl.observe();
    assert_eq!(recovered, failed, "the recovery itself moved clients");
    let divergent = fl.divergent(&failed);
    eprintln!(
        "failure: {} pairs moved off b2 and back up; {} differ from Maglev",
        moved_pairs.len(),
        divergent.len()
    );
    assert!(
        moved_pairs.is_subset(&divergent),
        "a client moved by the failure agrees with Maglev after the recovery: moved {moved_pairs:?}, divergent {divergent:?}"
    );
    let s1 = fl.snap();
    fl.check_protected("failure, after the recovery", &divergent, &mut problems);

    let sources = fl.flood(&SERVICES);
    let s3 = fl.snap();
    let after = fl.observe();
    let end = fl.snap();
    fl.check_protected("failure, after the flood", &divergent, &mut problems);
    verify(
        &Run {
            what: "failure and recovery",
            reference: &failed,
            divergent: &divergent,
            at_risk: &divergent,
            before_change: &s0,
            after_change: &s1,
            before_flood: &s1,
            after_flood: &s3,
            after: &after,
            end: &end,
            sources,
        },
        &mut problems,
    );
    eprintln!("flood_after_failure_and_recovery took {:?}", t0.elapsed());
    conclude("flood after a failure and recovery", &problems);
}
