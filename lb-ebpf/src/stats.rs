//! Per-CPU counters: no atomics needed, userspace sums the CPUs.

use crate::maps::{BACKEND_STATS, SERVICE_STATS, STATS};

/// Counts one frame under a global reason.
#[inline(always)]
pub fn count(reason: u32) {
    if let Some(c) = STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

/// Counts a forwarded frame for its service and backend.
#[inline(always)]
pub fn count_forward(service_id: u32, backend_id: u32, bytes: u64, new_session: bool) {
    let new = new_session as u64;
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            (*s).new_sessions += new;
        }
    }
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe {
            (*b).packets += 1;
            (*b).bytes += bytes;
            (*b).new_sessions += new;
        }
    }
}
