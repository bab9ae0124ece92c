//! The state file: runtime changes made through the CLI (add, remove, drain,
//! weight), kept on disk so a restarted daemon (even after `kill -9`) puts
//! the dataplane back exactly as it was. Written atomically: a temporary
//! file in the same directory, fsync, rename, fsync of the directory.
//!
//! [`State::validate`] checks every entry exactly like the CLI input it came
//! from (the same validators as the config file); an invalid entry is an
//! error naming its path in the file. Entries naming a service or backend
//! the config no longer has are not errors: editing the config while the
//! daemon is stopped makes them, so they are logged and ignored (kept in the
//! file, so the overrides return if the config names them again).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::{
    Config, MAX_DRAIN_DEADLINE, check_not_own_mac, valid_backend_name, validate_backend_address,
    validate_mac, validate_weight,
};

/// Slack on a stored drain deadline beyond [`MAX_DRAIN_DEADLINE`] from now, so
/// a clock stepped back after the drain started does not make the file invalid.
const DEADLINE_CLOCK_SLACK: Duration = Duration::from_secs(24 * 3600);

/// Version of the file layout; a file of another version is refused, not guessed at.
pub const STATE_VERSION: u32 = 1;

/// Everything the daemon changed on top of the config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Layout version ([`STATE_VERSION`]).
    pub version: u32,
    /// Per service name.
    pub services: BTreeMap<String, ServiceState>,
    /// The cluster version these changes are (`[cluster]` only): a node
    /// restarted with an older file adopts its peers' newer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_version: Option<crate::cluster::msg::Version>,
}

/// Runtime changes to one service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceState {
    /// Backends added with `xlb backend add` (not in the config file).
    #[serde(default)]
    pub added: Vec<AddedBackend>,
    /// Config backends removed with `xlb backend remove`, by name.
    #[serde(default)]
    pub removed: Vec<String>,
    /// Weight overrides by backend name.
    #[serde(default)]
    pub weights: BTreeMap<String, u16>,
    /// Administrative state overrides by backend name.
    #[serde(default)]
    pub admin: BTreeMap<String, Admin>,
}

impl ServiceState {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.weights.is_empty()
            && self.admin.is_empty()
    }
}

/// A backend added at runtime.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AddedBackend {
    /// Name.
    pub name: String,
    /// Address.
    pub address: IpAddr,
    /// MAC as text; empty: resolved from the kernel's neighbours.
    pub mac: String,
    /// Maglev weight.
    pub weight: u16,
}

/// Administrative state set through the CLI.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum Admin {
    /// Takes new clients.
    Active,
    /// Keeps its clients, gets no new ones; maint when they are gone or at the deadline.
    Draining {
        /// Wall-clock deadline (ms since the Unix epoch), so it survives restarts.
        deadline_unix_ms: Option<u64>,
    },
    /// Out of service: no traffic; its clients were moved.
    Maint,
}

impl State {
    /// Reads the state file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<State> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    version: STATE_VERSION,
                    ..State::default()
                });
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading state file {}", path.display()));
            }
        };
        let state: State = serde_json::from_str(&text)
            .with_context(|| format!("parsing state file {}", path.display()))?;
        if state.version != STATE_VERSION {
            bail!(
                "state file {} has version {} but this xlb reads version {STATE_VERSION}",
                path.display(),
                state.version
            );
        }
        Ok(state)
    }

    /// Writes the state atomically (temporary file, fsync, rename, directory fsync).
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = path
            .parent()
            .with_context(|| format!("state file {} has no directory", path.display()))?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
        let file_name = path
            .file_name()
            .with_context(|| format!("state file {} has no file name", path.display()))?;
        let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));
        let mut text = serde_json::to_vec_pretty(self).context("encoding the state")?;
        text.push(b'\n');
        let write = || -> Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            // The rename is durable only once the directory entry is.
            std::fs::File::open(dir)?.sync_all()?;
            Ok(())
        };
        write().with_context(|| format!("writing state file {}", path.display()))
    }

    /// The overrides of `service`, created empty if needed.
    pub fn service_mut(&mut self, service: &str) -> &mut ServiceState {
        self.services.entry(service.to_string()).or_default()
    }

    /// Drops services without overrides, so the file stays readable.
    pub fn prune(&mut self) {
        self.services.retain(|_, s| !s.is_empty());
    }

    /// Checks every entry against `config` like the CLI input it came from
    /// (see the module doc); errors name the file (`config.state_file`) and
    /// the entry, e.g. `services["web"].added[0].address: ...`.
    pub fn validate(&self, config: &Config) -> Result<()> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for note in self
            .check(config, now_ms)
            .with_context(|| format!("state file {}", config.state_file.display()))?
        {
            tracing::warn!(
                "state file {}: {note}; ignored",
                config.state_file.display()
            );
        }
        Ok(())
    }

    /// Refuses added backends whose MAC is `own_mac`, the MAC of the interface
    /// XDP attaches to (the state-file side of `Config::check_against_interface`).
    pub fn check_against_interface(&self, config: &Config, own_mac: [u8; 6]) -> Result<()> {
        let check = || -> Result<()> {
            for (service, over) in &self.services {
                for (k, added) in over
                    .added
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| !a.mac.is_empty())
                {
                    let path = format!("services[{service:?}].added[{k}].mac");
                    let mac = validate_mac(&path, &added.mac)?;
                    check_not_own_mac(&path, mac, own_mac, &config.interface)?;
                }
            }
            Ok(())
        };
        check().with_context(|| format!("state file {}", config.state_file.display()))
    }

    /// [`State::validate`] at wall-clock `now_ms`: the first invalid entry as
    /// an error, else the stale references (for the caller to log).
    fn check(&self, config: &Config, now_ms: u64) -> Result<Vec<String>> {
        let vips = config.vips();
        let mut stale = Vec::new();
        let mut total = 0usize;
        for (service, over) in &self.services {
            let path = format!("services[{service:?}]");
            let Some(svc) = config.services.iter().find(|s| &s.name == service) else {
                stale.push(format!("{path}: the config has no service {service:?}"));
                continue;
            };
            for (k, name) in over.removed.iter().enumerate() {
                if !svc.backends.iter().any(|b| &b.name == name) {
                    stale.push(format!(
                        "{path}.removed[{k}]: service {service:?} has no backend {name:?} in the config"
                    ));
                }
            }
            // What the effective service holds: the config's backends less the removed ones, plus the added.
            let kept: Vec<_> = svc
                .backends
                .iter()
                .filter(|b| !over.removed.contains(&b.name))
                .collect();
            let mut names: Vec<&str> = kept.iter().map(|b| b.name.as_str()).collect();
            for (k, added) in over.added.iter().enumerate() {
                let apath = format!("{path}.added[{k}]");
                if !valid_backend_name(&added.name) {
                    bail!(
                        "{apath}.name: {:?} is not a valid name (expected 1 to 64 of A-Z a-z 0-9 _ . : -)",
                        added.name
                    );
                }
                validate_backend_address(
                    &format!("{apath}.address"),
                    added.address,
                    svc.vip,
                    &vips,
                )?;
                // Empty: resolved from the kernel's neighbours.
                if !added.mac.is_empty() {
                    validate_mac(&format!("{apath}.mac"), &added.mac)?;
                }
                validate_weight(&format!("{apath}.weight"), added.weight)?;
                if let Some(j) = over.added[..k].iter().position(|a| a.name == added.name) {
                    bail!(
                        "{apath}.name: {:?} is already used by added[{j}]",
                        added.name
                    );
                }
                if let Some(j) = over.added[..k]
                    .iter()
                    .position(|a| a.address == added.address)
                {
                    bail!(
                        "{apath}.address: {} is already used by added[{j}]",
                        added.address
                    );
                }
                // The config names this backend (or its address) itself now: the config's wins.
                if let Some(b) = kept
                    .iter()
                    .find(|b| b.name == added.name || b.address == added.address)
                {
                    stale.push(format!(
                        "{apath}: the config has backend {:?} ({}) of service {service:?} itself",
                        b.name, b.address
                    ));
                    continue;
                }
                names.push(&added.name);
            }
            if names.is_empty() {
                bail!(
                    "{path}.removed: removes every backend of service {service:?}; a service needs at least one"
                );
            }
            total += names.len();
            for (name, weight) in &over.weights {
                validate_weight(&format!("{path}.weights[{name:?}]"), *weight)?;
                if !names.contains(&name.as_str()) {
                    stale.push(format!(
                        "{path}.weights[{name:?}]: service {service:?} has no backend {name:?}"
                    ));
                }
            }
            for (name, admin) in &over.admin {
                if let Admin::Draining {
                    deadline_unix_ms: Some(deadline),
                } = admin
                {
                    let latest = now_ms.saturating_add(
                        (MAX_DRAIN_DEADLINE + DEADLINE_CLOCK_SLACK).as_millis() as u64,
                    );
                    if *deadline > latest {
                        bail!(
                            "{path}.admin[{name:?}].deadline_unix_ms: {deadline} is more than {} from now (the longest drain deadline)",
                            humantime::format_duration(MAX_DRAIN_DEADLINE)
                        );
                    }
                }
                if !names.contains(&name.as_str()) {
                    stale.push(format!(
                        "{path}.admin[{name:?}]: service {service:?} has no backend {name:?}"
                    ));
                }
            }
        }
        let untouched: usize = config
            .services
            .iter()
            .filter(|s| !self.services.contains_key(&s.name))
            .map(|s| s.backends.len())
            .sum();
        if total + untouched > lb_common::BACKEND_CAPACITY as usize {
            bail!(
                "services[*].added: {} backends in total with the config's, more than the {} xlb supports",
                total + untouched,
                lb_common::BACKEND_CAPACITY
            );
        }
        Ok(stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
interface = "eth0"
state_file = "/var/lib/xlb/eth0.state.json"

[[service]]
name = "web"
vip = "10.0.0.10"
port = 80
protocol = "tcp"
[[service.backend]]
name = "b1"
address = "10.0.0.21"
mac = "02:00:00:00:00:21"
[[service.backend]]
name = "b2"
address = "10.0.0.22"
mac = "02:00:00:00:00:22"

[[service]]
name = "dns"
vip = "10.0.0.9"
port = 53
protocol = "udp"
[[service.backend]]
name = "d1"
address = "10.0.0.31"
mac = "02:00:00:00:00:31"
"#;

    const NOW_MS: u64 = 1_800_000_000_000;

    fn config() -> Config {
        Config::parse(CONFIG).expect("test config")
    }

    fn added(name: &str, address: &str, mac: &str, weight: u16) -> AddedBackend {
        AddedBackend {
            name: name.into(),
            address: address.parse().expect("ip"),
            mac: mac.into(),
            weight,
        }
    }

    /// A state with one valid added backend in "web", changed by `edit`.
    fn state(edit: impl FnOnce(&mut ServiceState)) -> State {
        let mut s = State {
            version: STATE_VERSION,
            ..State::default()
        };
        let web = s.service_mut("web");
        web.added
            .push(added("b4", "10.0.0.24", "02:00:00:00:00:24", 2));
        edit(web);
        s
    }

    /// The error of `validate` for `state`, as the daemon would print it.
    fn refused(state: &State) -> String {
        let config = config();
        let e = state
            .check(&config, NOW_MS)
            .with_context(|| format!("state file {}", config.state_file.display()))
            .expect_err("must be refused");
        format!("{e:#}")
    }

    fn assert_refused(state: &State, message: &str) {
        let e = refused(state);
        assert_eq!(
            e,
            format!("state file /var/lib/xlb/eth0.state.json: {message}")
        );
    }

    #[test]
    fn a_valid_state_passes() {
        let s = state(|web| {
            web.removed.push("b2".into());
            web.weights.insert("b4".into(), 65535);
            web.weights.insert("b1".into(), 1);
            web.admin.insert(
                "b1".into(),
                Admin::Draining {
                    deadline_unix_ms: Some(NOW_MS + MAX_DRAIN_DEADLINE.as_millis() as u64),
                },
            );
            web.admin.insert("b4".into(), Admin::Maint);
        });
        assert_eq!(
            s.check(&config(), NOW_MS).expect("valid"),
            Vec::<String>::new()
        );
        state(|_| {})
            .validate(&config())
            .expect("valid through the public entry too");
    }

    #[test]
    fn added_backends_are_checked_like_cli_input() {
        let with = |b: AddedBackend| state(|web| web.added.push(b));
        assert_refused(
            &with(added("b5", "10.0.0.9", "02:00:00:00:00:25", 1)),
            "services[\"web\"].added[1].address: 10.0.0.9 is the VIP of service \"dns\"",
        );
        assert_refused(
            &with(added("b5", "10.0.0.10", "02:00:00:00:00:25", 1)),
            "services[\"web\"].added[1].address: 10.0.0.10 is the service's own vip",
        );
        assert_refused(
            &with(added("b5", "2001:db8::5", "02:00:00:00:00:25", 1)),
            "services[\"web\"].added[1].address: 2001:db8::5 is IPv6 but the service vip 10.0.0.10 is IPv4 (the address family must match)",
        );
        assert_refused(
            &with(added("b5", "127.0.0.1", "02:00:00:00:00:25", 1)),
            "services[\"web\"].added[1].address: 127.0.0.1 is a loopback address, not a backend",
        );
        assert_refused(
            &with(added("b5", "255.255.255.255", "02:00:00:00:00:25", 1)),
            "services[\"web\"].added[1].address: 255.255.255.255 is the IPv4 broadcast address, not a backend",
        );
        assert_refused(
            &with(added("b5", "0.0.0.0", "02:00:00:00:00:25", 1)),
            "services[\"web\"].added[1].address: 0.0.0.0 is the unspecified address, not a backend",
        );
        assert_refused(
            &with(added("b5", "10.0.0.25", "01:00:5e:00:00:01", 1)),
            "services[\"web\"].added[1].mac: \"01:00:5e:00:00:01\" is a multicast MAC (low bit of the first octet set), not a backend",
        );
        assert!(
            refused(&with(added("b5", "10.0.0.25", "nope", 1)))
                .contains("services[\"web\"].added[1].mac: \"nope\" is not a MAC address")
        );
        assert_refused(
            &with(added("b5", "10.0.0.25", "02:00:00:00:00:25", 0)),
            "services[\"web\"].added[1].weight: 0 is out of range 1..=65535",
        );
        assert!(
            refused(&with(added("b 5", "10.0.0.25", "02:00:00:00:00:25", 1)))
                .contains("services[\"web\"].added[1].name: \"b 5\" is not a valid name")
        );
        assert_refused(
            &with(added("b4", "10.0.0.25", "02:00:00:00:00:25", 1)),
            "services[\"web\"].added[1].name: \"b4\" is already used by added[0]",
        );
        assert_refused(
            &with(added("b5", "10.0.0.24", "02:00:00:00:00:25", 1)),
            "services[\"web\"].added[1].address: 10.0.0.24 is already used by added[0]",
        );
    }

    #[test]
    fn overrides_are_checked() {
        assert_refused(
            &state(|web| {
                web.weights.insert("b1".into(), 0);
            }),
            "services[\"web\"].weights[\"b1\"]: 0 is out of range 1..=65535",
        );
        let e = refused(&state(|web| {
            web.admin.insert(
                "b1".into(),
                Admin::Draining {
                    deadline_unix_ms: Some(u64::MAX),
                },
            );
        }));
        assert!(
            e.starts_with(
                "state file /var/lib/xlb/eth0.state.json: services[\"web\"].admin[\"b1\"].deadline_unix_ms: 18446744073709551615 is more than 30days from now"
            ),
            "{e}"
        );
        // Removing every backend, added ones included, leaves a service that cannot serve.
        let mut s = state(|web| {
            web.added.clear();
            web.removed = vec!["b1".into(), "b2".into()];
        });
        assert_refused(
            &s,
            "services[\"web\"].removed: removes every backend of service \"web\"; a service needs at least one",
        );
        s.service_mut("web")
            .added
            .push(added("b4", "10.0.0.24", "02:00:00:00:00:24", 1));
        assert!(s.check(&config(), NOW_MS).is_ok());
    }

    #[test]
    fn weights_above_u16_are_refused_when_read() {
        let dir = std::env::temp_dir().join(format!("xlb-state-weight-{}", std::process::id()));
        let path = dir.join("s.json");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            &path,
            r#"{"version": 1, "services": {"web": {"weights": {"b1": 65536}}}}"#,
        )
        .expect("write");
        let e = format!("{:#}", State::load(&path).expect_err("65536"));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            e.contains("parsing state file") && e.contains("65536"),
            "{e}"
        );
    }

    #[test]
    fn references_to_what_the_config_lost_are_ignored() {
        let mut s = state(|web| {
            web.removed.push("gone".into());
            web.weights.insert("gone".into(), 3);
            web.admin.insert("gone".into(), Admin::Maint);
            // The config names this one itself now: the config's wins.
            web.added
                .push(added("b1", "10.0.0.21", "02:00:00:00:00:21", 1));
        });
        s.service_mut("old")
            .added
            .push(added("x", "10.9.9.9", "02:00:00:00:00:99", 1));
        let notes = s.check(&config(), NOW_MS).expect("not an error");
        assert_eq!(
            notes,
            [
                "services[\"old\"]: the config has no service \"old\"",
                "services[\"web\"].removed[0]: service \"web\" has no backend \"gone\" in the config",
                "services[\"web\"].added[1]: the config has backend \"b1\" (10.0.0.21) of service \"web\" itself",
                "services[\"web\"].weights[\"gone\"]: service \"web\" has no backend \"gone\"",
                "services[\"web\"].admin[\"gone\"]: service \"web\" has no backend \"gone\"",
            ]
        );
        // A stale entry is still checked for values it could never have had.
        s.service_mut("web").weights.insert("gone".into(), 0);
        assert!(s.check(&config(), NOW_MS).is_err());
    }

    #[test]
    fn too_many_backends_with_the_added_ones() {
        let s = state(|web| {
            web.added.clear();
            for i in 0..lb_common::BACKEND_CAPACITY - 2 {
                web.added.push(added(
                    &format!("a{i}"),
                    &format!("10.1.{}.{}", i / 256, i % 256),
                    "02:00:00:00:00:99",
                    1,
                ));
            }
        });
        // 3 config backends + 4093 added: one more than the 4095 ids (0 is reserved).
        assert!(refused(&s).contains("4096 backends in total"));
    }

    #[test]
    fn own_mac_is_refused() {
        let s = state(|_| {});
        s.check_against_interface(&config(), [2, 0, 0, 0, 0, 0x99])
            .expect("another MAC");
        let e = format!(
            "{:#}",
            s.check_against_interface(&config(), [2, 0, 0, 0, 0, 0x24])
                .expect_err("own MAC")
        );
        assert!(
            e.starts_with(
                "state file /var/lib/xlb/eth0.state.json: services[\"web\"].added[0].mac: 02:00:00:00:00:24 is the MAC of eth0"
            ),
            "{e}"
        );
    }

    #[test]
    fn round_trip_and_atomic_save() {
        let dir = std::env::temp_dir().join(format!("xlb-state-test-{}", std::process::id()));
        let path = dir.join("s.json");
        let empty = State::load(&path).expect("missing is empty");
        assert!(empty.services.is_empty());
        let mut s = State {
            version: STATE_VERSION,
            ..State::default()
        };
        let svc = s.service_mut("web");
        svc.weights.insert("b1".into(), 3);
        svc.admin.insert(
            "b2".into(),
            Admin::Draining {
                deadline_unix_ms: Some(5),
            },
        );
        svc.added.push(AddedBackend {
            name: "b4".into(),
            address: "10.0.0.4".parse().expect("ip"),
            mac: "02:00:00:00:00:04".into(),
            weight: 1,
        });
        s.save(&path).expect("save");
        assert_eq!(State::load(&path).expect("load"), s);
        assert!(!dir.join(".s.json.tmp").exists());
        // Without [cluster] the file has no cluster version; with one it keeps it.
        assert!(
            !std::fs::read_to_string(&path)
                .expect("read")
                .contains("cluster_version")
        );
        s.cluster_version = Some(crate::cluster::msg::Version {
            counter: 7,
            node: 2,
        });
        s.save(&path).expect("save");
        assert_eq!(
            State::load(&path).expect("load").cluster_version,
            s.cluster_version
        );
        std::fs::write(&path, "{\"version\": 9, \"services\": {}}").expect("write");
        let e = format!("{:#}", State::load(&path).expect_err("version"));
        assert!(e.contains("version 9"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
