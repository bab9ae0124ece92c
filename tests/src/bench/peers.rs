//! Part 4: xlb against its peers on the same namespaces — no load balancer (the
//! ceiling), xlb, nftables DNAT, HAProxy and nginx stream — each loaded with wrk,
//! keep-alive and connection-per-request, interleaved round by round.
//!
//! wrk cannot bind a source address, so an nftables `snat ... numgen inc` rule in the
//! client namespace spreads its connections over the lab's client addresses (the same
//! rule, so the same cost, for every contender). The NAT's own range selection is not
//! used: it hashes source and destination *addresses*, so every connection of one wrk
//! would keep a single source address.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{Budget, Series, Table, progress};
use crate::{
    Lab, LabOptions, NetNs, NsChild, Servers, cmd,
    driver::{self, Mode},
    servers::HTTP_PORT,
};

/// Client source addresses the connections are spread over (the issue asks for ≥ 9).
const CLIENT_ADDRS: usize = 18;
/// wrk connections: two per source address, so keep-alive runs use every address.
const CONNECTIONS: usize = 36;
/// wrk threads (one per core of these machines).
const WRK_THREADS: usize = 2;
/// wrk's own per-request timeout.
const WRK_TIMEOUT: &str = "2s";
/// Slack over a run's duration before a wrk that does not end is killed.
const WRK_GRACE: Duration = Duration::from_secs(20);
/// Fixed `jhash` seed: without one nftables picks a new seed at every load.
const JHASH_SEED: u32 = 0x5eed_0b1b;
/// nftables table in the client namespace (source spreading).
const CLIENT_TABLE: &str = "xlb_bench_clients";
/// nftables table in the LB namespace (the DNAT contender).
const LB_TABLE: &str = "xlb_bench_dnat";
/// How long a contender gets to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// HAProxy's per-server health checks in this part (no failures happen here).
const HAPROXY_CHECK: &str = "check inter 500ms fall 2 rise 2";
/// HAProxy's `maxconn`: well below `ulimit -n` (20000 here), which it must fit under.
const HAPROXY_MAXCONN: usize = 4000;
/// Where Debian's nginx keeps the stream module.
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// Debian packages and the program each provides (`None`: checked by file).
const PACKAGES: &[(&str, &str)] = &[
    ("wrk", "wrk"),
    ("nftables", "nft"),
    ("haproxy", "haproxy"),
    ("nginx", "nginx"),
    ("libnginx-mod-stream", NGINX_STREAM_MODULE),
];

/// The contenders, in the order they run within a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Contender {
    NoLb,
    Xlb,
    Nft,
    Haproxy,
    Nginx,
}

impl Contender {
    const ALL: [Contender; 5] = [
        Contender::NoLb,
        Contender::Xlb,
        Contender::Nft,
        Contender::Haproxy,
        Contender::Nginx,
    ];

    fn name(self) -> &'static str {
        match self {
            Contender::NoLb => "no load balancer (client → b1)",
            Contender::Xlb => "xlb (native XDP)",
            Contender::Nft => "nftables DNAT jhash + SNAT",
            Contender::Haproxy => "HAProxy TCP, stick on src",
            Contender::Nginx => "nginx stream, hash consistent",
        }
    }

    /// Programs it needs besides wrk and nft (which every contender needs).
    pub(super) fn needs(self) -> &'static [&'static str] {
        match self {
            Contender::Haproxy => &["haproxy"],
            Contender::Nginx => &["nginx", NGINX_STREAM_MODULE],
            _ => &[],
        }
    }
}

/// How wrk uses its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnMode {
    KeepAlive,
    Close,
}

impl ConnMode {
    const ALL: [ConnMode; 2] = [ConnMode::KeepAlive, ConnMode::Close];

    fn label(self) -> &'static str {
        match self {
            ConnMode::KeepAlive => "keep-alive",
            ConnMode::Close => "connection per request",
        }
    }
}

/// One wrk run of one contender.
#[derive(Clone, Debug, Serialize)]
pub struct PeerRun {
    /// Contender name.
    pub contender: String,
    /// `keep-alive` or `connection per request`.
    pub mode: String,
    /// Round number (0-based).
    pub round: usize,
    /// wrk's Requests/sec.
    pub requests_per_sec: f64,
    /// Median latency in ms.
    pub p50_ms: f64,
    /// 99th percentile latency in ms.
    pub p99_ms: f64,
    /// Requests completed.
    pub requests: u64,
    /// Socket errors, timeouts and non-2xx answers wrk counted.
    pub errors: u64,
    /// Requests each backend answered during the run (from the servers' counters).
    pub served: Vec<(String, u64)>,
}

/// What part 4 produced.
#[derive(Debug, Default)]
pub struct PeersOutcome {
    /// One table per connection mode.
    pub tables: Vec<Table>,
    /// Every run, raw.
    pub runs: Vec<PeerRun>,
    /// Contenders that could not run, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// Runs part 4 with `budget.peer_rounds` rounds of `budget.peer_secs` seconds per run.
pub fn part4(budget: Budget) -> Result<PeersOutcome> {
    let mut out = PeersOutcome::default();
    let missing = ensure_packages();
    for tool in ["wrk", "nft"] {
        if !have(tool) {
            bail!(
                "{tool} is missing and could not be installed (apt-get install {})",
                PACKAGES
                    .iter()
                    .map(|(p, _)| *p)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    let mut failed: Vec<(Contender, String)> = Vec::new();
    for c in Contender::ALL {
        if let Some(t) = c.needs().iter().find(|t| !have(t)) {
            let why = missing
                .clone()
                .unwrap_or_else(|| "not installed".to_owned());
            failed.push((c, format!("{t} is missing: {why}")));
        }
    }
    if let Err(e) = driver::xlb_bin() {
        failed.push((Contender::Xlb, format!("{e:#}")));
    }

    let lab = Lab::new(
        "peers",
        LabOptions {
            backends: 3,
            clients_v4: CLIENT_ADDRS,
            clients_v6: 0,
        },
    )?;
    no_time_wait_on_backends(&lab)?;
    let servers = Servers::start(&lab)?;
    // xlb's native XDP_TX needs XDP on lb0's peer; it stays for every contender so lb0 has
    // the same offloads (that program turns TSO off on lb0) whoever runs.
    lab.attach_lb_peer_pass()?;
    let _spread = ClientSpread::load(&lab)?;
    let xlb_config = driver::write_lab_config(&lab, Mode::Native)?;
    let _config_file = RemoveOnDrop(xlb_config.clone());
    let mut tso: Vec<(Contender, String)> = Vec::new();

    for round in 0..budget.peer_rounds {
        for c in Contender::ALL {
            if failed.iter().any(|(f, _)| *f == c) {
                continue;
            }
            progress(&format!(
                "part 4: round {}/{}: {}",
                round + 1,
                budget.peer_rounds,
                c.name()
            ));
            match measure(&lab, &servers, c, round, budget, &xlb_config) {
                Ok((runs, offloads)) => {
                    out.runs.extend(runs);
                    if !tso.iter().any(|(t, _)| *t == c) {
                        tso.push((c, offloads));
                    }
                }
                Err(e) => {
                    progress(&format!("part 4: {} failed: {e:#}", c.name()));
                    failed.push((c, format!("round {}: {e:#}", round + 1)));
                }
            }
        }
    }

    // A contender that failed in a later round keeps no samples: rows must be comparable.
    out.runs
        .retain(|r| !failed.iter().any(|(c, _)| c.name() == r.contender));
    for (c, why) in &failed {
        out.skipped
            .push((format!("peer: {}", c.name()), why.clone()));
    }
    for mode in ConnMode::ALL {
        out.tables.push(table(&out.runs, mode, budget, &tso));
    }
    Ok(out)
}

/// Starts contender `c`, runs wrk once per connection mode and stops it again.
fn measure(
    lab: &Lab,
    servers: &Servers,
    c: Contender,
    round: usize,
    budget: Budget,
    xlb_config: &Path,
) -> Result<(Vec<PeerRun>, String)> {
    let b1 = lab.backends.first().context("the lab has no backend")?;
    let target = if c == Contender::NoLb {
        IpAddr::V4(b1.ipv4)
    } else {
        IpAddr::V4(lab.vip4)
    };
    let running = Running::start(lab, c, xlb_config)?;
    wait_served(lab, target)?;
    let offloads = offloads(lab);
    let mut runs = Vec::new();
    for mode in ConnMode::ALL {
        let before = servers.served();
        let w = wrk(lab, target, mode, budget.peer_secs)
            .with_context(|| format!("wrk {} against {}", mode.label(), c.name()))?;
        let after = servers.served();
        let served = after
            .iter()
            .map(|a| {
                let b = before
                    .iter()
                    .find(|b| b.name == a.name)
                    .map_or(0, |b| b.tcp);
                (a.name.clone(), a.tcp.saturating_sub(b))
            })
            .collect();
        runs.push(PeerRun {
            contender: c.name().to_owned(),
            mode: mode.label().to_owned(),
            round,
            requests_per_sec: w.rps,
            p50_ms: w.p50_ms,
            p99_ms: w.p99_ms,
            requests: w.requests,
            errors: w.errors,
            served,
        });
    }
    running.stop()?;
    Ok((runs, offloads))
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

/// `lb0` and `p-lb` TSO state, for the report (native XDP on one veth turns it off on the other).
fn offloads(lab: &Lab) -> String {
    let tso = |ns: &NetNs, dev: &str| -> String {
        ns.exec_ok(&["ethtool", "-k", dev])
            .ok()
            .and_then(|o| {
                o.lines()
                    .find_map(|l| l.strip_prefix("tcp-segmentation-offload:"))
                    .map(|v| v.split_whitespace().next().unwrap_or("?").to_owned())
            })
            .unwrap_or_else(|| "?".to_owned())
    };
    format!(
        "lb0 TSO {}, p-lb TSO {}",
        tso(&lab.lb, lab.lb_if),
        tso(&lab.switch, &lab.lb_peer.1)
    )
}

/// What one contender left running; dropping it stops and removes everything.
enum Running<'a> {
    Nothing,
    Xlb(XlbAttached<'a>),
    Nft(NftDnat<'a>),
    Proc(Proxy),
}

impl<'a> Running<'a> {
    fn start(lab: &'a Lab, c: Contender, xlb_config: &Path) -> Result<Self> {
        Ok(match c {
            Contender::NoLb => Running::Nothing,
            Contender::Xlb => Running::Xlb(XlbAttached::attach(lab, xlb_config)?),
            Contender::Nft => Running::Nft(NftDnat::load(lab)?),
            Contender::Haproxy => Running::Proc(Proxy::haproxy(lab, HAPROXY_CHECK)?),
            Contender::Nginx => Running::Proc(Proxy::nginx(lab)?),
        })
    }

    /// Stops it, reporting an error that dropping would only print.
    fn stop(self) -> Result<()> {
        match self {
            Running::Xlb(mut x) => x.detach(),
            Running::Nft(mut n) => n.unload(),
            Running::Proc(p) => p.stop(),
            Running::Nothing => Ok(()),
        }
    }
}

/// xlb attached to `lb0` with the lab config; detached on drop.
pub(super) struct XlbAttached<'a> {
    lab: &'a Lab,
    config: String,
    attached: bool,
}

impl<'a> XlbAttached<'a> {
    fn attach(lab: &'a Lab, config: &Path) -> Result<Self> {
        // The guard exists before `run`, so a half-done attach is detached too.
        let me = Self::guard(lab, config)?;
        driver::xlb(lab, &["run", "--config", &me.config])?;
        Ok(me)
    }

    /// A guard that detaches whatever xlb attaches with `config` (by `xlb run` or by a
    /// daemon, which leaves the dataplane attached when it exits); takes it before starting.
    pub(super) fn guard(lab: &'a Lab, config: &Path) -> Result<Self> {
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
    pub(super) fn detach(&mut self) -> Result<()> {
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
fn nft_load(ns: &NetNs, table: &str, script: &str) -> Result<()> {
    // Creating the table first makes the delete valid whether or not it existed.
    let full = format!("table ip {table}\ndelete table ip {table}\n{script}");
    cmd::run_with_stdin(ns.command("nft").args(["-f", "-"]), &full)
        .with_context(|| format!("loading nftables table {table} in {}", ns.name()))?;
    ns.sysctls(&[("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1")])
}

/// Deletes an nftables table (ignoring one that is already gone).
fn nft_delete(ns: &NetNs, table: &str) -> Result<()> {
    let out = ns.exec(&["nft", "delete", "table", "ip", table])?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || err.contains("No such file") {
        return Ok(());
    }
    bail!("nft delete table {table} in {}: {}", ns.name(), err.trim())
}

/// The client namespace's source spreading: every new connection to port 80 leaves from
/// the next client address in turn; removed on drop.
struct ClientSpread<'a> {
    lab: &'a Lab,
}

impl<'a> ClientSpread<'a> {
    fn load(lab: &'a Lab) -> Result<Self> {
        let map = map_list(&lab.client_v4);
        let mut dsts: Vec<String> = vec![lab.vip4.to_string()];
        dsts.extend(lab.backends.iter().map(|b| b.ipv4.to_string()));
        let script = format!(
            "table ip {CLIENT_TABLE} {{\n chain post {{\n  type nat hook postrouting priority srcnat; policy accept;\n  \
             ip daddr {{ {} }} tcp dport {HTTP_PORT} snat to numgen inc mod {} map {{ {map} }}\n }}\n}}\n",
            dsts.join(", "),
            lab.client_v4.len()
        );
        let me = Self { lab };
        nft_load(&lab.client, CLIENT_TABLE, &script)?;
        Ok(me)
    }
}

impl Drop for ClientSpread<'_> {
    fn drop(&mut self) {
        if let Err(e) = nft_delete(&self.lab.client, CLIENT_TABLE) {
            eprintln!("bench: {e:#}");
        }
    }
}

/// `0 : a, 1 : b, ...` for an nftables verdict-free map.
fn map_list(addrs: &[Ipv4Addr]) -> String {
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
    pub(super) fn load(lab: &'a Lab) -> Result<Self> {
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
    pub(super) fn unload(&mut self) -> Result<()> {
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
    pub(super) fn haproxy(lab: &Lab, check: &str) -> Result<Self> {
        let mut servers = String::new();
        for b in &lab.backends {
            servers.push_str(&format!(
                "    server {} {}:{HTTP_PORT} {check}\n",
                b.name, b.ipv4
            ));
        }
        let cfg = format!(
            "global\n    maxconn {HAPROXY_MAXCONN}\n    nbthread {WRK_THREADS}\n\n\
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
    pub(super) fn nginx(lab: &Lab) -> Result<Self> {
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
            "load_module {NGINX_STREAM_MODULE};\nworker_processes {WRK_THREADS};\ndaemon off;\n\
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
    pub(super) fn stop(mut self) -> Result<()> {
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

/// What one wrk run reported.
#[derive(Clone, Debug, Default, PartialEq)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
}

/// Runs wrk in the client namespace against `target`, bounded by its duration plus a grace.
fn wrk(lab: &Lab, target: IpAddr, mode: ConnMode, secs: u32) -> Result<Wrk> {
    let threads = WRK_THREADS.to_string();
    let conns = CONNECTIONS.to_string();
    let duration = format!("{secs}s");
    let url = format!("http://{target}:{HTTP_PORT}/");
    let mut argv = vec![
        "wrk",
        "-t",
        &threads,
        "-c",
        &conns,
        "-d",
        &duration,
        "--timeout",
        WRK_TIMEOUT,
        "--latency",
    ];
    if mode == ConnMode::Close {
        argv.extend(["-H", "Connection: close"]);
    }
    argv.push(&url);
    let mut child = lab.client.spawn(&argv)?;
    let status = child.wait_timeout(Duration::from_secs(secs.into()) + WRK_GRACE)?;
    let log = child.log();
    if !status.success() {
        bail!("wrk failed ({status}):\n{}", cmd::tail(log.as_bytes()));
    }
    let w = parse_wrk(&log)?;
    if w.requests == 0 {
        bail!("wrk completed no request:\n{}", cmd::tail(log.as_bytes()));
    }
    Ok(w)
}

/// A wrk duration (`812.00us`, `1.20ms`, `2.00s`, `1.00m`) in milliseconds.
fn parse_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = text.split_at(split);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        "h" => v * 3_600_000.0,
        _ => return None,
    })
}

/// Picks requests/s, p50, p99, the request count and the errors out of wrk's output.
fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    let mut seen_rps = false;
    for line in out.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        match first {
            "Requests/sec:" => {
                w.rps = words
                    .next()
                    .and_then(|v| v.parse().ok())
                    .context("bad Requests/sec line")?;
                seen_rps = true;
            }
            "50%" => w.p50_ms = words.next().and_then(parse_ms).context("bad 50% line")?,
            "99%" => w.p99_ms = words.next().and_then(parse_ms).context("bad 99% line")?,
            "Socket" => {
                // `Socket errors: connect 0, read 3, write 0, timeout 0`
                w.errors += line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum::<u64>();
            }
            "Non-2xx" => {
                w.errors += line
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
            n if line.contains(" requests in ") => {
                w.requests = n.parse().context("bad request count")?;
            }
            _ => {}
        }
    }
    if !seen_rps {
        bail!(
            "no Requests/sec in wrk's output:\n{}",
            cmd::tail(out.as_bytes())
        );
    }
    Ok(w)
}

/// `median (min–max)` of a list.
fn spread(values: Vec<f64>) -> String {
    let s = Series::new("", "", values);
    format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max)
}

/// The table of one connection mode.
fn table(runs: &[PeerRun], mode: ConnMode, budget: Budget, tso: &[(Contender, String)]) -> Table {
    let of = |c: Contender| -> Vec<&PeerRun> {
        runs.iter()
            .filter(|r| r.contender == c.name() && r.mode == mode.label())
            .collect()
    };
    let mut rows = Vec::new();
    let mut extra = Vec::new();
    let xlb_rps = Series::new(
        "",
        "",
        of(Contender::Xlb)
            .iter()
            .map(|r| r.requests_per_sec)
            .collect(),
    )
    .median;
    let xlb_p99 = Series::new(
        "",
        "",
        of(Contender::Xlb).iter().map(|r| r.p99_ms).collect(),
    )
    .median;
    for c in Contender::ALL {
        let rs = of(c);
        if rs.is_empty() {
            continue;
        }
        let row = Series::new(
            c.name(),
            "req/s",
            rs.iter().map(|r| r.requests_per_sec).collect(),
        );
        let name = c.name().to_owned();
        let ratio = |v: f64, base: f64| {
            if base > 0.0 && base.is_finite() {
                format!("{:.2}", v / base)
            } else {
                "–".to_owned()
            }
        };
        let p99 = Series::new("", "", rs.iter().map(|r| r.p99_ms).collect());
        let mut served: Vec<(String, u64)> = Vec::new();
        for r in &rs {
            for (b, n) in &r.served {
                match served.iter_mut().find(|(s, _)| s == b) {
                    Some((_, t)) => *t += n,
                    None => served.push((b.clone(), *n)),
                }
            }
        }
        let total: u64 = served.iter().map(|(_, n)| n).sum();
        let shares = served
            .iter()
            .map(|(_, n)| format!("{:.0}", 100.0 * *n as f64 / total.max(1) as f64))
            .collect::<Vec<_>>()
            .join("/");
        let tso_state = tso
            .iter()
            .find(|(t, _)| *t == c)
            .map_or("?", |(_, s)| s.as_str());
        for (col, v) in [
            ("× xlb req/s", ratio(row.median, xlb_rps)),
            (
                "p50 ms (min–max)",
                spread(rs.iter().map(|r| r.p50_ms).collect()),
            ),
            (
                "p99 ms (min–max)",
                spread(rs.iter().map(|r| r.p99_ms).collect()),
            ),
            ("× xlb p99", ratio(p99.median, xlb_p99)),
            (
                "errors",
                rs.iter().map(|r| r.errors).sum::<u64>().to_string(),
            ),
            ("b1/b2/b3 %", shares),
            ("offloads", tso_state.to_owned()),
        ] {
            extra.push((name.clone(), col.to_owned(), v));
        }
        rows.push(row);
    }
    Table {
        title: format!(
            "Peers on the same namespaces: HTTP requests/s, {}",
            mode.label()
        ),
        about: format!(
            "wrk ({WRK_THREADS} threads, {CONNECTIONS} connections, {secs} s per run{close}) from the client \
             namespace to the VIP (or, for the ceiling, straight to b1's own address); {rounds} rounds with \
             the contenders interleaved, each started before and stopped after its runs. wrk cannot bind \
             source addresses, so an nftables `snat to numgen inc mod {n} map {{...}}` rule in the client \
             namespace gives each new connection the next of {n} client addresses — the same rule for every \
             contender, ceiling included. Backends: 3 namespaces running the lab's thread-per-connection \
             Rust HTTP server, with `tcp_max_tw_buckets=0` (no TIME_WAIT: otherwise SNAT'd \
             connection-per-request SYNs meet TIME_WAIT tuples left by earlier contenders, are rejected by \
             PAWS and stall a second each); everything (wrk, load balancer, servers) shares the machine's CPUs, so the \
             ratios show what each load balancer costs on top of a loaded host, not its own limit. \
             xlb: `xlb run` with native XDP on lb0, direct server return. nftables: DNAT `jhash ip saddr \
             mod 3 seed {JHASH_SEED:#x}` to the backends plus SNAT to the LB's own address, with forwarding \
             on. HAProxy {haproxy}: `mode tcp`, `stick-table type ip size 1m` + `stick on src`, \
             roundrobin for new clients, `check inter 500ms`, maxconn {HAPROXY_MAXCONN}, {WRK_THREADS} threads. nginx \
             {nginx}: `stream`, `hash $remote_addr consistent`, {WRK_THREADS} workers (passive checks only). \
             Offloads: the lab keeps an XDP_PASS program on lb0's bridge peer (p-lb) for every contender, \
             which turns TSO off on lb0 for all of them; xlb's own native XDP on lb0 additionally turns TSO \
             off on p-lb while xlb runs (the `offloads` column, read during the first round). \
             Ratios: × the no-LB ceiling, and × xlb (req/s; for p99, above 1 is slower than xlb); \
             b1/b2/b3 is the share of requests each backend answered.",
            secs = budget.peer_secs,
            close = if mode == ConnMode::Close {
                ", `-H 'Connection: close'`: a new TCP connection per request"
            } else {
                ", HTTP/1.1 keep-alive"
            },
            rounds = budget.peer_rounds,
            n = CLIENT_ADDRS,
            haproxy = version(&["haproxy", "-v"]),
            nginx = version(&["nginx", "-v"]),
        ),
        baseline: Contender::NoLb.name().to_owned(),
        rows,
        extra,
    }
}

/// First version-looking word a program prints about itself, or "".
fn version(argv: &[&str]) -> String {
    let Some((prog, args)) = argv.split_first() else {
        return String::new();
    };
    let Ok(out) = Command::new(prog).args(args).stdin(Stdio::null()).output() else {
        return String::new();
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) || w.contains('/'))
        .map(|w| w.rsplit('/').next().unwrap_or(w).to_owned())
        .unwrap_or_default()
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

    #[test]
    fn parses_wrk_output() {
        let out = "Running 2s test @ http://10.77.0.10:80/\n  2 threads and 36 connections\n\
  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     3.05ms    1.21ms  20.95ms   80.00%\n\
    Req/Sec     5.95k   455.13     6.71k    72.50%\n  Latency Distribution\n     50%    2.90ms\n\
     75%    3.50ms\n     90%    4.46ms\n     99%  812.00us\n  23698 requests in 2.00s, 3.12MB read\n\
  Socket errors: connect 0, read 12, write 1, timeout 2\n  Non-2xx or 3xx responses: 4\n\
Requests/sec:  11831.98\nTransfer/sec:      1.56MB\n";
        let w = parse_wrk(out).expect("parses");
        assert_eq!(w.requests, 23698);
        assert!((w.rps - 11831.98).abs() < 1e-6);
        assert!((w.p50_ms - 2.9).abs() < 1e-9);
        assert!((w.p99_ms - 0.812).abs() < 1e-9);
        assert_eq!(w.errors, 19);
        assert!(parse_wrk("garbage").is_err());
        assert_eq!(parse_ms("1.50s"), Some(1500.0));
    }
}
