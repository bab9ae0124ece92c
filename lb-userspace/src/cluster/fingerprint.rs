//! A short digest of what decides a node's answers: every service's
//! identity and affinity settings, and each of its backends with weight and
//! state, in the order-free form the Maglev tables are built from (the
//! table is a pure function of these and its size). Two nodes with equal
//! fingerprints answer every client alike; a mismatch is config drift.

use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

use crate::config::Config;

/// The fingerprint of `config` (as the kernel was given it): 16 hex digits.
pub fn of(config: &Config) -> String {
    let mut services: Vec<_> = config.services.iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let mut text = format!(
        "xlb {} table {}\n",
        env!("CARGO_PKG_VERSION"),
        config.maglev_table_size
    );
    for s in services {
        let _ = writeln!(
            text,
            "service {} {} {} {:?} /{} /{} {:?} {:?}",
            s.name,
            s.vip,
            s.port,
            s.protocol,
            s.affinity_prefix_v4,
            s.affinity_prefix_v6,
            s.affinity_timeout,
            s.forward_mode
        );
        let mut backends: Vec<_> = s.backends.iter().collect();
        backends.sort_by(|a, b| a.name.cmp(&b.name));
        for b in backends {
            let _ = writeln!(
                text,
                " backend {} {} {} {:?}",
                b.name, b.address, b.weight, b.state
            );
        }
    }
    let digest = Sha256::digest(text.as_bytes());
    digest[..8].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendState;

    const CFG: &str = "interface = \"eth0\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.10\"\nport = 80\nprotocol = \"tcp\"\n[[service.backend]]\nname = \"b1\"\naddress = \"10.0.0.21\"\n[[service.backend]]\nname = \"b2\"\naddress = \"10.0.0.22\"\n";

    #[test]
    fn equal_answers_equal_fingerprints_and_any_change_shows() {
        let a = Config::parse(CFG).expect("valid");
        let mut b = a.clone();
        b.services[0].backends.reverse();
        assert_eq!(of(&a), of(&b), "file order does not change answers");
        assert_eq!(of(&a).len(), 16);
        let mut w = a.clone();
        w.services[0].backends[1].weight = 2;
        let mut d = a.clone();
        d.services[0].backends[1].state = BackendState::Down;
        let mut t = a.clone();
        t.maglev_table_size = 251;
        for changed in [w, d, t] {
            assert_ne!(of(&a), of(&changed));
        }
    }
}
