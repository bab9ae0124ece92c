//! Parts 1 and 2: per-packet cost of the XDP program through
//! BPF_PROG_TEST_RUN, against an empty XDP_PASS program, and how the hit
//! and miss paths scale with the affinity map's size.
//!
//! Two measurement pitfalls shape this file:
//! - With `repeat`, the kernel reuses one buffer, so a program that rewrites
//!   the frame sees its own output next time. The bench backends therefore
//!   share the LB's MAC: the rewrite is idempotent and every repetition takes
//!   the same forwarding path.
//! - A miss becomes a hit after one run, so the miss path cannot use
//!   `repeat`. It runs each of many distinct clients once (`repeat = 1`),
//!   and is compared with the floor and the hit path measured the same way.
//! - The `ipip` path moves the frame's head to make room for the outer
//!   header, and the reused buffer keeps the moved head: a second repetition
//!   would parse the encapsulated frame. It is measured only at `repeat = 1`.

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{Affinity, AffinityKey, PINNED_MAPS};
use xlb::{
    config::Config,
    dataplane::{self, Dataplane, LoadOptions, PASS_OBJ, addr_words},
    pins::{self, PinnedMaps},
    sessions::monotonic_ns,
};

use super::{Budget, ScalePoint, Series, Table, progress};
use crate::frames::{Frame, LB_MAC};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// An unattached xlb dataplane in a private pin directory, removed on drop.
pub struct BenchDataplane {
    /// The loaded program.
    pub dp: Dataplane,
    /// Its pinned maps.
    pub maps: PinnedMaps,
    dir: PathBuf,
}

impl Drop for BenchDataplane {
    fn drop(&mut self) {
        if let Err(e) = pins::remove_all(&self.dir) {
            eprintln!("bench: cleanup of {} failed: {e:#}", self.dir.display());
        }
    }
}

/// VIP of the bench's IPv4 `ipip` service (TCP/80, backends in 10.50.0.0/24).
pub const IPIP_VIP4: &str = "10.0.0.11";
/// VIP of the bench's IPv6 `ipip` service (TCP/80, backends in fd50::/64).
pub const IPIP_VIP6: &str = "fd00::11";
/// Outer source of the bench's IPv4 `ipip` packets.
const IPIP_SRC4: &str = "10.0.0.1";
/// Outer source of the bench's IPv6 `ipip` packets.
const IPIP_SRC6: &str = "fd00::1";
/// Backend addresses of the `ipip` services, per family.
const IPIP_BACKENDS: [(&str, &str); 2] = [("10.50.0.", IPIP_SRC4), ("fd50::", IPIP_SRC6)];

/// Config of the bench dataplane: TCP/80 on an IPv4 and an IPv6 VIP, three
/// backends each, all with `backend_mac` ("dsr", layer 2); with `ipip`, also
/// TCP/80 on [`IPIP_VIP4`] and [`IPIP_VIP6`] in `ipip` mode (layer 3), three
/// backends each in another subnet, reached through [`bench_hops`].
fn bench_config(affinity_entries: u32, backend_mac: [u8; 6], ipip: bool) -> String {
    let mac = backend_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    // Only as many service slots as services: the slots size the Maglev map,
    // whose memory part 2 reports.
    let max_services = if ipip { 4 } else { 2 };
    let mut text = format!(
        "interface = \"bench0\"\nmax_services = {max_services}\n\
         affinity_max_entries = {affinity_entries}\n"
    );
    for (vip, prefix) in [("10.0.0.10", "10.0.0.2"), ("fd00::10", "fd00::2")] {
        text.push_str(&format!(
            "\n[[service]]\nname = \"s{vip}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n"
        ));
        for i in 1..=3 {
            text.push_str(&format!(
                "[[service.backend]]\naddress = \"{prefix}{i}\"\nmac = \"{mac}\"\n"
            ));
        }
    }
    let ipip_services = [
        ("far4", IPIP_VIP4, IPIP_BACKENDS[0]),
        ("far6", IPIP_VIP6, IPIP_BACKENDS[1]),
    ];
    for (name, vip, (prefix, _)) in ipip_services.into_iter().filter(|_| ipip) {
        text.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n\
             forward_mode = \"ipip\"\n"
        ));
        for i in 1..=3 {
            text.push_str(&format!("[[service.backend]]\naddress = \"{prefix}{i}\"\n"));
        }
    }
    text.replace("s10.0.0.10", "web4")
        .replace("sfd00::10", "web6")
}

/// Next hops of the `ipip` backends, as the resolver would find them: all
/// behind `next_hop` on the interface the program runs on, MTU 1500.
fn bench_hops(next_hop: [u8; 6]) -> Result<dataplane::Hops> {
    let mut hops = dataplane::Hops::new();
    for (prefix, src) in IPIP_BACKENDS {
        let src: IpAddr = src.parse().context("bench outer source")?;
        for i in 1..=3 {
            let addr: IpAddr = format!("{prefix}{i}")
                .parse()
                .context("bench backend address")?;
            hops.insert(
                addr,
                dataplane::Hop {
                    mac: next_hop,
                    ifindex: 0,
                    smac: LB_MAC,
                    mtu: 1500,
                    src: Some(src),
                },
            );
        }
    }
    Ok(hops)
}

/// Loads the xlb program with `affinity_entries` capacity, configured for
/// the bench with the two layer-2 services only, every backend on the LB's
/// own MAC (see the module comment).
pub fn load_xlb(affinity_entries: u32) -> Result<BenchDataplane> {
    load(affinity_entries, LB_MAC, false)
}

/// Like [`load_xlb`], with the backends' MAC chosen by the caller, and the
/// two `ipip` services too, whose next hop is also `backend_mac`.
pub fn load_xlb_with(affinity_entries: u32, backend_mac: [u8; 6]) -> Result<BenchDataplane> {
    load(affinity_entries, backend_mac, true)
}

fn load(affinity_entries: u32, backend_mac: [u8; 6], ipip: bool) -> Result<BenchDataplane> {
    let config = Config::parse(&bench_config(affinity_entries, backend_mac, ipip))
        .context("bench config")?;
    let hops = bench_hops(backend_mac)?;
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/xlb-bench-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut opts = LoadOptions::from_config(&config, LB_MAC, false);
    opts.pin_dir = dir.clone();
    let dp = Dataplane::load(opts)?;
    let cleanup = |e: anyhow::Error| {
        let _ = pins::remove_all(&dir);
        e
    };
    let mut maps = PinnedMaps::open(&dir).map_err(cleanup)?;
    dataplane::apply_with(&mut maps, &config, &hops).map_err(cleanup)?;
    Ok(BenchDataplane { dp, maps, dir })
}

/// Loads the empty XDP_PASS program (the floor).
pub fn load_pass() -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .load(PASS_OBJ)
        .context("loading xlb-pass")?;
    let prog: &mut Xdp = ebpf
        .program_mut("xlb_pass")
        .context("xlb_pass missing")?
        .try_into()
        .context("xlb_pass is not XDP")?;
    prog.load().context("loading xlb_pass into the kernel")?;
    Ok(ebpf)
}

/// The pass program of a loaded `xlb-pass` object.
pub fn pass_prog(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut("xlb_pass")
        .context("xlb_pass missing")?
        .try_into()
        .context("xlb_pass is not XDP")
}

/// Runs `frame` `repeat` times; returns the kernel's ns per run, checking the verdict.
pub fn ns_per_run(prog: &mut Xdp, frame: &[u8], repeat: u32, verdict: u32) -> Result<f64> {
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    if r.return_value != verdict {
        bail!(
            "expected verdict {verdict}, got {} (the bench would measure the wrong path)",
            r.return_value
        );
    }
    Ok(r.duration.as_nanos() as f64)
}

/// Runs `frame` once and checks the program encapsulated it as the bench
/// `ipip` services must: XDP_TX, the outer header of the frame's family
/// (20 or 40 bytes more) addressed to one of the `ipip` backends, and the
/// inner packet untouched. Keeps the bench from silently measuring another path.
fn check_encap(prog: &mut Xdp, frame: &[u8]) -> Result<()> {
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    if r.return_value != XDP_TX {
        bail!("ipip frame: expected XDP_TX, got {}", r.return_value);
    }
    out.truncate(r.data_size_out as usize);
    let v6 = frame.get(12..14) == Some(&[0x86, 0xdd][..]);
    // (outer header length, EtherType, offset of the protocol field, its value,
    // offset and length of the outer destination, the backends' prefix).
    let (grow, ethertype, proto_at, proto, dst_at, dst_len, prefix) = if v6 {
        (
            40,
            [0x86, 0xdd],
            14 + 6,
            41,
            14 + 24,
            16,
            IPIP_BACKENDS[1].0,
        )
    } else {
        (20, [0x08, 0x00], 14 + 9, 4, 14 + 16, 4, IPIP_BACKENDS[0].0)
    };
    if out.len() != frame.len() + grow {
        bail!(
            "ipip frame: {} bytes out of {}, expected {grow} more (not encapsulated?)",
            out.len(),
            frame.len()
        );
    }
    let dst = match dst_len {
        4 => <[u8; 4]>::try_from(&out[dst_at..dst_at + 4]).map(|a| IpAddr::from(a).to_string()),
        _ => <[u8; 16]>::try_from(&out[dst_at..dst_at + 16]).map(|a| IpAddr::from(a).to_string()),
    }
    .context("outer destination")?;
    if out[12..14] != ethertype
        || out[proto_at] != proto
        || !dst.starts_with(prefix)
        || out[14 + grow..] != frame[14..]
    {
        bail!("ipip frame: the output is not the frame encapsulated to an ipip backend");
    }
    Ok(())
}

/// Mean ns of running each frame once.
fn ns_each_once(prog: &mut Xdp, frames: &[Vec<u8>], verdict: u32) -> Result<f64> {
    let mut total = 0.0;
    for f in frames {
        total += ns_per_run(prog, f, 1, verdict)?;
    }
    Ok(total / frames.len().max(1) as f64)
}

/// A client address that no earlier call returned: 10.128.0.0/9 for IPv4.
fn fresh_client(n: u32) -> String {
    let n = n & 0x007f_ffff;
    format!("10.{}.{}.{}", 128 + (n >> 16), (n >> 8) & 0xff, n & 0xff)
}

/// Part 1: ns/packet of each path, interleaved, against the XDP_PASS floor.
pub fn part1(budget: Budget) -> Result<Vec<Table>> {
    let mut pass = load_pass()?;
    let mut xlb = load_xlb_with(lb_common::DEFAULT_AFFINITY_ENTRIES, LB_MAC)?;
    let hit4 = Frame::tcp("10.1.0.1", "10.0.0.10", 80).build();
    let hit6 = Frame::tcp("fd00:1::1", "fd00::10", 80).build();
    let not_ours = Frame::tcp("10.1.0.1", "10.0.0.99", 80).build();
    let mut next_client = 0u32;

    let names = [
        "XDP_PASS program (floor)",
        "xlb affinity hit, IPv4",
        "xlb affinity hit, IPv6",
        "xlb not-ours pass",
    ];
    let mut steady: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let once_names = [
        "XDP_PASS program (floor), repeat=1",
        "xlb affinity hit, IPv4, repeat=1",
        "xlb miss (Maglev + insert), IPv4, repeat=1",
        "xlb affinity hit, IPv6, repeat=1",
        "xlb ipip hit, IPv4, repeat=1",
        "xlb ipip hit, IPv6, repeat=1",
    ];
    // Each ipip row against the layer-2 hit row of its family.
    let ipip_vs_l2 = [(4, 1), (5, 3)];
    let mut once: Vec<Vec<f64>> = vec![Vec::new(); once_names.len()];

    // Create the hit entries before measuring.
    let prog = xlb.dp.program_mut()?;
    ns_per_run(prog, &hit4, 1, XDP_TX)?;
    ns_per_run(prog, &hit6, 1, XDP_TX)?;
    let ipip4 = Frame::tcp("10.1.0.1", IPIP_VIP4, 80).build();
    let ipip6 = Frame::tcp("fd00:1::1", IPIP_VIP6, 80).build();
    for frame in [&ipip4, &ipip6] {
        ns_per_run(prog, frame, 1, XDP_TX)?;
        check_encap(prog, frame)?;
    }
    let hit4_copies = vec![hit4.clone(); budget.miss_frames];
    let hit6_copies = vec![hit6.clone(); budget.miss_frames];
    let ipip4_copies = vec![ipip4; budget.miss_frames];
    let ipip6_copies = vec![ipip6; budget.miss_frames];
    let pass_copies = vec![not_ours.clone(); budget.miss_frames];

    for round in 0..budget.rounds {
        progress(&format!(
            "per-packet cost, round {}/{}",
            round + 1,
            budget.rounds
        ));
        steady[0].push(ns_per_run(
            pass_prog(&mut pass)?,
            &hit4,
            budget.repeat,
            XDP_PASS,
        )?);
        let prog = xlb.dp.program_mut()?;
        steady[1].push(ns_per_run(prog, &hit4, budget.repeat, XDP_TX)?);
        steady[2].push(ns_per_run(prog, &hit6, budget.repeat, XDP_TX)?);
        steady[3].push(ns_per_run(prog, &not_ours, budget.repeat, XDP_PASS)?);

        let misses: Vec<Vec<u8>> = (0..budget.miss_frames)
            .map(|_| {
                next_client += 1;
                Frame::tcp(&fresh_client(next_client), "10.0.0.10", 80).build()
            })
            .collect();
        once[0].push(ns_each_once(pass_prog(&mut pass)?, &pass_copies, XDP_PASS)?);
        let prog = xlb.dp.program_mut()?;
        once[1].push(ns_each_once(prog, &hit4_copies, XDP_TX)?);
        once[2].push(ns_each_once(prog, &misses, XDP_TX)?);
        once[3].push(ns_each_once(prog, &hit6_copies, XDP_TX)?);
        once[4].push(ns_each_once(prog, &ipip4_copies, XDP_TX)?);
        once[5].push(ns_each_once(prog, &ipip6_copies, XDP_TX)?);
    }
    let miss_count = lb_common::stat::NEW_SESSION;
    let snap = xlb::stats::snapshot(&xlb.maps)?;
    if snap.reason(miss_count) < (budget.rounds * budget.miss_frames) as u64 {
        bail!("the miss frames did not all create sessions: the miss path was not measured");
    }

    let steady_rows = names
        .iter()
        .zip(steady)
        .map(|(n, s)| Series::new(*n, "ns/packet", s))
        .collect();
    let once_rows: Vec<Series> = once_names
        .iter()
        .zip(once)
        .map(|(n, s)| Series::new(*n, "ns/packet", s))
        .collect();
    let once_extra = ipip_vs_l2
        .iter()
        .filter(|&&(_, l2)| once_rows[l2].median > 0.0)
        .map(|&(ipip, l2)| {
            (
                once_rows[ipip].name.clone(),
                "× L2 hit, same family".to_string(),
                format!("{:.2}", once_rows[ipip].median / once_rows[l2].median),
            )
        })
        .collect();
    Ok(vec![
        Table {
            title: format!(
                "Per-packet cost, BPF_PROG_TEST_RUN repeat={}",
                budget.repeat
            ),
            about: "Kernel-measured ns per run of one 64-byte TCP SYN frame, the same frame \
                    repeated, medians over interleaved rounds. The floor is an XDP program that \
                    only returns XDP_PASS; the hit paths do the full parse, service lookup, \
                    affinity lookup and MAC rewrite and return XDP_TX. Katran's own BPF tester \
                    reports about 101 ns/packet for TCP over IPv4 as an anchor."
                .into(),
            baseline: names[0].into(),
            rows: steady_rows,
            extra: Vec::new(),
        },
        Table {
            title: "Miss path against hit and floor, each frame run once".into(),
            about: format!(
                "A miss turns into a hit after one run, so it cannot use `repeat`: {} distinct \
                 new clients per round each run once (repeat=1), which also counts one timer read \
                 per run; the floor and the hit path are measured the same way for comparison. \
                 The miss path hashes the client, reads the Maglev table and inserts the affinity \
                 entry. The ipip rows are affinity hits of `forward_mode = \"ipip\"` services \
                 (layer-3 DSR): the frame is encapsulated in an outer IPv4 (20 bytes) or IPv6 \
                 (40 bytes) header to the backend's address and sent to its next hop; moving the \
                 frame's head leaves the reused buffer changed, so this path is only measured \
                 here, at repeat=1 (`× L2 hit, same family`: against the layer-2 hit of the \
                 same IP family, measured the same way).",
                budget.miss_frames
            ),
            baseline: once_names[0].into(),
            rows: once_rows,
            extra: once_extra,
        },
    ])
}

/// Kernel memory charged to a pinned map (`memlock` in its fdinfo).
fn map_memlock(path: &Path) -> Result<u64> {
    let map = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .context("reading fdinfo of a map")?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no memlock line in the map's fdinfo")
}

/// Fills the affinity map with `n` entries for clients 172.16.0.0/12 upwards.
/// The `i`th pre-filled client: 172.16.0.0 + i.
fn prefilled_client(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0xac10_0000u32.wrapping_add(i))
}

fn prefill(xlb: &mut BenchDataplane, n: u32) -> Result<()> {
    let keys: Vec<AffinityKey> = (0..n)
        .map(|i| AffinityKey {
            service_id: 0,
            addr: addr_words(IpAddr::V4(prefilled_client(i))),
        })
        .collect();
    let value = Affinity {
        backend_id: 0,
        _pad: 0,
        last_seen_ns: monotonic_ns(),
    };
    let values = vec![value; keys.len()];
    crate::plant::sessions(&xlb.maps.affinity, &keys, &values, |done| {
        progress(&format!("  pre-filled {done}/{n} entries"));
    })
    .context("pre-filling the affinity map")
}

/// Part 2: hit and miss cost, and map memory, as the affinity map grows.
pub fn part2(budget: Budget) -> Result<Vec<ScalePoint>> {
    let mut points = Vec::new();
    let mut next_client = 0x40_0000u32;
    for &size in budget.scale_sizes {
        progress(&format!("scale: affinity map with {size} entries"));
        // Room for the miss frames, so they do not evict the pre-filled entries.
        let capacity = size + (budget.rounds * budget.miss_frames) as u32 + 16;
        let mut xlb = load_xlb(capacity)?;
        prefill(&mut xlb, size)?;
        // The measured client is one of the pre-filled ones (172.16.0.1).
        let hit = Frame::tcp("172.16.0.1", "10.0.0.10", 80).build();
        let mut hits = Vec::new();
        let mut misses = Vec::new();
        let (mut one_key, mut distinct) = (Vec::new(), Vec::new());
        for round in 0..budget.rounds {
            let prog = xlb.dp.program_mut()?;
            hits.push(ns_per_run(prog, &hit, budget.repeat, XDP_TX)?);
            // Hits of distinct pre-filled clients in random order, each run
            // once: the working set is the whole map, so lookups meet cache
            // misses. Against the one client run once the same number of times.
            let sample = crate::plant::sample(budget.miss_frames, size, 0x5eed + round as u64);
            let spread: Vec<Vec<u8>> = sample
                .iter()
                .map(|&i| Frame::tcp(&prefilled_client(i).to_string(), "10.0.0.10", 80).build())
                .collect();
            let same = vec![hit.clone(); spread.len()];
            one_key.push(ns_each_once(prog, &same, XDP_TX)?);
            distinct.push(ns_each_once(prog, &spread, XDP_TX)?);
            let frames: Vec<Vec<u8>> = (0..budget.miss_frames)
                .map(|_| {
                    next_client += 1;
                    Frame::tcp(&fresh_client(next_client), "10.0.0.10", 80).build()
                })
                .collect();
            misses.push(ns_each_once(prog, &frames, XDP_TX)?);
        }
        let dir = xlb.maps.dir.clone();
        let affinity_bytes = map_memlock(&dir.join(lb_common::MAP_AFFINITY))?;
        let mut maps_bytes = 0;
        for name in PINNED_MAPS {
            maps_bytes += map_memlock(&dir.join(name))?;
        }
        points.push(ScalePoint {
            entries: size,
            capacity,
            hit_ns: Series::new("hit", "ns", hits).median,
            hit_once_ns: Series::new("hit once", "ns", one_key).median,
            hit_distinct_ns: Series::new("hit distinct", "ns", distinct).median,
            miss_ns: Series::new("miss", "ns", misses).median,
            affinity_bytes,
            maps_bytes,
        });
    }
    Ok(points)
}
