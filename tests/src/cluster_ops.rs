//! What tests and the demo ask of a running cluster lab: each node's `xlb cluster
//! status`, whether the nodes agree, what each node answers a client, which nodes hold
//! a client's sessions, and adding a spare backend to every service.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster_lab::{ClusterLab, SERVICES, backend_v4, backend_v6};

/// What one node answers one client (`xlb sessions where`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The backend the client goes to ("-" if none is usable).
    pub backend: String,
    /// What the live Maglev table alone answers ("-" if none).
    pub maglev_backend: String,
    /// "session" (an affinity entry decides) or "maglev".
    pub source: String,
}

impl Answer {
    /// Whether a session keeps the client off its Maglev answer (the client depends on it).
    pub fn divergent(&self) -> bool {
        self.backend != self.maglev_backend
    }
}

/// The http service of `client`'s family.
pub fn http_service(client: IpAddr) -> &'static str {
    if client.is_ipv4() {
        "http-v4"
    } else {
        "http-v6"
    }
}

impl ClusterLab {
    /// `xlb cluster status --json` of node `i`.
    pub fn cluster_status(&self, i: usize) -> Result<serde_json::Value> {
        self.node_cli(i, &["cluster", "status"])
    }

    /// The indexes of the live nodes.
    pub fn alive_nodes(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .filter(|n| n.alive())
            .map(|n| n.index)
            .collect()
    }

    /// Waits until every live node is synced, has no round in progress, sees every other
    /// live node live, and all run one version (not the "0.0" of a cluster whose first
    /// coordinator has not made its first version yet) with one fingerprint; returns the
    /// time it took.
    pub fn wait_cluster(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let alive = self.alive_nodes();
        // Bounded by the timeout; each look is one CLI call per node.
        loop {
            let all = alive
                .iter()
                .map(|i| self.cluster_status(*i))
                .collect::<Result<Vec<_>>>()?;
            let agreed = all.iter().all(|s| {
                s["synced"] == true
                    && s["version"] != "0.0"
                    && s["version"] == all[0]["version"]
                    && s["fingerprint"] == all[0]["fingerprint"]
                    && s["round"].is_null()
                    && s["peers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|p| alive.contains(&(p["id"].as_u64().unwrap_or(0) as usize)))
                        .all(|p| p["state"] == "live")
            });
            if agreed {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the cluster did not agree within {timeout:?}: {all:#?}\n{}",
                    self.debug_dump()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What node `i` answers each of `clients` in the http service of its family.
    pub fn answers(&self, i: usize, clients: &[IpAddr]) -> Result<BTreeMap<IpAddr, Answer>> {
        clients
            .iter()
            .map(|c| {
                let cs = c.to_string();
                let w = self.node_cli(
                    i,
                    &["sessions", "where", &cs, "--service", http_service(*c)],
                )?;
                let row = &w[0];
                let text = |k: &str| row[k].as_str().unwrap_or("-").to_string();
                Ok((
                    *c,
                    Answer {
                        backend: text("backend"),
                        maglev_backend: text("maglev_backend"),
                        source: text("source"),
                    },
                ))
            })
            .collect()
    }

    /// Adds the lab's backend `b` (running, maybe not configured) as `name` to every
    /// service through node `node`'s CLI.
    pub fn add_backend_everywhere(&self, node: usize, name: &str, b: usize) -> Result<()> {
        for svc in SERVICES {
            let addr: IpAddr = if svc.ends_with("v4") {
                backend_v4(b).into()
            } else {
                backend_v6(b).into()
            };
            self.add_backend(node, svc, name, addr)
                .with_context(|| format!("adding {name} to {svc} on node {node}"))?;
        }
        Ok(())
    }

    /// Node index -> clients with a session in one of `services` on that node (`xlb
    /// sessions list`), live nodes only. Without replication (or before any session
    /// diverges) a node holds a client's session only if it forwarded a packet of it.
    pub fn sessions_by_node(&self, services: &[&str]) -> Result<BTreeMap<usize, BTreeSet<IpAddr>>> {
        let mut out = BTreeMap::new();
        for i in self.alive_nodes() {
            let mut clients = BTreeSet::new();
            for svc in services {
                let list = self.node_cli(i, &["sessions", "list", "--service", svc])?;
                for s in list.as_array().into_iter().flatten() {
                    let c = s["client"]
                        .as_str()
                        .with_context(|| format!("a session without client: {s}"))?;
                    clients.insert(c.parse().with_context(|| format!("client {c:?}"))?);
                }
            }
            out.insert(i, clients);
        }
        Ok(out)
    }
}
