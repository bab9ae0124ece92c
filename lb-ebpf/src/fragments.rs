//! The fragment map: a first fragment records its ports so the later
//! fragments of its datagram, which carry none, reach the same service.

use lb_common::{FragmentKey, FragmentPorts};

use crate::{maps::FRAGMENTS, parse::Packet};

#[inline(always)]
fn key(pkt: &Packet) -> FragmentKey {
    FragmentKey {
        family: pkt.family,
        proto: pkt.proto,
        _pad: 0,
        id: pkt.id,
        src: pkt.src,
        dst: pkt.dst,
    }
}

/// Records a first fragment's ports under its datagram's identity. A
/// resent first fragment (or a reused id) overwrites the entry; entries are
/// never deleted here, since fragments may arrive reordered or duplicated
/// after the last one: the LRU ages them out. A failed insert is not
/// counted apart: the later fragments then show as `PASS_FRAGMENT_UNSEEN`.
#[inline(always)]
pub fn record(pkt: &Packet) {
    let ports = FragmentPorts {
        sport: pkt.sport,
        dport: pkt.dport,
    };
    let _ = FRAGMENTS.insert(key(pkt), ports, 0);
}

/// The destination port (wire order) the first fragment of `pkt`'s datagram
/// recorded, if it was seen.
#[inline(always)]
pub fn dport(pkt: &Packet) -> Option<u16> {
    FRAGMENTS.get_ptr(key(pkt)).map(|p| {
        // SAFETY: map value pointer, valid for this program run.
        unsafe { (*p).dport }
    })
}
