//! BIRD 2 instances for the cluster lab: the configs of a router and of an xlb node,
//! and a running `bird` with its own config, control socket and pid file.
//!
//! A node's BIRD learns xlb's VIP routes (kernel table 100, protocol 120, `dev lb0`
//! without gateway) with a kernel protocol and exports them over BGP (one session per
//! family) with `next hop self` and BFD. The router's BIRD peers with every node, BFD
//! at 100 ms × 3, and exports the BGP routes to its main table with `merge paths on`,
//! so a VIP announced by several nodes becomes one ECMP route.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cmd;
use crate::netns::{NetNs, NsChild};

/// The router's AS.
pub const ROUTER_AS: u32 = 65000;
/// Every node's AS: one AS, so the router's paths are equal and merge into ECMP.
pub const NODE_AS: u32 = 65001;
/// BFD transmit/receive interval (ms) on both ends.
pub const BFD_INTERVAL_MS: u32 = 100;
/// BFD detection multiplier: a peer is down after this many missed intervals.
pub const BFD_MULTIPLIER: u32 = 3;
/// How long a BIRD gets to answer on its control socket after starting.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The BGP timers both ends use: the lab restarts peers and must not wait for BIRD's
/// defaults (5 s connect delay, 120 s connect retry, 60..300 s error wait).
const BGP_TIMERS: &str = "    hold time 3;\n    keepalive time 1;\n    connect delay time 1;\n    \
     connect retry time 1;\n    error wait time 1, 2;\n    graceful restart off;\n    bfd on;\n";

/// A BFD protocol on `iface` with the lab's interval and multiplier.
fn bfd_protocol(iface: &str) -> String {
    format!(
        "protocol bfd {{\n    interface \"{iface}\" {{\n        min rx interval {BFD_INTERVAL_MS} ms;\n        \
         min tx interval {BFD_INTERVAL_MS} ms;\n        multiplier {BFD_MULTIPLIER};\n    }};\n}}\n"
    )
}

/// Addresses of one node as its BIRD and the router's BIRD see them.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// 1-based node index (names the router's sessions `lb<i>_v4`/`_v6`).
    pub index: usize,
    /// The node's IPv4 address on the LB segment.
    pub ipv4: Ipv4Addr,
    /// The node's IPv6 address on the LB segment.
    pub ipv6: Ipv6Addr,
}

/// The config of a node's BIRD: learn table `table` (xlb's routes, protocol 120) and
/// export it to the router at `router_v4`/`router_v6` over BGP with BFD on `iface`.
pub fn node_config(
    node: &Peer,
    iface: &str,
    table: u32,
    router_v4: Ipv4Addr,
    router_v6: Ipv6Addr,
) -> String {
    let mut c = String::new();
    let _ = write!(
        c,
        "# xlb node lb{i}: exports xlb's VIP routes (kernel table {table}, proto 120) to the router\n\
         router id {v4};\n\
         log stderr all;\n\n\
         # Interfaces must be known before routes through them are accepted.\n\
         protocol device {{\n    scan time 10;\n}}\n\n",
        i = node.index,
        v4 = node.ipv4,
    );
    for (fam, name) in [("ipv4", "xlb4"), ("ipv6", "xlb6")] {
        let _ = write!(
            c,
            "# `learn`: routes of other protocols (xlb's are proto 120, device routes\n\
             # without gateway) are imported; netlink notifications make it immediate.\n\
             protocol kernel {name} {{\n    kernel table {table};\n    learn;\n    scan time 10;\n    \
             {fam} {{\n        import where krt_source = 120;\n        export none;\n    }};\n}}\n\n"
        );
    }
    c.push_str(&bfd_protocol(iface));
    let _ = write!(
        c,
        "\ntemplate bgp router_peer {{\n    local as {NODE_AS};\n{BGP_TIMERS}}}\n\n\
         protocol bgp router_v4 from router_peer {{\n    source address {v4};\n    \
         neighbor {router_v4} as {ROUTER_AS};\n    ipv4 {{\n        import none;\n        \
         export where proto = \"xlb4\";\n        next hop self;\n    }};\n}}\n\n\
         protocol bgp router_v6 from router_peer {{\n    source address {v6};\n    \
         neighbor {router_v6} as {ROUTER_AS};\n    ipv6 {{\n        import none;\n        \
         export where proto = \"xlb6\";\n        next hop self;\n    }};\n}}\n",
        v4 = node.ipv4,
        v6 = node.ipv6,
    );
    c
}

/// The config of the router's BIRD: one BGP session per node and family on `iface`,
/// BFD on, and the BGP routes exported to the main table with ECMP (`merge paths on`).
pub fn router_config(
    router_v4: Ipv4Addr,
    router_v6: Ipv6Addr,
    iface: &str,
    nodes: &[Peer],
) -> String {
    let mut c = String::new();
    let _ = write!(
        c,
        "# xlb cluster router: ECMP over every node that announces a VIP\n\
         router id {router_v4};\n\
         log stderr all;\n\n\
         protocol device {{\n    scan time 10;\n}}\n\n"
    );
    for (fam, name) in [("ipv4", "kernel4"), ("ipv6", "kernel6")] {
        let _ = write!(
            c,
            "# One kernel route per VIP with a next hop per announcing node.\n\
             protocol kernel {name} {{\n    merge paths on;\n    {fam} {{\n        import none;\n        \
             export where source = RTS_BGP;\n    }};\n}}\n\n"
        );
    }
    c.push_str(&bfd_protocol(iface));
    let _ = write!(
        c,
        "\ntemplate bgp node {{\n    local as {ROUTER_AS};\n{BGP_TIMERS}}}\n"
    );
    for n in nodes {
        let _ = write!(
            c,
            "\nprotocol bgp lb{i}_v4 from node {{\n    source address {router_v4};\n    \
             neighbor {v4} as {NODE_AS};\n    ipv4 {{\n        import all;\n        export none;\n    }};\n}}\n\
             \nprotocol bgp lb{i}_v6 from node {{\n    source address {router_v6};\n    \
             neighbor {v6} as {NODE_AS};\n    ipv6 {{\n        import all;\n        export none;\n    }};\n}}\n",
            i = n.index,
            v4 = n.ipv4,
            v6 = n.ipv6,
        );
    }
    c
}

/// A running `bird -f` in a namespace with its own config, socket and pid file;
/// terminated (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Bird {
    /// The process (`bird` itself: nsenter execs it); its log is BIRD's stderr log.
    pub child: NsChild,
    /// Its control socket, for `birdc -s`.
    pub socket: PathBuf,
    /// Its config file.
    pub config: PathBuf,
}

impl Bird {
    /// Writes `config` to `<dir>/<name>.conf` and starts `bird -f -c CONF -s SOCK -P PID`
    /// in `ns`; returns once it answers on its socket.
    pub fn start(ns: &NetNs, dir: &Path, name: &str, config: &str) -> Result<Self> {
        let conf = dir.join(format!("{name}.conf"));
        let socket = dir.join(format!("{name}.ctl"));
        let pid = dir.join(format!("{name}.pid"));
        std::fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
        let path = |p: &Path| {
            p.to_str()
                .map(str::to_owned)
                .context("BIRD path is not UTF-8")
        };
        let (c, s, p) = (path(&conf)?, path(&socket)?, path(&pid)?);
        let mut child = ns.spawn(&["bird", "-f", "-c", &c, "-s", &s, "-P", &p])?;
        let bird_socket = socket.clone();
        let started = cmd::wait_until(
            &format!("BIRD {name} to answer on {s}"),
            START_TIMEOUT,
            Duration::from_millis(50),
            || {
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("bird exited ({status})");
                }
                Ok(bird_socket.exists() && birdc(&bird_socket, &["show", "status"]).is_ok())
            },
        );
        if let Err(e) = started {
            return Err(e.context(format!("starting BIRD {name}:\n{}", child.log())));
        }
        Ok(Self {
            child,
            socket,
            config: conf,
        })
    }

    /// `birdc -s SOCKET ARGS...`: its output (fails if birdc does).
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        birdc(&self.socket, args)
    }

    /// `show protocols` (or its error), for failure messages.
    pub fn protocols(&self) -> String {
        self.birdc(&["show", "protocols"])
            .unwrap_or_else(|e| format!("(birdc failed: {e:#})"))
    }
}

/// Runs `birdc -s SOCKET ARGS...` (a Unix socket: no namespace needed).
pub fn birdc(socket: &Path, args: &[&str]) -> Result<String> {
    let out = cmd::run(Command::new("birdc").arg("-s").arg(socket).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> Vec<Peer> {
        (1..=3)
            .map(|i| Peer {
                index: i,
                ipv4: Ipv4Addr::new(10, 77, 0, 10 + i as u8),
                ipv6: format!("fd77::{}", 10 + i).parse().expect("v6"),
            })
            .collect()
    }

    /// Parses a config with `bird -p` (needs the bird2 package, not root).
    fn bird_parses(name: &str, text: &str) {
        let dir = std::env::temp_dir().join(format!("xlb-birdconf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join(format!("{name}.conf"));
        std::fs::write(&file, text).expect("write");
        let out = Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&file)
            .output()
            .expect("bird is installed (cargo xtask setup)");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "bird -p rejects {name}:\n{}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn generated_configs_parse_and_say_what_the_cluster_needs() {
        let p = peers();
        let router = router_config(
            Ipv4Addr::new(10, 77, 0, 1),
            "fd77::1".parse().expect("v6"),
            "br0",
            &p,
        );
        bird_parses("router", &router);
        assert_eq!(router.matches("protocol bgp lb").count(), 6, "{router}");
        assert_eq!(router.matches("merge paths on").count(), 2, "{router}");
        assert!(
            router.contains("multiplier 3") && router.contains("100 ms"),
            "{router}"
        );
        let node = node_config(
            &p[1],
            "lb0",
            100,
            Ipv4Addr::new(10, 77, 0, 1),
            "fd77::1".parse().expect("v6"),
        );
        bird_parses("node", &node);
        assert!(
            node.contains("kernel table 100;") && node.contains("learn;"),
            "{node}"
        );
        assert_eq!(node.matches("next hop self").count(), 2, "{node}");
        assert_eq!(node.matches("bfd on").count(), 1, "template: {node}");
    }
}
