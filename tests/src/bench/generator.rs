//! The packet-rate parts' traffic generators. Both send 64-byte frames
//! (60 bytes plus FCS) from `CLIENTS` client addresses out of `gen0`,
//! one sender per CPU used, each on its own queue:
//!
//! - **live frames**: BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES`
//!   runs `xlb_gen`, which rewrites each frame's client and XDP_TXes it.
//!   The cheapest generator, but some kernel builds refuse it (EPERM even
//!   as root), so it is probed before use.
//! - **AF_PACKET**: `sendmmsg` on a raw packet socket with
//!   `PACKET_QDISC_BYPASS`, one prebuilt frame per client (the kernel copies
//!   each into an skb and hands it straight to the veth, so the frames are
//!   never rewritten). Works wherever a veth does; every frame costs an skb
//!   and a copy into the XDP receiver's page, so its ceiling is lower.
//!   (A `PACKET_TX_RING` was measured about 15% slower here: its frames
//!   reference the ring's pages, which veth must copy once more.)
//!
//! Figures of the two are not comparable with each other; ratios within one
//! run are, and every table names the generator that produced it.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    sync::Barrier,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunAttrs, TestRunOptions},
};
use serde::Serialize;
use xlb::{dataplane::PASS_OBJ, objects::GEN_OBJ};

use super::traffic::{BATCH, CLIENTS, GEN_MAC, RateLab, load_prog, load_with, xdp};
use crate::{
    frames::{LB_MAC, fill_checksums},
    netns,
};

/// Which generator a rate part should use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Pick {
    /// Live frames where the kernel allows them, else AF_PACKET.
    Auto,
    /// Live frames only (a refusal makes the part fail with the kernel's reason).
    LiveFrames,
    /// AF_PACKET, even where live frames would work.
    AfPacket,
}

impl Pick {
    /// Parses the bench's `--generator` value.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "live-frames" => Self::LiveFrames,
            "af-packet" => Self::AfPacket,
            other => bail!("unknown generator {other:?} (auto, live-frames or af-packet)"),
        })
    }
}

/// The generator that produced a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Generator {
    /// BPF_PROG_TEST_RUN live frames running `xlb_gen`.
    LiveFrames,
    /// AF_PACKET `sendmmsg` with qdisc bypass.
    AfPacket,
}

impl Generator {
    /// The name the report prints next to every figure.
    pub fn label(self) -> &'static str {
        match self {
            Self::LiveFrames => "XDP live frames (BPF_PROG_TEST_RUN)",
            Self::AfPacket => "AF_PACKET sendmmsg (qdisc bypass)",
        }
    }
}

/// Asks the kernel for one live-frames test run of an XDP_PASS program on
/// `gen0` (the frame enters the generator namespace's own stack and is
/// dropped there). `Err` carries the kernel's refusal.
pub(super) fn probe_live_frames(lab: &RateLab, frame: &[u8]) -> Result<()> {
    let mut pass = load_prog(PASS_OBJ, "xlb_pass")?;
    let prog = xdp(&mut pass, "xlb_pass")?;
    let ifindex = gen_ifindex(lab)?;
    lab.gen_ns.run(|| {
        let ctx = xdp_md(frame.len(), ifindex, 0);
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat: 1,
            attrs: TestRunAttrs::new().xdp_live_frames(1),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES")?;
        Ok(())
    })
}

/// `struct xdp_md` for a test run: data, data_end, data_meta, ingress_ifindex,
/// rx_queue_index, egress_ifindex.
fn xdp_md(len: usize, ifindex: u32, queue: u32) -> Vec<u8> {
    let md: [u32; 6] = [0, len as u32, 0, ifindex, queue, 0];
    md.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// The ifindex of `gen0` inside the generator namespace.
pub(super) fn gen_ifindex(lab: &RateLab) -> Result<u32> {
    lab.gen_ns.run(|| ifindex("gen0"))
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("ifname")?;
    // SAFETY: valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        bail!("{name} not found in this namespace");
    }
    Ok(ifindex)
}

/// A chosen generator, ready to send from the lab's `gen0`.
pub(super) struct TrafficGen {
    kind: Generator,
    /// `xlb_gen`, loaded (live frames only).
    live: Option<Ebpf>,
    /// Why this generator was chosen (the probe's refusal, or a forced pick).
    why: String,
}

impl TrafficGen {
    /// Chooses the generator for `pick`, probing live frames with `frame`.
    pub(super) fn new(lab: &RateLab, pick: Pick, frame: &[u8]) -> Result<Self> {
        let (kind, why) = match pick {
            Pick::AfPacket => (Generator::AfPacket, "chosen with --generator".to_string()),
            Pick::LiveFrames => {
                probe_live_frames(lab, frame).context("live frames were asked for")?;
                (Generator::LiveFrames, "chosen with --generator".to_string())
            }
            Pick::Auto => match probe_live_frames(lab, frame) {
                Ok(()) => (
                    Generator::LiveFrames,
                    "this kernel allows live-frames test runs".to_string(),
                ),
                Err(e) => (
                    Generator::AfPacket,
                    format!("this kernel refuses live-frames test runs ({e:#})"),
                ),
            },
        };
        let live = match kind {
            Generator::LiveFrames => {
                let mut macs = [0u8; 12];
                macs[..6].copy_from_slice(&LB_MAC);
                macs[6..].copy_from_slice(&GEN_MAC);
                let mut loader = EbpfLoader::new();
                loader
                    .override_global("XLB_GEN_CLIENTS", &CLIENTS, true)
                    .override_global("XLB_GEN_MACS", &macs, true);
                Some(load_with(loader, GEN_OBJ, "xlb_gen")?)
            }
            Generator::AfPacket => None,
        };
        Ok(Self { kind, live, why })
    }

    /// The generator in use.
    pub fn kind(&self) -> Generator {
        self.kind
    }

    /// Frames per run for a budget given in live frames: AF_PACKET sends
    /// about a fifth as fast, so it gets a fifth of the frames and a run
    /// takes about as long.
    pub fn frames_per_run(&self, live_frames: u32) -> u32 {
        match self.kind {
            Generator::LiveFrames => live_frames,
            Generator::AfPacket => (live_frames / 5).max(BATCH),
        }
    }

    /// One sentence for a table's description: which generator, and why.
    pub fn describe(&self) -> String {
        format!("Generator: {}; {}.", self.kind.label(), self.why)
    }

    /// One burst: a sender per CPU in `cpus`, pinned to it and using its own
    /// queue of `gen0`, each sending `frames` copies of `frame` with the
    /// client address cycling through `CLIENTS` values. Returns the wall
    /// time from the common start until the last sender finished.
    pub(super) fn burst(
        &mut self,
        lab: &RateLab,
        frame: &[u8],
        cpus: &[usize],
        frames: u32,
    ) -> Result<f64> {
        let ifindex = gen_ifindex(lab)?;
        let slots = match self.kind {
            Generator::LiveFrames => Vec::new(),
            Generator::AfPacket => client_frames(frame)?,
        };
        let live = match &mut self.live {
            Some(ebpf) => Some(&*xdp(ebpf, "xlb_gen")?),
            None => None,
        };
        let start_line = Barrier::new(cpus.len() + 1);
        std::thread::scope(|s| -> Result<f64> {
            let threads: Vec<_> = cpus
                .iter()
                .enumerate()
                .map(|(queue, &cpu)| {
                    let (start_line, slots) = (&start_line, &slots);
                    s.spawn(move || -> Result<()> {
                        // Every sender reaches the barrier, also after a failed
                        // set-up: otherwise the others would wait forever.
                        let ready = netns::enter(lab.gen_ns.path())
                            .and_then(|()| pin_to(cpu))
                            .and_then(|()| match live {
                                Some(_) => Ok(None),
                                None => PacketSocket::open("gen0", slots).map(Some),
                            });
                        start_line.wait();
                        match (ready?, live) {
                            (Some(socket), _) => socket
                                .send(u64::from(frames))
                                .with_context(|| format!("AF_PACKET sender on CPU {cpu}")),
                            (None, Some(prog)) => {
                                let ctx = xdp_md(frame.len(), ifindex, queue as u32);
                                prog.test_run(TestRunOptions {
                                    data_in: Some(frame),
                                    ctx_in: Some(&ctx),
                                    repeat: frames,
                                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                                    ..Default::default()
                                })
                                .with_context(|| format!("live-frames generator on CPU {cpu}"))?;
                                Ok(())
                            }
                            (None, None) => bail!("no generator loaded"),
                        }
                    })
                })
                .collect();
            start_line.wait();
            let start = Instant::now();
            let mut first_err = None;
            for t in threads {
                let r = match t.join() {
                    Ok(r) => r,
                    Err(panic) => std::panic::resume_unwind(panic),
                };
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
            let secs = start.elapsed().as_secs_f64();
            first_err.map_or(Ok(secs), Err)
        })
    }
}

/// Pins the calling thread to `cpu`.
pub(super) fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the callers pass CPUs from the affinity mask, below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; set is valid for its size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning a generator thread to CPU {cpu}"));
    }
    Ok(())
}

/// `CLIENTS` copies of the 60-byte IPv4 `template`, the low 16 bits of the
/// source address set to the client's number (as `xlb_gen` does), the
/// generator's MACs and valid checksums.
pub(super) fn client_frames(template: &[u8]) -> Result<Vec<Vec<u8>>> {
    if template.len() < 34 || template[12..14] != [0x08, 0x00] {
        bail!("the generator sends untagged IPv4 frames");
    }
    Ok((0..CLIENTS)
        .map(|client| {
            let mut f = template.to_vec();
            f[..6].copy_from_slice(&LB_MAC);
            f[6..12].copy_from_slice(&GEN_MAC);
            f[28..30].copy_from_slice(&(client as u16).to_be_bytes());
            fill_checksums(&mut f[14..]);
            f
        })
        .collect())
}

/// Frames handed to the kernel per `sendmmsg` call.
const VLEN: usize = 64;
/// No burst may take longer: a stuck socket fails the part instead of hanging it.
const BURST_LIMIT: Duration = Duration::from_secs(120);

/// An AF_PACKET socket bound to one interface, bypassing the qdisc, and the
/// prebuilt frames it sends in turn.
struct PacketSocket<'a> {
    fd: OwnedFd,
    frames: &'a [Vec<u8>],
}

impl<'a> PacketSocket<'a> {
    /// Opens the socket in the calling thread's namespace, bound to `ifname`.
    fn open(ifname: &str, frames: &'a [Vec<u8>]) -> Result<Self> {
        if frames.is_empty() {
            bail!("the AF_PACKET generator needs frames to send");
        }
        // The flood tests' transmit-only socket (protocol 0: it receives nothing).
        let fd = crate::flood::packet_socket(ifname)?;
        setsockopt(&fd, libc::SOL_PACKET, PACKET_QDISC_BYPASS, &1i32)
            .context("PACKET_QDISC_BYPASS")?;
        // Room for many batches in flight; the default send buffer holds ~250 skbs.
        // Best effort: a smaller buffer only means more backpressure retries.
        let _ = setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &(8i32 << 20));
        Ok(Self { fd, frames })
    }

    /// Sends `count` frames, cycling through the prebuilt ones, `VLEN` per call.
    /// Backpressure (a full send buffer or veth ring) is retried, not counted.
    fn send(&self, count: u64) -> Result<()> {
        let deadline = Instant::now() + BURST_LIMIT;
        let mut iov: Vec<libc::iovec> = self
            .frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: mmsghdr is plain data; zeroed is "no address, no control".
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = v;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        let mut left = count;
        let mut at = 0usize;
        while left > 0 {
            let n = VLEN.min(hdrs.len() - at).min(left as usize);
            // SAFETY: n headers from `at`, each pointing at one live iovec of a
            // live frame; the kernel only reads them.
            let rc = unsafe {
                libc::sendmmsg(self.fd.as_raw_fd(), hdrs.as_mut_ptr().add(at), n as u32, 0)
            };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR) => {
                        if Instant::now() > deadline {
                            bail!("no frame accepted for {BURST_LIMIT:?} ({left} left)");
                        }
                        std::thread::yield_now();
                        continue;
                    }
                    _ => return Err(e).context("sendmmsg on the AF_PACKET socket"),
                }
            }
            let sent = rc as usize;
            left -= sent as u64;
            at = (at + sent) % hdrs.len();
            if Instant::now() > deadline {
                bail!("the burst took longer than {BURST_LIMIT:?} ({left} frames left)");
            }
        }
        Ok(())
    }
}

/// `PACKET_QDISC_BYPASS` (linux/if_packet.h): straight to the driver, as pktgen does.
const PACKET_QDISC_BYPASS: libc::c_int = 20;

fn setsockopt<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: value points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
