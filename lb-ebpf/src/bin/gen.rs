//! `xlb_gen`: the traffic generator's per-frame step, run by
//! BPF_PROG_TEST_RUN in live-frames mode. Live-frame pages are reused
//! without reset (they come back holding whatever the receiver wrote into
//! them), so every frame gets its MACs, EtherType and source address
//! rewritten here: the low 16 bits of the source cycle through
//! `XLB_GEN_CLIENTS` clients. (A receiver that encapsulates writes its outer
//! header over the original Ethernet header, EtherType included; the inner
//! IPv4 header after it is left as it was.)
//! XDP_TX sends the frame out of the ingress device of the test run.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

/// Number of distinct client addresses to cycle through (set at load time).
#[unsafe(no_mangle)]
static XLB_GEN_CLIENTS: Global<u32> = Global::new(256);

/// Destination then source MAC of every frame (set at load time).
#[unsafe(no_mangle)]
static XLB_GEN_MACS: Global<[u8; 12]> = Global::new([0; 12]);

/// Frames generated so far on this CPU (also the client counter).
#[map(name = "XLB_GEN_SEQ")]
static SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// IPv4 source address offset in an untagged Ethernet frame.
const SRC_OFF: usize = 14 + 12;

/// EtherType offset in an Ethernet frame.
const ETHERTYPE_OFF: usize = 12;

/// Rewrites the client address and transmits.
#[xdp]
pub fn xlb_gen(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + SRC_OFF + 4 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let Some(seq) = SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU slot; the bounds check above covers the MACs and the
    // 4 address bytes.
    unsafe {
        (start as *mut [u8; 12]).write_unaligned(XLB_GEN_MACS.load());
        ((start + ETHERTYPE_OFF) as *mut [u8; 2]).write_unaligned(0x0800u16.to_be_bytes());
        let n = *seq;
        *seq = n.wrapping_add(1);
        let clients = XLB_GEN_CLIENTS.load().max(1);
        let host = (n % clients) as u16;
        let p = (start + SRC_OFF + 2) as *mut [u8; 2];
        p.write_unaligned(host.to_be_bytes());
    }
    xdp_action::XDP_TX
}

lb_ebpf::program_boilerplate!();
