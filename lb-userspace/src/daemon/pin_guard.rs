//! [`Held`]: the daemon's own descriptors of the XDP link and of every
//! pinned map, and the lock on the pin directory, so that whatever someone
//! removes of the pins is put back (without the link pin the program would
//! be detached when the daemon exits).

use std::os::fd::{AsFd as _, OwnedFd};
use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::bpf_obj::{self, PinCheck};
use crate::dataplane::Dataplane;
use crate::lock::PinLock;
use crate::pins;

/// What the daemon holds to put the pins back if someone removes them.
pub struct Held {
    /// The pin directory.
    pub dir: PathBuf,
    /// The lock on it.
    pub lock: PinLock,
    /// The XDP link.
    pub link: OwnedFd,
    /// Every pinned map, by pin name.
    pub maps: Vec<(&'static str, OwnedFd)>,
    /// Keeps the loaded program (and aya's handles) for the daemon's life.
    pub dataplane: Dataplane,
}

impl Held {
    /// Re-creates the pin directory, its lock, and the pins of the link and
    /// maps from the descriptors held; returns what it put back, by kind
    /// (`pin_dir`, `link_pin`, `map_pin`).
    pub fn repair(&mut self) -> Result<Vec<&'static str>> {
        let dir = self.dir.clone();
        let mut fixed = Vec::new();
        if !dir.exists() {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("re-creating pin directory {}", dir.display()))?;
            tracing::warn!(dir = %dir.display(), "reconcile: the pin directory was removed; re-created it");
            fixed.push("pin_dir");
        }
        if !self.lock.still_current() {
            match PinLock::acquire(&dir) {
                Ok(lock) => self.lock = lock,
                Err(e) => tracing::error!("reconcile: re-locking {}: {e:#}", dir.display()),
            }
        }
        let mut objects: Vec<(String, &OwnedFd)> = vec![(pins::LINK_PIN.to_string(), &self.link)];
        objects.extend(self.maps.iter().map(|(n, fd)| (n.to_string(), fd)));
        for (name, fd) in objects {
            let path = dir.join(&name);
            match bpf_obj::check(fd.as_fd(), &path)
                .with_context(|| format!("checking pin {}", path.display()))?
            {
                PinCheck::Ours => {}
                PinCheck::Missing => {
                    bpf_obj::pin(fd.as_fd(), &path)
                        .with_context(|| format!("re-pinning {}", path.display()))?;
                    tracing::warn!(pin = %path.display(), "reconcile: pin was removed; re-pinned it from the daemon's descriptor");
                    fixed.push(if name == pins::LINK_PIN {
                        "link_pin"
                    } else {
                        "map_pin"
                    });
                }
                PinCheck::Other(id) => {
                    tracing::error!(
                        pin = %path.display(),
                        "reconcile: {} holds another object (id {id}), not this daemon's; leaving it",
                        path.display()
                    );
                }
            }
        }
        Ok(fixed)
    }
}
