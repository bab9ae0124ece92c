//! Which next hops a config needs, and how the resolver's answers become
//! what `dataplane::apply_with` writes: shared by `xlb run` (once, at
//! start) and the daemon (at start, then kept current by its task).

use std::{collections::HashMap, net::IpAddr, time::Duration};

use anyhow::{Context as _, Result};

use crate::{
    config::{Config, ForwardMode},
    dataplane::{Hop, Hops},
    nexthop::{self, Lookup, NextHop},
};

/// How long a start waits for next hops the kernel has not resolved yet.
pub const START_WAIT: Duration = Duration::from_secs(3);

/// One backend address whose next hop must be resolved, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The backend's address.
    pub addr: IpAddr,
    /// Follow the route (`ipip`) rather than ask for an on-link neighbour.
    pub routed: bool,
}

impl Target {
    /// The resolver's lookup for this target; `ifindex` is the interface
    /// the program runs on.
    pub fn lookup(&self, ifindex: u32) -> Lookup {
        if self.routed {
            Lookup::Routed
        } else {
            Lookup::OnLink { ifindex }
        }
    }
}

/// The backends of `config` whose next hop comes from the kernel: those of
/// `ipip` services, and those of `dsr` services without a `mac`.
pub fn targets(config: &Config) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    for svc in &config.services {
        let routed = svc.forward_mode == ForwardMode::Ipip;
        for be in &svc.backends {
            if !routed && be.mac != [0; 6] {
                continue;
            }
            let t = Target {
                addr: be.address,
                routed,
            };
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

/// What `apply` needs of a resolved next hop: the ingress interface is
/// egress 0 (`XDP_TX`).
pub fn to_hop(hop: &NextHop, ingress: u32) -> Hop {
    Hop {
        mac: hop.mac,
        ifindex: if hop.ifindex == ingress {
            0
        } else {
            hop.ifindex
        },
        smac: hop.smac,
        mtu: hop.mtu,
        src: hop.src,
    }
}

/// Resolves every next hop `config` needs, waiting up to `wait` for those
/// the kernel has not resolved yet; the missing ones are logged (their
/// backends' frames are dropped and counted until they resolve).
pub fn resolve_now(config: &Config, wait: Duration) -> Result<Hops> {
    let targets = targets(config);
    if targets.is_empty() {
        return Ok(Hops::new());
    }
    let ingress = crate::dataplane::interface_index(&config.interface)?;
    let asks: Vec<(IpAddr, Lookup)> = targets
        .iter()
        .map(|t| (t.addr, t.lookup(ingress)))
        .collect();
    let found: HashMap<IpAddr, NextHop> =
        nexthop::resolve_blocking(&asks, wait).context("resolving the backends' next hops")?;
    for t in &targets {
        if !found.contains_key(&t.addr) {
            tracing::warn!(
                backend = %t.addr,
                "next hop not resolved yet: frames for this backend are dropped \
                 (drop_nexthop_unresolved) until the kernel resolves it"
            );
        }
    }
    Ok(found
        .iter()
        .map(|(addr, hop)| (*addr, to_hop(hop, ingress)))
        .collect())
}
