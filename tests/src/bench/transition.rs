//! Part 6: transition to kernel. How long `dataplane::apply` takes to make
//! a health transition live (the new Maglev table written and its service
//! record flipped), with 16 services × 3 backends × 65537-slot tables,
//! when one backend of one service goes down and when one backend in each
//! of the 16 does; against writing one table one `bpf()` call per slot, the
//! method apply used before, measured in the same run.
//!
//! Every round starts from the same kernel state (all services removed,
//! then created again), because what a transition writes depends on what
//! the idle slot still holds from earlier changes.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use xlb::{
    config::Config,
    dataplane::{self, ApplyReport, Dataplane, LoadOptions},
    pins::{self, PinnedMaps},
};

use super::{Budget, Series, Table, progress};
use crate::frames::LB_MAC;

/// Services in the bench config.
pub const SERVICES: u32 = 16;
/// Backends per service.
pub const BACKENDS: u32 = 3;
/// Maglev table size of every service.
pub const TABLE_SIZE: u32 = 65_537;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// An unattached dataplane in a private pin directory, removed on drop.
struct Private {
    _dp: Dataplane,
    maps: PinnedMaps,
    dir: PathBuf,
}

impl Drop for Private {
    fn drop(&mut self) {
        if let Err(e) = pins::remove_all(&self.dir) {
            eprintln!("bench: cleanup of {} failed: {e:#}", self.dir.display());
        }
    }
}

/// The settings every bench config shares.
fn header() -> String {
    format!(
        "interface = \"bench0\"\nmaglev_table_size = {TABLE_SIZE}\nmax_services = {}\n\
         affinity_max_entries = 4096\n",
        SERVICES + 1
    )
}

/// The bench config; `down[i]` marks backend 1 of service i down.
/// One service id more than the config uses leaves a region nobody reads
/// for the per-slot baseline.
fn config_text(down: &[bool]) -> String {
    let mut text = header();
    for s in 0..SERVICES {
        text.push_str(&format!(
            "\n[[service]]\nname = \"svc{s}\"\nvip = \"10.0.1.{}\"\nport = 80\nprotocol = \"tcp\"\n",
            s + 1
        ));
        for b in 0..BACKENDS {
            let state = if b == 1 && down.get(s as usize).copied().unwrap_or(false) {
                "state = \"down\"\n"
            } else {
                ""
            };
            text.push_str(&format!(
                "[[service.backend]]\nname = \"b{b}\"\naddress = \"10.1.{s}.{}\"\nmac = \"02:00:00:01:{s:02x}:{b:02x}\"\n{state}",
                b + 1
            ));
        }
    }
    text
}

fn parse(down: &[bool]) -> Result<Config> {
    Config::parse(&config_text(down)).context("transition bench config")
}

fn load() -> Result<Private> {
    let base = parse(&[])?;
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/xlb-bench-transition-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut opts = LoadOptions::from_config(&base, LB_MAC, false);
    opts.pin_dir = dir.clone();
    let dp = Dataplane::load(opts)?;
    match PinnedMaps::open(&dir) {
        Ok(maps) => Ok(Private { _dp: dp, maps, dir }),
        Err(e) => {
            let _ = pins::remove_all(&dir);
            Err(e)
        }
    }
}

/// Removes every service, then creates them again: the start of a round.
fn reset(p: &mut Private, empty: &Config, base: &Config) -> Result<()> {
    dataplane::apply(&mut p.maps, empty).context("removing the bench services")?;
    let r = dataplane::apply(&mut p.maps, base).context("creating the bench services")?;
    if r.tables_written.len() != SERVICES as usize {
        bail!(
            "creating {SERVICES} services wrote {} tables",
            r.tables_written.len()
        );
    }
    Ok(())
}

/// Times one apply, checking how many tables it wrote.
fn timed(p: &mut Private, config: &Config, tables: usize) -> Result<(f64, ApplyReport)> {
    let t = Instant::now();
    let r = dataplane::apply(&mut p.maps, config)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if r.tables_written.len() != tables {
        bail!(
            "the transition wrote {} tables ({:?}), expected {tables}",
            r.tables_written.len(),
            r.tables_written
        );
    }
    Ok((ms, r))
}

/// Part 6: apply time of a transition, 1 and 16 services changed.
pub fn part6(budget: Budget) -> Result<Table> {
    let mut p = load()?;
    let empty = Config::parse(&header()).context("empty bench config")?;
    let base = parse(&[])?;
    let mut one = vec![false; SERVICES as usize];
    one[0] = true;
    let one = parse(&one)?;
    let all = parse(&vec![true; SERVICES as usize])?;

    let names = [
        "per-element set of one table (the old apply's method)",
        "one whole table in one batch syscall",
        "apply: nothing changed",
        "apply: 1 of 16 services changed",
        "apply: 16 of 16 services changed",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut entries = [0usize; 5];
    // A region of the Maglev map no service uses (service id SERVICES).
    let spare = SERVICES * 2 * TABLE_SIZE;
    let table: Vec<u32> = (0..TABLE_SIZE).map(|i| i % BACKENDS).collect();
    let keys: Vec<u32> = (spare..spare + TABLE_SIZE).collect();

    for round in 0..budget.transition_rounds {
        progress(&format!(
            "transition to kernel, round {}/{}",
            round + 1,
            budget.transition_rounds
        ));
        let t = Instant::now();
        for (k, v) in keys.iter().zip(&table) {
            p.maps
                .maglev
                .set(*k, *v, 0)
                .context("per-element Maglev write")?;
        }
        samples[0].push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        xlb::bpf_batch::update_array(&mut p.maps.maglev, &keys, &table)
            .context("batch Maglev write")?;
        samples[1].push(t.elapsed().as_secs_f64() * 1e3);

        reset(&mut p, &empty, &base)?;
        let (ms, r) = timed(&mut p, &base, 0)?;
        samples[2].push(ms);
        entries[2] = r.table_entries_written;
        let (ms, r) = timed(&mut p, &one, 1)?;
        samples[3].push(ms);
        entries[3] = r.table_entries_written;
        reset(&mut p, &empty, &base)?;
        let (ms, r) = timed(&mut p, &all, SERVICES as usize)?;
        samples[4].push(ms);
        entries[4] = r.table_entries_written;
    }
    entries[0] = TABLE_SIZE as usize;
    entries[1] = TABLE_SIZE as usize;
    let tables = ["1", "1", "0", "1", "16"];
    let mut extra = Vec::new();
    for (i, name) in names.iter().enumerate() {
        extra.push((
            (*name).to_string(),
            "tables written".to_string(),
            tables[i].to_string(),
        ));
        extra.push((
            (*name).to_string(),
            "slots written".to_string(),
            entries[i].to_string(),
        ));
    }
    Ok(Table {
        title: format!(
            "Transition to kernel: {SERVICES} services × {BACKENDS} backends × {TABLE_SIZE} slots"
        ),
        about: format!(
            "Wall time of `dataplane::apply` (unattached dataplane, private pins) after one \
             backend goes down in one service, and in each of the {SERVICES} services, from \
             freshly created services; the apply reads the service records and the backend \
             array (one batch), builds the changed tables, writes into each changed service's \
             idle slot only the slots that differ (one batch syscall), and flips its record. \
             Against the same table written one bpf() call per slot, as apply did before, and \
             in one batch. Medians over {} rounds. Goal: ≤ 10 ms for one changed service.",
            budget.transition_rounds
        ),
        baseline: names[0].into(),
        rows: names
            .iter()
            .zip(samples)
            .map(|(n, s)| Series::new(*n, "ms", s))
            .collect(),
        extra,
    })
}
