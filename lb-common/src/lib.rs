//! The kernel/userspace ABI of xlb: every map's name, key and value layout,
//! and the pure functions (masking, hashing) both sides must compute alike.
//!
//! Rules for this file: `#[repr(C)]` with explicit padding, no `bool` or
//! enums in map values (integers with named constants instead), the byte
//! order of every field noted, and a size assert per type. Changing a layout
//! means bumping the `_V<n>` suffix of the map that holds it, so a pinned map
//! of the old layout is never reused by mistake.
#![no_std]

/// Version of the layouts below; bumped together with the map-name suffixes.
pub const ABI_VERSION: u32 = 2;

/// Services keyed by (VIP, port, protocol): `HASH<ServiceKey, Service>`.
pub const MAP_SERVICES: &str = "XLB_SERVICES_V1";
/// Session affinity: `LRU_HASH<AffinityKey, Affinity>`.
pub const MAP_AFFINITY: &str = "XLB_AFFINITY_V1";
/// Backends indexed by backend id: `ARRAY<Backend>`.
pub const MAP_BACKENDS: &str = "XLB_BACKENDS_V1";
/// All Maglev lookup tables, two slots per service: `ARRAY<u32 backend id>`.
pub const MAP_MAGLEV: &str = "XLB_MAGLEV_V1";
/// Global verdict/reason counters: `PERCPU_ARRAY<u64>` indexed by `stat::*`,
/// `stat::CAPACITY` slots (V2: room for counters added later without a rename).
pub const MAP_STATS: &str = "XLB_STATS_V2";
/// Per-service traffic: `PERCPU_ARRAY<TrafficStats>` indexed by service id.
pub const MAP_SERVICE_STATS: &str = "XLB_SVCSTAT_V1";
/// Per-backend traffic: `PERCPU_ARRAY<TrafficStats>` indexed by backend id.
pub const MAP_BACKEND_STATS: &str = "XLB_BESTAT_V1";
/// The ports of first fragments, for the fragments that follow:
/// `LRU_HASH<FragmentKey, FragmentPorts>`, `FRAGMENT_ENTRIES` entries.
pub const MAP_FRAGMENTS: &str = "XLB_FRAGS_V1";
/// Sessions whose backend differs from their service's Maglev answer, kept
/// where no LRU eviction reaches them: `HASH<AffinityKey, Affinity>`
/// (`BPF_F_NO_PREALLOC`), as many entries as the affinity map. Only
/// userspace adds or deletes entries; the kernel reads them on an affinity
/// miss (when the service has `SERVICE_F_PROTECTED`) and rewrites in place.
pub const MAP_PROTECTED: &str = "XLB_PROTECTED_V1";
/// Per-CPU admission budget of each service for new affinity entries:
/// `PERCPU_ARRAY<Admission>` indexed by service id.
pub const MAP_ADMISSION: &str = "XLB_ADMIT_V1";
/// How encapsulated frames leave for each backend (`FORWARD_IPIP`):
/// `ARRAY<Egress>` indexed by backend id.
pub const MAP_EGRESS: &str = "XLB_EGRESS_V1";
/// Interfaces other than the ingress one that frames may leave by:
/// `DEVMAP_HASH<u32 ifindex, u32 ifindex>`, `MAX_EGRESS_IFACES` entries.
pub const MAP_DEVMAP: &str = "XLB_DEVMAP_V1";
/// Capacity of `XLB_DEVMAP_V1`.
pub const MAX_EGRESS_IFACES: u32 = 64;

/// Every pinned map, in the order userspace checks and reports them.
pub const PINNED_MAPS: [&str; 12] = [
    MAP_SERVICES,
    MAP_AFFINITY,
    MAP_BACKENDS,
    MAP_MAGLEV,
    MAP_STATS,
    MAP_SERVICE_STATS,
    MAP_BACKEND_STATS,
    MAP_FRAGMENTS,
    MAP_PROTECTED,
    MAP_ADMISSION,
    MAP_EGRESS,
    MAP_DEVMAP,
];

/// Pins older xlb builds left that no map of this build uses: removed with
/// the dataplane (`xlb detach`) so the pin directory can go too.
pub const LEGACY_PINS: [&str; 1] = ["XLB_STATS_V1"];

/// Load-time global (`u8`): non-zero turns on per-packet debug logging.
pub const GLOBAL_DEBUG: &str = "XLB_DEBUG";
/// Load-time global (`[u8; 6]`): the MAC of the interface the program runs on.
pub const GLOBAL_IFACE_MAC: &str = "XLB_IFACE_MAC";

/// Capacity of the service map and the per-service stats (service ids are `< MAX_SERVICES`).
pub const MAX_SERVICES: u32 = 256;
/// Capacity of the backend array (backend ids are `1..MAX_BACKENDS`).
pub const MAX_BACKENDS: u32 = 4096;
/// Backend id 0 is never assigned: a never-written Maglev slot reads 0, so
/// 0 must mean "no backend" (the kernel never forwards to it).
pub const RESERVED_BACKEND_ID: u32 = 0;
/// Assigned backend ids start here.
pub const FIRST_BACKEND_ID: u32 = RESERVED_BACKEND_ID + 1;
/// How many backends xlb holds in total (ids `FIRST_BACKEND_ID..MAX_BACKENDS`).
pub const BACKEND_CAPACITY: u32 = MAX_BACKENDS - FIRST_BACKEND_ID;
/// Compiled-in affinity capacity; userspace resizes it at load time from the config.
pub const DEFAULT_AFFINITY_ENTRIES: u32 = 262_144;
/// Capacity of the fragment map: datagrams whose later fragments can be
/// steered at once. Fixed (not configurable): an entry is needed only between
/// a datagram's first and last fragment, and the LRU drops the oldest when a
/// burst of fragmented datagrams exceeds it (their later fragments then pass,
/// `stat::PASS_FRAGMENT_UNSEEN`).
pub const FRAGMENT_ENTRIES: u32 = 16_384;
/// Compiled-in Maglev capacity; userspace resizes it to `service slots * 2 * table size`.
pub const DEFAULT_MAGLEV_ENTRIES: u32 = 2 * 65_537;
/// Default Maglev table size (a prime, as Maglev requires).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65_537;
/// How many further Maglev slots the kernel probes when the chosen backend is
/// unusable (down, draining or empty) before userspace has rebuilt the table.
pub const MAGLEV_PROBES: u32 = 8;

/// Maglev table entry meaning "no backend" (a service with none usable).
pub const NO_BACKEND: u32 = u32::MAX;

/// `ServiceKey::family` / `Backend::family` for IPv4.
pub const FAMILY_V4: u8 = 4;
/// `ServiceKey::family` / `Backend::family` for IPv6.
pub const FAMILY_V6: u8 = 6;
/// IANA protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Key of `XLB_SERVICES_V1`.
///
/// Port 0 is never a service: a datagram or first fragment to port 0 passes
/// without a lookup (`stat::PASS_PORT_ZERO`). xlb builds before the fragment
/// map kept a per-VIP "fragment entry" under port 0; `apply` deletes those.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// VIP as raw network-order bytes read as native words; IPv4 in word 0, words 1..3 zero.
    pub addr: [u32; 4],
    /// Destination port, network byte order (as on the wire); never 0.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// `Service::forward_mode`: layer-2 direct server return (MAC rewrite, `XDP_TX`).
pub const FORWARD_DSR_L2: u8 = 0;
/// `Service::forward_mode`: layer-3 direct server return. The client's IP
/// packet is sent unchanged inside an outer IPv4 (IPv4 VIPs, protocol 4) or
/// IPv6 (IPv6 VIPs, next header 41) header addressed to the backend, to the
/// next hop `Backend::mac` by way of `XLB_EGRESS_V1[backend id]`.
pub const FORWARD_IPIP: u8 = 1;
/// Bytes an outer IPv4 header adds.
pub const IPIP_V4_OVERHEAD: u32 = 20;
/// Bytes an outer IPv6 header adds.
pub const IPIP_V6_OVERHEAD: u32 = 40;

/// `Service::flags`: the service has sessions in `XLB_PROTECTED_V1`, so an
/// affinity miss looks there before choosing by Maglev. Without it the
/// miss path skips that lookup. (Bit 0 marked the port-0 fragment entry
/// of older builds and is never set.)
pub const SERVICE_F_PROTECTED: u32 = 1 << 1;

/// Length of an admission window: `Service::admit_per_window` new affinity
/// entries per CPU per window (100 ms on the coarse clock).
pub const ADMIT_WINDOW_NS: u64 = 100_000_000;

/// Value of `XLB_SERVICES_V1`. Everything the per-packet path needs is
/// precomputed here by userspace (mask, slot bases, refresh interval).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Service id: index into per-service stats and part of every affinity key.
    pub id: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
    /// Affinity timeout in ns (CLOCK_MONOTONIC): an entry idle longer is re-selected.
    pub timeout_ns: u64,
    /// `last_seen_ns` is rewritten only when older than this, so hits rarely write.
    pub refresh_ns: u64,
    /// Client address mask for this VIP's family, same word layout as `ServiceKey::addr`.
    pub mask: [u32; 4],
    /// Index in `XLB_MAGLEV_V1` where each of the two table slots starts.
    pub maglev_base: [u32; 2],
    /// Maglev table size (prime).
    pub table_size: u32,
    /// Which of the two table slots is live (0 or 1); flipped after the other is written.
    pub active_slot: u32,
    /// Affinity prefix length applied to IPv4 clients.
    pub prefix_v4: u8,
    /// Affinity prefix length applied to IPv6 clients.
    pub prefix_v6: u8,
    /// `FORWARD_*` mode.
    pub forward_mode: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
    /// New affinity entries a CPU may insert for this service per
    /// `ADMIT_WINDOW_NS`; above it new clients are forwarded by Maglev
    /// without an entry (`stat::AFFINITY_ADMISSION_SKIPPED`). 0: no limit
    /// (what older builds' zero padding here means too).
    pub admit_per_window: u32,
}

/// `Backend::state`: slot unused; never selected.
pub const BACKEND_EMPTY: u8 = 0;
/// `Backend::state`: takes existing and new clients.
pub const BACKEND_ACTIVE: u8 = 1;
/// `Backend::state`: keeps its existing clients, never gets new ones.
pub const BACKEND_DRAINING: u8 = 2;
/// `Backend::state`: never used; its clients are re-selected by the kernel at once.
pub const BACKEND_DOWN: u8 = 3;

/// Value of `XLB_BACKENDS_V1`, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address, same word layout as `ServiceKey::addr` (informational in DSR mode).
    pub addr: [u32; 4],
    /// Destination MAC of forwarded frames: the backend's (layer-2 mode) or
    /// its next hop's (`FORWARD_IPIP`), typed in the config or resolved by
    /// userspace from the kernel's neighbours. All-zero: not resolved yet
    /// (`stat::DROP_NEXTHOP_UNRESOLVED`).
    pub mac: [u8; 6],
    /// `BACKEND_*` state.
    pub state: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Maglev weight (userspace only; the kernel reads the table).
    pub weight: u16,
    /// Owning service id.
    pub service_id: u16,
}

/// Key of `XLB_AFFINITY_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Service id.
    pub service_id: u32,
    /// Client address masked to the service's prefix, same word layout as `ServiceKey::addr`.
    pub addr: [u32; 4],
}

/// Value of `XLB_AFFINITY_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    /// Backend id the client sticks to.
    pub backend_id: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
    /// Last time (CLOCK_MONOTONIC ns) the entry was refreshed, coarsely.
    pub last_seen_ns: u64,
}

/// Key of `XLB_FRAGS_V1`: one fragmented datagram, as RFC 791 / RFC 8200
/// identify it (source, destination, protocol, identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `PROTO_TCP` or `PROTO_UDP` (the upper-layer protocol, after the IPv6 Fragment header).
    pub proto: u8,
    /// Explicit padding; always zero.
    pub _pad: u16,
    /// Identification in host byte order: IPv4's 16-bit `id`, the IPv6
    /// Fragment header's 32-bit identification.
    pub id: u32,
    /// Client (source) address, same word layout as `ServiceKey::addr`.
    pub src: [u32; 4],
    /// VIP (destination) address, same word layout as `ServiceKey::addr`.
    pub dst: [u32; 4],
}

/// Value of `XLB_FRAGS_V1`: the ports of the datagram's first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    /// Source port, network byte order (as on the wire).
    pub sport: u16,
    /// Destination port, network byte order (as on the wire); never 0.
    pub dport: u16,
}

/// Value of `XLB_EGRESS_V1`: how an encapsulated frame leaves for one
/// backend, from the kernel's route to it (written by userspace).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    /// Outer source address, same word layout as `ServiceKey::addr`.
    pub src: [u32; 4],
    /// Source MAC: the egress interface's.
    pub smac: [u8; 6],
    /// Explicit padding; always zero.
    pub _pad: u16,
    /// Egress interface index; 0 = the interface the frame came in on
    /// (`XDP_TX`), else `XDP_REDIRECT` through `XLB_DEVMAP_V1`.
    pub ifindex: u32,
    /// Egress MTU: an encapsulated packet longer than this is not sent
    /// (`stat::DROP_ENCAP_TOO_BIG`). 0 until userspace wrote the entry.
    pub mtu: u32,
}

/// Value of `XLB_ADMIT_V1` (per CPU): the current admission window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// Start of the window (CLOCK_MONOTONIC_COARSE ns).
    pub window_start_ns: u64,
    /// Entries admitted in the window.
    pub admitted: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

/// Value of the per-service and per-backend traffic counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Frames forwarded.
    pub packets: u64,
    /// Bytes forwarded (whole frames).
    pub bytes: u64,
    /// Affinity entries created (new clients and re-selections).
    pub new_sessions: u64,
}

/// Global counters, the index into `XLB_STATS_V2`. Every verdict has one.
/// New counters go at the end so existing indices keep their meaning.
pub mod stat {
    /// Not IPv4/IPv6 (ARP, QinQ and others): passed.
    pub const PASS_NOT_IP: u32 = 0;
    /// Destination MAC is not this interface's (multicast, broadcast, flooded unicast): passed.
    pub const PASS_OTHER_HOST: u32 = 1;
    /// Neither TCP nor UDP (ICMP, neighbour discovery, ...), including ICMP
    /// errors whose quote is malformed or matches no service: passed.
    pub const PASS_NOT_L4: u32 = 2;
    /// No service at (destination, port, protocol): passed.
    pub const PASS_NOT_SERVICE: u32 = 3;
    /// IPv6 with an extension header other than Fragment: passed.
    pub const PASS_V6_EXT_HEADER: u32 = 4;
    /// Affinity entry found and used.
    pub const AFFINITY_HIT: u32 = 5;
    /// No affinity entry: Maglev choice recorded.
    pub const NEW_SESSION: u32 = 6;
    /// Affinity entry idle past the service timeout: re-selected.
    pub const RESELECT_EXPIRED: u32 = 7;
    /// Affinity entry pointed at a down/removed backend (or the reserved id 0): re-selected.
    pub const RESELECT_DOWN: u32 = 8;
    /// Maglev slot unusable (down/draining/empty): a later slot was taken.
    pub const MAGLEV_PROBED: u32 = 9;
    /// An IP fragment matched its service: a first fragment by its own ports,
    /// a later one by the ports its first fragment recorded in `XLB_FRAGS_V1`
    /// (counted besides its verdict).
    pub const FRAGMENT: u32 = 10;
    /// Affinity insert failed (the frame is still forwarded).
    pub const AFFINITY_INSERT_FAILED: u32 = 11;
    /// Frame shorter than an Ethernet header: dropped.
    pub const DROP_TRUNCATED_ETH: u32 = 12;
    /// Frame ends inside the 802.1Q tag: dropped.
    pub const DROP_BAD_VLAN: u32 = 13;
    /// Frame ends inside the IP header (options or IPv6 Fragment header included): dropped.
    pub const DROP_TRUNCATED_IP: u32 = 14;
    /// IP version field disagrees with the EtherType: dropped.
    pub const DROP_BAD_VERSION: u32 = 15;
    /// IPv4 IHL below 5: dropped.
    pub const DROP_BAD_IHL: u32 = 16;
    /// IP total/payload length inconsistent with the header or the frame: dropped.
    pub const DROP_BAD_LENGTH: u32 = 17;
    /// The TCP/UDP header does not fit: the frame, or the IP datagram as its
    /// length field says (the rest is padding), ends inside it; also a first
    /// fragment too short to hold it. Dropped.
    pub const DROP_TRUNCATED_L4: u32 = 18;
    /// Service has no usable backend: dropped.
    pub const DROP_NO_BACKEND: u32 = 19;
    /// Affinity entry pointed at a backend of another service: re-selected.
    pub const RESELECT_FOREIGN: u32 = 20;
    /// Non-fragment with destination port 0 (never a service): passed.
    pub const PASS_PORT_ZERO: u32 = 21;
    /// Another CPU recorded this new client first; its backend was used
    /// (counted besides `NEW_SESSION`).
    pub const AFFINITY_INSERT_RACE: u32 = 22;
    /// Non-first fragment with no entry in `XLB_FRAGS_V1` (its first fragment
    /// was not seen, came later, or was evicted; or it is not for a VIP at
    /// all): passed, since without a VIP set it may be the host's own traffic.
    pub const PASS_FRAGMENT_UNSEEN: u32 = 23;
    /// ICMP "fragmentation needed" (type 3 code 4) or ICMPv6 "packet too
    /// big" to a VIP, quoting a datagram from a service's VIP:port to a
    /// client: forwarded unchanged to that client's backend (its affinity
    /// entry, else the Maglev answer; no session is created).
    pub const ICMP_TOO_BIG_FORWARDED: u32 = 24;
    /// Session found in `XLB_PROTECTED_V1` (the client's backend differs
    /// from the Maglev answer, so it is kept out of the LRU's reach) and used.
    pub const AFFINITY_HIT_PROTECTED: u32 = 25;
    /// A new affinity entry was inserted into the LRU (counted besides the
    /// frame's verdict).
    pub const AFFINITY_ADMITTED: u32 = 26;
    /// A new client was forwarded by its Maglev answer without an affinity
    /// entry: its service's admission budget on this CPU was spent (counted
    /// besides the frame's verdict).
    pub const AFFINITY_ADMISSION_SKIPPED: u32 = 27;
    /// The backend's next hop MAC is not resolved yet (all-zero): dropped.
    pub const DROP_NEXTHOP_UNRESOLVED: u32 = 28;
    /// The packet would exceed the egress MTU once encapsulated (or the
    /// egress is not known yet): dropped, since the outer header carries DF
    /// and the backend could not reassemble outer fragments anyway.
    pub const DROP_ENCAP_TOO_BIG: u32 = 29;
    /// The frame could not be grown for the outer header: dropped.
    pub const DROP_ENCAP_FAILED: u32 = 30;
    /// Number of counters.
    pub const COUNT: u32 = 31;
    /// Slots in `XLB_STATS_V2` (>= `COUNT`; the rest stay zero).
    pub const CAPACITY: u32 = 64;

    /// Names in index order, for userspace display (snake_case, stable).
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ip",
        "pass_other_host",
        "pass_not_l4",
        "pass_not_service",
        "pass_v6_ext_header",
        "affinity_hit",
        "new_session",
        "reselect_expired",
        "reselect_down",
        "maglev_probed",
        "fragment",
        "affinity_insert_failed",
        "drop_truncated_eth",
        "drop_bad_vlan",
        "drop_truncated_ip",
        "drop_bad_version",
        "drop_bad_ihl",
        "drop_bad_length",
        "drop_truncated_l4",
        "drop_no_backend",
        "reselect_foreign",
        "pass_port_zero",
        "affinity_insert_race",
        "pass_fragment_unseen",
        "icmp_too_big_forwarded",
        "affinity_hit_protected",
        "affinity_admitted",
        "affinity_admission_skipped",
        "drop_nexthop_unresolved",
        "drop_encap_too_big",
        "drop_encap_failed",
    ];
}

/// Masks a client address word by word (both in `ServiceKey::addr` layout).
#[inline(always)]
pub fn mask_addr(addr: &[u32; 4], mask: &[u32; 4]) -> [u32; 4] {
    [
        addr[0] & mask[0],
        addr[1] & mask[1],
        addr[2] & mask[2],
        addr[3] & mask[3],
    ]
}

/// Builds the `Service::mask` words for a prefix of `prefix` bits over an
/// address of `bits` (32 or 128) bits; words past the address stay zero.
pub fn prefix_mask(prefix: u8, bits: u8) -> [u32; 4] {
    let mut bytes = [0u8; 16];
    let prefix = prefix.min(bits) as usize;
    let mut i = 0;
    while i < 16 {
        let start = i * 8;
        if start + 8 <= prefix {
            bytes[i] = 0xff;
        } else if start < prefix {
            bytes[i] = 0xffu8 << (8 - (prefix - start));
        }
        i += 1;
    }
    words_from_bytes(&bytes)
}

/// Converts 16 network-order bytes into the native-word layout used in keys.
#[inline(always)]
pub fn words_from_bytes(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// Converts the native-word key layout back into 16 network-order bytes.
pub fn bytes_from_words(w: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// Hash of a masked client address that indexes the Maglev table.
///
/// murmur3's 32-bit mixing over the four words with a fixed seed: no random
/// state, so every xlb instance (same byte order) maps a client to the same
/// slot without coordination, and userspace can predict the kernel's choice.
#[inline(always)]
pub fn client_hash(addr: &[u32; 4]) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h: u32 = 0x9747_b28c;
    let mut i = 0;
    while i < 4 {
        let mut k = addr[i].wrapping_mul(C1);
        k = k.rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    h ^= 16;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<Service>() == 64);
    assert!(core::mem::size_of::<Backend>() == 28);
    assert!(core::mem::size_of::<AffinityKey>() == 20);
    assert!(core::mem::size_of::<Affinity>() == 16);
    assert!(core::mem::size_of::<TrafficStats>() == 24);
    assert!(core::mem::size_of::<FragmentKey>() == 40);
    assert!(core::mem::size_of::<FragmentPorts>() == 4);
    assert!(core::mem::size_of::<Admission>() == 16);
    assert!(core::mem::size_of::<Egress>() == 32);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers, with every
    // padding byte an explicit field, so any bit pattern is valid.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::Affinity {}
    unsafe impl aya::Pod for super::TrafficStats {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentPorts {}
    unsafe impl aya::Pod for super::Admission {}
    unsafe impl aya::Pod for super::Egress {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_masks() {
        let m = prefix_mask(24, 32);
        assert_eq!(bytes_from_words(&m)[..4], [255, 255, 255, 0]);
        assert_eq!(bytes_from_words(&m)[4..], [0; 12]);
        let m = prefix_mask(32, 32);
        assert_eq!(bytes_from_words(&m)[..4], [255; 4]);
        let m = prefix_mask(0, 32);
        assert_eq!(m, [0; 4]);
        let m = prefix_mask(60, 128);
        let b = bytes_from_words(&m);
        assert_eq!(b[..7], [255; 7]);
        assert_eq!(b[7], 0xf0);
        assert_eq!(b[8..], [0; 8]);
        assert_eq!(prefix_mask(128, 128), [u32::MAX; 4]);
        // A prefix longer than the address is clamped, never spills into later words.
        assert_eq!(bytes_from_words(&prefix_mask(40, 32))[4..], [0; 12]);
    }

    #[test]
    fn word_bytes_round_trip() {
        let b: [u8; 16] = core::array::from_fn(|i| i as u8 * 7);
        assert_eq!(bytes_from_words(&words_from_bytes(&b)), b);
    }

    #[test]
    fn hash_is_fixed_and_spreads() {
        let a = words_from_bytes(&[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let b = words_from_bytes(&[10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        // Pinned value: a change here silently moves every client on upgrade.
        assert_eq!(client_hash(&a), client_hash(&a));
        assert_ne!(client_hash(&a), client_hash(&b));
        assert_eq!(client_hash(&a), 0x59d7_a83c);
    }

    #[test]
    fn stat_names_cover_every_counter() {
        assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
        assert_eq!(
            stat::NAMES[stat::DROP_NO_BACKEND as usize],
            "drop_no_backend"
        );
        assert_eq!(stat::NAMES[stat::AFFINITY_HIT as usize], "affinity_hit");
        assert_eq!(
            stat::NAMES[stat::AFFINITY_INSERT_RACE as usize],
            "affinity_insert_race"
        );
        assert_eq!(
            stat::NAMES[stat::PASS_FRAGMENT_UNSEEN as usize],
            "pass_fragment_unseen"
        );
        const { assert!(stat::COUNT <= stat::CAPACITY) };
    }

    #[test]
    fn layout_offsets() {
        assert_eq!(core::mem::offset_of!(ServiceKey, port), 16);
        assert_eq!(core::mem::offset_of!(Service, timeout_ns), 8);
        assert_eq!(core::mem::offset_of!(Service, mask), 24);
        assert_eq!(core::mem::offset_of!(Service, maglev_base), 40);
        assert_eq!(core::mem::offset_of!(Service, prefix_v4), 56);
        assert_eq!(core::mem::offset_of!(Service, admit_per_window), 60);
        assert_eq!(core::mem::offset_of!(Backend, mac), 16);
        assert_eq!(core::mem::offset_of!(Affinity, last_seen_ns), 8);
        assert_eq!(core::mem::offset_of!(FragmentKey, id), 4);
        assert_eq!(core::mem::offset_of!(FragmentKey, src), 8);
        assert_eq!(core::mem::offset_of!(FragmentPorts, dport), 2);
    }
}

// ---------------------------------------------------------------------------
// decap: the IP-in-IP decapsulator `xlb decap` attaches on backends whose
// kernel has no ipip/ip6tnl device (issue 10 item 5). A separate program
// with its own pins; nothing above refers to it.
// ---------------------------------------------------------------------------

/// ABI of the `xlb_decap` program (`lb-ebpf/src/bin/decap.rs`): map names,
/// the VIP key and the counters. Same rules as the rest of this file.
pub mod decap {
    /// VIPs whose encapsulated packets are decapsulated:
    /// `HASH<DecapVip, u32>`, `MAX_VIPS` entries; the value is reserved
    /// (written as 1, never read).
    pub const MAP_VIPS: &str = "XLB_DECAP_VIPS_V1";
    /// Per-reason counters: `PERCPU_ARRAY<u64>` indexed by `stat::*`,
    /// `stat::CAPACITY` slots.
    pub const MAP_STATS: &str = "XLB_DECAP_STATS_V1";
    /// Every pinned map of the decapsulator.
    pub const PINNED_MAPS: [&str; 2] = [MAP_VIPS, MAP_STATS];
    /// Name of the XDP program in the `xlb-decap` object.
    pub const PROGRAM: &str = "xlb_decap";
    /// Capacity of `XLB_DECAP_VIPS_V1`.
    pub const MAX_VIPS: u32 = 1024;
    /// `XLB_DECAP_VIPS_V1` value of a present VIP.
    pub const VIP_PRESENT: u32 = 1;

    /// Key of `XLB_DECAP_VIPS_V1`: the inner destination address.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct DecapVip {
        /// Address in the `ServiceKey::addr` layout (raw network-order
        /// bytes read as native words); IPv4 in word 0, words 1..3 zero.
        pub addr: [u32; 4],
        /// `FAMILY_V4` or `FAMILY_V6`.
        pub family: u8,
        /// Explicit padding; always zero.
        pub _pad: [u8; 3],
    }

    /// Counters, the index into `XLB_DECAP_STATS_V1`. Every frame moves
    /// exactly one. Every verdict is XDP_PASS: the program runs on a
    /// backend and never drops the host's own traffic.
    pub mod stat {
        /// IPv4 in IPv4 (protocol 4): outer header stripped.
        pub const DECAP_4IN4: u32 = 0;
        /// IPv6 in IPv6 (next header 41): outer header stripped.
        pub const DECAP_6IN6: u32 = 1;
        /// IPv6 in IPv4 (protocol 41): outer header stripped.
        pub const DECAP_6IN4: u32 = 2;
        /// IPv4 in IPv6 (next header 4): outer header stripped.
        pub const DECAP_4IN6: u32 = 3;
        /// Not IPv4/IPv6 (ARP and others): passed.
        pub const PASS_NOT_IP: u32 = 4;
        /// IP, but not protocol 4 or 41: passed.
        pub const PASS_NOT_IPIP: u32 = 5;
        /// IP-in-IP whose inner destination is no configured VIP: passed untouched.
        pub const PASS_NOT_VIP: u32 = 6;
        /// Truncated or malformed (Ethernet, VLAN tag, outer or inner IP
        /// header, inconsistent lengths): passed untouched.
        pub const PASS_MALFORMED: u32 = 7;
        /// Outer IPv4 header checksum wrong: passed untouched (the stack drops it).
        pub const PASS_BAD_CHECKSUM: u32 = 8;
        /// Outer IPv4 fragment or outer IPv6 Fragment header: passed
        /// untouched (only the stack can reassemble).
        pub const PASS_OUTER_FRAGMENT: u32 = 9;
        /// Outer IPv6 with an extension header: passed untouched.
        pub const PASS_V6_EXT_HEADER: u32 = 10;
        /// `bpf_xdp_adjust_head` refused: passed untouched.
        pub const PASS_ADJUST_FAILED: u32 = 11;
        /// Number of counters.
        pub const COUNT: u32 = 12;
        /// Slots in `XLB_DECAP_STATS_V1` (>= `COUNT`; the rest stay zero).
        pub const CAPACITY: u32 = 32;

        /// Names in index order, for userspace display (snake_case, stable).
        pub const NAMES: [&str; COUNT as usize] = [
            "decap_4in4",
            "decap_6in6",
            "decap_6in4",
            "decap_4in6",
            "pass_not_ip",
            "pass_not_ipip",
            "pass_not_vip",
            "pass_malformed",
            "pass_bad_checksum",
            "pass_outer_fragment",
            "pass_v6_ext_header",
            "pass_adjust_failed",
        ];
    }

    const _: () = {
        assert!(core::mem::size_of::<DecapVip>() == 20);
        assert!(stat::COUNT <= stat::CAPACITY);
    };

    #[cfg(feature = "user")]
    // SAFETY: #[repr(C)], integers only, padding an explicit field: any bit pattern is valid.
    unsafe impl aya::Pod for DecapVip {}

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn layout_and_names() {
            assert_eq!(core::mem::offset_of!(DecapVip, family), 16);
            assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
            assert_eq!(stat::NAMES[stat::PASS_NOT_VIP as usize], "pass_not_vip");
            assert_eq!(
                stat::NAMES[stat::PASS_ADJUST_FAILED as usize],
                "pass_adjust_failed"
            );
        }
    }
}
