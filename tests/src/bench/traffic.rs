//! Part 3: packet rate with a traffic generator that is part of the
//! project. Two namespaces joined by one veth: `gen0` (generator side) and
//! `lb0` (the contender). The generator (see `generator`: live frames where
//! the kernel allows them, else AF_PACKET) sends a 60-byte TCP
//! SYN (64 on the wire) from a new client address each frame out of `gen0`;
//! the contender on `lb0` sends it back; `xlb_sink` on `gen0` counts what
//! arrived and drops it. Rates count arrivals, not sends. xlb's `ipip` contender gets frames
//! for its layer-3 service, whose next hop is `gen0`: they come back
//! encapsulated (20 bytes longer) and are counted the same way.

use std::{sync::atomic::Ordering, time::Duration};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    programs::{Xdp, XdpMode},
};
use lb_common::stat;
use xlb::{
    dataplane::PASS_OBJ,
    objects::{SINK_OBJ, TX_OBJ},
};

use super::{Budget, Series, Table, generator::TrafficGen, machine, progress};
use crate::{
    bench::prog_cost::{BenchDataplane, IPIP_VIP4, load_xlb_with},
    frames::{Frame, LB_MAC},
    netns::NetNs,
};

/// MAC of `gen0`; xlb's backends use it so forwarded frames come back.
pub(super) const GEN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
/// Distinct client addresses the generator cycles through.
pub(super) const CLIENTS: u32 = 4096;
/// Frames per live-frames batch.
pub(super) const BATCH: u32 = 64;
/// How long the queues get to drain after a burst before arrivals are read.
pub(super) const DRAIN: Duration = Duration::from_millis(100);

fn mac_str(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub(super) fn load_prog(obj: &[u8], name: &str) -> Result<Ebpf> {
    load_with(EbpfLoader::new(), obj, name)
}

pub(super) fn load_with(mut loader: EbpfLoader<'_>, obj: &[u8], name: &str) -> Result<Ebpf> {
    let mut ebpf = loader
        .load(obj)
        .with_context(|| format!("loading {name}"))?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("{name} missing"))?
        .try_into()
        .with_context(|| format!("{name} is not XDP"))?;
    prog.load()
        .with_context(|| format!("loading {name} into the kernel"))?;
    Ok(ebpf)
}

pub(super) fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| format!("{name} missing"))?
        .try_into()
        .with_context(|| format!("{name} is not XDP"))
}

/// The two namespaces and the veth between them; removed on drop.
pub(super) struct RateLab {
    /// Generator side, holds `gen0`.
    pub(super) gen_ns: NetNs,
    /// Contender side, holds `lb0`.
    pub(super) lb_ns: NetNs,
}

impl RateLab {
    /// A veth pair with `queues` RX and TX queues on each end (one per
    /// generating CPU: veth hands a frame to the peer queue of the sending CPU).
    pub(super) fn new(queues: usize) -> Result<Self> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = format!(
            "xlbrate-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let gen_ns = NetNs::create(&format!("{id}-gen"))?;
        let lb_ns = NetNs::create(&format!("{id}-lb"))?;
        let queues = queues.max(1).to_string();
        gen_ns.ip(&[
            "link",
            "add",
            "gen0",
            "address",
            &mac_str(&GEN_MAC),
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
            "type",
            "veth",
            "peer",
            "name",
            "lb0",
            "address",
            &mac_str(&LB_MAC),
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
            "netns",
            lb_ns.name(),
        ])?;
        gen_ns.ip(&["link", "set", "gen0", "up"])?;
        lb_ns.ip(&["link", "set", "lb0", "up"])?;
        // Without an XDP program of its own, a veth accepts XDP frames from its
        // peer only with GRO on (the generic-mode contender has none).
        lb_ns
            .exec_ok(&["ethtool", "-K", "lb0", "gro", "on"])
            .context("ethtool -K lb0 gro on")?;
        Ok(Self { gen_ns, lb_ns })
    }
}

/// Attaches `prog` to `ifname` inside `ns`.
pub(super) fn attach(ns: &NetNs, prog: &mut Xdp, ifname: &str, mode: XdpMode) -> Result<()> {
    ns.run(|| {
        prog.attach(ifname, mode)
            .with_context(|| format!("attaching XDP ({mode:?}) to {ifname} in {}", ns.name()))?;
        Ok(())
    })
}

pub(super) fn sink_count(sink: &Ebpf) -> Result<u64> {
    let map: PerCpuArray<_, u64> = sink
        .map("XLB_SINK_COUNT")
        .context("sink counter missing")?
        .try_into()
        .context("sink counter type")?;
    Ok(map
        .get(&0, 0)
        .context("reading the sink counter")?
        .iter()
        .sum())
}

/// One burst of `frames` frames from each CPU in `cpus`; returns (arrived
/// at `sink`, seconds).
pub(super) fn blast(
    lab: &RateLab,
    generator: &mut TrafficGen,
    sink: &Ebpf,
    frame: &[u8],
    cpus: &[usize],
    frames: u32,
) -> Result<(u64, f64)> {
    let before = sink_count(sink)?;
    let secs = generator.burst(lab, frame, cpus, frames)?;
    // Let the last batches drain through the veth queues before counting.
    std::thread::sleep(DRAIN);
    Ok((sink_count(sink)? - before, secs))
}

/// The generator's 60-byte TCP SYN (64 on the wire) to `vip`, port 80.
pub(super) fn gen_frame(vip: &str) -> Result<Vec<u8>> {
    let mut frame_spec = Frame::tcp("10.3.0.1", vip, 80);
    frame_spec.payload = vec![0; 6];
    let frame = frame_spec.build();
    if frame.len() != 60 {
        bail!("generator frame is {} bytes, expected 60", frame.len());
    }
    Ok(frame)
}

/// Checks that xlb forwarded the frames it got rather than passing or
/// dropping them: frames that came back mangled by an earlier run (see
/// `xlb_gen`) would otherwise go unnoticed as a low rate. A few frames of
/// the veth's own (neighbour discovery) are tolerated.
pub(super) fn check_forwarded(xlb: &BenchDataplane, sent: u32) -> Result<()> {
    let snap = xlb::stats::snapshot(&xlb.maps)?;
    let not_forwarded: Vec<(&str, u64)> = (0..stat::COUNT)
        .map(|k| (stat::NAMES[k as usize], snap.reason(k)))
        .filter(|(name, n)| (name.starts_with("pass_") || name.starts_with("drop_")) && *n > 0)
        .collect();
    if not_forwarded.iter().map(|(_, n)| n).sum::<u64>() > u64::from(sent / 100) {
        let list: Vec<String> = not_forwarded
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        bail!(
            "xlb did not forward the generator's frames: {}",
            list.join(", ")
        );
    }
    Ok(())
}

/// The contenders of part 3, in run order; the first is the baseline.
const NAMES: [&str; 6] = [
    "MAC swap + XDP_TX only, native (limit)",
    "xlb, native XDP",
    "xlb, generic XDP",
    "xlb ipip, native XDP",
    "generator alone, into an XDP sink on lb0 (arrivals there)",
    "generator alone, into XDP_PASS on lb0 (frames sent)",
];

/// Part 3: forwarded Mpps of xlb (native and generic) against the bare
/// MAC-swap + XDP_TX program and the generator's own ceiling, interleaved,
/// counting arrivals.
pub fn part3(budget: Budget) -> Result<Table> {
    let lab = RateLab::new(1)?;
    let frame = gen_frame("10.0.0.10")?;
    let ipip_frame = gen_frame(IPIP_VIP4)?;
    let mut generator = TrafficGen::new(&lab, budget.generator, &frame)?;
    let cpu = [machine::cpus().first().copied().unwrap_or(0)];
    let frames = generator.frames_per_run(budget.gen_frames);
    let mut sink = load_prog(SINK_OBJ, "xlb_sink")?;
    attach(
        &lab.gen_ns,
        xdp(&mut sink, "xlb_sink")?,
        "gen0",
        XdpMode::Driver,
    )?;

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); NAMES.len()];
    let mut delivered: Vec<(u64, u64)> = vec![(0, 0); NAMES.len()];
    for round in 0..budget.rounds {
        progress(&format!(
            "packet rate, round {}/{} ({} frames each, {})",
            round + 1,
            budget.rounds,
            frames,
            generator.kind().label()
        ));
        for (i, name) in NAMES.iter().enumerate() {
            // Each contender is attached fresh and detached (dropped) after its run.
            let (arrived, secs) = match i {
                0 => {
                    let mut tx = load_prog(TX_OBJ, "xlb_tx")?;
                    attach(&lab.lb_ns, xdp(&mut tx, "xlb_tx")?, "lb0", XdpMode::Driver)?;
                    blast(&lab, &mut generator, &sink, &frame, &cpu, frames)?
                }
                4 => {
                    let mut far = load_prog(SINK_OBJ, "xlb_sink")?;
                    attach(
                        &lab.lb_ns,
                        xdp(&mut far, "xlb_sink")?,
                        "lb0",
                        XdpMode::Driver,
                    )?;
                    blast(&lab, &mut generator, &far, &frame, &cpu, frames)?
                }
                5 => {
                    let mut pass = load_prog(PASS_OBJ, "xlb_pass")?;
                    attach(
                        &lab.lb_ns,
                        xdp(&mut pass, "xlb_pass")?,
                        "lb0",
                        XdpMode::Driver,
                    )?;
                    let secs = generator.burst(&lab, &frame, &cpu, frames)?;
                    (u64::from(frames), secs)
                }
                _ => {
                    let mode = if i == 2 {
                        XdpMode::Skb
                    } else {
                        XdpMode::Driver
                    };
                    let frame = if i == 3 { &ipip_frame } else { &frame };
                    let mut xlb = load_xlb_with(262_144, GEN_MAC)?;
                    attach(&lab.lb_ns, xlb.dp.program_mut()?, "lb0", mode)?;
                    let r = blast(&lab, &mut generator, &sink, frame, &cpu, frames)?;
                    check_forwarded(&xlb, frames).context(*name)?;
                    r
                }
            };
            samples[i].push(arrived as f64 / secs / 1e6);
            delivered[i].0 += arrived;
            delivered[i].1 += u64::from(frames);
        }
    }
    for (i, (arrived, sent)) in delivered.iter().enumerate() {
        if *arrived == 0 {
            bail!("{}: no frame arrived (of {sent} sent)", NAMES[i]);
        }
    }
    let rows: Vec<Series> = NAMES
        .iter()
        .zip(samples)
        .map(|(n, s)| Series::new(*n, "Mpps", s))
        .collect();
    let mut extra: Vec<(String, String, String)> = Vec::new();
    for (n, (a, s)) in NAMES.iter().zip(&delivered) {
        extra.push((
            n.to_string(),
            "generator".into(),
            generator.kind().label().into(),
        ));
        if !n.ends_with("(frames sent)") {
            extra.push((
                n.to_string(),
                "arrived/sent".into(),
                format!("{:.1}%", *a as f64 * 100.0 / *s as f64),
            ));
        }
    }
    // The other xlb modes against xlb's layer-2 native mode.
    let l2 = rows[1].median;
    if l2 > 0.0 {
        for row in &rows[2..4] {
            extra.push((
                row.name.clone(),
                format!("× {}", NAMES[1]),
                format!("{:.2}", row.median / l2),
            ));
        }
    }
    Ok(Table {
        title: format!(
            "Packet rate through a veth, {} generator",
            generator.kind().label()
        ),
        about: format!(
            "Mpps of 64-byte TCP SYN frames from {CLIENTS} client addresses that came back to the \
             generator's interface and were counted there (arrivals, not sends), {} frames per \
             run, contenders interleaved. {} Figures of different generators are not \
             comparable; ratios within one run are. The limit is a program that only swaps \
             the MACs and returns XDP_TX on the same veth. The generator's own ceiling: the \
             same frames into a program on the far veth that counts and drops them (arrivals \
             there), and into an XDP_PASS program there (frames the generator sent per second; \
             the far namespace's stack drops them). Generator, contender and sink share one \
             queue, driven from one thread pinned to one CPU, on a machine with {} (the \
             multi-core part drives one queue per CPU), so these are relative figures. xlb \
             ipip: the same frames to the VIP of a `forward_mode = \"ipip\"` service (layer-3 \
             DSR) whose backends' next hop is the generator's interface; they come back \
             encapsulated in an outer IPv4 header (84 bytes on the wire) and are counted the \
             same way.",
            frames,
            generator.describe(),
            machine::describe_cpus(),
        ),
        baseline: NAMES[0].into(),
        rows,
        extra,
    })
}
