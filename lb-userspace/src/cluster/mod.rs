//! The cluster replication channel's transport: authenticated frames over a TCP mesh between configured peers.

pub mod mesh;
pub mod wire;
