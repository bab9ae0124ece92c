//! Announcing VIPs by health: the daemon keeps one host route per VIP it is
//! ready to serve in a routing table of its own (`announce_table`), and a
//! BGP speaker on the node (BIRD) exports that table to the routers. The
//! kernel table is the whole interface between the two: xlb never speaks
//! BGP, and the speaker needs nothing from xlb but a table and a protocol
//! number to match.
//!
//! Which VIPs are ready is decided by [`readiness`] (pure); [`Announcer`]
//! makes the table say so over rtnetlink.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;

use anyhow::{Context as _, Result};
use futures_util::stream::TryStreamExt;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::sys::AsyncSocket as _;
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::config::{BackendState, ServiceConfig};

/// The routing protocol number (`rtm_protocol`) of xlb's routes: 120, ASCII
/// `x`, unassigned in the kernel's `rtnetlink.h` and iproute2's `rt_protos`.
/// BIRD matches it as `krt_source = 120`; `ip route show table N proto 120`
/// lists them.
pub const RTPROT_XLB: u8 = 120;

/// Whether one VIP is ready to be announced, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Ready: announce it.
    pub ready: bool,
    /// Why (for the announce/withdraw log line).
    pub reason: String,
}

/// Decides, for every VIP of `services` (the effective config with each
/// backend's state as the kernel should have it), whether this node is
/// ready to serve it. `failing(service, backend)` says whether a backend
/// fails its health checks.
///
/// A VIP is ready when at least one of its services has a backend that is
/// `active` (not draining, not down or in maintenance) and not failing its
/// checks (unchecked backends count as passing). Panic mode does not make a
/// VIP ready: a service in panic keeps forwarding to all its backends
/// whatever traffic still reaches this node, but the node withdraws the
/// VIP, so routers prefer nodes whose backends pass. A VIP whose backends
/// are all draining is withdrawn too: draining means no new clients, and
/// established ones are not rerouted by a withdraw on a single node.
pub fn readiness(
    services: &[ServiceConfig],
    failing: impl Fn(&str, &str) -> bool,
) -> BTreeMap<IpAddr, Readiness> {
    let mut out: BTreeMap<IpAddr, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for svc in services {
        let usable = svc
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Active && !failing(&svc.name, &b.name))
            .count();
        let entry = out.entry(svc.vip).or_default();
        if usable > 0 {
            entry.0.push(format!(
                "{}: {usable} of {} backends active and passing",
                svc.name,
                svc.backends.len()
            ));
        } else {
            let failing_active = svc
                .backends
                .iter()
                .filter(|b| b.state == BackendState::Active)
                .count();
            let why = if failing_active > 0 {
                "every active backend fails its checks (panic mode)"
            } else {
                "no active backend"
            };
            entry.1.push(format!("{}: {why}", svc.name));
        }
    }
    out.into_iter()
        .map(|(vip, (ok, not))| {
            let r = if ok.is_empty() {
                Readiness {
                    ready: false,
                    reason: format!(
                        "no service on {vip} can take new clients ({})",
                        not.join("; ")
                    ),
                }
            } else {
                Readiness {
                    ready: true,
                    reason: ok.join("; "),
                }
            };
            (vip, r)
        })
        .collect()
}

/// The VIPs of `readiness` that are ready.
pub fn ready_set(readiness: &BTreeMap<IpAddr, Readiness>) -> BTreeSet<IpAddr> {
    readiness
        .iter()
        .filter(|(_, r)| r.ready)
        .map(|(vip, _)| *vip)
        .collect()
}

/// Keeps xlb's host routes in one routing table.
pub struct Announcer {
    handle: Handle,
    table: u32,
    ifindex: u32,
}

impl Announcer {
    /// Opens a netlink connection on the current tokio runtime. Routes go to
    /// `table`, through interface `ifindex` (the one XDP runs on).
    pub fn new(table: u32, ifindex: u32) -> Result<Self> {
        let runtime =
            tokio::runtime::Handle::try_current().context("the announcer needs a tokio runtime")?;
        let (mut connection, handle, _) =
            rtnetlink::new_connection().context("opening an rtnetlink socket")?;
        // The kernel then filters route dumps by table and protocol itself,
        // instead of sending a full table (a BGP node's main table) each time.
        connection
            .socket_mut()
            .socket_mut()
            .set_netlink_get_strict_chk(true)
            .context("enabling strict netlink checking")?;
        runtime.spawn(connection);
        Ok(Self {
            handle,
            table,
            ifindex,
        })
    }

    fn route(&self, vip: IpAddr) -> Result<RouteMessage> {
        let full = if vip.is_ipv4() { 32 } else { 128 };
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(vip, full)
            .with_context(|| format!("a host route to {vip}"))?
            .table_id(self.table)
            .protocol(RouteProtocol::from(RTPROT_XLB))
            .scope(RouteScope::Link)
            .kind(RouteType::Unicast)
            .output_interface(self.ifindex)
            .build())
    }

    /// The VIPs xlb's routes in the table point at now.
    pub async fn announced(&self) -> Result<BTreeSet<IpAddr>> {
        let mut out = BTreeSet::new();
        for v4 in [true, false] {
            let mut filter = if v4 {
                RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
            } else {
                RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
            };
            filter.header.protocol = RouteProtocol::from(RTPROT_XLB);
            if self.table > 255 {
                filter.attributes.push(RouteAttribute::Table(self.table));
            } else {
                filter.header.table = self.table as u8;
            }
            let mut dump = self.handle.route().get(filter).execute();
            while let Some(route) = dump
                .try_next()
                .await
                .map_err(netlink_error)
                .with_context(|| format!("listing the routes of table {}", self.table))?
            {
                if let Some(vip) = ours(&route, self.table) {
                    out.insert(vip);
                }
            }
        }
        Ok(out)
    }

    /// Adds the host route to `vip`; one already there is fine.
    pub async fn announce(&self, vip: IpAddr) -> Result<()> {
        match self.handle.route().add(self.route(vip)?).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(netlink_error(e))
                .with_context(|| format!("adding the route to {vip} in table {}", self.table)),
        }
    }

    /// Deletes the host route to `vip`; one already gone is fine.
    pub async fn withdraw(&self, vip: IpAddr) -> Result<()> {
        match self.handle.route().del(self.route(vip)?).execute().await {
            Ok(()) => Ok(()),
            // IPv4 says ESRCH, IPv6 ENOENT.
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -libc::ESRCH || e.raw_code() == -libc::ENOENT =>
            {
                Ok(())
            }
            Err(e) => Err(netlink_error(e))
                .with_context(|| format!("deleting the route to {vip} from table {}", self.table)),
        }
    }
}

/// The destination of `route` when it is one of xlb's host routes in
/// `table` (the kernel's filtering is trusted only as far as it goes).
fn ours(route: &RouteMessage, table: u32) -> Option<IpAddr> {
    let route_table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    if route_table != table || u8::from(route.header.protocol) != RTPROT_XLB {
        return None;
    }
    let dst = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    let full = if dst.is_ipv4() { 32 } else { 128 };
    (route.header.destination_prefix_length == full).then_some(dst)
}

/// rtnetlink's error with the kernel's errno spelled out.
fn netlink_error(e: rtnetlink::Error) -> anyhow::Error {
    match e {
        rtnetlink::Error::NetlinkError(message) => {
            let err: io::Error = message.to_io();
            anyhow::Error::new(err)
        }
        other => anyhow::Error::new(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const TWO_VIPS: &str = r#"
interface = "eth0"
[[service]]
name = "web"
vip = "10.0.0.10"
port = 80
protocol = "tcp"
[[service.backend]]
name = "a"
address = "10.0.0.21"
[[service.backend]]
name = "b"
address = "10.0.0.22"
[[service]]
name = "dns"
vip = "10.0.0.10"
port = 53
protocol = "udp"
[[service.backend]]
name = "c"
address = "10.0.0.23"
[[service]]
name = "v6"
vip = "2001:db8::10"
port = 80
protocol = "tcp"
[[service.backend]]
name = "d"
address = "2001:db8::21"
"#;

    fn services() -> Vec<ServiceConfig> {
        Config::parse(TWO_VIPS).expect("valid").services
    }

    fn set_state(s: &mut [ServiceConfig], svc: &str, be: &str, state: BackendState) {
        let svc = s.iter_mut().find(|x| x.name == svc).expect("service");
        svc.backends
            .iter_mut()
            .find(|b| b.name == be)
            .expect("backend")
            .state = state;
    }

    fn ready(r: &BTreeMap<IpAddr, Readiness>) -> Vec<String> {
        ready_set(r).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_vip_is_ready_while_one_of_its_services_has_a_usable_backend() {
        let mut s = services();
        let none = |_: &str, _: &str| false;
        assert_eq!(ready(&readiness(&s, none)), ["10.0.0.10", "2001:db8::10"]);
        // web loses both backends; dns still serves the VIP.
        set_state(&mut s, "web", "a", BackendState::Down);
        set_state(&mut s, "web", "b", BackendState::Draining);
        let r = readiness(&s, none);
        assert_eq!(ready(&r), ["10.0.0.10", "2001:db8::10"]);
        assert!(
            r[&"10.0.0.10".parse::<IpAddr>().expect("ip")]
                .reason
                .contains("dns: 1 of 1")
        );
        // dns too: the VIP is withdrawn, with both reasons.
        set_state(&mut s, "dns", "c", BackendState::Draining);
        let r = readiness(&s, none);
        assert_eq!(ready(&r), ["2001:db8::10"]);
        let why = &r[&"10.0.0.10".parse::<IpAddr>().expect("ip")].reason;
        assert!(
            why.contains("web: no active backend") && why.contains("dns: no active backend"),
            "{why}"
        );
    }

    #[test]
    fn failing_backends_do_not_make_a_vip_ready_even_in_panic_mode() {
        let s = services();
        // Panic mode: the kernel keeps every backend active, but all fail.
        let r = readiness(&s, |svc, _| svc == "v6");
        assert_eq!(ready(&r), ["10.0.0.10"]);
        let why = &r[&"2001:db8::10".parse::<IpAddr>().expect("ip")].reason;
        assert!(why.contains("panic"), "{why}");
        // One passing backend is enough.
        let r = readiness(&s, |svc, be| svc == "web" && be == "a");
        assert!(r.values().all(|x| x.ready));
    }

    #[test]
    fn only_xlb_host_routes_in_the_table_are_ours() {
        let route = |table: u32, proto: u8, dst: &str, len: u8| {
            let mut m = RouteMessage::default();
            m.header.protocol = RouteProtocol::from(proto);
            m.header.destination_prefix_length = len;
            m.header.table = if table > 255 { 252 } else { table as u8 };
            m.attributes.push(RouteAttribute::Table(table));
            let ip: IpAddr = dst.parse().expect("ip");
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(ip)));
            m
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            ours(&route(100, 120, "10.0.0.10", 32), 100),
            Some(ip("10.0.0.10"))
        );
        assert_eq!(
            ours(&route(70000, 120, "2001:db8::10", 128), 70000),
            Some(ip("2001:db8::10"))
        );
        assert_eq!(
            ours(&route(100, 4, "10.0.0.10", 32), 100),
            None,
            "static route"
        );
        assert_eq!(
            ours(&route(101, 120, "10.0.0.10", 32), 100),
            None,
            "other table"
        );
        assert_eq!(
            ours(&route(100, 120, "10.0.0.0", 24), 100),
            None,
            "not a host route"
        );
    }
}
