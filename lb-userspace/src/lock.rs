//! One writer per dataplane: an exclusive `flock` on the interface's pin
//! directory. The daemon holds it for its whole life, `xlb run` while it
//! writes; a second writer is refused with the holder's pid instead of
//! silently undoing the first one's changes (a health-down backend made
//! active again, a runtime backend removed).
//!
//! The lock lives on the directory itself (bpffs cannot hold regular
//! files), and dies with its holder, so a `kill -9` never leaves it stale.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// An exclusive lock on a pin directory, released on drop.
#[derive(Debug)]
pub struct PinLock {
    dir: File,
    path: PathBuf,
}

impl PinLock {
    /// Creates `dir` if needed and locks it; fails naming the holder if another process has it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        crate::pins::ensure_bpffs()?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating pin directory {}", dir.display()))?;
        let file =
            File::open(dir).with_context(|| format!("opening pin directory {}", dir.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let who = holder(dir)
                    .map(|pid| format!("pid {pid}{}", describe(pid)))
                    .unwrap_or_else(|| "another process".to_string());
                bail!(
                    "{who} already manages the dataplane at {} (an xlb daemon or `xlb run`); \
                     two writers would undo each other's changes. Use the daemon's CLI \
                     (`xlb backend ...`, `xlb reload`) or stop it first",
                    dir.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", dir.display()));
        }
        Ok(Self {
            dir: file,
            path: dir.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the locked inode is still the directory at `path` (it may have
    /// been removed and re-created under a running daemon).
    pub fn still_current(&self) -> bool {
        let (Ok(held), Ok(now)) = (self.dir.metadata(), std::fs::metadata(&self.path)) else {
            return false;
        };
        held.ino() == now.ino() && held.dev() == now.dev()
    }
}

/// The pid holding the lock on `dir`, from `/proc/locks`.
pub fn holder(dir: &Path) -> Option<u32> {
    let meta = std::fs::metadata(dir).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// Finds the FLOCK holder of (device, inode) in the text of `/proc/locks`.
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    // The kernel prints the device as hex major:minor of the "huge" encoding.
    let major = libc::major(dev);
    let minor = libc::minor(dev);
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1e:5678 0 EOF"; blocked waiters have "->".
        let at = fields.iter().position(|f| *f == "FLOCK")?;
        if fields.get(1) == Some(&"->") {
            return None;
        }
        let pid = fields.get(at + 3)?.parse().ok()?;
        (fields.get(at + 4)? == &want).then_some(pid)
    })
}

fn describe(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|raw| {
            let cmd: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            format!(" ({})", cmd.join(" "))
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_line() {
        let text = "1: POSIX  ADVISORY  WRITE 99 00:1e:77 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 00:1e:5678 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 4343 00:1e:5678 0 EOF\n";
        let dev = libc::makedev(0, 0x1e);
        assert_eq!(holder_in(text, dev, 5678), Some(4242));
        assert_eq!(holder_in(text, dev, 77), None, "POSIX locks are not ours");
        assert_eq!(holder_in(text, dev, 1), None);
    }

    #[test]
    fn a_second_lock_is_refused_with_the_pid() {
        // A plain directory behaves like bpffs for flock; skip the bpffs mount check.
        let dir = std::env::temp_dir().join(format!("xlb-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let first = File::open(&dir).expect("open");
        // SAFETY: flock on our own descriptor.
        assert_eq!(unsafe { libc::flock(first.as_raw_fd(), libc::LOCK_EX) }, 0);
        assert_eq!(holder(&dir), Some(std::process::id()));
        drop(first);
        assert_eq!(holder(&dir), None);
        let _ = std::fs::remove_dir(&dir);
    }
}
