//! Synthetic sessions written straight into a session map, a batch per
//! syscall: 10M in seconds, so tests and the bench meet production sizes.

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::{HashMap, IterableMap as _, MapData};
use lb_common::{Affinity, AffinityKey};
use xlb::bpf_batch;

/// Entries per `BPF_MAP_UPDATE_BATCH` call.
const BATCH: usize = 8192;

/// Writes `values[i]` at `keys[i]` into `map` (an affinity or protected
/// map), `BATCH` at a time, calling `progress` with the count written after
/// every million. A failure says how far it got.
pub fn sessions(
    map: &HashMap<MapData, AffinityKey, Affinity>,
    keys: &[AffinityKey],
    values: &[Affinity],
    mut progress: impl FnMut(usize),
) -> Result<()> {
    if keys.len() != values.len() {
        bail!("{} keys for {} values", keys.len(), values.len());
    }
    let mut done = 0;
    for (ks, vs) in keys.chunks(BATCH).zip(values.chunks(BATCH)) {
        bpf_batch::update(map.map().fd(), ks, vs)
            .map_err(|e| anyhow!("{e:?}"))
            .with_context(|| format!("writing sessions ({done} of {} written)", keys.len()))?;
        let before = done;
        done += ks.len();
        if done / 1_000_000 > before / 1_000_000 {
            progress(done);
        }
    }
    Ok(())
}

/// A reproducible permutation-free sample: `n` indexes below `bound`, in a
/// pseudo-random order (xorshift from `seed`), so a bench run meets the
/// same clients each time without a random-number crate.
pub fn sample(n: usize, bound: u32, seed: u64) -> Vec<u32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % u64::from(bound.max(1))) as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_stays_in_bounds_spreads_and_repeats_with_its_seed() {
        let s = sample(10_000, 1_000_000, 7);
        assert!(s.iter().all(|i| *i < 1_000_000));
        assert_eq!(s, sample(10_000, 1_000_000, 7));
        assert_ne!(s, sample(10_000, 1_000_000, 8));
        let distinct: std::collections::HashSet<_> = s.iter().collect();
        assert!(distinct.len() > 9_900, "{} distinct", distinct.len());
        // Spread over the whole range, not clustered at its start.
        assert!(s.iter().any(|i| *i > 900_000) && s.iter().any(|i| *i < 100_000));
    }
}
