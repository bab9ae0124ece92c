//! The pinned dataplane on bpffs: where things live, opening the maps from
//! their pins, and refusing pins whose layout is not the one we speak.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, DevMapHash, HashMap, Map, MapData, MapInfo, MapType, PerCpuArray};
use lb_common::{
    Admission, Affinity, AffinityKey, Backend, Egress, FRAGMENT_ENTRIES, FragmentKey,
    FragmentPorts, LEGACY_PINS, MAP_ADMISSION, MAP_AFFINITY, MAP_BACKEND_STATS, MAP_BACKENDS,
    MAP_DEVMAP, MAP_EGRESS, MAP_FRAGMENTS, MAP_MAGLEV, MAP_PROTECTED, MAP_SERVICE_STATS,
    MAP_SERVICES, MAP_STATS, MAX_BACKENDS, MAX_EGRESS_IFACES, MAX_SERVICES, PINNED_MAPS, Service,
    ServiceKey, TrafficStats, stat,
};

use crate::{bpf_batch, dataplane::KnownTables};

/// File name of the pinned XDP link inside an interface's pin directory.
pub const LINK_PIN: &str = "link";

/// Path of the pinned XDP link for a pin directory.
pub fn link_path(dir: &Path) -> PathBuf {
    dir.join(LINK_PIN)
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there yet.
pub fn ensure_bpffs() -> Result<()> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    tracing::info!("mounting bpffs at /sys/fs/bpf");
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("running mount -t bpf")?;
    if !status.success() {
        bail!("mount -t bpf bpf /sys/fs/bpf failed ({status}); xlb pins its maps there");
    }
    Ok(())
}

/// `f_type` of a bpf filesystem in statfs(2) (`BPF_FS_MAGIC`, linux/magic.h).
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Fails, naming `pin_dir`, unless it is on a bpf filesystem: the nearest
/// existing ancestor decides, since the rest is created below it. Pinning
/// elsewhere fails late and obscurely, so this runs before loading (after
/// [`ensure_bpffs`], which may mount /sys/fs/bpf).
pub fn check_pin_dir(pin_dir: &Path) -> Result<()> {
    let mut dir = pin_dir;
    let f_type = loop {
        match statfs_type(dir) {
            Ok(t) => break t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match dir.parent() {
                Some(parent) => dir = parent,
                None => {
                    return Err(e)
                        .with_context(|| format!("pin_dir: looking at {}", dir.display()));
                }
            },
            Err(e) => {
                return Err(e).with_context(|| format!("pin_dir: looking at {}", dir.display()));
            }
        }
    };
    if f_type != BPF_FS_MAGIC {
        let at = if dir == pin_dir {
            String::new()
        } else {
            format!(" (it would be created in {})", dir.display())
        };
        bail!(
            "pin_dir: {} is not on a bpf filesystem{at}: found filesystem type {f_type:#x}, bpffs is \
             {BPF_FS_MAGIC:#x}; use a directory under /sys/fs/bpf or mount one with `mount -t bpf bpf DIR`",
            pin_dir.display()
        );
    }
    Ok(())
}

/// The filesystem type (`f_type`) of the filesystem holding `path`.
fn statfs_type(path: &Path) -> std::io::Result<u32> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is plain data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and st is a valid statfs to fill.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Magic numbers are 32-bit; f_type's width differs by architecture.
    Ok(st.f_type as u32)
}

/// The shape a pinned map must have for this build of xlb to reuse it.
#[derive(Debug, Clone, Copy)]
pub struct MapSpec {
    /// Map (and pin file) name.
    pub name: &'static str,
    /// Kernel map type.
    pub map_type: MapType,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes (per CPU for per-CPU maps).
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Creation flags (e.g. `BPF_F_NO_COMMON_LRU` changes how an LRU evicts).
    pub map_flags: u32,
}

/// The expected spec of every pinned map, given the sizes chosen at load time.
pub fn expected_specs(affinity_entries: u32, maglev_entries: u32) -> [MapSpec; 12] {
    fn spec<K, V>(name: &'static str, map_type: MapType, max_entries: u32) -> MapSpec {
        MapSpec {
            name,
            map_type,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
            // Maps are created without flags unless said (lb-ebpf/src/maps.rs).
            map_flags: 0,
        }
    }
    /// `BPF_F_NO_PREALLOC` (include/uapi/linux/bpf.h).
    const NO_PREALLOC: u32 = 1;
    /// `BPF_F_RDONLY_PROG` (include/uapi/linux/bpf.h).
    const RDONLY_PROG: u32 = 1 << 7;
    [
        spec::<ServiceKey, Service>(MAP_SERVICES, MapType::Hash, 2 * MAX_SERVICES),
        spec::<AffinityKey, Affinity>(MAP_AFFINITY, MapType::LruHash, affinity_entries),
        spec::<u32, Backend>(MAP_BACKENDS, MapType::Array, MAX_BACKENDS),
        spec::<u32, u32>(MAP_MAGLEV, MapType::Array, maglev_entries),
        spec::<u32, u64>(MAP_STATS, MapType::PerCpuArray, stat::CAPACITY),
        spec::<u32, TrafficStats>(MAP_SERVICE_STATS, MapType::PerCpuArray, MAX_SERVICES),
        spec::<u32, TrafficStats>(MAP_BACKEND_STATS, MapType::PerCpuArray, MAX_BACKENDS),
        spec::<FragmentKey, FragmentPorts>(MAP_FRAGMENTS, MapType::LruHash, FRAGMENT_ENTRIES),
        MapSpec {
            map_flags: NO_PREALLOC,
            ..spec::<AffinityKey, Affinity>(MAP_PROTECTED, MapType::Hash, affinity_entries)
        },
        spec::<u32, Admission>(MAP_ADMISSION, MapType::PerCpuArray, MAX_SERVICES),
        spec::<u32, Egress>(MAP_EGRESS, MapType::Array, MAX_BACKENDS),
        // The value is `struct bpf_devmap_val` (ifindex + program fd/id); the
        // kernel makes every devmap read-only to programs (BPF_F_RDONLY_PROG).
        MapSpec {
            map_flags: RDONLY_PROG,
            ..spec::<u32, u64>(MAP_DEVMAP, MapType::DevMapHash, MAX_EGRESS_IFACES)
        },
    ]
}

/// Fails, naming the map and the difference, if a pin in `dir` does not
/// match `specs`. aya would silently reuse any pinned map of the same name.
pub fn check_pinned(dir: &Path, specs: &[MapSpec]) -> Result<()> {
    for spec in specs {
        let path = dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        let map_type = info
            .map_type()
            .with_context(|| format!("reading the type of {}", path.display()))?;
        let found = [
            (
                "type",
                format!("{map_type:?}"),
                format!("{:?}", spec.map_type),
            ),
            (
                "key size",
                info.key_size().to_string(),
                spec.key_size.to_string(),
            ),
            (
                "value size",
                info.value_size().to_string(),
                spec.value_size.to_string(),
            ),
            (
                "max entries",
                info.max_entries().to_string(),
                spec.max_entries.to_string(),
            ),
            (
                "flags",
                format!("{:#x}", info.map_flags()),
                format!("{:#x}", spec.map_flags),
            ),
        ];
        for (what, got, want) in found {
            if got != want {
                bail!(
                    "pinned map {} has {what} {got} but this xlb expects {want}: it was made by another \
                     xlb build or with other sizes (affinity_max_entries, maglev_table_size, max_services). \
                     Restore the old setting, or run `xlb detach` to remove the old dataplane (drops all sessions)",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// Used backend slots by (service id, address in key layout): (backend id, record).
pub type LiveBackends = std::collections::HashMap<(u32, [u32; 4]), (u32, Backend)>;

/// Typed handles on every pinned map of one interface.
pub struct PinnedMaps {
    /// The pin directory they were opened from.
    pub dir: PathBuf,
    /// `XLB_SERVICES_V1`.
    pub services: HashMap<MapData, ServiceKey, Service>,
    /// `XLB_AFFINITY_V1`.
    pub affinity: HashMap<MapData, AffinityKey, Affinity>,
    /// `XLB_BACKENDS_V1`.
    pub backends: Array<MapData, Backend>,
    /// `XLB_MAGLEV_V1`.
    pub maglev: Array<MapData, u32>,
    /// `XLB_STATS_V2`.
    pub stats: PerCpuArray<MapData, u64>,
    /// `XLB_SVCSTAT_V1`.
    pub service_stats: PerCpuArray<MapData, TrafficStats>,
    /// `XLB_BESTAT_V1`.
    pub backend_stats: PerCpuArray<MapData, TrafficStats>,
    /// `XLB_FRAGS_V1` (read-only for userspace: the kernel fills it).
    pub fragments: HashMap<MapData, FragmentKey, FragmentPorts>,
    /// `XLB_PROTECTED_V1`: divergent sessions, out of the LRU's reach.
    pub protected: HashMap<MapData, AffinityKey, Affinity>,
    /// `XLB_EGRESS_V1`: how encapsulated frames leave, per backend id.
    pub egress: Array<MapData, Egress>,
    /// `XLB_DEVMAP_V1`: egress interfaces other than the ingress one.
    pub devmap: DevMapHash<MapData>,
    /// What this process wrote into (or read from) the Maglev map, so an
    /// apply compares and writes only the tables that change.
    pub(crate) known_tables: KnownTables,
    /// Entries of `XLB_MAGLEV_V1`, read once at open: a write must not need
    /// the pins, which someone may have removed under a running daemon.
    maglev_entries: u32,
}

fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is xlb running on this interface? `xlb run` creates it)",
            path.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("decoding map {}", path.display()))
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {
        open($dir, $name)?
            .try_into()
            .with_context(|| format!("pinned map {} has an unexpected layout", $name))?
    };
}

impl PinnedMaps {
    /// Opens every map pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.exists() {
            bail!(
                "no xlb dataplane pinned at {} (run `xlb run --config FILE` first)",
                dir.display()
            );
        }
        debug_assert_eq!(PINNED_MAPS.len(), 12);
        let maglev_entries = MapInfo::from_pin(dir.join(MAP_MAGLEV))
            .context("reading Maglev map info")?
            .max_entries();
        Ok(Self {
            maglev_entries,
            dir: dir.to_path_buf(),
            services: typed!(dir, MAP_SERVICES),
            affinity: typed!(dir, MAP_AFFINITY),
            backends: typed!(dir, MAP_BACKENDS),
            maglev: typed!(dir, MAP_MAGLEV),
            stats: typed!(dir, MAP_STATS),
            service_stats: typed!(dir, MAP_SERVICE_STATS),
            backend_stats: typed!(dir, MAP_BACKEND_STATS),
            fragments: typed!(dir, MAP_FRAGMENTS),
            protected: typed!(dir, MAP_PROTECTED),
            egress: typed!(dir, MAP_EGRESS),
            devmap: typed!(dir, MAP_DEVMAP),
            known_tables: KnownTables::default(),
        })
    }

    /// Calls `f` on every session of both maps (key, value, whether it is in
    /// the protected map), a batch at a time.
    pub fn visit_sessions(
        &self,
        mut f: impl FnMut(AffinityKey, Affinity, bool) -> Result<()>,
    ) -> Result<()> {
        let mut cursor = self.session_cursor();
        while let Some((protected, chunk)) = cursor.next_chunk(self)? {
            for (k, v) in chunk {
                f(k, v, protected)?;
            }
        }
        Ok(())
    }

    /// A walk of both session maps a chunk at a time ([`SessionCursor`]).
    pub fn session_cursor(&self) -> SessionCursor {
        SessionCursor::default()
    }

    /// One client's session, as the kernel finds it: the LRU first, then
    /// the protected map. The flag says which.
    pub fn session(&self, key: &AffinityKey) -> Option<(Affinity, bool)> {
        match self.affinity.get(key, 0) {
            Ok(v) => Some((v, false)),
            Err(_) => self.protected.get(key, 0).ok().map(|v| (v, true)),
        }
    }

    /// The map a session lives in.
    pub fn session_map(&mut self, protected: bool) -> &mut HashMap<MapData, AffinityKey, Affinity> {
        if protected {
            &mut self.protected
        } else {
            &mut self.affinity
        }
    }

    /// Every backend slot, indexed by backend id (one batched read).
    pub fn backend_records(&self) -> Result<Vec<Backend>> {
        let mut out = vec![Backend::default(); MAX_BACKENDS as usize];
        bpf_batch::read_array(&self.backends, 0, &mut out).context("reading the backend map")?;
        Ok(out)
    }

    /// Every used backend slot, keyed by (service id, backend address in key
    /// layout), with its id and record: how ids are found again after a restart.
    pub fn live_backends(&self) -> Result<LiveBackends> {
        let mut out = std::collections::HashMap::new();
        for (id, be) in (0u32..).zip(self.backend_records()?) {
            if be.state != lb_common::BACKEND_EMPTY {
                out.insert((u32::from(be.service_id), be.addr), (id, be));
            }
        }
        Ok(out)
    }

    /// Makes the next `dataplane::apply` compare every Maglev table with
    /// the kernel (one batched read per service) instead of trusting what
    /// this process remembers writing: for a check against writers that
    /// bypass xlb.
    pub fn forget_tables(&mut self) {
        self.known_tables.clear();
    }

    /// [`PinnedMaps::forget_tables`] for one service id: its two tables are
    /// re-read by the next apply (about 28 ms at the default table size).
    pub fn forget_table(&mut self, service_id: u32) {
        self.known_tables.forget(service_id);
    }

    /// Maglev capacity of the pinned map, which fixes how many service
    /// tables of a given size fit.
    pub fn maglev_capacity(&self) -> Result<u32> {
        Ok(self.maglev_entries)
    }
}

/// Removes the pinned link (which detaches the program) and every map pin.
/// Returns what was removed; missing pins are not an error.
pub fn remove_all(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut names: Vec<&str> = vec![LINK_PIN];
    names.extend(PINNED_MAPS);
    names.extend(LEGACY_PINS);
    for name in names {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => remove_parent_if_empty(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing directory {}", dir.display())),
    }
    Ok(removed)
}

/// After `dir` (`<pin_dir>/<interface>`) is gone, removes `<pin_dir>` too if
/// it is now empty: it was created with it. rmdir(2) only removes an empty
/// directory, so pins of other interfaces or anything else keep it; a mount
/// point (bpffs itself, when `pin_dir` is its root) is never touched.
fn remove_parent_if_empty(dir: &Path) {
    use std::os::unix::fs::MetadataExt as _;
    let Some(parent) = dir.parent() else { return };
    let Some(grandparent) = parent.parent() else {
        return;
    };
    let (Ok(p), Ok(g)) = (std::fs::metadata(parent), std::fs::metadata(grandparent)) else {
        return;
    };
    if p.dev() != g.dev() {
        return;
    }
    match std::fs::remove_dir(parent) {
        Ok(()) => tracing::debug!(dir = %parent.display(), "removed the empty pin directory"),
        Err(e) => tracing::debug!(dir = %parent.display(), "pin directory kept: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xlb-pins-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn pin_dir_off_bpffs_is_refused() {
        let dir = scratch("statfs");
        std::fs::create_dir_all(&dir).expect("mkdir");
        // The nearest existing ancestor is a temporary directory, not bpffs.
        let wanted = dir.join("xlb/sub");
        let e = format!("{:#}", check_pin_dir(&wanted).expect_err("not bpffs"));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            e.starts_with(&format!(
                "pin_dir: {} is not on a bpf filesystem (it would be created in {})",
                wanted.display(),
                dir.display()
            )),
            "{e}"
        );
        assert!(e.contains("bpffs is 0xcafe4a11"), "{e}");
    }

    #[test]
    fn pin_dir_on_bpffs_passes() {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let bpffs = mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
        if !bpffs {
            eprintln!("skipped: no bpffs at /sys/fs/bpf");
            return;
        }
        check_pin_dir(Path::new("/sys/fs/bpf")).expect("bpffs root");
        check_pin_dir(Path::new("/sys/fs/bpf/xlb-test-missing/a/b")).expect("below bpffs");
    }

    #[test]
    fn remove_all_takes_the_empty_pin_dir_but_nothing_else() {
        let root = scratch("remove");
        let pin_dir = root.join("pins");
        let iface = pin_dir.join("eth0");
        std::fs::create_dir_all(&iface).expect("mkdir");
        std::fs::write(iface.join(LINK_PIN), "").expect("link");
        std::fs::write(iface.join(MAP_AFFINITY), "").expect("map");
        let removed = remove_all(&iface).expect("remove");
        assert_eq!(removed.len(), 2);
        assert!(!pin_dir.exists(), "the empty pin_dir goes too");
        assert!(root.exists(), "its parent stays");

        // Another interface's pins keep the pin_dir.
        let other = pin_dir.join("eth1");
        std::fs::create_dir_all(&other).expect("mkdir");
        std::fs::create_dir_all(&iface).expect("mkdir");
        std::fs::write(iface.join(LINK_PIN), "").expect("link");
        remove_all(&iface).expect("remove");
        assert!(!iface.exists());
        assert!(other.exists() && pin_dir.exists());

        // Nothing was pinned: nothing, not even the empty pin_dir, is removed.
        std::fs::remove_dir(&other).expect("rmdir");
        assert!(remove_all(&iface).expect("nothing").is_empty());
        assert!(pin_dir.exists(), "untouched when nothing was pinned");
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// One chunk of a [`SessionCursor`]: whether it is of the protected map, and its sessions.
pub type SessionChunk = (bool, Vec<(AffinityKey, Affinity)>);

/// A walk of both session maps, the LRU and then the protected map, a
/// chunk at a time, that may stop between chunks (see
/// [`bpf_batch::HashCursor`]).
#[derive(Debug, Default)]
pub struct SessionCursor {
    in_protected: bool,
    cursor: bpf_batch::HashCursor<AffinityKey, Affinity>,
    done: usize,
}

impl SessionCursor {
    /// The next chunk and whether it is of the protected map; `None` once
    /// both maps are done.
    pub fn next_chunk(&mut self, maps: &PinnedMaps) -> Result<Option<SessionChunk>> {
        loop {
            let map = if self.in_protected {
                &maps.protected
            } else {
                &maps.affinity
            };
            match self
                .cursor
                .next_chunk(map)
                .context("reading the sessions")?
            {
                Some(chunk) => {
                    self.done += chunk.len();
                    return Ok(Some((self.in_protected, chunk)));
                }
                None if self.in_protected => return Ok(None),
                None => {
                    self.in_protected = true;
                    self.cursor = bpf_batch::HashCursor::new();
                }
            }
        }
    }

    /// Sessions read so far, both maps.
    pub fn seen(&self) -> usize {
        self.done
    }
}
