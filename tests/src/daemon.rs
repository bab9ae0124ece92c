//! Driving `xlb daemon` inside a lab: a config with health checks, the
//! daemon process (socket and state file in the lab's private directory),
//! and `xlb --json` control calls decoded for assertions.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{
    Lab, LabOptions, NetNs, NsChild, Proto, Servers,
    driver::{self, Mapping, Mode},
    who_serves,
};

/// The services of [`daemon_config`], in config order.
pub const SERVICES: [&str; 4] = ["http-v4", "echo-v4", "http-v6", "echo-v6"];
/// Both protocols the lab's servers answer.
pub const PROTOS: [Proto; 2] = [Proto::Tcp, Proto::Udp];
/// How long [`Daemon::wait_all`] waits for each service.
const WAIT_ALL: Duration = Duration::from_secs(15);

/// How long a daemon gets to answer on its socket after starting.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Health-check settings written into every service of a daemon config.
#[derive(Clone, Debug)]
pub struct HealthOptions {
    /// `interval`, e.g. "500ms".
    pub interval: &'static str,
    /// `timeout`.
    pub timeout: &'static str,
    /// `rise`.
    pub rise: u32,
    /// `fall`.
    pub fall: u32,
}

impl Default for HealthOptions {
    fn default() -> Self {
        // Fast enough for tests; the logic is the same as with HAProxy's defaults.
        Self {
            interval: "500ms",
            timeout: "300ms",
            rise: 2,
            fall: 3,
        }
    }
}

/// The lab config (both VIPs, HTTP and UDP, the first `backends` lab backends) with
/// HTTP/UDP health checks, a small Maglev table and the state file in the work dir.
pub fn daemon_config(lab: &Lab, mode: Mode, backends: usize, health: &HealthOptions) -> String {
    let mut text = driver::lab_config(lab, mode);
    // Only the first `backends`: drop [[service.backend]] blocks of the others.
    for b in lab.backends.iter().skip(backends) {
        for vip in lab.vips() {
            text = text.replace(&driver::backend_block(b, vip), "");
        }
    }
    let mut out = format!(
        "state_file = \"{}\"\nmaglev_table_size = 4099\n",
        lab.work_dir().join("state.json").display()
    );
    let mut parts = text.split("\n[[service]]\n");
    out.push_str(parts.next().unwrap_or_default());
    for block in parts {
        out.push_str("\n[[service]]\n");
        out.push_str(block);
        let kind = if block.contains("protocol = \"tcp\"") {
            "kind = \"http\"\nhttp_path = \"/\"\n"
        } else {
            "kind = \"udp\"\n"
        };
        // After the backends: [service.health] belongs to the last [[service]].
        out.push_str(&format!(
            "\n[service.health]\n{kind}interval = \"{}\"\ntimeout = \"{}\"\nrise = {}\nfall = {}\n",
            health.interval, health.timeout, health.rise, health.fall
        ));
    }
    out
}

/// Panics unless the tests run as root (they create namespaces and load XDP).
pub fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("daemon tests create namespaces and load XDP: run `cargo xtask test` as root");
    }
}

/// A lab with servers and a running daemon over its first `backends` backends, the
/// config written to `<work dir>/xlb.toml` after passing through `edit`. Drop order of
/// the tuple (daemon, servers, lab) is the right one.
pub fn start_lab(
    tag: &str,
    opts: LabOptions,
    backends: usize,
    health: &HealthOptions,
    edit: impl Fn(String) -> String,
) -> Result<(Lab, Servers, Daemon)> {
    start_lab_with(tag, opts, backends, health, edit, &StartOptions::default())
}

/// [`start_lab`] with the daemon started under `start`.
pub fn start_lab_with(
    tag: &str,
    opts: LabOptions,
    backends: usize,
    health: &HealthOptions,
    edit: impl Fn(String) -> String,
    start: &StartOptions,
) -> Result<(Lab, Servers, Daemon)> {
    let lab = Lab::new(tag, opts).context("building the lab")?;
    let servers = Servers::start(&lab).context("starting backend servers")?;
    let config = lab.work_dir().join("xlb.toml");
    let text = daemon_config(&lab, Mode::Generic, backends, health);
    std::fs::write(&config, edit(text)).context("writing the config")?;
    let daemon = Daemon::start_with(&lab, &config, start).context("starting xlb daemon")?;
    Ok((lab, servers, daemon))
}

/// How a daemon is started, beyond its config.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Soft and hard `RLIMIT_NOFILE` of the daemon (set with `prlimit`), so it
    /// cannot raise its open-file limit above this.
    pub nofile: Option<u64>,
}

/// Which backend each of `clients` reaches over `proto` (one request each).
pub fn ask(lab: &Lab, clients: &[IpAddr], proto: Proto) -> Result<BTreeMap<IpAddr, String>> {
    clients
        .iter()
        .map(|c| {
            let name = who_serves(lab, *c, proto)
                .with_context(|| format!("request from {c} over {proto:?}"))?;
            Ok((*c, name))
        })
        .collect()
}

/// Compares two mappings: clients of `dead` must have moved, nobody else. Returns how
/// many moved.
pub fn only_moved_from(before: &Mapping, after: &Mapping, dead: &str) -> Result<usize> {
    let mut moved = 0;
    for (key, was) in before {
        let now = after
            .get(key)
            .with_context(|| format!("{key:?} missing after"))?;
        if was == dead {
            if now == dead {
                bail!("{key:?} still on the dead backend {dead}");
            }
            moved += 1;
        } else if now != was {
            bail!("{key:?} moved from the healthy backend {was} to {now}");
        }
    }
    Ok(moved)
}

/// A running `xlb daemon` in the lab's LB namespace; killed when dropped.
pub struct Daemon {
    /// The process (its log is in `child.log()`).
    pub child: NsChild,
    /// Control socket.
    pub socket: PathBuf,
    /// Config file.
    pub config: PathBuf,
}

impl Daemon {
    /// Writes nothing; starts `xlb daemon --config CONFIG --socket <work dir>/xlb.sock` and
    /// waits until it answers `status`.
    pub fn start(lab: &Lab, config: &Path) -> Result<Self> {
        Self::start_with(lab, config, &StartOptions::default())
    }

    /// Starts `xlb daemon --config CONFIG --socket <work dir>/xlb.sock` under `opts`
    /// without waiting for anything: for daemons expected to fail.
    pub fn spawn(lab: &Lab, config: &Path, opts: &StartOptions) -> Result<NsChild> {
        spawn_in(&lab.lb, &socket_path(lab), config, opts)
    }

    /// [`Daemon::start`] under `opts`.
    pub fn start_with(lab: &Lab, config: &Path, opts: &StartOptions) -> Result<Self> {
        let socket = socket_path(lab);
        let child = start_in(&lab.lb, &socket, config, opts)?;
        Ok(Self {
            child,
            socket,
            config: config.to_path_buf(),
        })
    }

    /// Runs `xlb --socket S --json ARGS` and parses its JSON; fails with the output if it fails.
    pub fn ctl(&self, lab: &Lab, args: &[&str]) -> Result<serde_json::Value> {
        let out = ctl_output(lab, &self.socket, args)?;
        if !out.status.success() {
            bail!(
                "xlb {} failed ({}): {}{}\ndaemon log:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                crate::cmd::tail(self.child.log().as_bytes())
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("xlb {} --json printed no JSON", args.join(" ")))
    }

    /// `xlb backend list --json` as (service, backend) -> the backend's JSON object.
    pub fn backend(&self, lab: &Lab, service: &str, backend: &str) -> Result<serde_json::Value> {
        let list = self.ctl(lab, &["backend", "list", service])?;
        list.as_array()
            .and_then(|l| l.iter().find(|b| b["name"] == backend))
            .cloned()
            .with_context(|| format!("backend {service}/{backend} not listed: {list}"))
    }

    /// Polls until `pred` holds for backend `service/backend`, at most `timeout`; returns
    /// how long it took.
    pub fn wait_backend(
        &self,
        lab: &Lab,
        service: &str,
        backend: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let b = self.backend(lab, service, backend)?;
            if pred(&b) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("{service}/{backend} not as expected within {timeout:?}: {b}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `backend` has `field == value` in every service of [`SERVICES`];
    /// returns how long it took.
    pub fn wait_all(&self, lab: &Lab, backend: &str, field: &str, value: &str) -> Result<Duration> {
        let start = Instant::now();
        for svc in SERVICES {
            self.wait_backend(lab, svc, backend, WAIT_ALL, |b| b[field] == value)
                .with_context(|| {
                    format!(
                        "daemon log:\n{}",
                        crate::cmd::tail(self.child.log().as_bytes())
                    )
                })?;
        }
        Ok(start.elapsed())
    }

    /// `xlb status --json`.
    pub fn status(&self, lab: &Lab) -> Result<serde_json::Value> {
        self.ctl(lab, &["status"])
    }
}

/// The control socket of a lab's daemon: `<work dir>/xlb.sock`.
pub fn socket_path(lab: &Lab) -> PathBuf {
    lab.work_dir().join("xlb.sock")
}

/// Runs `xlb --socket S --json ARGS` in the LB namespace; the status is not checked.
pub fn ctl_output(lab: &Lab, socket: &Path, args: &[&str]) -> Result<Output> {
    ctl_output_in(&lab.lb, socket, args)
}

/// Runs `xlb --socket S --json ARGS` in `ns`; the status is not checked.
pub fn ctl_output_in(ns: &NetNs, socket: &Path, args: &[&str]) -> Result<Output> {
    let bin = driver::xlb_bin()?;
    let mut argv = vec![
        bin.to_str().context("xlb path is not UTF-8")?,
        "--socket",
        socket.to_str().context("socket path is not UTF-8")?,
        "--json",
    ];
    argv.extend_from_slice(args);
    ns.exec(&argv)
}

/// Runs `xlb --socket S --json ARGS` in `ns` and parses its JSON; fails with its output.
pub fn ctl_in(ns: &NetNs, socket: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = ctl_output_in(ns, socket, args)?;
    if !out.status.success() {
        bail!(
            "xlb {} in {} failed ({}): {}{}",
            args.join(" "),
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("xlb {} --json printed no JSON", args.join(" ")))
}

/// Starts `xlb --socket SOCKET daemon --config CONFIG` in `ns` under `opts` without
/// waiting for anything.
pub fn spawn_in(ns: &NetNs, socket: &Path, config: &Path, opts: &StartOptions) -> Result<NsChild> {
    let bin = driver::xlb_bin()?;
    let nofile = opts.nofile.map(|n| format!("--nofile={n}:{n}"));
    let mut argv = Vec::new();
    if let Some(limit) = &nofile {
        // prlimit execs the daemon, so the child's pid stays the daemon's.
        argv.extend(["prlimit", limit.as_str(), "--"]);
    }
    argv.extend([
        bin.to_str().context("xlb path is not UTF-8")?,
        "--socket",
        socket.to_str().context("socket path is not UTF-8")?,
        "daemon",
        "--config",
        config.to_str().context("config path is not UTF-8")?,
    ]);
    ns.spawn(&argv)
}

/// [`spawn_in`], then waits until the daemon answers `status` on `socket`.
pub fn start_in(ns: &NetNs, socket: &Path, config: &Path, opts: &StartOptions) -> Result<NsChild> {
    let mut child = spawn_in(ns, socket, config, opts)?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "xlb daemon exited ({status}) while starting:\n{}",
                child.log()
            );
        }
        if socket.exists() && ctl_output_in(ns, socket, &["status"])?.status.success() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            bail!(
                "xlb daemon did not answer within {START_TIMEOUT:?}:\n{}",
                child.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Address of the metrics endpoint the daemon tests configure: the LB's own
/// address (lo is down in the LB namespace).
pub const METRICS: &str = "10.77.0.2:9433";

/// `GET /metrics` from inside the LB namespace, the whole answer (status line
/// included); fails if nothing answers within `timeout`.
pub fn try_scrape(lab: &Lab, timeout: Duration) -> Result<String> {
    lab.lb.run(|| {
        use std::io::{Read as _, Write as _};
        let addr: std::net::SocketAddr = METRICS.parse()?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout * 2))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

/// [`try_scrape`] that must succeed.
pub fn scrape(lab: &Lab) -> String {
    match try_scrape(lab, Duration::from_secs(2)) {
        Ok(text) => text,
        Err(e) => panic!("scraping /metrics: {e:#}"),
    }
}

/// The value of the sample `name{labels}` in exposition text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
