//! Decoding the affinity map for people and scripts (bpftool shows only hex:
//! aya 0.14 maps carry no BTF).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use anyhow::{Context as _, Result};
use lb_common::{BACKEND_EMPTY, FAMILY_V4, ServiceKey, bytes_from_words};
use serde::Serialize;

use crate::pins::PinnedMaps;

/// One sticky session, decoded.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Session {
    /// The service as `vip:port/proto` (`[v6]:port/proto`).
    pub service: String,
    /// Service id.
    pub service_id: u32,
    /// The client address as masked by the service's prefix.
    pub client: IpAddr,
    /// Prefix length the client was masked to.
    pub prefix: u8,
    /// Backend id.
    pub backend_id: u32,
    /// Backend address, if the id names a live backend.
    pub backend: Option<IpAddr>,
    /// Milliseconds since the entry was last refreshed (refresh is coarse).
    pub idle_ms: u64,
    /// Kept in the protected map: its backend differs from the Maglev
    /// answer, so no LRU eviction may lose it.
    pub protected: bool,
}

/// Turns a key-layout address back into an `IpAddr` of `family`.
pub fn ip_from_words(words: &[u32; 4], family: u8) -> IpAddr {
    let b = bytes_from_words(words);
    if family == FAMILY_V4 {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(b)
    }
}

/// `vip:port/proto` for a service key.
pub fn service_label(key: &ServiceKey) -> String {
    let ip = ip_from_words(&key.addr, key.family);
    let proto = match key.proto {
        lb_common::PROTO_TCP => "tcp",
        lb_common::PROTO_UDP => "udp",
        _ => "?",
    };
    let port = u16::from_be(key.port);
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}/{proto}"),
        IpAddr::V6(a) => format!("[{a}]:{port}/{proto}"),
    }
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Which sessions [`list_where`] keeps, and how many at most.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Only this service id.
    pub service_id: Option<u32>,
    /// Only sessions on these backend ids.
    pub backends: Option<HashSet<u32>>,
    /// At most this many (the first found in walk order, then sorted).
    pub limit: usize,
}

impl Filter {
    /// Every session.
    pub fn all() -> Self {
        Self {
            service_id: None,
            backends: None,
            limit: usize::MAX,
        }
    }

    fn keeps(&self, key: &lb_common::AffinityKey, backend_id: u32) -> bool {
        self.service_id.is_none_or(|id| key.service_id == id)
            && self
                .backends
                .as_ref()
                .is_none_or(|ids| ids.contains(&backend_id))
    }
}

/// Every affinity entry, sorted by service then client.
pub fn list(maps: &PinnedMaps) -> Result<Vec<Session>> {
    Ok(list_where(maps, &Filter::all())?.0)
}

/// The sessions `filter` keeps (at most its limit), sorted by service then
/// client, and how many it matched in all. One walk of both maps, a batch
/// at a time; the backend records are read once.
pub fn list_where(maps: &PinnedMaps, filter: &Filter) -> Result<(Vec<Session>, usize)> {
    let mut services: HashMap<u32, (ServiceKey, u8, u8)> = HashMap::new();
    for entry in maps.services.iter() {
        let (key, svc) = entry.context("reading the service map")?;
        if key.port != 0 {
            services.insert(svc.id, (key, svc.prefix_v4, svc.prefix_v6));
        }
    }
    let backends = maps.backend_records()?;
    let now = monotonic_ns();
    let mut out = Vec::new();
    let mut matched = 0usize;
    maps.visit_sessions(|key, value, protected| {
        if !filter.keeps(&key, value.backend_id) {
            return Ok(());
        }
        matched += 1;
        if out.len() >= filter.limit {
            return Ok(());
        }
        let (label, family, prefix) = match services.get(&key.service_id) {
            Some((skey, p4, p6)) => (
                service_label(skey),
                skey.family,
                if skey.family == FAMILY_V4 { *p4 } else { *p6 },
            ),
            None => (
                format!("#{} (removed)", key.service_id),
                guess_family(&key.addr),
                0,
            ),
        };
        let backend = backends
            .get(value.backend_id as usize)
            .filter(|b| b.state != BACKEND_EMPTY)
            .map(|b| ip_from_words(&b.addr, b.family));
        out.push(Session {
            service: label,
            service_id: key.service_id,
            client: ip_from_words(&key.addr, family),
            prefix,
            backend_id: value.backend_id,
            backend,
            idle_ms: Duration::from_nanos(now.saturating_sub(value.last_seen_ns)).as_millis()
                as u64,
            protected,
        });
        Ok(())
    })?;
    out.sort_by_key(|s| (s.service_id, s.client));
    Ok((out, matched))
}

fn guess_family(words: &[u32; 4]) -> u8 {
    if words[1..] == [0, 0, 0] {
        FAMILY_V4
    } else {
        lb_common::FAMILY_V6
    }
}
