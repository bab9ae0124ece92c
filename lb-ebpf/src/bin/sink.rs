//! `xlb_sink`: the far end of the packet-rate bench. Counts every frame
//! that arrives and drops it, so only what really arrived is counted and
//! the stack spends nothing on it.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

/// Frames that arrived, per CPU.
#[map(name = "XLB_SINK_COUNT")]
static COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Counts and drops.
#[xdp]
pub fn xlb_sink(_ctx: XdpContext) -> u32 {
    if let Some(c) = COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

lb_ebpf::program_boilerplate!();
