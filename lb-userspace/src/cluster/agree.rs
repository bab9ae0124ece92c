//! The pure decisions that make nodes agree: who coordinates, the cluster's
//! health verdict, and when a prepared version may be swapped in. No I/O,
//! so every rule is unit-tested.
//!
//! - **Coordinator**: the lowest node id among this node and its live peers
//!   (a Hello within [`LIVE_FOR`]). Only it makes new versions, so changes
//!   are serialized; every node computes the same answer when all see all.
//! - **Health**: a checked backend is down when more than half of the live
//!   nodes that check it see it down (each after its own `fall` checks). One
//!   node's flaky path cannot take a backend away from the others, and a
//!   backend that is really dead is seen dead by all.
//! - **Swap**: a node takes a prepared version once every peer that was
//!   live when the round began said Done (it sent all the sessions the
//!   version makes divergent), or the peer stopped being live, or
//!   [`ROUND_TIMEOUT`] passed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::msg::{Doc, Version};

/// A peer is live while its last Hello is at most this old.
pub const LIVE_FOR: Duration = Duration::from_secs(3);
/// Longest a prepare round waits for a peer's Done.
pub const ROUND_TIMEOUT: Duration = Duration::from_secs(2);

/// The coordinator among `me` and `live` peers.
pub fn coordinator(me: u32, live: impl IntoIterator<Item = u32>) -> u32 {
    live.into_iter().fold(me, u32::min)
}

/// The cluster's verdict: the backends that more than half of the nodes
/// reporting on them see down. `views` holds every live node's own checks
/// ("service/backend" → up), this node's included.
pub fn verdict<'a>(
    views: impl IntoIterator<Item = &'a BTreeMap<String, bool>>,
) -> BTreeSet<String> {
    let mut tally: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for view in views {
        for (backend, up) in view {
            let t = tally.entry(backend.as_str()).or_default();
            t.0 += 1;
            if !up {
                t.1 += 1;
            }
        }
    }
    tally
        .into_iter()
        .filter(|(_, (seen, down))| down * 2 > *seen)
        .map(|(b, _)| b.to_string())
        .collect()
}

/// A prepared version waiting for the peers' Done.
#[derive(Debug, Clone)]
pub struct Round {
    /// The version to swap to.
    pub doc: Doc,
    /// Peers whose Done is still missing.
    pub waiting: BTreeSet<u32>,
    /// When it began.
    pub started: Instant,
    /// The runtime change it carries, if one (request id, local asker or node).
    pub origin: Option<Origin>,
    /// What the asker is told once it is live.
    pub text: String,
}

/// Who asked for the change a round carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This node's control socket, request id.
    Local(u64),
    /// Another node's forwarded request (node, its request id).
    Peer(u32, u64),
}

/// Why a round may end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundEnd {
    /// Every peer said Done.
    Complete,
    /// These peers were waited for until the timeout or stopped being live.
    GaveUp(BTreeSet<u32>),
}

impl Round {
    /// Starts a round for `doc`, waiting for `live` peers (minus those that
    /// already said Done for it, whose Done arrived before the Doc).
    pub fn new(doc: Doc, live: &BTreeSet<u32>, early: &BTreeSet<u32>, now: Instant) -> Self {
        Self {
            doc,
            waiting: live.difference(early).copied().collect(),
            started: now,
            origin: None,
            text: String::new(),
        }
    }

    /// Records `peer`'s Done for `version`; true when it was this round's.
    pub fn done(&mut self, peer: u32, version: Version) -> bool {
        version == self.doc.version && self.waiting.remove(&peer)
    }

    /// Whether the round may end now, and how.
    pub fn end(&self, live: &BTreeSet<u32>, now: Instant) -> Option<RoundEnd> {
        if self.waiting.is_empty() {
            return Some(RoundEnd::Complete);
        }
        let gone: BTreeSet<u32> = self.waiting.difference(live).copied().collect();
        if gone.len() == self.waiting.len() || now.duration_since(self.started) >= ROUND_TIMEOUT {
            return Some(RoundEnd::GaveUp(self.waiting.clone()));
        }
        None
    }
}

/// Whether a draining backend may become maint: no live node (this one
/// included, in `counts`) still has sessions on it.
pub fn drain_finished<'a>(
    backend: &str,
    counts: impl IntoIterator<Item = &'a BTreeMap<String, u64>>,
) -> bool {
    counts
        .into_iter()
        .all(|c| c.get(backend).copied().unwrap_or(0) == 0)
}

/// The version a coordinator gives its next change: above every version seen.
pub fn next_version(me: u32, seen: impl IntoIterator<Item = Version>) -> Version {
    let top = seen.into_iter().max().unwrap_or_default();
    Version {
        counter: top.counter + 1,
        node: me,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(pairs: &[(&str, bool)]) -> BTreeMap<String, bool> {
        pairs.iter().map(|(b, u)| (b.to_string(), *u)).collect()
    }

    #[test]
    fn the_lowest_live_id_coordinates() {
        assert_eq!(coordinator(2, [3, 1]), 1);
        assert_eq!(coordinator(2, [3]), 2);
        assert_eq!(coordinator(5, []), 5);
    }

    #[test]
    fn one_flaky_node_cannot_take_a_backend_down_but_a_majority_does() {
        let a = view(&[("web/b1", false), ("web/b2", true)]);
        let b = view(&[("web/b1", true), ("web/b2", true)]);
        let c = view(&[("web/b1", true), ("web/b2", false)]);
        assert!(
            verdict([&a, &b, &c]).is_empty(),
            "one of three never decides"
        );
        let c2 = view(&[("web/b1", false), ("web/b2", true)]);
        assert_eq!(
            verdict([&a, &b, &c2]),
            BTreeSet::from(["web/b1".to_string()])
        );
        // Alone, a node's own view rules; of two, both must agree.
        assert_eq!(verdict([&a]), BTreeSet::from(["web/b1".to_string()]));
        assert!(verdict([&a, &b]).is_empty());
        // A node that does not check a backend has no say on it.
        let quiet = view(&[]);
        assert_eq!(
            verdict([&a, &quiet]),
            BTreeSet::from(["web/b1".to_string()])
        );
    }

    #[test]
    fn a_round_completes_on_every_done_and_gives_up_on_the_dead() {
        let now = Instant::now();
        let doc = Doc {
            version: Version {
                counter: 4,
                node: 1,
            },
            ..Doc::default()
        };
        let live = BTreeSet::from([2, 3]);
        let mut r = Round::new(doc.clone(), &live, &BTreeSet::from([3]), now);
        assert_eq!(r.end(&live, now), None);
        assert!(
            !r.done(
                2,
                Version {
                    counter: 3,
                    node: 1
                }
            ),
            "another version's Done"
        );
        assert!(r.done(2, doc.version));
        assert_eq!(r.end(&live, now), Some(RoundEnd::Complete));

        let mut r = Round::new(doc.clone(), &live, &BTreeSet::new(), now);
        assert!(r.done(3, doc.version));
        assert_eq!(
            r.end(&BTreeSet::from([3]), now),
            Some(RoundEnd::GaveUp(BTreeSet::from([2])))
        );
        assert_eq!(r.end(&live, now + Duration::from_millis(100)), None);
        assert_eq!(
            r.end(&live, now + ROUND_TIMEOUT),
            Some(RoundEnd::GaveUp(BTreeSet::from([2])))
        );
    }

    #[test]
    fn drains_finish_only_when_no_node_has_sessions_left() {
        let mine = BTreeMap::from([("web/b1".to_string(), 0)]);
        let peer = BTreeMap::from([("web/b1".to_string(), 3)]);
        assert!(!drain_finished("web/b1", [&mine, &peer]));
        assert!(drain_finished("web/b1", [&mine, &BTreeMap::new()]));
    }

    #[test]
    fn next_versions_rise_above_all_seen() {
        let v = next_version(
            2,
            [
                Version {
                    counter: 7,
                    node: 3,
                },
                Version {
                    counter: 5,
                    node: 1,
                },
            ],
        );
        assert_eq!(
            v,
            Version {
                counter: 8,
                node: 2
            }
        );
        assert_eq!(
            next_version(1, []),
            Version {
                counter: 1,
                node: 1
            }
        );
    }
}
