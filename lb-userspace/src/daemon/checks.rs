//! The health-check tasks: one per checked backend, started spread over the
//! interval so a large pool is not probed all at once, restarted when the
//! owner publishes a new target list. A task runs its check and hands the
//! result to the owner without waiting for it, so a check's time is its
//! own and never includes time queued behind a map write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::health::{self, CheckOutcome};
use super::lb::{BackendRef, CheckTarget};
use super::metrics::Metrics;
use super::owner::Handle;
use crate::config::HealthVia;

/// Keeps the running check tasks in step with the owner's target list until the list's sender is gone.
pub async fn supervise(
    mut targets: watch::Receiver<Vec<CheckTarget>>,
    owner: Handle,
    metrics: Arc<Metrics>,
) {
    let mut running: HashMap<BackendRef, (CheckTarget, JoinHandle<()>)> = HashMap::new();
    loop {
        let wanted = targets.borrow_and_update().clone();
        running.retain(|r, (t, handle)| {
            let keep = wanted.iter().any(|n| n == t) && !handle.is_finished();
            if !keep {
                tracing::debug!(backend = %r, "stopping health checks");
                handle.abort();
            }
            keep
        });
        let new: Vec<CheckTarget> = wanted
            .into_iter()
            .filter(|t| !running.contains_key(&t.backend))
            .collect();
        let n = new.len() as u32;
        for (i, target) in new.into_iter().enumerate() {
            let offset = target.spec.interval * i as u32 / n.max(1);
            let handle = tokio::spawn(check_loop(
                target.clone(),
                offset,
                owner.clone(),
                metrics.clone(),
            ));
            running.insert(target.backend.clone(), (target, handle));
        }
        if targets.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, handle)) in running {
        handle.abort();
    }
}

async fn check_loop(target: CheckTarget, offset: Duration, owner: Handle, metrics: Arc<Metrics>) {
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + offset, target.spec.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let outcome = match target.spec.via {
            HealthVia::Direct => health::check(target.addr, &target.spec, target.source).await,
            HealthVia::Tunnel => {
                health::check_tunnelled(target.addr.ip(), target.vip, &target.spec, target.source)
                    .await
            }
        };
        metrics.observe_check(&target.backend, &outcome);
        let result = match outcome {
            CheckOutcome::Pass(latency) => Ok(latency),
            CheckOutcome::Fail(why) => Err(why),
            // No evidence about the backend: its rise/fall counters stay as they are.
            CheckOutcome::NotRun(why) => {
                health::log_not_run(&target.backend, target.addr, &why);
                continue;
            }
        };
        owner.check(target.backend.clone(), result);
    }
}
