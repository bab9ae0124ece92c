// Exists so lb-userspace can name this crate as a build-dependency, and to
// hold what every program binary (src/main.rs, src/bin/) shares.
#![no_std]

/// Expands to what every XDP program binary needs besides its code: a
/// panic handler (never reached: the verifier rejects any path that could
/// panic) and the license section the kernel reads.
#[macro_export]
macro_rules! program_boilerplate {
    () => {
        #[cfg(not(test))]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
    };
}
