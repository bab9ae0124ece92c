//! Loading the xlb program (reusing compatible pinned maps), attaching it
//! to an interface or adopting the attachment an earlier run pinned, and
//! taking it off again.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{GLOBAL_DEBUG, GLOBAL_IFACE_MAC, MAP_AFFINITY, MAP_MAGLEV, MAP_PROTECTED};

use crate::{
    config::{Config, XdpMode},
    pins,
};

/// The load balancer program, compiled by build.rs from lb-ebpf.
pub static XLB_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb"));
/// A program that passes every frame (veth peers, benchmark floor).
pub static PASS_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-pass"));

/// Name of the XDP program inside `XLB_OBJ`.
pub const PROGRAM: &str = "xlb";

/// What the loader needs besides the config's service list.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Pin directory of this interface (maps and link).
    pub pin_dir: PathBuf,
    /// Affinity map capacity.
    pub affinity_max_entries: u32,
    /// Maglev table size (prime).
    pub maglev_table_size: u32,
    /// Service table slots reserved in the Maglev map.
    pub max_services: u32,
    /// MAC of the interface the program serves (source of rewritten frames).
    pub iface_mac: [u8; 6],
    /// Log every new session through aya-log.
    pub debug: bool,
}

impl LoadOptions {
    /// Options for `config`, with the MAC of its interface.
    pub fn from_config(config: &Config, iface_mac: [u8; 6], debug: bool) -> Self {
        Self {
            pin_dir: config.pin_path(),
            affinity_max_entries: config.affinity_max_entries,
            maglev_table_size: config.maglev_table_size,
            max_services: config.max_services,
            iface_mac,
            debug,
        }
    }

    fn maglev_entries(&self) -> Result<u32> {
        self.max_services
            .checked_mul(2)
            .and_then(|n| n.checked_mul(self.maglev_table_size))
            .ok_or_else(|| anyhow!("max_services * 2 * maglev_table_size overflows u32"))
    }
}

/// How `attach` found the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// No pinned link existed: attached and pinned a new one.
    New,
    /// A pinned link existed: swapped our program in behind it.
    Adopted,
}

/// A loaded (not necessarily attached) xlb program with its pinned maps.
pub struct Dataplane {
    ebpf: Ebpf,
    opts: LoadOptions,
}

impl Dataplane {
    /// Loads the program, creating the maps or reusing compatible pinned ones.
    pub fn load(opts: LoadOptions) -> Result<Self> {
        pins::ensure_bpffs()?;
        std::fs::create_dir_all(&opts.pin_dir)
            .with_context(|| format!("creating pin directory {}", opts.pin_dir.display()))?;
        let maglev_entries = opts.maglev_entries()?;
        pins::check_pinned(
            &opts.pin_dir,
            &pins::expected_specs(opts.affinity_max_entries, maglev_entries),
        )?;
        let debug = u8::from(opts.debug);
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&opts.pin_dir)
            .map_max_entries(MAP_AFFINITY, opts.affinity_max_entries)
            .map_max_entries(MAP_PROTECTED, opts.affinity_max_entries)
            .map_max_entries(MAP_MAGLEV, maglev_entries)
            .override_global(GLOBAL_DEBUG, &debug, true)
            .override_global(GLOBAL_IFACE_MAC, &opts.iface_mac, true)
            .load(XLB_OBJ)
            .context("loading the xlb eBPF object")?;
        let mut dp = Self { ebpf, opts };
        dp.program_mut()?
            .load()
            .context("loading the XDP program into the kernel (verifier)")?;
        Ok(dp)
    }

    /// The XDP program (for attaching or BPF_PROG_TEST_RUN).
    pub fn program_mut(&mut self) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("program {PROGRAM} missing from the object"))?
            .try_into()
            .context("program xlb is not XDP")
    }

    /// The eBPF object (for attaching a logger).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The options this dataplane was loaded with.
    pub fn options(&self) -> &LoadOptions {
        &self.opts
    }

    /// Attaches to `iface`, or adopts the link pinned by an earlier run (the
    /// program is swapped atomically; maps and sessions stay).
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<Attachment> {
        let link_pin = pins::link_path(&self.opts.pin_dir);
        if link_pin.exists() {
            let pinned = PinnedLink::from_pin(&link_pin)
                .with_context(|| format!("opening pinned link {}", link_pin.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .context("pinned link is not an XDP link")?;
            self.program_mut()?
                .attach_to_link(link)
                .with_context(|| format!("replacing the program behind {}", link_pin.display()))?;
            return Ok(Attachment::Adopted);
        }
        attach_and_pin(self.program_mut()?, "xlb", iface, mode, &link_pin)
    }
}

/// Attaches `program` (named `what` in errors) to `iface` in `mode` through
/// a bpf_link and pins the link at `link_pin`, so the program outlives the
/// process: how `xlb run`, the daemon and `xlb decap` attach anew.
pub fn attach_and_pin(
    program: &mut Xdp,
    what: &str,
    iface: &str,
    mode: XdpMode,
    link_pin: &Path,
) -> Result<Attachment> {
    let aya_mode = match mode {
        XdpMode::Native => AyaXdpMode::Driver,
        XdpMode::Generic => AyaXdpMode::Skb,
    };
    let id = program.attach(iface, aya_mode).map_err(|e| {
        let hint = match mode {
            XdpMode::Native => {
                " (the driver may not support native XDP, or another XDP program is attached: \
                 retry with --xdp-mode generic)"
            }
            XdpMode::Generic => " (is another XDP program attached in generic mode?)",
        };
        anyhow!("attaching {what} to {iface} in {mode:?} mode failed: {e}{hint}")
    })?;
    let link = program.take_link(id).context("taking the XDP link")?;
    let fd_link = FdLink::try_from(link).context(
        "the kernel attached XDP without a bpf_link, so it cannot be pinned (kernel too old?)",
    )?;
    fd_link
        .pin(link_pin)
        .with_context(|| format!("pinning the XDP link at {}", link_pin.display()))?;
    Ok(Attachment::New)
}

/// Loads (or adopts) and attaches the dataplane for `config`, logging which
/// happened: the start of both `xlb run` and `xlb daemon`.
pub fn bring_up(config: &Config, debug: bool) -> Result<(Dataplane, Attachment)> {
    let mac = interface_mac(&config.interface)?;
    config.check_against_interface(mac)?;
    // After ensure_bpffs: xlb may mount the bpffs the pin_dir is on itself.
    pins::ensure_bpffs().and_then(|()| pins::check_pin_dir(&config.pin_dir))?;
    let mut dp = Dataplane::load(LoadOptions::from_config(config, mac, debug))?;
    let attachment = dp.attach(&config.interface, config.xdp_mode)?;
    match attachment {
        Attachment::New => tracing::info!(
            interface = %config.interface,
            mode = ?config.xdp_mode,
            mac = %crate::config::format_mac(&mac),
            pins = %config.pin_path().display(),
            "attached xlb"
        ),
        Attachment::Adopted => tracing::info!(
            interface = %config.interface,
            pins = %config.pin_path().display(),
            "adopted the existing xlb dataplane (sessions kept, program replaced)"
        ),
    }
    Ok((dp, attachment))
}

/// The index of interface `name` in the current network namespace.
pub fn interface_index(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)
        .with_context(|| format!("interface name {name:?} contains a NUL byte"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("interface {name} not found in this network namespace"));
    }
    Ok(index)
}

/// Reads the MAC of `iface` in the current network namespace (sysfs may
/// show another namespace when run under `nsenter --net`).
pub fn interface_mac(iface: &str) -> Result<[u8; 6]> {
    if iface.is_empty() || iface.len() >= libc::IFNAMSIZ {
        bail!("interface name {iface:?} is empty or longer than 15 bytes");
    }
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket() for SIOCGIFHWADDR");
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr within req.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCGIFHWADDR,
            &mut req,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("interface {iface} not found in this network namespace"));
    }
    // SAFETY: SIOCGIFHWADDR filled the ifr_hwaddr member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

/// Detaches the program from the interface of `pin_dir` and removes every pin.
pub fn detach(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    pins::remove_all(pin_dir)
}
