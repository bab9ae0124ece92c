//! End to end: health checks through the tunnel (`via = "tunnel"`). The check
//! runs in a load-balancer namespace and sends its probe to VIP:port inside
//! IP-in-IP to the backend's address; the backend decapsulates with `xlb decap`
//! (this kernel has no ipip/ip6tnl) and answers from the VIP straight back.
//! Both kinds (tcp, udp) and both families pass while the backend serves the
//! VIP, fail when its server stops, and fail when the decapsulator is detached,
//! which proves the probe went through the tunnel.
//!
//! Two namespaces of its own (`xlbtc-<pid>-{l,b}`) joined by a veth; the backend
//! holds the VIPs on `lo` and serves them (TCP listener, UDP echo); the load
//! balancer has no route to the VIPs at all. Needs root and the release `xlb`
//! binary (`XLB_BIN`); run by `cargo xtask test`.

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use xlb::config::{HealthConfig, HealthKind, HealthVia};
use xlb::daemon::health::{CheckOutcome, check, check_tunnelled};
use xlb_tests::{NetNs, NsChild, cmd, driver::xlb_bin, frames::ip, netns};

const PREFIX: &str = "xlbtc-";
const S4: &str = "10.78.0.1";
const B4: &str = "10.78.0.2";
const S6: &str = "fd78::1";
const B6: &str = "fd78::2";
const VIP4: &str = "10.78.100.10";
const VIP6: &str = "fd78:100::10";
const PORT: u16 = 8080;
/// Each check's timeout: every failure below waits this long at most.
const TIMEOUT: Duration = Duration::from_millis(700);
/// How a tunnelled TCP check says the VIP refused (not a direct check's "connection refused").
const REFUSED: &str = "answered the tunnelled SYN with a reset";
/// Upper bound on the UDP echo's life, whatever the test does.
const SERVER_LIFETIME: Duration = Duration::from_secs(90);

/// The two namespaces, the pin root (the decapsulator's and a daemon's pins) and a work
/// directory (a daemon's config, socket and state); all removed on drop.
struct Setup {
    lb: NetNs,
    backend: NetNs,
    pin_root: PathBuf,
    work: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // The namespaces go after this (field order) and take the veth, and with it
        // the attachments; the pins would outlive them.
        for dir in [&self.pin_root, &self.work] {
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("xlb-tests: cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// Removes namespaces and pin roots this test's earlier, dead processes left.
fn cleanup_stale() {
    let stale = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let tmp = std::env::temp_dir();
    for dir in [
        Path::new(netns::NETNS_RUN_DIR),
        Path::new("/sys/fs/bpf"),
        &tmp,
    ] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !stale(&name) {
                continue;
            }
            if dir == Path::new(netns::NETNS_RUN_DIR) {
                let _ = cmd::ip(&["netns", "del", &name]);
            } else {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn setup(tag: &str) -> Result<Setup> {
    cleanup_stale();
    let id = format!("{PREFIX}{}-{tag}", std::process::id());
    let lb = NetNs::create(&format!("{id}-l"))?;
    let backend = NetNs::create(&format!("{id}-b"))?;
    let setup = Setup {
        lb,
        backend,
        pin_root: PathBuf::from(format!("/sys/fs/bpf/{id}")),
        work: std::env::temp_dir().join(&id),
    };
    setup.lb.ip(&[
        "link",
        "add",
        "tl",
        "type",
        "veth",
        "peer",
        "name",
        "tb",
        "netns",
        setup.backend.name(),
    ])?;
    setup.lb.ip_batch(&format!(
        "addr add {S4}/24 dev tl\naddr add {S6}/64 dev tl nodad\nlink set tl up\n"
    ))?;
    // The VIPs on lo; the route back to S is the veth's own subnet.
    setup.backend.ip_batch(&format!(
        "addr add {B4}/24 dev tb\naddr add {B6}/64 dev tb nodad\nlink set tb up\n\
         addr add {VIP4}/32 dev lo\naddr add {VIP6}/128 dev lo\nlink set lo up\n"
    ))?;
    // The kernel sees a veth's carrier through its link watcher, up to a second later;
    // until then IPv6 has not configured the link (no multicast route: neighbour
    // solicitations are dropped), and the first IPv6 checks would fail for the lab's sake.
    cmd::wait_until(
        "both ends of the veth operationally up",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || Ok(operstate(&setup.lb, "tl")? == "UP" && operstate(&setup.backend, "tb")? == "UP"),
    )?;
    Ok(setup)
}

fn operstate(ns: &NetNs, ifname: &str) -> Result<String> {
    let json = ns.ip_json(&["link", "show", ifname])?;
    Ok(json[0]["operstate"].as_str().unwrap_or("").to_string())
}

/// The backend's servers on both VIPs: a TCP listener (the kernel answers SYNs; nobody
/// accepts, the probes never complete a handshake) and a UDP echo ("pong:" + datagram).
struct Servers {
    listeners: Vec<TcpListener>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(ns: &NetNs) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut listeners = Vec::new();
        let mut threads = Vec::new();
        for vip in [VIP4, VIP6] {
            let addr = SocketAddr::new(ip(vip), PORT);
            let (listener, sock) = ns.run(|| {
                Ok((
                    TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?,
                    UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?,
                ))
            })?;
            listeners.push(listener);
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .context("echo read timeout")?;
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let until = Instant::now() + SERVER_LIFETIME;
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let mut reply = b"pong:".to_vec();
                        reply.extend(&buf[..n]);
                        let _ = sock.send_to(&reply, from);
                    }
                }
            }));
        }
        Ok(Self {
            listeners,
            stop,
            threads,
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.listeners.clear();
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs `xlb decap ARGS` in the backend namespace (generic XDP on `tb`).
fn decap(s: &Setup, args: &[&str]) -> Result<String> {
    let bin = xlb_bin()?;
    let bin = bin.to_str().context("xlb path is not UTF-8")?;
    let root = s.pin_root.join("decap").display().to_string();
    let mut argv = vec![bin, "decap", "--interface", "tb", "--pin-dir", &root];
    argv.extend_from_slice(args);
    let out = s.backend.exec(&argv)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("xlb {} failed:\n{text}", argv[1..].join(" "));
    }
    Ok(text)
}

fn spec(kind: HealthKind) -> HealthConfig {
    HealthConfig {
        kind,
        port: PORT,
        via: HealthVia::Tunnel,
        interval: Duration::from_secs(2),
        timeout: TIMEOUT,
        rise: 2,
        fall: 3,
        source: None,
    }
}

fn tcp() -> HealthKind {
    HealthKind::Tcp
}

fn udp() -> HealthKind {
    HealthKind::Udp {
        send: "ping".into(),
        expect: "pong:ping".into(),
    }
}

/// One family's addresses: (source S, backend B, VIP).
struct Family {
    name: &'static str,
    source: IpAddr,
    backend: IpAddr,
    vip: IpAddr,
}

fn families() -> [Family; 2] {
    [
        Family {
            name: "IPv4",
            source: ip(S4),
            backend: ip(B4),
            vip: ip(VIP4),
        },
        Family {
            name: "IPv6",
            source: ip(S6),
            backend: ip(B6),
            vip: ip(VIP6),
        },
    ]
}

/// One tunnelled check from the load balancer's namespace, on a runtime of its own there.
fn tunnelled(s: &Setup, f: &Family, kind: HealthKind) -> CheckOutcome {
    let vip = SocketAddr::new(f.vip, PORT);
    s.lb.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("runtime")?;
        Ok(rt.block_on(check_tunnelled(f.backend, vip, &spec(kind), Some(f.source))))
    })
    .expect("running the check")
}

/// One direct check of the backend's own address (for comparison).
fn direct(s: &Setup, f: &Family, kind: HealthKind) -> CheckOutcome {
    let addr = SocketAddr::new(f.backend, PORT);
    s.lb.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("runtime")?;
        Ok(rt.block_on(check(addr, &spec(kind), Some(f.source))))
    })
    .expect("running the check")
}

/// Asserts a pass; a first probe may also wait for ARP / neighbour discovery, so up to
/// three tries (a bug that never passes still fails all three).
fn assert_passes(s: &Setup, f: &Family, kind: HealthKind, when: &str) {
    let mut last = None;
    for _ in 0..3 {
        let outcome = tunnelled(s, f, kind.clone());
        if let CheckOutcome::Pass(took) = outcome {
            assert!(took <= TIMEOUT, "{}: {kind} {when}: took {took:?}", f.name);
            return;
        }
        last = Some(outcome);
    }
    panic!("{} {kind} {when}: expected a pass, got {last:?}", f.name);
}

/// Asserts a failure (not a "not run") whose reason contains `why`.
fn assert_fails(s: &Setup, f: &Family, kind: HealthKind, when: &str, why: &str) {
    match tunnelled(s, f, kind.clone()) {
        CheckOutcome::Fail(reason) => assert!(
            reason.contains(why),
            "{} {kind} {when}: failed with {reason:?}, expected {why:?}",
            f.name
        ),
        other => panic!(
            "{} {kind} {when}: expected a failure, got {other:?}",
            f.name
        ),
    }
}

/// Half-open connections on the backend (SYN_RECV), which the probes' resets must end.
fn half_open(s: &Setup) -> Result<usize> {
    let out = s.backend.exec_ok(&["ss", "-Htn", "state", "syn-recv"])?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

fn decap_counter(s: &Setup, name: &str) -> u64 {
    let out = decap(s, &["--stats", "--json"]).expect("xlb decap --stats");
    let json: serde_json::Value = serde_json::from_str(&out).expect("stats JSON");
    json["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn tunnelled_checks_pass_only_through_the_decapsulator() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("e2e tests need root: run `cargo xtask test` as root");
    }
    let s = setup("c").expect("namespaces");
    let servers = Servers::start(&s.backend).expect("servers");
    let fams = families();

    // Without a decapsulator the backend's kernel drops IP-in-IP: no answer at all,
    // although the VIP is served; a direct check of the backend's own address is refused
    // (nothing listens there): neither path says anything about the VIP.
    for f in &fams {
        assert_fails(&s, f, tcp(), "without decap", "timeout");
        assert_fails(&s, f, udp(), "without decap", "timeout");
        match direct(&s, f, tcp()) {
            CheckOutcome::Fail(why) => assert!(why.contains("refused"), "{}: {why}", f.name),
            other => panic!("{}: direct check of the backend: {other:?}", f.name),
        }
    }

    let out =
        decap(&s, &["--xdp-mode", "generic", "--vip", VIP4, "--vip", VIP6]).expect("xlb decap");
    assert!(out.contains("attached"), "{out}");
    for f in &fams {
        assert_passes(&s, f, tcp(), "with decap");
        assert_passes(&s, f, udp(), "with decap");
    }
    // Through the decapsulator, in both families.
    assert!(decap_counter(&s, "decap_4in4") >= 2);
    assert!(decap_counter(&s, "decap_6in6") >= 2);
    // The tunnelled reset after each probe ends the backend's half-open connection at
    // once (the kernel's own reset cannot: this load balancer has no route to the VIP),
    // rather than after the backend's SYN-ACK retries.
    cmd::wait_until(
        "no half-open connections on the backend",
        Duration::from_secs(2),
        Duration::from_millis(20),
        || Ok(half_open(&s)? == 0),
    )
    .expect("half-open connections left");

    // A load balancer that holds the VIPs itself: to its kernel, IPv4 answers from a
    // local address are martians unless `accept_local` is set (as the README says); IPv6
    // has no such rule. The timed-out probes still end the backend's half-open connections.
    let vips_on_lb =
        |verb: &str| format!("addr {verb} {VIP4}/32 dev lo\naddr {verb} {VIP6}/128 dev lo\n");
    s.lb.ip_batch(&format!("{}link set lo up\n", vips_on_lb("add")))
        .expect("VIPs on the load balancer");
    assert_fails(&s, &fams[0], tcp(), "with the VIP on the LB", "timeout");
    assert_fails(&s, &fams[0], udp(), "with the VIP on the LB", "timeout");
    assert_passes(&s, &fams[1], tcp(), "with the VIP on the LB");
    assert_passes(&s, &fams[1], udp(), "with the VIP on the LB");
    s.lb.sysctls(&[("net.ipv4.conf.tl.accept_local", "1")])
        .expect("accept_local");
    assert_passes(
        &s,
        &fams[0],
        tcp(),
        "with the VIP on the LB and accept_local",
    );
    assert_passes(
        &s,
        &fams[0],
        udp(),
        "with the VIP on the LB and accept_local",
    );
    cmd::wait_until(
        "no half-open connections on the backend after timeouts",
        Duration::from_secs(2),
        Duration::from_millis(20),
        || Ok(half_open(&s)? == 0),
    )
    .expect("half-open connections left after timed-out probes");
    s.lb.ip_batch(&vips_on_lb("del"))
        .expect("VIPs off the load balancer");

    // The servers stop: a SYN to the VIP is reset, a datagram goes unanswered.
    drop(servers);
    for f in &fams {
        assert_fails(&s, f, tcp(), "after the listener stopped", REFUSED);
        assert_fails(&s, f, udp(), "after the echo stopped", "timeout");
    }

    // Back, then the decapsulator leaves: the same checks fail again.
    let _servers = Servers::start(&s.backend).expect("servers again");
    for f in &fams {
        assert_passes(&s, f, tcp(), "with the servers back");
        assert_passes(&s, f, udp(), "with the servers back");
    }
    let out = decap(&s, &["--detach"]).expect("detach");
    assert!(out.contains("detached"), "{out}");
    cmd::wait_until(
        "the XDP program to leave tb",
        Duration::from_secs(3),
        Duration::from_millis(20),
        || {
            Ok(!s
                .backend
                .ip(&["-d", "link", "show", "tb"])?
                .contains("prog/xdp"))
        },
    )
    .expect("detached");
    for f in &fams {
        assert_fails(&s, f, tcp(), "after detach", "timeout");
        assert_fails(&s, f, udp(), "after detach", "timeout");
    }
}

/// `xlb daemon` in the load balancer's namespace: four "ipip" services (tcp and udp, both
/// VIPs) with the backend, checked through the tunnel every 200 ms.
struct Daemon {
    child: NsChild,
    socket: PathBuf,
}

impl Daemon {
    fn start(s: &Setup) -> Result<Self> {
        std::fs::create_dir_all(&s.work)
            .with_context(|| format!("creating {}", s.work.display()))?;
        let mut config = format!(
            "interface = \"tl\"\nxdp_mode = \"generic\"\npin_dir = \"{}\"\n\
             state_file = \"{}\"\nmaglev_table_size = 251\n",
            s.pin_root.join("lb").display(),
            s.work.join("state.json").display()
        );
        for (name, vip, backend, proto) in [
            ("tcp4", VIP4, B4, "tcp"),
            ("udp4", VIP4, B4, "udp"),
            ("tcp6", VIP6, B6, "tcp"),
            ("udp6", VIP6, B6, "udp"),
        ] {
            let expect = if proto == "udp" {
                "udp_expect = \"pong:ping\"\n"
            } else {
                ""
            };
            config.push_str(&format!(
                "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {PORT}\n\
                 protocol = \"{proto}\"\nforward_mode = \"ipip\"\n\
                 [[service.backend]]\nname = \"b\"\naddress = \"{backend}\"\n\
                 [service.health]\nvia = \"tunnel\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\
                 rise = 2\nfall = 2\n{expect}"
            ));
        }
        let path = s.work.join("xlb.toml");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let socket = s.work.join("xlb.sock");
        let bin = xlb_bin()?;
        let child = s.lb.spawn(&[
            bin.to_str().context("xlb path is not UTF-8")?,
            "--socket",
            socket.to_str().context("socket path is not UTF-8")?,
            "daemon",
            "--config",
            path.to_str().context("config path is not UTF-8")?,
        ])?;
        let d = Self { child, socket };
        cmd::wait_until(
            "the daemon to answer",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || Ok(d.backends(s).is_ok()),
        )
        .with_context(|| format!("daemon log:\n{}", d.child.log()))?;
        Ok(d)
    }

    /// `xlb backend list SERVICE --json` for every service: service -> its backend "b".
    fn backends(&self, s: &Setup) -> Result<Vec<(String, serde_json::Value)>> {
        let bin = xlb_bin()?;
        let bin = bin.to_str().context("xlb path is not UTF-8")?;
        let socket = self.socket.to_str().context("socket path is not UTF-8")?;
        let mut out = Vec::new();
        for svc in ["tcp4", "udp4", "tcp6", "udp6"] {
            let text =
                s.lb.exec_ok(&[bin, "--socket", socket, "--json", "backend", "list", svc])?;
            let list: serde_json::Value =
                serde_json::from_str(&text).context("backend list JSON")?;
            let b = list
                .as_array()
                .and_then(|l| l.iter().find(|b| b["name"] == "b"))
                .cloned()
                .with_context(|| format!("no backend b in {svc}: {list}"))?;
            out.push((svc.to_string(), b));
        }
        Ok(out)
    }

    /// Waits until the backend's health is `health` in every service, and its last
    /// reason contains the service's entry of `why` (tcp, udp) when given.
    fn wait_health(&self, s: &Setup, health: &str, why: Option<(&str, &str)>) {
        let mut last = Vec::new();
        let ok = cmd::wait_until(
            &format!("the backend {health} in every service"),
            Duration::from_secs(5),
            Duration::from_millis(50),
            || {
                last = self.backends(s)?;
                Ok(last.iter().all(|(svc, b)| {
                    let reason = b["reason"].as_str().unwrap_or("");
                    b["health"] == health
                        && why.is_none_or(|(tcp, udp)| {
                            reason.contains(if svc.starts_with("tcp") { tcp } else { udp })
                        })
                }))
            },
        );
        if let Err(e) = ok {
            panic!(
                "{e:#}: {last:?}\ndaemon log:\n{}",
                cmd::tail(self.child.log().as_bytes())
            );
        }
    }
}

/// The daemon picks the tunnel for `via = "tunnel"`: it marks the backend down and up
/// as the VIP's servers and the decapsulator come and go, although nothing ever
/// listens on the backend's own address.
#[test]
fn daemon_checks_through_the_tunnel() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("e2e tests need root: run `cargo xtask test` as root");
    }
    let s = setup("d").expect("namespaces");
    decap(&s, &["--xdp-mode", "generic", "--vip", VIP4, "--vip", VIP6]).expect("xlb decap");
    // A first start: the backends start up, before any check.
    let d = Daemon::start(&s).expect("xlb daemon");

    // No servers: a SYN to the VIP is reset, a datagram goes unanswered.
    d.wait_health(&s, "down", Some((REFUSED, "timeout")));
    let servers = Servers::start(&s.backend).expect("servers");
    d.wait_health(&s, "up", None);
    // Without the decapsulator nothing answers, although the servers run.
    decap(&s, &["--detach"]).expect("detach");
    d.wait_health(&s, "down", Some(("timeout", "timeout")));
    decap(&s, &["--xdp-mode", "generic", "--vip", VIP4, "--vip", VIP6]).expect("xlb decap again");
    d.wait_health(&s, "up", None);
    drop(servers);
    d.wait_health(&s, "down", Some((REFUSED, "timeout")));
}
