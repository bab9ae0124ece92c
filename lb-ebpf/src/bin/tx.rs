//! `xlb_tx`: the limit of the forwarding path, for benchmarks: swap the
//! MAC addresses and XDP_TX, with no parsing or lookups. xlb does the same
//! rewrite after its work, so the difference is the cost of that work.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Swaps source and destination MAC and transmits.
#[xdp]
pub fn xlb_tx(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    let macs = start as *mut [u8; 12];
    // SAFETY: the check above covers the 12 bytes.
    unsafe {
        let m = macs.read_unaligned();
        let mut out = [0u8; 12];
        out[..6].copy_from_slice(&m[6..]);
        out[6..].copy_from_slice(&m[..6]);
        macs.write_unaligned(out);
    }
    xdp_action::XDP_TX
}

lb_ebpf::program_boilerplate!();
