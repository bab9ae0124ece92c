//! xlb userspace: configuration, Maglev tables, the owner of the pinned dataplane and the daemon.

pub mod announce;
pub mod api;
pub mod bpf_batch;
pub mod bpf_obj;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod hops;
pub mod lock;
pub mod maglev;
pub mod nexthop;
pub mod objects;
pub mod pins;
pub mod sessions;
pub mod stats;
