//! A backend failure with a million sessions, end to end: the failover
//! lab's daemon (five backends in each of 4 services, HTTP and UDP checks
//! every 500 ms, fall 3, native XDP) with 1,000,000 synthetic sessions of
//! `http-v4` planted into its pinned affinity map, then b1's servers stopped
//! while `xlb status` and a metrics scrape run ten times a second (the
//! bench's part 8, step b without the drain: `bench::at_scale::measure`).
//!
//! Asserted: b1 is DOWN in the kernel's backend map in every service within
//! fall × interval + 100 ms of the kill; every status call meanwhile
//! succeeded within [`STATUS_LIMIT_MS`]; and b1's planted sessions (a sample
//! of them, looked up in both session maps) were moved to another backend
//! within the part's bounded wait, none deleted.
//!
//! Needs root; run by `cargo xtask test` (tier 3), or alone:
//! `cargo test --release -p xlb-tests --test e2e_scale -- --test-threads=1`
//! with `XLB_BIN` set to the release xlb binary. The lab, daemon and servers
//! are removed on drop, also when an assertion fails.

use std::time::Instant;

use xlb_tests::bench::{
    at_scale::{self, Plan},
    failover::kernel_down_bound_ms,
};

/// Sessions planted (the acceptance point asks for at least a million).
const SESSIONS: u32 = 1_000_000;
/// The longest one `xlb status` may take while the failure runs, CLI
/// process included. Status is answered beside the daemon's owner from a
/// published snapshot: idle it takes 3–5 ms here, and 25 ms at worst during
/// failures at 1M. A status that waited for the owner again would wait for
/// that failure's walks of the session map (about 0.4–1 s each at 1M, several
/// of them queued): a second catches that, and stays far above what a loaded
/// two-core machine adds to a process start. It is also below the failure
/// bound (1.6 s): an operator asking during a failure must hear back before
/// the failure is over.
const STATUS_LIMIT_MS: f64 = 1000.0;
/// Status calls expected at least: ten a second from 500 ms before the kill
/// until b1 is DOWN everywhere and its sessions moved (over 1.5 s).
const MIN_STATUS_CALLS: usize = 10;

fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("e2e_scale creates namespaces and loads XDP: run it as root");
    }
}

#[test]
fn a_failure_with_a_million_sessions_is_down_within_the_bound_while_status_answers() {
    assert_root();
    let started = Instant::now();
    let run = at_scale::measure("e2escale", SESSIONS, Plan::SINGLE_FAILURE)
        .expect("planting 1M sessions and failing b1");
    let f = run.single.expect("the single failure ran");
    let bound = kernel_down_bound_ms();
    let slowest_status = f.status.iter().map(|c| c.ms).fold(0.0, f64::max);
    println!(
        "e2e_scale: {SESSIONS} sessions planted in {:.0} ms; kill → DOWN {:?} (bound {bound:.0} ms); \
         {} status calls, slowest {slowest_status:.1} ms; {} scrapes; sessions moved: {:?}; \
         {:.1} s in all",
        run.plant_ms.first().copied().unwrap_or(f64::NAN),
        f.down_ms,
        f.status.len(),
        f.scrape.len(),
        f.moved,
        started.elapsed().as_secs_f64(),
    );

    assert_eq!(f.killed, ["b1"]);
    assert_eq!(
        f.down_ms.len(),
        4,
        "one figure per service: {:?}",
        f.down_ms
    );
    for ((svc, be), t) in &f.down_ms {
        let t = t.unwrap_or_else(|| panic!("{svc}/{be} never went DOWN in the kernel"));
        assert!(
            t <= bound,
            "{svc}/{be} DOWN in the kernel {t:.0} ms after the kill, bound {bound:.0} ms: {:?}",
            f.down_ms
        );
    }

    assert!(
        f.status.len() >= MIN_STATUS_CALLS,
        "status asked only {} times during the failure",
        f.status.len()
    );
    let failed = f.status.iter().filter(|c| !c.ok).count();
    assert_eq!(failed, 0, "{failed} status calls failed during the failure");
    assert!(
        slowest_status <= STATUS_LIMIT_MS,
        "a status call took {slowest_status:.0} ms during the failure (limit {STATUS_LIMIT_MS:.0} ms): {:?}",
        f.status
    );

    let moved = f
        .moved
        .expect("no sampled planted session was on b1 (a fifth of them should be)");
    assert!(moved.sampled > 0);
    assert_eq!(
        (moved.left, moved.gone),
        (0, 0),
        "b1's planted sessions not all moved: {moved:?}"
    );
    assert!(moved.after_ms.is_some(), "{moved:?}");

    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("e2escale"),
        "the test left namespaces behind"
    );
}
