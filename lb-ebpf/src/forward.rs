//! Forwarding: layer-2 direct server return.

use aya_ebpf::programs::XdpContext;
use lb_common::Backend;

use crate::parse::ptr_at;

/// Rewrites the Ethernet addresses so the frame goes to `backend` and looks
/// like it came from us. The source must be our own MAC: a backend's MAC as
/// source would poison the bridge's forwarding table.
#[inline(always)]
pub fn dsr_l2(ctx: &XdpContext, backend: &Backend, own_mac: &[u8; 6]) -> bool {
    write_macs(ctx, backend, own_mac)
}

/// Writes the frame's destination MAC (`backend.mac`, its next hop) and
/// source MAC (`src`) at the head of the frame.
#[inline(always)]
pub fn write_macs(ctx: &XdpContext, backend: &Backend, src: &[u8; 6]) -> bool {
    let Some(macs) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return false;
    };
    // Copied through a volatile read: a plain copy from the map value to the
    // frame becomes a call to a byte-loop `memmove` (LLVM cannot rule out
    // that the two overlap, and expands only `memcpy` inline on BPF).
    // SAFETY: `backend` is a valid reference.
    let dst = unsafe { core::ptr::read_volatile(&backend.mac) };
    let mut out = [0u8; 12];
    out[..6].copy_from_slice(&dst);
    out[6..].copy_from_slice(src);
    // SAFETY: ptr_at checked the 12 bytes are inside the frame.
    unsafe { macs.write_unaligned(out) };
    true
}
