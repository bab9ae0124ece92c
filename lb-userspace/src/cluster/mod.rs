//! The cluster: nodes behind one ECMP route replicate their runtime changes,
//! health verdict and divergent sessions, so every node answers every client
//! the same way (README "Cluster"). `wire` and `mesh` are the authenticated
//! transport; `msg` what travels on it; `agree` the rules nodes agree by.

pub mod agree;
pub mod fingerprint;
pub mod mesh;
pub mod msg;
pub mod wire;
