//! The source address of health checks.
//!
//! In a DSR setup the load balancer holds every VIP on its interface and every
//! backend holds them on `lo`. Left to itself the kernel may pick a VIP as the
//! source of a check (an IPv6 /128 VIP is preferred for on-link destinations),
//! and the backend then answers to itself. So checks bind an explicit source:
//! the service's `health.source`, else the global `health_source_v4`/`_v6`,
//! else the interface's own address of the family that is no VIP.
//!
//! The choice is pure ([`choose_source`], [`resolve_source`]); listing the
//! interface's addresses ([`default_sources`]) is the only part that asks the
//! kernel.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};

use crate::config::Config;

/// `IFA_F_DADFAILED`: duplicate address detection failed; the address is unusable.
const IFA_F_DADFAILED: u8 = 0x08;
/// `IFA_F_DEPRECATED`: preferred lifetime over; usable, but not for new connections by choice.
const IFA_F_DEPRECATED: u8 = 0x20;
/// `IFA_F_TENTATIVE`: duplicate address detection still running; cannot be bound yet.
const IFA_F_TENTATIVE: u8 = 0x40;
/// Where the kernel lists IPv6 addresses with their flags (getifaddrs has no flags).
const IF_INET6: &str = "/proc/net/if_inet6";

/// One address of an interface, with what matters for choosing a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    /// The address.
    pub addr: IpAddr,
    /// Its preferred lifetime is over (IPv6 `deprecated`).
    pub deprecated: bool,
    /// Not usable yet or at all: duplicate address detection running or failed.
    pub tentative: bool,
}

impl IfAddr {
    /// A usable, preferred address.
    pub fn new(addr: IpAddr) -> Self {
        Self {
            addr,
            deprecated: false,
            tentative: false,
        }
    }
}

/// Whether a check may ever leave from `ip`: unicast, not loopback, not IPv6 link-local
/// (binding one needs a scope id), not a VIP.
fn eligible(ip: IpAddr, vips: &[IpAddr]) -> bool {
    let unicast = match ip {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast() || a.is_unicast_link_local()),
    };
    unicast && !ip.is_loopback() && !vips.contains(&ip)
}

/// Whether `ip` has global scope in the kernel's sense (IPv4 link-local 169.254/16 has not).
fn global_scope(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_link_local(),
        // fec0::/10, the deprecated site-local range, is the only other IPv6 scope left.
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 != 0xfec0,
    }
}

/// The best source of the family among `candidates`: never a VIP, loopback or IPv6
/// link-local; global scope first, then usable before tentative, then preferred before
/// deprecated; ties go to the first listed (the kernel lists the primary address first).
pub fn choose_source(candidates: &[IfAddr], family_v4: bool, vips: &[IpAddr]) -> Option<IpAddr> {
    candidates
        .iter()
        .filter(|c| c.addr.is_ipv4() == family_v4 && eligible(c.addr, vips))
        // min_by_key keeps the first of equal keys.
        .min_by_key(|c| (!global_scope(c.addr), c.tentative, c.deprecated))
        .map(|c| c.addr)
}

/// The source of one check of `backend`: the service's explicit `spec_source`, else the
/// global one of the backend's family, else the detected one; `None` leaves the choice to
/// the kernel. A source of the other family is never returned.
pub fn resolve_source(
    spec_source: Option<IpAddr>,
    global: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    detected: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    backend: IpAddr,
) -> Option<IpAddr> {
    let of_family = |(v4, v6): (Option<Ipv4Addr>, Option<Ipv6Addr>)| match backend {
        IpAddr::V4(_) => v4.map(IpAddr::V4),
        IpAddr::V6(_) => v6.map(IpAddr::V6),
    };
    spec_source
        .filter(|s| s.is_ipv4() == backend.is_ipv4())
        .or_else(|| of_family(global))
        .or_else(|| of_family(detected))
}

/// The interface's own addresses that are no VIP, one per family (see [`choose_source`]).
pub fn default_sources(
    interface: &str,
    vips: &[IpAddr],
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let addrs = interface_addrs(interface)?;
    let v4 = match choose_source(&addrs, true, vips) {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    };
    let v6 = match choose_source(&addrs, false, vips) {
        Some(IpAddr::V6(a)) => Some(a),
        _ => None,
    };
    Ok((v4, v6))
}

/// Every address of `interface`: IPv4 from getifaddrs (labels such as `eth0:1` count as
/// the interface), IPv6 with its flags from `/proc/net/if_inet6`.
pub fn interface_addrs(interface: &str) -> Result<Vec<IfAddr>> {
    crate::dataplane::interface_index(interface)?;
    let mut out: Vec<IfAddr> = ipv4_addrs(interface)?
        .into_iter()
        .map(|a| IfAddr::new(IpAddr::V4(a)))
        .collect();
    match std::fs::read_to_string(IF_INET6) {
        Ok(text) => out.extend(parse_if_inet6(&text, interface)),
        // No file: IPv6 is disabled, so there is no IPv6 address to choose.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {IF_INET6}")),
    }
    Ok(out)
}

/// The IPv4 addresses of `interface` (and of its labels `interface:*`), in kernel order.
fn ipv4_addrs(interface: &str) -> Result<Vec<Ipv4Addr>> {
    /// Frees the list however the walk ends.
    struct List(*mut libc::ifaddrs);
    impl Drop for List {
        fn drop(&mut self) {
            // SAFETY: the pointer came from a successful getifaddrs and is freed once.
            unsafe { libc::freeifaddrs(self.0) }
        }
    }
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`, which we own.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing addresses (getifaddrs)");
    }
    let list = List(head);
    let mut out = Vec::new();
    let mut cur = list.0;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the live list, which `list` frees only after the loop.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_bytes();
        let ours = name == interface.as_bytes()
            || name
                .strip_prefix(interface.as_bytes())
                .is_some_and(|rest| rest.first() == Some(&b':'));
        // SAFETY: ifa_addr is non-null and every sockaddr starts with its family.
        if !ours || i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
        out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
    }
    Ok(out)
}

/// The IPv6 addresses of `interface` in `/proc/net/if_inet6` text: one line per address,
/// `ADDR(32 hex) IFINDEX PREFIXLEN SCOPE FLAGS NAME`, all hex but the name.
fn parse_if_inet6(text: &str, interface: &str) -> Vec<IfAddr> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [hex, _, _, _, flags, name] = f.as_slice() else {
                return None;
            };
            if *name != interface {
                return None;
            }
            let addr = Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?);
            let flags = u8::from_str_radix(flags, 16).ok()?;
            Some(IfAddr {
                addr: IpAddr::V6(addr),
                deprecated: flags & IFA_F_DEPRECATED != 0,
                tentative: flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED) != 0,
            })
        })
        .collect()
}

/// The daemon-wide part of the source choice: the configured global sources and the
/// ones detected on the interface. Per check, [`SourceDefaults::for_backend`] adds the
/// service's own `health.source`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceDefaults {
    /// `health_source_v4`, `health_source_v6`.
    pub global: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    /// The interface's own non-VIP addresses ([`default_sources`]).
    pub detected: (Option<Ipv4Addr>, Option<Ipv6Addr>),
}

impl SourceDefaults {
    /// The source of a check of `backend` (see [`resolve_source`]).
    pub fn for_backend(&self, spec_source: Option<IpAddr>, backend: IpAddr) -> Option<IpAddr> {
        resolve_source(spec_source, self.global, self.detected, backend)
    }

    /// Reads the globals from `config` and detects the rest on its interface (a
    /// blocking read: call it from the owner thread), logging the outcome; a family with checks but no source is warned
    /// about, since the kernel's choice may then be a VIP.
    pub fn detect(config: &Config) -> Self {
        let vips: Vec<IpAddr> = config.services.iter().map(|s| s.vip).collect();
        let detected = match default_sources(&config.interface, &vips) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("detecting health-check source addresses: {e:#}");
                (None, None)
            }
        };
        let me = Self {
            global: (config.health_source_v4, config.health_source_v6),
            detected,
        };
        for v4 in [true, false] {
            let (family, field) = if v4 {
                ("IPv4", "health_source_v4")
            } else {
                ("IPv6", "health_source_v6")
            };
            let unset: Vec<&str> = config
                .services
                .iter()
                .filter(|s| s.vip.is_ipv4() == v4)
                .filter(|s| s.health.as_ref().is_some_and(|h| h.source.is_none()))
                .map(|s| s.name.as_str())
                .collect();
            if unset.is_empty() {
                continue;
            }
            let probe = if v4 {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            };
            let configured = if v4 {
                me.global.0.is_some()
            } else {
                me.global.1.is_some()
            };
            match me.for_backend(None, probe) {
                Some(src) => tracing::info!(
                    "{family} health checks leave from {src} ({})",
                    if configured {
                        field.to_string()
                    } else {
                        format!("detected on {}", config.interface)
                    }
                ),
                None => tracing::warn!(
                    "no {family} address of {} other than a VIP: {family} checks of {} leave from the kernel's choice, which may be a VIP (set {field})",
                    config.interface,
                    unset.join(", ")
                ),
            }
        }
        me
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn deprecated(s: &str) -> IfAddr {
        IfAddr {
            deprecated: true,
            ..IfAddr::new(ip(s))
        }
    }

    fn tentative(s: &str) -> IfAddr {
        IfAddr {
            tentative: true,
            ..IfAddr::new(ip(s))
        }
    }

    /// The lab's and a real DSR box's shape: a preferred /128 VIP listed before the
    /// interface's own address, plus link-local. The VIP must never be chosen.
    #[test]
    fn never_a_vip_nor_link_local() {
        let vips = [ip("10.77.0.10"), ip("fd00:77::10")];
        let addrs = [
            IfAddr::new(ip("fe80::1")),
            IfAddr::new(ip("fd00:77::10")),
            IfAddr::new(ip("fd00:77::2")),
            IfAddr::new(ip("10.77.0.10")),
            IfAddr::new(ip("10.77.0.2")),
        ];
        assert_eq!(choose_source(&addrs, false, &vips), Some(ip("fd00:77::2")));
        assert_eq!(choose_source(&addrs, true, &vips), Some(ip("10.77.0.2")));
        // Only VIPs and link-local: nothing, rather than a source that cannot work.
        let only = [IfAddr::new(ip("fe80::1")), IfAddr::new(ip("fd00:77::10"))];
        assert_eq!(choose_source(&only, false, &vips), None);
        assert_eq!(choose_source(&only, true, &vips), None);
        // Loopback, unspecified and multicast are never sources either.
        let odd = [
            IfAddr::new(ip("127.0.0.1")),
            IfAddr::new(ip("0.0.0.0")),
            IfAddr::new(ip("::1")),
            IfAddr::new(ip("ff02::1")),
        ];
        assert_eq!(choose_source(&odd, true, &[]), None);
        assert_eq!(choose_source(&odd, false, &[]), None);
    }

    #[test]
    fn preference_order() {
        // Global scope beats IPv4 link-local even when listed later.
        let v4 = [IfAddr::new(ip("169.254.1.1")), IfAddr::new(ip("192.0.2.5"))];
        assert_eq!(choose_source(&v4, true, &[]), Some(ip("192.0.2.5")));
        // A link-local IPv4 address is still better than nothing.
        assert_eq!(choose_source(&v4[..1], true, &[]), Some(ip("169.254.1.1")));
        // Preferred beats deprecated, usable beats tentative.
        let v6 = [
            tentative("2001:db8::1"),
            deprecated("2001:db8::2"),
            IfAddr::new(ip("2001:db8::3")),
        ];
        assert_eq!(choose_source(&v6, false, &[]), Some(ip("2001:db8::3")));
        assert_eq!(choose_source(&v6[..2], false, &[]), Some(ip("2001:db8::2")));
        assert_eq!(choose_source(&v6[..1], false, &[]), Some(ip("2001:db8::1")));
        // Site-local (fec0::/10) ranks below global.
        let site = [IfAddr::new(ip("fec0::1")), IfAddr::new(ip("fd00::1"))];
        assert_eq!(choose_source(&site, false, &[]), Some(ip("fd00::1")));
        // Ties: the first listed (the kernel's primary address).
        let two = [IfAddr::new(ip("10.0.0.3")), IfAddr::new(ip("10.0.0.2"))];
        assert_eq!(choose_source(&two, true, &[]), Some(ip("10.0.0.3")));
    }

    #[test]
    fn explicit_then_global_then_detected() {
        let g4 = Ipv4Addr::new(10, 0, 0, 4);
        let d4 = Ipv4Addr::new(10, 0, 0, 5);
        let g6: Ipv6Addr = "fd00::4".parse().expect("ip");
        let d6: Ipv6Addr = "fd00::5".parse().expect("ip");
        let b4 = ip("10.0.0.21");
        let b6 = ip("fd00::21");
        let all = ((Some(g4), Some(g6)), (Some(d4), Some(d6)));
        assert_eq!(
            resolve_source(Some(ip("10.0.0.9")), all.0, all.1, b4),
            Some(ip("10.0.0.9"))
        );
        assert_eq!(resolve_source(None, all.0, all.1, b4), Some(g4.into()));
        assert_eq!(resolve_source(None, all.0, all.1, b6), Some(g6.into()));
        assert_eq!(
            resolve_source(None, (None, None), all.1, b6),
            Some(d6.into())
        );
        assert_eq!(
            resolve_source(None, (Some(g4), None), all.1, b6),
            Some(d6.into())
        );
        assert_eq!(resolve_source(None, (None, None), (None, None), b4), None);
        // An explicit source of the other family is skipped, never used.
        assert_eq!(
            resolve_source(Some(ip("fd00::9")), all.0, all.1, b4),
            Some(g4.into())
        );
        let d = SourceDefaults {
            global: (None, Some(g6)),
            detected: (Some(d4), None),
        };
        assert_eq!(d.for_backend(None, b4), Some(d4.into()));
        assert_eq!(d.for_backend(None, b6), Some(g6.into()));
    }

    #[test]
    fn if_inet6_lines() {
        let text = "\
fd000077000000000000000000000010 03 80 00 80 lb0
fd000077000000000000000000000002 03 40 00 a0 lb0
fe800000000000000000000000000001 03 40 20 c0 lb0
20010db8000000000000000000000001 03 40 00 08 lb0
00000000000000000000000000000001 01 80 10 80 lo
garbage
";
        let got = parse_if_inet6(text, "lb0");
        assert_eq!(
            got,
            vec![
                IfAddr::new(ip("fd00:77::10")),
                deprecated("fd00:77::2"),
                tentative("fe80::1"),
                tentative("2001:db8::1"),
            ]
        );
        assert_eq!(parse_if_inet6(text, "lo"), vec![IfAddr::new(ip("::1"))]);
        assert!(parse_if_inet6(text, "eth9").is_empty());
    }

    /// The effect part on the host's loopback (no root needed): it lists 127.0.0.1, and
    /// being loopback it is never a default.
    #[test]
    fn loopback_is_listed_but_never_chosen() {
        let addrs = interface_addrs("lo").expect("listing lo");
        assert!(
            addrs.contains(&IfAddr::new(ip("127.0.0.1"))),
            "lo lacks 127.0.0.1: {addrs:?}"
        );
        assert_eq!(default_sources("lo", &[]).expect("lo"), (None, None));
        let e = format!(
            "{:#}",
            default_sources("nosuchif0", &[]).expect_err("no such interface")
        );
        assert!(e.contains("nosuchif0"), "{e}");
    }
}
