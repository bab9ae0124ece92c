//! Keeps the backends' next hops current: resolves them through the
//! kernel's routes and neighbours every second, re-learns their MACs every
//! [`REFRESH_EVERY`] (a replaced NIC keeps its address but not its MAC, and
//! the kernel's own unicast re-probes to the old MAC take tens of seconds to
//! give up), and hands the owner a new set when anything changed.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::owner::Handle;
use crate::{
    dataplane::Hops,
    hops::{Target, to_hop},
    nexthop::{NextHop, Resolver},
};

/// How often every next hop is looked up.
pub const POLL: Duration = Duration::from_secs(1);
/// How often the MACs of resolved next hops are re-learned.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// What a re-learned entry needs to resolve again (measured: ~50 ms).
const SETTLE: Duration = Duration::from_millis(150);
/// At most one warning per target in this long.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Runs until aborted. `targets` follows the config; `ingress` is the
/// interface the program runs on; `initial` what the daemon started with.
pub async fn supervise(
    mut targets: watch::Receiver<Vec<Target>>,
    ingress: u32,
    initial: Hops,
    owner: Handle,
) {
    let resolver = match Resolver::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(
                "next hops will not be kept current (backend MAC changes are not followed): {e:#}"
            );
            return;
        }
    };
    let mut known: HashMap<IpAddr, NextHop> = HashMap::new();
    let mut sent = initial;
    let mut warned: HashMap<IpAddr, Instant> = HashMap::new();
    let mut last_refresh = Instant::now();
    // The owner publishes the targets from its own thread once it runs; a poll
    // before that would see none and withdraw every next hop the daemon
    // started with (all records zeroed, frames dropped until the next poll).
    match targets.has_changed() {
        Ok(true) => {}
        Ok(false) => {
            if targets.changed().await.is_err() {
                return;
            }
        }
        Err(_) => return,
    }
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let list: Vec<Target> = targets.borrow_and_update().clone();
        known.retain(|addr, _| list.iter().any(|t| t.addr == *addr));
        if last_refresh.elapsed() >= REFRESH_EVERY {
            last_refresh = Instant::now();
            let vias: BTreeSet<(IpAddr, u32)> =
                known.values().map(|h| (h.via, h.ifindex)).collect();
            for (via, ifindex) in &vias {
                if let Err(e) = resolver.refresh(*via, *ifindex).await {
                    tracing::debug!(next_hop = %via, "re-learning the MAC failed: {e:#}");
                }
            }
            if !vias.is_empty() {
                tokio::time::sleep(SETTLE).await;
            }
        }
        for t in &list {
            match resolver.resolve(t.addr, &t.lookup(ingress)).await {
                Ok(Some(hop)) => {
                    if let Some(old) = known.get(&t.addr) {
                        if old.mac != hop.mac || old.ifindex != hop.ifindex {
                            tracing::info!(
                                backend = %t.addr,
                                next_hop = %hop.via,
                                old_mac = %crate::config::format_mac(&old.mac),
                                new_mac = %crate::config::format_mac(&hop.mac),
                                "the backend's next hop changed; rewriting its record"
                            );
                        }
                    }
                    known.insert(t.addr, hop);
                }
                // Being resolved (or re-learned): the last answer stands.
                Ok(None) => {}
                Err(e) => {
                    let due = warned
                        .get(&t.addr)
                        .is_none_or(|at| at.elapsed() >= WARN_EVERY);
                    if due {
                        warned.insert(t.addr, Instant::now());
                        tracing::warn!(backend = %t.addr, "resolving the next hop: {e:#}");
                    }
                }
            }
        }
        let hops = merge(&sent, &known, &list, ingress);
        if hops != sent {
            owner.hops(hops.clone());
            sent = hops;
        }
        if targets.has_changed().is_err() {
            return;
        }
    }
}

/// The next hops to hand over: this round's answers, and for a target not
/// answered yet (its entry being resolved or re-learned) what was last
/// handed over. Only a target gone from the config loses its next hop: a
/// record must never fall back to "unresolved" while its MAC is being
/// re-learned.
fn merge(sent: &Hops, known: &HashMap<IpAddr, NextHop>, list: &[Target], ingress: u32) -> Hops {
    let mut hops: Hops = sent
        .iter()
        .filter(|(addr, _)| list.iter().any(|t| t.addr == **addr))
        .map(|(addr, hop)| (*addr, *hop))
        .collect();
    hops.extend(
        known
            .iter()
            .map(|(addr, hop)| (*addr, to_hop(hop, ingress))),
    );
    hops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next_hop(last: u8, ifindex: u32) -> NextHop {
        NextHop {
            mac: [2, 0, 0, 0, 0, last],
            via: "10.0.0.1".parse().expect("ip"),
            ifindex,
            smac: [2, 0, 0, 0, 1, 1],
            mtu: 1500,
            src: None,
        }
    }

    #[test]
    fn pending_targets_keep_their_last_hop_and_removed_ones_lose_it() {
        let a: IpAddr = "10.0.0.21".parse().expect("ip");
        let b: IpAddr = "10.0.0.22".parse().expect("ip");
        let c: IpAddr = "10.0.0.23".parse().expect("ip");
        let target = |addr| Target {
            addr,
            routed: false,
        };
        let mut sent = Hops::new();
        for (addr, last) in [(a, 1), (b, 2), (c, 3)] {
            sent.insert(addr, to_hop(&next_hop(last, 7), 7));
        }
        // a re-learned with a new MAC, b pending (no answer), c removed.
        let known = HashMap::from([(a, next_hop(9, 7))]);
        let hops = merge(&sent, &known, &[target(a), target(b)], 7);
        assert_eq!(hops.len(), 2);
        assert_eq!(hops[&a].mac, [2, 0, 0, 0, 0, 9]);
        assert_eq!(hops[&b], sent[&b], "pending: the last hop stays");
        assert!(!hops.contains_key(&c));
        // The ingress interface is egress 0 (XDP_TX).
        assert_eq!(hops[&a].ifindex, 0);
    }
}
