//! The state file: runtime changes made through the CLI (add, remove, drain,
//! weight), kept on disk so a restarted daemon (even after `kill -9`) puts
//! the dataplane back exactly as it was. Written atomically: a temporary
//! file in the same directory, fsync, rename, fsync of the directory.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

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
    /// MAC as text.
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        std::fs::write(&path, "{\"version\": 9, \"services\": {}}").expect("write");
        let e = format!("{:#}", State::load(&path).expect_err("version"));
        assert!(e.contains("version 9"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
