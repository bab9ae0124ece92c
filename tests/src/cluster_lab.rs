//! The cluster lab: xlb nodes behind a BIRD 2 router with ECMP and BFD.
//!
//! ```text
//!   client ns ── eth0 ═ rc0 ─┐ router ns (forwarding, BIRD: BGP + BFD, merge paths,
//!   10.78.0.100.. /24        │  L4 multipath hash)            br0 10.77.0.1/24 fd77::1/64
//!   fd78::100.. /64          └─ br0 ─┬─ p-lb1 ═ lb0 ── lb1 ns (10.77.0.11, xlb daemon + BIRD)
//!                                    ├─ p-lb2 ═ lb0 ── lb2 ns (10.77.0.12)
//!                                    ├─ p-lb3 ═ lb0 ── lb3 ns (10.77.0.13)
//!                                    ├─ p-be1 ═ eth0 ── be1 ns (10.77.0.21, VIPs on lo)
//!                                    ├─ p-be2 ═ eth0 ── be2 ns (10.77.0.22)
//!                                    └─ p-be3 ═ eth0 ── be3 ns (10.77.0.23)
//! ```
//! Each node's daemon keeps a route per ready VIP in its table 100 (`announce_table`);
//! its BIRD learns them and announces them to the router over BGP (one session per
//! family, next hop self, BFD). The router's BIRD merges the paths into one ECMP route
//! per VIP; client packets go client → router → a node (hashed on layer 4) → XDP rewrites
//! the MAC → a backend, which answers from the VIP through its default route, the
//! router, straight to the client (direct server return).
//!
//! Names: namespaces `xlb-<tag>-<pid>-c<n>-{rt,cl,lb1..,be1..}`, the bpffs directory
//! `/sys/fs/bpf/<id>` (each node's pins in `lb<i>/`) and the work directory `<tmp>/<id>`
//! (configs, sockets, BIRD files, per node in `lb<i>/`), all removed when the lab drops
//! (also on panic and on SIGINT/SIGTERM); leftovers of a dead process, the processes
//! still running in its namespaces included, are removed by the next lab with the same
//! tag ([`Lab::cleanup_stale`]).

use std::fmt;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bird::{self, Bird, Peer};
use crate::cleanup;
use crate::cmd;
use crate::daemon::{self, HealthOptions, StartOptions};
use crate::driver::Mode;
use crate::lab::{self, Lab};
use crate::netns::{NetNs, NsChild};
use crate::servers::{HTTP_PORT, ServerSpec, Servers, UDP_PORT};
use crate::xdp::{self, XdpMode, XdpPass};

/// The IPv4 VIP every node serves.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The IPv6 VIP every node serves.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);
/// The router's IPv4 address on the LB segment (`br0`).
pub const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The router's IPv6 address on the LB segment.
pub const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
/// The router's IPv4 address towards the client.
pub const ROUTER_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
/// The router's IPv6 address towards the client.
pub const ROUTER_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 1);
/// The MAC of the router's bridge (the gateway of nodes and backends).
pub const ROUTER_MAC: &str = "02:00:00:77:00:fe";
/// The kernel table the daemons announce into and their BIRDs learn from.
pub const ANNOUNCE_TABLE: u32 = 100;
/// The nodes' replication port (`[cluster] listen`).
pub const CLUSTER_PORT: u16 = 7946;
/// The lab's shared cluster key (tests forge frames with it and with others).
pub const CLUSTER_KEY: &str = "xlb-lab-cluster-key-0123456789abcdef";
/// Every node's interface on the LB segment.
pub const NODE_IF: &str = "lb0";
/// The client's and every backend's interface.
pub const HOST_IF: &str = "eth0";
/// The router's bridge (the LB segment).
pub const BRIDGE: &str = "br0";
/// The router's interface towards the client.
pub const ROUTER_CLIENT_IF: &str = "rc0";
/// The services of every node's config, in config order.
pub const SERVICES: [&str; 4] = ["http-v4", "echo-v4", "http-v6", "echo-v6"];
/// Most nodes, backends.
pub const MAX_NODES: usize = 9;
/// Most client addresses per family.
pub const MAX_CLIENTS: usize = 150;
/// Budget for links to come up and addresses to settle.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Budget for every node to become a next hop of both VIPs after the lab starts.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Numbers the cluster labs of this process so names stay unique.
static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Edits a node's generated daemon config: (node index, text) -> text to write. E.g.
/// appends a `[cluster]` section naming the peers (see [`node_v4`]).
pub type ConfigEdit = Arc<dyn Fn(usize, String) -> String + Send + Sync>;

/// Size and behaviour of a cluster lab.
#[derive(Clone)]
pub struct ClusterOptions {
    /// Load-balancer nodes lb1..lbN (1..=9).
    pub nodes: usize,
    /// Backends be1..beN (1..=9).
    pub backends: usize,
    /// Client IPv4 addresses (10.78.0.100 upwards).
    pub clients_v4: usize,
    /// Client IPv6 addresses (fd78::100 upwards).
    pub clients_v6: usize,
    /// XDP mode of the daemons (native gets an XDP_PASS on each node's bridge port).
    pub mode: Mode,
    /// Health checks of every service.
    pub health: HealthOptions,
    /// Edits each node's daemon config before it is written (and again on restart).
    pub edit: Option<ConfigEdit>,
    /// Backends be1..beK in the nodes' configs (default all); the rest run, to be added.
    pub configured: Option<usize>,
    /// Gives each node a `[cluster]` section naming the others (replication on).
    pub cluster: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            backends: 3,
            clients_v4: 32,
            clients_v6: 32,
            mode: Mode::Native,
            health: HealthOptions::default(),
            edit: None,
            configured: None,
            cluster: false,
        }
    }
}

impl ClusterOptions {
    /// Three nodes with `[cluster]`, backends be1..be3 configured and be4 running spare.
    pub fn replicated() -> Self {
        Self {
            backends: 4,
            configured: Some(3),
            cluster: true,
            ..Self::default()
        }
    }
}

impl fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("nodes", &self.nodes)
            .field("backends", &self.backends)
            .field("clients_v4", &self.clients_v4)
            .field("clients_v6", &self.clients_v6)
            .field("mode", &self.mode)
            .field("health", &self.health)
            .field("edit", &self.edit.is_some())
            .field("configured", &self.configured)
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// Node `i`'s IPv4 address (10.77.0.(10+i)).
pub fn node_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, (10 + i) as u8)
}

/// Node `i`'s IPv6 address (fd77::(10+i), written like the IPv4 one).
pub fn node_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, hex_like_decimal(10 + i))
}

/// Backend `i`'s IPv4 address (10.77.0.(20+i)).
pub fn backend_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, (20 + i) as u8)
}

/// Backend `i`'s IPv6 address (fd77::(20+i)).
pub fn backend_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, hex_like_decimal(20 + i))
}

/// The group whose hex digits read as `n` in decimal (21 -> 0x21), so `fd77::21` pairs
/// with 10.77.0.21.
fn hex_like_decimal(n: usize) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).unwrap_or(0)
}

/// The MAC of node `i`'s `lb0`: fixed, so a restarted node keeps the router's neighbour
/// entry valid.
fn node_mac(i: usize) -> String {
    format!("02:00:00:77:00:{i:02x}")
}

/// One load-balancer node: namespace, daemon and BIRD (absent while it is dead).
pub struct Node {
    /// 1-based index.
    pub index: usize,
    /// `lb<i>`.
    pub name: String,
    /// Its IPv4 address on the LB segment.
    pub ipv4: Ipv4Addr,
    /// Its IPv6 address on the LB segment.
    pub ipv6: Ipv6Addr,
    /// `<work dir>/lb<i>`: config, socket, state file, BIRD files.
    pub dir: PathBuf,
    /// `/sys/fs/bpf/<id>/lb<i>`: the daemon's pins.
    pub pins: PathBuf,
    // Drop order: daemon and BIRD before the XDP_PASS and the namespace.
    daemon: Option<NsChild>,
    bird: Option<Bird>,
    pass: Option<XdpPass>,
    ns: Option<NetNs>,
}

impl Node {
    /// The node's namespace (fails while it is dead).
    pub fn ns(&self) -> Result<&NetNs> {
        self.ns
            .as_ref()
            .with_context(|| format!("node {} is dead", self.name))
    }

    /// The daemon's control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("xlb.sock")
    }

    /// The daemon's config file.
    pub fn config(&self) -> PathBuf {
        self.dir.join("xlb.toml")
    }

    /// The daemon's log so far ("" while it is not running).
    pub fn daemon_log(&self) -> String {
        self.daemon.as_ref().map(NsChild::log).unwrap_or_default()
    }

    /// The daemon's process id (while it runs), e.g. to read its memory in `/proc`.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(NsChild::pid)
    }

    /// The node's BIRD (while it runs).
    pub fn bird(&self) -> Option<&Bird> {
        self.bird.as_ref()
    }

    /// Whether the node is alive (namespace, daemon, BIRD).
    pub fn alive(&self) -> bool {
        self.ns.is_some()
    }
}

/// A running cluster lab; dropping it stops the daemons, BIRDs and servers and removes
/// every namespace, pin and file it made.
pub struct ClusterLab {
    /// `xlb-<tag>-<pid>-c<n>`.
    pub id: String,
    /// Client IPv4 source addresses.
    pub client_v4: Vec<Ipv4Addr>,
    /// Client IPv6 source addresses.
    pub client_v6: Vec<Ipv6Addr>,
    /// The nodes, lb1 first.
    pub nodes: Vec<Node>,
    /// The backends' namespaces, be1 first.
    pub backends: Vec<NetNs>,
    opts: ClusterOptions,
    work_dir: PathBuf,
    bpffs_dir: PathBuf,
    // Drop order (see Drop): nodes, router BIRD, servers, then namespaces.
    router_bird: Option<Bird>,
    servers: Option<Servers>,
    /// The client namespace.
    pub client: NetNs,
    /// The router namespace.
    pub router: NetNs,
}

impl ClusterLab {
    /// Builds the topology, starts servers, daemons and BIRDs, and returns once the router
    /// has every node as a next hop of both VIPs.
    pub fn new(tag: &str, opts: ClusterOptions) -> Result<Self> {
        if !(1..=MAX_NODES).contains(&opts.nodes)
            || !(1..=MAX_NODES).contains(&opts.backends)
            || opts.clients_v4 > MAX_CLIENTS
            || opts.clients_v6 > MAX_CLIENTS
        {
            bail!("cluster lab: 1..={MAX_NODES} nodes and backends, ≤ {MAX_CLIENTS} clients");
        }
        if let Err(e) = Lab::cleanup_stale(tag) {
            eprintln!("xlb-tests: stale cleanup for tag {tag} failed: {e:#}");
        }
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("xlb-{tag}-{}-c{seq}", std::process::id());
        let started = Instant::now();
        let lab = match build(id.clone(), opts) {
            Ok(lab) => lab,
            Err(e) => {
                // Before the lab exists no Drop removes its directories.
                for dir in [
                    Path::new(lab::BPFFS).join(&id),
                    std::env::temp_dir().join(&id),
                ] {
                    let _ = remove_dir(&dir);
                    cleanup::remove_dir(&dir);
                }
                return Err(e.context(format!("building cluster lab {tag}")));
            }
        };
        let converged = lab.wait_all_next_hops(CONVERGE_TIMEOUT);
        if let Err(e) = converged {
            return Err(e.context(lab.debug_dump()));
        }
        eprintln!(
            "cluster lab {}: {} nodes are next hops of both VIPs {:?} after the start",
            lab.id,
            lab.nodes.len(),
            started.elapsed()
        );
        Ok(lab)
    }

    /// Both VIPs, IPv4 first.
    pub fn vips(&self) -> [IpAddr; 2] {
        [IpAddr::V4(VIP4), IpAddr::V6(VIP6)]
    }

    /// The VIP in the family of `addr`.
    pub fn vip_for(addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => IpAddr::V4(VIP4),
            IpAddr::V6(_) => IpAddr::V6(VIP6),
        }
    }

    /// Every client source address, IPv4 first.
    pub fn client_addrs(&self) -> Vec<IpAddr> {
        let v4 = self.client_v4.iter().map(|a| IpAddr::V4(*a));
        let v6 = self.client_v6.iter().map(|a| IpAddr::V6(*a));
        v4.chain(v6).collect()
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> Result<&Node> {
        i.checked_sub(1)
            .and_then(|k| self.nodes.get(k))
            .with_context(|| format!("no node {i}"))
    }

    fn node_mut(&mut self, i: usize) -> Result<&mut Node> {
        i.checked_sub(1)
            .and_then(|k| self.nodes.get_mut(k))
            .with_context(|| format!("no node {i}"))
    }

    /// The node index owning next-hop address `addr` (its IPv4, IPv6 or link-local address).
    pub fn node_of(&self, addr: IpAddr) -> Option<usize> {
        self.nodes
            .iter()
            .find(|n| IpAddr::V4(n.ipv4) == addr || IpAddr::V6(n.ipv6) == addr)
            .map(|n| n.index)
    }

    /// The router's next hops for `vip` in its main table (`ip -j route`, multipath aware).
    pub fn router_next_hops(&self, vip: IpAddr) -> Result<Vec<IpAddr>> {
        let (family, prefix) = match vip {
            IpAddr::V4(_) => ("-4", format!("{vip}/32")),
            IpAddr::V6(_) => ("-6", format!("{vip}/128")),
        };
        let routes = self.router.ip_json(&[family, "route", "show", &prefix])?;
        next_hops(&routes)
    }

    /// Polls (every 5 ms) until the router has exactly `n` next hops for `vip`; returns
    /// them and the time it took.
    pub fn wait_next_hops(
        &self,
        vip: IpAddr,
        n: usize,
        timeout: Duration,
    ) -> Result<(Vec<IpAddr>, Duration)> {
        let start = Instant::now();
        let mut last = Vec::new();
        // Bounded by the timeout; each look is one `ip` call.
        while start.elapsed() <= timeout {
            last = self.router_next_hops(vip)?;
            if last.len() == n {
                return Ok((last, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!(
            "the router has {} next hops for {vip} ({last:?}), not {n}, after {timeout:?}\n{}",
            last.len(),
            self.debug_dump()
        )
    }

    /// Waits until every live node is a next hop of both VIPs.
    pub fn wait_all_next_hops(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let alive: Vec<usize> = self
            .nodes
            .iter()
            .filter(|n| n.alive())
            .map(|n| n.index)
            .collect();
        for vip in self.vips() {
            let left = timeout.saturating_sub(start.elapsed());
            let (hops, _) = self.wait_next_hops(vip, alive.len(), left)?;
            let mut owners: Vec<usize> = hops.iter().filter_map(|h| self.node_of(*h)).collect();
            owners.sort_unstable();
            if owners != alive {
                bail!("next hops of {vip} are {hops:?}, not the live nodes {alive:?}");
            }
        }
        Ok(start.elapsed())
    }

    /// Kills node `i` silently, as a power loss would: its link goes first (no BGP
    /// NOTIFICATION, no withdraw can leave), then its daemon and BIRD get SIGKILL, then
    /// its namespace and pins go. Returns when the link was removed.
    pub fn kill_node(&mut self, i: usize) -> Result<Instant> {
        let port = format!("p-lb{i}");
        let router = self.router.name().to_owned();
        let node = self.node_mut(i)?;
        if node.ns.is_none() {
            bail!("node {i} is already dead");
        }
        cmd::ip(&["-n", &router, "link", "del", &port])
            .with_context(|| format!("removing node {i}'s link"))?;
        let cut = Instant::now();
        if let Some(d) = node.daemon.take() {
            d.kill_hard().context("killing the daemon")?;
        }
        if let Some(b) = node.bird.take() {
            b.child.kill_hard().context("killing BIRD")?;
        }
        node.pass = None;
        node.ns = None;
        remove_dir(&node.pins)?;
        Ok(cut)
    }

    /// Sends SIGTERM to node `i`'s daemon without waiting; returns when it was sent.
    pub fn sigterm_daemon(&self, i: usize) -> Result<Instant> {
        let node = self.node(i)?;
        let d = node
            .daemon
            .as_ref()
            .with_context(|| format!("node {i} has no daemon"))?;
        d.signal(libc::SIGTERM)?;
        Ok(Instant::now())
    }

    /// Whether node `i`'s daemon has exited (reaping it if so).
    pub fn daemon_exited(&mut self, i: usize) -> Result<Option<ExitStatus>> {
        let node = self.node_mut(i)?;
        match node.daemon.as_mut() {
            Some(d) => d.try_wait(),
            None => bail!("node {i} has no daemon"),
        }
    }

    /// Waits up to `timeout` for node `i`'s daemon to exit; returns its status and log.
    pub fn wait_daemon_exit(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> Result<(ExitStatus, String)> {
        let node = self.node_mut(i)?;
        let mut d = node
            .daemon
            .take()
            .with_context(|| format!("node {i} has no daemon"))?;
        let status = d.wait_timeout(timeout);
        let log = d.log();
        match status {
            Ok(s) => Ok((s, log)),
            Err(e) => {
                node.daemon = Some(d);
                Err(e)
            }
        }
    }

    /// Brings node `i` back after [`ClusterLab::kill_node`]: a new namespace and link,
    /// a fresh daemon (no pins, no state file) and BIRD. Returns once the daemon answers.
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        if self.node(i)?.alive() {
            bail!("node {i} is alive");
        }
        let (ns, pass) = plug_node(&self.id, &self.router, i, self.opts.mode)?;
        let opts = self.opts.clone();
        let node = self.node_mut(i)?;
        node.ns = Some(ns);
        node.pass = pass;
        for file in ["state.json", "xlb.sock"] {
            let _ = fs::remove_file(node.dir.join(file));
        }
        start_node(node, &opts)
    }

    /// Runs `xlb --socket <node i's socket> --json ARGS` in node `i`'s namespace and
    /// parses its JSON.
    pub fn node_cli(&self, i: usize, args: &[&str]) -> Result<serde_json::Value> {
        let node = self.node(i)?;
        daemon::ctl_in(node.ns()?, &node.socket(), args).with_context(|| {
            format!(
                "on node {i}; daemon log:\n{}",
                cmd::tail(node.daemon_log().as_bytes())
            )
        })
    }

    /// Adds backend `name` at `address` to `service` through node `i`'s CLI (its MAC is
    /// resolved by the daemon).
    pub fn add_backend(&self, i: usize, service: &str, name: &str, address: IpAddr) -> Result<()> {
        let addr = address.to_string();
        self.node_cli(i, &["backend", "add", service, &addr, "--name", name])?;
        Ok(())
    }

    /// Removes backend `name` from `service` through node `i`'s CLI.
    pub fn remove_backend(&self, i: usize, service: &str, name: &str) -> Result<()> {
        self.node_cli(i, &["backend", "remove", service, name])?;
        Ok(())
    }

    /// `birdc show protocols` of the router.
    pub fn router_protocols(&self) -> String {
        self.router_bird
            .as_ref()
            .map_or_else(|| "(no router BIRD)".into(), Bird::protocols)
    }

    /// What helps to understand a failure: the router's BIRD protocols and routes to the
    /// VIPs, and every live node's BIRD protocols and table 100.
    pub fn debug_dump(&self) -> String {
        let mut out = format!(
            "--- router: birdc show protocols\n{}",
            self.router_protocols()
        );
        for family in ["-4", "-6"] {
            let routes = self
                .router
                .ip(&[family, "route", "show"])
                .unwrap_or_else(|e| format!("{e:#}"));
            out.push_str(&format!("--- router: ip {family} route\n{routes}"));
        }
        for n in &self.nodes {
            let Some(ns) = n.ns.as_ref() else {
                out.push_str(&format!("--- {}: dead\n", n.name));
                continue;
            };
            let protocols = n
                .bird
                .as_ref()
                .map_or_else(|| "(no BIRD)".into(), Bird::protocols);
            let table = ns
                .ip(&["route", "show", "table", "all", "proto", "120"])
                .unwrap_or_else(|e| format!("{e:#}"));
            out.push_str(&format!(
                "--- {}: birdc show protocols\n{protocols}--- {}: xlb routes\n{table}",
                n.name, n.name
            ));
        }
        out
    }

    /// `<tmp>/<id>`: configs, sockets, state files, BIRD files.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "xlb-tests: cluster lab {} at the failure:\n{}",
                self.id,
                self.debug_dump()
            );
        }
        // Daemons and BIRDs first (NsChild drops terminate them), while their
        // namespaces still exist, then the router's BIRD and the servers.
        for n in &mut self.nodes {
            n.daemon = None;
            n.bird = None;
            n.pass = None;
        }
        self.router_bird = None;
        self.servers = None;
        for n in &mut self.nodes {
            n.ns = None;
        }
        for dir in [&self.bpffs_dir, &self.work_dir] {
            if let Err(e) = remove_dir(dir) {
                eprintln!("xlb-tests: {e:#}");
            }
            cleanup::remove_dir(dir);
        }
        // The router, client and backend namespaces drop right after this.
    }
}

/// Removes a directory tree if it exists.
fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The next hops of the routes in `ip -j route show` output: each route's `gateway`, or
/// the `gateway` of each of its `nexthops`; dead or link-down ones are left out.
pub fn next_hops(routes: &serde_json::Value) -> Result<Vec<IpAddr>> {
    let usable = |h: &serde_json::Value| {
        !h["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "dead" || x == "linkdown"))
    };
    let mut out = Vec::new();
    for r in routes.as_array().into_iter().flatten() {
        let hops: Vec<&serde_json::Value> = match r["nexthops"].as_array() {
            Some(list) => list.iter().collect(),
            None => vec![r],
        };
        for h in hops.into_iter().filter(|h| usable(h)) {
            if let Some(gw) = h["gateway"].as_str() {
                out.push(
                    gw.parse()
                        .with_context(|| format!("gateway {gw:?} in {r}"))?,
                );
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The daemon config of node `node`: both VIPs with HTTP and UDP services over every
/// backend (addresses only: the daemon resolves the MACs), health checks, table 100.
fn node_config(node: &Node, opts: &ClusterOptions) -> String {
    let h = &opts.health;
    let mut text = format!(
        "interface = \"{NODE_IF}\"\nxdp_mode = \"{}\"\npin_dir = \"{}\"\nmax_services = 4\n\
         maglev_table_size = 4099\nstate_file = \"{}\"\nannounce_table = {ANNOUNCE_TABLE}\n",
        opts.mode.as_str(),
        node.pins.display(),
        node.dir.join("state.json").display(),
    );
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let fam = if vip.is_ipv4() { "v4" } else { "v6" };
        for (name, port, proto, kind) in [
            (
                "http",
                HTTP_PORT,
                "tcp",
                "kind = \"http\"\nhttp_path = \"/\"\n",
            ),
            ("echo", UDP_PORT, "udp", "kind = \"udp\"\n"),
        ] {
            text.push_str(&format!(
                "\n[[service]]\nname = \"{name}-{fam}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"{proto}\"\n"
            ));
            for b in 1..=opts.configured.unwrap_or(opts.backends).min(opts.backends) {
                let addr = match vip {
                    IpAddr::V4(_) => IpAddr::V4(backend_v4(b)),
                    IpAddr::V6(_) => IpAddr::V6(backend_v6(b)),
                };
                text.push_str(&format!(
                    "[[service.backend]]\nname = \"be{b}\"\naddress = \"{addr}\"\n"
                ));
            }
            text.push_str(&format!(
                "[service.health]\n{kind}interval = \"{}\"\ntimeout = \"{}\"\nrise = {}\nfall = {}\n",
                h.interval, h.timeout, h.rise, h.fall
            ));
        }
    }
    if opts.cluster {
        let peers: Vec<String> = (1..=opts.nodes)
            .filter(|j| *j != node.index)
            .map(|j| format!("\"{j}@{}:{CLUSTER_PORT}\"", node_v4(j)))
            .collect();
        text.push_str(&format!(
            "\n[cluster]\nnode_id = {}\nlisten = \"{}:{CLUSTER_PORT}\"\nkey_file = \"{}\"\npeers = [{}]\n",
            node.index,
            node.ipv4,
            cluster_key_path(node).display(),
            peers.join(", ")
        ));
    }
    match &opts.edit {
        Some(edit) => edit(node.index, text),
        None => text,
    }
}

/// The lab's shared cluster key file (beside the nodes' directories).
fn cluster_key_path(node: &Node) -> PathBuf {
    node.dir.parent().unwrap_or(&node.dir).join("cluster.key")
}

/// Writes the lab's cluster key (mode 0600, as the daemon demands) if it is not there.
fn write_cluster_key(node: &Node) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = cluster_key_path(node);
    if path.exists() {
        return Ok(());
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, CLUSTER_KEY.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes node `node`'s config and starts its daemon, then its BIRD.
fn start_node(node: &mut Node, opts: &ClusterOptions) -> Result<()> {
    if opts.cluster {
        write_cluster_key(node)?;
    }
    let config = node.config();
    fs::write(&config, node_config(node, opts))
        .with_context(|| format!("writing {}", config.display()))?;
    let ns = node.ns()?;
    let d = daemon::start_in(ns, &node.socket(), &config, &StartOptions::default())
        .with_context(|| format!("starting the daemon of {}", node.name))?;
    let peer = Peer {
        index: node.index,
        ipv4: node.ipv4,
        ipv6: node.ipv6,
    };
    let text = bird::node_config(&peer, NODE_IF, ANNOUNCE_TABLE, ROUTER_V4, ROUTER_V6);
    let b = Bird::start(ns, &node.dir, "bird", &text)
        .with_context(|| format!("starting BIRD of {}", node.name))?;
    node.daemon = Some(d);
    node.bird = Some(b);
    Ok(())
}

/// Creates node `i`'s namespace and its link to the router's bridge (`p-lb<i>` ═ `lb0`),
/// addressed and up; with native XDP, an XDP_PASS on the bridge port so XDP_TX delivers.
fn plug_node(id: &str, router: &NetNs, i: usize, mode: Mode) -> Result<(NetNs, Option<XdpPass>)> {
    let ns = NetNs::create(&format!("{id}-lb{i}"))?;
    ns.sysctls(lab::COMMON_SYSCTLS)?;
    let port = format!("p-lb{i}");
    router.ip_batch(&format!(
        "link add {port} type veth peer name {NODE_IF} netns {nsname}\n\
         link set {port} master {BRIDGE}\nlink set {port} up\n",
        nsname = ns.name()
    ))?;
    ns.ip_batch(&format!(
        "link set {NODE_IF} address {mac}\nlink set {NODE_IF} up\n\
         addr add {v4}/24 dev {NODE_IF}\naddr add {v6}/64 dev {NODE_IF} nodad\n\
         route add default via {ROUTER_V4}\nroute add default via {ROUTER_V6}\n",
        mac = node_mac(i),
        v4 = node_v4(i),
        v6 = node_v6(i),
    ))?;
    ns.exec_ok(&["ethtool", "-K", NODE_IF, "tx", "off"])?;
    router.exec_ok(&["ethtool", "-K", &port, "tx", "off"])?;
    cmd::wait_until(
        "the node's link up",
        READY_TIMEOUT,
        Duration::from_millis(20),
        || Ok(lab::link_up(&ns, NODE_IF)? && lab::link_up(router, &port)?),
    )?;
    let pass = match mode {
        Mode::Native => Some(xdp::attach_pass(router, &port, XdpMode::Native)?),
        Mode::Generic => None,
    };
    Ok((ns, pass))
}

/// Builds everything; every namespace is owned by a guard, so an error undoes it all.
fn build(id: String, opts: ClusterOptions) -> Result<ClusterLab> {
    let ns_name = |role: &str| format!("{id}-{role}");
    let bpffs_dir = Path::new(lab::BPFFS).join(&id);
    let work_dir = std::env::temp_dir().join(&id);
    cleanup::install_signal_cleanup();
    cleanup::add_dir(&bpffs_dir);
    cleanup::add_dir(&work_dir);
    if !lab::bpffs_mounted() {
        bail!(
            "bpffs is not mounted at {} (cargo xtask setup mounts it)",
            lab::BPFFS
        );
    }
    fs::create_dir(&bpffs_dir).with_context(|| format!("creating {}", bpffs_dir.display()))?;
    fs::create_dir(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&work_dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", work_dir.display()))?;
    }

    let router = NetNs::create(&ns_name("rt"))?;
    router.sysctls(lab::COMMON_SYSCTLS)?;
    router.sysctls(&[
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        // Layer-4 hashing: one client's connections spread over the nodes.
        ("net.ipv4.fib_multipath_hash_policy", "1"),
        ("net.ipv6.fib_multipath_hash_policy", "1"),
    ])?;
    let client = NetNs::create(&ns_name("cl"))?;
    client.sysctls(lab::COMMON_SYSCTLS)?;
    client.sysctls(&[("net.ipv4.tcp_tw_reuse", "1")])?;

    // The router: bridge (LB segment) and the client link. The bridge's MAC is set: by
    // default it takes the lowest of its ports', so plugging or removing a node would
    // change the gateway's MAC under every backend's and node's neighbour cache.
    router.ip_batch(&format!(
        "link add {BRIDGE} address {ROUTER_MAC} type bridge stp_state 0 mcast_snooping 0\n\
         link set {BRIDGE} up\n\
         addr add {ROUTER_V4}/24 dev {BRIDGE}\naddr add {ROUTER_V6}/64 dev {BRIDGE} nodad\n\
         link add {ROUTER_CLIENT_IF} type veth peer name {HOST_IF} netns {cl}\n\
         addr add {ROUTER_CLIENT_V4}/24 dev {ROUTER_CLIENT_IF}\n\
         addr add {ROUTER_CLIENT_V6}/64 dev {ROUTER_CLIENT_IF} nodad\nlink set {ROUTER_CLIENT_IF} up\n",
        cl = client.name(),
    ))?;
    router.exec_ok(&["ethtool", "-K", ROUTER_CLIENT_IF, "tx", "off"])?;

    let client_v4: Vec<Ipv4Addr> = (0..opts.clients_v4)
        .map(|k| Ipv4Addr::new(10, 78, 0, (100 + k) as u8))
        .collect();
    let client_v6: Vec<Ipv6Addr> = (0..opts.clients_v6)
        .map(|k| Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, hex_like_decimal(100 + k)))
        .collect();
    let mut script = format!("link set {HOST_IF} up\n");
    for a in &client_v4 {
        script.push_str(&format!("addr add {a}/24 dev {HOST_IF}\n"));
    }
    for a in &client_v6 {
        script.push_str(&format!("addr add {a}/64 dev {HOST_IF} nodad\n"));
    }
    script.push_str(&format!(
        "route add default via {ROUTER_CLIENT_V4}\nroute add default via {ROUTER_CLIENT_V6}\n"
    ));
    client.ip_batch(&script)?;
    client.exec_ok(&["ethtool", "-K", HOST_IF, "tx", "off"])?;

    let mut backends = Vec::with_capacity(opts.backends);
    let mut specs = Vec::with_capacity(opts.backends);
    for b in 1..=opts.backends {
        let ns = NetNs::create(&ns_name(&format!("be{b}")))?;
        ns.sysctls(lab::COMMON_SYSCTLS)?;
        // Direct server return: the VIPs on lo are never answered or announced over ARP.
        ns.sysctls(&[
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
        ])?;
        let port = format!("p-be{b}");
        router.ip_batch(&format!(
            "link add {port} type veth peer name {HOST_IF} netns {nsname}\n\
             link set {port} master {BRIDGE}\nlink set {port} up\n",
            nsname = ns.name()
        ))?;
        router.exec_ok(&["ethtool", "-K", &port, "tx", "off"])?;
        let (v4, v6) = (backend_v4(b), backend_v6(b));
        ns.ip_batch(&format!(
            "link set {HOST_IF} up\naddr add {v4}/24 dev {HOST_IF}\naddr add {v6}/64 dev {HOST_IF} nodad\n\
             addr add {VIP4}/32 dev lo\naddr add {VIP6}/128 dev lo nodad\n\
             route add default via {ROUTER_V4}\nroute add default via {ROUTER_V6}\n"
        ))?;
        ns.sysctls(&[
            ("net.ipv4.conf.eth0.arp_ignore", "1"),
            ("net.ipv4.conf.eth0.arp_announce", "2"),
        ])?;
        ns.exec_ok(&["ethtool", "-K", HOST_IF, "tx", "off"])?;
        specs.push(ServerSpec {
            name: format!("be{b}"),
            netns: ns.path().to_owned(),
            udp_addrs: vec![
                IpAddr::V4(VIP4),
                IpAddr::V6(VIP6),
                IpAddr::V4(v4),
                IpAddr::V6(v6),
            ],
        });
        backends.push(ns);
    }

    let mut hosts: Vec<(&NetNs, &str)> = vec![(&client, HOST_IF), (&router, ROUTER_CLIENT_IF)];
    hosts.extend(backends.iter().map(|b| (b, HOST_IF)));
    cmd::wait_until(
        "cluster lab links up and addresses settled",
        READY_TIMEOUT,
        Duration::from_millis(50),
        || {
            for (ns, ifname) in &hosts {
                if !lab::link_up(ns, ifname)? || lab::has_tentative(ns)? {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    let servers = Servers::start_specs(specs).context("starting backend servers")?;

    let mut lab = ClusterLab {
        client_v4,
        client_v6,
        nodes: Vec::new(),
        backends,
        work_dir: work_dir.clone(),
        bpffs_dir: bpffs_dir.clone(),
        router_bird: None,
        servers: Some(servers),
        client,
        router,
        id,
        opts,
    };
    // From here on the lab's Drop undoes everything.
    for i in 1..=lab.opts.nodes {
        let dir = work_dir.join(format!("lb{i}"));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (ns, pass) = plug_node(&lab.id, &lab.router, i, lab.opts.mode)?;
        lab.nodes.push(Node {
            index: i,
            name: format!("lb{i}"),
            ipv4: node_v4(i),
            ipv6: node_v6(i),
            pins: bpffs_dir.join(format!("lb{i}")),
            dir,
            daemon: None,
            bird: None,
            pass,
            ns: Some(ns),
        });
    }
    let opts = lab.opts.clone();
    for node in &mut lab.nodes {
        start_node(node, &opts)?;
    }
    let peers: Vec<Peer> = lab
        .nodes
        .iter()
        .map(|n| Peer {
            index: n.index,
            ipv4: n.ipv4,
            ipv6: n.ipv6,
        })
        .collect();
    let text = bird::router_config(ROUTER_V4, ROUTER_V6, BRIDGE, &peers);
    lab.router_bird = Some(Bird::start(&lab.router, &work_dir, "router-bird", &text)?);
    Ok(lab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_like_their_ipv4_twins() {
        assert_eq!(node_v6(1).to_string(), "fd77::11");
        assert_eq!(backend_v6(3).to_string(), "fd77::23");
        assert_eq!(VIP6.to_string(), "fd99::1");
    }

    #[test]
    fn next_hops_of_single_and_multipath_routes() {
        let multi = serde_json::json!([{
            "dst": "10.99.0.1", "protocol": "bird",
            "nexthops": [
                {"gateway": "10.77.0.12", "dev": "br0", "weight": 1, "flags": []},
                {"gateway": "10.77.0.11", "dev": "br0", "weight": 1, "flags": []},
                {"gateway": "10.77.0.13", "dev": "br0", "weight": 1, "flags": ["dead", "linkdown"]}
            ]
        }]);
        let hops = next_hops(&multi).expect("parse");
        assert_eq!(
            hops,
            vec![
                "10.77.0.11".parse::<IpAddr>().expect("ip"),
                "10.77.0.12".parse().expect("ip"),
            ]
        );
        let single = serde_json::json!([{"dst": "fd99::1", "gateway": "fd77::11", "dev": "br0", "flags": []}]);
        assert_eq!(
            next_hops(&single).expect("parse"),
            vec!["fd77::11".parse::<IpAddr>().expect("ip")]
        );
        assert!(next_hops(&serde_json::json!([])).expect("parse").is_empty());
    }
}
