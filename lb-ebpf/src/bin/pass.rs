//! `xlb_pass`: returns XDP_PASS for every frame.
//!
//! Two uses: native XDP_TX on a veth delivers only if the peer veth has an
//! XDP program attached, and benchmarks need an empty program as the floor.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Passes every frame to the stack.
#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

lb_ebpf::program_boilerplate!();
