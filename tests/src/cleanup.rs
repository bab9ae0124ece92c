//! Process-wide record of what the labs created, so a signal can still clean it up.
//!
//! Drop guards cover normal returns and panics (unwinding). A SIGINT/SIGTERM/SIGHUP
//! ends the process without unwinding, so a watcher thread deletes everything
//! recorded here first, then lets the signal take its default effect.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, Once};
use std::thread;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Resources that still exist and must go if the process is interrupted.
#[derive(Default)]
struct Live {
    netns: BTreeSet<String>,
    dirs: BTreeSet<PathBuf>,
    pids: BTreeSet<i32>,
    mounts: BTreeSet<PathBuf>,
}

static LIVE: Mutex<Live> = Mutex::new(Live {
    netns: BTreeSet::new(),
    dirs: BTreeSet::new(),
    pids: BTreeSet::new(),
    mounts: BTreeSet::new(),
});

static SIGNAL_WATCHER: Once = Once::new();

/// Locks the record; a panic elsewhere must not stop cleanup, so poisoning is ignored.
fn live() -> MutexGuard<'static, Live> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts (once per process) the thread that cleans up on SIGINT, SIGTERM and SIGHUP.
pub fn install_signal_cleanup() {
    SIGNAL_WATCHER.call_once(|| {
        let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "xlb-tests: cannot watch signals, an interrupt may leave namespaces: {e}"
                );
                return;
            }
        };
        let spawned = thread::Builder::new()
            .name("xlb-lab-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    eprintln!("xlb-tests: signal {sig}: removing lab namespaces before exiting");
                    cleanup_all();
                    // The handler replaced the default action; perform it now that we are clean.
                    if signal_hook::low_level::emulate_default_handler(sig).is_err() {
                        std::process::exit(128 + sig);
                    }
                }
            });
        if let Err(e) = spawned {
            eprintln!("xlb-tests: cannot start the signal watcher: {e}");
        }
    });
}

/// Records a namespace that is about to be created.
pub(crate) fn add_netns(name: &str) {
    live().netns.insert(name.to_owned());
}

/// Forgets a namespace that was deleted.
pub(crate) fn remove_netns(name: &str) {
    live().netns.remove(name);
}

/// Records a bpffs directory the lab owns.
pub(crate) fn add_dir(path: &Path) {
    live().dirs.insert(path.to_owned());
}

/// Forgets a removed bpffs directory.
pub(crate) fn remove_dir(path: &Path) {
    live().dirs.remove(path);
}

/// Records a child process started in a lab namespace.
pub(crate) fn add_pid(pid: i32) {
    live().pids.insert(pid);
}

/// Forgets a child process that was reaped.
pub(crate) fn remove_pid(pid: i32) {
    live().pids.remove(&pid);
}

/// Records a mount point a test mounted.
pub(crate) fn add_mount(path: &Path) {
    live().mounts.insert(path.to_owned());
}

/// Forgets an unmounted mount point.
pub(crate) fn remove_mount(path: &Path) {
    live().mounts.remove(path);
}

/// Kills recorded children and deletes recorded directories and namespaces, best effort.
fn cleanup_all() {
    let live = std::mem::take(&mut *live());
    for pid in live.pids {
        // SAFETY: kill(2) with a pid we spawned and have not reaped; no memory is involved.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    // Before the directories: a mount point inside one would keep it.
    for mount in live.mounts {
        let _ = Command::new("umount").arg("-l").arg(&mount).status();
    }
    for dir in live.dirs {
        let _ = std::fs::remove_dir_all(&dir);
    }
    for ns in live.netns {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
}
