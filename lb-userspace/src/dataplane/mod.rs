//! The one owner of the XDP program: loads it (reusing compatible pinned
//! maps), attaches it or adopts an existing attachment (`load`), and writes
//! the config into the maps, touching only what changed (`apply`, with the
//! Maglev tables in `tables`).

mod apply;
mod egress;
mod keys;
mod load;
mod protect;
mod rewrite;
mod tables;

pub use apply::{ApplyReport, Staged, apply, apply_with, prepare, write_records};
pub use egress::{Hop, Hops};
pub use keys::{addr_words, family, service_key};
pub use load::{
    Attachment, Dataplane, LoadOptions, PASS_OBJ, PROGRAM, XLB_OBJ, attach_and_pin, bring_up,
    detach, interface_index, interface_mac,
};
pub use protect::{Protection, Sweep, Sweeping, answer, sweep};
pub use rewrite::Rewrite;
pub use tables::{KnownTables, service_table};
