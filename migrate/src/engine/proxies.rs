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
    pub(super) fn observe_proxies(&self) -> usize {
        let mut guard = self.returning.lock().unwrap_or_else(|p| p.into_inner());
        let (returning, last) = &mut *guard;
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < PROXIES_EVERY) {
            return returning.awaited();
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
        if let Some(save) = observed.save
            && let Err(e) = self.policy.save_proxies(&self.config.node, &save)
        {
            tracing::warn!(error = %e, "cannot record the connected proxies");
        }
        returning.awaited()
    }
}
