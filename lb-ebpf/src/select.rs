//! Backend choice: the affinity map first, Maglev on a miss.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use lb_common::{
    ADMIT_WINDOW_NS, Affinity, AffinityKey, BACKEND_ACTIVE, BACKEND_DRAINING, Backend,
    MAGLEV_PROBES, RESERVED_BACKEND_ID, SERVICE_F_PROTECTED, Service, client_hash, mask_addr, stat,
};

use crate::{
    maps::{ADMISSION, AFFINITY, BACKENDS, MAGLEV, PROTECTED},
    stats::count,
    verdict::Verdict,
};

/// The backend a frame goes to and how it was chosen.
pub struct Choice {
    /// Backend id.
    pub id: u32,
    /// The backend record.
    pub backend: *const Backend,
    /// `stat::AFFINITY_HIT`, `AFFINITY_HIT_PROTECTED`, `NEW_SESSION`,
    /// `RESELECT_EXPIRED`, `RESELECT_DOWN` or `RESELECT_FOREIGN`.
    pub reason: u32,
}

impl Choice {
    /// Whether the frame started or re-selected a session (not a hit).
    #[inline(always)]
    pub fn is_new(&self) -> bool {
        self.reason != stat::AFFINITY_HIT && self.reason != stat::AFFINITY_HIT_PROTECTED
    }
}

/// Finds the client's backend, creating or rewriting its affinity entry
/// when needed. An entry is rewritten here, at once, when it expired, its
/// backend went down, or its backend belongs to another service (an id
/// reused while the entry lived): the kernel never keeps sending a client to
/// a dead or foreign backend while userspace catches up.
///
/// A client has its entry in one of two maps: the LRU, or (when its backend
/// differs from the Maglev answer, which userspace moved there) the
/// protected map, looked at only on an LRU miss of a service that has
/// protected sessions. A hit costs what it did before protection existed.
#[inline(always)]
pub fn choose(svc: &Service, src: &[u32; 4]) -> Result<Choice, Verdict> {
    let key = AffinityKey {
        service_id: svc.id,
        addr: mask_addr(src, &svc.mask),
    };
    // The coarse clock (CLOCK_MONOTONIC_COARSE, tick resolution) is enough for
    // timeouts of seconds and is cheaper than reading the clock source.
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };

    let (entry, hit) = match AFFINITY.get_ptr_mut(key) {
        Some(entry) => (Some(entry), stat::AFFINITY_HIT),
        None if svc.flags & SERVICE_F_PROTECTED != 0 => {
            (PROTECTED.get_ptr_mut(key), stat::AFFINITY_HIT_PROTECTED)
        }
        None => (None, stat::AFFINITY_HIT),
    };
    let reason = match entry {
        Some(entry) => {
            // SAFETY: map value pointer, valid for this program run.
            let entry = unsafe { &mut *entry };
            let idle = now.saturating_sub(entry.last_seen_ns);
            if idle > svc.timeout_ns {
                stat::RESELECT_EXPIRED
            } else {
                match usable_for_existing(entry.backend_id, svc.id) {
                    Ok(backend) => {
                        // Coarse refresh: most hits only read the entry.
                        if idle > svc.refresh_ns {
                            entry.last_seen_ns = now;
                        }
                        return Ok(Choice {
                            id: entry.backend_id,
                            backend,
                            reason: hit,
                        });
                    }
                    Err(reason) => reason,
                }
            }
        }
        None => stat::NEW_SESSION,
    };

    let (id, backend) = maglev(svc, &key.addr)?;
    match entry {
        Some(entry) => {
            // SAFETY: as above; rewriting in place avoids an LRU allocation
            // (a protected entry stays protected until userspace sweeps it).
            let entry = unsafe { &mut *entry };
            entry.backend_id = id;
            entry.last_seen_ns = now;
        }
        None if !admit(svc, now) => {
            // The client still gets its Maglev answer, which is what an
            // entry would record; only a later table change could move it.
            count(stat::AFFINITY_ADMISSION_SKIPPED);
        }
        None => {
            let value = Affinity {
                backend_id: id,
                _pad: 0,
                last_seen_ns: now,
            };
            // NOEXIST: another CPU may have recorded this client since the
            // lookup (with another answer across a table flip); the first
            // record wins, so one client never has two backends.
            match AFFINITY.insert(key, value, u64::from(BPF_NOEXIST)) {
                Ok(()) => count(stat::AFFINITY_ADMITTED),
                Err(EEXIST) => {
                    count(stat::AFFINITY_INSERT_RACE);
                    if let Some(won) = AFFINITY.get_ptr(key) {
                        // SAFETY: map value pointer, valid for this program run.
                        let won = unsafe { (*won).backend_id };
                        if let Ok(backend) = usable_for_existing(won, svc.id) {
                            return Ok(Choice {
                                id: won,
                                backend,
                                reason,
                            });
                        }
                    }
                }
                Err(_) => count(stat::AFFINITY_INSERT_FAILED),
            }
        }
    }
    Ok(Choice {
        id,
        backend,
        reason,
    })
}

/// The backend `src`'s traffic would go to now, without touching the maps:
/// its affinity entry if that would be used as is (not expired, backend
/// usable and of this service), else the Maglev answer. For frames about a
/// session rather than of it (ICMP errors), which must not create one.
#[inline(always)]
pub fn peek(svc: &Service, src: &[u32; 4]) -> Result<(u32, *const Backend), Verdict> {
    let key = AffinityKey {
        service_id: svc.id,
        addr: mask_addr(src, &svc.mask),
    };
    let entry = match AFFINITY.get_ptr(key) {
        Some(entry) => Some(entry),
        None if svc.flags & SERVICE_F_PROTECTED != 0 => PROTECTED.get_ptr(key),
        None => None,
    };
    if let Some(entry) = entry {
        // SAFETY: map value pointer, valid for this program run.
        let entry = unsafe { &*entry };
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        if now.saturating_sub(entry.last_seen_ns) <= svc.timeout_ns {
            let id = entry.backend_id;
            if let Ok(backend) = usable_for_existing(id, svc.id) {
                return Ok((id, backend));
            }
        }
    }
    maglev(svc, &key.addr)
}

/// Takes one unit of the service's admission budget on this CPU; false when
/// the window's budget is spent. Per CPU, so no atomics: the budget is per
/// CPU, as Katran's new-connection cap is, and a flood spread over all
/// queues gets `ncpus` budgets. Keeps one flooded service from turning the
/// shared LRU over faster than the budget allows.
#[inline(always)]
fn admit(svc: &Service, now: u64) -> bool {
    let budget = svc.admit_per_window;
    if budget == 0 {
        return true;
    }
    let Some(window) = ADMISSION.get_ptr_mut(svc.id) else {
        return true;
    };
    // SAFETY: per-CPU map value pointer, valid for this program run; XDP
    // runs with preemption off, so nothing else on this CPU touches it.
    let window = unsafe { &mut *window };
    if now.wrapping_sub(window.window_start_ns) >= ADMIT_WINDOW_NS {
        window.window_start_ns = now;
        window.admitted = 0;
    }
    if window.admitted >= budget {
        return false;
    }
    window.admitted += 1;
    true
}

/// `-EEXIST` as the map helpers return it.
const EEXIST: i32 = -17;

/// An existing session keeps its backend while it is active or draining and
/// belongs to the session's service; otherwise the re-selection reason.
/// Id 0 is never assigned, so its slot is empty (state `BACKEND_EMPTY`) and
/// fails the state test without a comparison of its own on the hit path.
#[inline(always)]
fn usable_for_existing(id: u32, service_id: u32) -> Result<*const Backend, u32> {
    let backend = BACKENDS.get_ptr(id).ok_or(stat::RESELECT_DOWN)?;
    // SAFETY: map value pointer, valid for this program run.
    let b = unsafe { &*backend };
    if b.state != BACKEND_ACTIVE && b.state != BACKEND_DRAINING {
        return Err(stat::RESELECT_DOWN);
    }
    // The record carries its owner: no extra lookup to check membership.
    if u32::from(b.service_id) != service_id {
        return Err(stat::RESELECT_FOREIGN);
    }
    Ok(backend)
}

/// Looks the client up in the service's live Maglev table. If the slot names
/// a backend that is not active (userspace has not rebuilt the table yet),
/// the next slots are probed, a bounded number of times.
#[inline(always)]
fn maglev(svc: &Service, masked: &[u32; 4]) -> Result<(u32, *const Backend), Verdict> {
    let size = svc.table_size;
    if size == 0 {
        return Err(Verdict::drop(stat::DROP_NO_BACKEND));
    }
    let base = if svc.active_slot == 0 {
        svc.maglev_base[0]
    } else {
        svc.maglev_base[1]
    };
    let mut slot = client_hash(masked) % size;
    for probe in 0..MAGLEV_PROBES {
        // 0 is what a never-written slot reads: never a backend, even
        // while a dataplane pinned by an older xlb still holds one there.
        let id = MAGLEV
            .get(base.wrapping_add(slot))
            .map_or(RESERVED_BACKEND_ID, |id| *id);
        if id != RESERVED_BACKEND_ID {
            if let Some(backend) = BACKENDS.get_ptr(id) {
                // SAFETY: map value pointer, valid for this program run.
                if unsafe { (*backend).state } == BACKEND_ACTIVE {
                    if probe > 0 {
                        count(stat::MAGLEV_PROBED);
                    }
                    return Ok((id, backend));
                }
            }
        }
        slot += 1;
        if slot >= size {
            slot = 0;
        }
    }
    Err(Verdict::drop(stat::DROP_NO_BACKEND))
}
