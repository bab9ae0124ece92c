//! The cluster: nodes behind one ECMP route replicate their runtime changes,
//! health verdict and divergent sessions, so every node answers every client
//! the same way (README "Cluster").

pub mod agree;
pub mod fingerprint;
pub mod msg;
