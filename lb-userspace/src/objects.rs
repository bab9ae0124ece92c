//! Helper XDP programs built from lb-ebpf next to xlb itself, for the lab
//! and the benchmarks. Embedded here because build.rs already compiles
//! every lb-ebpf binary; each is a few kilobytes.

/// Rewrites each frame's client address and sends it (`xlb_gen`): the
/// per-frame step of the live-frames traffic generator.
pub static GEN_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-gen"));
/// Counts and drops every frame (`xlb_sink`): the far end of the rate bench.
pub static SINK_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-sink"));
/// Swaps MACs and sends (`xlb_tx`): the limit of the XDP_TX path.
pub static TX_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-tx"));
