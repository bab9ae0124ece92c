//! The IP-in-IP decapsulator for backends (`xlb decap`): a small XDP program
//! of its own (`lb-ebpf/src/bin/decap.rs`), pinned per interface under
//! [`DEFAULT_DECAP_PIN_DIR`], that strips the outer header of packets whose
//! inner destination is a configured VIP, for kernels without ipip/ip6tnl.
//! Attached like the main program (a pinned bpf_link, adopted by the next
//! run), but sharing none of its maps.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, MapType, PerCpuArray},
    programs::{
        Xdp,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::decap::{
    DecapVip, MAP_STATS, MAP_VIPS, MAX_VIPS, PINNED_MAPS, PROGRAM, VIP_PRESENT, stat,
};
use serde::Serialize;

use crate::{
    config::XdpMode,
    dataplane::{Attachment, addr_words, family},
    lock::PinLock,
    pins::{self, MapSpec},
};

/// The decapsulation program, compiled by build.rs from lb-ebpf.
pub static DECAP_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-decap"));

/// Default root of the decapsulator's pins: `<root>/<interface>/{link,maps}`.
pub const DEFAULT_DECAP_PIN_DIR: &str = "/sys/fs/bpf/xlb-decap";

/// Parses and checks `--vip` arguments: at least one, each a unicast IPv4 or
/// IPv6 address, at most `MAX_VIPS`. Duplicates collapse; the result is sorted.
pub fn parse_vips(args: &[String]) -> Result<Vec<IpAddr>> {
    if args.is_empty() {
        bail!("no --vip given: name every VIP whose tunnelled packets this host accepts");
    }
    let mut vips = Vec::with_capacity(args.len());
    for arg in args {
        let addr: IpAddr = arg
            .trim()
            .parse()
            .with_context(|| format!("--vip {arg:?} is not an IPv4 or IPv6 address"))?;
        let bad = match addr {
            IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
            IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
        };
        if bad {
            bail!("--vip {addr}: a VIP must be a unicast address");
        }
        vips.push(addr);
    }
    vips.sort();
    vips.dedup();
    if vips.len() > MAX_VIPS as usize {
        bail!(
            "{} VIPs given; the decapsulator holds at most {MAX_VIPS}",
            vips.len()
        );
    }
    Ok(vips)
}

/// The `XLB_DECAP_VIPS_V1` key of a VIP.
pub fn vip_key(addr: IpAddr) -> DecapVip {
    DecapVip {
        addr: addr_words(addr),
        family: family(addr),
        _pad: [0; 3],
    }
}

/// The VIP a key stands for (`None` for a family byte no xlb writes).
pub fn vip_addr(key: &DecapVip) -> Option<IpAddr> {
    let b = lb_common::bytes_from_words(&key.addr);
    match key.family {
        lb_common::FAMILY_V4 => Some(IpAddr::from([b[0], b[1], b[2], b[3]])),
        lb_common::FAMILY_V6 => Some(IpAddr::from(b)),
        _ => None,
    }
}

/// The pin directory of `iface` under `root`; refuses names that would
/// leave it.
pub fn pin_path(root: &Path, iface: &str) -> Result<PathBuf> {
    if iface.is_empty()
        || iface.len() >= libc::IFNAMSIZ
        || iface.contains('/')
        || iface == "."
        || iface == ".."
    {
        bail!("--interface {iface:?} is not an interface name");
    }
    crate::config::validate_pin_dir("--pin-dir", root)?;
    Ok(root.join(iface))
}

/// The shape the decapsulator's pinned maps must have to be reused.
pub fn expected_specs() -> [MapSpec; 2] {
    [
        MapSpec {
            name: MAP_VIPS,
            map_type: MapType::Hash,
            key_size: size_of::<DecapVip>() as u32,
            value_size: size_of::<u32>() as u32,
            max_entries: MAX_VIPS,
            map_flags: 0,
        },
        MapSpec {
            name: MAP_STATS,
            map_type: MapType::PerCpuArray,
            key_size: size_of::<u32>() as u32,
            value_size: size_of::<u64>() as u32,
            max_entries: stat::CAPACITY,
            map_flags: 0,
        },
    ]
}

/// Fails, naming the interface, unless it exists in this network namespace.
pub fn check_interface(iface: &str) -> Result<u32> {
    crate::dataplane::interface_index(iface)
}

/// A loaded (not necessarily attached) decapsulator with its pinned maps.
pub struct Decapsulator {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Decapsulator {
    /// Loads the program, creating its maps in `pin_dir` or reusing
    /// compatible pinned ones (the VIP set and counters of an earlier run).
    pub fn load(pin_dir: &Path) -> Result<Self> {
        pins::ensure_bpffs().and_then(|()| pins::check_pin_dir(pin_dir))?;
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        pins::check_pinned(pin_dir, &expected_specs())?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(DECAP_OBJ)
            .context("loading the xlb-decap eBPF object")?;
        let mut dc = Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
        };
        dc.program_mut()?
            .load()
            .context("loading the decapsulation XDP program into the kernel (verifier)")?;
        Ok(dc)
    }

    /// The XDP program (for attaching or BPF_PROG_TEST_RUN).
    pub fn program_mut(&mut self) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("program {PROGRAM} missing from the xlb-decap object"))?
            .try_into()
            .context("program xlb_decap is not XDP")
    }

    /// The pin directory the maps live in.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches to `iface` and pins the link, or swaps this program in
    /// behind the link an earlier run pinned (`mode` is then ignored).
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<Attachment> {
        let link_pin = pins::link_path(&self.pin_dir);
        if link_pin.exists() {
            let pinned = PinnedLink::from_pin(&link_pin)
                .with_context(|| format!("opening pinned link {}", link_pin.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .context("pinned link is not an XDP link")?;
            self.program_mut()?.attach_to_link(link).with_context(|| {
                format!(
                    "replacing the program behind {} (if {iface} was deleted and made again, \
                         the pinned link is stale: `xlb decap --interface {iface} --detach` first)",
                    link_pin.display()
                )
            })?;
            return Ok(Attachment::Adopted);
        }
        crate::dataplane::attach_and_pin(self.program_mut()?, "xlb-decap", iface, mode, &link_pin)
    }
}

/// How a VIP set was replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VipChange {
    /// VIPs that were not there before.
    pub added: Vec<IpAddr>,
    /// VIPs that are no longer wanted.
    pub removed: Vec<IpAddr>,
    /// VIPs that stay.
    pub kept: Vec<IpAddr>,
}

fn open_map(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is xlb decap attached here? `xlb decap --interface IF --vip ADDR` attaches it)",
            path.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("decoding map {}", path.display()))
}

fn vip_map(dir: &Path) -> Result<HashMap<MapData, DecapVip, u32>> {
    open_map(dir, MAP_VIPS)?
        .try_into()
        .with_context(|| format!("pinned map {MAP_VIPS} has an unexpected layout"))
}

/// The VIPs pinned in `dir`, sorted.
pub fn read_vips(dir: &Path) -> Result<Vec<IpAddr>> {
    let map = vip_map(dir)?;
    let mut vips = Vec::new();
    for key in map.keys() {
        let key = key.with_context(|| format!("reading {MAP_VIPS}"))?;
        // A key of another family byte was not written by xlb: shown nowhere, removed on the next set.
        if let Some(addr) = vip_addr(&key) {
            vips.push(addr);
        }
    }
    vips.sort();
    Ok(vips)
}

/// Makes the pinned VIP set exactly `vips`: adds the new ones first, then
/// removes the old, so a VIP in both sets is never missing in between.
pub fn set_vips(dir: &Path, vips: &[IpAddr]) -> Result<VipChange> {
    let mut map = vip_map(dir)?;
    let mut old = Vec::new();
    for key in map.keys() {
        old.push(key.with_context(|| format!("reading {MAP_VIPS}"))?);
    }
    let mut change = VipChange::default();
    for &vip in vips {
        let key = vip_key(vip);
        if old.contains(&key) {
            change.kept.push(vip);
            continue;
        }
        map.insert(key, VIP_PRESENT, 0)
            .with_context(|| format!("adding VIP {vip} to {MAP_VIPS}"))?;
        change.added.push(vip);
    }
    let wanted: Vec<DecapVip> = vips.iter().map(|v| vip_key(*v)).collect();
    for key in old.iter().filter(|k| !wanted.contains(k)) {
        map.remove(key)
            .with_context(|| format!("removing {key:?} from {MAP_VIPS}"))?;
        if let Some(addr) = vip_addr(key) {
            change.removed.push(addr);
        }
    }
    Ok(change)
}

/// The decapsulator's counters, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DecapStats {
    /// The configured VIPs, sorted.
    pub vips: Vec<IpAddr>,
    /// (name, value) in `lb_common::decap::stat` index order.
    pub counters: Vec<(&'static str, u64)>,
}

impl DecapStats {
    /// One counter by index (`lb_common::decap::stat::*`).
    pub fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(index as usize)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
}

/// Reads the counters and VIPs pinned in `dir`.
pub fn stats(dir: &Path) -> Result<DecapStats> {
    if !dir.exists() {
        bail!(
            "no xlb decap pinned at {} (attach it with `xlb decap --interface IF --vip ADDR`)",
            dir.display()
        );
    }
    let map: PerCpuArray<MapData, u64> = open_map(dir, MAP_STATS)?
        .try_into()
        .with_context(|| format!("pinned map {MAP_STATS} has an unexpected layout"))?;
    let mut counters = Vec::with_capacity(stat::NAMES.len());
    for (index, name) in (0u32..).zip(stat::NAMES) {
        let values = map
            .get(&index, 0)
            .with_context(|| format!("reading counter {name} from {MAP_STATS}"))?;
        counters.push((name, values.iter().copied().fold(0u64, u64::wrapping_add)));
    }
    Ok(DecapStats {
        vips: read_vips(dir)?,
        counters,
    })
}

/// What [`bring_up`] did.
#[derive(Debug, Clone)]
pub struct BroughtUp {
    /// Attached anew or adopted.
    pub attachment: Attachment,
    /// How the VIP set changed.
    pub vips: VipChange,
    /// Where the link and maps are pinned.
    pub pin_dir: PathBuf,
}

/// `xlb decap --vip ...`: loads the program, writes the VIP set, then
/// attaches it to `iface` or adopts the pinned attachment. The VIPs go in
/// before the attach, so the program decapsulates from its first packet.
/// A first attach that fails leaves no pins behind.
pub fn bring_up(root: &Path, iface: &str, mode: XdpMode, vips: &[IpAddr]) -> Result<BroughtUp> {
    let dir = pin_path(root, iface)?;
    check_interface(iface)?;
    pins::ensure_bpffs().and_then(|()| pins::check_pin_dir(&dir))?;
    let _lock = PinLock::acquire(&dir)?;
    let existed = pins::link_path(&dir).exists();
    let result = (|| {
        let mut dc = Decapsulator::load(&dir)?;
        let change = set_vips(&dir, vips)?;
        let attachment = dc.attach(iface, mode)?;
        anyhow::Ok((attachment, change))
    })();
    let (attachment, change) = match result {
        Ok(r) => r,
        Err(e) => {
            if !existed {
                if let Err(clean) = remove_pins(&dir) {
                    tracing::warn!(dir = %dir.display(), "cleaning up after a failed attach: {clean:#}");
                }
            }
            return Err(e);
        }
    };
    match attachment {
        Attachment::New => tracing::info!(
            interface = iface, mode = ?mode, pins = %dir.display(), vips = vips.len(),
            "attached xlb decap"
        ),
        Attachment::Adopted => tracing::info!(
            interface = iface, pins = %dir.display(), added = change.added.len(),
            removed = change.removed.len(), kept = change.kept.len(),
            "adopted the existing xlb decap attachment (program replaced, VIP set replaced)"
        ),
    }
    Ok(BroughtUp {
        attachment,
        vips: change,
        pin_dir: dir,
    })
}

/// `xlb decap --detach`: removes the pinned link (detaching the program)
/// and the maps. Returns what was removed; nothing pinned is no error.
pub fn detach(root: &Path, iface: &str) -> Result<Vec<PathBuf>> {
    let dir = pin_path(root, iface)?;
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let _lock = PinLock::acquire(&dir)?;
    let removed = remove_pins(&dir)?;
    tracing::info!(interface = iface, pins = %dir.display(), removed = removed.len(), "detached xlb decap");
    Ok(removed)
}

/// Removes the link and map pins in `dir`, then `dir` and, if now empty,
/// the root above it (rmdir(2) leaves a non-empty or mounted one alone).
fn remove_pins(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for name in std::iter::once(pins::LINK_PIN).chain(PINNED_MAPS) {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {
            if let Some(root) = dir.parent() {
                if let Err(e) = std::fs::remove_dir(root) {
                    tracing::debug!(dir = %root.display(), "pin root kept: {e}");
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing directory {}", dir.display())),
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn vips_are_checked_sorted_and_deduplicated() {
        let vips = parse_vips(&strings(&["fd00::10", "10.0.0.10", " 10.0.0.10"])).expect("valid");
        assert_eq!(
            vips,
            vec![
                "10.0.0.10".parse::<IpAddr>().expect("v4"),
                "fd00::10".parse::<IpAddr>().expect("v6"),
            ]
        );
        let e = format!("{:#}", parse_vips(&[]).expect_err("none"));
        assert!(e.contains("no --vip"), "{e}");
        let e = format!(
            "{:#}",
            parse_vips(&strings(&["10.0.0.x"])).expect_err("bad")
        );
        assert!(
            e.starts_with("--vip \"10.0.0.x\" is not an IPv4 or IPv6 address"),
            "{e}"
        );
        for bad in ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"] {
            let e = format!("{:#}", parse_vips(&strings(&[bad])).expect_err(bad));
            assert!(e.contains("must be a unicast address"), "{bad}: {e}");
        }
        let many: Vec<String> = (0..=MAX_VIPS).map(|i| format!("fd00::{i:x}")).collect();
        assert!(parse_vips(&many).is_err(), "more than the map holds");
    }

    #[test]
    fn keys_round_trip_and_match_the_kernel_layout() {
        for text in ["10.1.2.3", "fd00::1:2"] {
            let addr: IpAddr = text.parse().expect("addr");
            let key = vip_key(addr);
            assert_eq!(vip_addr(&key), Some(addr));
            assert_eq!(key._pad, [0; 3]);
        }
        // The kernel builds the IPv4 key from the raw header bytes read as one native word.
        let key = vip_key("10.1.2.3".parse().expect("v4"));
        assert_eq!(key.addr, [u32::from_ne_bytes([10, 1, 2, 3]), 0, 0, 0]);
        assert_eq!(key.family, lb_common::FAMILY_V4);
        assert_eq!(vip_addr(&DecapVip { family: 9, ..key }), None);
    }

    #[test]
    fn pin_paths_stay_under_the_root() {
        let root = Path::new(DEFAULT_DECAP_PIN_DIR);
        assert_eq!(pin_path(root, "eth0").expect("plain"), root.join("eth0"));
        for bad in ["", "..", ".", "a/b", "sixteen-chars-xx"] {
            assert!(pin_path(root, bad).is_err(), "{bad:?}");
        }
        assert!(pin_path(Path::new("relative"), "eth0").is_err());
    }

    #[test]
    fn a_missing_interface_is_named() {
        let e = format!("{:#}", check_interface("xlbnosuch0").expect_err("missing"));
        assert!(
            e.starts_with("interface xlbnosuch0 not found in this network namespace"),
            "{e}"
        );
    }
}
