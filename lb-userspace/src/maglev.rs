//! Maglev lookup-table construction (Maglev paper, section 3.4), with weights.
//!
//! The table depends only on the set of (key, weight, id) triples, never on
//! their order or on any random state, so every xlb instance given the same
//! backends builds the same table and sends a client to the same backend
//! without talking to the others.

use anyhow::{Result, bail};
use lb_common::{NO_BACKEND, client_hash};

/// Largest table size accepted: bounds the memory one table (and the map
/// holding two per service) can take.
pub const MAX_TABLE_SIZE: u32 = 1_000_003;

/// One backend as Maglev sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// Value written into the table for the slots this backend owns.
    pub id: u32,
    /// Stable identity (the backend's address bytes): decides its slot preferences.
    pub key: &'a [u8],
    /// Relative share of the slots; 0 leaves the backend out.
    pub weight: u32,
}

/// Builds a table of `size` entries (size must be prime) holding backend ids.
pub fn build_table(backends: &[MaglevBackend<'_>], size: u32) -> Result<Vec<u32>> {
    if size < 3 {
        bail!("Maglev table size {size} is too small (at least 3)");
    }
    if size > MAX_TABLE_SIZE {
        bail!("Maglev table size {size} is too large (at most {MAX_TABLE_SIZE})");
    }
    if !is_prime(size) {
        bail!("Maglev table size {size} is not prime");
    }

    // Sorting by key makes the fill order, and so the table, independent of
    // the caller's order.
    let mut sorted: Vec<&MaglevBackend<'_>> = backends.iter().collect();
    sorted.sort_unstable_by(|a, b| a.key.cmp(b.key));
    if let Some(pair) = sorted.windows(2).find(|p| p[0].key == p[1].key) {
        bail!(
            "two Maglev backends (ids {} and {}) have the same key {:02x?}",
            pair[0].id,
            pair[1].id,
            pair[0].key
        );
    }
    sorted.retain(|b| b.weight > 0);

    let mut table = vec![NO_BACKEND; size as usize];
    if sorted.is_empty() {
        return Ok(table);
    }

    // Dividing out the common factor keeps each round short, which keeps the
    // bias of the last, partial round (earlier keys get their turns first)
    // down to a few slots.
    let divisor = sorted.iter().fold(0, |g, b| gcd(g, b.weight));
    let size64 = u64::from(size);
    let mut cursors: Vec<Cursor> = sorted
        .iter()
        .map(|b| Cursor {
            id: b.id,
            turns: b.weight / divisor,
            pos: hash(b.key, SEED_OFFSET) % size64,
            skip: hash(b.key, SEED_SKIP) % (size64 - 1) + 1,
        })
        .collect();

    let mut filled: usize = 0;
    loop {
        for c in &mut cursors {
            for _ in 0..c.turns {
                // skip is in 1..size and size is prime, so the walk visits
                // every slot: an empty one is always found while any is left.
                while table[c.pos as usize] != NO_BACKEND {
                    c.advance(size64);
                }
                table[c.pos as usize] = c.id;
                c.advance(size64);
                filled += 1;
                if filled == table.len() {
                    return Ok(table);
                }
            }
        }
    }
}

/// Index of a client in a table: `client_hash(masked) % size`, as the kernel computes it.
pub fn slot(masked: &[u32; 4], size: u32) -> u32 {
    // A zero size is never a valid table; slot 0 beats a divide-by-zero panic.
    client_hash(masked) % size.max(1)
}

/// Whether `n` is a prime number (trial division; table sizes are small).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let n = u64::from(n);
    let mut d: u64 = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// A backend's walk through its permutation of the table.
struct Cursor {
    id: u32,
    turns: u32,
    pos: u64,
    skip: u64,
}

impl Cursor {
    fn advance(&mut self, size: u64) {
        self.pos = (self.pos + self.skip) % size;
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

// Two fixed seeds give the two independent hashes Maglev needs. Changing
// either reshuffles every table on upgrade, so they are part of the format.
const SEED_OFFSET: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SEED_SKIP: u64 = 0x6d61_676c_6576_736b; // "maglevsk"

/// FNV-1a 64 over the seed then the key, finished with splitmix64's mixer:
/// FNV alone leaves short keys (4-byte addresses) with weak high bits.
fn hash(key: &[u8], seed: u64) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for &b in seed.to_le_bytes().iter().chain(key) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::words_from_bytes;

    const SIZE: u32 = 65_537;
    const CLIENTS: u32 = 100_000;

    /// Backend addresses 192.168.0.1, .2, ... as owned key bytes.
    fn keys(n: usize) -> Vec<[u8; 4]> {
        (1..=n)
            .map(|i| [192, 168, (i >> 8) as u8, i as u8])
            .collect()
    }

    fn backends<'a>(keys: &'a [[u8; 4]], weights: &[u32]) -> Vec<MaglevBackend<'a>> {
        keys.iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (k, &w))| MaglevBackend {
                id: i as u32,
                key: k,
                weight: w,
            })
            .collect()
    }

    /// Slots of 100k clients 10.x.y.z, as the kernel would compute them.
    fn client_slots() -> Vec<u32> {
        (0..CLIENTS)
            .map(|i| {
                let b = i.to_be_bytes();
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&[10, b[1], b[2], b[3]]);
                slot(&words_from_bytes(&addr), SIZE)
            })
            .collect()
    }

    /// The key each client lands on, so tables with different ids compare.
    fn assignment<'a>(table: &[u32], bs: &[MaglevBackend<'a>], slots: &[u32]) -> Vec<&'a [u8]> {
        slots
            .iter()
            .map(|&s| {
                let id = table[s as usize];
                bs.iter().find(|b| b.id == id).map_or(&[][..], |b| b.key)
            })
            .collect()
    }

    fn check_distribution(weights: &[u32]) {
        let ks = keys(weights.len());
        let bs = backends(&ks, weights);
        let table = build_table(&bs, SIZE).expect("valid table");
        let mut counts = vec![0u32; weights.len()];
        for s in client_slots() {
            counts[table[s as usize] as usize] += 1;
        }
        let total: u32 = weights.iter().sum();
        for (i, (&w, &got)) in weights.iter().zip(&counts).enumerate() {
            let expected = f64::from(CLIENTS) * f64::from(w) / f64::from(total);
            let err = (f64::from(got) - expected).abs() / expected;
            assert!(
                err <= 0.02,
                "backend {i} weight {w}: {got} clients, expected {expected:.0} ({:.2}% off)",
                err * 100.0
            );
        }
    }

    #[test]
    fn equal_weights_spread_evenly() {
        check_distribution(&[1, 1, 1]);
        check_distribution(&[1, 1, 1, 1, 1]);
    }

    #[test]
    fn unequal_weights_spread_proportionally() {
        check_distribution(&[1, 2, 3]);
        check_distribution(&[10, 20, 30, 40]);
    }

    #[test]
    fn removing_a_backend_moves_few_clients() {
        let slots = client_slots();
        for n in [3usize, 5, 10] {
            let ks = keys(n);
            let before_bs = backends(&ks, &vec![1; n]);
            let before = build_table(&before_bs, SIZE).expect("valid table");
            let before = assignment(&before, &before_bs, &slots);
            for removed in 0..n {
                let after_bs: Vec<_> = before_bs
                    .iter()
                    .copied()
                    .filter(|b| b.id != removed as u32)
                    .collect();
                let after = build_table(&after_bs, SIZE).expect("valid table");
                let after = assignment(&after, &after_bs, &slots);
                let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
                let frac = moved as f64 / f64::from(CLIENTS);
                let limit = 1.0 / n as f64 + 0.01;
                assert!(
                    frac <= limit,
                    "n={n} removed {removed}: {:.2}% moved, limit {:.2}%",
                    frac * 100.0,
                    limit * 100.0
                );
            }
        }
    }

    #[test]
    fn same_input_in_any_order_gives_same_table() {
        let ks = keys(7);
        let bs = backends(&ks, &[1, 2, 1, 3, 1, 1, 5]);
        let a = build_table(&bs, SIZE).expect("valid table");
        assert_eq!(a, build_table(&bs, SIZE).expect("valid table"));
        let mut shuffled = bs.clone();
        shuffled.reverse();
        shuffled.swap(1, 4);
        assert_eq!(a, build_table(&shuffled, SIZE).expect("valid table"));
    }

    #[test]
    fn adding_a_backend_moves_clients_mostly_to_it() {
        // Maglev trades strict minimal disruption for even spread: the new
        // backend's claims shift a few later claims of the others, so a
        // small churn among the old backends is expected (measured: 0.03% at
        // n=3 up to 0.3% at n=10); the bound keeps the removal test's 1%.
        let slots = client_slots();
        for n in [3usize, 5, 10] {
            let ks = keys(n);
            let all = backends(&ks, &vec![1; n]);
            let after = build_table(&all, SIZE).expect("valid table");
            let after = assignment(&after, &all, &slots);
            for added in all.iter() {
                let old: Vec<_> = all.iter().copied().filter(|b| b.id != added.id).collect();
                let before = build_table(&old, SIZE).expect("valid table");
                let before = assignment(&before, &old, &slots);
                let moved: Vec<_> = before.iter().zip(&after).filter(|(a, b)| a != b).collect();
                let to_new = moved.iter().filter(|(_, b)| **b == added.key).count();
                let elsewhere = moved.len() - to_new;
                let share = to_new as f64 / f64::from(CLIENTS);
                assert!(
                    (share - 1.0 / n as f64).abs() <= 0.01,
                    "n={n} added {}: new backend got {:.2}%",
                    added.id,
                    share * 100.0
                );
                assert!(
                    elsewhere <= CLIENTS as usize / 100,
                    "n={n} added {}: {elsewhere} clients moved between old backends",
                    added.id
                );
            }
        }
    }

    #[test]
    fn weight_zero_is_left_out() {
        let ks = keys(3);
        let table = build_table(&backends(&ks, &[1, 0, 1]), 7).expect("valid table");
        assert!(table.iter().all(|&id| id == 0 || id == 2));
        assert!(table.contains(&0) && table.contains(&2));
    }

    #[test]
    fn empty_set_means_no_backend() {
        assert_eq!(
            build_table(&[], 13).expect("valid size"),
            vec![NO_BACKEND; 13]
        );
        let ks = keys(2);
        let table = build_table(&backends(&ks, &[0, 0]), 13).expect("valid size");
        assert_eq!(table, vec![NO_BACKEND; 13]);
    }

    #[test]
    fn bad_input_is_rejected() {
        for size in [0, 1, 2, 4, 65_536, MAX_TABLE_SIZE + 2] {
            assert!(build_table(&[], size).is_err(), "size {size} accepted");
        }
        let err = build_table(&[], 65_536).unwrap_err().to_string();
        assert!(err.contains("65536") && err.contains("not prime"), "{err}");
        let dup = [
            MaglevBackend {
                id: 1,
                key: &[1, 2, 3, 4],
                weight: 1,
            },
            MaglevBackend {
                id: 2,
                key: &[1, 2, 3, 4],
                weight: 1,
            },
        ];
        let err = build_table(&dup, 7).unwrap_err().to_string();
        assert!(err.contains("same key"), "{err}");
    }

    #[test]
    fn primes() {
        assert!(is_prime(65_537));
        assert!(!is_prime(65_536));
        assert!(is_prime(2));
        assert!(is_prime(3));
        assert!(!is_prime(1));
        assert!(!is_prime(0));
        assert!(!is_prime(9));
        assert!(is_prime(MAX_TABLE_SIZE));
        assert!(is_prime(4_294_967_291));
    }
}
