//! Next hops: what `apply` writes so frames reach backends it was not told
//! the MAC of, and how `ipip` frames leave (`XLB_EGRESS_V1`, `XLB_DEVMAP_V1`).
//!
//! The resolution itself (routes, neighbours) is the caller's
//! (`crate::nexthop`); this module turns its answers into map entries and
//! writes only those that differ.

use std::{collections::HashMap, net::IpAddr};

use anyhow::{Context as _, Result};
use lb_common::{Egress, MAX_BACKENDS};

use super::keys::addr_words;
use crate::{
    bpf_batch,
    config::{BackendConfig, Config, ForwardMode, ServiceConfig},
    pins::PinnedMaps,
};

/// A backend's resolved next hop, as `apply` needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The next hop's MAC (the backend's own in "dsr" mode).
    pub mac: [u8; 6],
    /// Egress interface; 0 = the interface the program runs on.
    pub ifindex: u32,
    /// The egress interface's MAC.
    pub smac: [u8; 6],
    /// Egress MTU.
    pub mtu: u32,
    /// The route's preferred source address, if any.
    pub src: Option<IpAddr>,
}

/// Resolved next hops by backend address.
pub type Hops = HashMap<IpAddr, Hop>;

/// The MAC frames for `be` go to: typed in the config, else resolved, else
/// all-zero (the kernel drops its frames, `drop_nexthop_unresolved`).
pub(crate) fn mac_of(be: &BackendConfig, hops: &Hops) -> [u8; 6] {
    if be.mac != [0; 6] {
        return be.mac;
    }
    hops.get(&be.address).map_or([0; 6], |h| h.mac)
}

/// The egress entry of a backend of `svc` (default for "dsr" services, and
/// for unresolved backends: MTU 0 sends nothing).
pub(crate) fn egress_of(
    config: &Config,
    svc: &ServiceConfig,
    be: &BackendConfig,
    hops: &Hops,
) -> Egress {
    if svc.forward_mode != ForwardMode::Ipip {
        return Egress::default();
    }
    let Some(hop) = hops.get(&be.address) else {
        return Egress::default();
    };
    let configured = match be.address {
        IpAddr::V4(_) => config.encap_source_v4.map(IpAddr::V4),
        IpAddr::V6(_) => config.encap_source_v6.map(IpAddr::V6),
    };
    let Some(src) = configured.or(hop.src) else {
        return Egress::default();
    };
    Egress {
        src: addr_words(src),
        smac: hop.smac,
        _pad: 0,
        ifindex: hop.ifindex,
        mtu: hop.mtu,
    }
}

/// Writes the egress entries in `wanted` (backend id, entry) that differ
/// from the map, and makes every egress interface other than the ingress
/// one a redirect target. Returns the entries written.
pub(crate) fn write(maps: &mut PinnedMaps, wanted: &[(u32, Egress)]) -> Result<usize> {
    let mut live = vec![Egress::default(); MAX_BACKENDS as usize];
    bpf_batch::read_array(&maps.egress, 0, &mut live).context("reading the egress map")?;
    let (keys, values): (Vec<u32>, Vec<Egress>) = wanted
        .iter()
        .filter(|(id, e)| live.get(*id as usize) != Some(e))
        .copied()
        .unzip();
    bpf_batch::update_array(&mut maps.egress, &keys, &values).context("writing egress entries")?;
    for (_, e) in wanted {
        if e.ifindex != 0 && maps.devmap.get(e.ifindex, 0).is_err() {
            maps.devmap
                .insert(e.ifindex, e.ifindex, None, 0)
                .with_context(|| format!("adding interface {} to the redirect map", e.ifindex))?;
        }
    }
    Ok(keys.len())
}
