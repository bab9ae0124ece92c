//! The bench's contenders — xlb, nftables DNAT, HAProxy and nginx (and, for part 4, no load
//! balancer at all) — defined once: what each is called and needs, how it is started, and how
//! it is stopped again. Parts 4 (peers) and 5 (failover) pick a [`Lineup`] of them; where the
//! parts differ (`xlb run` or `xlb daemon` with health checks, HAProxy's check options) the
//! lineup says which.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::progress;
use crate::{
    Lab, NetNs, NsChild, cmd,
    daemon::{Daemon, HealthOptions, daemon_config},
    driver::{self, Mode},
    servers::HTTP_PORT,
};

/// Fixed `jhash` seed: without one nftables picks a new seed at every load.
pub(super) const JHASH_SEED: u32 = 0x5eed_0b1b;
/// nftables table in the LB namespace (the DNAT contender).
const LB_TABLE: &str = "xlb_bench_dnat";
/// How long a contender gets to come up (xlb daemon: its checks to see every backend up)
/// and to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The xlb service whose health the daemon contender waits for (HTTP on the IPv4 VIP).
const XLB_SERVICE: &str = "http-v4";
/// HAProxy threads and nginx workers (one per core of these machines).
pub(super) const PROXY_THREADS: usize = 2;
/// HAProxy's `maxconn`: well below `ulimit -n` (20000 here), which it must fit under.
pub(super) const HAPROXY_MAXCONN: usize = 4000;
/// Where Debian's nginx keeps the stream module.
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// Debian packages and the program each provides (an absolute path: checked by file).
pub(super) const PACKAGES: &[(&str, &str)] = &[
    ("wrk", "wrk"),
    ("nftables", "nft"),
    ("haproxy", "haproxy"),
    ("nginx", "nginx"),
    ("libnginx-mod-stream", NGINX_STREAM_MODULE),
];

/// One load balancer (or none) the bench measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Contender {
    /// No load balancer: the client talks to b1 straight (part 4's ceiling).
    NoLb,
    /// `xlb run`: the dataplane attached with the lab config, no daemon, no health checks.
    XlbRun,
    /// `xlb daemon` with HTTP health checks ([`HealthOptions::default`]).
    XlbDaemon,
    /// nftables DNAT by `jhash ip saddr` plus SNAT.
    Nft,
    /// HAProxy in TCP mode, sticky on the source address.
    Haproxy,
    /// nginx stream with `hash $remote_addr consistent`.
    Nginx,
}

impl Contender {
    /// Its name in the report's rows.
    pub(super) fn name(self) -> &'static str {
        match self {
            Contender::NoLb => "no load balancer (client → b1)",
            Contender::XlbRun => "xlb (native XDP)",
            Contender::XlbDaemon => "xlb daemon (native XDP)",
            Contender::Nft => "nftables DNAT jhash + SNAT",
            Contender::Haproxy => "HAProxy TCP, stick on src",
            Contender::Nginx => "nginx stream, hash consistent",
        }
    }

    /// The programs (or files) it needs besides the xlb binary.
    fn needs(self) -> &'static [&'static str] {
        match self {
            Contender::NoLb | Contender::XlbRun | Contender::XlbDaemon => &[],
            Contender::Nft => &["nft"],
            Contender::Haproxy => &["haproxy"],
            Contender::Nginx => &["nginx", NGINX_STREAM_MODULE],
        }
    }

    /// Whether it runs the xlb binary.
    fn is_xlb(self) -> bool {
        matches!(self, Contender::XlbRun | Contender::XlbDaemon)
    }
}

/// The contenders of one part, in the order they run within a round, and how they are
/// configured where parts differ.
pub(super) struct Lineup {
    /// The contenders, in order.
    pub(super) all: &'static [Contender],
    /// HAProxy's per-server health-check arguments, e.g. `check inter 500ms fall 2 rise 2`.
    pub(super) haproxy_check: &'static str,
}

impl Lineup {
    /// The contenders that cannot run here, with the reason; `missing` is why installing
    /// packages failed, if it did ([`ensure_packages`]).
    pub(super) fn unavailable(&self, missing: Option<&str>) -> Vec<(Contender, String)> {
        let mut failed = Vec::new();
        for &c in self.all {
            if let Some(t) = c.needs().iter().find(|t| !have(t)) {
                let why = missing.unwrap_or("not installed");
                failed.push((c, format!("{t} is missing: {why}")));
            }
        }
        if let Err(e) = driver::xlb_bin() {
            for &c in self.all.iter().filter(|c| c.is_xlb()) {
                failed.push((c, format!("{e:#}")));
            }
        }
        failed
    }

    /// Starts contender `c` in `lab`; it is running (xlb daemon: every backend up) when this
    /// returns, and whatever a failed start left behind is already undone.
    pub(super) fn start<'a>(&self, lab: &'a Lab, c: Contender) -> Result<Running<'a>> {
        Ok(match c {
            Contender::NoLb => Running::Nothing,
            Contender::XlbRun => {
                let config = lab.work_dir().join("xlb-run.toml");
                fs::write(&config, driver::lab_config(lab, Mode::Native))
                    .with_context(|| format!("writing {}", config.display()))?;
                Running::Xlb {
                    daemon: None,
                    attached: XlbAttached::attach(lab, &config)?,
                }
            }
            Contender::XlbDaemon => {
                let config = lab.work_dir().join("xlb-failover.toml");
                let text = daemon_config(
                    lab,
                    Mode::Native,
                    lab.backends.len(),
                    &HealthOptions::default(),
                );
                fs::write(&config, text)
                    .with_context(|| format!("writing {}", config.display()))?;
                // Taken first: a daemon that attached and then failed is detached too.
                let attached = XlbAttached::guard(lab, &config)?;
                let daemon = Daemon::start(lab, &config)?;
                for b in &lab.backends {
                    daemon.wait_backend(lab, XLB_SERVICE, &b.name, READY_TIMEOUT, |v| {
                        v["health"] == "up"
                    })?;
                }
                Running::Xlb {
                    daemon: Some(daemon),
                    attached,
                }
            }
            Contender::Nft => Running::Nft(NftDnat::load(lab)?),
            Contender::Haproxy => Running::Proxy(Proxy::haproxy(lab, self.haproxy_check)?),
            Contender::Nginx => Running::Proxy(Proxy::nginx(lab)?),
        })
    }

    /// Runs `rounds` rounds with the contenders interleaved: `measure(c, round)` for each
    /// contender not in `failed`; one that fails is added to `failed` (with the round) and
    /// left out of the later rounds. `part` names the part in the progress lines.
    pub(super) fn rounds(
        &self,
        part: &str,
        rounds: usize,
        failed: &mut Vec<(Contender, String)>,
        mut measure: impl FnMut(Contender, usize) -> Result<()>,
    ) {
        for round in 0..rounds {
            for &c in self.all {
                if failed.iter().any(|(f, _)| *f == c) {
                    continue;
                }
                progress(&format!(
                    "{part}: round {}/{rounds}: {}",
                    round + 1,
                    c.name()
                ));
                if let Err(e) = measure(c, round) {
                    progress(&format!("{part}: {} failed: {e:#}", c.name()));
                    failed.push((c, format!("round {}: {e:#}", round + 1)));
                }
            }
        }
    }

    /// What contender `c` does to notice a dead backend, for the failover table.
    pub(super) fn health_checks(&self, c: Contender) -> String {
        let h = HealthOptions::default();
        match c {
            Contender::NoLb => "none (no load balancer)".to_owned(),
            Contender::XlbRun => "none (`xlb run` has no health checks)".to_owned(),
            Contender::XlbDaemon => format!(
                "active: HTTP GET every {}, timeout {}, fall {}, rise {}",
                h.interval, h.timeout, h.fall, h.rise
            ),
            Contender::Nft => "none (DNAT has no notion of a dead backend)".to_owned(),
            Contender::Haproxy => format!("active: TCP connect, `{}`", self.haproxy_check),
            Contender::Nginx => {
                "passive only: `max_fails=1 fail_timeout=2s`, retries the next server".to_owned()
            }
        }
    }
}

/// A started contender; [`Running::stop`] or dropping it stops and removes everything.
pub(super) enum Running<'a> {
    /// No load balancer: nothing to stop.
    Nothing,
    /// The daemon is stopped first (fields drop in order), then the dataplane it (or `xlb
    /// run`) left attached is detached.
    Xlb {
        /// `xlb daemon`, if the contender runs one.
        daemon: Option<Daemon>,
        /// Detaches the dataplane.
        attached: XlbAttached<'a>,
    },
    /// The nftables rules.
    Nft(NftDnat<'a>),
    /// HAProxy or nginx.
    Proxy(Proxy),
}

impl Running<'_> {
    /// The xlb daemon, if this contender runs one.
    pub(super) fn daemon(&self) -> Option<&Daemon> {
        match self {
            Running::Xlb { daemon, .. } => daemon.as_ref(),
            _ => None,
        }
    }

    /// Stops it, reporting an error that dropping would only print.
    pub(super) fn stop(self) -> Result<()> {
        match self {
            Running::Nothing => Ok(()),
            Running::Xlb {
                mut daemon,
                mut attached,
            } => {
                let stopped = match daemon.take() {
                    Some(d) => d.child.stop().map(|_| ()),
                    None => Ok(()),
                };
                let detached = attached.detach();
                stopped.and(detached)
            }
            Running::Nft(mut n) => n.unload(),
            Running::Proxy(p) => p.stop(),
        }
    }
}

/// Turns TIME_WAIT off on every backend of `lab`.
///
/// The backends close first, so each request leaves a TIME_WAIT socket there for 60 s.
/// Behind SNAT (nftables; also HAProxy's and nginx's own connections) the same
/// LB-address:port tuples come back with another sender's TCP timestamps, PAWS rejects the
/// SYN, and the client stalls a second per retry: a run would measure leftovers of earlier
/// contenders. Without TIME_WAIT on the backends every contender starts clean.
pub(super) fn no_time_wait_on_backends(lab: &Lab) -> Result<()> {
    for b in &lab.backends {
        b.netns.sysctls(&[("net.ipv4.tcp_max_tw_buckets", "0")])?;
    }
    Ok(())
}

/// Polls one HTTP GET from the client namespace until it is answered.
pub(super) fn wait_served(lab: &Lab, target: IpAddr) -> Result<()> {
    let src = IpAddr::V4(*lab.client_v4.first().context("no client address")?);
    cmd::wait_until(
        &format!("an answer from {target}"),
        READY_TIMEOUT,
        Duration::from_millis(100),
        || Ok(lab.http_get(src, target, HTTP_PORT).is_ok()),
    )
}

/// xlb attached to `lb0` with a config; detached on drop.
pub(super) struct XlbAttached<'a> {
    lab: &'a Lab,
    config: String,
    attached: bool,
}

impl<'a> XlbAttached<'a> {
    /// `xlb run` with `config`: the dataplane attached, no daemon.
    fn attach(lab: &'a Lab, config: &Path) -> Result<Self> {
        // The guard exists before `run`, so a half-done attach is detached too.
        let me = Self::guard(lab, config)?;
        driver::xlb(lab, &["run", "--config", &me.config])?;
        Ok(me)
    }

    /// A guard that detaches whatever xlb attaches with `config` (by `xlb run` or by a
    /// daemon, which leaves the dataplane attached when it exits); takes it before starting.
    fn guard(lab: &'a Lab, config: &Path) -> Result<Self> {
        let config = config
            .to_str()
            .context("config path is not UTF-8")?
            .to_owned();
        Ok(Self {
            lab,
            config,
            attached: true,
        })
    }

    /// Detaches xlb and removes its pins; idempotent.
    fn detach(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.attached) {
            return Ok(());
        }
        driver::xlb(self.lab, &["detach", "--config", &self.config]).map(|_| ())
    }
}

impl Drop for XlbAttached<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            eprintln!("bench: detaching xlb: {e:#}");
        }
    }
}

/// Loads `script` into a namespace's nftables after deleting `table` (re-loading would
/// append duplicate rules), and shortens conntrack's TIME_WAIT there so connection-per-
/// request runs do not pile up entries across rounds.
pub(super) fn nft_load(ns: &NetNs, table: &str, script: &str) -> Result<()> {
    // Creating the table first makes the delete valid whether or not it existed.
    let full = format!("table ip {table}\ndelete table ip {table}\n{script}");
    cmd::run_with_stdin(ns.command("nft").args(["-f", "-"]), &full)
        .with_context(|| format!("loading nftables table {table} in {}", ns.name()))?;
    ns.sysctls(&[("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1")])
}

/// Deletes an nftables table (ignoring one that is already gone).
pub(super) fn nft_delete(ns: &NetNs, table: &str) -> Result<()> {
    let out = ns.exec(&["nft", "delete", "table", "ip", table])?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || err.contains("No such file") {
        return Ok(());
    }
    bail!("nft delete table {table} in {}: {}", ns.name(), err.trim())
}

/// `0 : a, 1 : b, ...` for an nftables verdict-free map.
pub(super) fn map_list(addrs: &[Ipv4Addr]) -> String {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{i} : {a}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The nftables contender: DNAT by `jhash ip saddr` in the LB namespace, SNAT to the LB's
/// own address (clients and backends share the bridge: without it replies would go straight
/// back and miss the reverse NAT), forwarding on; undone on drop.
pub(super) struct NftDnat<'a> {
    lab: &'a Lab,
    loaded: bool,
}

impl<'a> NftDnat<'a> {
    /// Loads the DNAT and SNAT rules and turns forwarding on in the LB namespace.
    fn load(lab: &'a Lab) -> Result<Self> {
        let backends: Vec<Ipv4Addr> = lab.backends.iter().map(|b| b.ipv4).collect();
        let list = backends
            .iter()
            .map(Ipv4Addr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let script = format!(
            "table ip {LB_TABLE} {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
             ip daddr {vip} tcp dport {HTTP_PORT} dnat to jhash ip saddr mod {n} seed {JHASH_SEED:#x} map {{ {map} }}\n }}\n \
             chain post {{\n  type nat hook postrouting priority srcnat; policy accept;\n  \
             ct status dnat ip daddr {{ {list} }} tcp dport {HTTP_PORT} snat to {own}\n }}\n}}\n",
            vip = lab.vip4,
            n = backends.len(),
            map = map_list(&backends),
            own = lab.lb_ipv4,
        );
        let mut me = Self { lab, loaded: true };
        lab.lb.sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            // Out the interface it came in on: the kernel would send ICMP redirects.
            ("net.ipv4.conf.all.send_redirects", "0"),
            (&format!("net.ipv4.conf.{}.send_redirects", lab.lb_if), "0"),
        ])?;
        if let Err(e) = nft_load(&lab.lb, LB_TABLE, &script) {
            let _ = me.unload();
            return Err(e);
        }
        Ok(me)
    }

    /// Deletes the rules and turns forwarding off again; idempotent.
    fn unload(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.loaded) {
            return Ok(());
        }
        let deleted = nft_delete(&self.lab.lb, LB_TABLE);
        // The lab's LB namespace does not forward: the other contenders must not either.
        self.lab.lb.sysctls(&[("net.ipv4.ip_forward", "0")])?;
        deleted
    }
}

impl Drop for NftDnat<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.unload() {
            eprintln!("bench: {e:#}");
        }
    }
}

/// A proxy process (HAProxy or nginx) in the LB namespace, its config files, and the worker
/// processes it forked; all stopped (by PID) and removed on drop.
pub(super) struct Proxy {
    child: Option<NsChild>,
    files: Vec<PathBuf>,
}

impl Proxy {
    /// HAProxy in TCP mode, sticky on the source address, each server with the health-check
    /// arguments `check` (e.g. `check inter 500ms fall 2 rise 2`).
    fn haproxy(lab: &Lab, check: &str) -> Result<Self> {
        let mut servers = String::new();
        for b in &lab.backends {
            servers.push_str(&format!(
                "    server {} {}:{HTTP_PORT} {check}\n",
                b.name, b.ipv4
            ));
        }
        let cfg = format!(
            "global\n    maxconn {HAPROXY_MAXCONN}\n    nbthread {PROXY_THREADS}\n\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n    timeout check 1s\n\n\
             frontend vip\n    bind {vip}:{HTTP_PORT}\n    default_backend web\n\n\
             backend web\n    balance roundrobin\n    stick-table type ip size 1m expire 30m\n    stick on src\n{servers}",
            vip = lab.vip4
        );
        let path = std::env::temp_dir().join(format!("{}-haproxy.cfg", lab.id));
        let mut me = Self {
            child: None,
            files: vec![path.clone()],
        };
        fs::write(&path, cfg).with_context(|| format!("writing {}", path.display()))?;
        let p = path.to_str().context("temp path is not UTF-8")?;
        // -db: stay in the foreground, so the PID we hold is HAProxy itself.
        me.child = Some(lab.spawn_in_lb(&["haproxy", "-db", "-f", p])?);
        me.check_alive("haproxy")?;
        Ok(me)
    }

    /// nginx stream with `hash $remote_addr consistent` and passive checks only.
    fn nginx(lab: &Lab) -> Result<Self> {
        let base = std::env::temp_dir().join(format!("{}-nginx", lab.id));
        let conf = base.with_extension("conf");
        let pid = base.with_extension("pid");
        let log = base.with_extension("log");
        let mut servers = String::new();
        for b in &lab.backends {
            // Open-source nginx has passive checks only: a failed connect takes the server
            // out for fail_timeout.
            servers.push_str(&format!(
                "    server {}:{HTTP_PORT} max_fails=1 fail_timeout=2s;\n",
                b.ipv4
            ));
        }
        let cfg = format!(
            "load_module {NGINX_STREAM_MODULE};\nworker_processes {PROXY_THREADS};\ndaemon off;\n\
             pid {pid};\nerror_log {log} warn;\nevents {{ worker_connections 4096; }}\n\
             stream {{\n  upstream web {{\n    hash $remote_addr consistent;\n{servers}  }}\n  \
             server {{\n    listen {vip}:{HTTP_PORT};\n    proxy_pass web;\n    proxy_connect_timeout 1s;\n  }}\n}}\n",
            pid = pid.display(),
            log = log.display(),
            vip = lab.vip4,
        );
        let mut me = Self {
            child: None,
            files: vec![conf.clone(), pid, log.clone()],
        };
        fs::write(&conf, cfg).with_context(|| format!("writing {}", conf.display()))?;
        let conf = conf.to_str().context("temp path is not UTF-8")?;
        let log = log.to_str().context("temp path is not UTF-8")?;
        let prefix = std::env::temp_dir();
        let prefix = prefix.to_str().context("temp path is not UTF-8")?;
        // -e: the error log before the config is read (the default is under /var/log).
        me.child = Some(lab.spawn_in_lb(&["nginx", "-e", log, "-p", prefix, "-c", conf])?);
        me.check_alive("nginx")?;
        Ok(me)
    }

    /// Fails with the log if the process exited right away (a config it rejected).
    fn check_alive(&mut self, what: &str) -> Result<()> {
        std::thread::sleep(Duration::from_millis(200));
        let child = self.child.as_mut().context("no process")?;
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited at once ({status}):\n{}",
                cmd::tail(child.log().as_bytes())
            );
        }
        Ok(())
    }

    /// Stops the proxy and its workers, reporting an error that dropping would only print.
    fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(child) = self.child.take() else {
            return Ok(());
        };
        // Workers are forked by the master: note their PIDs before it goes, and kill any
        // that outlive it.
        let workers = children(child.pid());
        let result = child.stop().map(|_| ());
        for pid in workers {
            if Path::new(&format!("/proc/{pid}")).exists() {
                // SAFETY: kill(2) on a PID our own child forked; no memory is involved.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
        result
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("bench: {e:#}");
        }
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
    }
}

/// Child PIDs of `pid` (from /proc; empty if it cannot be read).
fn children(pid: u32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Whether `tool` is a program on PATH, or (given as an absolute path) an existing file.
pub(super) fn have(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file())
}

/// Installs the Debian packages whose program is missing; returns why that failed, if it did.
pub(super) fn ensure_packages() -> Option<String> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, tool)| !have(tool))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return None;
    }
    progress(&format!("installing {}", missing.join(" ")));
    // Installing must not start host-wide nginx/HAProxy services listening on port 80:
    // a policy-rc.d that refuses starts, present only for the install.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let _policy = if policy.exists() {
        None
    } else {
        match fs::write(policy, "#!/bin/sh\nexit 101\n").and_then(|()| {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(policy, fs::Permissions::from_mode(0o755))
        }) {
            Ok(()) => Some(RemoveOnDrop(policy.to_owned())),
            Err(e) => return Some(format!("cannot write {}: {e}", policy.display())),
        }
    };
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
    };
    let mut status = install();
    if !matches!(status, Ok(s) if s.success()) {
        // A stale or absent package list is the usual cause.
        progress("apt-get install failed; apt-get update and one retry");
        let _ = Command::new("apt-get")
            .args(["update", "-q"])
            .stdin(Stdio::null())
            .status();
        status = install();
    }
    match status {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!(
            "apt-get install {} failed ({s})",
            missing.join(" ")
        )),
        Err(e) => Some(format!("cannot run apt-get: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every contender, for the tests.
    const EVERY: [Contender; 6] = [
        Contender::NoLb,
        Contender::XlbRun,
        Contender::XlbDaemon,
        Contender::Nft,
        Contender::Haproxy,
        Contender::Nginx,
    ];

    #[test]
    fn names_tell_contenders_apart() {
        // The parts match runs to rows (and drop a failed contender's runs) by name.
        for a in EVERY {
            for b in EVERY {
                assert_eq!(a == b, a.name() == b.name(), "{a:?} and {b:?}");
            }
        }
    }

    #[test]
    fn health_checks_follow_the_lineup() {
        let lineup = |check| Lineup {
            all: &EVERY,
            haproxy_check: check,
        };
        let h = HealthOptions::default();
        let xlb = lineup("check").health_checks(Contender::XlbDaemon);
        assert!(
            xlb.contains(h.interval) && xlb.contains(&format!("fall {}", h.fall)),
            "{xlb}"
        );
        assert_eq!(
            lineup("check inter 1s fall 9").health_checks(Contender::Haproxy),
            "active: TCP connect, `check inter 1s fall 9`"
        );
        // Every contender that needs a package is one ensure_packages can install.
        for c in EVERY {
            for t in c.needs() {
                assert!(PACKAGES.iter().any(|(_, p)| p == t), "{c:?} needs {t}");
            }
        }
    }
}
