//! What people ask of migrations: create, pause, resume, abort.

use super::*;

impl Engine {
    /// Validates a plan and records the migration; the engine starts it
    /// when a slot is free. A refused plan changes nothing.
    pub async fn create(
        &self,
        plan: Plan,
        actor: &str,
        reason: &str,
    ) -> Result<Migration, PolicyError> {
        require_reason(reason)?;
        let _writer = self.writer.lock().await;
        let (m, detail) = self.prepare(&self.lock(), plan, actor, reason)?;
        let change = Change {
            acting_owner: Some(actor.to_owned()),
            migration: Some((m.id.clone(), encode(&m)?)),
            ..Change::new(
                m.plan.service.clone(),
                actor,
                "migration_created",
                reason,
                format!("{}: {detail}", m.id),
            )
        };
        self.policy.transact(change).await?;
        tracing::info!(id = %m.id, service = %m.plan.service, actor, %detail, "migration created");
        let mut map = self.lock();
        map.insert(m.id.clone(), m.clone());
        self.export_gauges(&map);
        self.announce(m.clone());
        drop(map);
        self.wake.notify_one();
        Ok(m)
    }

    /// A new migration record for `plan`, checked against the migrations
    /// in `map`, pins, the catalog and the current weights; nothing is
    /// written.
    pub(super) fn prepare(
        &self,
        map: &Migrations,
        plan: Plan,
        actor: &str,
        reason: &str,
    ) -> Result<(Migration, String), PolicyError> {
        if let Some(running) = map.active().find(|m| m.plan.service == plan.service) {
            return Err(PolicyError::Precondition(format!(
                "migration {} is already {} on service {}",
                running.id,
                running.stage.as_str(),
                plan.service
            )));
        }
        if let Some(pin) = self.policy.pin_of(&plan.service) {
            return Err(PolicyError::Pinned {
                service: plan.service.to_string(),
                owner: pin.owner,
                reason: pin.reason,
            });
        }
        self.deployer.check(&plan)?;
        let catalog = self.catalog.current();
        let service = catalog.services.get(&plan.service).map(|s| &**s);
        let current = service
            .is_some()
            .then(|| self.policy.weights(&plan.service.to_string()))
            .transpose()?
            .map(|(_, w, _, _)| w);
        let next_number = map
            .keys()
            .filter_map(|id| id.strip_prefix("mig-").and_then(|n| n.parse::<u64>().ok()))
            .max()
            .unwrap_or(0)
            + 1;
        let id = format!("mig-{next_number}");
        migration::create(id, plan, service, current.as_ref(), actor, reason, now_ms())
    }

    /// Holds a migration at its current weights.
    pub async fn pause(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Migration, PolicyError> {
        self.operate(id, actor, reason, |m| migration::pause(m, actor, reason))
            .await
    }

    /// Continues a paused migration; a step that was baking bakes again in
    /// full, a step awaiting acknowledgement waits afresh.
    pub async fn resume(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Migration, PolicyError> {
        self.operate(id, actor, reason, |m| {
            migration::resume(m, reason, now_ms())
        })
        .await
    }

    /// Sends all traffic back to the sources at once and stops.
    pub async fn abort(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Migration, PolicyError> {
        self.operate(id, actor, reason, |m| {
            migration::abort(m, actor, reason, now_ms())
        })
        .await
    }

    async fn operate(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        f: impl FnOnce(&Migration) -> Result<Transition, PolicyError>,
    ) -> Result<Migration, PolicyError> {
        require_reason(reason)?;
        let _writer = self.writer.lock().await;
        let m = self.get(id)?;
        let t = f(&m)?;
        let done = self.apply(t, actor).await?;
        self.wake.notify_one();
        Ok(done)
    }
}
