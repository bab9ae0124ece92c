//! `xlb detach`: detach the program and remove every pin.

use anyhow::Result;
use xlb::{dataplane, lock::PinLock};

use super::Target;

/// `xlb detach`.
pub fn run(target: Target) -> Result<()> {
    let dir = target.pin_path()?;
    // A daemon would put the pins back (and keep forwarding): stop it first.
    let _lock = if dir.exists() {
        Some(PinLock::acquire(&dir)?)
    } else {
        None
    };
    let removed = dataplane::detach(&dir)?;
    if removed.is_empty() {
        outln!("nothing pinned at {}", dir.display())?;
    } else {
        outln!(
            "detached; removed {} pins from {}",
            removed.len(),
            dir.display()
        )?;
    }
    Ok(())
}
