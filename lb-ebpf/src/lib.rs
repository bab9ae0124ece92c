// Exists so lb-userspace can name this crate as a build-dependency; the
// programs are the binaries (src/main.rs, src/bin/).
#![no_std]
