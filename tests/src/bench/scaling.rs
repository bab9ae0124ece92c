//! Part 3b: forwarding rate against the number of cores. The lab of part 3
//! with one RX and TX queue per CPU on each end of the veth; one generator
//! sender per core used, pinned to that core (live frames or AF_PACKET, see
//! `generator`). veth hands a frame to the peer queue of the CPU that
//! sends it, so with `n` threads `n` queues (and `n` cores) carry traffic
//! through the contender and back to the sink. For `n` in 1..=CPUs, xlb
//! (native XDP; layer 2, and `ipip` as in part 3) against the program that
//! only swaps the MACs, interleaved;
//! rates count arrivals at the sink over the wall time of the whole burst.
//! On a machine whose cores outnumber its other work this shows how xlb
//! scales; on a small shared one the generator and the sink compete with
//! the contender for the same cores, which the table says.

use anyhow::{Context as _, Result, bail};
use aya::{Ebpf, programs::XdpMode};
use xlb::objects::{SINK_OBJ, TX_OBJ};

use super::{
    Budget, Series, Table,
    generator::TrafficGen,
    machine, progress,
    traffic::{
        BATCH, CLIENTS, GEN_MAC, RateLab, attach, blast, check_forwarded, gen_frame, load_prog, xdp,
    },
};
use crate::bench::prog_cost::{IPIP_VIP4, load_xlb_with};

/// Rounds at most: every round measures each contender at every core count.
const MAX_ROUNDS: usize = 3;

/// The contenders, in run order: the limit first, xlb's layer-2 mode second.
const CONTENDERS: [&str; 3] = [
    "MAC swap + XDP_TX only, native",
    "xlb, native XDP",
    "xlb ipip, native XDP",
];

/// Runs one contender at `n` cores: attached fresh, detached (dropped) after.
fn run_one(
    lab: &RateLab,
    generator: &mut TrafficGen,
    sink: &Ebpf,
    frame: &[u8],
    contender: usize,
    cpus: &[usize],
    frames: u32,
) -> Result<(u64, f64)> {
    if contender == 0 {
        let mut tx = load_prog(TX_OBJ, "xlb_tx")?;
        attach(&lab.lb_ns, xdp(&mut tx, "xlb_tx")?, "lb0", XdpMode::Driver)?;
        blast(lab, generator, sink, frame, cpus, frames)
    } else {
        // Both xlb modes: the caller passes the frame for the mode's service.
        let mut xlb = load_xlb_with(262_144, GEN_MAC)?;
        attach(&lab.lb_ns, xlb.dp.program_mut()?, "lb0", XdpMode::Driver)?;
        let r = blast(lab, generator, sink, frame, cpus, frames)?;
        check_forwarded(&xlb, frames.saturating_mul(cpus.len() as u32))?;
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
    let frame = gen_frame("10.0.0.10")?;
    let ipip_frame = gen_frame(IPIP_VIP4)?;
    let mut generator = TrafficGen::new(&lab, budget.generator, &frame)?;
    let mut sink = load_prog(SINK_OBJ, "xlb_sink")?;
    attach(
        &lab.gen_ns,
        xdp(&mut sink, "xlb_sink")?,
        "gen0",
        XdpMode::Driver,
    )?;
    // Per thread: a fifth of part 3's count keeps a run with every core busy
    // about as long as one of part 3's single-thread runs.
    let frames = (generator.frames_per_run(budget.gen_frames) / 5).max(BATCH);
    let rounds = budget.rounds.clamp(1, MAX_ROUNDS);

    let points: Vec<(usize, usize)> = (1..=cpus.len())
        .flat_map(|n| (0..CONTENDERS.len()).map(move |c| (n, c)))
        .collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); points.len()];
    let mut delivered: Vec<(u64, u64)> = vec![(0, 0); points.len()];
    for round in 0..rounds {
        progress(&format!(
            "rate against cores, round {}/{rounds} (1..={} cores, {frames} frames per core, {})",
            round + 1,
            cpus.len(),
            generator.kind().label()
        ));
        for (i, &(n, c)) in points.iter().enumerate() {
            let frame = if c == 2 { &ipip_frame } else { &frame };
            let (arrived, secs) =
                run_one(&lab, &mut generator, &sink, frame, c, &cpus[..n], frames)
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
        extra.push((
            name.clone(),
            "generator".into(),
            generator.kind().label().into(),
        ));
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
        title: format!(
            "Packet rate against cores, one {} sender and queue per core",
            generator.kind().label()
        ),
        about: format!(
            "Mpps of 64-byte TCP SYN frames from {CLIENTS} client addresses that came back to \
             the generator's interface (arrivals over the wall time of the burst), for 1 to {} \
             generator threads, each pinned to its own CPU and sending {frames} frames into its \
             own queue of a {}-queue veth pair; contenders interleaved, {rounds} rounds. \
             Machine: {}, Linux {}. Generator, contender and sink run on the same cores, so on \
             a small machine adding cores adds their work too; the ratio to the MAC-swap-only \
             program at the same core count is the comparable figure. xlb ipip: the frames go \
             to the VIP of a `forward_mode = \"ipip\"` service whose next hop is the \
             generator's interface and come back encapsulated (84 bytes on the wire). {} \
             Figures of different generators are not comparable; ratios within one run are.",
            cpus.len(),
            cpus.len(),
            machine::describe_cpus(),
            machine::kernel(),
            generator.describe(),
        ),
        baseline: rows[0].name.clone(),
        rows,
        extra,
    })
}
