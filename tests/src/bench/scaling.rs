//! Part 3b: forwarding rate against the number of cores. The lab of part 3
//! with one RX and TX queue per CPU on each end of the veth; one generator
//! thread per core used, pinned to that core, each running `xlb_gen` in
//! live-frames mode. veth hands a frame to the peer queue of the CPU that
//! sends it, so with `n` threads `n` queues (and `n` cores) carry traffic
//! through the contender and back to the sink. For `n` in 1..=CPUs, xlb
//! (native XDP; layer 2, and `ipip` as in part 3) against the program that
//! only swaps the MACs, interleaved;
//! rates count arrivals at the sink over the wall time of the whole burst.
//! On a machine whose cores outnumber its other work this shows how xlb
//! scales; on a small shared one the generator and the sink compete with
//! the contender for the same cores, which the table says.

use std::{
    sync::Barrier,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use xlb::objects::{GEN_OBJ, SINK_OBJ, TX_OBJ};

use super::{
    Budget, Series, Table, machine, progress,
    traffic::{
        BATCH, CLIENTS, GEN_MAC, RateLab, attach, check_forwarded, gen_frame, load_prog, load_with,
        sink_count, xdp,
    },
};
use crate::{
    bench::prog_cost::{IPIP_VIP4, load_xlb_with},
    frames::LB_MAC,
    netns,
};

/// Rounds at most: every round measures each contender at every core count.
const MAX_ROUNDS: usize = 3;
/// How long the queues get to drain after a burst before arrivals are read.
const DRAIN: Duration = Duration::from_millis(100);

/// The contenders, in run order: the limit first, xlb's layer-2 mode second.
const CONTENDERS: [&str; 3] = [
    "MAC swap + XDP_TX only, native",
    "xlb, native XDP",
    "xlb ipip, native XDP",
];

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the callers pass CPUs from the affinity mask, below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; set is valid for its size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning a generator thread to CPU {cpu}"));
    }
    Ok(())
}

/// The ifindex of `gen0` inside the generator namespace.
fn gen_ifindex(lab: &RateLab) -> Result<u32> {
    lab.gen_ns.run(|| {
        let c = std::ffi::CString::new("gen0").context("ifname")?;
        // SAFETY: valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if ifindex == 0 {
            bail!("gen0 not found in {}", lab.gen_ns.name());
        }
        Ok(ifindex)
    })
}

/// One burst: a thread per CPU in `cpus`, pinned to it, each sending
/// `frames` frames through its own queue. Returns (arrived, seconds).
fn burst(
    lab: &RateLab,
    generator: &Xdp,
    sink: &Ebpf,
    frame: &[u8],
    cpus: &[usize],
    frames: u32,
) -> Result<(u64, f64)> {
    let ifindex = gen_ifindex(lab)?;
    let before = sink_count(sink)?;
    let start_line = Barrier::new(cpus.len() + 1);
    let secs = std::thread::scope(|s| -> Result<f64> {
        let threads: Vec<_> = cpus
            .iter()
            .enumerate()
            .map(|(queue, &cpu)| {
                let start_line = &start_line;
                s.spawn(move || -> Result<()> {
                    // Every thread reaches the barrier, also after a failed
                    // set-up: otherwise the others would wait forever.
                    let ready = netns::enter(lab.gen_ns.path()).and_then(|()| pin_to(cpu));
                    start_line.wait();
                    ready?;
                    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
                    // rx_queue_index, egress_ifindex.
                    let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, queue as u32, 0];
                    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
                    generator
                        .test_run(TestRunOptions {
                            data_in: Some(frame),
                            ctx_in: Some(&ctx),
                            repeat: frames,
                            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                            ..Default::default()
                        })
                        .with_context(|| format!("live-frames generator on CPU {cpu}"))?;
                    Ok(())
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        let mut first_err = None;
        for t in threads {
            let r = match t.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        first_err.map_or(Ok(secs), Err)
    })?;
    std::thread::sleep(DRAIN);
    Ok((sink_count(sink)? - before, secs))
}

/// Runs one contender at `n` cores: attached fresh, detached (dropped) after.
fn run_one(
    lab: &RateLab,
    generator: &Xdp,
    sink: &Ebpf,
    frame: &[u8],
    contender: usize,
    cpus: &[usize],
    frames: u32,
) -> Result<(u64, f64)> {
    if contender == 0 {
        let mut tx = load_prog(TX_OBJ, "xlb_tx")?;
        attach(&lab.lb_ns, xdp(&mut tx, "xlb_tx")?, "lb0", XdpMode::Driver)?;
        burst(lab, generator, sink, frame, cpus, frames)
    } else {
        // Both xlb modes: the caller passes the frame for the mode's service.
        let mut xlb = load_xlb_with(262_144, GEN_MAC)?;
        attach(&lab.lb_ns, xlb.dp.program_mut()?, "lb0", XdpMode::Driver)?;
        let r = burst(lab, generator, sink, frame, cpus, frames)?;
        if contender == 2 {
            check_forwarded(&xlb, frames.saturating_mul(cpus.len() as u32))?;
        }
        Ok(r)
    }
}

fn row_name(contender: usize, cores: usize) -> String {
    format!(
        "{}, {cores} core{}",
        CONTENDERS[contender],
        if cores == 1 { "" } else { "s" }
    )
}

/// Part 3b: Mpps of xlb and of the MAC-swap-only program for 1..=CPUs
/// generator threads and queues.
pub fn part_scaling(budget: Budget) -> Result<Table> {
    let cpus = machine::cpus();
    let lab = RateLab::new(cpus.len())?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&LB_MAC);
    macs[6..].copy_from_slice(&GEN_MAC);
    let mut loader = EbpfLoader::new();
    loader
        .override_global("XLB_GEN_CLIENTS", &CLIENTS, true)
        .override_global("XLB_GEN_MACS", &macs, true);
    let mut generator = load_with(loader, GEN_OBJ, "xlb_gen")?;
    let mut sink = load_prog(SINK_OBJ, "xlb_sink")?;
    attach(
        &lab.gen_ns,
        xdp(&mut sink, "xlb_sink")?,
        "gen0",
        XdpMode::Driver,
    )?;
    let frame = gen_frame("10.0.0.10")?;
    let ipip_frame = gen_frame(IPIP_VIP4)?;
    // Per thread: a fifth of part 3's count keeps a run with every core busy
    // about as long as one of part 3's single-thread runs.
    let frames = (budget.gen_frames / 5).max(BATCH);
    let rounds = budget.rounds.clamp(1, MAX_ROUNDS);

    let points: Vec<(usize, usize)> = (1..=cpus.len())
        .flat_map(|n| (0..CONTENDERS.len()).map(move |c| (n, c)))
        .collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); points.len()];
    let mut delivered: Vec<(u64, u64)> = vec![(0, 0); points.len()];
    for round in 0..rounds {
        progress(&format!(
            "rate against cores, round {}/{rounds} (1..={} cores, {frames} frames per core)",
            round + 1,
            cpus.len()
        ));
        for (i, &(n, c)) in points.iter().enumerate() {
            let generator = xdp(&mut generator, "xlb_gen")?;
            let frame = if c == 2 { &ipip_frame } else { &frame };
            let (arrived, secs) = run_one(&lab, generator, &sink, frame, c, &cpus[..n], frames)
                .with_context(|| row_name(c, n))?;
            samples[i].push(arrived as f64 / secs / 1e6);
            delivered[i].0 += arrived;
            delivered[i].1 += u64::from(frames) * n as u64;
        }
    }
    for (i, (arrived, sent)) in delivered.iter().enumerate() {
        if *arrived == 0 {
            let (n, c) = points[i];
            bail!("{}: no frame arrived (of {sent} sent)", row_name(c, n));
        }
    }
    let rows: Vec<Series> = points
        .iter()
        .zip(samples)
        .map(|(&(n, c), s)| Series::new(row_name(c, n), "Mpps", s))
        .collect();
    let mut extra = Vec::new();
    for (i, &(n, c)) in points.iter().enumerate() {
        let name = rows[i].name.clone();
        let (arrived, sent) = delivered[i];
        extra.push((name.clone(), "cores".into(), n.to_string()));
        if c >= 1 {
            // The rows of the same core count come just before, in contender order.
            let limit = rows[i - c].median;
            if limit > 0.0 {
                extra.push((
                    name.clone(),
                    "× MAC swap, same cores".into(),
                    format!("{:.2}", rows[i].median / limit),
                ));
            }
        }
        if c == 2 {
            let l2 = rows[i - 1].median;
            if l2 > 0.0 {
                extra.push((
                    name.clone(),
                    "× xlb L2, same cores".into(),
                    format!("{:.2}", rows[i].median / l2),
                ));
            }
        }
        extra.push((
            name,
            "arrived/sent".into(),
            format!("{:.1}%", arrived as f64 * 100.0 / sent.max(1) as f64),
        ));
    }
    Ok(Table {
        title: "Packet rate against cores, one generator thread and queue per core".into(),
        about: format!(
            "Mpps of 64-byte TCP SYN frames from {CLIENTS} client addresses that came back to \
             the generator's interface (arrivals over the wall time of the burst), for 1 to {} \
             generator threads, each pinned to its own CPU and sending {frames} frames into its \
             own queue of a {}-queue veth pair; contenders interleaved, {rounds} rounds. \
             Machine: {}, Linux {}. Generator, contender and sink run on the same cores, so on \
             a small machine adding cores adds their work too; the ratio to the MAC-swap-only \
             program at the same core count is the comparable figure. xlb ipip: the frames go \
             to the VIP of a `forward_mode = \"ipip\"` service whose next hop is the \
             generator's interface and come back encapsulated (84 bytes on the wire).",
            cpus.len(),
            cpus.len(),
            machine::describe_cpus(),
            machine::kernel(),
        ),
        baseline: rows[0].name.clone(),
        rows,
        extra,
    })
}
