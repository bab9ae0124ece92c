//! `cargo xtask demo`: xlb on its own namespaces. Builds a lab (a client
//! with 16 IPv4 and 16 IPv6 addresses, an LB, three backends on a bridge),
//! runs the real `xlb` binary, sends HTTP and UDP from every client several
//! times, prints who went where; then runs `xlb daemon` with health checks,
//! stops one backend's servers and drains another, printing which clients
//! moved; and cleans everything up.
//!
//! `xlb-demo cluster` shows the replicated cluster instead (see `cluster.rs`).

#[path = "xlb-demo/cluster.rs"]
mod cluster;

use std::{collections::BTreeMap, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use xlb_tests::{
    Lab, LabOptions, Proto, Servers,
    daemon::Daemon,
    driver::{self, Mode},
};

const ROUNDS: usize = 5;

/// What the demo accepts.
const USAGE: &str = "usage: xlb-demo [native|generic|cluster]";

/// The config the demo runs, checked in as the project's full example.
const DEMO_CONFIG: &str = include_str!("../../demo.toml");

/// Writes `tests/demo.toml` into the lab's work directory with its pin
/// directory, state file and XDP mode pointed at this lab, after checking
/// that every VIP, backend address and MAC in it is the lab's.
fn demo_config(lab: &Lab, mode: Mode) -> Result<std::path::PathBuf> {
    for vip in lab.vips() {
        if !DEMO_CONFIG.contains(&format!("vip = \"{vip}\"")) {
            bail!("tests/demo.toml has no service on the lab's VIP {vip}");
        }
        for b in &lab.backends {
            let entry = format!("address = \"{}\"\nmac = \"{}\"", b.addr_like(vip), b.mac);
            if !DEMO_CONFIG.contains(&entry) {
                bail!(
                    "tests/demo.toml does not match the lab: missing {}",
                    entry.replace('\n', " ")
                );
            }
        }
    }
    let text: Vec<String> = DEMO_CONFIG
        .lines()
        .map(|l| {
            if l.starts_with("pin_dir = ") {
                format!("pin_dir = \"{}\"", lab.bpffs_dir().display())
            } else if l.starts_with("state_file = ") {
                format!(
                    "state_file = \"{}\"",
                    lab.work_dir().join("state.json").display()
                )
            } else if l.starts_with("xdp_mode = ") {
                format!("xdp_mode = \"{}\"", mode.as_str())
            } else {
                l.to_string()
            }
        })
        .collect();
    let path = lab.work_dir().join("xlb.toml");
    std::fs::write(&path, text.join("\n") + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] | ["native"] => demo(Mode::Native),
        ["generic"] => demo(Mode::Generic),
        ["cluster"] => as_root().and_then(|()| cluster::run()),
        [..] => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(n: usize, what: &str) {
    println!("[{n}/8] {what}");
}

/// Fails unless the process runs as root.
fn as_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads XDP: run it as root");
    }
    Ok(())
}

fn demo(mode: Mode) -> Result<()> {
    as_root()?;

    step(
        1,
        "building the lab: client, load balancer and 3 backends on a bridge",
    );
    let lab = Lab::new("demo", LabOptions::default()).context("building the lab")?;
    println!(
        "      VIPs {} and {}; {} client addresses",
        lab.vip4,
        lab.vip6,
        lab.client_addrs().len()
    );

    step(
        2,
        "starting HTTP (tcp/80) and UDP (7000) servers that answer with their name",
    );
    let mut servers = Servers::start(&lab)?;
    if mode == Mode::Native {
        lab.attach_lb_peer_pass()?;
    }

    step(
        3,
        &format!("xlb run ({} XDP on {})", mode.as_str(), lab.lb_if),
    );
    let config = demo_config(&lab, mode)?;
    let config_arg = config.to_str().context("config path")?;
    println!("      config: tests/demo.toml (pins and state file in the lab's own directories)");
    let out = driver::xlb(&lab, &["run", "--config", config_arg])?;
    print!("{}", indent(&String::from_utf8_lossy(&out.stderr)));

    step(
        4,
        &format!("{ROUNDS} rounds of requests from every client over TCP and UDP"),
    );
    let protos = [Proto::Tcp, Proto::Udp];
    let mapping = driver::observe(&lab, &protos, ROUNDS)?;
    print_mapping(&lab, &mapping);

    step(5, "what the kernel recorded (xlb sessions, xlb stats)");
    let out = driver::xlb(&lab, &["sessions", "--config", config_arg])?;
    let sessions = String::from_utf8_lossy(&out.stdout);
    for line in sessions.lines().take(6) {
        println!("      {line}");
    }
    println!("      ... {}", sessions.lines().last().unwrap_or(""));
    let out = driver::xlb(&lab, &["stats", "--config", config_arg])?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with("new_session")
            || line.starts_with("affinity_hit")
            || line.starts_with("backend")
        {
            println!("      {line}");
        }
    }

    driver::xlb(&lab, &["detach", "--config", config_arg])?;

    step(
        6,
        "xlb daemon with health checks (500ms, fall 3); b2's servers stop",
    );
    let daemon_cfg = config.clone();
    let d = Daemon::start(&lab, &daemon_cfg)?;
    let before = driver::observe(&lab, &protos, 1)?;
    servers.stop_backend("b2")?;
    let took = d.wait_backend(&lab, "http-v4", "b2", Duration::from_secs(15), |b| {
        b["state"] == "down"
    })?;
    for svc in ["echo-v4", "http-v6", "echo-v6"] {
        d.wait_backend(&lab, svc, "b2", Duration::from_secs(15), |b| {
            b["state"] == "down"
        })?;
    }
    println!("      b2 marked down {took:.1?} after its servers stopped");
    let after = driver::observe(&lab, &protos, 1)?;
    print_moves(&before, &after);

    step(
        7,
        "b2 back; then xlb backend drain http-v4 b1 --deadline 3s",
    );
    servers.start_backend(&lab, "b2")?;
    d.wait_backend(&lab, "http-v4", "b2", Duration::from_secs(15), |b| {
        b["state"] == "active"
    })?;
    let before = driver::observe(&lab, &protos, 1)?;
    if before != after {
        bail!("clients moved when b2 came back");
    }
    println!("      b2 is up again; nobody moved back");
    d.ctl(
        &lab,
        &["backend", "drain", "http-v4", "b1", "--deadline", "3s"],
    )?;
    let b1 = d.backend(&lab, "http-v4", "b1")?;
    println!(
        "      b1 draining: {} sessions, {} ms left",
        b1["sessions"], b1["drain_left_ms"]
    );
    d.wait_backend(&lab, "http-v4", "b1", Duration::from_secs(10), |b| {
        b["admin"] == "maint"
    })?;
    println!("      deadline passed: b1 is maint, its leftover clients moved");
    let after = driver::observe(&lab, &protos, 1)?;
    print_moves(&before, &after);

    step(
        8,
        "cleaning up: daemon stopped, xlb detach, namespaces removed",
    );
    d.child.stop()?;
    let cfg_arg = daemon_cfg.to_str().context("config path")?;
    driver::xlb(&lab, &["detach", "--config", cfg_arg])?;
    drop(lab);
    println!(
        "done: every client stuck to one backend for all {ROUNDS} rounds; only the failed and the drained backend's clients moved."
    );
    Ok(())
}

/// Prints the clients whose backend changed, and how many kept theirs.
fn print_moves(before: &driver::Mapping, after: &driver::Mapping) {
    let mut kept = 0;
    for (key, was) in before {
        match after.get(key) {
            Some(now) if now != was => println!("      {} {:?}: {was} -> {now}", key.0, key.1),
            _ => kept += 1,
        }
    }
    println!(
        "      {kept} of {} client/protocol pairs kept their backend",
        before.len()
    );
}

fn print_mapping(lab: &Lab, mapping: &driver::Mapping) {
    println!("      {:<18} {:<8} {:<8}", "client", "tcp", "udp");
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for src in lab.client_addrs() {
        let get = |p| mapping.get(&(src, p)).map(String::as_str).unwrap_or("-");
        let (tcp, udp) = (get(Proto::Tcp), get(Proto::Udp));
        *per_backend.entry(tcp).or_default() += 1;
        *per_backend.entry(udp).or_default() += 1;
        println!(
            "      {:<18} {:<8} {:<8}",
            src.to_string(),
            format!("{tcp} x{ROUNDS}"),
            format!("{udp} x{ROUNDS}")
        );
    }
    let spread: Vec<String> = per_backend
        .iter()
        .map(|(b, n)| format!("{b}: {n} sessions"))
        .collect();
    println!("      spread: {}", spread.join(", "));
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("      {l}\n")).collect()
}
