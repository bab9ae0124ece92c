//! The one owner of the XDP program: loads it (reusing compatible pinned
//! maps), attaches it or adopts an existing attachment, and writes the
//! config into the maps.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    Backend, FAMILY_V4, FAMILY_V6, FORWARD_DSR_L2, GLOBAL_DEBUG, GLOBAL_IFACE_MAC, MAP_AFFINITY,
    MAP_MAGLEV, MAX_BACKENDS, NO_BACKEND, SERVICE_F_FRAGMENTS, Service, ServiceKey, prefix_mask,
    words_from_bytes,
};

use crate::{
    config::{BackendState, Config, ServiceConfig, XdpMode},
    maglev::{self, MaglevBackend},
    pins::{self, PinnedMaps},
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
        let aya_mode = match mode {
            XdpMode::Native => AyaXdpMode::Driver,
            XdpMode::Generic => AyaXdpMode::Skb,
        };
        let program = self.program_mut()?;
        let id = program.attach(iface, aya_mode).map_err(|e| {
            let hint = match mode {
                XdpMode::Native => {
                    " (the driver may not support native XDP: retry with --xdp-mode generic)"
                }
                XdpMode::Generic => "",
            };
            anyhow!("attaching XDP to {iface} in {mode:?} mode failed: {e}{hint}")
        })?;
        let link = program.take_link(id).context("taking the XDP link")?;
        let fd_link = FdLink::try_from(link).context(
            "the kernel attached XDP without a bpf_link, so it cannot be pinned (kernel too old?)",
        )?;
        fd_link
            .pin(&link_pin)
            .with_context(|| format!("pinning the XDP link at {}", link_pin.display()))?;
        Ok(Attachment::New)
    }
}

/// Loads (or adopts) and attaches the dataplane for `config`, logging which
/// happened: the start of both `xlb run` and `xlb daemon`.
pub fn bring_up(config: &Config, debug: bool) -> Result<(Dataplane, Attachment)> {
    let mac = interface_mac(&config.interface)?;
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

/// What `apply` changed, for the operator.
#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    /// Services written (all of the config's).
    pub services: usize,
    /// Backends written.
    pub backends: usize,
    /// Services whose key was already in the map (ids kept).
    pub services_kept: usize,
    /// Services removed because the config no longer has them.
    pub services_removed: usize,
    /// Backends removed because the config no longer has them.
    pub backends_removed: usize,
    /// Affinity entries deleted because their service or backend was removed.
    pub sessions_removed: usize,
}

/// Address in key layout.
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            words_from_bytes(&b)
        }
        IpAddr::V6(a) => words_from_bytes(&a.octets()),
    }
}

/// Address family constant of an address.
pub fn family(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    }
}

/// The map key of a configured service.
pub fn service_key(svc: &ServiceConfig) -> ServiceKey {
    ServiceKey {
        addr: addr_words(svc.vip),
        port: svc.port.to_be(),
        proto: svc.protocol.number(),
        family: family(svc.vip),
    }
}

/// Writes `config` into the pinned maps, keeping the ids (and so the
/// sessions) of services and backends that already exist. Each service's
/// Maglev table is written into its idle slot and then made live by one
/// update of the service record, so no packet sees a half-written table.
pub fn apply(maps: &mut PinnedMaps, config: &Config) -> Result<ApplyReport> {
    let table_size = config.maglev_table_size;
    let capacity = maps.maglev_capacity()?;
    let mut report = ApplyReport::default();

    // What is there now: services by key, backends by (service id, address).
    let mut current: BTreeMap<ServiceKeyOrd, Service> = BTreeMap::new();
    for entry in maps.services.iter() {
        let (key, svc) = entry.context("reading the service map")?;
        if key.port != 0 {
            current.insert(ServiceKeyOrd(key), svc);
        }
    }
    let current_backends: StdHashMap<(u32, [u32; 4]), u32> = maps
        .live_backends()?
        .into_iter()
        .map(|(key, (id, _))| (key, id))
        .collect();

    // Service ids: keep existing, give new services the lowest free id.
    let wanted: Vec<(ServiceKey, &ServiceConfig)> = config
        .services
        .iter()
        .map(|s| (service_key(s), s))
        .collect();
    let mut used_ids: BTreeSet<u32> = BTreeSet::new();
    let mut service_ids = Vec::with_capacity(wanted.len());
    for (key, _) in &wanted {
        let id = current.get(&ServiceKeyOrd(*key)).map(|s| s.id);
        if let Some(id) = id {
            used_ids.insert(id);
            report.services_kept += 1;
        }
        service_ids.push(id);
    }
    for id in service_ids.iter_mut() {
        if id.is_none() {
            let free = (0..config.max_services)
                .find(|i| !used_ids.contains(i))
                .ok_or_else(|| {
                    anyhow!("more services than max_services = {}", config.max_services)
                })?;
            used_ids.insert(free);
            *id = Some(free);
        }
    }
    let service_ids: Vec<u32> = service_ids.into_iter().flatten().collect();
    for id in &service_ids {
        let end = (u64::from(*id) * 2 + 2) * u64::from(table_size);
        if end > u64::from(capacity) {
            bail!(
                "service id {id} needs Maglev entries up to {end} but the pinned map holds {capacity}: \
                 max_services or maglev_table_size changed; run `xlb detach` first"
            );
        }
    }

    // Backend ids: keep (service id, address) -> id, fill the rest from the free list.
    let mut backend_ids: Vec<Vec<u32>> = Vec::with_capacity(wanted.len());
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let mut pending = Vec::new();
    for (si, (_, svc)) in wanted.iter().enumerate() {
        let mut ids = Vec::with_capacity(svc.backends.len());
        for (bi, be) in svc.backends.iter().enumerate() {
            match current_backends.get(&(service_ids[si], addr_words(be.address))) {
                Some(id) => {
                    taken.insert(*id);
                    ids.push(*id);
                }
                None => {
                    pending.push((si, bi));
                    ids.push(NO_BACKEND);
                }
            }
        }
        backend_ids.push(ids);
    }
    // Ids of backends being removed are not reused in the same apply: their
    // sessions are deleted below, and must not be mistaken for new ones.
    let existing: BTreeSet<u32> = current_backends.values().copied().collect();
    let mut free = (0..MAX_BACKENDS)
        .filter(|i| !taken.contains(i) && !existing.contains(i))
        .collect::<Vec<_>>()
        .into_iter();
    for (si, bi) in pending {
        let id = free
            .next()
            .ok_or_else(|| anyhow!("more than {MAX_BACKENDS} backends in total"))?;
        backend_ids[si][bi] = id;
        taken.insert(id);
    }

    // Backends gone from the config: free their slots, forget their sessions.
    let removed_backends: BTreeSet<u32> = current_backends
        .values()
        .copied()
        .filter(|id| !taken.contains(id))
        .collect();
    for id in &removed_backends {
        maps.backends
            .set(*id, Backend::default(), 0)
            .with_context(|| format!("clearing backend {id}"))?;
    }
    report.backends_removed = removed_backends.len();

    // Backends, then tables, then the service records that make them live.
    for (si, (_, svc)) in wanted.iter().enumerate() {
        for (bi, be) in svc.backends.iter().enumerate() {
            let record = Backend {
                addr: addr_words(be.address),
                mac: be.mac,
                state: be.state.to_abi(),
                family: family(be.address),
                weight: be.weight,
                service_id: u16::try_from(service_ids[si]).context("service id exceeds u16")?,
            };
            maps.backends
                .set(backend_ids[si][bi], record, 0)
                .with_context(|| format!("writing backend {} of service {}", be.name, svc.name))?;
            report.backends += 1;
        }
    }

    let mut records: Vec<(ServiceKey, Service)> = Vec::with_capacity(wanted.len());
    for (si, (key, svc)) in wanted.iter().enumerate() {
        let id = service_ids[si];
        let old = current.get(&ServiceKeyOrd(*key));
        let slot = match old {
            Some(old) => 1 - (old.active_slot & 1),
            None => 0,
        };
        let base = |s: u32| (id * 2 + s) * table_size;
        let table = service_table(svc, &backend_ids[si], table_size)?;
        for (i, backend_id) in table.iter().enumerate() {
            maps.maglev
                .set(base(slot) + i as u32, *backend_id, 0)
                .with_context(|| format!("writing the Maglev table of service {}", svc.name))?;
        }
        let bits = if family(svc.vip) == FAMILY_V4 {
            32
        } else {
            128
        };
        let prefix = if bits == 32 {
            svc.affinity_prefix_v4
        } else {
            svc.affinity_prefix_v6
        };
        let timeout_ns = u64::try_from(svc.affinity_timeout.as_nanos()).unwrap_or(u64::MAX);
        let record = Service {
            id,
            flags: 0,
            timeout_ns,
            // Refresh at 1/8 of the timeout, at most once a second: a hit
            // rarely writes, and an entry can never look idle for more than
            // 1/8 of the timeout longer than it really is.
            refresh_ns: (timeout_ns / 8).min(1_000_000_000),
            mask: prefix_mask(prefix, bits),
            maglev_base: [base(0), base(1)],
            table_size,
            active_slot: slot,
            prefix_v4: svc.affinity_prefix_v4,
            prefix_v6: svc.affinity_prefix_v6,
            forward_mode: FORWARD_DSR_L2,
            _pad: [0; 5],
        };
        maps.services
            .insert(*key, record, 0)
            .with_context(|| format!("writing service {}", svc.name))?;
        records.push((*key, record));
        report.services += 1;
    }

    // Fragment entries: per (VIP, protocol), a copy of the lowest-port service.
    let mut frag: BTreeMap<ServiceKeyOrd, (u16, Service)> = BTreeMap::new();
    for (key, record) in &records {
        let fkey = ServiceKeyOrd(ServiceKey { port: 0, ..*key });
        let port = u16::from_be(key.port);
        if frag.get(&fkey).is_none_or(|(p, _)| port < *p) {
            let copy = Service {
                flags: record.flags | SERVICE_F_FRAGMENTS,
                ..*record
            };
            frag.insert(fkey, (port, copy));
        }
    }
    for (fkey, (_, record)) in &frag {
        maps.services
            .insert(fkey.0, *record, 0)
            .context("writing a fragment entry")?;
    }

    // Services gone from the config, and stale fragment entries.
    let keep: BTreeSet<ServiceKeyOrd> = records
        .iter()
        .map(|(k, _)| ServiceKeyOrd(*k))
        .chain(frag.keys().copied())
        .collect();
    let mut stale = Vec::new();
    for key in maps.services.keys() {
        let key = key.context("reading the service map")?;
        if !keep.contains(&ServiceKeyOrd(key)) {
            stale.push(key);
        }
    }
    let live_ids: BTreeSet<u32> = service_ids.iter().copied().collect();
    let mut removed_services = BTreeSet::new();
    for key in stale {
        if key.port != 0 {
            if let Some(old) = current.get(&ServiceKeyOrd(key)) {
                if !live_ids.contains(&old.id) {
                    removed_services.insert(old.id);
                }
            }
            report.services_removed += 1;
        }
        maps.services
            .remove(&key)
            .context("removing a stale service entry")?;
    }

    // Sessions of removed services/backends would otherwise point at ids
    // that a later config may give to someone else.
    if !removed_services.is_empty() || !removed_backends.is_empty() {
        let mut doomed = Vec::new();
        for entry in maps.affinity.iter() {
            let (key, value) = entry.context("reading the affinity map")?;
            if removed_services.contains(&key.service_id)
                || removed_backends.contains(&value.backend_id)
            {
                doomed.push(key);
            }
        }
        for key in &doomed {
            // Already gone (LRU eviction) is fine.
            let _ = maps.affinity.remove(key);
        }
        report.sessions_removed = doomed.len();
    }
    Ok(report)
}

/// The Maglev table of `svc`: its active backends, weighted, keyed by
/// address (so every xlb instance builds the same table), holding the
/// backend ids `ids` (parallel to `svc.backends`).
pub fn service_table(svc: &ServiceConfig, ids: &[u32], table_size: u32) -> Result<Vec<u32>> {
    let keys: Vec<[u8; 16]> = svc
        .backends
        .iter()
        .map(|b| lb_common::bytes_from_words(&addr_words(b.address)))
        .collect();
    let members: Vec<MaglevBackend<'_>> = svc
        .backends
        .iter()
        .zip(ids)
        .zip(&keys)
        .filter(|((b, _), _)| b.state == BackendState::Active)
        .map(|((b, id), key)| MaglevBackend {
            id: *id,
            key,
            weight: u32::from(b.weight),
        })
        .collect();
    maglev::build_table(&members, table_size)
        .with_context(|| format!("building the Maglev table of service {}", svc.name))
}

/// `ServiceKey` with a total order (family, address, protocol, port), for
/// deterministic maps and sets.
#[derive(Clone, Copy, PartialEq, Eq)]
struct ServiceKeyOrd(ServiceKey);

impl ServiceKeyOrd {
    fn tuple(&self) -> (u8, [u8; 16], u8, u16) {
        let k = &self.0;
        (
            k.family,
            lb_common::bytes_from_words(&k.addr),
            k.proto,
            u16::from_be(k.port),
        )
    }
}

impl Ord for ServiceKeyOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.tuple().cmp(&other.tuple())
    }
}

impl PartialOrd for ServiceKeyOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
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
