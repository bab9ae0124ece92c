//! Batched reads and writes of BPF maps: `BPF_MAP_LOOKUP_BATCH` and
//! `BPF_MAP_UPDATE_BATCH` (kernel ≥ 5.6 for arrays and hashes), which aya
//! 0.14 does not wrap. One syscall moves a whole Maglev table (65537 slots)
//! or the whole backend array, where per-element calls took ~0.1 s.

use std::os::fd::{AsFd, AsRawFd as _};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{Array, IterableMap as _, MapData},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Linux-internal "operation not supported" (not in libc): what a map type
/// without batch ops answers.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Debug, Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const _: () = assert!(size_of::<BatchAttr>() == 56);

/// Why a batch failed.
#[derive(Debug)]
pub enum BatchError {
    /// This kernel or map type has no batch ops (EINVAL, ENOTSUPP, EOPNOTSUPP):
    /// nothing was done; per-element calls still work.
    Unsupported(std::io::Error),
    /// The kernel refused the batch after `done` elements.
    Failed {
        /// Elements written or read before the failure.
        done: usize,
        /// The kernel's error.
        error: std::io::Error,
    },
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unsupported(e) => write!(f, "batch map operations not supported: {e}"),
            Self::Failed { done, error } => {
                write!(
                    f,
                    "batch map operation failed after {done} elements: {error}"
                )
            }
        }
    }
}

impl std::error::Error for BatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unsupported(e) | Self::Failed { error: e, .. } => Some(e),
        }
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: attr is a live bpf_attr batch member of the size passed; the
    // pointers in it are checked by the callers to cover `count` elements.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

fn fd_u32(map: &impl AsFd) -> u32 {
    // A descriptor is never negative; a borrowed one is valid by construction.
    u32::try_from(map.as_fd().as_raw_fd()).unwrap_or(u32::MAX)
}

/// Writes `values[i]` at `keys[i]` for every i, in one syscall. The map's
/// key and value sizes must be those of `K` and `V` (the typed aya handle
/// the descriptor comes from checked that).
pub fn update<K: Pod, V: Pod>(map: &impl AsFd, keys: &[K], values: &[V]) -> Result<(), BatchError> {
    let n = keys.len().min(values.len());
    if n == 0 {
        return Ok(());
    }
    let count = u32::try_from(n)
        .map_err(|_| BatchError::Unsupported(std::io::Error::from_raw_os_error(libc::E2BIG)))?;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: fd_u32(map),
        ..BatchAttr::default()
    };
    match sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(()) => Ok(()),
        // The kernel reports how far it got; none done + EINVAL means the
        // command itself was refused, not an element.
        Err(e) if attr.count == 0 && unsupported(&e) => Err(BatchError::Unsupported(e)),
        Err(error) => Err(BatchError::Failed {
            done: attr.count as usize,
            error,
        }),
    }
}

/// Deletes `keys` from a hash (or LRU hash) map, a batch at a time where
/// the kernel has batch ops; keys already gone (evicted, deleted by the
/// kernel or another writer) are skipped. Returns how many were deleted.
pub fn delete_keys<K: Pod, V: Pod>(
    map: &mut aya::maps::HashMap<MapData, K, V>,
    keys: &[K],
) -> anyhow::Result<usize> {
    let mut deleted = 0;
    let mut start = 0;
    while start < keys.len() {
        let rest = &keys[start..];
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: u32::try_from(rest.len()).unwrap_or(u32::MAX),
            map_fd: fd_u32(map.map().fd()),
            ..BatchAttr::default()
        };
        let result = sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let done = (attr.count as usize).min(rest.len());
        match result {
            Ok(()) => return Ok(deleted + done),
            // The kernel stops at the first key that is not there.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                deleted += done;
                start += done + 1;
            }
            Err(e) if done == 0 && unsupported(&e) => {
                warn_fallback(&e);
                for key in rest {
                    match map.remove(key) {
                        Ok(()) => deleted += 1,
                        Err(aya::maps::MapError::SyscallError(e))
                            if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e).context("deleting a map element"),
                    }
                }
                return Ok(deleted);
            }
            Err(error) => {
                return Err(anyhow::Error::new(BatchError::Failed {
                    done: deleted + done,
                    error,
                }));
            }
        }
    }
    Ok(deleted)
}

/// Writes `values[i]` at `keys[i]` of a hash (or LRU hash) map, a batch at
/// a time where the kernel has batch ops. An element the kernel refuses
/// because the map is full (E2BIG, ENOMEM) is skipped; returns how many
/// were written and how many were skipped.
pub fn update_keys<K: Pod, V: Pod>(
    map: &mut aya::maps::HashMap<MapData, K, V>,
    keys: &[K],
    values: &[V],
) -> anyhow::Result<(usize, usize)> {
    let n = keys.len().min(values.len());
    let (mut written, mut skipped) = (0, 0);
    let mut start = 0;
    while start < n {
        match update(map.map().fd(), &keys[start..n], &values[start..n]) {
            Ok(()) => return Ok((written + n - start, skipped)),
            Err(BatchError::Failed { done, error })
                if matches!(error.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)) =>
            {
                written += done;
                skipped += 1;
                start += done + 1;
            }
            Err(BatchError::Unsupported(e)) => {
                warn_fallback(&e);
                for (k, v) in keys[start..n].iter().zip(&values[start..n]) {
                    match map.insert(*k, *v, 0) {
                        Ok(()) => written += 1,
                        Err(aya::maps::MapError::SyscallError(e))
                            if matches!(
                                e.io_error.raw_os_error(),
                                Some(libc::E2BIG | libc::ENOMEM)
                            ) =>
                        {
                            skipped += 1;
                        }
                        Err(e) => return Err(e).context("writing a map element"),
                    }
                }
                return Ok((written, skipped));
            }
            Err(e) => return Err(anyhow::Error::new(e)),
        }
    }
    Ok((written, skipped))
}

/// Reads `out.len()` consecutive elements of an array map starting at index
/// `start`, in one syscall. `V` must be the map's value type.
pub fn lookup_array<V: Pod>(map: &impl AsFd, start: u32, out: &mut [V]) -> Result<(), BatchError> {
    if out.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(out.len())
        .map_err(|_| BatchError::Unsupported(std::io::Error::from_raw_os_error(libc::E2BIG)))?;
    let mut keys = vec![0u32; out.len()];
    // in_batch is the key *before* the first one returned; for an array the
    // key after any index past its end (u32::MAX here) is 0.
    let in_batch: u32 = start.wrapping_sub(1);
    let mut out_batch: u32 = 0;
    let mut attr = BatchAttr {
        in_batch: std::ptr::from_ref(&in_batch) as u64,
        out_batch: std::ptr::from_mut(&mut out_batch) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: out.as_mut_ptr() as u64,
        count,
        map_fd: fd_u32(map),
        ..BatchAttr::default()
    };
    let result = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
    let done = attr.count as usize;
    match result {
        // ENOENT: the end of the map was reached, after `done` elements.
        Ok(()) | Err(_) if done == out.len() => {}
        Err(e) if done == 0 && unsupported(&e) => return Err(BatchError::Unsupported(e)),
        Ok(()) => {
            return Err(BatchError::Failed {
                done,
                error: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Err(error) => return Err(BatchError::Failed { done, error }),
    }
    // Array keys come back in order; a gap would mean a misread.
    if keys
        .iter()
        .enumerate()
        .any(|(i, k)| *k != start.wrapping_add(i as u32))
    {
        return Err(BatchError::Failed {
            done: 0,
            error: std::io::Error::other("batch lookup returned keys out of order"),
        });
    }
    Ok(())
}

static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn warn_fallback(e: &std::io::Error) {
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            error = %e,
            "this kernel refuses batched map operations; falling back to one bpf() call per \
             element (a Maglev table then takes ~0.1 s to write)"
        );
    }
}

/// Writes `values[i]` at index `keys[i]` of `array` in one syscall, or one
/// per element where the kernel has no batch ops (warned once).
pub fn update_array<V: Pod>(
    array: &mut Array<MapData, V>,
    keys: &[u32],
    values: &[V],
) -> anyhow::Result<()> {
    match update(array.map().fd(), keys, values) {
        Ok(()) => Ok(()),
        Err(BatchError::Unsupported(e)) => {
            warn_fallback(&e);
            for (k, v) in keys.iter().zip(values) {
                array
                    .set(*k, v, 0)
                    .with_context(|| format!("writing index {k}"))?;
            }
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e)),
    }
}

/// Reads `out.len()` elements of `array` from index `start` in one syscall,
/// or one per element where the kernel has no batch ops (warned once).
pub fn read_array<V: Pod>(
    array: &Array<MapData, V>,
    start: u32,
    out: &mut [V],
) -> anyhow::Result<()> {
    match lookup_array(array.map().fd(), start, out) {
        Ok(()) => Ok(()),
        Err(BatchError::Unsupported(e)) => {
            warn_fallback(&e);
            for (i, slot) in out.iter_mut().enumerate() {
                let index = start
                    .checked_add(u32::try_from(i).context("index overflows u32")?)
                    .context("index overflows u32")?;
                *slot = array
                    .get(&index, 0)
                    .with_context(|| format!("reading index {index}"))?;
            }
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e)),
    }
}

/// Elements fetched per `BPF_MAP_LOOKUP_BATCH` of a hash map.
const HASH_CHUNK: usize = 4096;

/// Every element of a hash (or LRU hash) map, collected; see [`visit_hash`].
pub fn read_hash<K: Pod + Eq + std::hash::Hash, V: Pod>(
    map: &aya::maps::HashMap<MapData, K, V>,
) -> anyhow::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    visit_hash(map, |k, v| {
        out.push((k, v));
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f` on every element of a hash (or LRU hash) map, read with
/// `BPF_MAP_LOOKUP_BATCH` a chunk at a time (or one key at a time where the
/// kernel has no batch ops, warned once), so a walk of a map of millions of
/// sessions holds one chunk in memory, not the map. Concurrent updates may
/// or may not be seen, as with any walk of a live hash map; no element
/// present throughout is missed.
pub fn visit_hash<K: Pod + Eq + std::hash::Hash, V: Pod>(
    map: &aya::maps::HashMap<MapData, K, V>,
    mut f: impl FnMut(K, V) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut cursor = HashCursor::new();
    while let Some(chunk) = cursor.next_chunk(map)? {
        for (k, v) in chunk {
            f(k, v)?;
        }
    }
    Ok(())
}

/// A walk of a hash (or LRU hash) map that can stop between chunks and go
/// on later: what lets the owner serve its mailbox in the middle of a walk
/// of millions of sessions. Between chunks the map may change; as with
/// [`visit_hash`], no element present throughout the walk is missed.
#[derive(Debug)]
pub struct HashCursor<K, V> {
    /// The kernel's batch token (a bucket index) where the next chunk starts.
    token: Option<u32>,
    chunk: usize,
    seen: usize,
    done: bool,
    /// Where the kernel has no batch ops: the whole map, read at once.
    fallback: Option<std::vec::IntoIter<(K, V)>>,
}

impl<K: Pod + Eq + std::hash::Hash, V: Pod> Default for HashCursor<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Pod + Eq + std::hash::Hash, V: Pod> HashCursor<K, V> {
    /// A walk from the start of the map.
    pub fn new() -> Self {
        Self {
            token: None,
            chunk: HASH_CHUNK,
            seen: 0,
            done: false,
            fallback: None,
        }
    }

    /// Elements returned so far.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// The next chunk (at most [`HASH_CHUNK`] elements, more if one bucket
    /// holds more), or `None` once the walk reached the end of the map.
    pub fn next_chunk(
        &mut self,
        map: &aya::maps::HashMap<MapData, K, V>,
    ) -> anyhow::Result<Option<Vec<(K, V)>>> {
        if let Some(rest) = &mut self.fallback {
            let chunk: Vec<(K, V)> = rest.by_ref().take(HASH_CHUNK).collect();
            self.seen += chunk.len();
            return Ok((!chunk.is_empty()).then_some(chunk));
        }
        if self.done {
            return Ok(None);
        }
        let fd = map.map().fd();
        loop {
            let chunk = self.chunk;
            // SAFETY: K and V are Pod: any bit pattern (zeroes included) is valid.
            let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
            // SAFETY: as above.
            let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
            let in_batch = self.token.unwrap_or(0);
            let mut out_batch: u32 = 0;
            let mut attr = BatchAttr {
                in_batch: if self.token.is_some() {
                    std::ptr::from_ref(&in_batch) as u64
                } else {
                    0
                },
                out_batch: std::ptr::from_mut(&mut out_batch) as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: u32::try_from(chunk).unwrap_or(u32::MAX),
                map_fd: fd_u32(fd),
                ..BatchAttr::default()
            };
            let result = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let done = (attr.count as usize).min(chunk);
            match result {
                Ok(()) => self.token = Some(out_batch),
                // The end of the map, after `done` elements.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.done = true,
                // One bucket holds more elements than the chunk: retry bigger.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < (1 << 20) => {
                    self.chunk = (chunk * 2).max(HASH_CHUNK);
                    continue;
                }
                Err(e) if self.seen == 0 && self.token.is_none() && unsupported(&e) => {
                    warn_fallback(&e);
                    let mut all = Vec::new();
                    for entry in map.iter() {
                        all.push(entry.context("reading a map element")?);
                    }
                    self.fallback = Some(all.into_iter());
                    return self.next_chunk(map);
                }
                Err(error) => {
                    return Err(anyhow::Error::new(BatchError::Failed {
                        done: self.seen + done,
                        error,
                    }));
                }
            }
            self.seen += done;
            keys.truncate(done);
            values.truncate(done);
            if done == 0 && self.done {
                return Ok(None);
            }
            return Ok(Some(keys.into_iter().zip(values).collect()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd as _, OwnedFd};

    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;

    /// `union bpf_attr` for BPF_MAP_CREATE, up to `map_flags`.
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }

    /// A fresh map, or None without the rights to create one (not root).
    fn create(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> Option<OwnedFd> {
        let mut attr = CreateAttr {
            map_type,
            key_size,
            value_size,
            max_entries,
            map_flags: 0,
        };
        // SAFETY: attr is a live BPF_MAP_CREATE attr of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                std::ptr::from_mut(&mut attr).cast::<libc::c_void>(),
                size_of::<CreateAttr>(),
            )
        };
        if fd < 0 {
            eprintln!(
                "skipping: cannot create a BPF map ({})",
                std::io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: the kernel returned a new descriptor that we now own.
        Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// A fresh array map of `value_size` values, or None (not root).
    fn array(value_size: u32, max_entries: u32) -> Option<OwnedFd> {
        create(BPF_MAP_TYPE_ARRAY, 4, value_size, max_entries)
    }

    /// A fresh hash map of u32 to u32 through aya, or None (not root).
    fn hash(max_entries: u32) -> Option<aya::maps::HashMap<MapData, u32, u32>> {
        let fd = create(BPF_MAP_TYPE_HASH, 4, 4, max_entries)?;
        let data = MapData::from_fd(fd).expect("map data");
        Some(aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("a hash map"))
    }

    /// A cursor made any way (new or default) walks the whole map in
    /// bounded chunks and ends; deletes between chunks lose nothing else.
    #[test]
    fn a_cursor_walks_a_hash_map_in_chunks_and_ends() {
        let Some(mut map) = hash(20_000) else { return };
        let keys: Vec<u32> = (0..10_000).collect();
        let values: Vec<u32> = keys.iter().map(|k| k ^ 0x5a5a).collect();
        update(map.map().fd(), &keys, &values).expect("batch update");
        for mut cursor in [HashCursor::default(), HashCursor::new()] {
            let mut seen = std::collections::HashMap::new();
            let mut chunks = 0;
            while let Some(chunk) = cursor.next_chunk(&map).expect("a chunk") {
                assert!(!chunk.is_empty() && chunk.len() <= HASH_CHUNK * 2);
                chunks += 1;
                assert!(chunks < 100, "the walk does not end");
                seen.extend(chunk);
            }
            assert_eq!(seen.len(), 10_000);
            assert!(seen.iter().all(|(k, v)| *v == k ^ 0x5a5a));
            assert!(cursor.next_chunk(&map).expect("after the end").is_none());
        }
        let odd: Vec<u32> = (0..10_000).filter(|k| k % 2 == 1).collect();
        assert_eq!(delete_keys(&mut map, &odd).expect("delete"), 5_000);
        // Already gone: skipped, not an error.
        assert_eq!(delete_keys(&mut map, &odd[..10]).expect("delete again"), 0);
        let left = read_hash(&map).expect("read");
        assert_eq!(left.len(), 5_000);
        assert!(left.iter().all(|(k, _)| k % 2 == 0));
    }

    #[test]
    fn update_then_lookup_round_trips_a_range() {
        let Some(map) = array(4, 1000) else { return };
        let keys: Vec<u32> = (100..400).collect();
        let values: Vec<u32> = keys.iter().map(|k| k * 7 + 1).collect();
        update(&map, &keys, &values).expect("batch update");

        // A window straddling the written range: zeros around it.
        let mut out = vec![u32::MAX; 500];
        lookup_array(&map, 0, &mut out).expect("batch lookup from 0");
        for (i, v) in out.iter().enumerate() {
            let want = if (100..400).contains(&(i as u32)) {
                i as u32 * 7 + 1
            } else {
                0
            };
            assert_eq!(*v, want, "slot {i}");
        }
        let mut tail = vec![u32::MAX; 3];
        lookup_array(&map, 397, &mut tail).expect("batch lookup from 397");
        assert_eq!(tail, [397 * 7 + 1, 398 * 7 + 1, 399 * 7 + 1, 0][..3]);
        // Up to the very last slot of the map.
        let mut end = vec![u32::MAX; 10];
        lookup_array(&map, 990, &mut end).expect("batch lookup to the end");
        assert_eq!(end, vec![0; 10]);
    }

    #[test]
    fn reading_past_the_end_fails() {
        let Some(map) = array(4, 10) else { return };
        let mut out = vec![0u32; 5];
        match lookup_array(&map, 8, &mut out) {
            Err(BatchError::Failed { done: 2, .. }) => {}
            other => panic!("expected a short read of 2, got {other:?}"),
        }
    }

    #[test]
    fn an_index_out_of_range_stops_the_update_where_it_failed() {
        let Some(map) = array(4, 10) else { return };
        match update(&map, &[1u32, 2, 10, 3], &[5u32, 6, 7, 8]) {
            Err(BatchError::Failed { done: 2, error }) => {
                assert_eq!(error.raw_os_error(), Some(libc::E2BIG), "{error}");
            }
            other => panic!("expected failure after 2 elements, got {other:?}"),
        }
        let mut out = vec![0u32; 4];
        lookup_array(&map, 0, &mut out).expect("lookup");
        assert_eq!(out, [0, 5, 6, 0]);
    }

    #[test]
    fn records_wider_than_a_word_keep_their_stride() {
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        struct Rec {
            a: [u32; 4],
            b: [u8; 6],
            c: u16,
            d: u32,
        }
        // SAFETY: plain data, no padding (28 bytes), every bit pattern valid.
        unsafe impl aya::Pod for Rec {}
        let Some(map) = array(size_of::<Rec>() as u32, 64) else {
            return;
        };
        let recs: Vec<Rec> = (0..64u32)
            .map(|i| Rec {
                a: [i, i + 1, i + 2, i + 3],
                b: [i as u8; 6],
                c: i as u16 * 3,
                d: !i,
            })
            .collect();
        let keys: Vec<u32> = (0..64).collect();
        update(&map, &keys, &recs).expect("update");
        let mut out = vec![Rec::default(); 64];
        lookup_array(&map, 0, &mut out).expect("lookup");
        assert_eq!(out, recs);
    }
}
