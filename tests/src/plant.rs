//! Synthetic sessions written straight into a session map, a batch per
//! syscall: 10M in seconds, so tests and the bench meet production sizes.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::{HashMap, IterableMap as _, MapData};
use lb_common::{Affinity, AffinityKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, Service};
use xlb::{bpf_batch, dataplane, pins::PinnedMaps, sessions::monotonic_ns};

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

/// The kernel's record of the TCP service at `vip`:`port`.
pub fn tcp_service(maps: &PinnedMaps, vip: IpAddr, port: u16) -> Result<Service> {
    let family = if vip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
    let words = dataplane::addr_words(vip);
    for entry in maps.services.iter() {
        let (key, svc) = entry.context("reading the service map")?;
        if key.family == family
            && key.proto == PROTO_TCP
            && key.addr == words
            && u16::from_be(key.port) == port
        {
            return Ok(svc);
        }
    }
    bail!("no service record for {vip}:{port}/tcp")
}

/// `n` fresh sessions of `record`'s service, for the IPv4 clients `first`,
/// `first + 1`, …, each on its client's answer in the live Maglev table
/// (where the program would have put it).
pub fn maglev_sessions(
    maps: &PinnedMaps,
    record: &Service,
    first: Ipv4Addr,
    n: u32,
) -> Result<(Vec<AffinityKey>, Vec<Affinity>)> {
    let table = live_table(maps, record)?;
    let now = monotonic_ns();
    let keys: Vec<AffinityKey> = (0..n)
        .map(|k| {
            let words = dataplane::addr_words(IpAddr::V4(Ipv4Addr::from(u32::from(first) + k)));
            let mut addr = [0u32; 4];
            for (a, (w, m)) in addr.iter_mut().zip(words.iter().zip(&record.mask)) {
                *a = w & m;
            }
            AffinityKey {
                service_id: record.id,
                addr,
            }
        })
        .collect();
    let values = keys
        .iter()
        .map(|k| Affinity {
            backend_id: dataplane::answer(&table, &k.addr),
            _pad: 0,
            last_seen_ns: now,
        })
        .collect();
    Ok((keys, values))
}

/// The live Maglev table of `record`'s service (the slot the kernel reads).
pub fn live_table(maps: &PinnedMaps, record: &Service) -> Result<Vec<u32>> {
    let mut table = vec![0u32; record.table_size as usize];
    let base = record.maglev_base[(record.active_slot & 1) as usize];
    bpf_batch::lookup_array(maps.maglev.map().fd(), base, &mut table)
        .map_err(|e| anyhow!("{e:?}"))
        .with_context(|| format!("reading the live Maglev table of service id {}", record.id))?;
    Ok(table)
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
