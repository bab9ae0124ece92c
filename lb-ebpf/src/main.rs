//! xlb: sticky-session layer-4 load balancer, XDP program.
//!
//! Per frame: parse -> service lookup -> affinity (or Maglev) -> MAC rewrite
//! -> XDP_TX. Anything not addressed to a service passes untouched. Every
//! frame is counted under exactly one reason in `XLB_STATS_V2`.
#![no_std]
#![no_main]

mod encap;
mod forward;
mod fragments;
mod maps;
mod parse;
mod select;
mod stats;
mod verdict;

use aya_ebpf::{Global, macros::xdp, programs::XdpContext};
use lb_common::{Backend, FORWARD_IPIP, Service, ServiceKey, stat};

use crate::{
    maps::SERVICES,
    parse::{Fragment, ptr_at},
    verdict::Verdict,
};

/// Non-zero: log each new session (set at load time; off in production).
#[unsafe(no_mangle)]
static XLB_DEBUG: Global<u8> = Global::new(0);

/// The MAC of the interface we run on, set at load time by userspace.
#[unsafe(no_mangle)]
static XLB_IFACE_MAC: Global<[u8; 6]> = Global::new([0; 6]);

/// The XDP entry point.
#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let verdict = match process(&ctx) {
        Ok(v) | Err(v) => v,
    };
    stats::count(verdict.reason);
    verdict.action
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let own_mac = XLB_IFACE_MAC.load();
    let dst_mac = ptr_at::<[u8; 6]>(ctx, 0).ok_or(Verdict::drop(stat::DROP_TRUNCATED_ETH))?;
    // SAFETY: ptr_at checked the 6 bytes are inside the frame.
    if unsafe { dst_mac.read_unaligned() } != own_mac {
        // Frames for other hosts (flooded by a bridge) and multicast are not ours
        // even when addressed to a VIP: forwarding them would duplicate traffic.
        return Err(Verdict::pass(stat::PASS_OTHER_HOST));
    }

    let pkt = parse::parse(ctx)?;
    if pkt.too_big {
        return too_big(ctx, &pkt, &own_mac);
    }
    // A later fragment takes the port its first fragment recorded. Without
    // one it passes: the program has no set of VIPs, so it may be the
    // host's own fragmented traffic, which a drop would break; one meant for
    // a VIP ends in the LB's reassembly queue and times out there (the
    // datagram is lost either way, as its first fragment never came).
    let port = match pkt.fragment {
        Fragment::Later => {
            fragments::dport(&pkt).ok_or(Verdict::pass(stat::PASS_FRAGMENT_UNSEEN))?
        }
        Fragment::Whole | Fragment::First => pkt.dport,
    };
    let key = ServiceKey {
        addr: pkt.dst,
        port,
        proto: pkt.proto,
        family: pkt.family,
    };
    let svc = SERVICES
        .get_ptr(key)
        .ok_or(Verdict::pass(stat::PASS_NOT_SERVICE))?;
    let svc = &snapshot(svc);
    match pkt.fragment {
        Fragment::Whole => {}
        Fragment::First => {
            // Only for a service: other traffic never fills the map.
            fragments::record(&pkt);
            stats::count(stat::FRAGMENT);
        }
        Fragment::Later => stats::count(stat::FRAGMENT),
    }

    let choice = select::choose(svc, &pkt.src)?;
    // SAFETY: map value pointer from BACKENDS, valid for this program run.
    let backend = unsafe { &*choice.backend };
    if XLB_DEBUG.load() != 0 && choice.is_new() {
        aya_log_ebpf::debug!(
            ctx,
            "service {} backend {} reason {}",
            svc.id,
            choice.id,
            choice.reason
        );
    }

    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let verdict = send(ctx, svc, &pkt, backend, choice.id, &own_mac, choice.reason)?;
    stats::count_forward(svc.id, choice.id, bytes, choice.is_new());
    Ok(verdict)
}

/// Sends the frame to `backend` (id `id`) the service's way: a MAC rewrite
/// (layer-2 DSR) or IP-in-IP towards its next hop.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    svc: &Service,
    pkt: &parse::Packet,
    backend: &Backend,
    id: u32,
    own_mac: &[u8; 6],
    reason: u32,
) -> Result<Verdict, Verdict> {
    // A next hop userspace has not resolved yet reads all-zero.
    if backend.mac == [0u8; 6] {
        return Err(Verdict::drop(stat::DROP_NEXTHOP_UNRESOLVED));
    }
    if svc.forward_mode == FORWARD_IPIP {
        return encap::ipip(ctx, pkt, backend, id, own_mac, reason);
    }
    if !forward::dsr_l2(ctx, backend, own_mac) {
        return Err(Verdict::drop(stat::DROP_TRUNCATED_ETH));
    }
    Ok(Verdict::tx(reason))
}

/// Sends an ICMP "fragmentation needed" / "packet too big" about a service's
/// reply to the backend that sent it (with DSR the router returns it to the
/// VIP, that is to us), so the backend learns the path MTU. The backend is
/// the client's as the next packet would find it, but no session is created
/// or refreshed: an ICMP error is not client traffic. The frame is sent as
/// the service sends client frames (MACs rewritten, or encapsulated).
/// Not counted per service/backend, whose counters are the clients' traffic.
/// Anything that cannot be forwarded passes as other ICMP does.
#[inline(always)]
fn too_big(ctx: &XdpContext, pkt: &parse::Packet, own_mac: &[u8; 6]) -> Result<Verdict, Verdict> {
    let not_ours = Verdict::pass(stat::PASS_NOT_L4);
    let key = ServiceKey {
        addr: pkt.dst,
        port: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
    };
    let svc = SERVICES.get_ptr(key).ok_or(not_ours)?;
    let svc = &snapshot(svc);
    let (id, backend) = select::peek(svc, &pkt.src).map_err(|_| not_ours)?;
    // SAFETY: map value pointer from BACKENDS, valid for this program run.
    let backend = unsafe { &*backend };
    send(
        ctx,
        svc,
        pkt,
        backend,
        id,
        own_mac,
        stat::ICMP_TOO_BIG_FORWARDED,
    )
}

/// Copies a service record out of its map element once, so the whole packet
/// sees one record: userspace updates services back to back, and a freed
/// preallocated element is reused at once, so fields read later through the
/// map pointer could come from another service. Volatile word loads keep the
/// compiler from deferring reads to the element.
#[inline(always)]
fn snapshot(p: *const Service) -> Service {
    const WORDS: usize = core::mem::size_of::<Service>() / 8;
    let words = p as *const u64;
    let mut out = [0u64; WORDS];
    let mut i = 0;
    while i < WORDS {
        // SAFETY: p is a map value of size_of::<Service>() bytes, valid for
        // this run; hash map values are 8-byte aligned.
        out[i] = unsafe { core::ptr::read_volatile(words.add(i)) };
        i += 1;
    }
    // SAFETY: Service is repr(C), 64 bytes of integers (size asserted in
    // lb-common), so any bit pattern is a valid value.
    unsafe { core::mem::transmute::<[u64; WORDS], Service>(out) }
}

lb_ebpf::program_boilerplate!();
