//! Maglev tables in the map: building a service's table, remembering what
//! each of its two slots holds, and writing only the entries that differ.
//!
//! Why a cache rather than reading the live table at every apply: on the
//! reference machine (6.18, 2 vCPUs) one `BPF_MAP_LOOKUP_BATCH` of a
//! 65537-slot table takes ~14 ms, as long as writing it (~13 ms), and
//! building a table takes milliseconds too. Comparing every service with the
//! kernel would cost that per service at every apply (0.2 s for 16 services)
//! although one changed. So this process remembers what it wrote or read,
//! per slot, with the inputs the table was built from; an unchanged service
//! costs one comparison of its inputs, and a changed one writes only the
//! slots where the new table differs from what the idle slot holds.
//!
//! The memory is trusted only while the kernel agrees with it: the service
//! records are read at every apply anyway, and a record placed elsewhere or
//! live in another slot than this process left it (someone else wrote) makes
//! it forget that service and read both slots again (one batch). What a
//! record cannot show (another program rewriting slots in place) is what
//! [`PinnedMaps::forget_tables`](crate::pins::PinnedMaps::forget_tables) is
//! for: the next apply then compares every table with the kernel.

use std::{collections::HashMap, sync::Arc};

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData};
use lb_common::Service;

use super::keys::addr_words;
use crate::{
    bpf_batch,
    config::{BackendState, ServiceConfig},
    maglev::{self, MaglevBackend},
};

/// What a table is a pure function of: its size and the active members
/// (address key, id, weight) sorted by key. Equal inputs, equal table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableInputs {
    size: u32,
    members: Vec<([u8; 16], u32, u32)>,
}

impl TableInputs {
    /// The inputs of `svc`'s table, with backend ids `ids` (parallel to `svc.backends`).
    pub(crate) fn of(svc: &ServiceConfig, ids: &[u32], size: u32) -> Self {
        let mut members: Vec<([u8; 16], u32, u32)> = svc
            .backends
            .iter()
            .zip(ids)
            .filter(|(b, _)| b.state == BackendState::Active)
            .map(|(b, id)| {
                (
                    lb_common::bytes_from_words(&addr_words(b.address)),
                    *id,
                    u32::from(b.weight),
                )
            })
            .collect();
        members.sort_unstable();
        Self { size, members }
    }

    /// Builds the table.
    pub(crate) fn build(&self) -> Result<Vec<u32>> {
        let members: Vec<MaglevBackend<'_>> = self
            .members
            .iter()
            .map(|(key, id, weight)| MaglevBackend {
                id: *id,
                key,
                weight: *weight,
            })
            .collect();
        maglev::build_table(&members, self.size)
    }
}

/// The Maglev table of `svc`: its active backends, weighted, keyed by
/// address (so every xlb instance builds the same table), holding the
/// backend ids `ids` (parallel to `svc.backends`).
pub fn service_table(svc: &ServiceConfig, ids: &[u32], table_size: u32) -> Result<Vec<u32>> {
    TableInputs::of(svc, ids, table_size)
        .build()
        .with_context(|| format!("building the Maglev table of service {}", svc.name))
}

/// Where a service's two slots start in the Maglev map, and their size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    /// Start index of slot 0 and slot 1.
    pub base: [u32; 2],
    /// Entries per slot.
    pub size: u32,
}

impl Placement {
    /// Where service `id` keeps its tables of `size` entries.
    pub(crate) fn for_id(id: u32, size: u32) -> Self {
        Self {
            base: [id * 2 * size, (id * 2 + 1) * size],
            size,
        }
    }

    /// Where `record` says its tables are.
    pub(crate) fn of(record: &Service) -> Self {
        Self {
            base: record.maglev_base,
            size: record.table_size,
        }
    }
}

/// One slot's known content.
#[derive(Clone)]
struct Slot {
    table: Arc<[u32]>,
    /// What it was built from, when this process built (or matched) it.
    inputs: Option<TableInputs>,
}

/// What this process knows about one service id's region of the map.
struct Known {
    placement: Placement,
    /// The live slot as this process last left the record; None before the
    /// record was first written.
    active: Option<u32>,
    slots: [Option<Slot>; 2],
}

/// What this process knows the Maglev map holds, per service id.
#[derive(Default)]
pub struct KnownTables {
    by_id: HashMap<u32, Known>,
}

impl std::fmt::Debug for KnownTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&u32> = self.by_id.keys().collect();
        ids.sort_unstable();
        f.debug_struct("KnownTables").field("ids", &ids).finish()
    }
}

/// What to do with a service's table.
pub(crate) enum Plan {
    /// The live slot already holds the wanted table.
    Keep,
    /// Write the table into `slot` (both slots for a new service), then make it live.
    Write {
        /// Slot that becomes live.
        slot: u32,
        /// Also fill the other slot (a new service: no packet reads either yet).
        both: bool,
        table: Arc<[u32]>,
        inputs: TableInputs,
    },
}

impl KnownTables {
    /// Forgets everything: the next apply compares every table with the kernel.
    pub fn clear(&mut self) {
        self.by_id.clear();
    }

    /// Forgets service `id` (removed, or the kernel disagrees).
    pub(crate) fn forget(&mut self, id: u32) {
        self.by_id.remove(&id);
    }

    /// Drops what the kernel's `record` for service `id` (None: no record)
    /// contradicts, and anything not at `placement`.
    fn check(&mut self, id: u32, record: Option<&Service>, placement: Placement) {
        let Some(known) = self.by_id.get(&id) else {
            return;
        };
        let live = record.map(|r| r.active_slot & 1);
        let agrees = known.placement == placement
            && record.is_none_or(|r| Placement::of(r) == placement)
            && known.active == live;
        if !agrees {
            tracing::debug!(
                service_id = id,
                "the kernel's service record differs from what this process wrote: re-reading its tables"
            );
            self.by_id.remove(&id);
        }
    }

    /// Decides what service `id` needs so that its live table is the one
    /// built from `inputs`, reading the slots from the kernel when this
    /// process does not know them. `record` is the kernel's record (None
    /// for a new service).
    pub(crate) fn plan(
        &mut self,
        maglev: &Array<MapData, u32>,
        id: u32,
        record: Option<&Service>,
        inputs: &TableInputs,
    ) -> Result<Plan> {
        let placement = Placement::for_id(id, inputs.size);
        self.check(id, record, placement);
        let Some(record) = record.filter(|r| Placement::of(r) == placement) else {
            // New, or its record points elsewhere (another table size): a
            // full table goes into the expected region. A new service's id
            // is not live, so both slots can be filled; the next change
            // then writes only what differs.
            let table: Arc<[u32]> = inputs.build()?.into();
            let both = record.is_none();
            let slot = record.map_or(0, |r| 1 - (r.active_slot & 1));
            return Ok(Plan::Write {
                slot,
                both,
                table,
                inputs: inputs.clone(),
            });
        };
        let live = record.active_slot & 1;
        if let Some(slot) = self.slot(id, live) {
            if slot.inputs.as_ref() == Some(inputs) {
                return Ok(Plan::Keep);
            }
        }
        let table = inputs.build()?;
        if self.slot(id, live).is_none() {
            self.read(maglev, id, placement, live)?;
        }
        let known = self
            .by_id
            .get_mut(&id)
            .context("Maglev slots missing after reading them")?;
        if let Some(slot) = known.slots[live as usize].as_mut() {
            if *slot.table == table[..] {
                slot.inputs = Some(inputs.clone());
                return Ok(Plan::Keep);
            }
        }
        Ok(Plan::Write {
            slot: 1 - live,
            both: false,
            table: table.into(),
            inputs: inputs.clone(),
        })
    }

    fn slot(&self, id: u32, slot: u32) -> Option<&Slot> {
        self.by_id.get(&id)?.slots[slot as usize].as_ref()
    }

    /// Reads both slots of service `id` (one batch: they are adjacent).
    fn read(
        &mut self,
        maglev: &Array<MapData, u32>,
        id: u32,
        placement: Placement,
        live: u32,
    ) -> Result<()> {
        let n = placement.size as usize;
        let mut both = vec![0u32; 2 * n];
        bpf_batch::read_array(maglev, placement.base[0], &mut both)
            .with_context(|| format!("reading the Maglev tables of service id {id}"))?;
        let slot = |t: &[u32]| {
            Some(Slot {
                table: t.into(),
                inputs: None,
            })
        };
        self.by_id.insert(
            id,
            Known {
                placement,
                active: Some(live),
                slots: [slot(&both[..n]), slot(&both[n..])],
            },
        );
        Ok(())
    }

    /// Carries out a `Plan::Write` for service `id`: writes the entries of
    /// the target slot (and of the other one for a new service) that differ
    /// from what they hold. Returns the number of entries written.
    pub(crate) fn write(
        &mut self,
        maglev: &mut Array<MapData, u32>,
        id: u32,
        slot: u32,
        both: bool,
        table: &Arc<[u32]>,
        inputs: &TableInputs,
    ) -> Result<usize> {
        let placement = Placement::for_id(id, inputs.size);
        let known = self.by_id.entry(id).or_insert_with(|| Known {
            placement,
            active: None,
            slots: [None, None],
        });
        let targets: &[u32] = if both { &[0, 1] } else { &[slot] };
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for &s in targets {
            let base = placement.base[s as usize];
            match &known.slots[s as usize] {
                Some(old) if old.table.len() == table.len() => {
                    for (i, (new, old)) in table.iter().zip(old.table.iter()).enumerate() {
                        if new != old {
                            keys.push(base + i as u32);
                            values.push(*new);
                        }
                    }
                }
                _ => {
                    keys.extend(base..base + placement.size);
                    values.extend_from_slice(table);
                }
            }
        }
        // Until the write succeeds the target slots hold something unknown.
        for &s in targets {
            known.slots[s as usize] = None;
        }
        bpf_batch::update_array(maglev, &keys, &values)?;
        for &s in targets {
            known.slots[s as usize] = Some(Slot {
                table: Arc::clone(table),
                inputs: Some(inputs.clone()),
            });
        }
        Ok(keys.len())
    }

    /// Records that the service record of `id` now makes `slot` live.
    pub(crate) fn flipped(&mut self, id: u32, slot: u32) {
        if let Some(known) = self.by_id.get_mut(&id) {
            known.active = Some(slot & 1);
        }
    }
}
