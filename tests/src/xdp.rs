//! A two-instruction XDP_PASS program attached through a BPF link, without any eBPF toolchain.
//!
//! Native XDP_TX on a veth only delivers when the peer veth has an XDP program too;
//! this is that program. It is loaded with the raw `bpf(2)` syscall so the lab does
//! not depend on the eBPF crate the load balancer is built from.

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_PASS: i32 = 2;

/// Which XDP attach mode to request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Driver (native) mode: what veth XDP_TX needs on the peer.
    Native,
    /// Generic (skb) mode.
    Generic,
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct BpfInsn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The prefix of `union bpf_attr` used by BPF_PROG_LOAD (the kernel zero-fills the rest).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The prefix of `union bpf_attr` used by BPF_LINK_CREATE.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// An attached XDP_PASS program; detached when dropped (closing the link fd).
#[derive(Debug)]
pub struct XdpPass {
    _link: OwnedFd,
    _prog: OwnedFd,
    /// Namespace and interface it is attached to.
    pub target: (String, String),
}

/// Issues `bpf(cmd, attr)` and returns the new fd.
fn bpf_fd<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: attr points to a live, fully initialised repr(C) prefix of bpf_attr of the given size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T as *const libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd =
        i32::try_from(rc).map_err(|_| io::Error::other("bpf() returned an fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads an XDP_PASS program and attaches it to `ifname` inside `ns` through a BPF link.
pub fn attach_pass(ns: &NetNs, ifname: &str, mode: XdpMode) -> Result<XdpPass> {
    let insns = [
        // r0 = XDP_PASS
        BpfInsn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: XDP_PASS,
        },
        // exit
        BpfInsn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(b"xlb_pass");
    let load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_XDP,
    };
    let prog = bpf_fd(BPF_PROG_LOAD, &load).context("loading the XDP_PASS program")?;
    let flags = match mode {
        XdpMode::Native => XDP_FLAGS_DRV_MODE,
        XdpMode::Generic => XDP_FLAGS_SKB_MODE,
    };
    let c_ifname = CString::new(ifname).context("interface name contains NUL")?;
    let prog_fd = {
        use std::os::fd::AsRawFd;
        u32::try_from(prog.as_raw_fd()).context("negative prog fd")?
    };
    // if_nametoindex and the link both resolve against the thread's namespace, so both run inside it.
    let link = ns.run(|| {
        // SAFETY: c_ifname is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c_ifname.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {ifname} in netns {}", ns.name());
        }
        let attr = LinkCreateAttr {
            prog_fd,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags,
        };
        bpf_fd(BPF_LINK_CREATE, &attr)
            .with_context(|| format!("attaching XDP_PASS ({mode:?}) to {ifname} in {}", ns.name()))
    })?;
    Ok(XdpPass {
        _link: link,
        _prog: prog,
        target: (ns.name().to_owned(), ifname.to_owned()),
    })
}
