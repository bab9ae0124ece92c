//! End to end: `xlb decap` on a backend's veth turns IP-in-IP datagrams to a
//! VIP into plain ones its stack answers, and the plain reply goes straight
//! back to the sender. This kernel has no ipip/ip6tnl, so without the
//! decapsulator the backend never answers.
//!
//! Two namespaces of its own (`xlbdc-<pid>-<mode>-{s,b}`) joined by a veth:
//! the sender hand-builds encapsulated frames (AF_PACKET), the backend holds
//! the VIPs on `lo` and runs a UDP echo server on them. Needs root and the
//! release `xlb` binary (`XLB_BIN`); run by `cargo xtask test`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use xlb_tests::{
    NetNs, cmd,
    driver::xlb_bin,
    frames::{Encap, Frame, ip},
    netns,
};

const PREFIX: &str = "xlbdc-";
const S4: &str = "10.77.0.1";
const B4: &str = "10.77.0.2";
const S6: &str = "fd77::1";
const B6: &str = "fd77::2";
const VIP4: &str = "10.77.100.10";
const VIP6: &str = "fd77:100::10";
const ECHO_PORT: u16 = 7000;
/// How long the sender waits for one reply.
const REPLY_WAIT: Duration = Duration::from_millis(1000);
/// How long a datagram that must go unanswered is waited for.
const SILENCE_WAIT: Duration = Duration::from_millis(400);
/// Upper bound on the echo server's life, whatever the test does.
const SERVER_LIFETIME: Duration = Duration::from_secs(60);

/// The two namespaces, the backend's MAC and the pin root; all removed on drop.
struct Setup {
    sender: NetNs,
    backend: NetNs,
    sender_mac: [u8; 6],
    backend_mac: [u8; 6],
    pin_root: PathBuf,
    mode: &'static str,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // The namespaces go after this (field order) and take the veth, and
        // with it the attachment; the pins would outlive them.
        if let Err(e) = std::fs::remove_dir_all(&self.pin_root)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("xlb-tests: cannot remove {}: {e}", self.pin_root.display());
        }
    }
}

/// Removes namespaces and pin roots this test's earlier, dead processes left.
fn cleanup_stale() {
    // Only names of the form this test makes, whose process is gone.
    let stale = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for dir in [netns::NETNS_RUN_DIR, "/sys/fs/bpf"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !stale(&name) {
                continue;
            }
            if dir == netns::NETNS_RUN_DIR {
                let _ = cmd::ip(&["netns", "del", &name]);
            } else {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn mac_of(ns: &NetNs, ifname: &str) -> Result<[u8; 6]> {
    let json = ns.ip_json(&["link", "show", ifname])?;
    let text = json[0]["address"]
        .as_str()
        .with_context(|| format!("no MAC for {ifname} in {}", ns.name()))?;
    xlb::config::parse_mac(text)
}

fn setup(mode: &'static str) -> Result<Setup> {
    cleanup_stale();
    let id = format!("{PREFIX}{}-{mode}", std::process::id());
    let sender = NetNs::create(&format!("{id}-s"))?;
    let backend = NetNs::create(&format!("{id}-b"))?;
    sender.ip(&[
        "link",
        "add",
        "vs",
        "type",
        "veth",
        "peer",
        "name",
        "vb",
        "netns",
        backend.name(),
    ])?;
    sender.ip_batch(&format!(
        "addr add {S4}/24 dev vs\naddr add {S6}/64 dev vs nodad\nlink set vs up\n"
    ))?;
    backend.ip_batch(&format!(
        "addr add {B4}/24 dev vb\naddr add {B6}/64 dev vb nodad\nlink set vb up\n\
         addr add {VIP4}/32 dev lo\naddr add {VIP6}/128 dev lo\n"
    ))?;
    let setup = Setup {
        sender_mac: mac_of(&sender, "vs")?,
        backend_mac: mac_of(&backend, "vb")?,
        sender,
        backend,
        pin_root: PathBuf::from(format!("/sys/fs/bpf/{id}")),
        mode,
    };
    Ok(setup)
}

/// A UDP echo server on both VIPs in the backend namespace ("echo:" + the
/// datagram, sent from the VIP); stops when dropped.
struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &NetNs) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for vip in [VIP4, VIP6] {
            let addr = SocketAddr::new(ip(vip), ECHO_PORT);
            let sock =
                ns.run(|| UdpSocket::bind(addr).with_context(|| format!("binding {addr}")))?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .context("echo read timeout")?;
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let until = Instant::now() + SERVER_LIFETIME;
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let mut reply = b"echo:".to_vec();
                        reply.extend(&buf[..n]);
                        let _ = sock.send_to(&reply, from);
                    }
                }
            }));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs `xlb ARGS` in the backend namespace; returns (success, stdout, stderr).
fn xlb(s: &Setup, args: &[&str]) -> Result<(bool, String, String)> {
    let bin = xlb_bin()?;
    let bin = bin.to_str().context("xlb path is not UTF-8")?;
    let mut argv = vec![bin];
    argv.extend_from_slice(args);
    let out = s.backend.exec(&argv)?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn xlb_ok(s: &Setup, args: &[&str]) -> Result<String> {
    let (ok, stdout, stderr) = xlb(s, args)?;
    if !ok {
        bail!("xlb {} failed:\n{stdout}{stderr}", args.join(" "));
    }
    Ok(stdout)
}

fn pin_root(s: &Setup) -> String {
    s.pin_root.display().to_string()
}

/// Attaches (or adopts) with these VIPs.
fn decap_with(s: &Setup, vips: &[&str]) -> Result<String> {
    let root = pin_root(s);
    let mut args = vec![
        "decap",
        "--interface",
        "vb",
        "--xdp-mode",
        s.mode,
        "--pin-dir",
        &root,
    ];
    for v in vips {
        args.extend(["--vip", v]);
    }
    xlb_ok(s, &args)
}

/// Sends `frame` out of the sender's veth and waits up to `wait` for a UDP
/// datagram on `listen`; returns it and its source, or `None`.
fn exchange(
    s: &Setup,
    frame: &[u8],
    listen: SocketAddr,
    wait: Duration,
) -> Result<Option<(Vec<u8>, SocketAddr)>> {
    s.sender.run(|| {
        let sock = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
        sock.set_read_timeout(Some(wait))
            .context("reply read timeout")?;
        send_raw("vs", s.backend_mac, frame)?;
        let mut buf = [0u8; 2048];
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => Ok(Some((buf[..n].to_vec(), from))),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).context("receiving the reply"),
        }
    })
}

/// Sends one whole Ethernet frame out of `ifname` (AF_PACKET, raw).
fn send_raw(ifname: &str, dst_mac: [u8; 6], frame: &[u8]) -> Result<()> {
    let index = xlb::decap::check_interface(ifname)?;
    // SAFETY: plain socket(2); protocol 0 receives nothing, it only sends.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst_mac);
    // SAFETY: frame and addr are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent != frame.len() as isize {
        return Err(std::io::Error::last_os_error()).context("sendto(AF_PACKET)");
    }
    Ok(())
}

/// One encapsulated datagram: outer `outer_src -> outer_dst`, inner from
/// `inner_src:sport` to `vip:ECHO_PORT`, checksums real.
fn encap(
    s: &Setup,
    outer: (&str, &str),
    inner_src: &str,
    vip: &str,
    sport: u16,
    payload: &[u8],
) -> Encap {
    let mut inner = Frame::udp(inner_src, vip, ECHO_PORT);
    inner.sport = sport;
    inner.payload = payload.to_vec();
    let mut e = Encap::new(outer.0, outer.1, inner);
    e.inner_checksums = true;
    e.src_mac = s.sender_mac;
    e.dst_mac = s.backend_mac;
    e
}

/// The four combinations: (name, outer src/dst, inner src, VIP).
const CASES: [(&str, (&str, &str), &str, &str); 4] = [
    ("4in4", (S4, B4), S4, VIP4),
    ("6in6", (S6, B6), S6, VIP6),
    ("6in4", (S4, B4), S6, VIP6),
    ("4in6", (S6, B6), S4, VIP4),
];

/// Sends case `i` up to three times; returns whether the echo came back
/// (asserting it came from the VIP, unencapsulated, with our payload).
fn answered(s: &Setup, i: usize, round: u16, attempts: usize) -> Result<bool> {
    let (name, outer, inner_src, vip) = CASES[i];
    let sport = 41000 + round * 10 + i as u16;
    let payload = format!("{name}-{round}");
    let e = encap(s, outer, inner_src, vip, sport, payload.as_bytes());
    let listen = SocketAddr::new(ip(inner_src), sport);
    let wait = if attempts == 1 {
        SILENCE_WAIT
    } else {
        REPLY_WAIT
    };
    for _ in 0..attempts {
        if let Some((reply, from)) = exchange(s, &e.build(), listen, wait)? {
            assert_eq!(
                from,
                SocketAddr::new(ip(vip), ECHO_PORT),
                "{name}: reply from the VIP"
            );
            assert_eq!(
                reply,
                format!("echo:{payload}").into_bytes(),
                "{name}: echoed payload"
            );
            return Ok(true);
        }
    }
    Ok(false)
}

fn counters(s: &Setup) -> Result<serde_json::Value> {
    let root = pin_root(s);
    let out = xlb_ok(
        s,
        &[
            "decap",
            "--interface",
            "vb",
            "--pin-dir",
            &root,
            "--stats",
            "--json",
        ],
    )?;
    serde_json::from_str(&out).context("xlb decap --stats --json is not JSON")
}

fn run_mode(mode: &'static str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("e2e tests need root: run `cargo xtask test` as root");
    }
    let s = setup(mode).expect("namespaces");
    let _echo = Echo::start(&s.backend).expect("echo server");
    let root = pin_root(&s);

    // The kernel alone does not decapsulate: no answer.
    assert!(
        !answered(&s, 0, 0, 1).expect("exchange"),
        "answered without the decapsulator: the kernel decapsulates IPIP after all?"
    );

    // Input errors are refused before anything is loaded.
    for (args, want) in [
        (vec!["decap", "--interface", "vb"], "no --vip given"),
        (
            vec!["decap", "--interface", "vb", "--vip", "10.77.100.x"],
            "is not an IPv4 or IPv6 address",
        ),
        (
            vec!["decap", "--interface", "nosuch0", "--vip", VIP4],
            "interface nosuch0 not found",
        ),
    ] {
        let (ok, _, stderr) = xlb(&s, &args).expect("xlb");
        assert!(!ok && stderr.contains(want), "{args:?}: {stderr}");
    }
    assert!(!s.pin_root.exists(), "a refused command pins nothing");

    let out = decap_with(&s, &[VIP4, VIP6]).expect("xlb decap");
    assert!(out.contains("attached"), "{out}");
    for (i, case) in CASES.iter().enumerate() {
        assert!(
            answered(&s, i, 1, 3).expect("exchange"),
            "{mode}: no reply to {}",
            case.0
        );
    }
    let stats = counters(&s).expect("stats");
    for name in ["decap_4in4", "decap_6in6", "decap_6in4", "decap_4in6"] {
        assert!(
            stats["counters"][name].as_u64().unwrap_or(0) >= 1,
            "{name}: {stats}"
        );
    }
    assert_eq!(stats["vips"], serde_json::json!([VIP4, VIP6]));

    // A second run adopts the attachment and replaces the VIP set.
    let out = decap_with(&s, &[VIP4]).expect("xlb decap again");
    assert!(out.contains("adopted"), "{out}");
    assert!(
        answered(&s, 0, 2, 3).expect("exchange"),
        "4in4 after adoption"
    );
    assert!(
        !answered(&s, 1, 2, 1).expect("exchange"),
        "6in6 to a removed VIP was answered"
    );
    let stats = counters(&s).expect("stats");
    assert!(stats["counters"]["pass_not_vip"].as_u64().unwrap_or(0) >= 1);

    // Detached: pins gone, and the kernel alone does not answer any more.
    let out = xlb_ok(
        &s,
        &["decap", "--interface", "vb", "--pin-dir", &root, "--detach"],
    )
    .expect("detach");
    assert!(out.contains("detached"), "{out}");
    assert!(!s.pin_root.join("vb").exists(), "pins removed");
    // The kernel releases an unpinned link from a work queue, a moment later.
    cmd::wait_until(
        "the XDP program to leave vb",
        Duration::from_secs(3),
        Duration::from_millis(20),
        || {
            Ok(!s
                .backend
                .ip(&["-d", "link", "show", "vb"])?
                .contains("prog/xdp"))
        },
    )
    .expect("detached");
    assert!(
        !answered(&s, 0, 3, 1).expect("exchange"),
        "answered after detach"
    );
}

#[test]
fn decap_generic() {
    run_mode("generic");
}

#[test]
fn decap_native() {
    run_mode("native");
}
