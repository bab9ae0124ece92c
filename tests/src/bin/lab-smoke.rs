//! Builds a lab without any load balancer, talks to backends directly, and checks cleanup.

use std::net::IpAddr;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use xlb_tests::{HTTP_PORT, Lab, LabOptions, Servers, UDP_PORT, cmd};

/// Tag of every lab this binary builds.
const TAG: &str = "smoke";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, secs] = args.as_slice() {
        if flag == "--hold" {
            return hold(secs);
        }
    }
    if !args.is_empty() {
        bail!("usage: lab-smoke [--hold SECONDS]");
    }
    let start = Instant::now();
    let id = direct_traffic().context("direct traffic through the lab")?;
    ensure_gone(&id)?;
    println!("cleanup after success: ok");

    let id = panicking_user().context("cleanup on panic")?;
    ensure_gone(&id)?;
    println!("cleanup after panic: ok");

    stale_cleanup().context("stale cleanup")?;
    println!("stale cleanup: ok");
    println!("lab-smoke passed in {:.1?}", start.elapsed());
    Ok(())
}

/// Talks HTTP and UDP from the client to every backend's own address; returns the lab id.
fn direct_traffic() -> Result<String> {
    let t = Instant::now();
    let lab = Lab::new(TAG, LabOptions::default())?;
    println!("lab {} up in {:.1?}", lab.id, t.elapsed());
    let servers = Servers::start(&lab)?;
    lab.attach_lb_peer_pass()?;
    let peer = lab.switch.ip(&["link", "show", "dev", &lab.lb_peer.1])?;
    ensure!(peer.contains("xdp"), "no XDP program on lb peer:\n{peer}");
    if lab.bpffs_dir().is_dir() {
        println!("bpffs dir {}", lab.bpffs_dir().display());
    } else {
        println!("bpffs is not mounted at /sys/fs/bpf (cargo xtask setup mounts it)");
    }

    let b1 = &lab.backends[0];
    let src = IpAddr::V4(lab.client_v4[0]);
    let body = lab.http_get(src, IpAddr::V4(b1.ipv4), HTTP_PORT)?;
    println!("GET http://{}/ from {src}: {body}", b1.ipv4);
    ensure!(body == b1.name, "expected body {}, got {body:?}", b1.name);

    // Every backend, both families, both protocols, from varying sources.
    let sources = lab.client_addrs();
    let mut n = 0;
    lab.in_client(|| {
        for b in &lab.backends {
            for (i, src) in sources.iter().enumerate().filter(|(i, _)| i % 5 == 0) {
                let dst = b.addr_like(*src);
                let http = xlb_tests::http_get(*src, dst, HTTP_PORT)?;
                let udp = xlb_tests::udp_ask(*src, dst, UDP_PORT)?;
                ensure!(
                    http == b.name && udp == b.name,
                    "{src} -> {dst}: {http:?}/{udp:?} (#{i})"
                );
                n += 1;
            }
        }
        Ok(())
    })?;
    println!("{n} direct HTTP+UDP exchanges ok");
    let served = servers.served();
    println!("served: {served:?}");
    ensure!(served[0].tcp >= 1, "b1 counted no HTTP request");

    // Nothing answers on the VIP yet: the LB namespace has no listener and no balancer.
    let vip = lab.vip_for(src);
    ensure!(
        lab.http_get(src, vip, HTTP_PORT).is_err(),
        "VIP answered without a balancer"
    );

    dsr_without_lb(&lab)?;

    let listed = lab.run_in_lb(&["ip", "-br", "addr", "show", "dev", lab.lb_if])?;
    print!("lb ns: {}", String::from_utf8_lossy(&listed.stdout));
    Ok(lab.id.clone())
}

/// Points the client's neighbour entry for each VIP at a backend's MAC (what the balancer's
/// MAC rewrite does) and checks the backend answers from the VIP: the backends are set up for
/// direct server return.
fn dsr_without_lb(lab: &Lab) -> Result<()> {
    let b2 = &lab.backends[1];
    for vip in lab.vips() {
        let mac = b2.mac.to_string();
        let vip_s = vip.to_string();
        lab.client.ip(&[
            "neigh",
            "replace",
            &vip_s,
            "lladdr",
            &mac,
            "dev",
            lab.client_if,
            "nud",
            "permanent",
        ])?;
        let src = match vip {
            IpAddr::V4(_) => IpAddr::V4(lab.client_v4[1]),
            IpAddr::V6(_) => IpAddr::V6(lab.client_v6[1]),
        };
        let http = lab.http_get(src, vip, HTTP_PORT);
        let udp = lab.udp_ask(src, vip, UDP_PORT);
        lab.client
            .ip(&["neigh", "del", &vip_s, "dev", lab.client_if])?;
        let (http, udp) = (http?, udp?);
        ensure!(
            http == b2.name && udp == b2.name,
            "VIP {vip} via {mac}: {http:?}/{udp:?}"
        );
        println!(
            "VIP {vip} straight to {} ({mac}): HTTP {http}, UDP {udp} (reply from the VIP)",
            b2.name
        );
    }
    Ok(())
}

/// Builds a lab with servers and keeps it for `secs` seconds, for poking at it by hand.
fn hold(secs: &str) -> Result<()> {
    let secs: u64 = secs.parse().context("--hold takes a number of seconds")?;
    let lab = Lab::new(TAG, LabOptions::default())?;
    let _servers = Servers::start(&lab)?;
    println!(
        "lab {} up; holding it for {secs} s (Ctrl-C cleans up too)",
        lab.id
    );
    for ns in [&lab.switch, &lab.lb, &lab.client] {
        println!("  {}", ns.name());
    }
    for b in &lab.backends {
        println!("  {} ({} {} {})", b.netns.name(), b.mac, b.ipv4, b.ipv6);
    }
    std::thread::sleep(std::time::Duration::from_secs(secs));
    Ok(())
}

/// Builds a lab in a thread that panics; returns the lab id.
fn panicking_user() -> Result<String> {
    // The panic is the point of this check: keep its message off the terminal.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let handle = std::thread::spawn(|| {
        let lab = Lab::new(
            TAG,
            LabOptions {
                backends: 1,
                clients_v4: 1,
                clients_v6: 1,
            },
        )
        .expect("lab");
        let id = lab.id.clone();
        let _servers = Servers::start(&lab).expect("servers");
        std::panic::panic_any(id);
    });
    let joined = handle.join();
    std::panic::set_hook(previous_hook);
    match joined {
        Ok(()) => bail!("the thread did not panic"),
        Err(payload) => payload
            .downcast::<String>()
            .map(|id| *id)
            .map_err(|_| anyhow::anyhow!("unexpected panic payload")),
    }
}

/// Fakes a namespace left by a dead process and checks `cleanup_stale` removes it.
fn stale_cleanup() -> Result<()> {
    // Above the kernel's largest pid_max, so no live process can own it.
    let name = format!("xlb-{TAG}-4194399-0-cl");
    cmd::ip(&["netns", "add", &name])?;
    let removed = Lab::cleanup_stale(TAG)?;
    let left = netns_list()?;
    if left.contains(&name) {
        let _ = cmd::ip(&["netns", "del", &name]);
        bail!("cleanup_stale left {name}");
    }
    ensure!(removed >= 1, "cleanup_stale reported {removed} removals");
    Ok(())
}

/// Fails if any namespace or bpffs directory of lab `id` still exists.
fn ensure_gone(id: &str) -> Result<()> {
    let left: Vec<String> = netns_list()?
        .lines()
        .filter(|l| l.starts_with(id))
        .map(str::to_owned)
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    let dir = std::path::Path::new("/sys/fs/bpf").join(id);
    ensure!(!dir.exists(), "bpffs dir left behind: {}", dir.display());
    Ok(())
}

/// `ip netns list` output.
fn netns_list() -> Result<String> {
    let out = cmd::run(Command::new("ip").args(["netns", "list"]))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
