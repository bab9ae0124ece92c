//! Every map of the program, declared once; layouts live in lb-common.
//! Pinned by name so they outlive the loader and are adopted on restart.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Admission, Affinity, AffinityKey, Backend, DEFAULT_AFFINITY_ENTRIES, DEFAULT_MAGLEV_ENTRIES,
    Egress, FRAGMENT_ENTRIES, FragmentKey, FragmentPorts, MAX_BACKENDS, MAX_EGRESS_IFACES,
    MAX_SERVICES, Service, ServiceKey, TrafficStats, stat,
};

/// (VIP, port, protocol) -> service record. Twice `MAX_SERVICES`: older
/// builds kept port-0 fragment entries here too, and the capacity is part
/// of the pinned spec, so it stays.
#[map(name = "XLB_SERVICES_V1")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::pinned(2 * MAX_SERVICES, 0);

/// (service, masked client) -> backend and last-seen time: the sticky sessions.
#[map(name = "XLB_AFFINITY_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity> =
    LruHashMap::pinned(DEFAULT_AFFINITY_ENTRIES, 0);

/// Backend id -> address, MAC and state.
#[map(name = "XLB_BACKENDS_V1")]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// Maglev tables, two slots per service, each `table_size` backend ids.
#[map(name = "XLB_MAGLEV_V1")]
pub static MAGLEV: Array<u32> = Array::pinned(DEFAULT_MAGLEV_ENTRIES, 0);

/// Global per-verdict counters (`stat::COUNT` used of `stat::CAPACITY`).
#[map(name = "XLB_STATS_V2")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::CAPACITY, 0);

/// Per-service traffic.
#[map(name = "XLB_SVCSTAT_V1")]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// Per-backend traffic.
#[map(name = "XLB_BESTAT_V1")]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// (family, protocol, client, VIP, IP id) -> the first fragment's ports, so
/// later fragments (which carry none) follow their datagram's service.
#[map(name = "XLB_FRAGS_V1")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> =
    LruHashMap::pinned(FRAGMENT_ENTRIES, 0);

/// Sessions whose backend differs from the Maglev answer: (service, masked
/// client) -> backend and last-seen time, out of the LRU's reach. Filled
/// and emptied by userspace only (no preallocation: memory follows use);
/// the kernel reads it on an affinity miss and rewrites entries in place.
#[map(name = "XLB_PROTECTED_V1")]
pub static PROTECTED: HashMap<AffinityKey, Affinity> =
    HashMap::pinned(DEFAULT_AFFINITY_ENTRIES, BPF_F_NO_PREALLOC);

/// Per-CPU, per-service admission window for new affinity entries.
#[map(name = "XLB_ADMIT_V1")]
pub static ADMISSION: PerCpuArray<Admission> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// Backend id -> how its encapsulated frames leave (source address and MAC,
/// egress interface, MTU). Read only by `FORWARD_IPIP` services.
#[map(name = "XLB_EGRESS_V1")]
pub static EGRESS: Array<Egress> = Array::pinned(MAX_BACKENDS, 0);

/// Egress interfaces other than the ingress one, for `XDP_REDIRECT`.
#[map(name = "XLB_DEVMAP_V1")]
pub static DEVMAP: DevMapHash = DevMapHash::pinned(MAX_EGRESS_IFACES, 0);
