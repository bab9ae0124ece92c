//! `cargo xtask setup`: installs what building and testing xlb needs, skipping what is present.

use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::exec;

/// Debian packages: LLVM 22 for bpf-linker, ip/bridge, ethtool, nsenter, a C toolchain for
/// linking, and BIRD 2 (BGP + BFD) for the cluster lab's routers and node speakers.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "ethtool",
    "util-linux",
    "gcc",
    "bird2",
];
/// The bpf-linker release that matches LLVM 22 and the aya 0.14 line.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where Debian's LLVM 22 lives; bpf-linker must link against it, not the default LLVM 14.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Where the tests and the daemon pin maps and links.
const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Number of setup steps, for the `[i/N]` progress lines.
const STEPS: usize = 5;
/// The service unit / init script Debian's `bird2` installs (and may start on the host).
const BIRD_SERVICE: &str = "bird";
/// Control socket of the packaged BIRD instance (the tests' instances use their own).
const BIRD_PACKAGE_SOCKET: &str = "/run/bird/bird.ctl";

/// Installs every prerequisite that is missing.
pub fn setup() -> Result<()> {
    require_root()?;
    apt_packages(1)?;
    toolchains(2)?;
    bpf_linker(3)?;
    bpffs(4)?;
    bird_service_off(5)?;
    Ok(())
}

/// Fails with one line unless running as root.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "must run as root: setup installs packages and mounts bpffs, and the tests load XDP \
             programs and create network namespaces (run `cargo xtask ...` as root; there is no sudo)"
        );
    }
    Ok(())
}

/// Prints the start of a progress line (finished by [`done`]).
fn begin(n: usize, what: &str) {
    print!("[{n}/{STEPS}] {what} ... ");
    let _ = std::io::stdout().flush();
}

/// Finishes a progress line.
fn done(outcome: &str) {
    println!("{outcome}");
}

/// Step 1: apt packages, with `apt-get update` only when something is missing.
fn apt_packages(n: usize) -> Result<()> {
    begin(n, &format!("apt packages: {}", APT_PACKAGES.join(" ")));
    let missing = missing_packages()?;
    if missing.is_empty() {
        done("present");
        return Ok(());
    }
    done(&format!("installing {}", missing.join(" ")));
    exec::capture(
        Command::new("apt-get")
            .args(["-q", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    exec::capture(
        Command::new("apt-get")
            .args(["-q", "install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!(
            "apt-get finished but these are still missing: {}",
            still.join(" ")
        );
    }
    println!("[{n}/{STEPS}] apt packages: installed");
    Ok(())
}

/// The packages of `APT_PACKAGES` that dpkg does not report as installed.
fn missing_packages() -> Result<Vec<&'static str>> {
    // dpkg-query exits 1 when it knows a package not at all, but still lists the others.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\\n"])
        .args(APT_PACKAGES)
        .output()
        .context("cannot run dpkg-query (is this Debian?)")?;
    Ok(not_installed(
        &String::from_utf8_lossy(&out.stdout),
        APT_PACKAGES,
    ))
}

/// The packages of `wanted` that `dpkg-query` output `listed` does not show as installed.
fn not_installed(listed: &str, wanted: &[&'static str]) -> Vec<&'static str> {
    wanted
        .iter()
        .copied()
        .filter(|p| {
            !listed.lines().any(|l| {
                let mut f = l.split_whitespace();
                // Multi-arch packages may be listed as `name:amd64`.
                f.next()
                    .is_some_and(|name| name.split(':').next() == Some(*p))
                    && f.next() == Some("installed")
            })
        })
        .collect()
}

/// Step 2: the nightly toolchain with rust-src and clippy (eBPF build and lint), and
/// clippy/rustfmt on the toolchain running this (workspace lint).
fn toolchains(n: usize) -> Result<()> {
    begin(
        n,
        "rust toolchains: nightly (+rust-src, clippy), current (+clippy, rustfmt)",
    );
    let mut actions = Vec::new();
    let has_nightly = exec::probe(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed (https://rustup.rs)")?
        .lines()
        .any(|l| l.starts_with("nightly-") || l.starts_with("nightly "));
    if !has_nightly {
        actions.push(
            vec!["toolchain", "install", "nightly", "--profile", "minimal"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>(),
        );
    }
    let nightly_missing = if has_nightly {
        missing_components(Some("nightly"), &["rust-src", "clippy"])?
    } else {
        vec!["rust-src", "clippy"]
    };
    if !nightly_missing.is_empty() {
        let mut a: Vec<String> = vec!["component".into(), "add".into()];
        a.extend(nightly_missing.iter().map(|c| c.to_string()));
        a.extend(["--toolchain".into(), "nightly".into()]);
        actions.push(a);
    }
    let current_missing = missing_components(None, &["clippy", "rustfmt"])?;
    if !current_missing.is_empty() {
        let mut a: Vec<String> = vec!["component".into(), "add".into()];
        a.extend(current_missing.iter().map(|c| c.to_string()));
        actions.push(a);
    }
    if actions.is_empty() {
        done("present");
        return Ok(());
    }
    done("installing");
    for a in &actions {
        println!("    rustup {}", a.join(" "));
        exec::capture(Command::new("rustup").args(a))?;
    }
    println!("[{n}/{STEPS}] rust toolchains: installed");
    Ok(())
}

/// Components of `wanted` not installed on `toolchain` (the current one if `None`).
fn missing_components(
    toolchain: Option<&str>,
    wanted: &[&'static str],
) -> Result<Vec<&'static str>> {
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "list", "--installed"]);
    if let Some(t) = toolchain {
        cmd.args(["--toolchain", t]);
    }
    let out = exec::capture(&mut cmd)?;
    Ok(components_missing(
        &String::from_utf8_lossy(&out.stdout),
        wanted,
    ))
}

/// The components of `wanted` absent from `rustup component list --installed` output.
fn components_missing(installed: &str, wanted: &[&'static str]) -> Vec<&'static str> {
    // Listed as `clippy-x86_64-unknown-linux-gnu`, or bare for target-less ones like `rust-src`.
    wanted
        .iter()
        .copied()
        .filter(|c| {
            !installed
                .lines()
                .any(|l| l == *c || l.starts_with(&format!("{c}-")))
        })
        .collect()
}

/// Step 3: bpf-linker, built against LLVM 22.
fn bpf_linker(n: usize) -> Result<()> {
    begin(n, &format!("bpf-linker {BPF_LINKER_VERSION}"));
    if linker_ok() {
        done("present");
        return Ok(());
    }
    done("installing with cargo install (about a minute)");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![PathBuf::from(LLVM_PREFIX).join("bin")];
    dirs.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(dirs).context("building PATH")?;
    exec::capture(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args([
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            // Away from the workspace, so its cargo config does not apply to the install.
            .current_dir(std::env::temp_dir()),
    )?;
    if !linker_ok() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` does not report {BPF_LINKER_VERSION} \
             (is ~/.cargo/bin on PATH, and libllvm22 installed?)"
        );
    }
    println!("[{n}/{STEPS}] bpf-linker: installed");
    Ok(())
}

/// Whether `bpf-linker --version` runs and reports the wanted version.
fn linker_ok() -> bool {
    exec::probe(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.split_whitespace().any(|w| w == BPF_LINKER_VERSION))
}

/// Step 4: bpffs at /sys/fs/bpf.
fn bpffs(n: usize) -> Result<()> {
    begin(n, &format!("bpffs at {BPFFS}"));
    if bpffs_mounted() {
        done("already mounted");
        return Ok(());
    }
    done("mounting");
    exec::capture(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    if !bpffs_mounted() {
        bail!("`mount -t bpf bpf {BPFFS}` succeeded but {BPFFS} is still not bpffs");
    }
    println!("[{n}/{STEPS}] bpffs: mounted");
    Ok(())
}

/// Whether /sys/fs/bpf is a bpffs mount.
fn bpffs_mounted() -> bool {
    let Ok(path) = CString::new(BPFFS) else {
        return false;
    };
    // SAFETY: statfs fills a zeroed struct we own; path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Step 5: the `bird` service of Debian's package stopped and disabled. The cluster lab
/// starts its own BIRD instances inside namespaces; one on the host would only add
/// routes and sessions nobody asked for. Idempotent, and it touches only the packaged
/// instance: never `/etc/init.d/bird stop`, which stops every process named bird
/// (the tests' own included).
fn bird_service_off(n: usize) -> Result<()> {
    begin(n, "packaged bird service stopped and disabled");
    let mut actions = Vec::new();
    if Path::new("/run/systemd/system").is_dir() {
        // systemd is the init: it knows the unit's state and stops only its own cgroup.
        let state = |what: &str| {
            exec::probe(Command::new("systemctl").args([what, BIRD_SERVICE]))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        if state("is-enabled") == "enabled" {
            exec::capture(Command::new("systemctl").args(["disable", BIRD_SERVICE]))?;
            actions.push("disabled the systemd unit");
        }
        if state("is-active") == "active" {
            exec::capture(Command::new("systemctl").args(["stop", BIRD_SERVICE]))?;
            actions.push("stopped the systemd unit");
        }
    } else {
        if sysv_start_links()? {
            exec::capture(Command::new("update-rc.d").args([BIRD_SERVICE, "disable"]))?;
            actions.push("disabled the init script");
        }
        // Started by the init script, it answers on the package's default socket.
        if Path::new(BIRD_PACKAGE_SOCKET).exists()
            && exec::probe(Command::new("birdc").args(["-s", BIRD_PACKAGE_SOCKET, "down"]))
                .is_some()
        {
            actions.push("stopped the running instance");
        }
    }
    if actions.is_empty() {
        done("already");
    } else {
        done(&actions.join(", "));
    }
    Ok(())
}

/// Whether a SysV runlevel directory still starts the bird init script.
fn sysv_start_links() -> Result<bool> {
    for level in 2..=5 {
        let dir = PathBuf::from(format!("/etc/rc{level}.d"));
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for entry in entries {
            let name = entry
                .with_context(|| format!("listing {}", dir.display()))?
                .file_name();
            if is_start_link(&name.to_string_lossy()) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Whether a runlevel entry name (`S01bird`) starts the bird service.
fn is_start_link(name: &str) -> bool {
    name.strip_prefix('S')
        .map(|rest| rest.trim_start_matches(|c: char| c.is_ascii_digit()))
        == Some(BIRD_SERVICE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_listing_is_read_per_package() {
        let listed = "ethtool installed\nllvm-22-dev not-installed\nlibllvm22:amd64 installed\n";
        let wanted = &["ethtool", "llvm-22-dev", "libllvm22", "gcc"];
        assert_eq!(not_installed(listed, wanted), vec!["llvm-22-dev", "gcc"]);
    }

    #[test]
    fn only_the_bird_start_links_count() {
        assert!(is_start_link("S01bird"));
        assert!(!is_start_link("K01bird"));
        assert!(!is_start_link("S01bird6"));
        assert!(!is_start_link("S02ssh"));
    }

    #[test]
    fn rustup_components_match_with_or_without_target() {
        let installed =
            "cargo-x86_64-unknown-linux-gnu\nrust-src\nrust-std-x86_64-unknown-linux-gnu\n";
        let wanted = &["rust-src", "clippy", "rustfmt"];
        assert_eq!(
            components_missing(installed, wanted),
            vec!["clippy", "rustfmt"]
        );
        assert!(components_missing("clippy-x86_64-unknown-linux-gnu\n", &["clippy"]).is_empty());
    }
}
