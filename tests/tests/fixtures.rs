//! Fixture tests: the real XDP program in the real kernel through
//! BPF_PROG_TEST_RUN, set up through the same userspace code `xlb run` uses
//! (`Dataplane::load` + `dataplane::apply`). Each checks the verdict, the
//! output frame's bytes and the map/counter changes.
//!
//! Needs root (loading BPF programs); run by `cargo xtask test`.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{
    Affinity, AffinityKey, BACKEND_DOWN, BACKEND_DRAINING, FAMILY_V4, FAMILY_V6, FragmentKey,
    FragmentPorts, PROTO_TCP, PROTO_UDP, ServiceKey, prefix_mask, stat,
};
use xlb::{
    config::Config,
    dataplane::{self, Dataplane, LoadOptions, addr_words},
    maglev,
    pins::{self, PinnedMaps},
    sessions::monotonic_ns,
    stats,
};
use xlb_tests::frames::{CLIENT_MAC, Frame, IcmpError, LB_MAC, ip};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The MACs of the "web" service's backends.
const BACKEND_MACS: [[u8; 6]; 3] = [
    [0x02, 0, 0, 0, 0, 0x11],
    [0x02, 0, 0, 0, 0, 0x12],
    [0x02, 0, 0, 0, 0, 0x13],
];

/// Three backends per service, every service its own three MACs (shared
/// MACs would hide a frame steered to another service's backend); a /24
/// service on port 8024; small tables so each fixture loads fast.
const CONFIG: &str = r#"
interface = "fx0"
maglev_table_size = 251
max_services = 8
affinity_max_entries = 4096

[[service]]
name = "web"
vip = "10.0.0.10"
port = 80
protocol = "tcp"
affinity_timeout = "1h"
[[service.backend]]
address = "10.0.0.21"
mac = "02:00:00:00:00:11"
[[service.backend]]
address = "10.0.0.22"
mac = "02:00:00:00:00:12"
[[service.backend]]
address = "10.0.0.23"
mac = "02:00:00:00:00:13"

[[service]]
name = "dns"
vip = "10.0.0.10"
port = 53
protocol = "udp"
[[service.backend]]
address = "10.0.0.21"
mac = "02:00:00:00:00:21"
[[service.backend]]
address = "10.0.0.22"
mac = "02:00:00:00:00:22"
[[service.backend]]
address = "10.0.0.23"
mac = "02:00:00:00:00:23"

[[service]]
name = "subnet"
vip = "10.0.0.10"
port = 8024
protocol = "tcp"
affinity_prefix_v4 = 24
[[service.backend]]
address = "10.0.0.21"
mac = "02:00:00:00:00:31"
[[service.backend]]
address = "10.0.0.22"
mac = "02:00:00:00:00:32"
[[service.backend]]
address = "10.0.0.23"
mac = "02:00:00:00:00:33"

[[service]]
name = "web6"
vip = "fd00::10"
port = 80
protocol = "tcp"
affinity_prefix_v6 = 64
[[service.backend]]
address = "fd00::21"
mac = "02:00:00:00:00:41"
[[service.backend]]
address = "fd00::22"
mac = "02:00:00:00:00:42"
[[service.backend]]
address = "fd00::23"
mac = "02:00:00:00:00:43"
"#;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A loaded (unattached) dataplane with its own pin directory, removed on drop.
struct Fixture {
    dp: Dataplane,
    maps: PinnedMaps,
    config: Config,
    /// The text `config` was parsed from.
    text: String,
    dir: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        Self::with_config(CONFIG)
    }

    fn with_config(text: &str) -> Self {
        Self::with_hops(text, &dataplane::Hops::new())
    }

    /// A fixture whose next hops are `hops` (as the resolver would find them).
    fn with_hops(text: &str, hops: &dataplane::Hops) -> Self {
        assert_root();
        let config = Config::parse(text).expect("fixture config is valid");
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/xlb-fixture-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut opts = LoadOptions::from_config(&config, LB_MAC, false);
        opts.pin_dir = dir.clone();
        let dp = Dataplane::load(opts).expect("loading the xlb program");
        let mut maps = PinnedMaps::open(&dir).expect("opening the pinned maps");
        dataplane::apply_with(&mut maps, &config, hops).expect("applying the fixture config");
        Self {
            dp,
            maps,
            config,
            text: text.to_string(),
            dir,
        }
    }

    fn reapply(&mut self, text: &str) {
        self.reapply_report(text);
    }

    fn reapply_report(&mut self, text: &str) -> dataplane::ApplyReport {
        self.config = Config::parse(text).expect("fixture config is valid");
        self.text = text.to_string();
        dataplane::apply(&mut self.maps, &self.config).expect("re-applying config")
    }

    /// Runs one frame; returns the verdict and the output frame.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.dp.program_mut().expect("xlb program");
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs one frame and checks which counter it moved.
    fn run_counted(&mut self, frame: &[u8], reason: u32) -> (u32, Vec<u8>) {
        let before = self.counter(reason);
        let r = self.run(frame);
        assert_eq!(
            self.counter(reason),
            before + 1,
            "frame should be counted as {}",
            stat::NAMES[reason as usize]
        );
        r
    }

    fn counter(&self, reason: u32) -> u64 {
        stats::snapshot(&self.maps)
            .expect("reading counters")
            .reason(reason)
    }

    fn service_id(&self, name: &str) -> u32 {
        let svc = self
            .config
            .services
            .iter()
            .find(|s| s.name == name)
            .expect("service in config");
        self.maps
            .services
            .get(&dataplane::service_key(svc), 0)
            .expect("service in map")
            .id
    }

    /// The backend MAC that userspace's own Maglev build predicts for `client`.
    fn maglev_mac(&self, service: &str, client: IpAddr) -> [u8; 6] {
        self.maglev_backend(service, client).mac
    }

    /// The backend (config entry) userspace's own Maglev build predicts for `client`.
    fn maglev_backend(&self, service: &str, client: IpAddr) -> &xlb::config::BackendConfig {
        let svc = self
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .expect("service in config");
        // Ids are the config positions here: the answer is mapped back by index.
        let ids: Vec<u32> = (0..svc.backends.len() as u32).collect();
        let table =
            dataplane::service_table(svc, &ids, self.config.maglev_table_size).expect("table");
        let (bits, prefix) = if client.is_ipv4() {
            (32, svc.affinity_prefix_v4)
        } else {
            (128, svc.affinity_prefix_v6)
        };
        let masked = lb_common::mask_addr(&addr_words(client), &prefix_mask(prefix, bits));
        let idx = table[maglev::slot(&masked, self.config.maglev_table_size) as usize];
        &svc.backends[idx as usize]
    }

    fn affinity(&self, service: &str, client: IpAddr, prefix: u8) -> Option<Affinity> {
        let bits = if client.is_ipv4() { 32 } else { 128 };
        let key = AffinityKey {
            service_id: self.service_id(service),
            addr: lb_common::mask_addr(&addr_words(client), &prefix_mask(prefix, bits)),
        };
        self.maps.affinity.get(&key, 0).ok()
    }

    fn backend_id_by_mac(&self, mac: [u8; 6], service: &str) -> u32 {
        let sid = self.service_id(service);
        (0..lb_common::MAX_BACKENDS)
            .find(|id| {
                self.maps
                    .backends
                    .get(id, 0)
                    .is_ok_and(|b| b.mac == mac && u32::from(b.service_id) == sid && b.state != 0)
            })
            .expect("backend with that MAC")
    }

    fn set_backend_state(&mut self, id: u32, state: u8) {
        let mut b = self.maps.backends.get(&id, 0).expect("backend");
        b.state = state;
        self.maps.backends.set(id, b, 0).expect("writing backend");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Err(e) = pins::remove_all(&self.dir) {
            eprintln!("cleanup of {} failed: {e:#}", self.dir.display());
        }
    }
}

fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("fixture tests load BPF programs and need root: run `cargo xtask test` as root");
    }
}

/// Asserts a forwarded frame: backend MAC as destination, our MAC as source,
/// every other byte unchanged.
fn assert_forwarded(input: &[u8], out: &[u8], backend_mac: [u8; 6]) {
    assert_eq!(out.len(), input.len(), "frame length changed");
    assert_eq!(
        &out[..6],
        &backend_mac,
        "destination MAC must be the backend's"
    );
    assert_eq!(
        &out[6..12],
        &LB_MAC,
        "source MAC must be the LB interface's"
    );
    assert_eq!(&out[12..], &input[12..], "only the MACs may change");
}

fn mac_of(out: &[u8]) -> [u8; 6] {
    out[..6].try_into().expect("6 bytes")
}

// ---- aging entries -------------------------------------------------------

/// The affinity timeout an aged-entry fixture gives its service: short, as
/// the fixture waits it out.
const SHORT_TIMEOUT: Duration = Duration::from_millis(200);
/// How much longer than the timeout it waits: more than a tick, the step of
/// the program's coarse clock.
const PAST_TIMEOUT: Duration = Duration::from_millis(50);

/// The clock the program stamps and ages entries with
/// (`bpf_ktime_get_coarse_ns` is CLOCK_MONOTONIC_COARSE), in ns.
fn program_clock_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE)");
    let secs = u64::try_from(ts.tv_sec).expect("a monotonic clock is not negative");
    let nanos = u64::try_from(ts.tv_nsec).expect("a monotonic clock is not negative");
    secs * 1_000_000_000 + nanos
}

/// `text` with service `service`'s `affinity_timeout` set to `timeout` (any
/// earlier setting of that service removed; other services untouched).
fn with_timeout(text: &str, service: &str, timeout: Duration) -> String {
    let name = format!("name = \"{service}\"");
    let mut blocks: Vec<Vec<&str>> = vec![Vec::new()];
    for line in text.lines() {
        if line.trim_start().starts_with('[') {
            blocks.push(Vec::new());
        }
        blocks.last_mut().expect("a block").push(line);
    }
    let setting = format!("affinity_timeout = \"{}ms\"", timeout.as_millis());
    let mut found = 0;
    let mut out = String::new();
    for block in &blocks {
        let target = block.first().is_some_and(|l| l.trim() == "[[service]]")
            && block.iter().any(|l| l.trim() == name);
        for line in block {
            if !(target && line.trim_start().starts_with("affinity_timeout")) {
                out.push_str(line);
                out.push('\n');
            }
        }
        if target {
            found += 1;
            out.push_str(&setting);
            out.push('\n');
        }
    }
    assert_eq!(found, 1, "one service {service} in the config");
    out
}

impl Fixture {
    /// Expires the affinity entry at `key` of `service` whatever the clock
    /// reads, and returns the entry as it left it. Every aged-entry fixture
    /// ages this way: "now minus an hour" cannot, since on a machine up less
    /// than an hour it saturates at 0, and an entry stamped at boot is rightly
    /// fresh to the program (no entry is older than the clock). A wait past
    /// the timeout ages an entry stamped with the program's own clock by more
    /// than the timeout, whatever the clock read when it was stamped.
    fn expire(&mut self, service: &str, key: AffinityKey) -> Affinity {
        self.reapply(&with_timeout(&self.text, service, SHORT_TIMEOUT));
        assert_eq!(
            self.record(service).timeout_ns,
            SHORT_TIMEOUT.as_nanos() as u64,
            "the kernel has the short timeout"
        );
        let mut entry = self.maps.affinity.get(&key, 0).expect("an entry to age");
        entry.last_seen_ns = program_clock_ns();
        self.maps
            .affinity
            .insert(key, entry, 0)
            .expect("stamping the entry");
        std::thread::sleep(SHORT_TIMEOUT + PAST_TIMEOUT);
        entry
    }
}

// ---- pass-through --------------------------------------------------------

#[test]
fn non_vip_traffic_passes_untouched() {
    let mut fx = Fixture::new();
    let frame = Frame::tcp("10.0.0.100", "10.0.0.99", 80).build();
    let (verdict, out) = fx.run_counted(&frame, stat::PASS_NOT_SERVICE);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, frame);
    // VIP but a port without a service.
    let frame = Frame::tcp("10.0.0.100", "10.0.0.10", 81).build();
    let (verdict, out) = fx.run_counted(&frame, stat::PASS_NOT_SERVICE);
    assert_eq!((verdict, out), (XDP_PASS, frame));
    // VIP and port, wrong protocol (UDP 80).
    let frame = Frame::udp("10.0.0.100", "10.0.0.10", 80).build();
    assert_eq!(fx.run_counted(&frame, stat::PASS_NOT_SERVICE).0, XDP_PASS);
}

#[test]
fn arp_icmp_and_foreign_macs_pass() {
    let mut fx = Fixture::new();
    let mut arp = vec![0xff; 6];
    arp.extend(CLIENT_MAC);
    arp.extend([0x08, 0x06]);
    arp.extend([0u8; 28]);
    // Broadcast destination: not our MAC.
    assert_eq!(fx.run_counted(&arp, stat::PASS_OTHER_HOST).0, XDP_PASS);
    arp[..6].copy_from_slice(&LB_MAC);
    let (verdict, out) = fx.run_counted(&arp, stat::PASS_NOT_IP);
    assert_eq!((verdict, out), (XDP_PASS, arp));

    // ICMP echo to the VIP.
    let mut icmp = Frame::tcp("10.0.0.100", "10.0.0.10", 80).build();
    icmp[23] = 1;
    assert_eq!(fx.run_counted(&icmp, stat::PASS_NOT_L4).0, XDP_PASS);

    // ICMPv6 (neighbour solicitation) to the v6 VIP.
    let mut ns = Frame::tcp("fd00::100", "fd00::10", 80).build();
    ns[20] = 58;
    assert_eq!(fx.run_counted(&ns, stat::PASS_NOT_L4).0, XDP_PASS);

    // VIP traffic addressed to another host's MAC (flooded by a bridge).
    let mut f = Frame::tcp("10.0.0.100", "10.0.0.10", 80);
    f.dst_mac = BACKEND_MACS[0];
    let frame = f.build();
    let (verdict, out) = fx.run_counted(&frame, stat::PASS_OTHER_HOST);
    assert_eq!((verdict, out), (XDP_PASS, frame));
}

// ---- affinity ------------------------------------------------------------

#[test]
fn new_client_goes_to_maglev_choice_and_is_recorded() {
    let mut fx = Fixture::new();
    let client = ip("10.0.0.100");
    assert!(fx.affinity("web", client, 32).is_none());
    let frame = Frame::tcp("10.0.0.100", "10.0.0.10", 80).build();
    let want = fx.maglev_mac("web", client);
    let before = program_clock_ns();
    let (verdict, out) = fx.run_counted(&frame, stat::NEW_SESSION);
    let after = program_clock_ns();
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, want);
    let entry = fx
        .affinity("web", client, 32)
        .expect("affinity entry created");
    assert_eq!(entry.backend_id, fx.backend_id_by_mac(want, "web"));
    // Bounds from the program's clock, not an age: an age bound cannot fail
    // on a machine up for less than the bound.
    assert!(
        (before..=after).contains(&entry.last_seen_ns),
        "last_seen {} is the run's time ({before}..={after})",
        entry.last_seen_ns
    );

    let sid = fx.service_id("web");
    let snap = stats::snapshot(&fx.maps).expect("stats");
    let svc = snap
        .services
        .iter()
        .find(|(id, _)| *id == sid)
        .expect("service counted")
        .1;
    assert_eq!(
        (svc.packets, svc.bytes, svc.new_sessions),
        (1, frame.len() as u64, 1)
    );
    let be = snap
        .backends
        .iter()
        .find(|(id, _)| *id == entry.backend_id)
        .expect("backend counted")
        .1;
    assert_eq!((be.packets, be.new_sessions), (1, 1));
}

#[test]
fn same_client_sticks_to_its_backend() {
    let mut fx = Fixture::new();
    let frame = Frame::tcp("10.0.0.101", "10.0.0.10", 80).build();
    let (_, first) = fx.run(&frame);
    for _ in 0..5 {
        let (verdict, out) = fx.run_counted(&frame, stat::AFFINITY_HIT);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(mac_of(&out), mac_of(&first));
    }
    // A different source port is the same client.
    let mut f = Frame::tcp("10.0.0.101", "10.0.0.10", 80);
    f.sport = 51234;
    assert_eq!(
        mac_of(&fx.run_counted(&f.build(), stat::AFFINITY_HIT).1),
        mac_of(&first)
    );
}

#[test]
fn sticky_entry_wins_over_maglev() {
    // An entry pointing away from the Maglev choice must be obeyed: this is
    // what keeps sessions when the backend set changes.
    let mut fx = Fixture::new();
    let client = ip("10.0.0.102");
    let maglev = fx.maglev_mac("web", client);
    let other = *BACKEND_MACS
        .iter()
        .find(|m| **m != maglev)
        .expect("another backend");
    let key = AffinityKey {
        service_id: fx.service_id("web"),
        addr: addr_words(client),
    };
    let value = Affinity {
        backend_id: fx.backend_id_by_mac(other, "web"),
        _pad: 0,
        last_seen_ns: monotonic_ns(),
    };
    fx.maps.affinity.insert(key, value, 0).expect("insert");
    let frame = Frame::tcp("10.0.0.102", "10.0.0.10", 80).build();
    let (verdict, out) = fx.run_counted(&frame, stat::AFFINITY_HIT);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, other);
}

#[test]
fn clients_in_one_prefix_share_a_backend() {
    let mut fx = Fixture::new();
    let a = Frame::tcp("10.1.2.3", "10.0.0.10", 8024).build();
    let b = Frame::tcp("10.1.2.200", "10.0.0.10", 8024).build();
    let (_, out_a) = fx.run_counted(&a, stat::NEW_SESSION);
    let (verdict, out_b) = fx.run_counted(&b, stat::AFFINITY_HIT);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(mac_of(&out_a), mac_of(&out_b));
    let entry = fx
        .affinity("subnet", ip("10.1.2.0"), 24)
        .expect("one entry for the /24");
    assert_eq!(
        entry.backend_id,
        fx.backend_id_by_mac(mac_of(&out_a), "subnet")
    );
    // The /32 service keeps the two apart (one entry each).
    fx.run(&Frame::tcp("10.1.2.3", "10.0.0.10", 80).build());
    fx.run(&Frame::tcp("10.1.2.200", "10.0.0.10", 80).build());
    assert!(fx.affinity("web", ip("10.1.2.3"), 32).is_some());
    assert!(fx.affinity("web", ip("10.1.2.200"), 32).is_some());
}

#[test]
fn expired_entry_is_reselected_and_rewritten() {
    let mut fx = Fixture::new();
    let client = ip("10.0.0.103");
    let maglev = fx.maglev_mac("web", client);
    let other = *BACKEND_MACS
        .iter()
        .find(|m| **m != maglev)
        .expect("another backend");
    let key = AffinityKey {
        service_id: fx.service_id("web"),
        addr: addr_words(client),
    };
    let value = Affinity {
        backend_id: fx.backend_id_by_mac(other, "web"),
        _pad: 0,
        last_seen_ns: monotonic_ns(),
    };
    fx.maps.affinity.insert(key, value, 0).expect("insert");
    let stale = fx.expire("web", key);
    let frame = Frame::tcp("10.0.0.103", "10.0.0.10", 80).build();
    let (verdict, out) = fx.run_counted(&frame, stat::RESELECT_EXPIRED);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, maglev);
    let entry = fx.affinity("web", client, 32).expect("entry kept");
    assert_eq!(entry.backend_id, fx.backend_id_by_mac(maglev, "web"));
    assert!(
        entry.last_seen_ns > stale.last_seen_ns,
        "last_seen refreshed"
    );
}

/// The condition of a machine booted minutes ago, made on any machine: the
/// service's timeout is an hour longer than the clock reads. An entry aged by
/// subtracting from the clock is fresh there (so fixtures aging that way
/// failed on fresh machines), while [`Fixture::expire`], which every
/// aged-entry fixture uses, still expires one: it swaps in a timeout it can
/// wait out rather than relying on the clock having passed the configured one.
#[test]
fn aged_entry_expires_with_the_clock_below_the_service_timeout() {
    let timeout = Duration::from_nanos(program_clock_ns()) + Duration::from_secs(3600);
    let mut fx = Fixture::with_config(&with_timeout(CONFIG, "web", timeout));
    let client = ip("10.0.0.109");
    let maglev = fx.maglev_mac("web", client);
    let other = *BACKEND_MACS
        .iter()
        .find(|m| **m != maglev)
        .expect("another backend");
    let key = AffinityKey {
        service_id: fx.service_id("web"),
        addr: addr_words(client),
    };
    // "Idle for twice the timeout" saturates at a stamp of 0, which no clock
    // below the timeout can see as expired: the session is kept.
    let aged_by_subtraction = Affinity {
        backend_id: fx.backend_id_by_mac(other, "web"),
        _pad: 0,
        last_seen_ns: program_clock_ns().saturating_sub(2 * timeout.as_nanos() as u64),
    };
    fx.maps
        .affinity
        .insert(key, aged_by_subtraction, 0)
        .expect("insert");
    let frame = Frame::tcp("10.0.0.109", "10.0.0.10", 80).build();
    let (verdict, out) = fx.run_counted(&frame, stat::AFFINITY_HIT);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, other);

    let stale = fx.expire("web", key);
    assert_eq!(stale.backend_id, aged_by_subtraction.backend_id);
    let (verdict, out) = fx.run_counted(&frame, stat::RESELECT_EXPIRED);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, maglev);
    let entry = fx.affinity("web", client, 32).expect("entry kept");
    assert_eq!(entry.backend_id, fx.backend_id_by_mac(maglev, "web"));
}

#[test]
fn down_backend_is_reselected_in_kernel_before_userspace_rebuilds() {
    let mut fx = Fixture::new();
    let client = ip("10.0.0.104");
    let frame = Frame::tcp("10.0.0.104", "10.0.0.10", 80).build();
    let (_, first) = fx.run(&frame);
    let old = fx.backend_id_by_mac(mac_of(&first), "web");
    // Only the state flips; the Maglev table still names the dead backend.
    fx.set_backend_state(old, BACKEND_DOWN);
    let (verdict, out) = fx.run_counted(&frame, stat::RESELECT_DOWN);
    assert_eq!(verdict, XDP_TX);
    assert_ne!(mac_of(&out), mac_of(&first), "must leave the down backend");
    let entry = fx.affinity("web", client, 32).expect("entry");
    assert_ne!(entry.backend_id, old, "entry rewritten in the kernel");
    assert_eq!(entry.backend_id, fx.backend_id_by_mac(mac_of(&out), "web"));
    // And it stays there.
    let (_, again) = fx.run_counted(&frame, stat::AFFINITY_HIT);
    assert_eq!(mac_of(&again), mac_of(&out));
    // New clients whose Maglev slot names the dead backend probe past it.
    for i in 0..64 {
        let f = Frame::tcp(&format!("10.9.0.{i}"), "10.0.0.10", 80).build();
        let (v, o) = fx.run(&f);
        assert_eq!(v, XDP_TX);
        assert_ne!(
            mac_of(&o),
            mac_of(&first),
            "new client sent to a down backend"
        );
    }
}

#[test]
fn down_via_config_moves_only_that_backends_clients() {
    let mut fx = Fixture::new();
    let mut before = Vec::new();
    for i in 0..48 {
        let f = Frame::tcp(&format!("10.5.0.{i}"), "10.0.0.10", 80).build();
        before.push(mac_of(&fx.run(&f).1));
    }
    let down = BACKEND_MACS[1];
    fx.reapply(&CONFIG.replacen(
        "address = \"10.0.0.22\"\nmac = \"02:00:00:00:00:12\"",
        "address = \"10.0.0.22\"\nmac = \"02:00:00:00:00:12\"\nstate = \"down\"",
        1,
    ));
    for (i, old) in before.iter().enumerate() {
        let f = Frame::tcp(&format!("10.5.0.{i}"), "10.0.0.10", 80).build();
        let (_, out) = fx.run(&f);
        if *old == down {
            assert_ne!(mac_of(&out), down, "client {i} still on the down backend");
        } else {
            assert_eq!(
                mac_of(&out),
                *old,
                "client {i} moved although its backend is up"
            );
        }
    }
    assert!(
        before.contains(&down),
        "test needs clients on the backend taken down"
    );
}

#[test]
fn draining_keeps_existing_clients_and_takes_no_new_ones() {
    let mut fx = Fixture::new();
    let mut existing = Vec::new();
    for i in 0..32 {
        let f = Frame::tcp(&format!("10.6.0.{i}"), "10.0.0.10", 80).build();
        existing.push(mac_of(&fx.run(&f).1));
    }
    let draining = BACKEND_MACS[2];
    assert!(
        existing.contains(&draining),
        "test needs clients on the draining backend"
    );
    // First without a table rebuild (kernel must skip it for new clients),
    // then through the config (table rebuilt without it).
    let id = fx.backend_id_by_mac(draining, "web");
    fx.set_backend_state(id, BACKEND_DRAINING);
    for round in 0..2 {
        for (i, old) in existing.iter().enumerate() {
            let f = Frame::tcp(&format!("10.6.0.{i}"), "10.0.0.10", 80).build();
            // Once the table is rebuilt without it, the draining backend's
            // clients differ from Maglev: apply protected them.
            let reason = if round == 1 && *old == draining {
                stat::AFFINITY_HIT_PROTECTED
            } else {
                stat::AFFINITY_HIT
            };
            let (verdict, out) = fx.run_counted(&f, reason);
            assert_eq!(verdict, XDP_TX);
            assert_eq!(
                mac_of(&out),
                *old,
                "round {round}: existing client {i} moved"
            );
        }
        for i in 0..200 {
            let f = Frame::tcp(&format!("10.7.{round}.{i}"), "10.0.0.10", 80).build();
            let (verdict, out) = fx.run(&f);
            assert_eq!(verdict, XDP_TX);
            assert_ne!(
                mac_of(&out),
                draining,
                "round {round}: new client {i} got the draining backend"
            );
        }
        fx.reapply(&CONFIG.replacen(
            "address = \"10.0.0.23\"\nmac = \"02:00:00:00:00:13\"",
            "address = \"10.0.0.23\"\nmac = \"02:00:00:00:00:13\"\nstate = \"draining\"",
            1,
        ));
    }
}

#[test]
fn no_usable_backend_drops() {
    let mut fx = Fixture::new();
    for mac in BACKEND_MACS {
        let id = fx.backend_id_by_mac(mac, "web");
        fx.set_backend_state(id, BACKEND_DOWN);
    }
    let frame = Frame::tcp("10.0.0.105", "10.0.0.10", 80).build();
    assert_eq!(fx.run_counted(&frame, stat::DROP_NO_BACKEND).0, XDP_DROP);
}

// ---- IPv6 ----------------------------------------------------------------

#[test]
fn ipv6_new_sticky_and_prefix() {
    let mut fx = Fixture::new();
    let client = ip("fd00:1:2:3::100");
    let frame = Frame::tcp("fd00:1:2:3::100", "fd00::10", 80).build();
    let want = fx.maglev_mac("web6", client);
    let (verdict, out) = fx.run_counted(&frame, stat::NEW_SESSION);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, want);
    let (_, again) = fx.run_counted(&frame, stat::AFFINITY_HIT);
    assert_eq!(mac_of(&again), want);
    // Same /64, other host: same backend, same entry.
    let other = Frame::tcp("fd00:1:2:3::beef", "fd00::10", 80).build();
    let (_, out) = fx.run_counted(&other, stat::AFFINITY_HIT);
    assert_eq!(mac_of(&out), want);
    let entry = fx.affinity("web6", client, 64).expect("entry for the /64");
    assert_eq!(entry.backend_id, fx.backend_id_by_mac(want, "web6"));
}

#[test]
fn ipv6_down_backend_reselected() {
    let mut fx = Fixture::new();
    let frame = Frame::tcp("fd00:9::1", "fd00::10", 80).build();
    let (_, first) = fx.run(&frame);
    let old = fx.backend_id_by_mac(mac_of(&first), "web6");
    fx.set_backend_state(old, BACKEND_DOWN);
    let (verdict, out) = fx.run_counted(&frame, stat::RESELECT_DOWN);
    assert_eq!(verdict, XDP_TX);
    assert_ne!(mac_of(&out), mac_of(&first));
}

#[test]
fn ipv6_extension_headers_pass_and_first_fragments_are_steered() {
    let mut fx = Fixture::new();
    let mut hbh = Frame::tcp("fd00:9::2", "fd00::10", 80).build();
    hbh[20] = 0; // next header: hop-by-hop options
    assert_eq!(fx.run_counted(&hbh, stat::PASS_V6_EXT_HEADER).0, XDP_PASS);

    let mut f = Frame::tcp("fd00:9::3", "fd00::10", 80);
    let (_, direct) = fx.run(&f.build());
    f.v6_fragment = Some(0);
    let frag = f.build();
    let before = fx.counter(stat::FRAGMENT);
    let (verdict, out) = fx.run_counted(&frag, stat::AFFINITY_HIT);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(fx.counter(stat::FRAGMENT), before + 1);
    assert_forwarded(&frag, &out, mac_of(&direct));
}

// ---- malformed input -----------------------------------------------------

#[test]
fn truncated_frames_drop_with_a_reason() {
    let mut fx = Fixture::new();
    let full = Frame::tcp("10.0.0.100", "10.0.0.10", 80).build();
    // Shorter than an Ethernet header: BPF_PROG_TEST_RUN itself refuses such
    // input (EINVAL), so DROP_TRUNCATED_ETH is only reachable from a driver.
    // A bare Ethernet header with EtherType IPv4 ends inside the IP header.
    assert_eq!(
        fx.run_counted(&full[..14], stat::DROP_TRUNCATED_IP).0,
        XDP_DROP
    );
    // Ends inside the IPv4 header.
    assert_eq!(
        fx.run_counted(&full[..14 + 12], stat::DROP_TRUNCATED_IP).0,
        XDP_DROP
    );
    // Ends inside the TCP header (IP total length fixed up to match).
    let mut cut = full[..14 + 20 + 10].to_vec();
    cut[16..18].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(fx.run_counted(&cut, stat::DROP_TRUNCATED_L4).0, XDP_DROP);
    // IPv6 header cut short.
    let v6 = Frame::tcp("fd00::100", "fd00::10", 80).build();
    assert_eq!(
        fx.run_counted(&v6[..14 + 30], stat::DROP_TRUNCATED_IP).0,
        XDP_DROP
    );
    // VLAN tag cut short.
    let mut f = Frame::tcp("10.0.0.100", "10.0.0.10", 80);
    f.vlan = Some(7);
    let tagged = f.build();
    assert_eq!(
        fx.run_counted(&tagged[..16], stat::DROP_BAD_VLAN).0,
        XDP_DROP
    );
}

#[test]
fn bad_ip_headers_drop_with_a_reason() {
    let mut fx = Fixture::new();
    let good = Frame::tcp("10.0.0.100", "10.0.0.10", 80).build();
    let mut ihl = good.clone();
    ihl[14] = 0x44; // IHL 4
    assert_eq!(fx.run_counted(&ihl, stat::DROP_BAD_IHL).0, XDP_DROP);
    let mut version = good.clone();
    version[14] = 0x65; // version 6 under EtherType IPv4
    assert_eq!(fx.run_counted(&version, stat::DROP_BAD_VERSION).0, XDP_DROP);
    let mut long = good.clone();
    long[16..18].copy_from_slice(&1500u16.to_be_bytes()); // longer than the frame
    assert_eq!(fx.run_counted(&long, stat::DROP_BAD_LENGTH).0, XDP_DROP);
    let mut short = good.clone();
    short[16..18].copy_from_slice(&12u16.to_be_bytes()); // shorter than the header
    assert_eq!(fx.run_counted(&short, stat::DROP_BAD_LENGTH).0, XDP_DROP);
    let mut v6 = Frame::tcp("fd00::100", "fd00::10", 80).build();
    v6[14] = 0x40; // version 4 under EtherType IPv6
    assert_eq!(fx.run_counted(&v6, stat::DROP_BAD_VERSION).0, XDP_DROP);
    let mut v6len = Frame::tcp("fd00::100", "fd00::10", 80).build();
    v6len[18..20].copy_from_slice(&900u16.to_be_bytes());
    assert_eq!(fx.run_counted(&v6len, stat::DROP_BAD_LENGTH).0, XDP_DROP);
}

#[test]
fn ipv4_options_vlan_and_empty_payloads_are_forwarded() {
    let mut fx = Fixture::new();
    let mut f = Frame::tcp("10.0.0.106", "10.0.0.10", 80);
    let (_, plain) = fx.run(&f.build());
    let want = mac_of(&plain);
    f.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL: IHL 6
    let frame = f.build();
    let (verdict, out) = fx.run_counted(&frame, stat::AFFINITY_HIT);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, want);

    let mut tagged = Frame::tcp("10.0.0.106", "10.0.0.10", 80);
    tagged.vlan = Some(42);
    let frame = tagged.build();
    let (verdict, out) = fx.run_counted(&frame, stat::AFFINITY_HIT);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, want); // tag bytes preserved

    let mut empty = Frame::udp("10.0.0.106", "10.0.0.10", 53);
    empty.payload.clear();
    let frame = empty.build();
    let (verdict, out) = fx.run_counted(&frame, stat::NEW_SESSION);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(&out[12..], &frame[12..]);
    let mut syn = Frame::tcp("10.0.0.107", "10.0.0.10", 80);
    syn.payload.clear();
    assert_eq!(fx.run_counted(&syn.build(), stat::NEW_SESSION).0, XDP_TX);
}

/// Two more services on the VIPs of `CONFIG`, each with its own MACs:
/// UDP 5353 beside UDP 53 on 10.0.0.10, TCP 8080 beside TCP 80 on fd00::10.
const MORE_SERVICES: &str = r#"
[[service]]
name = "mdns"
vip = "10.0.0.10"
port = 5353
protocol = "udp"
[[service.backend]]
address = "10.0.0.21"
mac = "02:00:00:00:00:51"
[[service.backend]]
address = "10.0.0.22"
mac = "02:00:00:00:00:52"
[[service.backend]]
address = "10.0.0.23"
mac = "02:00:00:00:00:53"

[[service]]
name = "alt6"
vip = "fd00::10"
port = 8080
protocol = "tcp"
affinity_prefix_v6 = 64
[[service.backend]]
address = "fd00::21"
mac = "02:00:00:00:00:61"
[[service.backend]]
address = "fd00::22"
mac = "02:00:00:00:00:62"
[[service.backend]]
address = "fd00::23"
mac = "02:00:00:00:00:63"
"#;

/// The backend MACs of a configured service.
fn service_macs(fx: &Fixture, name: &str) -> Vec<[u8; 6]> {
    fx.config
        .services
        .iter()
        .find(|s| s.name == name)
        .expect("service in config")
        .backends
        .iter()
        .map(|b| b.mac)
        .collect()
}

/// A fragment of `f`'s datagram with identification `id`: the first (offset
/// 0, more to come) or a later one (a bare payload at offset 1480, no ports).
fn fragment(f: &Frame, id: u32, first: bool) -> Vec<u8> {
    let mut f = f.clone();
    f.ip_id = id;
    let v4 = f.src.is_ipv4();
    if first {
        if v4 {
            f.frags = 0x2000; // MF, offset 0
        } else {
            f.v6_fragment = Some(0);
        }
        return f.build();
    }
    if v4 {
        f.frags = 185; // offset 1480 bytes, last fragment
    } else {
        f.v6_fragment = Some(185);
    }
    let mut frame = f.build();
    // Replace the L4 header and payload by 40 bytes of plain data, with the
    // IP length fixed up: a later fragment carries no ports at all.
    let l3 = 14;
    let l4 = if v4 { l3 + 20 } else { l3 + 40 + 8 };
    frame.truncate(l4);
    frame.extend([0xab; 40]);
    if v4 {
        frame[l3 + 2..l3 + 4].copy_from_slice(&(20u16 + 40).to_be_bytes());
    } else {
        frame[l3 + 4..l3 + 6].copy_from_slice(&(8u16 + 40).to_be_bytes());
    }
    frame
}

fn fragment_key(f: &Frame, id: u32) -> FragmentKey {
    FragmentKey {
        family: if f.src.is_ipv4() {
            FAMILY_V4
        } else {
            FAMILY_V6
        },
        proto: match f.l4 {
            xlb_tests::frames::L4::Tcp => PROTO_TCP,
            xlb_tests::frames::L4::Udp => PROTO_UDP,
        },
        _pad: 0,
        id,
        src: addr_words(f.src),
        dst: addr_words(f.dst),
    }
}

#[test]
fn fragments_follow_their_own_service() {
    let mut fx = Fixture::with_config(&format!("{CONFIG}{MORE_SERVICES}"));
    // Two services on one VIP and protocol per family, one client sending a
    // fragmented datagram to each, interleaved: every fragment must reach
    // its own service's backend (the MAC sets are disjoint), the later one
    // the same backend as its first.
    let cases = [
        ("dns", Frame::udp("10.0.0.108", "10.0.0.10", 53), 0x0101u32),
        ("mdns", Frame::udp("10.0.0.108", "10.0.0.10", 5353), 0x0202),
        ("web6", Frame::tcp("fd00:9::8", "fd00::10", 80), 0x0303_0303),
        (
            "alt6",
            Frame::tcp("fd00:9::8", "fd00::10", 8080),
            0x0404_0404,
        ),
    ];
    let mut firsts = Vec::new();
    for (service, f, id) in &cases {
        let frame = fragment(f, *id, true);
        let before = fx.counter(stat::FRAGMENT);
        let (verdict, out) = fx.run_counted(&frame, stat::NEW_SESSION);
        assert_eq!(verdict, XDP_TX, "{service}: first fragment");
        assert_eq!(fx.counter(stat::FRAGMENT), before + 1);
        let want = fx.maglev_mac(service, f.src);
        assert!(service_macs(&fx, service).contains(&want));
        assert_forwarded(&frame, &out, want);
        // The first fragment recorded its ports for the rest of its datagram.
        let ports = fx
            .maps
            .fragments
            .get(&fragment_key(f, *id), 0)
            .expect("fragment map entry after the first fragment");
        assert_eq!(
            ports,
            FragmentPorts {
                sport: f.sport.to_be(),
                dport: f.dport.to_be()
            },
            "{service}"
        );
        firsts.push(want);
    }
    for ((service, f, id), want) in cases.iter().zip(&firsts).rev() {
        let frame = fragment(f, *id, false);
        let before = fx.counter(stat::FRAGMENT);
        let (verdict, out) = fx.run_counted(&frame, stat::AFFINITY_HIT);
        assert_eq!(verdict, XDP_TX, "{service}: later fragment");
        assert_eq!(fx.counter(stat::FRAGMENT), before + 1);
        assert_forwarded(&frame, &out, *want);
    }
    // Distinct services, distinct backends: the test would not notice
    // fragments steered to the wrong service otherwise.
    assert!(!service_macs(&fx, "dns").contains(&firsts[1]));
    assert!(!service_macs(&fx, "web6").contains(&firsts[3]));
}

#[test]
fn later_fragment_without_its_first_passes() {
    let mut fx = Fixture::with_config(&format!("{CONFIG}{MORE_SERVICES}"));
    let v4 = Frame::udp("10.0.0.109", "10.0.0.10", 5353);
    let v6 = Frame::tcp("fd00:9::9", "fd00::10", 8080);
    for f in [&v4, &v6] {
        let frame = fragment(f, 0x77, false);
        let (verdict, out) = fx.run_counted(&frame, stat::PASS_FRAGMENT_UNSEEN);
        assert_eq!((verdict, out), (XDP_PASS, frame));
        // Another datagram's first fragment (another id, or another client
        // with the same id) does not stand in for it.
        fx.run_counted(&fragment(f, 0x78, true), stat::NEW_SESSION);
        let mut other = f.clone();
        other.src = if f.src.is_ipv4() {
            ip("10.0.0.110")
        } else {
            ip("fd00:8::10")
        };
        fx.run_counted(&fragment(&other, 0x77, true), stat::NEW_SESSION);
        let frame = fragment(f, 0x77, false);
        let (verdict, out) = fx.run_counted(&frame, stat::PASS_FRAGMENT_UNSEEN);
        assert_eq!((verdict, out), (XDP_PASS, frame));
    }
    assert_eq!(
        fx.counter(stat::FRAGMENT),
        4,
        "only the first fragments matched"
    );
    // A fragment to an address without services: the first is not recorded,
    // so the later one passes the same way.
    let stray = Frame::udp("10.0.0.109", "10.0.0.99", 53);
    let (verdict, _) = fx.run_counted(&fragment(&stray, 5, true), stat::PASS_NOT_SERVICE);
    assert_eq!(verdict, XDP_PASS);
    assert!(fx.maps.fragments.get(&fragment_key(&stray, 5), 0).is_err());
    let (verdict, _) = fx.run_counted(&fragment(&stray, 5, false), stat::PASS_FRAGMENT_UNSEEN);
    assert_eq!(verdict, XDP_PASS);
}

// ---- userspace around the maps ------------------------------------------

#[test]
fn reapply_keeps_sessions_and_removal_forgets_them() {
    let mut fx = Fixture::new();
    let mut before = Vec::new();
    for i in 0..24 {
        let f = Frame::tcp(&format!("10.8.0.{i}"), "10.0.0.10", 80).build();
        before.push(mac_of(&fx.run(&f).1));
    }
    // Same config again (what a second `xlb run` does): nobody moves.
    fx.reapply(CONFIG);
    for (i, old) in before.iter().enumerate() {
        let f = Frame::tcp(&format!("10.8.0.{i}"), "10.0.0.10", 80).build();
        let (_, out) = fx.run_counted(&f, stat::AFFINITY_HIT);
        assert_eq!(mac_of(&out), *old, "client {i} moved on re-apply");
    }
    // Remove backend .23 from the web service: its sessions are deleted,
    // the others stay.
    let removed = BACKEND_MACS[2];
    let gone_id = fx.backend_id_by_mac(removed, "web");
    let web_end = CONFIG
        .find("[[service]]\nname = \"dns\"")
        .expect("dns section");
    let (web, rest) = CONFIG.split_at(web_end);
    let web = web.replace(
        "[[service.backend]]\naddress = \"10.0.0.23\"\nmac = \"02:00:00:00:00:13\"\n",
        "",
    );
    fx.reapply(&format!("{web}{rest}"));
    let sid = fx.service_id("web");
    for entry in fx.maps.affinity.iter() {
        let (k, v) = entry.expect("affinity entry");
        assert!(
            !(k.service_id == sid && v.backend_id == gone_id),
            "session of the removed backend survived"
        );
    }
    for (i, old) in before.iter().enumerate() {
        let f = Frame::tcp(&format!("10.8.0.{i}"), "10.0.0.10", 80).build();
        let (_, out) = fx.run(&f);
        if *old == removed {
            assert_ne!(mac_of(&out), removed);
        } else {
            assert_eq!(
                mac_of(&out),
                *old,
                "client {i} moved although its backend stayed"
            );
        }
    }
}

#[test]
fn incompatible_pinned_map_is_refused() {
    let fx = Fixture::new();
    let config = Config::parse(
        &CONFIG.replace("affinity_max_entries = 4096", "affinity_max_entries = 8192"),
    )
    .expect("config");
    let mut opts = LoadOptions::from_config(&config, LB_MAC, false);
    opts.pin_dir = fx.dir.clone();
    let err = Dataplane::load(opts)
        .err()
        .expect("load must refuse the pinned map");
    let msg = format!("{err:#}");
    assert!(msg.contains("XLB_AFFINITY_V1"), "{msg}");
    assert!(msg.contains("max entries 4096"), "{msg}");
    assert!(msg.contains("8192"), "{msg}");
}

#[test]
fn two_instances_agree_without_talking() {
    // A second LB whose config lists the backends in another order (so
    // they get other ids) must send every client to the same backend.
    let mut a = Fixture::new();
    let start = CONFIG.find("[[service.backend]]").expect("first backend");
    let end = CONFIG
        .find("[[service]]\nname = \"dns\"")
        .expect("dns section");
    let block = &CONFIG[start..end];
    let mut parts: Vec<&str> = block
        .split("[[service.backend]]")
        .filter(|p| !p.trim().is_empty())
        .collect();
    parts.reverse();
    let reversed: String = parts
        .iter()
        .map(|p| format!("[[service.backend]]{p}"))
        .collect();
    let mut b = Fixture::with_config(&CONFIG.replacen(block, &reversed, 1));
    assert_ne!(
        a.backend_id_by_mac(BACKEND_MACS[0], "web"),
        b.backend_id_by_mac(BACKEND_MACS[0], "web"),
        "the test needs the two instances to number backends differently"
    );
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..64 {
        let frame = Frame::tcp(&format!("10.20.{i}.7"), "10.0.0.10", 80).build();
        let (va, oa) = a.run(&frame);
        let (vb, ob) = b.run(&frame);
        assert_eq!((va, vb), (XDP_TX, XDP_TX));
        assert_eq!(
            mac_of(&oa),
            mac_of(&ob),
            "client {i}: the instances disagree"
        );
        seen.insert(mac_of(&oa));
    }
    assert_eq!(seen.len(), 3, "all backends should get clients");
}

/// Creates a map with the raw `bpf(2)` syscall and pins it at `path`: the
/// only way to plant a map whose flags no xlb build would choose.
fn pin_raw_map(path: &std::path::Path, map_type: u32, key: u32, value: u32, max: u32, flags: u32) {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    // union bpf_attr, map-create part: type, key size, value size, max entries, flags.
    let mut create = [0u32; 32];
    create[..5].copy_from_slice(&[map_type, key, value, max, flags]);
    // SAFETY: a valid bpf_attr buffer of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            create.as_ptr(),
            size_of_val(&create),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    // union bpf_attr, obj-pin part: u64 pathname, u32 bpf_fd, u32 file_flags.
    let mut pin = [0u64; 16];
    pin[0] = cpath.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: as above; cpath outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), size_of_val(&pin)) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours; the pin keeps the map alive.
    unsafe { libc::close(fd as i32) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN {}: {err}", path.display());
}

#[test]
fn pinned_map_with_other_flags_is_refused() {
    assert_root();
    // The affinity map as an older or foreign build might have pinned it:
    // same type and sizes, but a per-CPU LRU (BPF_F_NO_COMMON_LRU).
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/xlb-fixture-{}-flags",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("pin dir");
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    const BPF_F_NO_COMMON_LRU: u32 = 2;
    pin_raw_map(
        &dir.join(lb_common::MAP_AFFINITY),
        BPF_MAP_TYPE_LRU_HASH,
        size_of::<AffinityKey>() as u32,
        size_of::<Affinity>() as u32,
        4096,
        BPF_F_NO_COMMON_LRU,
    );
    let config = Config::parse(CONFIG).expect("config");
    let mut opts = LoadOptions::from_config(&config, LB_MAC, false);
    opts.pin_dir = dir.clone();
    let result = Dataplane::load(opts);
    let _ = pins::remove_all(&dir);
    let msg = format!(
        "{:#}",
        result.err().expect("load must refuse the pinned map")
    );
    assert!(
        msg.contains("XLB_AFFINITY_V1") && msg.contains("flags 0x2"),
        "{msg}"
    );
}

// ---- writes proportional to the change ---------------------------------

/// Two services on two VIPs, three backends each, full-size tables.
const TWO_SERVICES: &str = r#"
interface = "fx0"
maglev_table_size = 65537
max_services = 4
affinity_max_entries = 4096

[[service]]
name = "A"
vip = "10.0.0.10"
port = 80
protocol = "tcp"
affinity_timeout = "1h"
[[service.backend]]
name = "a1"
address = "10.0.0.21"
mac = "02:00:00:00:00:11"
[[service.backend]]
name = "a2"
address = "10.0.0.22"
mac = "02:00:00:00:00:12"
[[service.backend]]
name = "a3"
address = "10.0.0.23"
mac = "02:00:00:00:00:13"

[[service]]
name = "B"
vip = "10.0.0.11"
port = 80
protocol = "tcp"
affinity_timeout = "1h"
[[service.backend]]
name = "b1"
address = "10.0.0.31"
mac = "02:00:00:00:00:21"
[[service.backend]]
name = "b2"
address = "10.0.0.32"
mac = "02:00:00:00:00:22"
[[service.backend]]
name = "b3"
address = "10.0.0.33"
mac = "02:00:00:00:00:23"
"#;

/// `text` with backend `name` in state `state`.
fn with_state(text: &str, name: &str, state: &str) -> String {
    let anchor = format!("name = \"{name}\"\n");
    assert!(text.contains(&anchor), "no backend {name}");
    text.replacen(&anchor, &format!("{anchor}state = \"{state}\"\n"), 1)
}

impl Fixture {
    fn record(&self, service: &str) -> lb_common::Service {
        let svc = self
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .expect("service in config");
        self.maps
            .services
            .get(&dataplane::service_key(svc), 0)
            .expect("service in map")
    }

    /// The live Maglev table of `service`, read from the kernel.
    fn live_table(&self, service: &str) -> Vec<u32> {
        let r = self.record(service);
        let mut out = vec![0u32; r.table_size as usize];
        xlb::bpf_batch::read_array(
            &self.maps.maglev,
            r.maglev_base[r.active_slot as usize],
            &mut out,
        )
        .expect("reading the live table");
        out
    }

    /// The table userspace builds for `service` with the ids `report` assigned.
    fn expected_table(&self, service: &str, report: &dataplane::ApplyReport) -> Vec<u32> {
        let svc = self
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .expect("service in config");
        let ids: Vec<u32> = svc
            .backends
            .iter()
            .map(|b| report.backend_ids[&(svc.name.clone(), b.name.clone())])
            .collect();
        dataplane::service_table(svc, &ids, self.config.maglev_table_size).expect("table")
    }

    /// Checks that `report`'s ids are those in the service and backend maps.
    fn assert_ids_match_maps(&self, report: &dataplane::ApplyReport) {
        for svc in &self.config.services {
            let sid = report.service_ids[&svc.name];
            assert_eq!(self.record(&svc.name).id, sid, "service {}", svc.name);
            for be in &svc.backends {
                let id = report.backend_ids[&(svc.name.clone(), be.name.clone())];
                let rec = self.maps.backends.get(&id, 0).expect("backend slot");
                assert_eq!(rec.addr, addr_words(be.address), "{}/{}", svc.name, be.name);
                assert_eq!(rec.mac, be.mac, "{}/{}", svc.name, be.name);
                assert_eq!(u32::from(rec.service_id), sid, "{}/{}", svc.name, be.name);
                assert_eq!(rec.state, be.state.to_abi(), "{}/{}", svc.name, be.name);
            }
        }
        let used = self
            .maps
            .backend_records()
            .expect("backend map")
            .iter()
            .filter(|b| b.state != lb_common::BACKEND_EMPTY)
            .count();
        assert_eq!(used, report.backend_ids.len(), "stray backend slots");
    }
}

#[test]
fn apply_writes_only_the_changed_service() {
    let mut fx = Fixture::with_config(TWO_SERVICES);
    let first = fx.reapply_report(TWO_SERVICES);
    assert!(
        first.tables_written.is_empty()
            && first.backends_written == 0
            && first.services_written == 0,
        "re-applying the same config wrote something: {first:?}"
    );
    fx.assert_ids_match_maps(&first);
    let b_before = fx.record("B");
    let a_before = fx.record("A");

    // Clients of A, and where they are now.
    let clients: Vec<String> = (0..64).map(|i| format!("10.9.{i}.1")).collect();
    let mut before = Vec::new();
    for c in &clients {
        let (verdict, out) = fx.run(&Frame::tcp(c, "10.0.0.10", 80).build());
        assert_eq!(verdict, XDP_TX);
        before.push(mac_of(&out));
    }
    let dead = BACKEND_MACS[1];
    assert!(before.contains(&dead), "the test needs clients on a2");

    let down = with_state(TWO_SERVICES, "a2", "down");
    let report = fx.reapply_report(&down);
    assert_eq!(report.tables_written, ["A"], "{report:?}");
    assert_eq!(report.backends_written, 1, "only a2's record changes");
    assert!(
        report.table_entries_written > 0 && report.table_entries_written < 65537,
        "the table is written where it differs, not whole: {}",
        report.table_entries_written
    );
    assert_eq!(report.service_ids, first.service_ids, "service ids kept");
    assert_eq!(report.backend_ids, first.backend_ids, "backend ids kept");
    fx.assert_ids_match_maps(&report);
    assert_eq!(
        fx.record("B"),
        b_before,
        "B's record was rewritten or flipped"
    );
    assert_ne!(
        fx.record("A").active_slot,
        a_before.active_slot,
        "A's table did not flip"
    );
    assert_eq!(fx.live_table("A"), fx.expected_table("A", &report));
    assert_eq!(fx.live_table("B"), fx.expected_table("B", &report));

    // a2's clients go to their new Maglev choice; the others stay.
    let table = fx.expected_table("A", &report);
    let a = fx.config.services[0].clone();
    let mac_of_id = |id: u32| {
        a.backends
            .iter()
            .find(|b| report.backend_ids[&("A".to_string(), b.name.clone())] == id)
            .expect("table id is a backend of A")
            .mac
    };
    for (c, old) in clients.iter().zip(&before) {
        let (_, out) = fx.run(&Frame::tcp(c, "10.0.0.10", 80).build());
        let masked = lb_common::mask_addr(
            &addr_words(c.parse().expect("client address")),
            &prefix_mask(32, 32),
        );
        let choice = mac_of_id(table[maglev::slot(&masked, 65537) as usize]);
        if *old == dead {
            assert_eq!(
                mac_of(&out),
                choice,
                "client {c} not on its new Maglev choice"
            );
        } else {
            assert_eq!(
                mac_of(&out),
                *old,
                "client {c} moved although its backend is up"
            );
        }
    }

    // Back up, then another one down: each change writes only A, and the
    // slot written (which held an older table) ends up exactly right.
    let up = fx.reapply_report(TWO_SERVICES);
    assert_eq!(up.tables_written, ["A"]);
    assert_eq!(fx.live_table("A"), fx.expected_table("A", &up));
    let other = fx.reapply_report(&with_state(TWO_SERVICES, "a3", "down"));
    assert_eq!(other.tables_written, ["A"]);
    assert_eq!(fx.live_table("A"), fx.expected_table("A", &other));
    assert_eq!(fx.record("B"), b_before);

    // A process that knows nothing (a restart) compares with the kernel
    // and writes nothing; a change in B then writes only B.
    fx.maps.forget_tables();
    let again = fx.reapply_report(&with_state(TWO_SERVICES, "a3", "down"));
    assert!(again.tables_written.is_empty(), "{again:?}");
    let b = fx.reapply_report(&with_state(
        &with_state(TWO_SERVICES, "a3", "down"),
        "b1",
        "down",
    ));
    assert_eq!(b.tables_written, ["B"]);
    assert_eq!(fx.live_table("B"), fx.expected_table("B", &b));
    assert_eq!(fx.live_table("A"), fx.expected_table("A", &b));
}

#[test]
fn apply_frees_removed_backends_only_after_their_sessions() {
    let mut fx = Fixture::with_config(TWO_SERVICES);
    let first = fx.reapply_report(TWO_SERVICES);
    for i in 0..32 {
        fx.run(&Frame::tcp(&format!("10.7.0.{i}"), "10.0.0.10", 80).build());
    }
    let gone = first.backend_ids[&("A".to_string(), "a1".to_string())];
    // a1 removed and a new backend a4 added in the same apply: a4 must not
    // get a1's id, and no session may point at a1's id afterwards.
    let text = TWO_SERVICES.replacen(
        "name = \"a1\"\naddress = \"10.0.0.21\"",
        "name = \"a4\"\naddress = \"10.0.0.24\"",
        1,
    );
    let report = fx.reapply_report(&text);
    assert_eq!(report.backends_removed, 1);
    assert!(report.sessions_removed > 0, "the test needs sessions on a1");
    let new = report.backend_ids[&("A".to_string(), "a4".to_string())];
    assert_ne!(new, gone, "a removed id was reused in the same apply");
    assert_eq!(
        fx.maps.backends.get(&gone, 0).expect("slot").state,
        lb_common::BACKEND_EMPTY
    );
    for entry in fx.maps.affinity.iter() {
        let (_, v) = entry.expect("affinity entry");
        assert_ne!(v.backend_id, gone, "a session still points at the freed id");
    }
    fx.assert_ids_match_maps(&report);
    assert_eq!(report.tables_written, ["A"]);
    assert_eq!(fx.live_table("A"), fx.expected_table("A", &report));
}

#[test]
fn apply_at_max_services_reuses_a_leaving_services_id_safely() {
    let text = TWO_SERVICES.replace("max_services = 4", "max_services = 2");
    let mut fx = Fixture::with_config(&text);
    let first = fx.reapply_report(&text);
    let a_before = fx.record("A");
    for i in 0..16 {
        fx.run(&Frame::tcp(&format!("10.6.0.{i}"), "10.0.0.11", 80).build());
    }
    // B moves to port 81: a new key, and no id is free but B's own.
    let moved = text.replacen(
        "vip = \"10.0.0.11\"\nport = 80",
        "vip = \"10.0.0.11\"\nport = 81",
        1,
    );
    let report = fx.reapply_report(&moved);
    assert_eq!(report.service_ids["B"], first.service_ids["B"], "id reused");
    assert_eq!(report.services_removed, 1);
    assert_eq!(report.backends_removed, 3, "the old service's backends go");
    assert_eq!(report.sessions_removed, 16, "the old service's sessions go");
    assert_eq!(report.tables_written, ["B"]);
    assert_eq!(fx.record("A"), a_before, "A untouched");
    fx.assert_ids_match_maps(&report);
    assert_eq!(fx.live_table("B"), fx.expected_table("B", &report));
    let old_port = Frame::tcp("10.6.0.1", "10.0.0.11", 80).build();
    assert_eq!(
        fx.run_counted(&old_port, stat::PASS_NOT_SERVICE).0,
        XDP_PASS
    );
    let b_macs: Vec<[u8; 6]> = fx.config.services[1]
        .backends
        .iter()
        .map(|b| b.mac)
        .collect();
    for i in 0..16 {
        let f = Frame::tcp(&format!("10.6.0.{i}"), "10.0.0.11", 81).build();
        let (verdict, out) = fx.run_counted(&f, stat::NEW_SESSION);
        assert_eq!(verdict, XDP_TX);
        assert!(b_macs.contains(&mac_of(&out)), "client {i} not sent to B");
    }
}

// ---- exact steering (issue 8) ---------------------------------------------

#[test]
fn fixture_services_never_share_backend_macs() {
    // A frame steered to another service's backend is only visible when the
    // services' backends differ.
    let config = Config::parse(CONFIG).expect("config");
    let mut owner = std::collections::HashMap::new();
    for svc in &config.services {
        for be in &svc.backends {
            if let Some(other) = owner.insert(be.mac, svc.name.clone()) {
                assert_eq!(
                    other, svc.name,
                    "services {other} and {} share a backend MAC",
                    svc.name
                );
            }
        }
    }
}

#[test]
fn affinity_entry_of_another_services_backend_is_reselected() {
    let mut fx = Fixture::new();
    let client = ip("10.0.0.120");
    let want = fx.maglev_mac("web", client);
    // An entry of "web" naming a backend of "dns" (what a reused id could
    // leave behind): it must not be obeyed.
    let foreign = fx.backend_id_by_mac([0x02, 0, 0, 0, 0, 0x21], "dns");
    let key = AffinityKey {
        service_id: fx.service_id("web"),
        addr: addr_words(client),
    };
    let value = Affinity {
        backend_id: foreign,
        _pad: 0,
        last_seen_ns: monotonic_ns(),
    };
    fx.maps.affinity.insert(key, value, 0).expect("insert");
    let hits = fx.counter(stat::AFFINITY_HIT);
    let down = fx.counter(stat::RESELECT_DOWN);
    let frame = Frame::tcp("10.0.0.120", "10.0.0.10", 80).build();
    let (verdict, out) = fx.run_counted(&frame, stat::RESELECT_FOREIGN);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, want);
    assert_eq!(fx.counter(stat::AFFINITY_HIT), hits, "counted as a hit too");
    assert_eq!(fx.counter(stat::RESELECT_DOWN), down, "counted as down");
    let entry = fx.affinity("web", client, 32).expect("entry kept");
    assert_eq!(entry.backend_id, fx.backend_id_by_mac(want, "web"));
    // And from now on it is an ordinary hit.
    let (_, again) = fx.run_counted(&frame, stat::AFFINITY_HIT);
    assert_eq!(mac_of(&again), want);
}

#[test]
fn backend_id_0_is_never_assigned_and_never_forwarded_to() {
    let mut fx = Fixture::with_config(TWO_SERVICES);
    let report = fx.reapply_report(TWO_SERVICES);
    assert!(
        report.backend_ids.values().all(|id| *id != 0),
        "id 0 assigned: {report:?}"
    );
    assert_eq!(
        fx.maps.backends.get(&0, 0).expect("slot 0").state,
        lb_common::BACKEND_EMPTY
    );
    // An entry naming id 0 (an empty slot) is re-selected, not forwarded.
    let client = ip("10.0.0.121");
    let key = AffinityKey {
        service_id: fx.service_id("A"),
        addr: addr_words(client),
    };
    let value = Affinity {
        backend_id: 0,
        _pad: 0,
        last_seen_ns: monotonic_ns(),
    };
    fx.maps.affinity.insert(key, value, 0).expect("insert");
    let frame = Frame::tcp("10.0.0.121", "10.0.0.10", 80).build();
    let (verdict, out) = fx.run_counted(&frame, stat::RESELECT_DOWN);
    assert_eq!(verdict, XDP_TX);
    assert_ne!(mac_of(&out), [0; 6]);
    assert_ne!(fx.affinity("A", client, 32).expect("entry").backend_id, 0);
}

/// Puts backend `name` of service `service` at id 0 the way an xlb before
/// issue 8 could have: record at 0, its old slot cleared, the live table and
/// its sessions naming 0. Returns its old id.
fn plant_backend_at_id_0(fx: &mut Fixture, service: &str, name: &str) -> u32 {
    let report = fx.reapply_report(&fx.config_text());
    let old = report.backend_ids[&(service.to_string(), name.to_string())];
    let record = fx.maps.backends.get(&old, 0).expect("record");
    fx.maps.backends.set(0, record, 0).expect("record at 0");
    fx.maps
        .backends
        .set(old, lb_common::Backend::default(), 0)
        .expect("clear old slot");
    let r = fx.record(service);
    let base = r.maglev_base[r.active_slot as usize];
    let table: Vec<u32> = fx
        .live_table(service)
        .iter()
        .map(|id| if *id == old { 0 } else { *id })
        .collect();
    let keys: Vec<u32> = (base..base + table.len() as u32).collect();
    xlb::bpf_batch::update_array(&mut fx.maps.maglev, &keys, &table).expect("table with 0");
    let mut planted = Vec::new();
    for entry in fx.maps.affinity.iter() {
        let (k, v) = entry.expect("affinity entry");
        if v.backend_id == old {
            planted.push((k, Affinity { backend_id: 0, ..v }));
        }
    }
    for (k, v) in planted {
        fx.maps.affinity.insert(k, v, 0).expect("entry at 0");
    }
    // This process did not write what is there now.
    fx.maps.forget_tables();
    old
}

impl Fixture {
    fn config_text(&self) -> String {
        self.text.clone()
    }
}

#[test]
fn backend_left_at_id_0_by_an_old_xlb_moves_with_its_sessions() {
    let mut fx = Fixture::with_config(TWO_SERVICES);
    // Sessions on every backend of A, then a2 is put at id 0.
    let clients: Vec<String> = (0..48).map(|i| format!("10.4.{i}.1")).collect();
    let mut before = Vec::new();
    for c in &clients {
        before.push(mac_of(&fx.run(&Frame::tcp(c, "10.0.0.10", 80).build()).1));
    }
    let a2 = BACKEND_MACS[1];
    assert!(before.contains(&a2), "the test needs clients on a2");
    plant_backend_at_id_0(&mut fx, "A", "a2");
    // A session of B pointing at 0 is foreign to A's backend at 0.
    let b_client = ip("10.4.200.1");
    let b_key = AffinityKey {
        service_id: fx.service_id("B"),
        addr: addr_words(b_client),
    };
    let stale = Affinity {
        backend_id: 0,
        _pad: 0,
        last_seen_ns: monotonic_ns(),
    };
    fx.maps.affinity.insert(b_key, stale, 0).expect("B entry");

    // Before the new apply: a2's sessions still reach it through id 0 ...
    for (c, old) in clients.iter().zip(&before) {
        let f = Frame::tcp(c, "10.0.0.10", 80).build();
        let (verdict, out) = fx.run_counted(&f, stat::AFFINITY_HIT);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(mac_of(&out), *old, "client {c} moved before the apply");
    }
    // ... but no new client is sent to id 0 through a table slot naming it,
    // and B's entry is not obeyed.
    for i in 0..64 {
        let f = Frame::tcp(&format!("10.3.{i}.9"), "10.0.0.10", 80).build();
        let (verdict, out) = fx.run_counted(&f, stat::NEW_SESSION);
        assert_eq!(verdict, XDP_TX);
        assert_ne!(mac_of(&out), a2, "new client {i} sent to id 0");
    }
    let f = Frame::tcp("10.4.200.1", "10.0.0.11", 80).build();
    let (_, out) = fx.run_counted(&f, stat::RESELECT_FOREIGN);
    assert_ne!(mac_of(&out), a2);
    // Put B's stale entry back for the apply to clean up.
    fx.maps.affinity.insert(b_key, stale, 0).expect("B entry");

    let report = fx.reapply_report(TWO_SERVICES);
    assert_eq!(report.backends_moved, 1, "{report:?}");
    let moved_to = report.backend_ids[&("A".to_string(), "a2".to_string())];
    assert_ne!(moved_to, 0);
    let on_a2 = before.iter().filter(|m| **m == a2).count();
    assert_eq!(report.sessions_moved, on_a2, "{report:?}");
    assert_eq!(report.backends_removed, 0, "{report:?}");
    assert!(report.sessions_removed >= 1, "B's entry at 0 is deleted");
    assert_eq!(
        fx.maps.backends.get(&0, 0).expect("slot 0").state,
        lb_common::BACKEND_EMPTY
    );
    fx.assert_ids_match_maps(&report);
    assert!(!fx.live_table("A").contains(&0), "table still names id 0");
    assert_eq!(fx.live_table("A"), fx.expected_table("A", &report));
    for entry in fx.maps.affinity.iter() {
        let (_, v) = entry.expect("affinity entry");
        assert_ne!(v.backend_id, 0, "a session still names id 0");
    }
    // Every client stays where it was.
    for (c, old) in clients.iter().zip(&before) {
        let f = Frame::tcp(c, "10.0.0.10", 80).build();
        let (_, out) = fx.run_counted(&f, stat::AFFINITY_HIT);
        assert_eq!(mac_of(&out), *old, "client {c} moved by the apply");
    }
    // And a second apply has nothing left to move.
    let again = fx.reapply_report(TWO_SERVICES);
    assert_eq!((again.backends_moved, again.sessions_moved), (0, 0));
}

#[test]
fn destination_port_0_is_never_a_service() {
    let mut fx = Fixture::new();
    // No service map key has port 0, and a datagram or first fragment to
    // port 0 passes without a lookup and records nothing.
    let mut first0 = Frame::udp("10.0.0.130", "10.0.0.10", 0);
    first0.frags = 0x2000;
    for frame in [
        Frame::tcp("10.0.0.130", "10.0.0.10", 0).build(),
        Frame::udp("10.0.0.130", "10.0.0.10", 0).build(),
        Frame::tcp("fd00::130", "fd00::10", 0).build(),
        first0.build(),
    ] {
        let (verdict, out) = fx.run_counted(&frame, stat::PASS_PORT_ZERO);
        assert_eq!((verdict, out), (XDP_PASS, frame));
    }
    assert!(fx.affinity("web", ip("10.0.0.130"), 32).is_none());
    assert!(
        fx.maps.fragments.keys().next().is_none(),
        "nothing recorded"
    );
    let port0 = |fx: &Fixture| {
        fx.maps
            .services
            .keys()
            .filter(|k| k.as_ref().is_ok_and(|k| k.port == 0))
            .count()
    };
    assert_eq!(port0(&fx), 0);

    // An older xlb left port-0 fragment entries (copies of a service
    // record): apply deletes them.
    let dns = fx
        .config
        .services
        .iter()
        .find(|s| s.name == "dns")
        .expect("dns")
        .clone();
    let key = dataplane::service_key(&dns);
    let record = fx.maps.services.get(&key, 0).expect("dns record");
    let legacy = ServiceKey { port: 0, ..key };
    fx.maps
        .services
        .insert(legacy, record, 0)
        .expect("writing a legacy entry");
    assert_eq!(port0(&fx), 1);
    let text = fx.text.clone();
    fx.reapply(&text);
    assert_eq!(port0(&fx), 0, "apply removes legacy port-0 entries");
    assert_eq!(fx.maps.services.get(&key, 0).expect("dns kept"), record);
}

#[test]
fn l4_header_past_the_ip_datagram_drops() {
    let mut fx = Fixture::new();
    // IPv4 total length 20: the TCP header is padding.
    let mut v4 = Frame::tcp("10.0.0.131", "10.0.0.10", 80).build();
    v4[16..18].copy_from_slice(&20u16.to_be_bytes());
    assert_eq!(fx.run_counted(&v4, stat::DROP_TRUNCATED_L4).0, XDP_DROP);
    // Ending inside the TCP header, or the UDP header.
    v4[16..18].copy_from_slice(&(20u16 + 19).to_be_bytes());
    assert_eq!(fx.run_counted(&v4, stat::DROP_TRUNCATED_L4).0, XDP_DROP);
    let mut udp = Frame::udp("10.0.0.131", "10.0.0.10", 53).build();
    udp[16..18].copy_from_slice(&(20u16 + 7).to_be_bytes());
    assert_eq!(fx.run_counted(&udp, stat::DROP_TRUNCATED_L4).0, XDP_DROP);
    // A first fragment too short to hold the ports.
    let mut first = Frame::udp("10.0.0.131", "10.0.0.10", 53);
    first.frags = 0x2000;
    let mut first = first.build();
    first[16..18].copy_from_slice(&(20u16 + 4).to_be_bytes());
    assert_eq!(fx.run_counted(&first, stat::DROP_TRUNCATED_L4).0, XDP_DROP);
    // IPv6 payload length 0 with a TCP header behind it.
    let mut v6 = Frame::tcp("fd00::131", "fd00::10", 80).build();
    v6[18..20].copy_from_slice(&0u16.to_be_bytes());
    assert_eq!(fx.run_counted(&v6, stat::DROP_TRUNCATED_L4).0, XDP_DROP);
    // After a Fragment header: the payload holds the Fragment header only,
    // or not even that.
    let mut f6 = Frame::tcp("fd00::131", "fd00::10", 80);
    f6.v6_fragment = Some(0);
    let mut f6 = f6.build();
    f6[18..20].copy_from_slice(&8u16.to_be_bytes());
    assert_eq!(fx.run_counted(&f6, stat::DROP_TRUNCATED_L4).0, XDP_DROP);
    f6[18..20].copy_from_slice(&4u16.to_be_bytes());
    assert_eq!(fx.run_counted(&f6, stat::DROP_BAD_LENGTH).0, XDP_DROP);
    assert!(
        fx.affinity("web", ip("10.0.0.131"), 32).is_none(),
        "no session"
    );
    assert!(
        fx.affinity("web6", ip("fd00::131"), 64).is_none(),
        "no session"
    );

    // The same frames with their true lengths are forwarded; a later
    // fragment carries no L4 header and needs none.
    let whole = Frame::tcp("10.0.0.131", "10.0.0.10", 80).build();
    assert_eq!(fx.run_counted(&whole, stat::NEW_SESSION).0, XDP_TX);
    let mut first = Frame::udp("10.0.0.131", "10.0.0.10", 53);
    first.frags = 0x2000;
    assert_eq!(fx.run(&first.build()).0, XDP_TX);
    let mut later = Frame::udp("10.0.0.131", "10.0.0.10", 53);
    later.frags = 185;
    let mut later = later.build();
    later[16..18].copy_from_slice(&(20u16 + 4).to_be_bytes());
    assert_eq!(fx.run(&later).0, XDP_TX);
    let mut f6 = Frame::tcp("fd00::131", "fd00::10", 80);
    f6.v6_fragment = Some(0);
    assert_eq!(fx.run_counted(&f6.build(), stat::NEW_SESSION).0, XDP_TX);
}

// ---- ICMP errors about a service's replies ---------------------------------

/// A reply from `vip:port` to `client` (what a backend sends with DSR).
fn reply(vip: &str, port: u16, client: &str) -> Frame {
    let mut f = Frame::tcp(vip, client, 40000);
    f.sport = port;
    f
}

/// Plants a session of `client` (masked by `prefix`) on `service`'s backend `mac`.
fn plant_session(fx: &mut Fixture, service: &str, client: IpAddr, prefix: u8, mac: [u8; 6]) {
    let bits = if client.is_ipv4() { 32 } else { 128 };
    let key = AffinityKey {
        service_id: fx.service_id(service),
        addr: lb_common::mask_addr(&addr_words(client), &prefix_mask(prefix, bits)),
    };
    let value = Affinity {
        backend_id: fx.backend_id_by_mac(mac, service),
        _pad: 0,
        last_seen_ns: monotonic_ns(),
    };
    fx.maps.affinity.insert(key, value, 0).expect("insert");
}

/// A backend MAC of `service` other than `not`.
fn other_mac(fx: &Fixture, service: &str, not: [u8; 6]) -> [u8; 6] {
    *service_macs(fx, service)
        .iter()
        .find(|m| **m != not)
        .expect("another backend")
}

#[test]
fn frag_needed_goes_to_the_clients_session_backend() {
    let mut fx = Fixture::new();
    let client = ip("10.0.0.100");
    // The session points away from Maglev: the ICMP must follow the session.
    let maglev = fx.maglev_mac("web", client);
    let session = other_mac(&fx, "web", maglev);
    plant_session(&mut fx, "web", client, 32, session);
    let before = fx.affinity("web", client, 32).expect("entry");

    let frame = IcmpError::too_big("10.0.0.1", reply("10.0.0.10", 80, "10.0.0.100")).build();
    let (verdict, out) = fx.run_counted(&frame, stat::ICMP_TOO_BIG_FORWARDED);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, session);
    let after = fx.affinity("web", client, 32).expect("entry kept");
    assert_eq!(after.backend_id, before.backend_id);
    assert_eq!(after.last_seen_ns, before.last_seen_ns, "no refresh");
    // Not the clients' traffic: no per-service or per-backend counts.
    let snap = stats::snapshot(&fx.maps).expect("stats");
    assert!(snap.services.iter().all(|(_, s)| s.packets == 0));
    assert!(snap.backends.iter().all(|(_, b)| b.packets == 0));

    // A quote with IPv4 options is read past them.
    let mut quote = reply("10.0.0.10", 80, "10.0.0.100");
    quote.ip_options = vec![1, 1, 1, 0];
    let frame = IcmpError::too_big("10.0.0.1", quote).build();
    let (verdict, out) = fx.run_counted(&frame, stat::ICMP_TOO_BIG_FORWARDED);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, session);
}

#[test]
fn frag_needed_without_a_session_takes_maglev_and_creates_none() {
    let mut fx = Fixture::new();
    let client = ip("10.0.0.150");
    let want = fx.maglev_mac("web", client);
    let frame = IcmpError::too_big("10.0.0.1", reply("10.0.0.10", 80, "10.0.0.150")).build();
    let (verdict, out) = fx.run_counted(&frame, stat::ICMP_TOO_BIG_FORWARDED);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, want);
    assert!(
        fx.affinity("web", client, 32).is_none(),
        "no session created"
    );
    assert_eq!(fx.counter(stat::NEW_SESSION), 0);

    // A UDP reply of the dns service goes to that service's backend.
    let mut quote = Frame::udp("10.0.0.10", "10.0.0.150", 40000);
    quote.sport = 53;
    let frame = IcmpError::too_big("10.0.0.1", quote).build();
    let (verdict, out) = fx.run_counted(&frame, stat::ICMP_TOO_BIG_FORWARDED);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, fx.maglev_mac("dns", client));

    // An expired session is not used: the Maglev answer is, and the entry stays.
    let session = other_mac(&fx, "web", want);
    plant_session(&mut fx, "web", client, 32, session);
    let key = AffinityKey {
        service_id: fx.service_id("web"),
        addr: addr_words(client),
    };
    let old = fx.expire("web", key);
    let frame = IcmpError::too_big("10.0.0.1", reply("10.0.0.10", 80, "10.0.0.150")).build();
    let (_, out) = fx.run_counted(&frame, stat::ICMP_TOO_BIG_FORWARDED);
    assert_forwarded(&frame, &out, want);
    let kept = fx.maps.affinity.get(&key, 0).expect("entry");
    assert_eq!(
        (kept.backend_id, kept.last_seen_ns),
        (old.backend_id, old.last_seen_ns),
        "entry not rewritten"
    );
}

#[test]
fn packet_too_big_v6_goes_to_the_clients_backend() {
    let mut fx = Fixture::new();
    // Session by the /64: another host of the prefix shares it.
    let client = ip("fd00:1:2:3::100");
    let maglev = fx.maglev_mac("web6", client);
    let session = other_mac(&fx, "web6", maglev);
    plant_session(&mut fx, "web6", client, 64, session);
    let frame = IcmpError::too_big("fd00::1", reply("fd00::10", 80, "fd00:1:2:3::beef")).build();
    let (verdict, out) = fx.run_counted(&frame, stat::ICMP_TOO_BIG_FORWARDED);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, session);

    // No session: the Maglev answer, and none created.
    let lone = ip("fd00:9::1");
    let frame = IcmpError::too_big("fd00::1", reply("fd00::10", 80, "fd00:9::1")).build();
    let (verdict, out) = fx.run_counted(&frame, stat::ICMP_TOO_BIG_FORWARDED);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, fx.maglev_mac("web6", lone));
    assert!(fx.affinity("web6", lone, 64).is_none());
}

#[test]
fn other_icmp_and_unusable_quotes_pass() {
    let mut fx = Fixture::new();
    let passes = |fx: &mut Fixture, frame: Vec<u8>, what: &str| {
        let (verdict, out) = fx.run_counted(&frame, stat::PASS_NOT_L4);
        assert_eq!((verdict, &out), (XDP_PASS, &frame), "{what}");
    };
    let too_big = || IcmpError::too_big("10.0.0.1", reply("10.0.0.10", 80, "10.0.0.100"));

    let mut echo = too_big();
    (echo.icmp_type, echo.code) = (8, 0);
    passes(&mut fx, echo.build(), "echo request to the VIP");
    let mut unreachable = too_big();
    unreachable.code = 3;
    passes(&mut fx, unreachable.build(), "port unreachable");
    passes(
        &mut fx,
        IcmpError::too_big("10.0.0.1", reply("10.0.0.10", 81, "10.0.0.100")).build(),
        "quote of a port without a service",
    );
    let mut udp80 = Frame::udp("10.0.0.10", "10.0.0.100", 40000);
    udp80.sport = 80;
    passes(
        &mut fx,
        IcmpError::too_big("10.0.0.1", udp80).build(),
        "quote of a protocol without a service",
    );
    let mut short = too_big();
    short.quote_len = 20 + 7;
    passes(&mut fx, short.build(), "quote shorter than 8 L4 bytes");
    let mut elsewhere = too_big();
    elsewhere.dst = ip("10.0.0.99");
    passes(
        &mut fx,
        elsewhere.build(),
        "error to another address than the quote's source",
    );
    let mut echo6 = IcmpError::too_big("fd00::1", reply("fd00::10", 80, "fd00::100"));
    echo6.icmp_type = 128;
    passes(&mut fx, echo6.build(), "ICMPv6 echo request to the VIP");
    let mut frag6 = reply("fd00::10", 80, "fd00::100");
    frag6.v6_fragment = Some(0);
    passes(
        &mut fx,
        IcmpError::too_big("fd00::1", frag6).build(),
        "quote with an IPv6 extension header",
    );
    // A quote of a later IPv4 fragment has no ports.
    let mut later = reply("10.0.0.10", 80, "10.0.0.100");
    later.frags = 0x2001;
    passes(
        &mut fx,
        IcmpError::too_big("10.0.0.1", later).build(),
        "quoted later fragment",
    );

    assert_eq!(fx.counter(stat::ICMP_TOO_BIG_FORWARDED), 0);
    assert!(fx.affinity("web", ip("10.0.0.100"), 32).is_none());
}

// ---- flood-proof affinity --------------------------------------------------

/// `CONFIG` with a fourth backend in "web".
fn with_fourth_web_backend() -> String {
    CONFIG.replacen(
        "address = \"10.0.0.23\"\nmac = \"02:00:00:00:00:13\"\n",
        "address = \"10.0.0.23\"\nmac = \"02:00:00:00:00:13\"\n[[service.backend]]\naddress = \"10.0.0.24\"\nmac = \"02:00:00:00:00:14\"\n",
        1,
    )
}

impl Fixture {
    fn key(&self, service: &str, client: IpAddr) -> AffinityKey {
        AffinityKey {
            service_id: self.service_id(service),
            addr: addr_words(client),
        }
    }

    /// Deletes every LRU entry: what a flood that evicts them all leaves.
    fn evict_all_lru(&mut self) {
        let keys: Vec<AffinityKey> = self
            .maps
            .affinity
            .keys()
            .collect::<Result<_, _>>()
            .expect("affinity keys");
        for k in keys {
            let _ = self.maps.affinity.remove(&k);
        }
    }

    /// Pins this thread to CPU 0, so per-CPU state is one CPU's.
    fn pin_to_cpu0() {
        // SAFETY: cpu_set_t is plain data; the calls get valid pointers.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
                0,
                "sched_setaffinity"
            );
        }
    }
}

#[test]
fn backend_add_protects_exactly_the_clients_it_would_move() {
    let mut fx = Fixture::new();
    let clients: Vec<String> = (0..96)
        .map(|i| format!("10.8.{}.{}", i / 50, i % 50 + 1))
        .collect();
    let mut before = Vec::new();
    for c in &clients {
        before.push(mac_of(&fx.run(&Frame::tcp(c, "10.0.0.10", 80).build()).1));
    }
    let report = fx.reapply_report(&with_fourth_web_backend());
    let divergent: Vec<usize> = (0..clients.len())
        .filter(|i| fx.maglev_mac("web", ip(&clients[*i])) != before[*i])
        .collect();
    assert!(
        divergent.len() >= 5,
        "a fourth backend should take over some clients, got {divergent:?}"
    );
    let p = report.protection.expect("the web table changed");
    assert_eq!(p.kept, divergent.len(), "{p:?}");
    assert_eq!(
        p.per_service.get(&fx.service_id("web")),
        Some(&divergent.len())
    );
    assert_ne!(fx.record("web").flags & lb_common::SERVICE_F_PROTECTED, 0);
    assert_eq!(fx.record("dns").flags & lb_common::SERVICE_F_PROTECTED, 0);
    for (i, c) in clients.iter().enumerate() {
        let key = fx.key("web", ip(c));
        let in_lru = fx.maps.affinity.get(&key, 0).is_ok();
        let protected = fx.maps.protected.get(&key, 0);
        if divergent.contains(&i) {
            assert!(!in_lru, "client {c}: LRU copy of a protected session left");
            let p = protected.expect("divergent client protected");
            assert_eq!(p.backend_id, fx.backend_id_by_mac(before[i], "web"));
        } else {
            assert!(
                in_lru && protected.is_err(),
                "client {c}: ordinary session moved"
            );
        }
    }

    // A flood evicts every LRU entry: nobody moves. The divergent clients
    // are served from the protected map; the others get a new entry with
    // the backend they had (their Maglev answer).
    fx.evict_all_lru();
    let hits = fx.counter(stat::AFFINITY_HIT_PROTECTED);
    for (i, c) in clients.iter().enumerate() {
        let frame = Frame::tcp(c, "10.0.0.10", 80).build();
        let reason = if divergent.contains(&i) {
            stat::AFFINITY_HIT_PROTECTED
        } else {
            stat::NEW_SESSION
        };
        let (verdict, out) = fx.run_counted(&frame, reason);
        assert_eq!(verdict, XDP_TX);
        assert_forwarded(&frame, &out, before[i]);
    }
    assert_eq!(
        fx.counter(stat::AFFINITY_HIT_PROTECTED),
        hits + divergent.len() as u64
    );
    // Protected clients did not get an LRU entry back.
    for i in &divergent {
        assert!(
            fx.maps
                .affinity
                .get(&fx.key("web", ip(&clients[*i])), 0)
                .is_err()
        );
    }

    // Removing the fourth backend again makes them ordinary: released.
    let report = fx.reapply_report(CONFIG);
    let p = report.protection.expect("the web table changed");
    assert_eq!(p.released, divergent.len(), "{p:?}");
    assert_eq!(fx.record("web").flags & lb_common::SERVICE_F_PROTECTED, 0);
    for (i, c) in clients.iter().enumerate() {
        let frame = Frame::tcp(c, "10.0.0.10", 80).build();
        let (_, out) = fx.run_counted(&frame, stat::AFFINITY_HIT);
        assert_eq!(mac_of(&out), before[i], "client {c} moved");
    }
}

#[test]
fn protected_map_is_read_only_when_the_service_says_so() {
    let mut fx = Fixture::new();
    let client = ip("10.9.0.1");
    let maglev = fx.maglev_mac("web", client);
    let other = *BACKEND_MACS
        .iter()
        .find(|m| **m != maglev)
        .expect("another");
    let planted = Affinity {
        backend_id: fx.backend_id_by_mac(other, "web"),
        _pad: 0,
        last_seen_ns: monotonic_ns(),
    };
    let key = fx.key("web", client);
    fx.maps.protected.insert(key, planted, 0).expect("plant");
    // Flag off: the program does not look (no cost for unprotected services).
    let frame = Frame::tcp("10.9.0.1", "10.0.0.10", 80).build();
    let (_, out) = fx.run_counted(&frame, stat::NEW_SESSION);
    assert_forwarded(&frame, &out, maglev);

    // Flag on, another client: the protected entry decides, no LRU entry.
    let client2 = ip("10.9.0.2");
    let maglev2 = fx.maglev_mac("web", client2);
    let other2 = *BACKEND_MACS
        .iter()
        .find(|m| **m != maglev2)
        .expect("another");
    let key2 = fx.key("web", client2);
    let planted2 = Affinity {
        backend_id: fx.backend_id_by_mac(other2, "web"),
        ..planted
    };
    fx.maps.protected.insert(key2, planted2, 0).expect("plant");
    let svc = fx.config.services[0].clone();
    let mut record = fx.record("web");
    record.flags |= lb_common::SERVICE_F_PROTECTED;
    fx.maps
        .services
        .insert(dataplane::service_key(&svc), record, 0)
        .expect("set flag");
    let frame2 = Frame::tcp("10.9.0.2", "10.0.0.10", 80).build();
    let (verdict, out) = fx.run_counted(&frame2, stat::AFFINITY_HIT_PROTECTED);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame2, &out, other2);
    assert!(fx.maps.affinity.get(&key2, 0).is_err(), "no LRU copy made");

    // Its backend goes down: re-selected in place, still out of the LRU.
    fx.set_backend_state(planted2.backend_id, BACKEND_DOWN);
    let (_, out) = fx.run_counted(&frame2, stat::RESELECT_DOWN);
    assert_forwarded(&frame2, &out, maglev2);
    let now = fx.maps.protected.get(&key2, 0).expect("rewritten in place");
    assert_eq!(now.backend_id, fx.backend_id_by_mac(maglev2, "web"));
    assert!(fx.maps.affinity.get(&key2, 0).is_err());
}

#[test]
fn sweep_drops_protected_sessions_of_gone_backends_and_clears_the_flag() {
    let mut fx = Fixture::new();
    let mut before = Vec::new();
    for i in 0..64 {
        before.push(mac_of(
            &fx.run(&Frame::tcp(&format!("10.10.0.{i}"), "10.0.0.10", 80).build())
                .1,
        ));
    }
    fx.reapply_report(&with_fourth_web_backend());
    let sid = fx.service_id("web");
    let protected: Vec<(AffinityKey, Affinity)> = fx
        .maps
        .protected
        .iter()
        .collect::<Result<_, _>>()
        .expect("protected map");
    assert!(!protected.is_empty());
    let records: Vec<(lb_common::ServiceKey, lb_common::Service)> = fx
        .maps
        .services
        .iter()
        .collect::<Result<_, _>>()
        .expect("service map");
    // Nothing stale: the sweep keeps everything.
    let backends = fx.maps.backend_records().expect("backends");
    let sweep = dataplane::sweep(&mut fx.maps, &records, &backends, monotonic_ns()).expect("sweep");
    assert_eq!(sweep.deleted, 0);
    assert_eq!(sweep.per_service.get(&sid), Some(&protected.len()));
    // Every protected backend gone (down): all deleted, flag cleared.
    let mut backends = backends;
    for (_, v) in &protected {
        backends[v.backend_id as usize].state = BACKEND_DOWN;
    }
    let sweep = dataplane::sweep(&mut fx.maps, &records, &backends, monotonic_ns()).expect("sweep");
    assert_eq!(sweep.deleted, protected.len());
    assert_eq!(sweep.cleared, vec![sid]);
    assert_eq!(fx.record("web").flags & lb_common::SERVICE_F_PROTECTED, 0);
    assert_eq!(fx.maps.protected.iter().count(), 0);
}

#[test]
fn admission_budget_caps_new_entries_per_cpu_and_window() {
    Fixture::pin_to_cpu0();
    // 50 per second: 5 per 100 ms window.
    let text = CONFIG.replacen(
        "affinity_timeout = \"1h\"\n",
        "affinity_timeout = \"1h\"\naffinity_admit_rate = 50\n",
        1,
    );
    let mut fx = Fixture::with_config(&text);
    assert_eq!(fx.record("web").admit_per_window, 5);
    let admitted = fx.counter(stat::AFFINITY_ADMITTED);
    let skipped = fx.counter(stat::AFFINITY_ADMISSION_SKIPPED);
    let n = 20u64;
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| Frame::tcp(&format!("10.11.0.{i}"), "10.0.0.10", 80).build())
        .collect();
    let started = std::time::Instant::now();
    let outs: Vec<(u32, Vec<u8>)> = frames.iter().map(|f| fx.run(f)).collect();
    let windows = started.elapsed().as_millis() as u64 / 100 + 1;
    for (i, (f, (verdict, out))) in frames.iter().zip(&outs).enumerate() {
        assert_eq!(*verdict, XDP_TX);
        // Admitted or not, the client gets its Maglev answer.
        assert_forwarded(f, out, fx.maglev_mac("web", ip(&format!("10.11.0.{i}"))));
    }
    let a = fx.counter(stat::AFFINITY_ADMITTED) - admitted;
    let s = fx.counter(stat::AFFINITY_ADMISSION_SKIPPED) - skipped;
    assert_eq!(a + s, n);
    // 5 per window touched (the runs may straddle a boundary; a loaded
    // machine may take longer than one window).
    assert!(
        a >= 5 && a <= 5 * (windows + 1),
        "admitted {a} in {windows} windows"
    );
    assert!(windows > 2 || s > 0, "nothing skipped");
    let entries = (0..n)
        .filter(|i| {
            fx.affinity("web", ip(&format!("10.11.0.{i}")), 32)
                .is_some()
        })
        .count() as u64;
    assert_eq!(
        entries, a,
        "one entry per admitted client, none for the rest"
    );
    // Other services have budgets of their own (default: unthrottled here).
    let dns = Frame::udp("10.11.1.1", "10.0.0.10", 53).build();
    fx.run(&dns);
    assert!(fx.affinity("dns", ip("10.11.1.1"), 32).is_some());
    // A new window admits again.
    std::thread::sleep(std::time::Duration::from_millis(150));
    let last = format!("10.11.0.{}", n - 1);
    let frame = Frame::tcp(&last, "10.0.0.10", 80).build();
    let had = fx.affinity("web", ip(&last), 32).is_some();
    fx.run(&frame);
    assert!(had || fx.affinity("web", ip(&last), 32).is_some());
    assert!(fx.affinity("web", ip(&last), 32).is_some());
}

// ---- layer-3 DSR (IP-in-IP) and resolved next hops -------------------------

/// MAC of the router the fixture's `ipip` backends are behind.
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 0x01];
/// The load balancer's outer source addresses.
const ENCAP_SRC_V4: &str = "10.0.0.2";
const ENCAP_SRC_V6: &str = "fd00::2";

/// Two `ipip` services (IPv4, IPv6) whose backends live in other subnets,
/// and one "dsr" service whose backends have no MAC in the config.
const IPIP: &str = r#"
interface = "fx0"
maglev_table_size = 251
max_services = 8
affinity_max_entries = 4096

[[service]]
name = "far4"
vip = "10.0.0.10"
port = 80
protocol = "tcp"
forward_mode = "ipip"
[[service.backend]]
address = "10.50.1.21"
[[service.backend]]
address = "10.50.2.22"
[[service.backend]]
address = "10.50.3.23"

[[service]]
name = "far6"
vip = "fd00::10"
port = 53
protocol = "udp"
forward_mode = "ipip"
[[service.backend]]
address = "fd50:1::21"
[[service.backend]]
address = "fd50:2::22"

[[service]]
name = "near"
vip = "10.0.0.10"
port = 443
protocol = "tcp"
[[service.backend]]
address = "10.0.0.31"
[[service.backend]]
address = "10.0.0.32"
"#;

/// Next hops as the resolver finds them: `ipip` backends behind the router
/// with MTU `mtu`, "near" backends on-link with MACs of their own.
fn ipip_hops(mtu: u32) -> dataplane::Hops {
    let mut hops = dataplane::Hops::new();
    for (addr, src) in [
        ("10.50.1.21", ENCAP_SRC_V4),
        ("10.50.2.22", ENCAP_SRC_V4),
        ("10.50.3.23", ENCAP_SRC_V4),
        ("fd50:1::21", ENCAP_SRC_V6),
        ("fd50:2::22", ENCAP_SRC_V6),
    ] {
        hops.insert(
            ip(addr),
            dataplane::Hop {
                mac: ROUTER_MAC,
                ifindex: 0,
                smac: LB_MAC,
                mtu,
                src: Some(ip(src)),
            },
        );
    }
    for (addr, last) in [("10.0.0.31", 0x31), ("10.0.0.32", 0x32)] {
        hops.insert(
            ip(addr),
            dataplane::Hop {
                mac: [0x02, 0, 0, 0, 0x77, last],
                ifindex: 0,
                smac: LB_MAC,
                mtu: 1500,
                src: None,
            },
        );
    }
    hops
}

impl Fixture {
    /// The address of the backend userspace's Maglev build predicts for `client`.
    fn maglev_addr(&self, service: &str, client: IpAddr) -> IpAddr {
        self.maglev_backend(service, client).address
    }
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Checks `out` is `input`'s IP packet inside an outer IPv4 header from
/// `src` to `dst`, sent to `next_hop`, with the tag `vlan` kept.
fn assert_ipip_v4(
    input: &[u8],
    out: &[u8],
    next_hop: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    vlan: Option<u16>,
) {
    let l2 = if vlan.is_some() { 18 } else { 14 };
    assert_eq!(
        out.len(),
        input.len() + 20,
        "20 bytes of outer header added"
    );
    assert_eq!(out[..6], next_hop, "to the next hop");
    assert_eq!(out[6..12], LB_MAC, "from the load balancer");
    if let Some(tci) = vlan {
        assert_eq!(
            out[12..16],
            [0x81, 0x00, (tci >> 8) as u8, tci as u8],
            "tag kept"
        );
    }
    assert_eq!(out[l2 - 2..l2], [0x08, 0x00]);
    let h = &out[l2..l2 + 20];
    let inner = &input[l2..];
    assert_eq!(h[0], 0x45, "version 4, no options");
    assert_eq!(h[1], inner[1], "DSCP and ECN copied from the inner packet");
    assert_eq!(
        u16::from_be_bytes([h[2], h[3]]) as usize,
        inner.len() + 20,
        "outer total length"
    );
    assert_eq!(h[4..8], [0, 0, 0x40, 0], "id 0, DF, no fragment");
    assert_eq!((h[8], h[9]), (64, 4), "TTL 64, protocol IPIP");
    assert_eq!(ipv4_checksum(h), 0, "valid header checksum");
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 expected");
    };
    assert_eq!(h[12..16], s.octets(), "outer source");
    assert_eq!(h[16..20], d.octets(), "outer destination: the backend");
    assert_eq!(&out[l2 + 20..], inner, "inner packet untouched");
}

#[test]
fn ipip_v4_encapsulates_to_the_backend_with_exact_bytes() {
    let mut fx = Fixture::with_hops(IPIP, &ipip_hops(1500));
    assert_eq!(fx.record("far4").forward_mode, lb_common::FORWARD_IPIP);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..48 {
        let client = format!("10.20.0.{i}");
        let mut f = Frame::tcp(&client, "10.0.0.10", 80);
        f.sport = 40000 + i;
        let mut frame = f.build();
        frame[15] = 0xb9; // DSCP 46 (EF) + ECN 01
        let want = fx.maglev_addr("far4", ip(&client));
        seen.insert(want);
        let (verdict, out) = fx.run_counted(&frame, stat::NEW_SESSION);
        assert_eq!(verdict, XDP_TX);
        assert_ipip_v4(&frame, &out, ROUTER_MAC, ip(ENCAP_SRC_V4), want, None);
        // Sticky: the next packet takes the same tunnel.
        let (_, again) = fx.run_counted(&frame, stat::AFFINITY_HIT);
        assert_eq!(again, out);
    }
    assert_eq!(seen.len(), 3, "every backend used");

    // 802.1Q-tagged input keeps its tag in front of the outer header.
    let mut f = Frame::tcp("10.20.1.1", "10.0.0.10", 80);
    f.vlan = Some(0x0123);
    let frame = f.build();
    let (verdict, out) = fx.run(&frame);
    assert_eq!(verdict, XDP_TX);
    assert_ipip_v4(
        &frame,
        &out,
        ROUTER_MAC,
        ip(ENCAP_SRC_V4),
        fx.maglev_addr("far4", ip("10.20.1.1")),
        Some(0x0123),
    );
}

#[test]
fn ipip_v6_encapsulates_to_the_backend_with_exact_bytes() {
    let mut fx = Fixture::with_hops(IPIP, &ipip_hops(1500));
    for i in 0..16 {
        let client = format!("fd00:20::{i:x}");
        let mut frame = Frame::udp(&client, "fd00::10", 53).build();
        // Traffic class 0xb9: version/TC/flow label bytes 0x6b 0x90.
        frame[14] = 0x6b;
        frame[15] = 0x90;
        let want = fx.maglev_addr("far6", ip(&client));
        let (verdict, out) = fx.run_counted(&frame, stat::NEW_SESSION);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out.len(), frame.len() + 40);
        assert_eq!(out[..6], ROUTER_MAC);
        assert_eq!(out[6..12], LB_MAC);
        assert_eq!(out[12..14], [0x86, 0xdd]);
        let h = &out[14..54];
        assert_eq!(
            h[..4],
            [0x6b, 0x90, 0, 0],
            "version 6, TC copied, flow label 0"
        );
        assert_eq!(
            u16::from_be_bytes([h[4], h[5]]) as usize,
            frame.len() - 14,
            "payload: the whole inner packet"
        );
        assert_eq!((h[6], h[7]), (41, 64), "next header IPv6, hop limit 64");
        let (IpAddr::V6(s), IpAddr::V6(d)) = (ip(ENCAP_SRC_V6), want) else {
            panic!("IPv6 expected");
        };
        assert_eq!(h[8..24], s.octets());
        assert_eq!(h[24..40], d.octets(), "outer destination: the backend");
        assert_eq!(out[54..], frame[14..], "inner packet untouched");
    }
}

#[test]
fn unresolved_next_hop_and_oversized_packets_are_dropped_and_counted() {
    // Nothing resolved: every backend's MAC reads zero.
    let mut fx = Fixture::with_config(IPIP);
    for (frame, name) in [
        (Frame::tcp("10.21.0.1", "10.0.0.10", 80).build(), "ipip"),
        (
            Frame::tcp("10.21.0.1", "10.0.0.10", 443).build(),
            "dsr without mac",
        ),
    ] {
        let (verdict, _) = fx.run_counted(&frame, stat::DROP_NEXTHOP_UNRESOLVED);
        assert_eq!(verdict, XDP_DROP, "{name}");
    }
    // Resolved once the resolver knows them.
    let hops = ipip_hops(100);
    let report = dataplane::apply_with(&mut fx.maps, &fx.config, &hops).expect("apply");
    assert!(
        report.backends_written >= 7 && report.egress_written == 5,
        "{report:?}"
    );
    let small = Frame::tcp("10.21.0.1", "10.0.0.10", 80).build();
    assert_eq!(fx.run(&small).0, XDP_TX, "60 bytes + 20 fit an MTU of 100");
    let mut f = Frame::tcp("10.21.0.2", "10.0.0.10", 80);
    f.payload = vec![0; 61];
    let big = f.build();
    assert_eq!(big.len() - 14 + 20, 121);
    let (verdict, out) = fx.run_counted(&big, stat::DROP_ENCAP_TOO_BIG);
    assert_eq!((verdict, out.len()), (XDP_DROP, big.len()));
    // "dsr" backends without a MAC in the config go to their resolved MAC.
    let client = ip("10.21.0.3");
    let frame = Frame::tcp("10.21.0.3", "10.0.0.10", 443).build();
    let want = fx.maglev_addr("near", client);
    let (verdict, out) = fx.run_counted(&frame, stat::NEW_SESSION);
    assert_eq!(verdict, XDP_TX);
    assert_forwarded(&frame, &out, hops[&want].mac);
}

#[test]
fn ipip_to_another_interface_redirects() {
    let mut hops = ipip_hops(1500);
    // Interface 1 (lo) as the egress of one backend: XDP_REDIRECT through the devmap.
    let far = ip("10.50.2.22");
    if let Some(h) = hops.get_mut(&far) {
        h.ifindex = 1;
        h.smac = [0x02, 0, 0, 0, 0x10, 0x01];
    }
    let mut fx = Fixture::with_hops(IPIP, &hops);
    assert_eq!(
        fx.maps.devmap.get(1, 0).expect("lo in the devmap").if_index,
        1
    );
    let client = (0..200)
        .map(|i| format!("10.22.0.{i}"))
        .find(|c| fx.maglev_addr("far4", ip(c)) == far)
        .expect("a client of the redirected backend");
    let frame = Frame::tcp(&client, "10.0.0.10", 80).build();
    let (verdict, out) = fx.run(&frame);
    assert_eq!(verdict, 4, "XDP_REDIRECT");
    assert_eq!(
        out[6..12],
        [0x02, 0, 0, 0, 0x10, 0x01],
        "egress interface's MAC"
    );
}

/// The kernel counts traffic per id: a backend given an id that no one
/// held in this apply starts at zero even if the slot's counters hold the
/// counts of an earlier backend, and the counters of ids not handed out are
/// left alone (so the check below can fail).
#[test]
fn counters_of_an_id_handed_out_again_start_at_zero() {
    let mut fx = Fixture::new();
    let text = fx.text.clone();
    let before = fx.reapply_report(&text);
    let used: std::collections::BTreeSet<u32> = before.backend_ids.values().copied().collect();
    let cpus = aya::util::nr_cpus().expect("counting CPUs");
    let stale = lb_common::TrafficStats {
        packets: 7,
        bytes: 700,
        new_sessions: 1,
    };
    let free: Vec<u32> = (lb_common::FIRST_BACKEND_ID..lb_common::FIRST_BACKEND_ID + 32)
        .filter(|id| !used.contains(id))
        .collect();
    for id in &free {
        let values = aya::maps::PerCpuValues::try_from(vec![stale; cpus]).expect("per-CPU values");
        fx.maps
            .backend_stats
            .set(*id, values, 0)
            .expect("planting an earlier backend's counts");
    }
    let web_last = "address = \"10.0.0.23\"\nmac = \"02:00:00:00:00:13\"\n";
    assert!(text.contains(web_last));
    let grown = text.replacen(
        web_last,
        &format!(
            "{web_last}[[service.backend]]\naddress = \"10.0.0.24\"\nmac = \"02:00:00:00:00:14\"\n"
        ),
        1,
    );
    let after = fx.reapply_report(&grown);
    let new_id = after.backend_ids[&("web".to_string(), "10.0.0.24".to_string())];
    assert!(free.contains(&new_id), "the new backend took a free id");
    let packets = |fx: &Fixture, id: u32| -> u64 {
        fx.maps
            .backend_stats
            .get(&id, 0)
            .expect("reading backend counters")
            .iter()
            .map(|t| t.packets)
            .sum()
    };
    assert_eq!(
        packets(&fx, new_id),
        0,
        "the new backend starts with no traffic"
    );
    let untouched = free
        .iter()
        .copied()
        .find(|id| *id != new_id)
        .expect("another free id");
    assert_eq!(
        packets(&fx, untouched),
        7 * cpus as u64,
        "ids not handed out keep their counts"
    );
}
