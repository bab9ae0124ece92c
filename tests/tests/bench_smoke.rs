//! Keeps `cargo xtask bench` from rotting: runs its smallest configuration
//! and checks it produces numbers (not how fast they are). Needs root.

use xlb_tests::bench::{
    Budget, Table,
    generator::{Generator, Pick},
    machine, prog_cost, report, scaling, traffic, transition,
};

#[test]
fn smallest_bench_produces_a_report() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the bench loads XDP: run as root"
    );
    let mut r = xlb_tests::bench::Report {
        command: "bench_smoke".into(),
        quick: true,
        ..Default::default()
    };
    r.tables = prog_cost::part1(Budget::SMOKE).expect("part 1");
    r.scale = prog_cost::part2(Budget::SMOKE).expect("part 2");
    let costs = &r.tables[0];
    assert_eq!(costs.rows.len(), 4);
    // The encapsulating path, each frame run once, against the L2 hit of its family.
    let once = &r.tables[1];
    for (row, l2) in [
        (
            "xlb ipip hit, IPv4, repeat=1",
            "xlb affinity hit, IPv4, repeat=1",
        ),
        (
            "xlb ipip hit, IPv6, repeat=1",
            "xlb affinity hit, IPv6, repeat=1",
        ),
    ] {
        assert!(once.rows.iter().any(|r| r.name == l2), "{l2} missing");
        assert!(
            once.extra.iter().any(|(r, c, v)| r == row
                && c == "× L2 hit, same family"
                && v.parse::<f64>().is_ok()),
            "{row}: no ratio to {l2}: {:?}",
            once.extra
        );
    }
    for row in r.tables.iter().flat_map(|t| &t.rows) {
        assert_eq!(row.samples.len(), Budget::SMOKE.rounds, "{}", row.name);
        assert!(
            row.median > 0.0 && row.median.is_finite(),
            "{}: {}",
            row.name,
            row.median
        );
    }
    // The generator the machine allows (live frames or, where the kernel
    // refuses them, the AF_PACKET generator), and the ring also where live frames
    // work: it is the one a refusing kernel falls back to, so it must not rot.
    let rate = traffic::part3(Budget::SMOKE).expect("part 3 (packet rate)");
    let auto_gen = check_rate_table(&rate);
    if auto_gen != Generator::AfPacket.label() {
        let ring = traffic::part3(Budget {
            generator: Pick::AfPacket,
            ..Budget::SMOKE
        })
        .expect("part 3 with the AF_PACKET generator");
        assert_eq!(check_rate_table(&ring), Generator::AfPacket.label());
    }
    assert!(
        ip_netns_empty_of("xlbrate"),
        "rate bench left namespaces behind"
    );
    r.tables.push(rate);
    let cores = scaling::part_scaling(Budget::SMOKE).expect("part 3b (rate against cores)");
    assert_eq!(cores.rows.len(), 3 * machine::cpus().len());
    assert!(
        cores
            .extra
            .iter()
            .any(|(r, c, _)| r.starts_with("xlb ipip") && c == "× xlb L2, same cores"),
        "scaling: no ipip ratio to xlb L2"
    );
    for row in &cores.rows {
        assert!(row.median > 0.0, "{}: nothing arrived", row.name);
        assert_eq!(
            cell(&cores, &row.name, "generator").as_deref(),
            Some(auto_gen.as_str()),
            "{}: the generator is named",
            row.name
        );
    }
    assert!(
        cores.title.contains(&auto_gen) && cores.about.contains(&auto_gen),
        "scaling names its generator: {} / {}",
        cores.title,
        cores.about
    );
    assert!(
        cores.about.contains(&machine::describe_cpus()),
        "machine facts missing: {}",
        cores.about
    );
    assert!(
        ip_netns_empty_of("xlbrate"),
        "scaling bench left namespaces behind"
    );
    r.tables.push(cores);

    let p = &r.scale[0];
    assert_eq!(p.entries, 1_000);
    assert!(p.hit_ns > 0.0 && p.miss_ns > 0.0);
    assert!(p.hit_once_ns > 0.0 && p.hit_distinct_ns > 0.0, "{p:?}");
    assert!(p.affinity_bytes > 0 && p.maps_bytes >= p.affinity_bytes);

    let dir = std::env::temp_dir().join(format!("xlb-bench-smoke-{}", std::process::id()));
    report::write(&r, &dir).expect("writing the report");
    let md = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    assert!(md.contains("xlb affinity hit, IPv4"), "{md}");
    assert!(md.contains("| xlb ipip hit, IPv4, repeat=1 |"), "{md}");
    assert!(md.contains("| xlb ipip, native XDP |"), "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).expect("json"))
            .expect("report.json parses");
    assert!(json["tables"][0]["rows"][1]["median"].as_f64().is_some());
    let json_rows: Vec<&str> = json["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .flat_map(|t| t["rows"].as_array().into_iter().flatten())
        .filter_map(|r| r["name"].as_str())
        .collect();
    for name in ["xlb ipip hit, IPv6, repeat=1", "xlb ipip, native XDP"] {
        assert!(json_rows.contains(&name), "{name} not in report.json");
    }
    let svg = std::fs::read_to_string(dir.join("scale.svg")).expect("scale.svg");
    assert!(svg.contains("<svg") && svg.contains("affinity map entries"));
    let rate = std::fs::read_to_string(dir.join("rate.svg")).expect("rate.svg");
    assert!(
        rate.contains("xlb, native XDP") && rate.contains("xlb ipip, native XDP"),
        "throughput plot names the contenders"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `col` cell of `row` in `table`'s extra columns.
fn cell(table: &Table, row: &str, col: &str) -> Option<String> {
    table
        .extra
        .iter()
        .find(|(r, c, _)| r == row && c == col)
        .map(|(_, _, v)| v.clone())
}

/// Checks part 3's table (every contender measured, the generator named on
/// every row, the ipip contender's arrivals and ratio, the generator's
/// ceiling) and returns the generator's label.
fn check_rate_table(rate: &Table) -> String {
    assert_eq!(rate.rows.len(), 6, "{:?}", rate.rows);
    let generator = cell(rate, &rate.rows[0].name, "generator").expect("the generator is named");
    assert!(
        [Generator::LiveFrames, Generator::AfPacket]
            .iter()
            .any(|g| g.label() == generator),
        "unknown generator {generator:?}"
    );
    assert!(
        rate.title.contains(&generator) && rate.about.contains(&generator),
        "the table names its generator: {} / {}",
        rate.title,
        rate.about
    );
    for row in &rate.rows {
        assert!(row.median > 0.0, "{}: nothing arrived", row.name);
        assert_eq!(
            cell(rate, &row.name, "generator").as_deref(),
            Some(generator.as_str()),
            "{}",
            row.name
        );
    }
    let ipip = "xlb ipip, native XDP";
    assert!(rate.rows.iter().any(|r| r.name == ipip), "{ipip} missing");
    // Encapsulated frames come back and are counted like the others.
    let arrived = cell(rate, ipip, "arrived/sent").map(|v| {
        v.trim_end_matches('%')
            .parse::<f64>()
            .expect("a percentage")
    });
    assert!(
        arrived.is_some_and(|p| p > 50.0),
        "{ipip}: arrived/sent {arrived:?}"
    );
    assert!(
        cell(rate, ipip, "× xlb, native XDP").is_some(),
        "{ipip}: no ratio to xlb's L2 mode"
    );
    // The generator's own ceiling is measured in the same run.
    assert!(
        rate.rows
            .iter()
            .filter(|r| r.name.starts_with("generator alone"))
            .count()
            == 2,
        "the generator's ceiling rows: {:?}",
        rate.rows.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
    generator
}

/// True when no namespace whose name contains `tag` is left.
fn ip_netns_empty_of(tag: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    !String::from_utf8_lossy(&out.stdout).contains(tag)
}

/// Parts 4 and 5 at their smallest: xlb and the no-LB ceiling must produce
/// numbers; a peer may instead be reported as not measured, with a reason
/// (the report's own contract when a package cannot be installed).
#[test]
fn peers_and_failover_smallest_configuration() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the bench loads XDP: run as root"
    );
    use xlb_tests::bench::{failover, peers};

    let p = peers::part4(Budget::SMOKE).expect("part 4 (peers)");
    assert_eq!(
        p.tables.len(),
        2,
        "keep-alive and connection-per-request tables"
    );
    for table in &p.tables {
        for must in ["no load balancer", "xlb"] {
            let row = table
                .rows
                .iter()
                .find(|r| r.name.starts_with(must))
                .unwrap_or_else(|| panic!("{}: no row for {must}", table.title));
            assert!(
                row.median > 0.0,
                "{}: {} measured nothing",
                table.title,
                row.name
            );
        }
        for peer in ["nftables", "HAProxy", "nginx"] {
            let measured = table
                .rows
                .iter()
                .any(|r| r.name.starts_with(peer) && r.median > 0.0);
            let explained = p
                .skipped
                .iter()
                .any(|(what, why)| what.contains(peer) && !why.is_empty());
            assert!(
                measured || explained,
                "{}: {peer} neither measured nor explained",
                table.title
            );
        }
    }

    let f = failover::part5(Budget::SMOKE).expect("part 5 (failover)");
    let table = f.table.expect("a failover table");
    let xlb = table
        .rows
        .iter()
        .find(|r| r.contender.starts_with("xlb"))
        .expect("xlb in the failover table");
    assert_eq!(xlb.rounds, 1);
    assert_eq!(
        xlb.failed_over, 1,
        "xlb's client must be served by another backend"
    );
    assert!(xlb.served_again_ms.median > 0.0);
    // The dead backend must reach the kernel as DOWN in each of the four services.
    assert_eq!(table.xlb_kernel_down_ms.len(), 4, "{table:?}");
    for (svc, s) in &table.xlb_kernel_down_ms {
        assert!(
            s.samples.iter().all(|t| t.is_finite()),
            "{svc}: never DOWN in the kernel"
        );
        eprintln!(
            "{svc}: kill -> DOWN in the kernel {:?} ms (bound {} ms)",
            s.samples, table.xlb_kernel_down_bound_ms
        );
    }
    assert!(
        ip_netns_empty_of("xlb-"),
        "parts 4 and 5 left namespaces behind"
    );
}

/// Part 6 at its smallest: both transitions write exactly the tables that
/// changed, and the table reaches the report. No namespaces.
#[test]
fn transition_part_smallest_configuration() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the bench loads XDP: run as root"
    );
    let t = transition::part6(Budget::SMOKE).expect("part 6 (transition to kernel)");
    assert_eq!(t.rows.len(), 5);
    for row in &t.rows {
        assert_eq!(
            row.samples.len(),
            Budget::SMOKE.transition_rounds,
            "{}",
            row.name
        );
        assert!(row.median > 0.0 && row.median.is_finite(), "{}", row.name);
    }
    let cell = |row: &str, col: &str| {
        t.extra
            .iter()
            .find(|(r, c, _)| r.starts_with(row) && c == col)
            .map(|(_, _, v)| v.clone())
    };
    assert_eq!(
        cell("apply: nothing", "tables written").as_deref(),
        Some("0")
    );
    assert_eq!(
        cell("apply: 1 of 16", "tables written").as_deref(),
        Some("1")
    );
    assert_eq!(
        cell("apply: 16 of 16", "tables written").as_deref(),
        Some("16")
    );
    let r = xlb_tests::bench::Report {
        command: "bench_smoke".into(),
        quick: true,
        tables: vec![t],
        ..Default::default()
    };
    let dir = std::env::temp_dir().join(format!("xlb-bench-transition-{}", std::process::id()));
    report::write(&r, &dir).expect("writing the report");
    let md = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    assert!(md.contains("Transition to kernel"), "{md}");
    assert!(md.contains("| apply: 1 of 16 services changed |"), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Part 8 at its smallest: sessions planted into a live daemon's map, then
/// idle calls, a failure during a drain, four failures at once and a
/// failure during a weight change while status and scrapes run. Every row
/// must be there with its figures: every killed backend DOWN in the kernel
/// in every service (within the bound is the bench's figure, not asserted:
/// this machine is shared and noisy), every change live, every command
/// answered, the planted sessions moved off the dead backend.
#[test]
fn at_scale_part_smallest_configuration() {
    use xlb_tests::bench::at_scale::rows;
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the bench loads XDP: run as root"
    );
    let t = xlb_tests::bench::at_scale::part_at_scale(Budget::SMOKE).expect("part 8 (at scale)");
    let n = Budget::SMOKE.at_scale_sessions[0];
    let row = |name: String| {
        t.rows
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no row {name:?} in {:?}", names(&t)))
    };
    let extra = |name: String, col: &str| {
        t.extra
            .iter()
            .find(|(r, c, _)| *r == name && c == col)
            .map(|(_, _, v)| v.clone())
            .unwrap_or_default()
    };
    for what in [
        "xlb status",
        "xlb backend list",
        "metrics scrape",
        "xlb sessions where (a planted client)",
    ] {
        let r = row(rows::idle(n, what));
        assert_eq!(r.samples.len(), 20, "{}", r.name);
        assert!(r.samples.iter().all(|ms| ms.is_finite()), "{r:?}");
        assert!(
            extra(r.name.clone(), "note").is_empty(),
            "a call failed: {r:?}"
        );
    }
    for (name, pairs) in [
        (rows::single_down(n, "b1", true), 4),
        (rows::simultaneous_down(n, "b1", "b4", 16), 16),
        (rows::weight_down(n, "b5"), 4),
    ] {
        let r = row(name);
        assert_eq!(r.samples.len(), pairs, "one figure per pair: {r:?}");
        assert!(
            r.samples.iter().all(|ms| ms.is_finite()),
            "a killed backend never went DOWN in some service: {r:?}"
        );
    }
    let moved = extra(rows::single_down(n, "b1", true), "note");
    assert!(
        moved.contains("all moved"),
        "b1's planted sessions were not moved: {moved}"
    );
    for (name, samples) in [
        (rows::drain(n, "xlb backend drain echo-v4 b5"), 1),
        (rows::weight(n, "xlb backend weight http-v4 b2 2"), 1),
        // Planted before (b), again before (c) and (d).
        (rows::planting(n), 3),
    ] {
        let r = row(name);
        assert_eq!(r.samples.len(), samples, "{r:?}");
        assert!(r.median.is_finite() && r.median > 0.0, "{r:?}");
    }
    for what in ["xlb status", "metrics scrape"] {
        let r = row(rows::meanwhile(n, what));
        // Three failures of at least MONITOR_LEAD + a DOWN (> 1 s) each at 10/s.
        assert!(r.samples.len() >= 30, "{what} asked too rarely: {r:?}");
        assert!(
            extra(r.name.clone(), "note").is_empty(),
            "{what} failed during the failures: {r:?}"
        );
    }
    assert!(
        ip_netns_empty_of("atscale"),
        "the at-scale part left namespaces behind"
    );
}

fn names(t: &Table) -> Vec<&str> {
    t.rows.iter().map(|r| r.name.as_str()).collect()
}

/// Part 7 at its smallest: both runs make the added backend live on every node, and
/// what issue 16 accepts holds (sessions here are few, so nothing is slow): no round
/// given up, no node losing sight of a peer, no sampled client moved; the acceptance
/// paragraph reaches the report.
#[test]
fn cluster_part_smallest_configuration() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the bench loads XDP: run as root"
    );
    let c = xlb_tests::bench::cluster::part_cluster(Budget::SMOKE).expect("part 7 (cluster)");
    assert_eq!(c.runs.len(), 2, "{c:#?}");
    for run in &c.runs {
        let a = &run.acceptance;
        assert_eq!(
            run.sessions_per_node,
            u64::from(Budget::SMOKE.cluster_sessions)
        );
        assert!(run.rounds >= 1, "no round made the backend live: {run:#?}");
        assert!(a.sampled > 1_000, "{a:#?}");
        assert_eq!(a.differ_before, 0, "the planted sessions were off: {a:#?}");
        // A quarter (be4) or a fifth (be5) get a new Maglev answer: the check has teeth.
        assert!(
            a.at_stake * 8 > a.sampled,
            "too few clients at stake: {a:#?}"
        );
        assert_eq!(a.moved, 0, "clients moved: {a:#?}");
        assert_eq!(a.moved_after_refresh, 0, "clients moved: {a:#?}");
        assert_eq!(a.rounds_given_up, 0, "{a:#?}");
        assert!(a.gave_up_lines.is_empty(), "{a:#?}");
        assert!(a.takeover_lines.is_empty(), "{a:#?}");
        assert_eq!(a.peers_seen_dead, 0, "{a:#?}");
        assert!(a.not_live_seen.is_empty(), "{a:#?}");
        assert_eq!(a.max_hello_age_ms.len(), 3, "{a:#?}");
        assert!(
            a.max_hello_age_ms.iter().all(Option::is_some),
            "no Hello age polled: {a:#?}"
        );
        assert_eq!(
            a.coordinators_seen,
            vec![vec![1]; 3],
            "a node took over coordination: {a:#?}"
        );
    }
    let r = xlb_tests::bench::Report {
        command: "bench_smoke".into(),
        quick: true,
        cluster: Some(c),
        ..Default::default()
    };
    let md = report::markdown(&r);
    assert!(
        md.contains("### Cluster: replication of a backend add"),
        "{md}"
    );
    assert!(md.contains("Acceptance (issue 16"), "{md}");
    assert!(md.contains("0 round(s) given up"), "{md}");
    assert!(
        ip_netns_empty_of("bcl"),
        "the cluster part left namespaces behind"
    );
}
