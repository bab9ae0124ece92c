//! `cargo xtask demo`: xlb on its own namespaces. Builds a lab (a client
//! with 16 IPv4 and 16 IPv6 addresses, an LB, three backends on a bridge),
//! runs the real `xlb` binary, sends HTTP and UDP from every client several
//! times, prints who went where, and cleans everything up.

use std::{collections::BTreeMap, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use xlb_tests::{
    Lab, LabOptions, Proto, Servers,
    driver::{self, Mode},
};

const ROUNDS: usize = 5;

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(n: usize, what: &str) {
    println!("[{n}/6] {what}");
}

fn demo() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads XDP: run it as root");
    }
    let mode = match std::env::args().nth(1).as_deref() {
        None | Some("native") => Mode::Native,
        Some("generic") => Mode::Generic,
        Some(other) => bail!("unknown mode {other:?}: use native or generic"),
    };

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
    let _servers = Servers::start(&lab)?;
    if mode == Mode::Native {
        lab.attach_lb_peer_pass()?;
    }

    step(
        3,
        &format!("xlb run ({} XDP on {})", mode.as_str(), lab.lb_if),
    );
    let config = driver::write_lab_config(&lab, mode)?;
    let config_arg = config.to_str().context("config path")?;
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

    step(6, "cleaning up: xlb detach, namespaces removed");
    driver::xlb(&lab, &["detach", "--config", config_arg])?;
    let _ = std::fs::remove_file(&config);
    drop(lab);
    println!("done: every client stuck to one backend for all {ROUNDS} rounds.");
    Ok(())
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
