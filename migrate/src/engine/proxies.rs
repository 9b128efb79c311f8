//! The connected proxies, and those awaited after a restart.

use super::*;

impl Engine {
    /// Proxies connected before the last restart that are not back yet.
    pub fn returning_proxies(&self) -> usize {
        self.returning
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .awaited()
    }

    /// Looks at the connected proxies (at most every [`PROXIES_EVERY`]),
    /// records them when they changed, and returns how many proxies are
    /// still awaited after a restart.
    pub(super) async fn observe_proxies(&self) -> usize {
        let (awaited, save) = self.look_at_proxies();
        if let Some(save) = save
            && let Err(e) = self.policy.save_proxies(&self.config.node, &save).await
        {
            tracing::warn!(error = %e, "cannot record the connected proxies");
        }
        awaited
    }

    /// How many proxies are still awaited, and the connected set to record
    /// if it changed.
    fn look_at_proxies(&self) -> (usize, Option<BTreeSet<String>>) {
        let mut guard = self.returning.lock().unwrap_or_else(|p| p.into_inner());
        let (returning, last) = &mut *guard;
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < PROXIES_EVERY) {
            return (returning.awaited(), None);
        }
        *last = Some(now);
        let connected = self.clients.nodes_subscribed(ResourceType::Route.short());
        let observed = returning.observe(&connected, now);
        if observed.all_back {
            tracing::info!("every proxy connected before this start is back");
        }
        if !observed.gave_up_on.is_empty() {
            tracing::warn!(
                missing = observed.gave_up_on.len(),
                first = ?observed.gave_up_on.iter().take(10).collect::<Vec<_>>(),
                grace = ?self.config.restart_grace,
                "proxies connected before this start did not come back within the grace period; no longer waiting for them"
            );
        }
        metrics::gauge!("ferry_migrate_returning_proxies").set(returning.awaited() as f64);
        (returning.awaited(), observed.save)
    }
}
