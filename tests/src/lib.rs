//! The xlb test lab: network namespaces joined by a bridge, backend servers and a client.
//!
//! Traffic stays inside namespaces the lab created; everything it creates is removed when
//! its guard drops (also while a test panics), on SIGINT/SIGTERM/SIGHUP, and leftovers of
//! a crashed run are removed by the next [`Lab::new`] with the same tag.
//!
//! ```no_run
//! use xlb_tests::{Lab, LabOptions, Proto, Servers, who_serves};
//! # fn main() -> anyhow::Result<()> {
//! let lab = Lab::new("doc", LabOptions::default())?;
//! let _servers = Servers::start(&lab)?;
//! lab.attach_lb_peer_pass()?;
//! // ... start the load balancer in lab.lb with lab.spawn_in_lb(...) ...
//! let name = who_serves(&lab, lab.client_addrs()[0], Proto::Tcp)?;
//! assert!(lab.backend(&name).is_some());
//! # Ok(())
//! # }
//! ```

pub mod bench;
pub mod bird;
pub mod cleanup;
pub mod client;
pub mod cluster_lab;
pub mod cluster_ops;
pub mod cmd;
pub mod daemon;
pub mod driver;
pub mod flood;
pub mod frames;
pub mod lab;
pub mod netns;
pub mod plant;
pub mod probes;
pub mod routed_lab;
pub mod servers;
pub mod tmpfs;
pub mod xdp;

pub use client::{Proto, http_get, http_get_from, udp_ask, udp_ask_from, who_serves};
pub use lab::{Backend, Lab, LabOptions, MacAddr};
pub use netns::{NetNs, NsChild};
pub use servers::{HTTP_PORT, Served, ServerSpec, Servers, UDP_PORT};
pub use xdp::{XdpMode, XdpPass};
