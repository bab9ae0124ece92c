//! Reading the per-CPU counters, summed over CPUs.

use anyhow::{Context as _, Result};
use lb_common::{MAX_BACKENDS, MAX_SERVICES, TrafficStats, stat};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::config::Config;
use crate::dataplane::{addr_words, service_key};
use crate::pins::PinnedMaps;

/// Summed counters of one service or backend.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Traffic {
    /// Frames forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// Sessions created.
    pub new_sessions: u64,
}

/// All counters at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Global reasons by name (`lb_common::stat::NAMES`).
    pub reasons: Vec<(String, u64)>,
    /// (service id, traffic) for services that saw any.
    pub services: Vec<(u32, Traffic)>,
    /// (backend id, traffic) for backends that saw any.
    pub backends: Vec<(u32, Traffic)>,
    /// Names of the ids in `services`, where known (from the daemon, or a config).
    #[serde(default)]
    pub service_names: BTreeMap<u32, String>,
    /// Names of the ids in `backends`, where known.
    #[serde(default)]
    pub backend_names: BTreeMap<u32, BackendName>,
}

/// Which backend an id is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendName {
    /// Service name.
    pub service: String,
    /// Backend name.
    pub backend: String,
}

impl Snapshot {
    /// The value of one global counter.
    pub fn reason(&self, index: u32) -> u64 {
        self.reasons
            .get(index as usize)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }

    /// Records names for the ids that have counters: services as (id, name),
    /// backends as (id, service, backend).
    pub fn name(
        &mut self,
        services: impl IntoIterator<Item = (u32, String)>,
        backends: impl IntoIterator<Item = (u32, String, String)>,
    ) {
        for (id, name) in services {
            if self.services.iter().any(|(i, _)| *i == id) {
                self.service_names.insert(id, name);
            }
        }
        for (id, service, backend) in backends {
            if self.backends.iter().any(|(i, _)| *i == id) {
                self.backend_names
                    .insert(id, BackendName { service, backend });
            }
        }
    }

    /// Names ids from `config` and the pinned records: services by their
    /// key, backends by (service id, address). Runtime-added backends the
    /// config does not list keep their number.
    pub fn name_from_config(&mut self, maps: &PinnedMaps, config: &Config) -> Result<()> {
        let live = maps.live_backends()?;
        let mut services = Vec::new();
        let mut backends = Vec::new();
        for svc in &config.services {
            let Ok(record) = maps.services.get(&service_key(svc), 0) else {
                continue;
            };
            services.push((record.id, svc.name.clone()));
            for be in &svc.backends {
                if let Some((id, _)) = live.get(&(record.id, addr_words(be.address))) {
                    backends.push((*id, svc.name.clone(), be.name.clone()));
                }
            }
        }
        self.name(services, backends);
        Ok(())
    }
}

fn sum(values: &[TrafficStats]) -> Traffic {
    values.iter().fold(Traffic::default(), |acc, v| Traffic {
        packets: acc.packets + v.packets,
        bytes: acc.bytes + v.bytes,
        new_sessions: acc.new_sessions + v.new_sessions,
    })
}

/// Reads every counter.
pub fn snapshot(maps: &PinnedMaps) -> Result<Snapshot> {
    let mut reasons = Vec::with_capacity(stat::COUNT as usize);
    for i in 0..stat::COUNT {
        let per_cpu = maps
            .stats
            .get(&i, 0)
            .with_context(|| format!("reading counter {}", stat::NAMES[i as usize]))?;
        reasons.push((stat::NAMES[i as usize].to_string(), per_cpu.iter().sum()));
    }
    let mut services = Vec::new();
    for id in 0..MAX_SERVICES {
        let t = sum(&maps
            .service_stats
            .get(&id, 0)
            .context("reading service counters")?);
        if t != Traffic::default() {
            services.push((id, t));
        }
    }
    let mut backends = Vec::new();
    for id in 0..MAX_BACKENDS {
        let t = sum(&maps
            .backend_stats
            .get(&id, 0)
            .context("reading backend counters")?);
        if t != Traffic::default() {
            backends.push((id, t));
        }
    }
    Ok(Snapshot {
        reasons,
        services,
        backends,
        ..Snapshot::default()
    })
}
