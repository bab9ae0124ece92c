//! Next hops from the kernel: route, egress link and neighbour of a backend address over
//! netlink, and managed neighbour entries that the kernel itself keeps resolved.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use futures_util::stream::TryStreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage,
    NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType, RouteVia,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

/// How to find a backend's next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lookup {
    /// Layer-2 DSR: the address itself must be a neighbour on interface `ifindex` (the LB's interface).
    OnLink {
        /// The load balancer's interface, where the backend must answer ARP / neighbour solicitations.
        ifindex: u32,
    },
    /// IP-in-IP: follow the kernel's route to the address (gateway, or the address itself if on-link).
    Routed,
}

/// A resolved next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    /// The neighbour's link-layer address (the gateway's or the backend's).
    pub mac: [u8; 6],
    /// The neighbour's IP (the gateway, or the address itself).
    pub via: IpAddr,
    /// Egress interface.
    pub ifindex: u32,
    /// The egress interface's MAC.
    pub smac: [u8; 6],
    /// The route's MTU if the route has one, else the egress link's MTU.
    pub mtu: u32,
    /// The route's preferred source (RTA_PREFSRC), else the interface's first global address of the family.
    pub src: Option<IpAddr>,
}

/// Resolves next hops and keeps managed neighbour entries for them, over one netlink connection.
#[derive(Debug, Clone)]
pub struct Resolver {
    handle: Handle,
}

/// Where the kernel sends packets for an address: the neighbour and the route's extras.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Path {
    via: IpAddr,
    ifindex: u32,
    route_mtu: Option<u32>,
    prefsrc: Option<IpAddr>,
}

/// What the egress link contributes to a next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    name: String,
    mac: [u8; 6],
    mtu: u32,
}

/// One neighbour table entry, reduced to what decides whether to use or manage it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Neighbour {
    state: NeighbourState,
    lladdr: Option<[u8; 6]>,
    managed: bool,
}

impl Neighbour {
    /// The MAC to forward to, if the kernel has one it stands behind.
    fn resolved_mac(&self) -> Option<[u8; 6]> {
        let usable = matches!(
            self.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
        self.lladdr.filter(|mac| usable && *mac != [0; 6])
    }

    /// Entries an administrator (or another agent) pinned: never modified by the resolver.
    fn is_static(&self) -> bool {
        matches!(
            self.state,
            NeighbourState::Permanent | NeighbourState::Noarp
        )
    }
}

impl Resolver {
    /// Opens a netlink connection (spawned on the current tokio runtime).
    pub fn new() -> Result<Self> {
        let runtime = tokio::runtime::Handle::try_current()
            .context("the next-hop resolver needs a tokio runtime")?;
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening an rtnetlink socket")?;
        runtime.spawn(connection);
        Ok(Self { handle })
    }

    /// Resolves `addr`. Ok(None): not resolved yet — the resolver has then made sure a *managed* neighbour
    /// entry exists for the next hop, so the kernel resolves it and keeps it resolved. Never touches an
    /// existing PERMANENT or NOARP entry. Err: no route / interface gone, with context.
    pub async fn resolve(&self, addr: IpAddr, lookup: &Lookup) -> Result<Option<NextHop>> {
        let path = match *lookup {
            Lookup::Routed => self
                .route_get(addr, None)
                .await
                .and_then(|route| route_path(addr, &route))
                .with_context(|| format!("looking up the kernel's route to {addr}"))?,
            Lookup::OnLink { ifindex } => self.on_link_path(addr, ifindex).await,
        };
        let link = self
            .link(path.ifindex)
            .await
            .with_context(|| format!("next hop for {addr}"))?;
        let src = match path.prefsrc {
            Some(src) => Some(src),
            None => self
                .first_global_address(path.ifindex, addr)
                .await
                .with_context(|| format!("source address for {addr} on {}", link.name))?,
        };
        let neighbour = self
            .neighbour(path.via, path.ifindex)
            .await
            .with_context(|| format!("neighbour {} on {}", path.via, link.name))?;
        let next_hop = neighbour
            .as_ref()
            .and_then(Neighbour::resolved_mac)
            .map(|mac| NextHop {
                mac,
                via: path.via,
                ifindex: path.ifindex,
                smac: link.mac,
                mtu: path.route_mtu.unwrap_or(link.mtu),
                src,
            });
        self.ensure_managed(path.via, path.ifindex, &link.name, neighbour.as_ref())
            .await
            .with_context(|| {
                format!("managed neighbour entry for {} on {}", path.via, link.name)
            })?;
        Ok(next_hop)
    }

    /// Re-learns the MAC of a next hop whose entry this resolver manages: deletes and re-adds the managed
    /// entry, so the kernel re-resolves it by broadcast instead of slowly re-probing a stale unicast MAC.
    /// An entry without the managed flag (static, or learned by the kernel) is left alone.
    pub async fn refresh(&self, via: IpAddr, ifindex: u32) -> Result<()> {
        let context = || format!("refreshing neighbour {via} on interface {ifindex}");
        let neighbour = self.neighbour(via, ifindex).await.with_context(context)?;
        match neighbour {
            Some(n) if !n.managed || n.is_static() => {
                tracing::debug!(%via, ifindex, state = ?n.state, "neighbour not managed by xlb: not refreshed");
                Ok(())
            }
            Some(_) => {
                self.delete_neighbour(via, ifindex)
                    .await
                    .with_context(context)?;
                self.add_managed(via, ifindex, None, false)
                    .await
                    .with_context(context)?;
                tracing::debug!(%via, ifindex, "managed neighbour entry re-created to re-learn its MAC");
                Ok(())
            }
            None => {
                self.add_managed(via, ifindex, None, false)
                    .await
                    .with_context(context)?;
                tracing::debug!(%via, ifindex, "managed neighbour entry was gone: created");
                Ok(())
            }
        }
    }

    /// Asks the kernel for its route to `addr` (a GET with RTA_DST, not a dump).
    async fn route_get(&self, addr: IpAddr, oif: Option<u32>) -> Result<RouteMessage> {
        let mut message = RouteMessage::default();
        message.header.address_family = family(addr);
        message.header.destination_prefix_length = full_prefix(addr);
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(addr)));
        if let Some(oif) = oif {
            message.attributes.push(RouteAttribute::Oif(oif));
        }
        let mut replies = self.handle.route().get(message).execute();
        replies
            .try_next()
            .await
            .map_err(netlink_error)?
            .ok_or_else(|| anyhow!("the kernel sent no route"))
    }

    /// The path of a layer-2 backend: itself on `ifindex`; the kernel's route through that interface
    /// only contributes its MTU and preferred source, when it has one.
    async fn on_link_path(&self, addr: IpAddr, ifindex: u32) -> Path {
        let mut path = Path {
            via: addr,
            ifindex,
            route_mtu: None,
            prefsrc: None,
        };
        match self.route_get(addr, Some(ifindex)).await {
            Ok(route) => match route_path(addr, &route) {
                Ok(routed) if routed.ifindex == ifindex => {
                    path.route_mtu = routed.route_mtu;
                    path.prefsrc = routed.prefsrc;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(%addr, ifindex, "no usable route on the link: {e:#}"),
            },
            Err(e) => tracing::debug!(%addr, ifindex, "no route on the link: {e:#}"),
        }
        path
    }

    /// MAC, MTU and name of interface `ifindex`.
    async fn link(&self, ifindex: u32) -> Result<Link> {
        let mut replies = self.handle.link().get().match_index(ifindex).execute();
        let message = replies
            .try_next()
            .await
            .map_err(netlink_error)
            .with_context(|| format!("reading interface {ifindex}"))?
            .ok_or_else(|| anyhow!("interface {ifindex} not found"))?;
        link_info(&message).with_context(|| format!("interface {ifindex}"))
    }

    /// The first global address of `addr`'s family on `ifindex`, for a source when the route names none.
    async fn first_global_address(&self, ifindex: u32, addr: IpAddr) -> Result<Option<IpAddr>> {
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute()
            .try_collect()
            .await
            .map_err(netlink_error)
            .context("listing interface addresses")?;
        Ok(pick_source(family(addr), ifindex, &messages))
    }

    /// The kernel's neighbour entry for `via` on `ifindex` (a GET, not a dump), or None if absent.
    async fn neighbour(&self, via: IpAddr, ifindex: u32) -> Result<Option<Neighbour>> {
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(neighbour_key(
            via, ifindex,
        )));
        request.header.flags = NLM_F_REQUEST;
        let mut handle = self.handle.clone();
        let mut replies = handle
            .request(request)
            .map_err(|e| anyhow!("{e}"))
            .context("sending a neighbour request")?;
        let mut found = None;
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(message)) => {
                    found = Some(neighbour_entry(&message));
                }
                NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => return Ok(None),
                NetlinkPayload::Error(e) => {
                    return Err(e.to_io()).context("reading the neighbour table");
                }
                _ => {}
            }
        }
        Ok(found)
    }

    /// Makes sure a managed entry exists for the next hop, unless a static one is there.
    async fn ensure_managed(
        &self,
        via: IpAddr,
        ifindex: u32,
        ifname: &str,
        neighbour: Option<&Neighbour>,
    ) -> Result<()> {
        match neighbour {
            None => {
                self.add_managed(via, ifindex, None, false).await?;
                tracing::debug!(%via, ifname, "managed neighbour entry created");
            }
            Some(n) if n.managed || n.is_static() => {}
            Some(n) => {
                // A dynamic entry goes stale and stays so under XDP traffic (the stack never sees
                // it), keeping an old MAC: make it managed, keeping the MAC it has meanwhile.
                let lladdr = n.resolved_mac();
                self.add_managed(via, ifindex, lladdr, true).await?;
                tracing::debug!(%via, ifname, state = ?n.state, "neighbour entry made managed");
            }
        }
        Ok(())
    }

    /// `ip neigh add|replace VIA dev IF managed extern_learn`, optionally keeping a known MAC (as STALE,
    /// so the kernel confirms it).
    async fn add_managed(
        &self,
        via: IpAddr,
        ifindex: u32,
        lladdr: Option<[u8; 6]>,
        replace: bool,
    ) -> Result<()> {
        let mut request = self
            .handle
            .neighbours()
            .add(ifindex, via)
            .state(NeighbourState::None)
            .flags(NeighbourFlags::ExtLearned);
        if let Some(mac) = lladdr {
            request = request
                .state(NeighbourState::Stale)
                .link_layer_address(&mac);
        }
        if replace {
            request = request.replace();
        }
        request
            .message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        match request.execute().await {
            Ok(()) => Ok(()),
            // Another resolver (or a concurrent call) created it first: that is what we wanted.
            Err(rtnetlink::Error::NetlinkError(e)) if !replace && e.raw_code() == -libc::EEXIST => {
                Ok(())
            }
            Err(e) => Err(netlink_error(e)).context("adding a managed neighbour entry"),
        }
    }

    /// `ip neigh del VIA dev IF`; an entry already gone is fine.
    async fn delete_neighbour(&self, via: IpAddr, ifindex: u32) -> Result<()> {
        match self
            .handle
            .neighbours()
            .del(neighbour_key(via, ifindex))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => Ok(()),
            Err(e) => Err(netlink_error(e)).context("deleting a neighbour entry"),
        }
    }
}

/// For one-shot callers (`xlb run`): resolves every target on a private current-thread runtime, waiting up
/// to `wait` (polling every 50 ms) for those not resolved yet; returns what resolved (missing ones are absent).
pub fn resolve_blocking(
    targets: &[(IpAddr, Lookup)],
    wait: Duration,
) -> Result<HashMap<IpAddr, NextHop>> {
    const POLL: Duration = Duration::from_millis(50);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for next-hop resolution")?;
    runtime.block_on(async {
        let resolver = Resolver::new()?;
        let deadline = Instant::now() + wait;
        let mut resolved = HashMap::new();
        let mut errors: HashMap<IpAddr, anyhow::Error> = HashMap::new();
        loop {
            for (addr, lookup) in targets {
                if resolved.contains_key(addr) {
                    continue;
                }
                match resolver.resolve(*addr, lookup).await {
                    Ok(Some(next_hop)) => {
                        errors.remove(addr);
                        resolved.insert(*addr, next_hop);
                    }
                    Ok(None) => {
                        errors.remove(addr);
                    }
                    Err(e) => {
                        errors.insert(*addr, e);
                    }
                }
            }
            let now = Instant::now();
            if resolved.len() == targets.len() || now >= deadline {
                break;
            }
            tokio::time::sleep(POLL.min(deadline - now)).await;
        }
        for (addr, e) in &errors {
            tracing::warn!(%addr, "next hop not resolved: {e:#}");
        }
        Ok(resolved)
    })
}

/// The neighbour and route extras of a route the kernel answered for `addr`.
fn route_path(addr: IpAddr, route: &RouteMessage) -> Result<Path> {
    if route.header.kind != RouteType::Unicast {
        bail!(
            "the route to {addr} is of type {:?}, not a unicast route out of an interface",
            route.header.kind
        );
    }
    let mut ifindex = None;
    let mut via = None;
    let mut route_mtu = None;
    let mut prefsrc = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Oif(oif) => ifindex = Some(*oif),
            RouteAttribute::Gateway(RouteAddress::Inet(gw)) => via = Some(IpAddr::V4(*gw)),
            RouteAttribute::Gateway(RouteAddress::Inet6(gw)) => via = Some(IpAddr::V6(*gw)),
            // RFC 5549: an IPv4 route through an IPv6 gateway.
            RouteAttribute::Via(RouteVia::Inet(gw)) => via = Some(IpAddr::V4(*gw)),
            RouteAttribute::Via(RouteVia::Inet6(gw)) => via = Some(IpAddr::V6(*gw)),
            RouteAttribute::PrefSource(RouteAddress::Inet(src)) => {
                prefsrc = Some(IpAddr::V4(*src));
            }
            RouteAttribute::PrefSource(RouteAddress::Inet6(src)) => {
                prefsrc = Some(IpAddr::V6(*src));
            }
            RouteAttribute::Metrics(metrics) => {
                route_mtu = metrics.iter().find_map(|metric| match metric {
                    RouteMetric::Mtu(mtu) if *mtu > 0 => Some(*mtu),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    let ifindex = ifindex.with_context(|| format!("the route to {addr} names no interface"))?;
    Ok(Path {
        via: via.unwrap_or(addr),
        ifindex,
        route_mtu,
        prefsrc,
    })
}

/// Name, Ethernet MAC and MTU of a link message.
fn link_info(message: &LinkMessage) -> Result<Link> {
    let mut name = format!("if{}", message.header.index);
    let mut mac = None;
    let mut mtu = None;
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name.clone_from(n),
            LinkAttribute::Address(a) => mac = Some(a.clone()),
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            _ => {}
        }
    }
    let mac = mac
        .as_deref()
        .and_then(|a| <[u8; 6]>::try_from(a).ok())
        .with_context(|| format!("{name} has no Ethernet address"))?;
    let mtu = mtu.with_context(|| format!("{name} reports no MTU"))?;
    Ok(Link { name, mac, mtu })
}

/// The first usable global address of `family` on `ifindex` among `messages`.
fn pick_source(family: AddressFamily, ifindex: u32, messages: &[AddressMessage]) -> Option<IpAddr> {
    messages
        .iter()
        .filter(|m| {
            m.header.family == family
                && m.header.index == ifindex
                && m.header.scope == AddressScope::Universe
                && !m
                    .header
                    .flags
                    .intersects(AddressHeaderFlags::Tentative | AddressHeaderFlags::Dadfailed)
                && !m.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Flags(f)
                        if f.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed))
                })
        })
        .find_map(|m| {
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point links.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            })
        })
}

/// The parts of a neighbour message that decide what to do with it.
fn neighbour_entry(message: &NeighbourMessage) -> Neighbour {
    let mut lladdr = None;
    let mut managed = false;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::LinkLayerAddress(a) => lladdr = <[u8; 6]>::try_from(&a[..]).ok(),
            NeighbourAttribute::ExtFlags(f) => managed = f.contains(NeighbourExtFlags::Managed),
            _ => {}
        }
    }
    Neighbour {
        state: message.header.state,
        lladdr,
        managed,
    }
}

/// A neighbour message naming one entry (for GET and DEL).
fn neighbour_key(via: IpAddr, ifindex: u32) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = family(via);
    message.header.ifindex = ifindex;
    message
        .attributes
        .push(NeighbourAttribute::Destination(match via {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
    message
}

fn family(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn full_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// rtnetlink's error with the kernel's errno spelled out ("Network is unreachable", "No such device").
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
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn route(kind: RouteType, attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.kind = kind;
        message.attributes = attributes;
        message
    }

    #[test]
    fn a_gateway_route_is_followed_to_the_gateway() {
        let addr = IpAddr::V4(Ipv4Addr::new(10, 9, 0, 2));
        let r = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Destination(RouteAddress::from(addr)),
                RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 1, 0, 1))),
                RouteAttribute::Oif(7),
                RouteAttribute::PrefSource(RouteAddress::Inet(Ipv4Addr::new(10, 1, 0, 2))),
                RouteAttribute::Metrics(vec![RouteMetric::Hoplimit(3), RouteMetric::Mtu(1400)]),
            ],
        );
        let path = route_path(addr, &r).expect("path");
        assert_eq!(
            path,
            Path {
                via: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)),
                ifindex: 7,
                route_mtu: Some(1400),
                prefsrc: Some(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2))),
            }
        );
    }

    #[test]
    fn an_on_link_route_leads_to_the_address_itself() {
        let addr = IpAddr::V6("fd00::2".parse::<Ipv6Addr>().expect("addr"));
        let r = route(RouteType::Unicast, vec![RouteAttribute::Oif(3)]);
        let path = route_path(addr, &r).expect("path");
        assert_eq!(path.via, addr);
        assert_eq!(path.ifindex, 3);
        assert_eq!(path.route_mtu, None);
        assert_eq!(path.prefsrc, None);
    }

    #[test]
    fn an_ipv6_gateway_of_an_ipv4_route_is_the_neighbour() {
        let addr = IpAddr::V4(Ipv4Addr::new(10, 9, 0, 2));
        let gw: Ipv6Addr = "fe80::1".parse().expect("gw");
        let r = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Via(RouteVia::Inet6(gw)),
                RouteAttribute::Oif(4),
            ],
        );
        assert_eq!(route_path(addr, &r).expect("path").via, IpAddr::V6(gw));
    }

    #[test]
    fn local_and_interfaceless_routes_are_errors() {
        let addr = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2));
        let local = route(RouteType::Local, vec![RouteAttribute::Oif(1)]);
        assert!(format!("{:#}", route_path(addr, &local).expect_err("local")).contains("Local"));
        let no_oif = route(RouteType::Unicast, vec![]);
        assert!(route_path(addr, &no_oif).is_err());
    }

    fn neighbour(state: NeighbourState, lladdr: Option<[u8; 6]>, managed: bool) -> Neighbour {
        Neighbour {
            state,
            lladdr,
            managed,
        }
    }

    #[test]
    fn only_valid_states_with_a_mac_are_resolved() {
        let mac = [2, 0, 0, 0, 0, 1];
        for state in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Permanent,
            NeighbourState::Noarp,
        ] {
            assert_eq!(
                neighbour(state, Some(mac), false).resolved_mac(),
                Some(mac),
                "{state:?}"
            );
        }
        for state in [
            NeighbourState::Incomplete,
            NeighbourState::Failed,
            NeighbourState::None,
        ] {
            assert_eq!(
                neighbour(state, Some(mac), true).resolved_mac(),
                None,
                "{state:?}"
            );
        }
        assert_eq!(
            neighbour(NeighbourState::Noarp, Some([0; 6]), false).resolved_mac(),
            None
        );
        assert_eq!(
            neighbour(NeighbourState::Reachable, None, false).resolved_mac(),
            None
        );
    }

    #[test]
    fn neighbour_messages_are_read_with_their_managed_flag() {
        let mut message = neighbour_key(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 3);
        message.header.state = NeighbourState::Reachable;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 9]));
        message
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        assert_eq!(
            neighbour_entry(&message),
            neighbour(NeighbourState::Reachable, Some([2, 0, 0, 0, 0, 9]), true)
        );
    }

    fn address(
        family: AddressFamily,
        index: u32,
        scope: AddressScope,
        ip: IpAddr,
    ) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.family = family;
        message.header.index = index;
        message.header.scope = scope;
        message.attributes.push(AddressAttribute::Address(ip));
        message
    }

    #[test]
    fn the_source_is_the_first_global_address_of_the_family() {
        let link_local = IpAddr::V6("fe80::1".parse::<Ipv6Addr>().expect("ll"));
        let tentative = IpAddr::V6("fd00::9".parse::<Ipv6Addr>().expect("t"));
        let global = IpAddr::V6("fd00::1".parse::<Ipv6Addr>().expect("g"));
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let mut tentative_message =
            address(AddressFamily::Inet6, 2, AddressScope::Universe, tentative);
        tentative_message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Tentative));
        let messages = vec![
            address(AddressFamily::Inet, 2, AddressScope::Universe, v4),
            address(AddressFamily::Inet6, 2, AddressScope::Link, link_local),
            tentative_message,
            address(AddressFamily::Inet6, 5, AddressScope::Universe, v4),
            address(AddressFamily::Inet6, 2, AddressScope::Universe, global),
        ];
        assert_eq!(
            pick_source(AddressFamily::Inet6, 2, &messages),
            Some(global)
        );
        assert_eq!(pick_source(AddressFamily::Inet, 2, &messages), Some(v4));
        assert_eq!(pick_source(AddressFamily::Inet, 9, &messages), None);
    }

    #[test]
    fn a_link_needs_an_ethernet_address() {
        let mut message = LinkMessage::default();
        message.header.index = 4;
        message.attributes = vec![
            LinkAttribute::IfName("veth0".into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 4]),
            LinkAttribute::Mtu(1500),
        ];
        assert_eq!(
            link_info(&message).expect("link"),
            Link {
                name: "veth0".into(),
                mac: [2, 0, 0, 0, 0, 4],
                mtu: 1500
            }
        );
        message.attributes[1] = LinkAttribute::Address(vec![]);
        assert!(format!("{:#}", link_info(&message).expect_err("no mac")).contains("veth0"));
    }
}
