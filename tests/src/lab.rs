//! The lab: a bridge ("switch") namespace with a client, a load-balancer and N backend namespaces.
//!
//! ```text
//!   client ns (eth0) ──┐
//!   lb ns     (lb0)  ──┼── switch ns: br0 ports p-cl, p-lb, p-b1..p-bN
//!   backend i (eth0) ──┘
//! ```
//! Interface names are fixed; the namespaces keep labs apart.

use std::fmt;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cleanup;
use crate::client;
use crate::cmd;
use crate::netns::{NETNS_RUN_DIR, NetNs, NsChild};
use crate::xdp::{self, XdpMode, XdpPass};

/// Name of the load balancer's interface inside the LB namespace (the same in every lab).
pub const LB_IF: &str = "lb0";
/// Name of the client's and every backend's interface inside their namespaces.
pub const HOST_IF: &str = "eth0";
/// Name of the bridge inside the switch namespace.
pub const BRIDGE: &str = "br0";
/// The IPv4 virtual IP the load balancer owns.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
/// The IPv6 virtual IP the load balancer owns.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x10);
/// The load balancer's own IPv4 address.
pub const LB_IPV4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The load balancer's own IPv6 address.
pub const LB_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);
/// MAC address of `lb0`.
pub const LB_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xff, 0x01]);
/// MAC address of the client's `eth0`.
pub const CLIENT_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xcc, 0x01]);

/// Most backends a lab supports (addresses .21.. must stay below the clients' .100).
pub const MAX_BACKENDS: usize = 32;
/// Most client addresses per family (10.77.0.100 ..= 10.77.0.254).
pub const MAX_CLIENTS: usize = 155;
/// First client host number (10.77.0.100, fd00:77::100).
const CLIENT_BASE: usize = 100;
/// Backend i gets host number BACKEND_BASE + i.
const BACKEND_BASE: usize = 20;
/// Budget for links to come up and addresses to settle.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Numbers the labs of this process so names stay unique.
static LAB_SEQ: AtomicUsize = AtomicUsize::new(0);

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The six bytes, in wire order.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Size of the lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Number of backends (1..=32), named b1..bN.
    pub backends: usize,
    /// Number of client IPv4 addresses (10.77.0.100 upwards, at most 155).
    pub clients_v4: usize,
    /// Number of client IPv6 addresses (fd00:77::100 upwards, at most 155).
    pub clients_v6: usize,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            backends: 3,
            clients_v4: 16,
            clients_v6: 16,
        }
    }
}

/// One backend host: its namespace, interface and addresses.
#[derive(Debug)]
pub struct Backend {
    /// Short name (`b1`, `b2`, ...): also what its servers answer.
    pub name: String,
    /// 1-based index.
    pub index: usize,
    /// The backend's namespace.
    pub netns: NetNs,
    /// Interface name inside the namespace (`eth0`).
    pub ifname: &'static str,
    /// MAC address of `eth0` (`02:00:00:00:00:1N` with N in hex).
    pub mac: MacAddr,
    /// Own IPv4 address (10.77.0.(20+i)).
    pub ipv4: Ipv4Addr,
    /// Own IPv6 address (fd00:77::(20+i)).
    pub ipv6: Ipv6Addr,
    /// Its bridge port in the switch namespace.
    pub switch_port: String,
}

impl Backend {
    /// The backend's own address in the family of `like`.
    pub fn addr_like(&self, like: IpAddr) -> IpAddr {
        match like {
            IpAddr::V4(_) => IpAddr::V4(self.ipv4),
            IpAddr::V6(_) => IpAddr::V6(self.ipv6),
        }
    }
}

/// A running lab; dropping it deletes every namespace (and so every veth) and its bpffs directory.
#[derive(Debug)]
pub struct Lab {
    /// `xlb-<tag>-<pid>-<n>`: prefix of every namespace name and of the bpffs directory.
    pub id: String,
    /// The client namespace.
    pub client: NetNs,
    /// The load balancer namespace.
    pub lb: NetNs,
    /// The backends, b1 first.
    pub backends: Vec<Backend>,
    /// The switch namespace holding the bridge.
    pub switch: NetNs,
    /// The load balancer's interface (`lb0`).
    pub lb_if: &'static str,
    /// MAC of `lb0`.
    pub lb_mac: MacAddr,
    /// Own IPv4 address of `lb0`.
    pub lb_ipv4: Ipv4Addr,
    /// Own IPv6 address of `lb0`.
    pub lb_ipv6: Ipv6Addr,
    /// (switch netns name, bridge port name) of `lb0`'s veth peer: needs XDP for native XDP_TX.
    pub lb_peer: (String, String),
    /// The IPv4 VIP (on `lb0`, and on every backend's `lo`).
    pub vip4: Ipv4Addr,
    /// The IPv6 VIP (on `lb0`, and on every backend's `lo`).
    pub vip6: Ipv6Addr,
    /// The client's interface (`eth0`).
    pub client_if: &'static str,
    /// MAC of the client's `eth0`.
    pub client_mac: MacAddr,
    /// Client IPv4 source addresses.
    pub client_v4: Vec<Ipv4Addr>,
    /// Client IPv6 source addresses.
    pub client_v6: Vec<Ipv6Addr>,
    bpffs_dir: PathBuf,
    work_dir: PathBuf,
    xdp_passes: Mutex<Vec<XdpPass>>,
}

impl Lab {
    /// Builds the topology and returns once links are up and no address is tentative.
    pub fn new(tag: &str, opts: LabOptions) -> Result<Self> {
        validate(tag, &opts)?;
        if let Err(e) = Self::cleanup_stale(tag) {
            eprintln!("xlb-tests: stale cleanup for tag {tag} failed: {e:#}");
        }
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("xlb-{tag}-{}-{seq}", std::process::id());
        build(id, &opts).with_context(|| format!("building lab {tag}"))
    }

    /// Removes namespaces (with the processes still running in them, such as daemons and
    /// BIRD instances), bpffs and work directories left by dead processes that used `tag`.
    pub fn cleanup_stale(tag: &str) -> Result<usize> {
        let prefix = format!("xlb-{tag}-");
        let mut removed = 0;
        for name in stale_entries(Path::new(NETNS_RUN_DIR), &prefix)? {
            crate::netns::kill_processes_in(&Path::new(NETNS_RUN_DIR).join(&name))?;
            cmd::ip(&["netns", "del", &name])?;
            removed += 1;
        }
        let temp = std::env::temp_dir();
        for root in [Path::new(BPFFS), temp.as_path()] {
            for name in stale_entries(root, &prefix)? {
                let dir = root.join(&name);
                if !dir.is_dir() {
                    continue;
                }
                fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// `/run/netns/<lb netns>`: for `nsenter --net=` or `setns`.
    pub fn lb_netns_path(&self) -> &Path {
        self.lb.path()
    }

    /// Runs a program in the LB namespace (via nsenter, so /sys/fs/bpf stays visible).
    ///
    /// The exit status is not checked: look at `Output::status`.
    pub fn run_in_lb(&self, cmd: &[&str]) -> Result<Output> {
        self.lb.exec(cmd)
    }

    /// Starts a long-running program (e.g. the xlb daemon) in the LB namespace.
    pub fn spawn_in_lb(&self, cmd: &[&str]) -> Result<NsChild> {
        self.lb.spawn(cmd)
    }

    /// Runs `f` on a thread inside the client namespace (use the free fns of [`client`] in it).
    pub fn in_client<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send,
        T: Send,
    {
        self.client.run(f)
    }

    /// One HTTP GET from the client namespace; returns the body.
    pub fn http_get(&self, src: IpAddr, dst: IpAddr, port: u16) -> Result<String> {
        self.in_client(|| client::http_get(src, dst, port))
    }

    /// One UDP question from the client namespace; returns the reply text.
    pub fn udp_ask(&self, src: IpAddr, dst: IpAddr, port: u16) -> Result<String> {
        self.in_client(|| client::udp_ask(src, dst, port))
    }

    /// Both VIPs, IPv4 first.
    pub fn vips(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.vip4), IpAddr::V6(self.vip6)]
    }

    /// The VIP in the same family as `addr`.
    pub fn vip_for(&self, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => IpAddr::V4(self.vip4),
            IpAddr::V6(_) => IpAddr::V6(self.vip6),
        }
    }

    /// Every client source address, IPv4 first.
    pub fn client_addrs(&self) -> Vec<IpAddr> {
        let v4 = self.client_v4.iter().map(|a| IpAddr::V4(*a));
        let v6 = self.client_v6.iter().map(|a| IpAddr::V6(*a));
        v4.chain(v6).collect()
    }

    /// The backend called `name` (`b1`...).
    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// A bpffs directory private to this lab (`/sys/fs/bpf/<id>`), removed with the lab.
    ///
    /// It exists when bpffs is mounted at /sys/fs/bpf (`cargo xtask setup` mounts it).
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// A private directory for files of this lab (configs, control sockets, state files),
    /// `<tmp>/<id>/`, mode 0700; removed with the lab.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// Attaches an XDP_PASS program to `lb0`'s peer so native XDP_TX on `lb0` delivers; idempotent.
    pub fn attach_lb_peer_pass(&self) -> Result<()> {
        let mut passes = self
            .xdp_passes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if passes.iter().any(|p| p.target == self.lb_peer) {
            return Ok(());
        }
        passes.push(xdp::attach_pass(
            &self.switch,
            &self.lb_peer.1,
            XdpMode::Native,
        )?);
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Links first, so nothing holds the programs while namespaces go away.
        match self.xdp_passes.get_mut() {
            Ok(passes) => passes.clear(),
            Err(poisoned) => poisoned.into_inner().clear(),
        }
        if self.bpffs_dir.exists() {
            if let Err(e) = fs::remove_dir_all(&self.bpffs_dir) {
                eprintln!("xlb-tests: cannot remove {}: {e}", self.bpffs_dir.display());
            }
        }
        cleanup::remove_dir(&self.bpffs_dir);
        if let Err(e) = fs::remove_dir_all(&self.work_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("xlb-tests: cannot remove {}: {e}", self.work_dir.display());
            }
        }
        cleanup::remove_dir(&self.work_dir);
        // The NetNs fields delete their namespaces when they drop, right after this.
    }
}

/// Where bpffs is expected.
pub(crate) const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Rejects tags and sizes the naming and addressing schemes cannot express.
fn validate(tag: &str, opts: &LabOptions) -> Result<()> {
    // Dashes separate the name's fields, so a tag must not contain one.
    if tag.is_empty()
        || tag.len() > 16
        || !tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        bail!("lab tag {tag:?} must be 1-16 characters of [A-Za-z0-9_]");
    }
    if !(1..=MAX_BACKENDS).contains(&opts.backends) {
        bail!("backends must be 1..={MAX_BACKENDS}, got {}", opts.backends);
    }
    if opts.clients_v4 > MAX_CLIENTS || opts.clients_v6 > MAX_CLIENTS {
        bail!("at most {MAX_CLIENTS} client addresses per family");
    }
    Ok(())
}

/// Entries of `dir` named `<prefix><pid>-...` whose pid is not a live process (other than us).
fn stale_entries(dir: &Path, prefix: &str) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let me = std::process::id();
    let mut stale = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if pid != me && !Path::new(&format!("/proc/{pid}")).exists() {
            stale.push(name);
        }
    }
    Ok(stale)
}

/// Host number `n` as an IPv4 address in 10.77.0.0/24.
fn v4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, n as u8)
}

/// Host number `n` written in decimal as the last IPv6 group (`21` -> fd00:77::21), so the
/// IPv6 address reads like the IPv4 one.
fn v6(n: usize) -> Result<Ipv6Addr> {
    format!("fd00:77::{n}")
        .parse()
        .with_context(|| format!("no IPv6 address for host number {n}"))
}

/// Whether /sys/fs/bpf is a mounted bpffs.
pub(crate) fn bpffs_mounted() -> bool {
    let Ok(path) = std::ffi::CString::new(BPFFS) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own; path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Settings every namespace gets before its interfaces exist (new interfaces copy `default`).
pub(crate) const COMMON_SYSCTLS: &[(&str, &str)] = &[
    // No duplicate address detection: addresses are usable at once and never tentative.
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    // New namespaces inherit IPv4 settings from the host; pin the ones that change behaviour.
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv4.ip_forward", "0"),
];

/// Builds everything; each created namespace is owned by a guard, so an error undoes it all.
fn build(id: String, opts: &LabOptions) -> Result<Lab> {
    let ns_name = |role: &str| format!("{id}-{role}");

    let switch = NetNs::create(&ns_name("sw"))?;
    switch.sysctls(COMMON_SYSCTLS)?;
    // Bridge ports need no IPv6 of their own; without it they send no RS/MLD into the lab.
    switch.sysctls(&[
        ("net.ipv6.conf.all.disable_ipv6", "1"),
        ("net.ipv6.conf.default.disable_ipv6", "1"),
    ])?;

    let lb = NetNs::create(&ns_name("lb"))?;
    lb.sysctls(COMMON_SYSCTLS)?;

    let client = NetNs::create(&ns_name("cl"))?;
    client.sysctls(COMMON_SYSCTLS)?;
    // New namespaces default to tw_reuse=2 (loopback only) and run out of ports under load.
    client.sysctls(&[("net.ipv4.tcp_tw_reuse", "1")])?;

    let mut backends = Vec::with_capacity(opts.backends);
    for index in 1..=opts.backends {
        let name = format!("b{index}");
        let netns = NetNs::create(&ns_name(&name))?;
        netns.sysctls(COMMON_SYSCTLS)?;
        // Direct server return: the VIP on lo must not be answered or announced over ARP.
        netns.sysctls(&[
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
        ])?;
        backends.push(Backend {
            switch_port: format!("p-{name}"),
            mac: MacAddr([0x02, 0, 0, 0, 0, 0x10 + index as u8]),
            ipv4: v4(BACKEND_BASE + index),
            ipv6: v6(BACKEND_BASE + index)?,
            ifname: HOST_IF,
            name,
            index,
            netns,
        });
    }

    // The switch: a bridge without STP (ports forward at once) and without multicast
    // snooping (NDP multicast always floods, whatever MLD state the bridge learnt).
    let mut script = format!(
        "link add {BRIDGE} type bridge stp_state 0 mcast_snooping 0\nlink set {BRIDGE} up\n"
    );
    let mut ports: Vec<(&str, &NetNs, &str)> =
        vec![("p-cl", &client, HOST_IF), ("p-lb", &lb, LB_IF)];
    for b in &backends {
        ports.push((&b.switch_port, &b.netns, HOST_IF));
    }
    for (port, ns, ifname) in &ports {
        // Created from the switch side with the peer placed straight into its namespace, so
        // no name ever appears in the host namespace.
        script.push_str(&format!(
            "link add {port} type veth peer name {ifname} netns {}\nlink set {port} master {BRIDGE}\nlink set {port} up\n",
            ns.name()
        ));
    }
    switch.ip_batch(&script)?;

    let client_v4: Vec<Ipv4Addr> = (0..opts.clients_v4).map(|i| v4(CLIENT_BASE + i)).collect();
    let client_v6: Vec<Ipv6Addr> = (0..opts.clients_v6)
        .map(|i| v6(CLIENT_BASE + i))
        .collect::<Result<_>>()?;

    // The LB owns the VIPs so it answers ARP/NDP for them. Both are ordinary preferred
    // addresses, as operators configure them: the kernel would then pick the IPv6 /128 VIP
    // as the source of the LB's own connections to backends, so the daemon's health checks
    // must (and do) bind their source themselves.
    lb.ip_batch(&format!(
        "link set {LB_IF} address {LB_MAC}\nlink set {LB_IF} up\n\
         addr add {LB_IPV4}/24 dev {LB_IF}\naddr add {LB_IPV6}/64 dev {LB_IF} nodad\n\
         addr add {VIP4}/32 dev {LB_IF}\naddr add {VIP6}/128 dev {LB_IF} nodad\n"
    ))?;

    let mut script = format!("link set {HOST_IF} address {CLIENT_MAC}\nlink set {HOST_IF} up\n");
    for a in &client_v4 {
        script.push_str(&format!("addr add {a}/24 dev {HOST_IF}\n"));
    }
    for a in &client_v6 {
        script.push_str(&format!("addr add {a}/64 dev {HOST_IF} nodad\n"));
    }
    client.ip_batch(&script)?;
    // Frames with offloaded (unfilled) checksums crossing native XDP reach backends as bad.
    client.exec_ok(&["ethtool", "-K", HOST_IF, "tx", "off"])?;

    for b in &backends {
        b.netns.ip_batch(&format!(
            "link set {HOST_IF} address {mac}\nlink set {HOST_IF} up\n\
             addr add {v4}/24 dev {HOST_IF}\naddr add {v6}/64 dev {HOST_IF} nodad\n\
             addr add {VIP4}/32 dev lo\naddr add {VIP6}/128 dev lo nodad\n",
            mac = b.mac,
            v4 = b.ipv4,
            v6 = b.ipv6,
        ))?;
        b.netns.sysctls(&[
            ("net.ipv4.conf.eth0.arp_ignore", "1"),
            ("net.ipv4.conf.eth0.arp_announce", "2"),
        ])?;
        b.netns.exec_ok(&["ethtool", "-K", HOST_IF, "tx", "off"])?;
    }

    let port_names: Vec<String> = ports.iter().map(|(p, _, _)| (*p).to_owned()).collect();
    wait_ready(&switch, &port_names, &lb, &client, &backends)?;

    let bpffs_dir = Path::new(BPFFS).join(&id);
    if bpffs_mounted() {
        cleanup::add_dir(&bpffs_dir);
        fs::create_dir(&bpffs_dir).with_context(|| format!("creating {}", bpffs_dir.display()))?;
    }

    let work_dir = std::env::temp_dir().join(&id);
    cleanup::add_dir(&work_dir);
    fs::create_dir(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&work_dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", work_dir.display()))?;
    }

    Ok(Lab {
        work_dir,
        lb_peer: (switch.name().to_owned(), "p-lb".to_owned()),
        id,
        client,
        lb,
        backends,
        switch,
        lb_if: LB_IF,
        lb_mac: LB_MAC,
        lb_ipv4: LB_IPV4,
        lb_ipv6: LB_IPV6,
        vip4: VIP4,
        vip6: VIP6,
        client_if: HOST_IF,
        client_mac: CLIENT_MAC,
        client_v4,
        client_v6,
        bpffs_dir,
        xdp_passes: Mutex::new(Vec::new()),
    })
}

/// Waits until every interface is up, every bridge port forwards and no address is tentative.
fn wait_ready(
    switch: &NetNs,
    ports: &[String],
    lb: &NetNs,
    client: &NetNs,
    backends: &[Backend],
) -> Result<()> {
    let mut hosts: Vec<(&NetNs, &str)> = vec![(lb, LB_IF), (client, HOST_IF)];
    hosts.extend(backends.iter().map(|b| (&b.netns, HOST_IF)));
    cmd::wait_until(
        "lab links up and addresses settled",
        READY_TIMEOUT,
        Duration::from_millis(50),
        || {
            for (ns, ifname) in &hosts {
                if !link_up(ns, ifname)? || has_tentative(ns)? {
                    return Ok(false);
                }
            }
            for port in ports {
                if !link_up(switch, port)? || !port_forwarding(switch, port)? {
                    return Ok(false);
                }
            }
            link_up(switch, BRIDGE)
        },
    )
}

/// Whether `ifname` in `ns` reports operstate UP.
pub(crate) fn link_up(ns: &NetNs, ifname: &str) -> Result<bool> {
    let v = ns.ip_json(&["link", "show", "dev", ifname])?;
    Ok(v.as_array()
        .and_then(|links| links.first())
        .and_then(|l| l.get("operstate"))
        .and_then(|s| s.as_str())
        == Some("UP"))
}

/// Whether any IPv6 address in `ns` is still tentative (or failed DAD).
pub(crate) fn has_tentative(ns: &NetNs) -> Result<bool> {
    let v = ns.ip_json(&["-6", "addr", "show", "tentative"])?;
    let links = v.as_array().map(Vec::as_slice).unwrap_or_default();
    Ok(links.iter().any(|l| {
        l.get("addr_info")
            .and_then(|a| a.as_array())
            .is_some_and(|a| !a.is_empty())
    }))
}

/// Whether bridge port `port` is in the forwarding state.
fn port_forwarding(switch: &NetNs, port: &str) -> Result<bool> {
    let out = cmd::run(std::process::Command::new("bridge").args([
        "-n",
        switch.name(),
        "-j",
        "link",
        "show",
        "dev",
        port,
    ]))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `bridge -j link` output")?;
    Ok(v.as_array()
        .and_then(|l| l.first())
        .and_then(|l| l.get("state"))
        .and_then(|s| s.as_str())
        == Some("forwarding"))
}
