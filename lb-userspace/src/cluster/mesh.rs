//! The TCP mesh between cluster peers.
