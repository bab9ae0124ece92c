use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

// Compiles lb-ebpf for the BPF target (nightly, build-std) into OUT_DIR, where
// src/dataplane.rs embeds it: the xlb binary carries its own program.
fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&manifest).join("..").join("lb-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
