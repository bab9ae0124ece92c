//! The outcome of one frame: an XDP action and the counter that explains it.

use aya_ebpf::bindings::xdp_action;

/// An XDP action plus the `lb_common::stat` index counted for it.
#[derive(Clone, Copy)]
pub struct Verdict {
    /// `XDP_PASS`, `XDP_DROP` or `XDP_TX`.
    pub action: u32,
    /// Index into the global stats map.
    pub reason: u32,
}

impl Verdict {
    /// Hand the frame to the kernel stack untouched.
    #[inline(always)]
    pub const fn pass(reason: u32) -> Self {
        Self {
            action: xdp_action::XDP_PASS,
            reason,
        }
    }

    /// Discard the frame.
    #[inline(always)]
    pub const fn drop(reason: u32) -> Self {
        Self {
            action: xdp_action::XDP_DROP,
            reason,
        }
    }

    /// Send the (rewritten) frame back out of the interface it came in on.
    #[inline(always)]
    pub const fn tx(reason: u32) -> Self {
        Self {
            action: xdp_action::XDP_TX,
            reason,
        }
    }
}
