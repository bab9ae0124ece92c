//! Next hops from the kernel (`xlb::nexthop`) against real namespaces: an on-link peer, and a far
//! host behind a router, over IPv4 and IPv6; managed entries, MAC changes and static entries.
//!
//! Topology (namespaces named `nh-PID-*`, deleted when the test ends, also on panic):
//! ```text
//!   peer [p0 10.77.1.2 fd77:1::2] ── [lb0 10.77.1.1 fd77:1::1] lb [lb1 10.77.2.1 fd77:2::1, mtu 1450]
//!        ── [r0 10.77.2.254 fd77:2::fe] router [r1 10.77.3.254 fd77:3::fe] ── [f0 10.77.3.2 fd77:3::2] far
//! ```
//! In `lb`: 10.77.3.0/24 via 10.77.2.254 with route MTU 1400; fd77:3::/64 via fd77:2::fe without one.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xlb::nexthop::{Lookup, NextHop, Resolver, resolve_blocking};
use xlb_tests::NetNs;

/// Link facts as `ip -j link show` prints them.
struct LinkFacts {
    ifindex: u32,
    mac: [u8; 6],
    mtu: u32,
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {text:?}"))?;
    <[u8; 6]>::try_from(bytes).map_err(|_| anyhow::anyhow!("MAC {text:?} is not 6 bytes"))
}

fn link(ns: &NetNs, dev: &str) -> Result<LinkFacts> {
    let json = ns.ip_json(&["link", "show", "dev", dev])?;
    let l = &json[0];
    Ok(LinkFacts {
        ifindex: l["ifindex"].as_u64().context("ifindex")? as u32,
        mac: parse_mac(l["address"].as_str().context("address")?)?,
        mtu: l["mtu"].as_u64().context("mtu")? as u32,
    })
}

/// The source address `ip route get` reports for `addr` (optionally through `dev`).
fn route_src(ns: &NetNs, addr: IpAddr, dev: Option<&str>) -> Result<IpAddr> {
    let addr = addr.to_string();
    let mut args = vec!["route", "get", addr.as_str()];
    if let Some(dev) = dev {
        args.extend(["oif", dev]);
    }
    let json = ns.ip_json(&args)?;
    json[0]["prefsrc"]
        .as_str()
        .context("prefsrc in `ip route get`")?
        .parse()
        .context("prefsrc")
}

/// `ip neigh show ADDR dev DEV` in `ns`, one line.
fn neigh_line(ns: &NetNs, addr: IpAddr, dev: &str) -> Result<String> {
    Ok(ns
        .ip(&["neigh", "show", &addr.to_string(), "dev", dev])?
        .trim()
        .to_owned())
}

fn build_lab(pfx: &str) -> Result<(NetNs, NetNs, NetNs, NetNs)> {
    let lb = NetNs::create(&format!("{pfx}-lb"))?;
    let peer = NetNs::create(&format!("{pfx}-peer"))?;
    let router = NetNs::create(&format!("{pfx}-rt"))?;
    let far = NetNs::create(&format!("{pfx}-far"))?;
    lb.ip_batch(&format!(
        "link add lb0 type veth peer name p0 netns {peer}\n\
         link add lb1 type veth peer name r0 netns {router}\n\
         link set lb1 mtu 1450\n\
         addr add 10.77.1.1/24 dev lb0\n\
         addr add fd77:1::1/64 dev lb0 nodad\n\
         addr add 10.77.2.1/24 dev lb1\n\
         addr add fd77:2::1/64 dev lb1 nodad\n\
         link set lb0 up\n\
         link set lb1 up\n\
         route add 10.77.3.0/24 via 10.77.2.254 mtu 1400\n\
         route add fd77:3::/64 via fd77:2::fe\n",
        peer = peer.name(),
        router = router.name(),
    ))?;
    peer.ip_batch(
        "addr add 10.77.1.2/24 dev p0\n\
         addr add fd77:1::2/64 dev p0 nodad\n\
         link set p0 up\n",
    )?;
    router.ip_batch(&format!(
        "link add r1 type veth peer name f0 netns {far}\n\
         link set r0 mtu 1450\n\
         addr add 10.77.2.254/24 dev r0\n\
         addr add fd77:2::fe/64 dev r0 nodad\n\
         addr add 10.77.3.254/24 dev r1\n\
         addr add fd77:3::fe/64 dev r1 nodad\n\
         link set r0 up\n\
         link set r1 up\n",
        far = far.name(),
    ))?;
    router.sysctls(&[
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
    ])?;
    far.ip_batch(
        "addr add 10.77.3.2/24 dev f0\n\
         addr add fd77:3::2/64 dev f0 nodad\n\
         link set f0 up\n\
         route add default via 10.77.3.254\n\
         route add default via fd77:3::fe\n",
    )?;
    wait_link_local(&lb, "lb0")?;
    wait_link_local(&lb, "lb1")?;
    Ok((lb, peer, router, far))
}

/// Waits (at most 5 s) until `dev` has a link-local address past DAD: the kernel sends neighbour
/// solicitations only from one, so IPv6 next hops on a fresh link resolve only after that.
fn wait_link_local(ns: &NetNs, dev: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = ns.ip(&[
            "-6",
            "addr",
            "show",
            "dev",
            dev,
            "scope",
            "link",
            "-tentative",
        ])?;
        if !ready.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{dev} in {} has no usable link-local address after 5 s",
                ns.name()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resolves until the next hop has a MAC satisfying `want`, for at most `limit`.
async fn resolve_until(
    resolver: &Resolver,
    addr: IpAddr,
    lookup: &Lookup,
    limit: Duration,
    want: impl Fn(&NextHop) -> bool,
) -> Result<NextHop> {
    let deadline = Instant::now() + limit;
    let mut last = None;
    loop {
        if let Some(hop) = resolver.resolve(addr, lookup).await? {
            if want(&hop) {
                return Ok(hop);
            }
            last = Some(hop);
        }
        if Instant::now() >= deadline {
            bail!("{addr} not resolved as wanted within {limit:?}; last answer {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn next_hops_resolve_from_the_kernel_and_follow_mac_changes() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: next-hop test creates network namespaces and needs root");
        return;
    }
    let pfx = format!("nh-{}", std::process::id());
    let (lb, peer, router, _far) = build_lab(&pfx).expect("lab");
    let lb0 = link(&lb, "lb0").expect("lb0");
    let lb1 = link(&lb, "lb1").expect("lb1");
    let p0 = link(&peer, "p0").expect("p0");
    let r0 = link(&router, "r0").expect("r0");
    assert_eq!(lb1.mtu, 1450);

    let v4: IpAddr = "10.77.1.2".parse().expect("addr");
    let v6: IpAddr = "fd77:1::2".parse().expect("addr");
    let far4: IpAddr = "10.77.3.2".parse().expect("addr");
    let far6: IpAddr = "fd77:3::2".parse().expect("addr");
    let gw4: IpAddr = "10.77.2.254".parse().expect("addr");
    let gw6: IpAddr = "fd77:2::fe".parse().expect("addr");
    let on_link = Lookup::OnLink {
        ifindex: lb0.ifindex,
    };
    // (address, lookup, expected via, egress, expected mac, mtu, dev for `ip route get`)
    let cases = [
        (v4, on_link, v4, &lb0, p0.mac, 1500, Some("lb0")),
        (v6, on_link, v6, &lb0, p0.mac, 1500, Some("lb0")),
        (far4, Lookup::Routed, gw4, &lb1, r0.mac, 1400, None),
        (far6, Lookup::Routed, gw6, &lb1, r0.mac, 1450, None),
    ];
    let expected_src: Vec<IpAddr> = cases
        .iter()
        .map(|(addr, _, _, _, _, _, dev)| route_src(&lb, *addr, *dev).expect("route get"))
        .collect();
    assert_eq!(
        expected_src[3],
        "fd77:2::1".parse::<IpAddr>().expect("addr")
    );

    lb.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("runtime")?;
        runtime.block_on(async {
            let resolver = Resolver::new()?;
            for ((addr, lookup, via, egress, mac, mtu, _), src) in cases.iter().zip(&expected_src) {
                let first = resolver.resolve(*addr, lookup).await?;
                assert_eq!(first, None, "{addr}: nothing resolved the next hop before");
                let dev = if egress.ifindex == lb0.ifindex {
                    "lb0"
                } else {
                    "lb1"
                };
                let line = neigh_line(&lb, *via, dev)?;
                assert!(
                    line.contains("extern_learn") && line.contains("managed"),
                    "{addr}: entry for {via} is not managed: {line:?}"
                );
                let hop = resolve_until(&resolver, *addr, lookup, Duration::from_secs(1), |_| true)
                    .await?;
                assert_eq!(
                    hop,
                    NextHop {
                        mac: *mac,
                        via: *via,
                        ifindex: egress.ifindex,
                        smac: egress.mac,
                        mtu: *mtu,
                        src: Some(*src),
                    },
                    "{addr}"
                );
                let line = neigh_line(&lb, *via, dev)?;
                assert!(
                    line.contains("managed"),
                    "{addr}: resolved entry lost managed: {line:?}"
                );
            }

            // A replaced NIC: same IPs, new MAC; refresh re-learns it quickly.
            let new_peer = [0x02, 0x77, 0, 0, 0, 0x02];
            let new_router = [0x02, 0x77, 0, 0, 0, 0xfe];
            peer.ip(&["link", "set", "p0", "address", "02:77:00:00:00:02"])?;
            router.ip(&["link", "set", "r0", "address", "02:77:00:00:00:fe"])?;
            for (addr, lookup, via, egress, _, _, _) in &cases {
                let want = if egress.ifindex == lb0.ifindex {
                    new_peer
                } else {
                    new_router
                };
                let started = Instant::now();
                resolver.refresh(*via, egress.ifindex).await?;
                let hop = resolve_until(&resolver, *addr, lookup, Duration::from_secs(1), |h| {
                    h.mac == want
                })
                .await?;
                assert_eq!(hop.via, *via);
                eprintln!(
                    "{addr}: new MAC of {via} learned in {:?}",
                    started.elapsed()
                );
            }

            // A static entry is used as it is and never modified, even by refresh.
            let pinned: IpAddr = "10.77.1.3".parse().expect("addr");
            lb.ip(&[
                "neigh",
                "add",
                "10.77.1.3",
                "dev",
                "lb0",
                "lladdr",
                "02:77:00:00:01:03",
                "nud",
                "permanent",
            ])?;
            let hop = resolver
                .resolve(pinned, &on_link)
                .await?
                .context("permanent entry")?;
            assert_eq!(hop.mac, [0x02, 0x77, 0, 0, 1, 3]);
            resolver.refresh(pinned, lb0.ifindex).await?;
            let line = neigh_line(&lb, pinned, "lb0")?;
            assert!(
                line.contains("PERMANENT") && !line.contains("managed"),
                "permanent entry changed: {line:?}"
            );

            // A dynamic entry keeps its MAC and becomes managed, so the kernel keeps confirming it.
            let learned: IpAddr = "10.77.1.4".parse().expect("addr");
            lb.ip(&[
                "neigh",
                "add",
                "10.77.1.4",
                "dev",
                "lb0",
                "lladdr",
                "02:77:00:00:01:04",
                "nud",
                "stale",
            ])?;
            let hop = resolver
                .resolve(learned, &on_link)
                .await?
                .context("stale entry")?;
            assert_eq!(hop.mac, [0x02, 0x77, 0, 0, 1, 4]);
            let line = neigh_line(&lb, learned, "lb0")?;
            assert!(
                line.contains("managed"),
                "dynamic entry not made managed: {line:?}"
            );

            // No route: an error that names the address.
            let nowhere: IpAddr = "10.99.0.1".parse().expect("addr");
            let err = resolver
                .resolve(nowhere, &Lookup::Routed)
                .await
                .expect_err("no route to 10.99.0.1");
            assert!(format!("{err:#}").contains("10.99.0.1"), "{err:#}");
            Ok::<_, anyhow::Error>(())
        })
    })
    .expect("resolver in the lb namespace");

    // The one-shot path: fresh entries (deleted first) resolve within the wait; the unroutable one is absent.
    for (_, _, via, egress, _, _, _) in &cases {
        let dev = if egress.ifindex == lb0.ifindex {
            "lb0"
        } else {
            "lb1"
        };
        lb.ip(&["neigh", "del", &via.to_string(), "dev", dev])
            .expect("neigh del");
    }
    let targets: Vec<(IpAddr, Lookup)> = cases
        .iter()
        .map(|(addr, lookup, ..)| (*addr, *lookup))
        .chain([("10.99.0.1".parse().expect("addr"), Lookup::Routed)])
        .collect();
    let resolved = lb
        .run(|| resolve_blocking(&targets, Duration::from_secs(2)))
        .expect("resolve_blocking");
    assert_eq!(resolved.len(), 4, "{resolved:?}");
    assert_eq!(resolved[&v4].mac, [0x02, 0x77, 0, 0, 0, 0x02]);
    assert_eq!(resolved[&far6].via, gw6);
}
