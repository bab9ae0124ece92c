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
    net::IpAddr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{
    Budget, Series, Table,
    contenders::{
        Contender, HAPROXY_MAXCONN, JHASH_SEED, Lineup, PACKAGES, PROXY_THREADS, ensure_packages,
        have, map_list, nft_delete, nft_load, no_time_wait_on_backends, wait_served,
    },
};
use crate::{Lab, LabOptions, NetNs, Servers, cmd, servers::HTTP_PORT};

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
/// nftables table in the client namespace (source spreading).
const CLIENT_TABLE: &str = "xlb_bench_clients";
/// HAProxy's per-server health checks in this part (no failures happen here).
const HAPROXY_CHECK: &str = "check inter 500ms fall 2 rise 2";
/// The contenders, in the order they run within a round.
const LINEUP: Lineup = Lineup {
    all: &[
        Contender::NoLb,
        Contender::XlbRun,
        Contender::Nft,
        Contender::Haproxy,
        Contender::Nginx,
    ],
    haproxy_check: HAPROXY_CHECK,
};

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
    let mut failed = LINEUP.unavailable(missing.as_deref());

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
    let mut tso: Vec<(Contender, String)> = Vec::new();

    LINEUP.rounds("part 4", budget.peer_rounds, &mut failed, |c, round| {
        let (runs, offloads) = measure(&lab, &servers, c, round, budget)?;
        out.runs.extend(runs);
        if !tso.iter().any(|(t, _)| *t == c) {
            tso.push((c, offloads));
        }
        Ok(())
    });

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
) -> Result<(Vec<PeerRun>, String)> {
    let b1 = lab.backends.first().context("the lab has no backend")?;
    let target = if c == Contender::NoLb {
        IpAddr::V4(b1.ipv4)
    } else {
        IpAddr::V4(lab.vip4)
    };
    let running = LINEUP.start(lab, c)?;
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
        of(Contender::XlbRun)
            .iter()
            .map(|r| r.requests_per_sec)
            .collect(),
    )
    .median;
    let xlb_p99 = Series::new(
        "",
        "",
        of(Contender::XlbRun).iter().map(|r| r.p99_ms).collect(),
    )
    .median;
    for &c in LINEUP.all {
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
             roundrobin for new clients, `check inter 500ms`, maxconn {HAPROXY_MAXCONN}, {PROXY_THREADS} threads. nginx \
             {nginx}: `stream`, `hash $remote_addr consistent`, {PROXY_THREADS} workers (passive checks only). \
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
