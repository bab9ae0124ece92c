//! Process limits the daemon adjusts at start.
//!
//! systemd starts services with a soft `RLIMIT_NOFILE` of 1024; a daemon that
//! accepts connections and opens a socket per health check runs out within a
//! second under a connection flood, and then every check fails with EMFILE.
//! Raising the soft limit to the hard one needs no privilege.

use anyhow::{Context as _, Result};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (soft before, soft after).
pub fn raise_nofile_limit() -> Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the open-file limit");
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads a struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!(
                    "raising the open-file limit from {before} to {}",
                    lim.rlim_max
                )
            });
        }
        lim = raised;
    }
    Ok((before, lim.rlim_cur))
}

/// [`raise_nofile_limit`], with the outcome logged: what the daemon got, or why not.
pub fn raise_nofile_limit_logged() {
    match raise_nofile_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!("open-file limit raised from {before} to {after}");
        }
        Ok((_, after)) => tracing::info!("open-file limit {after} (already the hard limit)"),
        Err(e) => tracing::warn!("keeping the open-file limit: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> libc::rlimit {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into a struct we own.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        lim
    }

    /// Lowers the soft limit first, so the raise is seen whatever the test runner
    /// started with; then a second call has nothing left to raise.
    #[test]
    fn raises_soft_to_hard() {
        let hard = current().rlim_max;
        let low = hard.min(512);
        let lowered = libc::rlimit {
            rlim_cur: low,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads a struct we own; lowering the soft limit is always allowed.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        let (before, after) = raise_nofile_limit().expect("raise");
        assert_eq!((before, after), (low, hard));
        let now = current();
        assert_eq!((now.rlim_cur, now.rlim_max), (hard, hard));
        assert_eq!(raise_nofile_limit().expect("again"), (hard, hard));
    }
}
