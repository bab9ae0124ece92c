//! Map keys and address layouts shared by the writers and readers of the maps.

use std::net::IpAddr;

use lb_common::{FAMILY_V4, FAMILY_V6, ServiceKey, words_from_bytes};

use crate::config::ServiceConfig;

/// Address in key layout.
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            words_from_bytes(&b)
        }
        IpAddr::V6(a) => words_from_bytes(&a.octets()),
    }
}

/// Address family constant of an address.
pub fn family(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    }
}

/// The map key of a configured service.
pub fn service_key(svc: &ServiceConfig) -> ServiceKey {
    ServiceKey {
        addr: addr_words(svc.vip),
        port: svc.port.to_be(),
        proto: svc.protocol.number(),
        family: family(svc.vip),
    }
}

/// `ServiceKey` with a total order (family, address, protocol, port), for
/// deterministic maps and sets.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServiceKeyOrd(pub(crate) ServiceKey);

impl ServiceKeyOrd {
    fn tuple(&self) -> (u8, [u8; 16], u8, u16) {
        let k = &self.0;
        (
            k.family,
            lb_common::bytes_from_words(&k.addr),
            k.proto,
            u16::from_be(k.port),
        )
    }
}

impl Ord for ServiceKeyOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.tuple().cmp(&other.tuple())
    }
}

impl PartialOrd for ServiceKeyOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
