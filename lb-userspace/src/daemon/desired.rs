//! Pure decisions of the daemon, kept apart from every effect so they are
//! unit-tested without root: the health state machine of one backend
//! (HAProxy's rise/fall) and when a service enters and leaves panic mode.

use std::time::{Duration, Instant};

/// Health of one checked backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Whether the backend takes traffic as far as its checks go.
    pub up: bool,
    /// Consecutive successful checks.
    pub successes: u32,
    /// Consecutive failed checks.
    pub failures: u32,
    /// Why it last changed (or why it starts as it does).
    pub reason: Option<String>,
}

/// A change of health decided by one check result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// `rise` successes in a row: up again.
    Up(String),
    /// `fall` failures in a row: down.
    Down(String),
}

impl Health {
    /// A backend that starts up (it was serving before, or nothing is known against it).
    pub fn up() -> Self {
        Self {
            up: true,
            successes: 0,
            failures: 0,
            reason: None,
        }
    }

    /// A backend that starts down until it passes `rise` checks.
    pub fn down(reason: impl Into<String>) -> Self {
        Self {
            up: false,
            successes: 0,
            failures: 0,
            reason: Some(reason.into()),
        }
    }

    /// Feeds one check result (`Ok(latency)` or `Err(why)`); returns the transition it causes.
    pub fn feed(
        &mut self,
        result: &Result<Duration, String>,
        rise: u32,
        fall: u32,
        kind: &str,
    ) -> Option<Transition> {
        match result {
            Ok(latency) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                if !self.up && self.successes >= rise {
                    self.up = true;
                    let why = format!(
                        "{rise} consecutive successful {kind} checks (last took {latency:?})"
                    );
                    self.reason = Some(why.clone());
                    return Some(Transition::Up(why));
                }
            }
            Err(e) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                if self.up && self.failures >= fall {
                    self.up = false;
                    let why = format!("{fall} consecutive failures, last: {e}");
                    self.reason = Some(why.clone());
                    return Some(Transition::Down(why));
                }
                if !self.up {
                    // Still down: say why now (a timeout at start may turn into a reset).
                    self.reason =
                        Some(format!("{} consecutive failures, last: {e}", self.failures));
                }
            }
        }
        None
    }
}

/// Panic-mode memory of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Panic {
    /// Whether the service is in panic mode (every in-service backend used as if healthy).
    pub active: bool,
    /// While in panic: since when at least one backend passes its checks again.
    pub first_up: Option<Instant>,
}

/// Decides panic mode for a service from the health of its in-service
/// (not `maint`) backends: `Some(true)` up, `Some(false)` down, `None` unchecked.
///
/// Enter when every in-service backend fails. Leave only when all of them
/// pass again, or when at least one has passed for `grace`. Leaving at the
/// first recovery would move every client of the still-failing backends
/// onto the one back first, where they would stay (sticky) even after the
/// others recover a moment later: when a shared dependency fails, backends
/// come back together, within about one check interval of each other.
pub fn panic_step(prev: Panic, health: &[Option<bool>], now: Instant, grace: Duration) -> Panic {
    let n = health.len();
    let failing = health.iter().filter(|h| **h == Some(false)).count();
    if !prev.active {
        return Panic {
            active: n > 0 && failing == n,
            first_up: None,
        };
    }
    if n == 0 || failing == 0 {
        return Panic::default();
    }
    if failing == n {
        return Panic {
            active: true,
            first_up: None,
        };
    }
    let first_up = prev.first_up.unwrap_or(now);
    if now.duration_since(first_up) >= grace {
        return Panic::default();
    }
    Panic {
        active: true,
        first_up: Some(first_up),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Result<Duration, String> {
        Ok(Duration::from_millis(1))
    }

    fn bad() -> Result<Duration, String> {
        Err("connect: refused".into())
    }

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut h = Health::up();
        assert_eq!(h.feed(&bad(), 2, 3, "tcp"), None);
        assert_eq!(h.feed(&bad(), 2, 3, "tcp"), None);
        // A success in between resets the count.
        assert_eq!(h.feed(&ok(), 2, 3, "tcp"), None);
        assert_eq!(h.feed(&bad(), 2, 3, "tcp"), None);
        assert_eq!(h.feed(&bad(), 2, 3, "tcp"), None);
        let t = h.feed(&bad(), 2, 3, "tcp").expect("third failure");
        assert!(
            matches!(&t, Transition::Down(w) if w.contains("3 consecutive failures") && w.contains("refused"))
        );
        assert!(!h.up);
        assert_eq!(h.feed(&bad(), 2, 3, "tcp"), None, "already down");
        assert_eq!(h.feed(&ok(), 2, 3, "tcp"), None);
        assert!(matches!(
            h.feed(&ok(), 2, 3, "tcp"),
            Some(Transition::Up(_))
        ));
        assert!(h.up);
    }

    #[test]
    fn an_added_backend_needs_rise_checks() {
        let mut h = Health::down("new");
        assert!(!h.up);
        assert_eq!(h.feed(&ok(), 3, 3, "http"), None);
        assert_eq!(h.feed(&ok(), 3, 3, "http"), None);
        assert!(matches!(
            h.feed(&ok(), 3, 3, "http"),
            Some(Transition::Up(_))
        ));
    }

    #[test]
    fn panic_is_entered_only_when_all_fail() {
        let t = Instant::now();
        let g = Duration::from_secs(5);
        let p = panic_step(Panic::default(), &[Some(false), Some(true)], t, g);
        assert!(!p.active);
        let p = panic_step(Panic::default(), &[Some(false), Some(false)], t, g);
        assert!(p.active);
        // Unchecked backends never count as failing; no backends, no panic.
        assert!(!panic_step(Panic::default(), &[Some(false), None], t, g).active);
        assert!(!panic_step(Panic::default(), &[], t, g).active);
    }

    #[test]
    fn panic_is_left_when_all_recover_or_after_grace() {
        let t0 = Instant::now();
        let g = Duration::from_secs(5);
        let mut p = panic_step(Panic::default(), &[Some(false); 3], t0, g);
        assert!(p.active);
        // One back: still panic (its peers' clients must not crowd onto it).
        p = panic_step(p, &[Some(true), Some(false), Some(false)], t0, g);
        assert!(p.active);
        assert_eq!(p.first_up, Some(t0));
        let t1 = t0 + Duration::from_secs(1);
        p = panic_step(p, &[Some(true), Some(true), Some(false)], t1, g);
        assert!(p.active, "two of three back within the grace: still panic");
        // All back: panic over at once.
        let all = panic_step(p, &[Some(true); 3], t1, g);
        assert_eq!(all, Panic::default());
        // Or the third stays dead: panic over once the grace has passed.
        let late = panic_step(p, &[Some(true), Some(true), Some(false)], t0 + g, g);
        assert!(!late.active);
        // Everyone failing again restarts the wait.
        let again = panic_step(p, &[Some(false); 3], t1, g);
        assert_eq!(
            again,
            Panic {
                active: true,
                first_up: None
            }
        );
    }

    #[test]
    fn a_down_backend_says_why_it_fails_now() {
        let mut h = Health::up();
        for _ in 0..3 {
            h.feed(&Err("timeout after 150ms".into()), 2, 3, "tcp");
        }
        assert!(!h.up);
        assert_eq!(h.feed(&Err("refused: reset".into()), 2, 3, "tcp"), None);
        let reason = h.reason.clone().unwrap_or_default();
        assert_eq!(reason, "4 consecutive failures, last: refused: reset");
    }
}
