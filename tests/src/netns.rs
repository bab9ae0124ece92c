//! Named network namespaces owned by a guard, and ways to run code and programs inside them.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::cleanup;
use crate::cmd;

/// Where `ip netns add` bind-mounts named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A named network namespace, deleted (with every veth inside it) when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates the namespace `name` with `ip netns add` and brings its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        if name.is_empty() || name.contains('/') || name.len() > 64 {
            bail!("invalid netns name {name:?}");
        }
        cleanup::install_signal_cleanup();
        // Recorded before it exists so a signal arriving mid-creation still removes it.
        cleanup::add_netns(name);
        if let Err(e) = cmd::ip(&["netns", "add", name]) {
            cleanup::remove_netns(name);
            return Err(e.context(format!("creating network namespace {name}")));
        }
        let ns = Self {
            name: name.to_owned(),
            path: Path::new(NETNS_RUN_DIR).join(name),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mount path (`/run/netns/NAME`) for `nsenter --net=` or `setns`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `ip -n NAME ARGS...` and returns its stdout; fails on a non-zero exit.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let out = cmd::run(Command::new("ip").arg("-n").arg(&self.name).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ip -n NAME -batch -` with one `ip` command per line of `script`.
    pub fn ip_batch(&self, script: &str) -> Result<()> {
        cmd::run_with_stdin(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            script,
        )
        .with_context(|| format!("ip batch in netns {}", self.name))?;
        Ok(())
    }

    /// Runs `ip -n NAME -j ARGS...` and parses the JSON it prints.
    pub fn ip_json<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<serde_json::Value> {
        let out = cmd::run(Command::new("ip").args(["-n", &self.name, "-j"]).args(args))?;
        // `ip -j` prints nothing at all for an empty result.
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Value::Array(Vec::new()));
        }
        serde_json::from_slice(&out.stdout).context("parsing `ip -j` output")
    }

    /// A `Command` that runs `program` inside the namespace via `nsenter --net=` (keeps the host's bpffs).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `argv` inside the namespace and returns its output whatever the exit status.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().context("empty command line")?;
        cmd::run_unchecked(self.command(program).args(args))
    }

    /// Runs `argv` inside the namespace; fails with its stderr tail on a non-zero exit.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().context("empty command line")?;
        let out = cmd::run(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `argv` inside the namespace in the background, output going to a log file.
    pub fn spawn(&self, argv: &[&str]) -> Result<NsChild> {
        let (program, args) = argv.split_first().context("empty command line")?;
        let mut command = self.command(program);
        command.args(args);
        NsChild::spawn(command)
    }

    /// Runs `f` on a fresh thread that has joined this namespace; sockets it creates stay in it.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send,
        T: Send,
    {
        run_in(&self.path, f)
    }

    /// Sets sysctls (`net.ipv4.tcp_tw_reuse`-style keys) inside the namespace.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<()> {
        self.run(|| {
            for (key, value) in settings {
                // /proc/sys/net resolves against the calling thread's namespace.
                let file = Path::new("/proc/sys").join(key.replace('.', "/"));
                fs::write(&file, value)
                    .with_context(|| format!("setting {key}={value} in netns {}", self.name))?;
            }
            Ok(())
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = cmd::ip(&["netns", "del", &self.name]) {
            eprintln!("xlb-tests: cannot delete netns {}: {e:#}", self.name);
        }
        cleanup::remove_netns(&self.name);
    }
}

/// SIGKILLs every process whose network namespace is the one bound at `path` (what a
/// crashed test run left running in it: deleting the name would not end them, and they
/// would keep the namespace alive); returns how many.
pub fn kill_processes_in(path: &Path) -> Result<usize> {
    use std::os::unix::fs::MetadataExt as _;
    let ns = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let me = std::process::id();
    let mut killed = 0;
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that exits meanwhile has no ns link any more: skip it.
        let Ok(meta) = fs::metadata(entry.path().join("ns/net")) else {
            continue;
        };
        if pid != me && meta.ino() == ns.ino() && meta.dev() == ns.dev() {
            // SAFETY: kill(2) has no memory effects; the pid was just seen in that namespace.
            if unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    Ok(killed)
}

/// Moves the calling thread into the network namespace bound at `path`.
pub fn enter(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns(2) on a valid open fd; it only changes this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setns into {}", path.display()));
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside the namespace at `path`; a panic in `f` is re-raised here.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send,
    T: Send,
{
    // A fresh thread, because a thread that joined another namespace must not go back to
    // serving unrelated work (the test harness reuses its threads).
    thread::scope(|s| {
        let handle = s.spawn(|| {
            enter(path)?;
            f()
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Numbers the log files of children in this process.
static CHILD_SEQ: AtomicUsize = AtomicUsize::new(0);

/// How long a child gets after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// A background process started in a namespace; terminated and reaped when dropped.
#[derive(Debug)]
pub struct NsChild {
    child: Option<Child>,
    describe: String,
    log: PathBuf,
}

impl NsChild {
    /// Spawns `command` with stdout and stderr going to a fresh log file.
    pub fn spawn(mut command: Command) -> Result<Self> {
        let describe = cmd::describe(&command);
        let seq = CHILD_SEQ.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("xlb-tests-{}-{seq}.log", std::process::id()));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating log file handle")?;
        cleanup::install_signal_cleanup();
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start `{describe}`"))?;
        cleanup::add_pid(child.id() as i32);
        Ok(Self {
            child: Some(child),
            describe,
            log,
        })
    }

    /// The process id (nsenter execs the program, so this is the program itself).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What everything the child printed so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Path of the log file (removed when the child is dropped).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) without waiting; [`NsChild::wait_timeout`] reaps.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("`{}` was already reaped", self.describe))?;
        // SAFETY: kill(2) on our own unreaped child (its pid cannot be reused yet).
        if unsafe { libc::kill(child.id() as i32, signal) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("signalling `{}`", self.describe));
        }
        Ok(())
    }

    /// Returns the exit status if the child has exited, `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c
                .try_wait()
                .with_context(|| format!("polling `{}`", self.describe)),
            None => bail!("`{}` was already reaped", self.describe),
        }
    }

    /// Waits up to `timeout` for the child to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("`{}` still running after {timeout:?}", self.describe);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM, waits for exit (SIGKILL after a grace period) and returns status and log.
    pub fn stop(mut self) -> Result<(ExitStatus, String)> {
        let status = self.terminate()?;
        Ok((status, self.log()))
    }

    /// Kills the child with SIGKILL (no chance to clean up, like a crash), reaps it and
    /// returns its status and log.
    pub fn kill_hard(mut self) -> Result<(ExitStatus, String)> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("`{}` was already reaped", self.describe))?;
        let pid = child.id() as i32;
        let result = child.kill().and_then(|()| child.wait());
        cleanup::remove_pid(pid);
        let status = result.with_context(|| format!("killing `{}`", self.describe))?;
        Ok((status, self.log()))
    }

    /// Terminates and reaps the child; idempotent.
    fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("`{}` was already reaped", self.describe))?;
        let pid = child.id() as i32;
        let result = (|| {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            // SAFETY: kill(2) on our own unreaped child; no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + TERM_GRACE;
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait()? {
                    return Ok(status);
                }
                thread::sleep(Duration::from_millis(20));
            }
            child.kill()?;
            child.wait()
        })();
        cleanup::remove_pid(pid);
        result.with_context(|| format!("stopping `{}`", self.describe))
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(e) = self.terminate() {
                eprintln!("xlb-tests: {e:#}");
            }
        }
        // A failing test is easier to read with the daemon's own words next to the panic.
        if thread::panicking() {
            eprintln!(
                "xlb-tests: log of `{}`:\n{}",
                self.describe,
                cmd::tail(self.log().as_bytes())
            );
        }
        let _ = fs::remove_file(&self.log);
    }
}
