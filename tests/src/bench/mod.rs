//! `cargo xtask bench`: measurements taken side by side in one run, with
//! contenders interleaved (A B A B ...) because these machines are shared
//! and noisy; every figure is a median with its min–max and a ratio to a
//! baseline measured in the same run.

pub mod at_scale;
pub mod cluster;
mod contenders;
pub mod failover;
pub mod generator;
pub mod machine;
pub mod peers;
pub mod prog_cost;
pub mod report;
pub mod scaling;
pub mod traffic;
pub mod transition;

use serde::Serialize;

/// How long and how thoroughly to measure.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Interleaved rounds per measurement.
    pub rounds: usize,
    /// BPF_PROG_TEST_RUN `repeat` for the steady paths.
    pub repeat: u32,
    /// Distinct frames per round for the miss path (each run once).
    pub miss_frames: usize,
    /// Affinity map sizes for the scale part.
    pub scale_sizes: &'static [u32],
    /// Frames per contender and round in the packet-rate part (with live
    /// frames; the AF_PACKET generator sends a fifth as many).
    pub gen_frames: u32,
    /// Interleaved rounds of the peers part (each contender, both connection modes).
    pub peer_rounds: usize,
    /// Seconds of one wrk run in the peers part.
    pub peer_secs: u32,
    /// Interleaved rounds of the failover part.
    pub failover_rounds: usize,
    /// Probes of the pinned client per failover run (one every 50 ms).
    pub failover_probes: usize,
    /// How long the killed backend stays down, in ms.
    pub failover_down_ms: u64,
    /// Rounds of the transition-to-kernel part.
    pub transition_rounds: usize,
    /// Sessions per loaded node in the cluster part (`--cluster-sessions N`).
    pub cluster_sessions: u32,
    /// The packet-rate parts' traffic generator.
    pub generator: generator::Pick,
    /// Session counts of the at-scale failure part.
    pub at_scale_sessions: &'static [u32],
}

impl Budget {
    /// `--quick`: the whole run in well under two minutes.
    pub const QUICK: Budget = Budget {
        rounds: 5,
        repeat: 1_000_000,
        miss_frames: 5_000,
        scale_sizes: &[1_000, 100_000],
        gen_frames: 1_000_000,
        peer_rounds: 2,
        peer_secs: 2,
        failover_rounds: 1,
        failover_probes: 120,
        failover_down_ms: 2_750,
        transition_rounds: 5,
        cluster_sessions: 100_000,
        generator: generator::Pick::Auto,
        at_scale_sessions: &[100_000],
    };
    /// The full run.
    pub const FULL: Budget = Budget {
        rounds: 11,
        repeat: 2_000_000,
        miss_frames: 20_000,
        scale_sizes: &[1_000, 100_000, 1_000_000, 10_000_000],
        gen_frames: 5_000_000,
        peer_rounds: 5,
        peer_secs: 5,
        failover_rounds: 3,
        failover_probes: 300,
        failover_down_ms: 6_000,
        transition_rounds: 11,
        // The issue-16 acceptance size: the part takes about two minutes at 1M per node.
        cluster_sessions: 1_000_000,
        generator: generator::Pick::Auto,
        at_scale_sessions: &[1_000_000, 10_000_000],
    };
    /// The smallest configuration, for the test that keeps the bench from rotting.
    pub const SMOKE: Budget = Budget {
        rounds: 2,
        repeat: 10_000,
        miss_frames: 200,
        scale_sizes: &[1_000],
        gen_frames: 20_000,
        peer_rounds: 1,
        peer_secs: 1,
        failover_rounds: 1,
        failover_probes: 90,
        // Above fall × interval + 100 ms + ASK_BEFORE_RESTORE (2.1 s): the kernel is
        // watched until the clients are asked, and DOWN may land at up to 1.6 s.
        failover_down_ms: 2_500,
        transition_rounds: 2,
        cluster_sessions: 2_000,
        generator: generator::Pick::Auto,
        at_scale_sessions: &[10_000],
    };
}

/// Samples of one contender, with their summary.
#[derive(Clone, Debug, Serialize)]
pub struct Series {
    /// What was measured.
    pub name: String,
    /// Unit of the samples (`ns/packet`, `Mpps`, ...).
    pub unit: String,
    /// Raw samples, in measurement order.
    pub samples: Vec<f64>,
    /// Median of the samples.
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Series {
    /// Summarises `samples` (which must not be empty).
    pub fn new(name: impl Into<String>, unit: impl Into<String>, samples: Vec<f64>) -> Self {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let median = match sorted.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Self {
            name: name.into(),
            unit: unit.into(),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            median,
            samples,
        }
    }
}

/// One table of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Table {
    /// Heading.
    pub title: String,
    /// What the table shows, one paragraph.
    pub about: String,
    /// Name of the series the ratios are against.
    pub baseline: String,
    /// The series, baseline included.
    pub rows: Vec<Series>,
    /// Extra columns per row (e.g. map memory), by row name.
    pub extra: Vec<(String, String, String)>,
}

impl Table {
    /// Median of `row` divided by the baseline's median.
    pub fn ratio(&self, row: &Series) -> Option<f64> {
        let base = self.rows.iter().find(|r| r.name == self.baseline)?;
        (base.median > 0.0).then(|| row.median / base.median)
    }
}

/// Everything one bench run produced.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// The command line that produced it.
    pub command: String,
    /// Machine description (kernel, CPUs, memory).
    pub machine: String,
    /// Whether `--quick` was given.
    pub quick: bool,
    /// The tables, in order.
    pub tables: Vec<Table>,
    /// Scale points: (affinity entries, hit ns, miss ns, affinity map bytes, all maps bytes).
    pub scale: Vec<ScalePoint>,
    /// Parts that could not run, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Every wrk run of the peers part, raw.
    pub peer_runs: Vec<peers::PeerRun>,
    /// The failover table, if that part ran.
    pub failover: Option<failover::FailoverTable>,
    /// Every failover run, raw (with every probe).
    pub failover_runs: Vec<failover::FailoverRun>,
    /// The cluster replication part, if it ran.
    pub cluster: Option<cluster::ClusterTable>,
}

/// Cost and memory at one affinity map size.
#[derive(Clone, Debug, Serialize)]
pub struct ScalePoint {
    /// Entries pre-filled in the affinity map.
    pub entries: u32,
    /// The map's capacity: the entries plus room for every miss frame.
    pub capacity: u32,
    /// Hit-path ns/packet (median), one client repeated (`repeat`).
    pub hit_ns: f64,
    /// Hit-path ns/packet of that one client run once per test run.
    pub hit_once_ns: f64,
    /// Hit-path ns/packet of distinct pre-filled clients in random order,
    /// each run once (the working set is the whole map).
    pub hit_distinct_ns: f64,
    /// Miss-path ns/packet (median).
    pub miss_ns: f64,
    /// Kernel memory of the affinity map (fdinfo `memlock`).
    pub affinity_bytes: u64,
    /// Kernel memory of all xlb maps.
    pub maps_bytes: u64,
}

/// One progress line, flushed at once.
pub fn progress(msg: &str) {
    use std::io::Write as _;
    println!("bench: {msg}");
    let _ = std::io::stdout().flush();
}
