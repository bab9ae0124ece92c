//! The routed lab: backends in other subnets behind a router, reached by IP-in-IP
//! (`forward_mode = "ipip"`) and decapsulating with `xlb decap`.
//!
//! ```text
//!   client ns ── eth0 ═ rc0 ─┐                  ┌─ rb1 ═ eth0 ── backend b1 (10.81.11.2, VIPs on lo, xlb decap)
//!   10.81.1.100.. /24        │   router ns      ├─ rb2 ═ eth0 ── backend b2 (10.81.12.2)
//!   fd00:81:1::100.. /64     │   (forwarding)   └─ rb3 ═ eth0 ── backend b3 (10.81.13.2)
//!                            └─ rl0 ═ lb0 ── lb ns (10.81.2.2, one-armed, XDP + xlb daemon)
//!   router: VIPs 10.81.100.10/32 and fd00:81:100::10/128 via the LB's address
//! ```
//! Client packets to a VIP go client → router → LB; the LB encapsulates them towards the
//! backend's own address and sends them back out of `lb0` (`XDP_TX`) to the router, which
//! routes them to the backend; the backend strips the outer header (`xlb decap`) and answers
//! from the VIP through its default route, the router, straight to the client.
//!
//! Names: namespaces `xlb-<tag>-<pid>-<n>-{cl,rt,lb,b1..}`, the bpffs directory
//! `/sys/fs/bpf/<id>` (xlb's pins and each backend's decap pins) and the work directory
//! `<tmp>/<id>`, all removed when the lab drops (also on panic and on SIGINT/SIGTERM), and
//! leftovers of a dead process removed by the next lab with the same tag
//! ([`Lab::cleanup_stale`] covers these names too).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::{self, Proto};
use crate::cmd;
use crate::daemon::HealthOptions;
use crate::driver::{self, Mapping, Mode};
use crate::lab::{self, Lab};
use crate::netns::{NetNs, NsChild};
use crate::servers::{HTTP_PORT, ServerSpec, UDP_PORT};
use crate::xdp::{self, XdpMode, XdpPass};
use crate::{cleanup, netns};

/// The IPv4 VIP (routed to the LB by the router; on every backend's `lo`).
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 81, 100, 10);
/// The IPv6 VIP.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x81, 0x100, 0, 0, 0, 0, 0x10);
/// The LB's own IPv4 address on `lb0`.
pub const LB_IPV4: Ipv4Addr = Ipv4Addr::new(10, 81, 2, 2);
/// The LB's own IPv6 address on `lb0`.
pub const LB_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x81, 2, 0, 0, 0, 0, 2);
/// The router's IPv4 address towards the LB (the LB's gateway).
pub const RT_LB_IPV4: Ipv4Addr = Ipv4Addr::new(10, 81, 2, 1);
/// The router's IPv6 address towards the LB.
pub const RT_LB_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x81, 2, 0, 0, 0, 0, 1);
/// The LB's interface (its only one besides `lo`).
pub const LB_IF: &str = "lb0";
/// The router's interface facing the LB.
pub const RT_LB_IF: &str = "rl0";
/// The router's interface facing the client.
pub const RT_CLIENT_IF: &str = "rc0";
/// The client's and every backend's interface.
pub const HOST_IF: &str = "eth0";
/// Metrics endpoint of the daemon (the LB's own address; `lo` carries nothing else).
pub const METRICS_PORT: u16 = 9433;
/// Most client addresses per family.
pub const MAX_CLIENTS: usize = 100;
/// Most backends.
pub const MAX_BACKENDS: usize = 9;
/// Budget for links to come up and addresses to settle.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon gets to answer on its socket after starting.
const DAEMON_START: Duration = Duration::from_secs(30);
/// The nftables table counting frames from a VIP arriving at the LB.
const NFT_TABLE: &str = "xlb_replies";

/// Numbers the routed labs of this process so names stay unique.
static SEQ: AtomicUsize = AtomicUsize::new(0);

/// One backend behind the router, in a subnet of its own.
#[derive(Debug)]
pub struct RoutedBackend {
    /// `b1`, `b2`, ...: also what its servers answer.
    pub name: String,
    /// 1-based index.
    pub index: usize,
    /// Its namespace.
    pub netns: NetNs,
    /// Own IPv4 address (10.81.(10+i).2/24).
    pub ipv4: Ipv4Addr,
    /// Own IPv6 address (fd00:81:(10+i)::2/64).
    pub ipv6: Ipv6Addr,
    /// The router's interface towards it (`rb<i>`).
    pub router_if: String,
}

impl RoutedBackend {
    /// The backend's own address in the family of `like`.
    pub fn addr_like(&self, like: IpAddr) -> IpAddr {
        match like {
            IpAddr::V4(_) => IpAddr::V4(self.ipv4),
            IpAddr::V6(_) => IpAddr::V6(self.ipv6),
        }
    }
}

/// A running routed lab; dropping it removes the pins, the work directory and every
/// namespace (and with them every veth and XDP attachment).
#[derive(Debug)]
pub struct RoutedLab {
    /// `xlb-<tag>-<pid>-<n>`.
    pub id: String,
    /// Client IPv4 source addresses.
    pub client_v4: Vec<Ipv4Addr>,
    /// Client IPv6 source addresses.
    pub client_v6: Vec<Ipv6Addr>,
    bpffs_dir: PathBuf,
    work_dir: PathBuf,
    xdp_passes: Mutex<Vec<XdpPass>>,
    // Namespaces last: they drop after the pins are gone (see Drop).
    /// The client namespace.
    pub client: NetNs,
    /// The router namespace.
    pub router: NetNs,
    /// The load balancer's namespace.
    pub lb: NetNs,
    /// The backends, b1 first.
    pub backends: Vec<RoutedBackend>,
}

impl RoutedLab {
    /// Builds the topology with `backends` backends and `clients` addresses per family;
    /// returns once links are up and no address is tentative.
    pub fn new(tag: &str, backends: usize, clients: usize) -> Result<Self> {
        if !(1..=MAX_BACKENDS).contains(&backends) || !(1..=MAX_CLIENTS).contains(&clients) {
            bail!("routed lab: 1..={MAX_BACKENDS} backends and 1..={MAX_CLIENTS} clients");
        }
        if let Err(e) = Lab::cleanup_stale(tag) {
            eprintln!("xlb-tests: stale cleanup for tag {tag} failed: {e:#}");
        }
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("xlb-{tag}-{}-r{seq}", std::process::id());
        build(id, backends, clients).with_context(|| format!("building routed lab {tag}"))
    }

    /// Both VIPs, IPv4 first.
    pub fn vips(&self) -> [IpAddr; 2] {
        [IpAddr::V4(VIP4), IpAddr::V6(VIP6)]
    }

    /// The VIP in the family of `addr`.
    pub fn vip_for(&self, addr: IpAddr) -> IpAddr {
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

    /// The backend called `name`.
    pub fn backend(&self, name: &str) -> Option<&RoutedBackend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// `/sys/fs/bpf/<id>`: xlb's `pin_dir` and the decap pins live under it.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// `<tmp>/<id>`, mode 0700: configs, the control socket, the state file.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// What the servers of backend `name` bind: both VIPs (balanced traffic) and its own
    /// addresses (direct health checks).
    pub fn server_spec(&self, name: &str) -> Result<ServerSpec> {
        let b = self
            .backend(name)
            .with_context(|| format!("no routed backend {name}"))?;
        Ok(ServerSpec {
            name: b.name.clone(),
            netns: b.netns.path().to_owned(),
            udp_addrs: vec![
                IpAddr::V4(VIP4),
                IpAddr::V6(VIP6),
                IpAddr::V4(b.ipv4),
                IpAddr::V6(b.ipv6),
            ],
        })
    }

    /// [`RoutedLab::server_spec`] of every backend.
    pub fn server_specs(&self) -> Result<Vec<ServerSpec>> {
        self.backends
            .iter()
            .map(|b| self.server_spec(&b.name))
            .collect()
    }

    /// The pin root of backend `b`'s decapsulator (each backend's interface is `eth0`).
    fn decap_pins(&self, b: &RoutedBackend) -> PathBuf {
        self.bpffs_dir.join(format!("decap-{}", b.name))
    }

    /// Runs `xlb decap --interface eth0 ... ARGS` in backend `b`'s namespace.
    fn decap(&self, b: &RoutedBackend, args: &[&str]) -> Result<String> {
        let bin = driver::xlb_bin()?;
        let pins = self.decap_pins(b);
        let mut argv = vec![
            bin.to_str().context("xlb path is not UTF-8")?,
            "decap",
            "--interface",
            HOST_IF,
            "--pin-dir",
            pins.to_str().context("pin path is not UTF-8")?,
        ];
        argv.extend_from_slice(args);
        let out = b.netns.exec(&argv)?;
        if !out.status.success() {
            bail!(
                "xlb {} in {} failed ({}):\n{}{}",
                argv[1..].join(" "),
                b.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Attaches `xlb decap` for both VIPs to backend `name`'s `eth0`.
    pub fn decap_attach(&self, name: &str, mode: Mode) -> Result<String> {
        let b = self
            .backend(name)
            .with_context(|| format!("no routed backend {name}"))?;
        let vip4 = VIP4.to_string();
        let vip6 = VIP6.to_string();
        self.decap(
            b,
            &["--xdp-mode", mode.as_str(), "--vip", &vip4, "--vip", &vip6],
        )
    }

    /// Detaches backend `name`'s decapsulator and waits (≤ 3 s) until the kernel has
    /// released it from the interface.
    pub fn decap_detach(&self, name: &str) -> Result<()> {
        let b = self
            .backend(name)
            .with_context(|| format!("no routed backend {name}"))?;
        self.decap(b, &["--detach"])?;
        // The kernel releases an unpinned link from a work queue, a moment later.
        cmd::wait_until(
            "the decapsulator to leave eth0",
            Duration::from_secs(3),
            Duration::from_millis(20),
            || {
                Ok(!b
                    .netns
                    .ip(&["-d", "link", "show", HOST_IF])?
                    .contains("prog/xdp"))
            },
        )
    }

    /// `xlb decap --stats --json` of backend `name`.
    pub fn decap_stats(&self, name: &str) -> Result<serde_json::Value> {
        let b = self
            .backend(name)
            .with_context(|| format!("no routed backend {name}"))?;
        let out = self.decap(b, &["--stats", "--json"])?;
        serde_json::from_str(&out).context("xlb decap --stats --json is not JSON")
    }

    /// Attaches an XDP_PASS program to the router's `rl0` (the LB's veth peer), so native
    /// `XDP_TX` on `lb0` delivers; idempotent.
    pub fn attach_router_pass(&self) -> Result<()> {
        let mut passes = self
            .xdp_passes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if passes.is_empty() {
            passes.push(xdp::attach_pass(&self.router, RT_LB_IF, XdpMode::Native)?);
        }
        Ok(())
    }

    /// Sets the MAC of the router's interface facing the LB (the LB's next hop).
    pub fn set_router_lb_mac(&self, mac: &str) -> Result<()> {
        self.router
            .ip(&["link", "set", "dev", RT_LB_IF, "address", mac])?;
        Ok(())
    }

    /// Installs an nftables netdev-ingress table on `lb0` that counts frames from either
    /// VIP: with direct server return no reply ever arrives there. XDP runs before this
    /// hook, and passes such frames (they are for no service), so they are counted.
    pub fn count_vip_frames_at_lb(&self) -> Result<()> {
        let script = format!(
            "table netdev {NFT_TABLE} {{\n\
             counter from_vip4 {{}}\n\
             counter from_vip6 {{}}\n\
             chain ingress {{\n\
             type filter hook ingress device \"{LB_IF}\" priority -500; policy accept;\n\
             ip saddr {VIP4} counter name \"from_vip4\"\n\
             ip6 saddr {VIP6} counter name \"from_vip6\"\n\
             }}\n}}\n"
        );
        cmd::run_with_stdin(self.lb.command("nft").args(["-f", "-"]), &script)
            .context("installing the VIP counter on lb0")?;
        Ok(())
    }

    /// Frames from (VIP4, VIP6) seen at `lb0`'s ingress so far.
    pub fn vip_frames_at_lb(&self) -> Result<(u64, u64)> {
        let out = self.lb.exec_ok(&[
            "nft", "-j", "list", "counters", "table", "netdev", NFT_TABLE,
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("nft -j output")?;
        let mut found = BTreeMap::new();
        for item in v["nftables"].as_array().context("nft -j: no list")? {
            if let Some(c) = item.get("counter") {
                let name = c["name"].as_str().unwrap_or_default().to_owned();
                found.insert(name, c["packets"].as_u64().unwrap_or(0));
            }
        }
        Ok((
            *found.get("from_vip4").context("no from_vip4 counter")?,
            *found.get("from_vip6").context("no from_vip6 counter")?,
        ))
    }

    /// Sends one UDP datagram from `vip` (bound in backend `name`'s namespace, where the
    /// VIP is on `lo`) to the LB's own address: the positive control of the VIP counter,
    /// a frame that takes the path a reply routed via the LB would take.
    pub fn send_from_vip_to_lb(&self, name: &str, vip: IpAddr) -> Result<()> {
        let b = self
            .backend(name)
            .with_context(|| format!("no routed backend {name}"))?;
        let lb = match vip {
            IpAddr::V4(_) => IpAddr::V4(LB_IPV4),
            IpAddr::V6(_) => IpAddr::V6(LB_IPV6),
        };
        b.netns.run(|| {
            let sock = UdpSocket::bind(SocketAddr::new(vip, 0))
                .with_context(|| format!("binding {vip}"))?;
            sock.send_to(b"not a reply", SocketAddr::new(lb, 9))
                .context("sending to the LB")?;
            Ok(())
        })
    }

    /// Every client asks once over each of `protos` (one thread in the client namespace);
    /// the answers, or the first failure.
    pub fn round(&self, protos: &[Proto]) -> Result<Mapping> {
        let clients = self.client_addrs();
        self.client.run(|| {
            let mut out = Mapping::new();
            for src in &clients {
                let vip = self.vip_for(*src);
                for proto in protos {
                    let name = match proto {
                        Proto::Tcp => client::http_get(*src, vip, HTTP_PORT),
                        Proto::Udp => client::udp_ask(*src, vip, UDP_PORT),
                    }
                    .with_context(|| format!("request from {src} over {proto:?}"))?;
                    out.insert((*src, *proto), name);
                }
            }
            Ok(out)
        })
    }

    /// `rounds` rounds of [`RoutedLab::round`]; fails if any client got two backends.
    pub fn observe(&self, protos: &[Proto], rounds: usize) -> Result<Mapping> {
        let mut mapping = Mapping::new();
        for round in 0..rounds {
            for (key, name) in self.round(protos)? {
                match mapping.get(&key) {
                    Some(prev) if *prev != name => bail!(
                        "client {} over {:?} moved from {prev} to {name} in round {round}",
                        key.0,
                        key.1
                    ),
                    Some(_) => {}
                    None => {
                        mapping.insert(key, name);
                    }
                }
            }
        }
        Ok(mapping)
    }

    /// The `xlb daemon` config: HTTP (tcp) and UDP services on both VIPs, all `ipip`, every
    /// backend by address only (no `mac`), health checks of the backends' own addresses.
    pub fn daemon_config(&self, mode: Mode, health: &HealthOptions) -> String {
        self.daemon_config_via(mode, health, Via::Direct)
    }

    /// [`RoutedLab::daemon_config`] with checks sent `via` the given way.
    pub fn daemon_config_via(&self, mode: Mode, health: &HealthOptions, via: Via) -> String {
        let mut text = format!(
            "interface = \"{LB_IF}\"\nxdp_mode = \"{}\"\npin_dir = \"{}\"\nmax_services = 4\n\
             maglev_table_size = 4099\nstate_file = \"{}\"\nmetrics_address = \"{LB_IPV4}:{METRICS_PORT}\"\n",
            mode.as_str(),
            self.bpffs_dir.join("xlb").display(),
            self.work_dir.join("state.json").display(),
        );
        for vip in self.vips() {
            let fam = if vip.is_ipv4() { "v4" } else { "v6" };
            // Tunnelled checks know tcp and udp only: the HTTP services get a connect check.
            let (http_kind, udp_kind) = match via {
                Via::Direct => ("kind = \"http\"\nhttp_path = \"/\"\n", "kind = \"udp\"\n"),
                Via::Tunnel => (
                    "kind = \"tcp\"\nvia = \"tunnel\"\n",
                    "kind = \"udp\"\nvia = \"tunnel\"\n",
                ),
            };
            for (name, port, proto, kind) in [
                ("http", HTTP_PORT, "tcp", http_kind),
                ("echo", UDP_PORT, "udp", udp_kind),
            ] {
                text.push_str(&format!(
                    "\n[[service]]\nname = \"{name}-{fam}\"\nvip = \"{vip}\"\nport = {port}\n\
                     protocol = \"{proto}\"\nforward_mode = \"ipip\"\n"
                ));
                for b in &self.backends {
                    text.push_str(&format!(
                        "[[service.backend]]\nname = \"{}\"\naddress = \"{}\"\n",
                        b.name,
                        b.addr_like(vip)
                    ));
                }
                text.push_str(&format!(
                    "[service.health]\n{kind}interval = \"{}\"\ntimeout = \"{}\"\nrise = {}\nfall = {}\n",
                    health.interval, health.timeout, health.rise, health.fall
                ));
            }
        }
        text
    }

    /// Writes `config` to `<work dir>/xlb.toml` and starts `xlb daemon` in the LB namespace;
    /// returns once it answers `status`.
    pub fn start_daemon(&self, config: &str) -> Result<RoutedDaemon> {
        let path = self.work_dir.join("xlb.toml");
        fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let socket = self.work_dir.join("xlb.sock");
        let bin = driver::xlb_bin()?;
        let mut child = self.lb.spawn(&[
            bin.to_str().context("xlb path is not UTF-8")?,
            "--socket",
            socket.to_str().context("socket path is not UTF-8")?,
            "daemon",
            "--config",
            path.to_str().context("config path is not UTF-8")?,
        ])?;
        let deadline = Instant::now() + DAEMON_START;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "xlb daemon exited ({status}) while starting:\n{}",
                    child.log()
                );
            }
            if socket.exists() {
                let d = RoutedDaemon {
                    child,
                    socket: socket.clone(),
                };
                if d.ctl(self, &["status"]).is_ok() {
                    return Ok(d);
                }
                child = d.child;
            }
            if Instant::now() > deadline {
                bail!(
                    "xlb daemon did not answer within {DAEMON_START:?}:\n{}",
                    child.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET /metrics` from the LB namespace.
    pub fn scrape(&self) -> Result<String> {
        self.lb.run(|| {
            let addr = SocketAddr::new(IpAddr::V4(LB_IPV4), METRICS_PORT);
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(4)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
    }
}

impl Drop for RoutedLab {
    fn drop(&mut self) {
        match self.xdp_passes.get_mut() {
            Ok(passes) => passes.clear(),
            Err(poisoned) => poisoned.into_inner().clear(),
        }
        // Pins first (xlb's and the decapsulators' links and maps); the namespaces drop
        // right after and take the veths, and so the attachments, with them.
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
    }
}

/// A running `xlb daemon` of a routed lab; terminated when dropped.
pub struct RoutedDaemon {
    /// The process (its log is in `child.log()`).
    pub child: NsChild,
    /// Its control socket.
    pub socket: PathBuf,
}

impl RoutedDaemon {
    /// Runs `xlb --socket S --json ARGS` in the LB namespace and parses its JSON.
    pub fn ctl(&self, lab: &RoutedLab, args: &[&str]) -> Result<serde_json::Value> {
        let bin = driver::xlb_bin()?;
        let mut argv = vec![
            bin.to_str().context("xlb path is not UTF-8")?,
            "--socket",
            self.socket.to_str().context("socket path is not UTF-8")?,
            "--json",
        ];
        argv.extend_from_slice(args);
        let out = lab.lb.exec(&argv)?;
        if !out.status.success() {
            bail!(
                "xlb {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("xlb {} --json printed no JSON", args.join(" ")))
    }

    /// Waits until backend `backend` has `field == value` in every service of the lab's
    /// config (`xlb backend list`), at most `timeout`; returns how long it took.
    pub fn wait_all(
        &self,
        lab: &RoutedLab,
        backend: &str,
        field: &str,
        value: &str,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let list = self.ctl(lab, &["backend", "list"])?;
            let rows: Vec<&serde_json::Value> = list
                .as_array()
                .map(|l| l.iter().filter(|b| b["name"] == backend).collect())
                .unwrap_or_default();
            if rows.len() == SERVICES.len() && rows.iter().all(|b| b[field] == value) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{backend}: {field} not {value} in every service within {timeout:?}: {list}\n\
                     daemon log:\n{}",
                    cmd::tail(self.child.log().as_bytes())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `xlb stats --json`: the global counter `reason`.
    pub fn reason(&self, lab: &RoutedLab, reason: &str) -> Result<u64> {
        let stats = self.ctl(lab, &["stats"])?;
        stats["reasons"]
            .as_array()
            .and_then(|r| r.iter().find(|e| e[0] == reason))
            .and_then(|e| e[1].as_u64())
            .with_context(|| format!("no counter {reason} in {stats}"))
    }
}

/// How the daemon's health checks reach a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// To the backend's own address (`via = "direct"`, the default).
    Direct,
    /// To the VIP, IP-in-IP to the backend (`via = "tunnel"`).
    Tunnel,
}

/// The services of [`RoutedLab::daemon_config`], in config order.
pub const SERVICES: [&str; 4] = ["http-v4", "echo-v4", "http-v6", "echo-v6"];

/// One probe with short timeouts, for measuring outages: HTTP within `limit`, or one UDP
/// datagram waiting `limit` for the answer. Call in the client namespace.
pub fn quick_probe(src: IpAddr, vip: IpAddr, proto: Proto, limit: Duration) -> Result<String> {
    match proto {
        Proto::Tcp => client::http_get_within(src, SocketAddr::new(vip, HTTP_PORT), limit),
        Proto::Udp => {
            let sock = UdpSocket::bind(SocketAddr::new(src, 0)).context("binding")?;
            sock.connect(SocketAddr::new(vip, UDP_PORT))
                .context("connecting")?;
            sock.set_read_timeout(Some(limit))?;
            sock.send(b"who are you?").context("sending")?;
            let mut buf = [0u8; 2048];
            let n = sock.recv(&mut buf).context("no answer")?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        }
    }
}

/// When a probe was first answered (from the start of the measurement), and by whom.
pub type Answered = (Duration, String);

/// For each (client, protocol) of `pairs`: probes it from its own thread in `ns` every
/// `every` (each probe bounded by `limit`) until it is answered, for at most `within`.
/// Returns, per pair, the time from the call to the first answer and who answered
/// (`None`: never answered).
pub fn time_to_answer(
    ns: &NetNs,
    vip_for: impl Fn(IpAddr) -> IpAddr + Sync,
    pairs: &[(IpAddr, Proto)],
    limit: Duration,
    every: Duration,
    within: Duration,
) -> Vec<((IpAddr, Proto), Option<Answered>)> {
    let start = Instant::now();
    let vip_for = &vip_for;
    std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|&(src, proto)| {
                let path = ns.path().to_owned();
                s.spawn(move || {
                    if netns::enter(&path).is_err() {
                        return None;
                    }
                    let vip = vip_for(src);
                    while start.elapsed() < within {
                        let tried = Instant::now();
                        if let Ok(name) = quick_probe(src, vip, proto, limit) {
                            return Some((start.elapsed(), name));
                        }
                        std::thread::sleep(every.saturating_sub(tried.elapsed()));
                    }
                    None
                })
            })
            .collect();
        pairs
            .iter()
            .zip(handles)
            .map(|(pair, h)| (*pair, h.join().ok().flatten()))
            .collect()
    })
}

/// Host number `n` of the client network.
fn client_v4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 81, 1, n as u8)
}

/// Host number `n` of the client network, written like the IPv4 one.
fn client_v6(n: usize) -> Result<Ipv6Addr> {
    format!("fd00:81:1::{n}")
        .parse()
        .with_context(|| format!("no IPv6 client address for host number {n}"))
}

/// Builds everything; each namespace is owned by a guard, so an error undoes it all.
fn build(id: String, n_backends: usize, n_clients: usize) -> Result<RoutedLab> {
    let ns_name = |role: &str| format!("{id}-{role}");
    // Recorded before they exist, so a signal or a failure half-way still removes them.
    let bpffs_dir = Path::new(lab::BPFFS).join(&id);
    let work_dir = std::env::temp_dir().join(&id);
    cleanup::install_signal_cleanup();
    cleanup::add_dir(&bpffs_dir);
    cleanup::add_dir(&work_dir);

    let router = NetNs::create(&ns_name("rt"))?;
    router.sysctls(lab::COMMON_SYSCTLS)?;
    let lb = NetNs::create(&ns_name("lb"))?;
    lb.sysctls(lab::COMMON_SYSCTLS)?;
    let client = NetNs::create(&ns_name("cl"))?;
    client.sysctls(lab::COMMON_SYSCTLS)?;
    client.sysctls(&[("net.ipv4.tcp_tw_reuse", "1")])?;

    let mut backends = Vec::with_capacity(n_backends);
    for index in 1..=n_backends {
        let name = format!("b{index}");
        let netns = NetNs::create(&ns_name(&name))?;
        netns.sysctls(lab::COMMON_SYSCTLS)?;
        // The VIPs on lo must never be answered or announced over ARP.
        netns.sysctls(&[
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
        ])?;
        let net = 10 + index as u8;
        backends.push(RoutedBackend {
            ipv4: Ipv4Addr::new(10, 81, net, 2),
            ipv6: format!("fd00:81:{net}::2")
                .parse()
                .context("backend IPv6")?,
            router_if: format!("rb{index}"),
            name,
            index,
            netns,
        });
    }

    // Veths are created from the router's side with the peer placed straight into its
    // namespace, so no name ever appears in the host namespace.
    let mut script = format!(
        "link add {RT_CLIENT_IF} type veth peer name {HOST_IF} netns {cl}\n\
         link add {RT_LB_IF} type veth peer name {LB_IF} netns {lb}\n\
         addr add 10.81.1.1/24 dev {RT_CLIENT_IF}\naddr add fd00:81:1::1/64 dev {RT_CLIENT_IF} nodad\n\
         addr add {RT_LB_IPV4}/24 dev {RT_LB_IF}\naddr add {RT_LB_IPV6}/64 dev {RT_LB_IF} nodad\n\
         link set {RT_CLIENT_IF} up\nlink set {RT_LB_IF} up\n",
        cl = client.name(),
        lb = lb.name(),
    );
    for b in &backends {
        let net = 10 + b.index;
        script.push_str(&format!(
            "link add {rb} type veth peer name {HOST_IF} netns {ns}\n\
             addr add 10.81.{net}.1/24 dev {rb}\naddr add fd00:81:{net}::1/64 dev {rb} nodad\n\
             link set {rb} up\n",
            rb = b.router_if,
            ns = b.netns.name(),
        ));
    }
    // The VIPs are the LB's: the router sends their packets to its address.
    script.push_str(&format!(
        "route add {VIP4}/32 via {LB_IPV4}\nroute add {VIP6}/128 via {LB_IPV6}\n"
    ));
    router.ip_batch(&script)?;
    router.sysctls(&[
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
    ])?;

    // One-armed: one interface, both ways through the router.
    lb.ip_batch(&format!(
        "link set {LB_IF} up\naddr add {LB_IPV4}/24 dev {LB_IF}\naddr add {LB_IPV6}/64 dev {LB_IF} nodad\n\
         route add default via {RT_LB_IPV4}\nroute add default via {RT_LB_IPV6}\n"
    ))?;

    let client_v4: Vec<Ipv4Addr> = (0..n_clients).map(|i| client_v4(100 + i)).collect();
    let client_v6: Vec<Ipv6Addr> = (0..n_clients)
        .map(|i| client_v6(100 + i))
        .collect::<Result<_>>()?;
    let mut script = format!("link set {HOST_IF} up\n");
    for a in &client_v4 {
        script.push_str(&format!("addr add {a}/24 dev {HOST_IF}\n"));
    }
    for a in &client_v6 {
        script.push_str(&format!("addr add {a}/64 dev {HOST_IF} nodad\n"));
    }
    script.push_str("route add default via 10.81.1.1\nroute add default via fd00:81:1::1\n");
    client.ip_batch(&script)?;

    for b in &backends {
        let net = 10 + b.index;
        b.netns.ip_batch(&format!(
            "link set {HOST_IF} up\naddr add {v4}/24 dev {HOST_IF}\naddr add {v6}/64 dev {HOST_IF} nodad\n\
             addr add {VIP4}/32 dev lo\naddr add {VIP6}/128 dev lo nodad\n\
             route add default via 10.81.{net}.1\nroute add default via fd00:81:{net}::1\n",
            v4 = b.ipv4,
            v6 = b.ipv6,
        ))?;
        b.netns.sysctls(&[
            ("net.ipv4.conf.eth0.arp_ignore", "1"),
            ("net.ipv4.conf.eth0.arp_announce", "2"),
        ])?;
    }

    // Full checksums from every sender: offloaded (unfilled) ones would reach a backend
    // bad after crossing an XDP path in native mode.
    client.exec_ok(&["ethtool", "-K", HOST_IF, "tx", "off"])?;
    lb.exec_ok(&["ethtool", "-K", LB_IF, "tx", "off"])?;
    for b in &backends {
        b.netns.exec_ok(&["ethtool", "-K", HOST_IF, "tx", "off"])?;
        router.exec_ok(&["ethtool", "-K", &b.router_if, "tx", "off"])?;
    }
    router.exec_ok(&["ethtool", "-K", RT_CLIENT_IF, "tx", "off"])?;
    router.exec_ok(&["ethtool", "-K", RT_LB_IF, "tx", "off"])?;

    let mut hosts: Vec<(&NetNs, String)> = vec![
        (&client, HOST_IF.into()),
        (&lb, LB_IF.into()),
        (&router, RT_CLIENT_IF.into()),
        (&router, RT_LB_IF.into()),
    ];
    for b in &backends {
        hosts.push((&b.netns, HOST_IF.into()));
        hosts.push((&router, b.router_if.clone()));
    }
    cmd::wait_until(
        "routed lab links up and addresses settled",
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

    if lab::bpffs_mounted() {
        fs::create_dir(&bpffs_dir).with_context(|| format!("creating {}", bpffs_dir.display()))?;
    }
    let made = fs::create_dir(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(&work_dir, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting the mode of {}", work_dir.display()))
        });
    if let Err(e) = made {
        // No lab guard exists yet to remove what was made.
        let _ = fs::remove_dir_all(&bpffs_dir);
        let _ = fs::remove_dir_all(&work_dir);
        return Err(e);
    }

    Ok(RoutedLab {
        id,
        client_v4,
        client_v6,
        bpffs_dir,
        work_dir,
        xdp_passes: Mutex::new(Vec::new()),
        client,
        router,
        lb,
        backends,
    })
}
