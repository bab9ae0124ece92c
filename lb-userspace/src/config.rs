//! TOML configuration: parsing and validation.
//!
//! The file is read into raw serde structs (unknown fields rejected), then
//! checked field by field into the typed [`Config`]. Every validation error
//! names the field path and the bad value, e.g.
//! `service[1] ("web").backend[0].mac: "zz:00:00:00:00:01" is not a MAC address ...`.
//!
//! ```toml
//! interface = "eth0"              # required
//! xdp_mode = "native"             # "native" (default) | "generic"
//! pin_dir = "/sys/fs/bpf/xlb"     # default; pins go to <pin_dir>/<interface>/; absolute, no "..",
//!                                 # on bpffs (checked when loading: xlb may mount /sys/fs/bpf first)
//! affinity_max_entries = 262144   # default; 1..=100000000
//! maglev_table_size = 65537       # default; prime, 3..=1000003
//! max_services = 16               # default; 1..=256
//! state_file = "/var/lib/xlb/eth0.state.json"  # default /var/lib/xlb/<interface>.state.json;
//!                                 # the daemon's runtime changes (add/remove/drain/weight)
//! metrics_address = "127.0.0.1:9433"  # default: unset (no metrics endpoint); the daemon
//!                                 # serves Prometheus text at http://ADDRESS/metrics
//! health_source_v4 = "10.0.0.2"   # default: unset; source address of IPv4 health checks
//! encap_source_v4 = "10.0.0.2"    # default: unset; outer source of IPv4 "ipip" packets; unset: the
//!                                 # route's preferred source (else the egress interface's address)
//! encap_source_v6 = "2001:db8::2" # default: unset; the same for IPv6
//! health_source_v6 = "2001:db8::2"  # default: unset; source address of IPv6 health checks;
//!                                 # unset: the interface's own non-VIP address of the family.
//!                                 # Never a VIP, unspecified, multicast, loopback (or v6 link-local)
//! announce_table = 100            # default: unset (no announcing); the daemon keeps a host route
//!                                 # (/32, /128; dev <interface>, proto 120 "xlb") in this kernel
//!                                 # routing table for every VIP it is ready to serve, for a BGP
//!                                 # speaker (BIRD) to export; 1..=4294967295 except 253, 254, 255
//!                                 # (the kernel's default, main and local tables); read at start
//!
//! [cluster]                       # optional; without it the node is alone (see README "Cluster")
//! node_id = 1                     # required, 1..=65535, unique in the cluster
//! listen = "10.0.0.2:7946"        # required: where peers' replication messages arrive (TCP)
//! key_file = "/etc/xlb/cluster.key"  # required: the shared key (>= 32 bytes of text, mode 0600)
//! peers = ["2@10.0.0.3:7946", "3@10.0.0.4:7946"]  # required: every other node as ID@ADDRESS:PORT
//! sync_timeout = "3s"             # default "3s": how long a starting node waits for its peers'
//!                                 # full sync before it serves alone; 100ms..=60s
//!
//! [[service]]
//! name = "web"                    # required, unique, [A-Za-z0-9_.-]{1,64}
//! vip = "10.0.0.10"               # required, IPv4 or IPv6
//! port = 80                       # required, 1..=65535
//! protocol = "tcp"                # required, "tcp" | "udp"
//! affinity_prefix_v4 = 32         # default 32, 0..=32
//! affinity_prefix_v6 = 128        # default 128, 0..=128
//! affinity_timeout = "300s"       # default "300s"; 100ms..=30 days
//! affinity_admit_rate = 16384     # default max(affinity_max_entries / 16, 10000); new sessions per second
//!                                 # per CPU this service may add to the affinity map (above it,
//!                                 # new clients get their Maglev answer without an entry);
//!                                 # 0 = no limit; 0..=100000000
//! forward_mode = "dsr"            # default "dsr" (layer-2: MAC rewrite, backends on the LB's segment)
//!                                 # | "ipip" (layer-3: IP-in-IP to the backend's address, via the
//!                                 # kernel's route; backends anywhere, decapsulating)
//!
//! [[service.backend]]
//! name = "b1"                     # default: the address as text
//! address = "10.0.0.21"           # required, same family as the vip; not loopback, unspecified,
//!                                 # multicast, 255.255.255.255 or the vip of any service
//! mac = "02:00:00:00:00:21"       # optional ("dsr" only), unicast, not all-zero, not the interface's
//!                                 # own; default: resolved from the kernel's neighbours (kept current)
//! weight = 1                      # default 1, 1..=65535
//! state = "active"                # default "active" | "draining" | "down"
//!
//! [service.health]                # optional; without it the daemon never marks backends down
//! kind = "http"                   # default "tcp" for tcp services, "udp" for udp services;
//!                                 # "tcp" (connect), "http" (GET, expect a status; tcp services
//!                                 # only), "udp" (send, expect a reply)
//! port = 80                       # default the service port; checks go to the backend's own address
//!                                 # (via "direct") or to the vip (via "tunnel")
//! via = "direct"                  # default "direct" (to the backend's own address) | "tunnel" ("ipip"
//!                                 # services, kinds "tcp"/"udp": the probe goes IP-in-IP to the backend,
//!                                 # addressed to vip:port, proving the backend accepts VIP traffic)
//! interval = "2s"                 # default "2s" (HAProxy `inter`); 100ms..=1h; checks are spread over it
//! timeout = "1s"                  # default "1s" (capped at interval); 10ms..=interval
//! rise = 2                        # default 2: consecutive successes that bring a down backend up; 1..=100
//! fall = 3                        # default 3: consecutive failures that take an up backend down; 1..=100
//! http_path = "/"                 # kind "http" only; default "/"; must start with '/'
//! http_status = 200               # kind "http" only; default 200; the status the answer must have
//! udp_send = "ping"               # kind "udp" only; default "ping"; the datagram sent
//! udp_expect = ""                 # kind "udp" only; default "" (any reply); text the reply must contain
//! source = "10.0.0.2"             # default: health_source_v4/_v6, else detected; same family as the vip
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::maglev::{self, MAX_TABLE_SIZE};

/// Default `pin_dir`: the per-interface pin directories live below it.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb";
/// Default `max_services`.
pub const DEFAULT_MAX_SERVICES: u32 = 16;
/// Default per-service `affinity_timeout`.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest `affinity_max_entries`: keeps a typo from asking the kernel for gigabytes.
pub const MAX_AFFINITY_ENTRIES: u32 = 100_000_000;
/// Longest `affinity_timeout`.
pub const MAX_AFFINITY_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Shortest `affinity_timeout`: below it sessions expire between a client's
/// packets, which is a typo ("300ns" for "300s"), not a policy.
pub const MIN_AFFINITY_TIMEOUT: Duration = Duration::from_millis(100);
/// Shortest health-check `timeout`: below it every check fails.
pub const MIN_HEALTH_TIMEOUT: Duration = Duration::from_millis(10);

/// Default health-check interval (HAProxy's `inter`).
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default health-check timeout (never longer than the interval).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default consecutive successes that bring a backend up (HAProxy's `rise`).
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Default consecutive failures that take a backend down (HAProxy's `fall`).
pub const DEFAULT_HEALTH_FALL: u32 = 3;
/// Directory of the default state file.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/xlb";
/// Longest drain deadline (`xlb backend drain --deadline`): a typo must not pin a backend for ever.
pub const MAX_DRAIN_DEADLINE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Largest Maglev weight (weights are `u16` in the kernel's backend record).
pub const MAX_WEIGHT: u16 = u16::MAX;

/// The kernel's own routing tables (default, main, local): never an `announce_table`.
const RESERVED_TABLES: [u32; 3] = [253, 254, 255];
/// Longest interface name the kernel accepts (IFNAMSIZ less the NUL).
const MAX_INTERFACE_LEN: usize = 15;
/// Longest service or backend name.
const MAX_NAME_LEN: usize = 64;

/// A validated xlb configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Interface the XDP program attaches to (required; 1..=15 bytes).
    pub interface: String,
    /// How XDP attaches; default [`XdpMode::Native`].
    pub xdp_mode: XdpMode,
    /// Root of the pins (absolute); default [`DEFAULT_PIN_DIR`]. See [`Config::pin_path`].
    pub pin_dir: PathBuf,
    /// Capacity of the affinity LRU map; default `lb_common::DEFAULT_AFFINITY_ENTRIES`, 1..=100_000_000.
    pub affinity_max_entries: u32,
    /// Entries per Maglev table; default `lb_common::DEFAULT_MAGLEV_TABLE_SIZE`, prime, 3..=1_000_003.
    pub maglev_table_size: u32,
    /// Service slots; sizes the Maglev map (`max_services * 2 * maglev_table_size`); default 16, 1..=`lb_common::MAX_SERVICES`.
    pub max_services: u32,
    /// The services (`[[service]]`), in file order; at most `max_services`.
    pub services: Vec<ServiceConfig>,
    /// Where the daemon keeps runtime changes (absolute); default `/var/lib/xlb/<interface>.state.json`.
    pub state_file: PathBuf,
    /// Address of the daemon's Prometheus endpoint (`/metrics`); default none (off).
    pub metrics_address: Option<SocketAddr>,
    /// Source of IPv4 health checks of services without `health.source`; default none (detected).
    pub health_source_v4: Option<Ipv4Addr>,
    /// Source of IPv6 health checks of services without `health.source`; default none (detected).
    pub health_source_v6: Option<Ipv6Addr>,
    /// Outer source of IPv4 `ipip` packets; default none (the route's preferred source).
    pub encap_source_v4: Option<Ipv4Addr>,
    /// Outer source of IPv6 `ipip` packets; default none (the route's preferred source).
    pub encap_source_v6: Option<Ipv6Addr>,
    /// Kernel routing table the daemon announces ready VIPs in; default none (no announcing).
    pub announce_table: Option<u32>,
    /// The cluster this node replicates with (`[cluster]`); default none (alone).
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this node's identity and its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster (1..=65535).
    pub node_id: u32,
    /// Where this node accepts its peers' replication connections.
    pub listen: SocketAddr,
    /// The shared key's file (read at start; mode 0600).
    pub key_file: PathBuf,
    /// Every other node: id and replication address.
    pub peers: std::collections::BTreeMap<u32, SocketAddr>,
    /// How long a starting node waits for its peers' full sync.
    pub sync_timeout: std::time::Duration,
}

/// How a service's frames reach its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardMode {
    /// `"dsr"`: layer-2 direct server return (destination MAC rewritten).
    #[default]
    Dsr,
    /// `"ipip"`: layer-3 direct server return (IP-in-IP to the backend's address).
    Ipip,
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XdpMode {
    /// In the driver (`"native"`, the default): fast, needs driver support.
    #[default]
    Native,
    /// In the generic network stack (`"generic"`): works everywhere, slower.
    Generic,
}

/// One load-balanced service (`[[service]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Unique name, `[A-Za-z0-9_.-]{1,64}` (required).
    pub name: String,
    /// Virtual IP clients connect to, IPv4 or IPv6 (required).
    pub vip: IpAddr,
    /// Destination port, 1..=65535 (required).
    pub port: u16,
    /// Transport protocol (required).
    pub protocol: Protocol,
    /// IPv4 clients sharing this many leading bits share a backend; default 32, 0..=32.
    pub affinity_prefix_v4: u8,
    /// IPv6 clients sharing this many leading bits share a backend; default 128, 0..=128.
    pub affinity_prefix_v6: u8,
    /// Idle time after which a client is re-selected; default 300s, > 0 and <= 30 days.
    pub affinity_timeout: Duration,
    /// New affinity entries per second per CPU; 0 = no limit; default
    /// [`default_admit_rate`].
    pub affinity_admit_rate: u32,
    /// How frames reach the backends; default [`ForwardMode::Dsr`].
    pub forward_mode: ForwardMode,
    /// The backends (`[[service.backend]]`), in file order; at least one.
    pub backends: Vec<BackendConfig>,
    /// Health checks of every backend (`[service.health]`); none when absent.
    pub health: Option<HealthConfig>,
}

impl ServiceConfig {
    /// `affinity_timeout` in nanoseconds, as the kernel compares it (saturating).
    pub fn affinity_timeout_ns(&self) -> u64 {
        u64::try_from(self.affinity_timeout.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Health checks of a service's backends (`[service.health]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// What one check does.
    pub kind: HealthKind,
    /// Port checked (on the backend's own address, or on the VIP when tunnelled); default the service port.
    pub port: u16,
    /// Which way the checks reach the backend; default [`HealthVia::Direct`].
    pub via: HealthVia,
    /// Time between two checks of one backend; default 2s, 100ms..=1h.
    pub interval: Duration,
    /// Longest one check may take; default 1s (capped at the interval), > 0 and <= interval.
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up; default 2, 1..=100.
    pub rise: u32,
    /// Consecutive failures that take an up backend down; default 3, 1..=100.
    pub fall: u32,
    /// Source address of the checks (`source`), same family as the vip and never a VIP;
    /// default none: the global `health_source_v4`/`_v6`, else the detected one.
    pub source: Option<IpAddr>,
}

/// Which way a health check reaches its backend (`via`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HealthVia {
    /// `"direct"`: to the backend's own address.
    #[default]
    Direct,
    /// `"tunnel"`: to the VIP, IP-in-IP encapsulated to the backend's address as the
    /// dataplane sends clients' packets (`"ipip"` services; kinds `"tcp"` and `"udp"`).
    Tunnel,
}

impl fmt::Display for HealthVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthVia::Direct => "direct",
            HealthVia::Tunnel => "tunnel",
        })
    }
}

/// One kind of health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthKind {
    /// `"tcp"`: a TCP connect succeeds.
    Tcp,
    /// `"http"`: `GET path` answers with `status`.
    Http {
        /// Request path (`http_path`, default "/").
        path: String,
        /// Expected status code (`http_status`, default 200).
        status: u16,
    },
    /// `"udp"`: a datagram gets a reply containing `expect`.
    Udp {
        /// Payload sent (`udp_send`, default "ping").
        send: String,
        /// Text the reply must contain (`udp_expect`, default "": any reply).
        expect: String,
    },
}

impl fmt::Display for HealthKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthKind::Tcp => f.write_str("tcp"),
            HealthKind::Http { path, status } => write!(f, "http GET {path} expecting {status}"),
            HealthKind::Udp { .. } => f.write_str("udp"),
        }
    }
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `"tcp"`.
    Tcp,
    /// `"udp"`.
    Udp,
}

impl Protocol {
    /// IANA protocol number (`lb_common::PROTO_TCP` / `PROTO_UDP`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One backend of a service (`[[service.backend]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// Unique within the service, `[A-Za-z0-9_.:-]{1,64}`; default the address as text.
    pub name: String,
    /// Backend address, same family as the service's vip (required).
    pub address: IpAddr,
    /// Backend MAC, the destination of forwarded frames ("dsr" only; unicast);
    /// all-zero when not given: resolved from the kernel's neighbours.
    pub mac: [u8; 6],
    /// Maglev weight; default 1, 1..=65535.
    pub weight: u16,
    /// Administrative state; default [`BackendState::Active`].
    pub state: BackendState,
}

/// Administrative state of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    /// `"active"`: takes existing and new clients.
    Active,
    /// `"draining"`: keeps its existing clients, gets no new ones.
    Draining,
    /// `"down"`: gets no traffic; its clients move elsewhere at once.
    Down,
}

impl BackendState {
    /// The `lb_common::BACKEND_*` value the kernel reads.
    pub fn to_abi(self) -> u8 {
        match self {
            BackendState::Active => lb_common::BACKEND_ACTIVE,
            BackendState::Draining => lb_common::BACKEND_DRAINING,
            BackendState::Down => lb_common::BACKEND_DOWN,
        }
    }
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("in config file {}", path.display()))
    }

    /// Parses and validates config text; TOML errors keep toml's line/column message.
    /// The settings of `self` that `new` changes and a running daemon cannot:
    /// a reload naming one is refused. Sorted by destructuring every field, so
    /// a new field does not compile until it is placed on one side or the other.
    pub fn boot_changes(&self, new: &Config) -> Vec<&'static str> {
        let Config {
            interface,
            xdp_mode,
            pin_dir,
            affinity_max_entries,
            maglev_table_size,
            max_services,
            state_file,
            metrics_address,
            announce_table,
            cluster,
            // Reloadable: the reload applies them.
            services: _,
            health_source_v4: _,
            health_source_v6: _,
            encap_source_v4: _,
            encap_source_v6: _,
        } = self;
        let mut out = Vec::new();
        let mut note = |changed: bool, field: &'static str| {
            if changed {
                out.push(field);
            }
        };
        note(*interface != new.interface, "interface");
        note(*xdp_mode != new.xdp_mode, "xdp_mode");
        note(*pin_dir != new.pin_dir, "pin_dir");
        note(
            *affinity_max_entries != new.affinity_max_entries,
            "affinity_max_entries",
        );
        note(
            *maglev_table_size != new.maglev_table_size,
            "maglev_table_size",
        );
        note(*max_services != new.max_services, "max_services");
        note(*state_file != new.state_file, "state_file");
        note(*metrics_address != new.metrics_address, "metrics_address");
        note(*announce_table != new.announce_table, "announce_table");
        note(*cluster != new.cluster, "[cluster]");
        out
    }

    pub fn parse(text: &str) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text)?;
        validate(raw)
    }

    /// Directory of this instance's pins: `<pin_dir>/<interface>`.
    pub fn pin_path(&self) -> PathBuf {
        self.pin_dir.join(&self.interface)
    }

    /// (name, VIP) of every service: no backend may be one of them.
    pub fn vips(&self) -> Vec<(&str, IpAddr)> {
        self.services
            .iter()
            .map(|s| (s.name.as_str(), s.vip))
            .collect()
    }

    /// Refuses backends whose MAC is `own_mac`, the MAC of the interface XDP
    /// attaches to: frames rewritten to it would come back to the load balancer.
    pub fn check_against_interface(&self, own_mac: [u8; 6]) -> Result<()> {
        for (i, svc) in self.services.iter().enumerate() {
            for (j, be) in svc.backends.iter().enumerate() {
                check_not_own_mac(
                    &format!("service[{i}] ({:?}).backend[{j}].mac", svc.name),
                    be.mac,
                    own_mac,
                    &self.interface,
                )?;
            }
        }
        Ok(())
    }
}

/// Checks a backend address for a service whose VIP is `vip`: same family,
/// unicast and routable to a host ([`validate_unicast_backend`]), and not the
/// VIP of any service in `vips` (name, VIP). `path` names the field in errors.
pub fn validate_backend_address(
    path: &str,
    address: IpAddr,
    vip: IpAddr,
    vips: &[(&str, IpAddr)],
) -> Result<()> {
    if address.is_ipv4() != vip.is_ipv4() {
        bail!(
            "{path}: {address} is {} but the service vip {vip} is {} (the address family must match)",
            family(address),
            family(vip)
        );
    }
    if address == vip {
        bail!("{path}: {address} is the service's own vip");
    }
    validate_unicast_backend(path, address)?;
    // Forwarded frames keep the VIP as destination; a backend that is
    // another service's VIP would be this load balancer again.
    if let Some((name, _)) = vips.iter().find(|(_, v)| *v == address) {
        bail!("{path}: {address} is the VIP of service {name:?}");
    }
    Ok(())
}

/// The checks of [`validate_backend_address`] that need no service: refuses
/// loopback, unspecified, multicast and IPv4 broadcast addresses (also written
/// as IPv4-mapped IPv6).
pub fn validate_unicast_backend(path: &str, address: IpAddr) -> Result<()> {
    let canonical = address.to_canonical();
    let what = if canonical.is_loopback() {
        "a loopback address"
    } else if canonical.is_unspecified() {
        "the unspecified address"
    } else if canonical.is_multicast() {
        "a multicast address"
    } else if canonical == IpAddr::V4(Ipv4Addr::BROADCAST) {
        "the IPv4 broadcast address"
    } else {
        return Ok(());
    };
    bail!("{path}: {address} is {what}, not a backend")
}

/// Parses a backend MAC ([`parse_mac`]: six octets, unicast, not all-zero), naming `path` in errors.
pub fn validate_mac(path: &str, text: &str) -> Result<[u8; 6]> {
    parse_mac(text).map_err(|e| anyhow::anyhow!("{path}: {e}"))
}

/// Refuses a backend MAC equal to `own_mac`, the MAC of `interface` (the load balancer's own).
pub fn check_not_own_mac(
    path: &str,
    mac: [u8; 6],
    own_mac: [u8; 6],
    interface: &str,
) -> Result<()> {
    if mac == own_mac {
        bail!(
            "{path}: {} is the MAC of {interface}, the load balancer's own interface \
             (frames forwarded there would come back to it)",
            format_mac(&mac)
        );
    }
    Ok(())
}

/// Refuses a Maglev weight outside 1..=[`MAX_WEIGHT`] (0 would take the backend
/// out of the table while it still looks active).
pub fn validate_weight(path: &str, weight: u16) -> Result<()> {
    if weight == 0 {
        bail!("{path}: 0 is out of range 1..={MAX_WEIGHT}");
    }
    Ok(())
}

/// Refuses a drain deadline of zero (that is `xlb backend remove`) or over [`MAX_DRAIN_DEADLINE`].
pub fn validate_deadline(d: Duration) -> Result<()> {
    if d.is_zero() {
        bail!(
            "drain deadline 0s: must be more than 0 (use `xlb backend remove` to move clients now)"
        );
    }
    if d > MAX_DRAIN_DEADLINE {
        bail!(
            "drain deadline {} is longer than {} (the longest allowed)",
            humantime::format_duration(d),
            humantime::format_duration(MAX_DRAIN_DEADLINE)
        );
    }
    Ok(())
}

/// Refuses a pin directory that is relative or has `..` components (`field`
/// names it in errors). Whether it is on bpffs is checked when loading
/// (`pins::check_pin_dir`), since xlb may mount bpffs itself first.
pub fn validate_pin_dir(field: &str, dir: &Path) -> Result<()> {
    let text = dir.display().to_string();
    if !dir.is_absolute() {
        bail!("{field}: {text:?} is not an absolute path");
    }
    // `xlb detach` removes directories below and next to it: never let it walk up.
    if dir.components().any(|c| c == Component::ParentDir) {
        bail!("{field}: {text:?} contains \"..\" (write the directory without it)");
    }
    Ok(())
}

/// Parses a unicast MAC written as six hex octets separated by ':'.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().unwrap_or("");
        let ok = part.len() == 2 && part.bytes().all(|b| b.is_ascii_hexdigit());
        match u8::from_str_radix(part, 16) {
            Ok(v) if ok => *byte = v,
            _ => {
                bail!("{s:?} is not a MAC address (expected six hex octets like 02:00:00:00:00:01)")
            }
        }
    }
    if parts.next().is_some() {
        bail!("{s:?} is not a MAC address (expected six hex octets like 02:00:00:00:00:01)");
    }
    if mac == [0; 6] {
        bail!("{s:?} is the all-zero MAC, not a backend");
    }
    // Forwarded frames go to exactly one host; a group address would flood.
    if mac[0] & 1 != 0 {
        bail!("{s:?} is a multicast MAC (low bit of the first octet set), not a backend");
    }
    Ok(mac)
}

/// Formats a MAC as lowercase `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

// Raw, as written in the file. Integers are read as i64 (TOML's integer
// type) and enums as strings so validation, not serde, reports bad values
// with their field path.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: String,
    xdp_mode: Option<String>,
    pin_dir: Option<PathBuf>,
    affinity_max_entries: Option<i64>,
    maglev_table_size: Option<i64>,
    max_services: Option<i64>,
    state_file: Option<PathBuf>,
    metrics_address: Option<String>,
    health_source_v4: Option<String>,
    encap_source_v4: Option<String>,
    encap_source_v6: Option<String>,
    health_source_v6: Option<String>,
    announce_table: Option<i64>,
    cluster: Option<RawCluster>,
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    node_id: Option<i64>,
    listen: Option<String>,
    key_file: Option<PathBuf>,
    peers: Option<Vec<String>>,
    sync_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    port: i64,
    protocol: String,
    affinity_prefix_v4: Option<i64>,
    affinity_prefix_v6: Option<i64>,
    affinity_timeout: Option<String>,
    affinity_admit_rate: Option<i64>,
    forward_mode: Option<String>,
    #[serde(default)]
    backend: Vec<RawBackend>,
    health: Option<RawHealth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<String>,
    port: Option<i64>,
    via: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
    http_path: Option<String>,
    http_status: Option<i64>,
    udp_send: Option<String>,
    udp_expect: Option<String>,
    source: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Option<String>,
    address: String,
    mac: Option<String>,
    weight: Option<i64>,
    state: Option<String>,
}

fn validate(raw: RawConfig) -> Result<Config> {
    let interface = validate_interface(raw.interface)?;
    let xdp_mode = match raw.xdp_mode.as_deref() {
        None | Some("native") => XdpMode::Native,
        Some("generic") => XdpMode::Generic,
        Some(other) => {
            bail!("xdp_mode: {other:?} is not an XDP mode (expected \"native\" or \"generic\")")
        }
    };
    let pin_dir = raw
        .pin_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));
    validate_pin_dir("pin_dir", &pin_dir)?;
    let affinity_max_entries = int(
        "affinity_max_entries",
        raw.affinity_max_entries,
        lb_common::DEFAULT_AFFINITY_ENTRIES,
        1,
        MAX_AFFINITY_ENTRIES,
    )?;
    let maglev_table_size = validate_table_size(raw.maglev_table_size)?;
    let max_services = int(
        "max_services",
        raw.max_services,
        DEFAULT_MAX_SERVICES,
        1,
        lb_common::MAX_SERVICES,
    )?;
    if raw.service.len() > max_services as usize {
        bail!(
            "service: {} services but max_services is {max_services} (raise max_services, at most {})",
            raw.service.len(),
            lb_common::MAX_SERVICES
        );
    }

    // Every VIP is known before any backend is checked against them; a VIP
    // that does not parse fails in its own service below.
    let vip_names: Vec<(String, IpAddr)> = raw
        .service
        .iter()
        .filter_map(|s| Some((s.name.clone(), s.vip.parse().ok()?)))
        .collect();
    let vips: Vec<(&str, IpAddr)> = vip_names.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    let mut services: Vec<ServiceConfig> = Vec::with_capacity(raw.service.len());
    let mut total_backends = 0usize;
    for (i, raw_service) in raw.service.into_iter().enumerate() {
        let service = validate_service(i, raw_service, &vips, affinity_max_entries)?;
        if let Some(j) = services.iter().position(|s| s.name == service.name) {
            bail!(
                "service[{i}].name: {:?} is already used by service[{j}]",
                service.name
            );
        }
        let same_listener = |s: &ServiceConfig| {
            s.vip == service.vip && s.port == service.port && s.protocol == service.protocol
        };
        if let Some(j) = services.iter().position(same_listener) {
            bail!(
                "service[{i}] ({:?}): {}/{} is already served by service[{j}] ({:?})",
                service.name,
                SocketAddr::new(service.vip, service.port),
                service.protocol,
                services[j].name
            );
        }
        total_backends += service.backends.len();
        services.push(service);
    }
    if total_backends > lb_common::BACKEND_CAPACITY as usize {
        bail!(
            "service[*].backend: {total_backends} backends in total, more than the {} xlb supports",
            lb_common::BACKEND_CAPACITY
        );
    }

    let state_file = match raw.state_file {
        Some(p) if p.is_absolute() => p,
        Some(p) => bail!(
            "state_file: {:?} is not an absolute path",
            p.display().to_string()
        ),
        None => Path::new(DEFAULT_STATE_DIR).join(format!("{interface}.state.json")),
    };

    let metrics_address = match raw.metrics_address {
        None => None,
        Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
            anyhow::anyhow!(
                "metrics_address: {text:?} is not an address:port (expected e.g. \"127.0.0.1:9433\")"
            )
        })?),
    };

    let health_source_v4 = raw
        .health_source_v4
        .map(
            |text| match validate_source("health_source_v4", &text, Some(true))? {
                IpAddr::V4(a) => Ok(a),
                IpAddr::V6(a) => bail!("health_source_v4: {a} is not an IPv4 address"),
            },
        )
        .transpose()?;
    let health_source_v6 = raw
        .health_source_v6
        .map(
            |text| match validate_source("health_source_v6", &text, Some(false))? {
                IpAddr::V6(a) => Ok(a),
                IpAddr::V4(a) => bail!("health_source_v6: {a} is not an IPv6 address"),
            },
        )
        .transpose()?;
    let encap_source_v4 = raw
        .encap_source_v4
        .map(
            |text| match validate_source("encap_source_v4", &text, Some(true))? {
                IpAddr::V4(a) => Ok(a),
                IpAddr::V6(a) => bail!("encap_source_v4: {a} is not an IPv4 address"),
            },
        )
        .transpose()?;
    let encap_source_v6 = raw
        .encap_source_v6
        .map(
            |text| match validate_source("encap_source_v6", &text, Some(false))? {
                IpAddr::V6(a) => Ok(a),
                IpAddr::V4(a) => bail!("encap_source_v6: {a} is not an IPv6 address"),
            },
        )
        .transpose()?;
    // A check leaving from a VIP is answered by the backend to itself (it holds the VIP
    // on lo), so no source may be any service's VIP.
    let globals = [
        (
            "health_source_v4".to_string(),
            health_source_v4.map(IpAddr::V4),
        ),
        (
            "health_source_v6".to_string(),
            health_source_v6.map(IpAddr::V6),
        ),
    ];
    let per_service = services.iter().enumerate().map(|(i, s)| {
        (
            format!("service[{i}] ({:?}).health.source", s.name),
            s.health.as_ref().and_then(|h| h.source),
        )
    });
    for (field, source) in globals.into_iter().chain(per_service) {
        let Some(source) = source else { continue };
        if let Some((j, s)) = services.iter().enumerate().find(|(_, s)| s.vip == source) {
            bail!(
                "{field}: {source} is the vip of service[{j}] ({:?}); a check from a VIP is answered by the backend to itself",
                s.name
            );
        }
    }

    let announce_table = raw
        .announce_table
        .map(|t| {
            let table = int("announce_table", Some(t), 0u32, 1, u32::MAX)?;
            if RESERVED_TABLES.contains(&table) {
                bail!(
                    "announce_table: {table} is one of the kernel's own tables (253 default, 254 main, 255 local); pick another, e.g. 100"
                );
            }
            Ok(table)
        })
        .transpose()?;
    let cluster = raw.cluster.map(validate_cluster).transpose()?;

    Ok(Config {
        interface,
        xdp_mode,
        pin_dir,
        affinity_max_entries,
        maglev_table_size,
        max_services,
        services,
        state_file,
        metrics_address,
        health_source_v4,
        health_source_v6,
        encap_source_v4,
        encap_source_v6,
        announce_table,
        cluster,
    })
}

/// Checks `[cluster]`: every field present and sane, ids unique, no peer at our own address.
fn validate_cluster(raw: RawCluster) -> Result<ClusterConfig> {
    let Some(id) = raw.node_id else {
        bail!("cluster.node_id: missing (this node's id, 1..=65535, unique in the cluster)");
    };
    let node_id = int("cluster.node_id", Some(id), 0u32, 1, 65535)?;
    let Some(listen) = raw.listen else {
        bail!(
            "cluster.listen: missing (the address:port peers connect to, e.g. \"10.0.0.2:7946\")"
        );
    };
    let listen: SocketAddr = listen.parse().map_err(|_| {
        anyhow::anyhow!(
            "cluster.listen: {listen:?} is not an address:port (expected e.g. \"10.0.0.2:7946\")"
        )
    })?;
    if listen.port() == 0 {
        bail!("cluster.listen: {listen} has port 0; peers need a fixed port");
    }
    let Some(key_file) = raw.key_file else {
        bail!("cluster.key_file: missing (a file holding the cluster's shared key, mode 0600)");
    };
    if !key_file.is_absolute() {
        bail!(
            "cluster.key_file: {} is not an absolute path",
            key_file.display()
        );
    }
    let Some(list) = raw.peers else {
        bail!("cluster.peers: missing (every other node as \"ID@ADDRESS:PORT\")");
    };
    let mut peers = std::collections::BTreeMap::new();
    for (i, text) in list.iter().enumerate() {
        let field = format!("cluster.peers[{i}]");
        let Some((id, addr)) = text.split_once('@') else {
            bail!("{field}: {text:?} is not ID@ADDRESS:PORT (e.g. \"2@10.0.0.3:7946\")");
        };
        let id: i64 = id
            .parse()
            .map_err(|_| anyhow::anyhow!("{field}: {text:?}: {id:?} is not a node id"))?;
        let id = int(&field, Some(id), 0u32, 1, 65535)?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| anyhow::anyhow!("{field}: {text:?}: {addr:?} is not an address:port"))?;
        if id == node_id {
            bail!("{field}: {text:?} has this node's own id {node_id}");
        }
        if addr == listen {
            bail!("{field}: {text:?} is this node's own listen address");
        }
        if addr.port() == 0 || addr.ip().is_unspecified() {
            bail!("{field}: {text:?} is not an address a peer can be reached at");
        }
        if peers.insert(id, addr).is_some() {
            bail!("{field}: node id {id} is listed twice");
        }
    }
    if peers.is_empty() {
        bail!("cluster.peers: empty; a cluster of one node needs no [cluster] section");
    }
    let sync_timeout = match raw.sync_timeout {
        None => std::time::Duration::from_secs(3),
        Some(text) => {
            let d = humantime::parse_duration(&text).map_err(|e| {
                anyhow::anyhow!(
                    "cluster.sync_timeout: {text:?} is not a duration ({e}; e.g. \"3s\")"
                )
            })?;
            if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(60) {
                bail!("cluster.sync_timeout: {text:?} is out of range 100ms..=60s");
            }
            d
        }
    };
    Ok(ClusterConfig {
        node_id,
        listen,
        key_file,
        peers,
        sync_timeout,
    })
}

fn validate_interface(name: String) -> Result<String> {
    if name.is_empty() {
        bail!("interface: \"\" is empty (expected an interface name like \"eth0\")");
    }
    if name.len() > MAX_INTERFACE_LEN {
        bail!("interface: {name:?} is longer than {MAX_INTERFACE_LEN} bytes, the kernel's limit");
    }
    // The kernel's own rule (dev_valid_name); it also keeps pin_path inside pin_dir.
    let bad_char = name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad_char || name == "." || name == ".." {
        bail!("interface: {name:?} is not a valid interface name");
    }
    Ok(name)
}

fn validate_table_size(raw: Option<i64>) -> Result<u32> {
    let size = int(
        "maglev_table_size",
        raw,
        lb_common::DEFAULT_MAGLEV_TABLE_SIZE,
        3,
        MAX_TABLE_SIZE,
    )?;
    if !maglev::is_prime(size) {
        // MAX_TABLE_SIZE is prime, so there is always one at or below it.
        let above = (size..=MAX_TABLE_SIZE).find(|&n| maglev::is_prime(n));
        let near = above.or_else(|| (3..size).rev().find(|&n| maglev::is_prime(n)));
        match near {
            Some(p) => bail!("maglev_table_size: {size} is not prime (try {p})"),
            None => bail!("maglev_table_size: {size} is not prime"),
        }
    }
    Ok(size)
}

/// Default `affinity_admit_rate`: a sixteenth of the map per second per
/// CPU, so one flooded service on one CPU needs 16 s to turn the whole map
/// over; at least 10000, so a small map does not throttle ordinary arrivals.
pub fn default_admit_rate(affinity_max_entries: u32) -> u32 {
    (affinity_max_entries / 16).max(10_000)
}

fn validate_service(
    i: usize,
    raw: RawService,
    vips: &[(&str, IpAddr)],
    affinity_max_entries: u32,
) -> Result<ServiceConfig> {
    if !valid_name(&raw.name, false) {
        bail!(
            "service[{i}].name: {:?} is not a valid name (expected 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ . -)",
            raw.name
        );
    }
    let path = format!("service[{i}] ({:?})", raw.name);
    let vip = parse_ip(&format!("{path}.vip"), &raw.vip)?;
    let port = int(&format!("{path}.port"), Some(raw.port), 0, 1, u16::MAX)?;
    let protocol = match raw.protocol.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => {
            bail!("{path}.protocol: {other:?} is not a protocol (expected \"tcp\" or \"udp\")")
        }
    };
    let affinity_prefix_v4 = int(
        &format!("{path}.affinity_prefix_v4"),
        raw.affinity_prefix_v4,
        32,
        0,
        32,
    )?;
    let affinity_prefix_v6 = int(
        &format!("{path}.affinity_prefix_v6"),
        raw.affinity_prefix_v6,
        128,
        0,
        128,
    )?;
    let affinity_timeout = match raw.affinity_timeout {
        None => DEFAULT_AFFINITY_TIMEOUT,
        Some(text) => validate_timeout(&format!("{path}.affinity_timeout"), &text)?,
    };
    let affinity_admit_rate = int(
        &format!("{path}.affinity_admit_rate"),
        raw.affinity_admit_rate,
        default_admit_rate(affinity_max_entries),
        0,
        MAX_AFFINITY_ENTRIES,
    )?;
    // Only layer-2 DSR exists; the field is accepted so configs can say so.
    let forward_mode = match raw.forward_mode.as_deref() {
        None | Some("dsr") => ForwardMode::Dsr,
        Some("ipip") => ForwardMode::Ipip,
        Some(other) => {
            bail!(
                "{path}.forward_mode: {other:?} is not a forward mode (expected \"dsr\" or \"ipip\")"
            )
        }
    };

    if raw.backend.is_empty() {
        bail!("{path}.backend: the service has no backends (add a [[service.backend]])");
    }
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.backend.len());
    for (j, raw_backend) in raw.backend.into_iter().enumerate() {
        let bpath = format!("{path}.backend[{j}]");
        let backend = validate_backend(&bpath, vip, vips, raw_backend)?;
        if let Some(k) = backends.iter().position(|b| b.address == backend.address) {
            bail!(
                "{bpath}.address: {} is already used by backend[{k}]",
                backend.address
            );
        }
        if let Some(k) = backends.iter().position(|b| b.name == backend.name) {
            bail!(
                "{bpath}.name: {:?} is already used by backend[{k}]",
                backend.name
            );
        }
        backends.push(backend);
    }
    if forward_mode == ForwardMode::Ipip {
        if let Some(j) = backends.iter().position(|b| b.mac != [0; 6]) {
            bail!(
                "{path}.backend[{j}].mac: a backend of an \"ipip\" service has no MAC to give: its \
                 frames go to the next hop of the kernel's route to its address (remove `mac`)"
            );
        }
    }
    let health = raw
        .health
        .map(|h| {
            validate_health(
                &format!("{path}.health"),
                vip,
                protocol,
                port,
                forward_mode,
                h,
            )
        })
        .transpose()?;

    Ok(ServiceConfig {
        name: raw.name,
        vip,
        port,
        protocol,
        affinity_prefix_v4,
        affinity_prefix_v6,
        affinity_timeout,
        affinity_admit_rate,
        forward_mode,
        backends,
        health,
    })
}

fn validate_health(
    path: &str,
    vip: IpAddr,
    protocol: Protocol,
    port: u16,
    forward_mode: ForwardMode,
    raw: RawHealth,
) -> Result<HealthConfig> {
    let kind_name = raw.kind.as_deref().unwrap_or(match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    });
    // Options of another kind are a mistake worth reporting, not something to ignore.
    let only = |field: &str, set: bool, kind: &str| -> Result<()> {
        if set && kind_name != kind {
            bail!("{path}.{field}: only valid with kind = \"{kind}\" (kind is \"{kind_name}\")");
        }
        Ok(())
    };
    only("http_path", raw.http_path.is_some(), "http")?;
    only("http_status", raw.http_status.is_some(), "http")?;
    only("udp_send", raw.udp_send.is_some(), "udp")?;
    only("udp_expect", raw.udp_expect.is_some(), "udp")?;
    let kind = match kind_name {
        "tcp" => HealthKind::Tcp,
        "http" => {
            if protocol == Protocol::Udp {
                bail!(
                    "{path}.kind: \"http\" needs a TCP service but this one is udp \
                     (use \"udp\", or \"tcp\" to connect to a TCP health port)"
                );
            }
            let path_text = raw.http_path.unwrap_or_else(|| "/".to_string());
            if !path_text.starts_with('/')
                || path_text.len() > 1024
                || path_text
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                bail!(
                    "{path}.http_path: {path_text:?} is not a request path (expected e.g. \"/health\")"
                );
            }
            let status = int(
                &format!("{path}.http_status"),
                raw.http_status,
                200,
                100,
                599,
            )?;
            HealthKind::Http {
                path: path_text,
                status,
            }
        }
        "udp" => {
            let send = raw.udp_send.unwrap_or_else(|| "ping".to_string());
            if send.is_empty() || send.len() > 1024 {
                bail!("{path}.udp_send: {send:?} must be 1 to 1024 bytes");
            }
            HealthKind::Udp {
                send,
                expect: raw.udp_expect.unwrap_or_default(),
            }
        }
        other => bail!(
            "{path}.kind: {other:?} is not a health check kind (expected \"tcp\", \"http\" or \"udp\")"
        ),
    };
    let via = match raw.via.as_deref() {
        None | Some("direct") => HealthVia::Direct,
        Some("tunnel") => {
            if forward_mode != ForwardMode::Ipip {
                bail!(
                    "{path}.via: \"tunnel\" needs forward_mode = \"ipip\" (this service is \"dsr\": \
                     its backends are reached without a tunnel)"
                );
            }
            if !matches!(kind, HealthKind::Tcp | HealthKind::Udp { .. }) {
                bail!(
                    "{path}.via: \"tunnel\" works with kinds \"tcp\" and \"udp\" only (kind is \"{kind_name}\")"
                );
            }
            HealthVia::Tunnel
        }
        Some(other) => {
            bail!("{path}.via: {other:?} is not a way to check (expected \"direct\" or \"tunnel\")")
        }
    };
    let port = int(&format!("{path}.port"), raw.port, port, 1, u16::MAX)?;
    let duration = |field: &str, text: Option<String>, default: Duration| -> Result<Duration> {
        let Some(text) = text else {
            return Ok(default);
        };
        humantime::parse_duration(&text).map_err(|e| {
            anyhow::anyhow!("{path}.{field}: {text:?} is not a duration ({e}; expected e.g. \"2s\" or \"500ms\")")
        })
    };
    let interval = duration("interval", raw.interval, DEFAULT_HEALTH_INTERVAL)?;
    if interval < Duration::from_millis(100) || interval > Duration::from_secs(3600) {
        bail!("{path}.interval: {interval:?} is out of range 100ms..=1h");
    }
    let timeout = duration(
        "timeout",
        raw.timeout.clone(),
        DEFAULT_HEALTH_TIMEOUT.min(interval),
    )?;
    if timeout < MIN_HEALTH_TIMEOUT || timeout > interval {
        bail!(
            "{path}.timeout: {timeout:?} must be at least {MIN_HEALTH_TIMEOUT:?} and at most the interval ({interval:?})"
        );
    }

    let rise = int(
        &format!("{path}.rise"),
        raw.rise,
        DEFAULT_HEALTH_RISE,
        1,
        100,
    )?;
    let fall = int(
        &format!("{path}.fall"),
        raw.fall,
        DEFAULT_HEALTH_FALL,
        1,
        100,
    )?;
    let source = raw
        .source
        .map(|text| validate_source(&format!("{path}.source"), &text, Some(vip.is_ipv4())))
        .transpose()?;
    Ok(HealthConfig {
        kind,
        port,
        via,
        interval,
        timeout,
        rise,
        fall,
        source,
    })
}

/// A health-check source address: of the family asked for (`Some(true)` IPv4), and one a
/// socket can be bound to and a backend can answer. Whether it is a VIP is checked by the
/// caller, which knows every service.
fn validate_source(path: &str, text: &str, want_v4: Option<bool>) -> Result<IpAddr> {
    let Ok(ip) = text.parse::<IpAddr>() else {
        bail!("{path}: {text:?} is not an IP address");
    };
    if let Some(v4) = want_v4 {
        if ip.is_ipv4() != v4 {
            let want = if v4 { "IPv4" } else { "IPv6" };
            bail!("{path}: {ip} is {} but must be {want}", family(ip));
        }
    }
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        bail!("{path}: {ip} is not a usable source (unspecified, multicast or loopback)");
    }
    match ip {
        IpAddr::V4(a) if a.is_broadcast() => {
            bail!("{path}: {ip} is the broadcast address, not a source")
        }
        // Binding a link-local address needs an interface scope the field cannot carry.
        IpAddr::V6(a) if a.is_unicast_link_local() => {
            bail!("{path}: {ip} is link-local (use a global or unique-local address)")
        }
        _ => Ok(ip),
    }
}

fn validate_timeout(path: &str, text: &str) -> Result<Duration> {
    let timeout = humantime::parse_duration(text).map_err(|e| {
        anyhow::anyhow!(
            "{path}: {text:?} is not a duration ({e}; expected e.g. \"300s\" or \"5m\")"
        )
    })?;
    if timeout.is_zero() {
        bail!("{path}: {text:?} is zero (expected more than 0)");
    }
    if timeout > MAX_AFFINITY_TIMEOUT {
        bail!("{path}: {text:?} is longer than 30 days");
    }
    if timeout < MIN_AFFINITY_TIMEOUT {
        bail!(
            "{path}: {text:?} is shorter than {}: sessions would expire between a client's packets",
            humantime::format_duration(MIN_AFFINITY_TIMEOUT)
        );
    }
    Ok(timeout)
}

fn validate_backend(
    path: &str,
    vip: IpAddr,
    vips: &[(&str, IpAddr)],
    raw: RawBackend,
) -> Result<BackendConfig> {
    let Ok(address) = raw.address.parse::<IpAddr>() else {
        bail!("{path}.address: {:?} is not an IP address", raw.address);
    };
    validate_backend_address(&format!("{path}.address"), address, vip, vips)?;
    let name = raw.name.unwrap_or_else(|| address.to_string());
    if !valid_name(&name, true) {
        bail!(
            "{path}.name: {name:?} is not a valid name (expected 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ . : -)"
        );
    }
    let mac = match &raw.mac {
        Some(text) => validate_mac(&format!("{path}.mac"), text)?,
        None => [0; 6],
    };
    let weight = int(&format!("{path}.weight"), raw.weight, 1, 1, MAX_WEIGHT)?;
    let state = match raw.state.as_deref() {
        None | Some("active") => BackendState::Active,
        Some("draining") => BackendState::Draining,
        Some("down") => BackendState::Down,
        Some(other) => bail!(
            "{path}.state: {other:?} is not a backend state (expected \"active\", \"draining\" or \"down\")"
        ),
    };
    Ok(BackendConfig {
        name,
        address,
        mac,
        weight,
        state,
    })
}

/// An optional integer field: `default` when absent, else checked against `lo..=hi`.
fn int<T>(path: &str, value: Option<i64>, default: T, lo: T, hi: T) -> Result<T>
where
    T: Copy + Into<i64> + TryFrom<i64> + fmt::Display,
{
    let Some(value) = value else {
        return Ok(default);
    };
    match T::try_from(value) {
        Ok(v) if value >= lo.into() && value <= hi.into() => Ok(v),
        _ => bail!("{path}: {value} is out of range {lo}..={hi}"),
    }
}

/// A unicast, specified IP address: anything else can't be a VIP or a backend.
fn parse_ip(path: &str, text: &str) -> Result<IpAddr> {
    let Ok(ip) = text.parse::<IpAddr>() else {
        bail!("{path}: {text:?} is not an IP address");
    };
    if ip.is_unspecified() || ip.is_multicast() {
        bail!("{path}: {ip} is not a unicast address");
    }
    Ok(ip)
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Whether `name` is a valid backend name (`[A-Za-z0-9_.:-]{1,64}`).
pub fn valid_backend_name(name: &str) -> bool {
    valid_name(name, true)
}

/// Service names allow `[A-Za-z0-9_.-]`; backend names also ':' so the
/// default (the address as text) is valid for IPv6 too.
fn valid_name(name: &str, allow_colon: bool) -> bool {
    let ok = |c: char| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') || (allow_colon && c == ':')
    };
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.chars().all(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn a_reload_may_change_services_and_sources_but_names_every_boot_field() {
        let base = Config::parse(FULL).expect("FULL parses");
        let reloadable = FULL.replace("weight = 3", "weight = 5").replacen(
            "[[service]]",
            "health_source_v4 = \"10.0.0.1\"\n\n[[service]]",
            1,
        );
        let new = Config::parse(&reloadable).expect("parses");
        assert_ne!(base, new, "the edit changed something");
        assert_eq!(base.boot_changes(&new), Vec::<&str>::new());
        for (edit, fields) in [
            // The default state file is named after the interface: both change.
            (
                FULL.replace("eth1", "eth2"),
                &["interface", "state_file"][..],
            ),
            (
                FULL.replace("xdp_mode = \"generic\"", "xdp_mode = \"native\""),
                &["xdp_mode"][..],
            ),
            (
                FULL.replace("/sys/fs/bpf/test", "/sys/fs/bpf/other"),
                &["pin_dir"][..],
            ),
            (
                FULL.replace("affinity_max_entries = 1000", "affinity_max_entries = 2000"),
                &["affinity_max_entries"][..],
            ),
            (
                FULL.replace("maglev_table_size = 251", "maglev_table_size = 257"),
                &["maglev_table_size"][..],
            ),
            (
                FULL.replace("max_services = 4", "max_services = 8"),
                &["max_services"][..],
            ),
            (
                FULL.replace("max_services = 4", "max_services = 4\nannounce_table = 100"),
                &["announce_table"][..],
            ),
        ] {
            let new = Config::parse(&edit).unwrap_or_else(|e| panic!("{fields:?}: {e:#}"));
            assert_eq!(base.boot_changes(&new), fields, "{fields:?}");
        }
    }

    const FULL: &str = r#"
interface = "eth1"
xdp_mode = "generic"
pin_dir = "/sys/fs/bpf/test"
affinity_max_entries = 1000
maglev_table_size = 251
max_services = 4

[[service]]
name = "web"
vip = "10.0.0.10"
port = 80
protocol = "tcp"
affinity_prefix_v4 = 24
affinity_timeout = "5m"
forward_mode = "dsr"

[[service.backend]]
name = "b1"
address = "10.0.0.21"
mac = "02:00:00:00:00:21"
weight = 3
state = "draining"

[[service.backend]]
address = "10.0.0.22"
mac = "02:AB:cd:00:00:22"

[[service]]
name = "dns6"
vip = "2001:db8::53"
port = 53
protocol = "udp"
affinity_prefix_v6 = 64

[[service.backend]]
address = "2001:db8::1"
mac = "02:00:00:00:01:01"
state = "down"
"#;

    /// A minimal valid config, to be broken one field at a time.
    const BASE: &str = r#"
interface = "eth0"

[[service]]
name = "web"
vip = "10.0.0.10"
port = 80
protocol = "tcp"

[[service.backend]]
address = "10.0.0.21"
mac = "02:00:00:00:00:21"
"#;

    fn err(text: &str) -> String {
        match Config::parse(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    /// Asserts the error of `text` contains every one of `parts`.
    fn rejects(text: &str, parts: &[&str]) {
        let e = err(text);
        for p in parts {
            assert!(e.contains(p), "error {e:?} lacks {p:?}");
        }
    }

    #[test]
    fn full_example() {
        let c = Config::parse(FULL).expect("valid");
        assert_eq!(c.interface, "eth1");
        assert_eq!(c.xdp_mode, XdpMode::Generic);
        assert_eq!(c.pin_path(), PathBuf::from("/sys/fs/bpf/test/eth1"));
        assert_eq!(c.affinity_max_entries, 1000);
        assert_eq!(c.maglev_table_size, 251);
        assert_eq!(c.max_services, 4);
        assert_eq!(c.services.len(), 2);

        let web = &c.services[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.vip, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)));
        assert_eq!(web.port, 80);
        assert_eq!(web.protocol, Protocol::Tcp);
        assert_eq!(web.protocol.number(), lb_common::PROTO_TCP);
        assert_eq!(web.protocol.to_string(), "tcp");
        assert_eq!(web.affinity_prefix_v4, 24);
        assert_eq!(web.affinity_prefix_v6, 128);
        assert_eq!(web.affinity_timeout, Duration::from_secs(300));
        let b1 = &web.backends[0];
        assert_eq!(b1.name, "b1");
        assert_eq!(b1.mac, [2, 0, 0, 0, 0, 0x21]);
        assert_eq!(b1.weight, 3);
        assert_eq!(b1.state, BackendState::Draining);
        assert_eq!(b1.state.to_abi(), lb_common::BACKEND_DRAINING);
        let b2 = &web.backends[1];
        assert_eq!(b2.name, "10.0.0.22");
        assert_eq!(b2.mac, [2, 0xab, 0xcd, 0, 0, 0x22]);
        assert_eq!(b2.weight, 1);
        assert_eq!(b2.state, BackendState::Active);

        let dns = &c.services[1];
        assert_eq!(
            dns.vip,
            IpAddr::V6("2001:db8::53".parse::<Ipv6Addr>().expect("ip"))
        );
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.protocol.number(), lb_common::PROTO_UDP);
        assert_eq!(dns.affinity_prefix_v4, 32);
        assert_eq!(dns.affinity_prefix_v6, 64);
        assert_eq!(dns.affinity_timeout, DEFAULT_AFFINITY_TIMEOUT);
        assert_eq!(dns.backends[0].name, "2001:db8::1");
        assert_eq!(dns.backends[0].state.to_abi(), lb_common::BACKEND_DOWN);
    }

    #[test]
    fn defaults() {
        let c = Config::parse(BASE).expect("valid");
        assert_eq!(c.xdp_mode, XdpMode::Native);
        assert_eq!(c.pin_path(), PathBuf::from("/sys/fs/bpf/xlb/eth0"));
        assert_eq!(c.affinity_max_entries, lb_common::DEFAULT_AFFINITY_ENTRIES);
        assert_eq!(c.maglev_table_size, lb_common::DEFAULT_MAGLEV_TABLE_SIZE);
        assert_eq!(c.max_services, 16);
        assert_eq!(
            c.services[0].backends[0].state.to_abi(),
            lb_common::BACKEND_ACTIVE
        );
        let empty = Config::parse("interface = \"lo\"").expect("valid");
        assert!(empty.services.is_empty());
    }

    #[test]
    fn top_level_rejections() {
        let with = |line: &str| format!("{line}\n{BASE}");
        rejects(
            &with("maglev_table_size = 65536"),
            &["maglev_table_size: 65536 is not prime (try 65537)"],
        );
        rejects(
            &with("maglev_table_size = 2"),
            &["maglev_table_size: 2 is out of range"],
        );
        rejects(
            &with("maglev_table_size = 1000033"),
            &["maglev_table_size: 1000033 is out of range"],
        );
        rejects(
            &with("affinity_max_entries = 0"),
            &["affinity_max_entries: 0 is out of range"],
        );
        rejects(
            &with("max_services = 257"),
            &["max_services: 257 is out of range"],
        );
        rejects(&with("xdp_mode = \"offload\""), &["xdp_mode: \"offload\""]);
        rejects(&with("pin_dir = \"bpf/xlb\""), &["pin_dir: \"bpf/xlb\""]);
        let iface = |name: &str| BASE.replace("\"eth0\"", name);
        rejects(&iface("\"\""), &["interface: \"\" is empty"]);
        rejects(
            &iface("\"averyveryverylong\""),
            &["interface: \"averyveryverylong\" is longer than 15"],
        );
        rejects(&iface("\"../x\""), &["interface: \"../x\""]);
    }

    #[test]
    fn service_rejections() {
        let svc = |from: &str, to: &str| BASE.replace(from, to);
        rejects(&svc("\"web\"", "\"we b\""), &["service[0].name: \"we b\""]);
        rejects(
            &svc("\"10.0.0.10\"", "\"10.0.0.300\""),
            &["service[0] (\"web\").vip: \"10.0.0.300\""],
        );
        rejects(
            &svc("port = 80", "port = 0"),
            &["service[0] (\"web\").port: 0 is out of range"],
        );
        rejects(
            &svc("port = 80", "port = 65536"),
            &["service[0] (\"web\").port: 65536"],
        );
        rejects(
            &svc("\"tcp\"", "\"sctp\""),
            &["service[0] (\"web\").protocol: \"sctp\""],
        );
        let extra =
            |line: &str| BASE.replace("protocol = \"tcp\"", &format!("protocol = \"tcp\"\n{line}"));
        rejects(
            &extra("affinity_prefix_v4 = 33"),
            &["service[0] (\"web\").affinity_prefix_v4: 33"],
        );
        rejects(
            &extra("affinity_prefix_v6 = 129"),
            &["service[0] (\"web\").affinity_prefix_v6: 129"],
        );
        rejects(
            &extra("affinity_timeout = \"5x\""),
            &["service[0] (\"web\").affinity_timeout: \"5x\" is not a duration"],
        );
        rejects(
            &extra("affinity_timeout = \"0s\""),
            &["service[0] (\"web\").affinity_timeout: \"0s\" is zero"],
        );
        rejects(
            &extra("affinity_timeout = \"300ns\""),
            &["service[0] (\"web\").affinity_timeout: \"300ns\" is shorter than 100ms"],
        );
        rejects(
            &extra("affinity_timeout = \"31days\""),
            &["service[0] (\"web\").affinity_timeout: \"31days\" is longer"],
        );
        rejects(
            &extra("forward_mode = \"nat\""),
            &["service[0] (\"web\").forward_mode: \"nat\""],
        );

        let no_backends = BASE.split("[[service.backend]]").next().unwrap_or_default();
        rejects(
            no_backends,
            &["service[0] (\"web\").backend: the service has no backends"],
        );

        let second = |name: &str, port: u16| {
            format!(
                "{BASE}\n[[service]]\nname = \"{name}\"\nvip = \"10.0.0.10\"\nport = {port}\nprotocol = \"tcp\"\n\
                 [[service.backend]]\naddress = \"10.0.0.31\"\nmac = \"02:00:00:00:00:31\"\n"
            )
        };
        assert!(Config::parse(&second("api", 443)).is_ok());
        rejects(
            &second("web", 443),
            &["service[1].name: \"web\" is already used by service[0]"],
        );
        rejects(
            &second("api", 80),
            &["service[1] (\"api\"): 10.0.0.10:80/tcp is already served by service[0] (\"web\")"],
        );
        rejects(
            &format!("max_services = 1\n{}", second("api", 443)),
            &["service: 2 services but max_services is 1"],
        );
    }

    #[test]
    fn backend_rejections() {
        let be = |from: &str, to: &str| BASE.replace(from, to);
        rejects(
            &be("\"02:00:00:00:00:21\"", "\"zz:00:00:00:00:01\""),
            &[
                "service[0] (\"web\").backend[0].mac: \"zz:00:00:00:00:01\" is not a MAC address (expected six hex octets like 02:00:00:00:00:01)",
            ],
        );
        rejects(
            &be("\"02:00:00:00:00:21\"", "\"01:00:5e:00:00:01\""),
            &["backend[0].mac: \"01:00:5e:00:00:01\" is a multicast MAC"],
        );
        rejects(
            &be("\"02:00:00:00:00:21\"", "\"00:00:00:00:00:00\""),
            &["backend[0].mac: \"00:00:00:00:00:00\" is the all-zero MAC"],
        );
        rejects(
            &be("\"10.0.0.21\"", "\"2001:db8::1\""),
            &[
                "service[0] (\"web\").backend[0].address: 2001:db8::1 is IPv6 but the service vip 10.0.0.10 is IPv4",
            ],
        );
        rejects(
            &be("\"10.0.0.21\"", "\"nope\""),
            &["backend[0].address: \"nope\" is not an IP address"],
        );
        rejects(
            &be("\"10.0.0.21\"", "\"10.0.0.10\""),
            &["backend[0].address: 10.0.0.10 is the service's own vip"],
        );
        let extra = |line: &str| BASE.replace("mac = ", &format!("{line}\nmac = "));
        rejects(
            &extra("weight = 0"),
            &["service[0] (\"web\").backend[0].weight: 0 is out of range 1..=65535"],
        );
        rejects(&extra("weight = 65536"), &["backend[0].weight: 65536"]);
        rejects(&extra("state = \"up\""), &["backend[0].state: \"up\""]);
        rejects(&extra("name = \"\""), &["backend[0].name: \"\""]);

        let another = |name: &str, address: &str| {
            format!(
                "{BASE}\n[[service.backend]]\nname = \"{name}\"\naddress = \"{address}\"\nmac = \"02:00:00:00:00:22\"\n"
            )
        };
        assert!(Config::parse(&another("b2", "10.0.0.22")).is_ok());
        rejects(
            &another("b2", "10.0.0.21"),
            &["service[0] (\"web\").backend[1].address: 10.0.0.21 is already used by backend[0]"],
        );
        rejects(
            &another("10.0.0.21", "10.0.0.22"),
            &["service[0] (\"web\").backend[1].name: \"10.0.0.21\" is already used by backend[0]"],
        );
    }

    #[test]
    fn backend_addresses_that_are_no_host() {
        let be = |to: &str| BASE.replace("\"10.0.0.21\"", to);
        for (addr, what) in [
            ("127.0.0.1", "a loopback address"),
            ("127.8.9.10", "a loopback address"),
            ("0.0.0.0", "the unspecified address"),
            ("224.0.0.1", "a multicast address"),
            ("255.255.255.255", "the IPv4 broadcast address"),
        ] {
            rejects(
                &be(&format!("\"{addr}\"")),
                &[&format!(
                    "service[0] (\"web\").backend[0].address: {addr} is {what}, not a backend"
                )],
            );
        }
        let v6 = |addr: &str| {
            BASE.replace("\"10.0.0.10\"", "\"2001:db8::10\"")
                .replace("\"10.0.0.21\"", &format!("\"{addr}\""))
        };
        assert!(Config::parse(&v6("2001:db8::21")).is_ok());
        rejects(
            &v6("::1"),
            &["backend[0].address: ::1 is a loopback address"],
        );
        rejects(
            &v6("::"),
            &["backend[0].address: :: is the unspecified address"],
        );
        rejects(
            &v6("ff02::1"),
            &["backend[0].address: ff02::1 is a multicast address"],
        );
        // The same loopback written as an IPv4-mapped IPv6 address.
        rejects(
            &v6("::ffff:127.0.0.1"),
            &["backend[0].address: ::ffff:127.0.0.1 is a loopback address"],
        );
    }

    #[test]
    fn backend_may_not_be_any_services_vip() {
        let two = |web_backend: &str, dns_backend: &str| {
            BASE.replace("\"10.0.0.21\"", &format!("\"{web_backend}\""))
                + &format!(
                    "\n[[service]]\nname = \"dns\"\nvip = \"10.0.0.9\"\nport = 53\nprotocol = \"udp\"\n\
                     [[service.backend]]\naddress = \"{dns_backend}\"\nmac = \"02:00:00:00:00:31\"\n"
                )
        };
        assert!(Config::parse(&two("10.0.0.21", "10.0.0.31")).is_ok());
        // A later service's VIP, and an earlier one's.
        rejects(
            &two("10.0.0.9", "10.0.0.31"),
            &["service[0] (\"web\").backend[0].address: 10.0.0.9 is the VIP of service \"dns\""],
        );
        rejects(
            &two("10.0.0.21", "10.0.0.10"),
            &["service[1] (\"dns\").backend[0].address: 10.0.0.10 is the VIP of service \"web\""],
        );
    }

    #[test]
    fn backend_mac_of_the_interface_is_refused() {
        let c = Config::parse(BASE).expect("valid");
        c.check_against_interface([2, 0, 0, 0, 0, 0x99])
            .expect("another MAC is fine");
        let e = format!(
            "{:#}",
            c.check_against_interface([2, 0, 0, 0, 0, 0x21])
                .expect_err("own MAC")
        );
        assert!(
            e.contains(
                "service[0] (\"web\").backend[0].mac: 02:00:00:00:00:21 is the MAC of eth0, the load balancer's own interface"
            ),
            "{e}"
        );
    }

    #[test]
    fn pin_dir_with_dot_dot_is_refused() {
        let with = |dir: &str| format!("pin_dir = \"{dir}\"\n{BASE}");
        assert!(Config::parse(&with("/sys/fs/bpf/a..b")).is_ok());
        rejects(
            &with("/sys/fs/bpf/../xlb"),
            &["pin_dir: \"/sys/fs/bpf/../xlb\" contains \"..\""],
        );
        rejects(
            &with("/sys/fs/bpf/xlb/.."),
            &["pin_dir: \"/sys/fs/bpf/xlb/..\" contains"],
        );
    }

    #[test]
    fn shared_validators() {
        assert!(validate_weight("w", 1).is_ok());
        assert!(validate_weight("w", MAX_WEIGHT).is_ok());
        let e = format!("{:#}", validate_weight("weight", 0).expect_err("zero"));
        assert_eq!(e, "weight: 0 is out of range 1..=65535");

        assert!(validate_deadline(Duration::from_secs(1)).is_ok());
        assert!(validate_deadline(MAX_DRAIN_DEADLINE).is_ok());
        let e = format!("{:#}", validate_deadline(Duration::ZERO).expect_err("zero"));
        assert!(e.contains("must be more than 0"), "{e}");
        let e = format!(
            "{:#}",
            validate_deadline(MAX_DRAIN_DEADLINE + Duration::from_secs(1)).expect_err("31 days")
        );
        assert!(e.contains("is longer than 30days"), "{e}");
        // The CLI sends milliseconds: u64::MAX of them is 584 million years.
        assert!(validate_deadline(Duration::from_millis(u64::MAX)).is_err());

        let e = format!(
            "{:#}",
            validate_mac("mac", "01:00:5e:00:00:01").expect_err("multicast")
        );
        assert!(
            e.starts_with("mac: \"01:00:5e:00:00:01\" is a multicast MAC"),
            "{e}"
        );

        let vip: IpAddr = "10.0.0.10".parse().expect("ip");
        let other: IpAddr = "10.0.0.9".parse().expect("ip");
        let vips = [("web", vip), ("dns", other)];
        let ok: IpAddr = "10.0.0.21".parse().expect("ip");
        assert!(validate_backend_address("a", ok, vip, &vips).is_ok());
        let e = format!(
            "{:#}",
            validate_backend_address("address", other, vip, &vips).expect_err("vip")
        );
        assert_eq!(e, "address: 10.0.0.9 is the VIP of service \"dns\"");
    }

    #[test]
    fn too_many_backends_in_total() {
        // 17 services of 256 backends (the limit is 4096) with max_services raised.
        let mut text = String::from("interface = \"eth0\"\nmax_services = 17\n");
        for s in 0..17u32 {
            text += &format!(
                "[[service]]\nname = \"s{s}\"\nvip = \"10.0.0.10\"\nport = {}\nprotocol = \"tcp\"\n",
                s + 1
            );
            for b in 0..256u32 {
                text += &format!(
                    "[[service.backend]]\naddress = \"10.1.{}.{}\"\nmac = \"02:00:00:00:00:01\"\n",
                    b / 256,
                    b % 256
                );
            }
        }
        rejects(
            &text,
            &["service[*].backend: 4352 backends in total, more than the 4095"],
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        rejects(&format!("colour = \"red\"\n{BASE}"), &["colour"]);
        rejects(&BASE.replace("port = 80", "port = 80\nprot = 1"), &["prot"]);
        rejects(&BASE.replace("mac = ", "wieght = 2\nmac = "), &["wieght"]);
    }

    #[test]
    fn syntax_errors_keep_the_line() {
        rejects("interface = \"eth0\"\n\nport = = 80\n", &["line 3"]);
        rejects(&BASE.replace("port = 80", "port = \"80\""), &["line 7"]);
    }

    #[test]
    fn load_names_the_file() {
        let missing = Path::new("/nonexistent/xlb-test.toml");
        let e = format!("{:#}", Config::load(missing).expect_err("missing file"));
        assert!(e.contains("/nonexistent/xlb-test.toml"), "{e}");

        let path =
            std::env::temp_dir().join(format!("xlb-config-test-{}.toml", std::process::id()));
        std::fs::write(&path, BASE.replace("port = 80", "port = 0")).expect("write temp file");
        let result = Config::load(&path);
        let _ = std::fs::remove_file(&path);
        let e = format!("{:#}", result.expect_err("bad port"));
        assert!(
            e.contains(&path.display().to_string()) && e.contains(".port: 0"),
            "{e}"
        );
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:00:5E:10:00:ff").expect("valid"),
            [2, 0, 0x5e, 0x10, 0, 0xff]
        );
        assert_eq!(
            format_mac(&[2, 0, 0x5e, 0x10, 0, 0xff]),
            "02:00:5e:10:00:ff"
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "2:0:0:0:0:1",
            "02-00-00-00-00-01",
            "+2:00:00:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?} accepted");
        }
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The example shipped next to the crate must stay valid.
    #[test]
    fn demo_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/demo.toml");
        let config = Config::load(&path).expect("tests/demo.toml is valid");
        assert_eq!(config.services.len(), 4);
        assert!(config.services.iter().all(|s| s.backends.len() == 3));
        assert!(config.services.iter().all(|s| s.health.is_some()));
    }

    #[test]
    fn shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("xlb.example.toml");
        let config = Config::load(&path).expect("xlb.example.toml is valid");
        assert_eq!(config.services.len(), 3);
        assert_eq!(config.services[2].affinity_prefix_v4, 24);
        assert_eq!(config.services[0].backends[2].state, BackendState::Draining);
        let health = config.services[0].health.as_ref().expect("web has checks");
        assert_eq!((health.rise, health.fall), (2, 3));
        assert!(config.metrics_address.is_some());
    }
}

#[cfg(test)]
mod health_tests {
    use super::*;

    const SVC: &str = "interface = \"eth0\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.10\"\nport = 80\nprotocol = \"tcp\"\n[[service.backend]]\naddress = \"10.0.0.21\"\nmac = \"02:00:00:00:00:21\"\n";

    fn with(health: &str) -> Result<Config> {
        Config::parse(&format!("{SVC}[service.health]\n{health}"))
    }

    #[test]
    fn defaults_are_haproxy_like() {
        let c = Config::parse(SVC).expect("valid");
        assert_eq!(c.services[0].health, None);
        assert_eq!(c.state_file, Path::new("/var/lib/xlb/eth0.state.json"));
        let h = with("").expect("valid").services[0]
            .health
            .clone()
            .expect("health");
        assert_eq!(h.kind, HealthKind::Tcp);
        assert_eq!((h.port, h.rise, h.fall), (80, 2, 3));
        assert_eq!(h.interval, Duration::from_secs(2));
        assert_eq!(h.timeout, Duration::from_secs(1));
        let h = with("kind = \"http\"\ninterval = \"500ms\"\nport = 8080\n")
            .expect("valid")
            .services[0]
            .health
            .clone()
            .expect("health");
        assert_eq!(
            h.kind,
            HealthKind::Http {
                path: "/".into(),
                status: 200
            }
        );
        // The default timeout never exceeds the interval.
        assert_eq!(h.timeout, Duration::from_millis(500));
        assert_eq!(h.port, 8080);
    }

    /// `via = "tunnel"`: only for "ipip" services and kinds tcp/udp; errors name the field.
    #[test]
    fn tunnelled_checks_need_ipip_and_tcp_or_udp() {
        let ipip = SVC.replace("mac = \"02:00:00:00:00:21\"\n", "").replace(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\nforward_mode = \"ipip\"\n",
        );
        let parse = |svc: &str, h: &str| Config::parse(&format!("{svc}[service.health]\n{h}"));
        let via = |svc: &str, h: &str| {
            parse(svc, h).expect("valid").services[0]
                .health
                .clone()
                .expect("health")
                .via
        };
        assert_eq!(via(SVC, ""), HealthVia::Direct);
        assert_eq!(via(&ipip, ""), HealthVia::Direct);
        assert_eq!(via(&ipip, "via = \"direct\""), HealthVia::Direct);
        assert_eq!(via(&ipip, "via = \"tunnel\""), HealthVia::Tunnel);
        assert_eq!(
            via(&ipip, "via = \"tunnel\"\nkind = \"tcp\"\nport = 8080"),
            HealthVia::Tunnel
        );
        let udp = ipip.replace("protocol = \"tcp\"", "protocol = \"udp\"");
        assert_eq!(
            via(&udp, "via = \"tunnel\"\nudp_expect = \"pong\""),
            HealthVia::Tunnel
        );

        let e = |svc: &str, h: &str| format!("{:#}", parse(svc, h).expect_err("must fail"));
        let field = "service[0] (\"web\").health.via: ";
        let dsr = e(SVC, "via = \"tunnel\"");
        assert!(
            dsr.contains(&format!("{field}\"tunnel\" needs forward_mode = \"ipip\"")),
            "{dsr}"
        );
        let http = e(&ipip, "via = \"tunnel\"\nkind = \"http\"");
        assert!(
            http.contains(&format!(
                "{field}\"tunnel\" works with kinds \"tcp\" and \"udp\" only (kind is \"http\")"
            )),
            "{http}"
        );
        let bad = e(&ipip, "via = \"gre\"");
        assert!(
            bad.contains(&format!("{field}\"gre\" is not a way to check")),
            "{bad}"
        );
    }

    #[test]
    fn http_checks_need_a_tcp_service() {
        let udp = SVC.replace("\"tcp\"", "\"udp\"");
        let parse = |h: &str| Config::parse(&format!("{udp}[service.health]\n{h}"));
        assert!(parse("kind = \"udp\"").is_ok());
        assert!(parse("kind = \"tcp\"\nport = 8080").is_ok());
        let e = format!("{:#}", parse("kind = \"http\"").expect_err("http on udp"));
        assert!(
            e.contains(
                "service[0] (\"web\").health.kind: \"http\" needs a TCP service but this one is udp"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_health_fields_are_named() {
        let e = |h: &str| format!("{:#}", with(h).expect_err("must fail"));
        assert!(e("kind = \"icmp\"").contains("service[0] (\"web\").health.kind: \"icmp\""));
        assert!(e("rise = 0").contains("health.rise: 0 is out of range 1..=100"));
        assert!(e("interval = \"10ms\"").contains("health.interval"));
        assert!(e("timeout = \"3s\"").contains("health.timeout"));
        assert!(e("timeout = \"1ns\"").contains("health.timeout: 1ns must be at least 10ms"));
        assert!(
            e("http_path = \"/x\"").contains("health.http_path: only valid with kind = \"http\"")
        );
        assert!(e("kind = \"http\"\nhttp_path = \"x\"").contains("health.http_path: \"x\""));
        assert!(e("kind = \"http\"\nhttp_status = 99").contains("health.http_status: 99"));
        assert!(e("colour = 1").contains("colour"));
        assert!(
            format!(
                "{:#}",
                Config::parse(&format!("state_file = \"rel\"\n{SVC}")).expect_err("relative")
            )
            .contains("state_file: \"rel\"")
        );
        assert!(
            format!(
                "{:#}",
                Config::parse(&format!("metrics_address = \"9433\"\n{SVC}")).expect_err("no ip")
            )
            .contains("metrics_address: \"9433\" is not an address:port")
        );
        let c =
            Config::parse(&format!("metrics_address = \"127.0.0.1:9433\"\n{SVC}")).expect("valid");
        assert_eq!(
            c.metrics_address,
            Some("127.0.0.1:9433".parse().expect("addr"))
        );
    }

    #[test]
    fn announce_table_is_optional_and_never_a_kernel_table() {
        let t = |text: &str| Config::parse(&format!("{text}\n{SVC}"));
        assert_eq!(t("").expect("valid").announce_table, None);
        assert_eq!(
            t("announce_table = 100").expect("valid").announce_table,
            Some(100)
        );
        assert_eq!(
            t("announce_table = 4294967295")
                .expect("valid")
                .announce_table,
            Some(u32::MAX)
        );
        for bad in ["0", "-1", "4294967296"] {
            let e = format!(
                "{:#}",
                t(&format!("announce_table = {bad}")).expect_err(bad)
            );
            assert!(
                e.contains("announce_table") && e.contains("out of range"),
                "{e}"
            );
        }
        for reserved in ["253", "254", "255"] {
            let e = format!(
                "{:#}",
                t(&format!("announce_table = {reserved}")).expect_err(reserved)
            );
            assert!(e.contains("kernel's own tables"), "{e}");
        }
    }

    #[test]
    fn sources_default_to_none_and_parse() {
        let c = Config::parse(SVC).expect("valid");
        assert_eq!((c.health_source_v4, c.health_source_v6), (None, None));
        let h = with("source = \"10.0.0.2\"").expect("valid").services[0]
            .health
            .clone()
            .expect("health");
        assert_eq!(h.source, Some("10.0.0.2".parse().expect("ip")));
        let c = Config::parse(&format!(
            "health_source_v4 = \"10.0.0.2\"\nhealth_source_v6 = \"fd00::2\"\n{SVC}"
        ))
        .expect("valid");
        assert_eq!(c.health_source_v4, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(c.health_source_v6, Some("fd00::2".parse().expect("ip")));
        assert_eq!(c.services[0].health, None);
    }

    #[test]
    fn bad_sources_are_named() {
        let e = |h: &str| format!("{:#}", with(h).expect_err("must fail"));
        let g = |top: &str| {
            format!(
                "{:#}",
                Config::parse(&format!("{top}\n{SVC}")).expect_err("must fail")
            )
        };
        let field = "service[0] (\"web\").health.source: ";
        assert!(e("source = \"nope\"").contains(&format!("{field}\"nope\" is not an IP address")));
        assert!(
            e("source = \"fd00::2\"").contains(&format!("{field}fd00::2 is IPv6 but must be IPv4"))
        );
        assert!(e("source = \"10.0.0.10\"").contains(&format!(
            "{field}10.0.0.10 is the vip of service[0] (\"web\")"
        )));
        for bad in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255"] {
            assert!(
                e(&format!("source = \"{bad}\"")).contains(&format!("{field}{bad} is")),
                "{bad}"
            );
        }
        assert!(
            g("health_source_v4 = \"fd00::2\"")
                .contains("health_source_v4: fd00::2 is IPv6 but must be IPv4")
        );
        assert!(
            g("health_source_v6 = \"10.0.0.2\"")
                .contains("health_source_v6: 10.0.0.2 is IPv4 but must be IPv6")
        );
        assert!(
            g("health_source_v6 = \"fe80::1\"").contains("health_source_v6: fe80::1 is link-local")
        );
        assert!(
            g("health_source_v6 = \"::1\"")
                .contains("health_source_v6: ::1 is not a usable source")
        );
        assert!(
            g("health_source_v6 = \"ff02::1\"")
                .contains("health_source_v6: ff02::1 is not a usable source")
        );
        assert!(
            g("health_source_v4 = \"10.0.0.10\"")
                .contains("health_source_v4: 10.0.0.10 is the vip of service[0] (\"web\")")
        );
        // A VIP of another service is refused too, whatever the order of the services.
        let two = format!(
            "{SVC}[service.health]\nsource = \"10.0.0.11\"\n[[service]]\nname = \"api\"\nvip = \"10.0.0.11\"\nport = 80\nprotocol = \"tcp\"\n[[service.backend]]\naddress = \"10.0.0.31\"\nmac = \"02:00:00:00:00:31\"\n"
        );
        let e = format!("{:#}", Config::parse(&two).expect_err("a VIP"));
        assert!(
            e.contains(&format!(
                "{field}10.0.0.11 is the vip of service[1] (\"api\")"
            )),
            "{e}"
        );
    }

    fn cluster(body: &str) -> Result<Config> {
        Config::parse(&format!("{SVC}[cluster]\n{body}"))
    }

    const CLUSTER: &str = "node_id = 1\nlisten = \"10.0.0.2:7946\"\nkey_file = \"/etc/xlb/k\"\n";

    #[test]
    fn cluster_section_is_parsed_with_its_peers() {
        let c = cluster(&format!(
            "{CLUSTER}peers = [\"2@10.0.0.3:7946\", \"3@[fd00::4]:7946\"]\n"
        ))
        .expect("valid");
        let cl = c.cluster.expect("cluster");
        assert_eq!(cl.node_id, 1);
        assert_eq!(cl.peers.len(), 2);
        assert_eq!(cl.peers[&3], "[fd00::4]:7946".parse().expect("addr"));
        assert_eq!(cl.sync_timeout, std::time::Duration::from_secs(3));
        assert!(Config::parse(SVC).expect("valid").cluster.is_none());
    }

    #[test]
    fn cluster_mistakes_are_named() {
        let cases = [
            ("peers = [\"1@10.0.0.3:7946\"]", "own id 1"),
            (
                "peers = [\"2@10.0.0.3:7946\", \"2@10.0.0.4:7946\"]",
                "listed twice",
            ),
            ("peers = [\"10.0.0.3:7946\"]", "is not ID@ADDRESS:PORT"),
            ("peers = [\"x@10.0.0.3:7946\"]", "is not a node id"),
            ("peers = [\"2@10.0.0.2:7946\"]", "own listen address"),
            ("peers = []", "empty"),
            (
                "peers = [\"2@10.0.0.3:7946\"]\nsync_timeout = \"2h\"",
                "out of range",
            ),
            (
                "peers = [\"70000@10.0.0.3:7946\"]",
                "out of range 1..=65535",
            ),
        ];
        for (body, want) in cases {
            let err = format!(
                "{:#}",
                cluster(&format!("{CLUSTER}{body}\n")).expect_err(body)
            );
            assert!(err.contains(want), "{body}: {err}");
        }
        let err = format!(
            "{:#}",
            cluster("listen = \"10.0.0.2:7946\"\n").expect_err("no id")
        );
        assert!(err.contains("cluster.node_id: missing"), "{err}");
        let err = format!(
            "{:#}",
            cluster("node_id = 1\nlisten = \"10.0.0.2:7946\"\nkey_file = \"k\"\npeers = [\"2@10.0.0.3:1\"]\n")
                .expect_err("relative")
        );
        assert!(err.contains("not an absolute path"), "{err}");
    }
}
