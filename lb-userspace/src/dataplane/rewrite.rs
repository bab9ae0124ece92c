//! Moving the clients of backends that just became unusable (down, or every
//! backend of a service entering panic mode) to their client's answer in
//! the live Maglev table, a chunk of sessions at a time.
//!
//! The kernel already re-selects such a client on its next packet (the
//! backend record says down); the rewrite makes the maps say so at once,
//! so counts, lists, drains and the cluster see where each client goes.
//! It reads each affected service's live table once and answers in memory,
//! and writes each chunk's moves in one batch: the cost of a walk, not of
//! a syscall per moved session.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use lb_common::NO_BACKEND;

use super::protect::answer;
use crate::{bpf_batch, pins::PinnedMaps};

/// A rewrite under way.
pub struct Rewrite {
    ids: HashSet<u32>,
    /// The live table of every service one of `ids` belongs to.
    tables: HashMap<u32, Arc<[u32]>>,
    cursor: crate::pins::SessionCursor,
    moved: HashMap<u32, u64>,
}

impl Rewrite {
    /// Starts a rewrite of the sessions of backend `ids`, against the tables
    /// live now (read once, one batch per service).
    pub fn new(maps: &PinnedMaps, ids: HashSet<u32>) -> Result<Self> {
        let backends = maps.backend_records()?;
        let services: HashSet<u32> = ids
            .iter()
            .filter_map(|id| backends.get(*id as usize))
            .map(|b| u32::from(b.service_id))
            .collect();
        let mut tables = HashMap::new();
        for entry in maps.services.iter() {
            let (key, record) = entry.context("reading the service map")?;
            if key.port == 0 || !services.contains(&record.id) {
                continue;
            }
            let base = record.maglev_base[(record.active_slot & 1) as usize];
            let mut table = vec![0u32; record.table_size as usize];
            bpf_batch::read_array(&maps.maglev, base, &mut table)
                .with_context(|| format!("reading the live table of service id {}", record.id))?;
            tables.insert(record.id, table.into());
        }
        Ok(Self {
            ids,
            tables,
            cursor: crate::pins::SessionCursor::default(),
            moved: HashMap::new(),
        })
    }

    /// Sessions moved (or deleted, where the service has no backend) so far, by old backend id.
    pub fn moved(&self) -> &HashMap<u32, u64> {
        &self.moved
    }

    /// Sessions read so far.
    pub fn seen(&self) -> usize {
        self.cursor.seen()
    }

    /// Goes on for about `budget` sessions read; true once both maps are done.
    pub fn step(&mut self, maps: &mut PinnedMaps, budget: usize) -> Result<bool> {
        if self.ids.is_empty() {
            return Ok(true);
        }
        let mut left = budget.max(1);
        while let Some((protected, chunk)) = self.cursor.next_chunk(maps)? {
            left = left.saturating_sub(chunk.len());
            let (mut keys, mut values, mut gone) = (Vec::new(), Vec::new(), Vec::new());
            for (key, mut value) in chunk {
                let old = value.backend_id;
                if !self.ids.contains(&old) {
                    continue;
                }
                let choice = self
                    .tables
                    .get(&key.service_id)
                    .map_or(NO_BACKEND, |t| answer(t, &key.addr));
                if choice == old {
                    continue;
                }
                *self.moved.entry(old).or_default() += 1;
                if choice == NO_BACKEND {
                    // Nowhere to go: the kernel decides on the next packet.
                    gone.push(key);
                } else {
                    // Keeps last_seen: the client is as idle as it was. A
                    // protected session now equal to the answer stays there
                    // until the next table change or sweep releases it.
                    value.backend_id = choice;
                    keys.push(key);
                    values.push(value);
                }
            }
            let map = maps.session_map(protected);
            let (_, skipped) = bpf_batch::update_keys(map, &keys, &values)
                .context("rewriting the sessions of unusable backends")?;
            if skipped > 0 {
                tracing::warn!(
                    skipped,
                    "rewriting sessions: the map was full for some (their clients re-select on their next packet)"
                );
            }
            bpf_batch::delete_keys(map, &gone)
                .context("deleting sessions left without a backend")?;
            if left == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
