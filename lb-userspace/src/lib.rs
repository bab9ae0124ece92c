//! xlb userspace: configuration, Maglev tables and the owner of the pinned dataplane.

pub mod config;
pub mod dataplane;
pub mod maglev;
pub mod objects;
pub mod pins;
pub mod sessions;
pub mod stats;
