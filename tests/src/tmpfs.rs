//! A small tmpfs mounted for one test (e.g. to make a disk full), unmounted
//! when its guard drops and on SIGINT/SIGTERM like everything else a lab makes.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cleanup, cmd};

/// A mounted tmpfs; unmounted (lazily, so a process still using it cannot stop that) on drop.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Creates `dir` if needed and mounts a tmpfs of `size` (as `mount -o size=` reads it,
    /// e.g. "64k") on it.
    pub fn mount(dir: &Path, size: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        cleanup::install_signal_cleanup();
        // Recorded first so a signal arriving mid-mount still unmounts it.
        cleanup::add_mount(dir);
        let mounted = cmd::run(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(dir),
        );
        if let Err(e) = mounted {
            cleanup::remove_mount(dir);
            return Err(e.context(format!("mounting a tmpfs on {}", dir.display())));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Fills the file system with a file of zeros until the kernel says it is full;
    /// returns the bytes written.
    pub fn fill(&self) -> Result<u64> {
        let path = self.dir.join("fill");
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let chunk = [0u8; 4096];
        let mut written = 0u64;
        // Bounded: a tmpfs that never fills is a broken test setup, not a loop forever.
        for _ in 0..(1 << 20) {
            match f.write(&chunk) {
                Ok(0) => return Ok(written),
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(written),
                Err(e) => return Err(e).with_context(|| format!("filling {}", path.display())),
            }
        }
        bail!("{} did not fill after 4 GiB", self.dir.display())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        match cmd::run(Command::new("umount").arg("-l").arg(&self.dir)) {
            Ok(_) => cleanup::remove_mount(&self.dir),
            Err(e) => eprintln!("xlb-tests: cannot unmount {}: {e:#}", self.dir.display()),
        }
    }
}
