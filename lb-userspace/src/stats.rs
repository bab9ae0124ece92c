//! Reading the per-CPU counters, summed over CPUs.

use anyhow::{Context as _, Result};
use lb_common::{MAX_BACKENDS, MAX_SERVICES, TrafficStats, stat};
use serde::{Deserialize, Serialize};

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
}

impl Snapshot {
    /// The value of one global counter.
    pub fn reason(&self, index: u32) -> u64 {
        self.reasons
            .get(index as usize)
            .map(|(_, v)| *v)
            .unwrap_or(0)
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
    })
}
