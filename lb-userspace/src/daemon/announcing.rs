//! Keeps the `announce_table` saying which VIPs this node is ready to serve:
//! follows the owner's readiness (a watch channel), re-reads the table every
//! [`RESYNC`] so a route someone deleted comes back, removes at start the
//! routes an earlier run left that are not ready now, and on shutdown
//! withdraws every route before the daemon goes on to exit.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::metrics::Metrics;
use super::owner::VipReadiness;
use crate::announce::{Announcer, ready_set};

/// How often the table is compared with the readiness when nothing changed.
pub const RESYNC: Duration = Duration::from_secs(5);

/// Why a round of [`sync`] runs: it words the log lines.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Round {
    Start,
    Change,
    Resync,
}

/// Runs until `stop` fires (then withdraws everything) or the owner is gone.
pub async fn supervise(
    mut readiness: watch::Receiver<VipReadiness>,
    table: u32,
    ifindex: u32,
    metrics: Arc<Metrics>,
    mut stop: oneshot::Receiver<()>,
) {
    let announcer = match Announcer::new(table, ifindex) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(table, "no VIP will be announced: {e:#}");
            return;
        }
    };
    // The owner publishes from its thread once it runs; judging the empty
    // initial value would withdraw every VIP an earlier run announced.
    match readiness.has_changed() {
        Ok(true) => {}
        Ok(false) => {
            tokio::select! {
                changed = readiness.changed() => if changed.is_err() { return; },
                _ = &mut stop => return,
            }
        }
        Err(_) => return,
    }
    let mut round = Round::Start;
    let mut ticker = tokio::time::interval(RESYNC);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        let current = readiness.borrow_and_update().clone();
        sync(&announcer, table, &current, round, &metrics).await;
        tokio::select! {
            changed = readiness.changed() => {
                if changed.is_err() {
                    return;
                }
                round = Round::Change;
            }
            _ = ticker.tick() => round = Round::Resync,
            _ = &mut stop => {
                withdraw_all(&announcer, table, &metrics).await;
                return;
            }
        }
    }
}

/// Makes the table hold exactly the ready VIPs. Failures are logged and
/// retried at the next round.
async fn sync(
    announcer: &Announcer,
    table: u32,
    readiness: &VipReadiness,
    round: Round,
    metrics: &Metrics,
) {
    let mut present = match announcer.announced().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(table, "reading the announced VIPs (retrying): {e:#}");
            return;
        }
    };
    let want = ready_set(readiness);
    for vip in want.difference(&present.clone()) {
        let reason = readiness.get(vip).map_or("", |r| r.reason.as_str());
        match announcer.announce(*vip).await {
            Ok(()) => {
                present.insert(*vip);
                if round == Round::Resync {
                    tracing::warn!(%vip, table, "announced VIP {vip} again: its route was missing from the table ({reason})");
                } else {
                    tracing::info!(%vip, table, "announced VIP {vip}: {reason}");
                }
            }
            Err(e) => tracing::error!(%vip, table, "announcing VIP {vip} failed (retrying): {e:#}"),
        }
    }
    for vip in present.clone().difference(&want) {
        let reason = match (readiness.get(vip), round) {
            (Some(r), _) => r.reason.clone(),
            (None, Round::Start) => "a route left by an earlier run; not in the config".to_string(),
            (None, _) => "no longer in the config".to_string(),
        };
        match announcer.withdraw(*vip).await {
            Ok(()) => {
                present.remove(vip);
                tracing::info!(%vip, table, "withdrew VIP {vip}: {reason}");
            }
            Err(e) => {
                tracing::error!(%vip, table, "withdrawing VIP {vip} failed (retrying): {e:#}")
            }
        }
    }
    metrics.set_announced(present);
}

/// Withdraws every route of xlb's in the table (shutdown).
async fn withdraw_all(announcer: &Announcer, table: u32, metrics: &Metrics) {
    let present = match announcer.announced().await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(table, "reading the announced VIPs to withdraw them: {e:#}");
            return;
        }
    };
    let mut left: BTreeSet<IpAddr> = present.clone();
    for vip in &present {
        match announcer.withdraw(*vip).await {
            Ok(()) => {
                left.remove(vip);
                tracing::info!(%vip, table, "withdrew VIP {vip}: the daemon is stopping");
            }
            Err(e) => {
                tracing::error!(%vip, table, "withdrawing VIP {vip} at shutdown failed: {e:#}")
            }
        }
    }
    metrics.set_announced(left);
}
