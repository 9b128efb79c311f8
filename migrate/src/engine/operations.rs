//! What people ask of migrations: create, pause, resume, abort.

use super::*;

impl Engine {
    /// Validates a plan and records the migration; the engine starts it
    /// when a slot is free. A refused plan changes nothing.
    pub fn create(&self, plan: Plan, actor: &str, reason: &str) -> Result<Migration, PolicyError> {
        require_reason(reason)?;
        let mut map = self.lock();
        let (m, detail) = self.prepare(&map, plan, actor, reason)?;
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
        self.policy.transact(change)?;
        tracing::info!(id = %m.id, service = %m.plan.service, actor, %detail, "migration created");
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
        migration::validate(&plan, catalog.services.get(&plan.service).map(|s| &**s))?;
        let (_, current, _, _) = self.policy.weights(&plan.service.to_string())?;
        let source_weights = migration::source_weights(&plan, &current)?;
        let next_number = map
            .keys()
            .filter_map(|id| id.strip_prefix("mig-").and_then(|n| n.parse::<u64>().ok()))
            .max()
            .unwrap_or(0)
            + 1;
        let now = now_ms();
        let m = Migration {
            id: format!("mig-{next_number}"),
            plan,
            stage: Stage::Validate,
            phase: Phase::None,
            step: 0,
            paused_from: None,
            source_weights,
            weights: BTreeMap::new(),
            reason: String::new(),
            purpose: reason.to_owned(),
            gates: Vec::new(),
            created_by: actor.to_owned(),
            created_at_ms: now,
            updated_at_ms: now,
            phase_started_ms: now,
            applied_version: 0,
            acks: None,
            hold: false,
        };
        let detail = format!(
            "{} → {}, steps {:?} bp, bake {:?}",
            m.plan
                .from
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join("+"),
            m.plan.targets_text(),
            m.plan.steps,
            Duration::from_millis(m.plan.bake_ms)
        );
        Ok((m, detail))
    }

    /// Holds a migration at its current weights.
    pub fn pause(&self, id: &str, actor: &str, reason: &str) -> Result<Migration, PolicyError> {
        self.operate(id, actor, reason, |m| match m.stage {
            Stage::Validate | Stage::DoubleDeploy | Stage::Shift => {
                let mut to = m.clone();
                to.paused_from = Some((m.stage, m.phase));
                to.stage = Stage::Paused;
                to.reason = format!("paused by {actor}: {reason}");
                Ok(Transition::plain("migration_paused", to, reason))
            }
            s => Err(PolicyError::Precondition(format!(
                "migration {id} is {}; only a migration in VALIDATE, DOUBLE_DEPLOY or SHIFT can be paused",
                s.as_str()
            ))),
        })
    }

    /// Continues a paused migration; a step that was baking bakes again in
    /// full, a step awaiting acknowledgement waits afresh.
    pub fn resume(&self, id: &str, actor: &str, reason: &str) -> Result<Migration, PolicyError> {
        self.operate(id, actor, reason, |m| resume_transition(m, reason))
    }

    /// Sends all traffic back to the sources at once and stops.
    pub fn abort(&self, id: &str, actor: &str, reason: &str) -> Result<Migration, PolicyError> {
        self.operate(id, actor, reason, |m| abort_transition(m, actor, reason))
    }

    fn operate(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        f: impl FnOnce(&Migration) -> Result<Transition, PolicyError>,
    ) -> Result<Migration, PolicyError> {
        require_reason(reason)?;
        let mut map = self.lock();
        let m = map.get(id).ok_or_else(|| not_found(id))?;
        let t = f(m)?;
        let done = self.apply(&mut map, t, actor)?;
        drop(map);
        self.wake.notify_one();
        Ok(done)
    }
}

/// The transition that aborts `m`: a rollback when it has changed weights,
/// the end otherwise.
pub(super) fn abort_transition(
    m: &Migration,
    actor: &str,
    reason: &str,
) -> Result<Transition, PolicyError> {
    let why = format!("aborted by {actor}: {reason}");
    let now = now_ms();
    let touched_weights = !m.weights.is_empty();
    let t = match m.stage {
        s if s.is_terminal() => {
            return Err(PolicyError::Precondition(format!(
                "migration {} has already ended ({})",
                m.id,
                s.as_str()
            )));
        }
        Stage::RollingBack => {
            return Err(PolicyError::Precondition(format!(
                "migration {} is already rolling back",
                m.id
            )));
        }
        // With a deploy mode, a deploy may have begun: roll back, which
        // undoes it.
        _ if touched_weights || (!m.plan.deploy.is_none() && m.stage == Stage::DoubleDeploy) => {
            match begin_rollback(m, why, now) {
                Next::Transition(t) => *t,
                _ => return Err(PolicyError::Precondition("nothing to roll back".into())),
            }
        }
        _ => {
            // No weight was changed yet: it ends here.
            let mut to = m.clone();
            to.stage = Stage::RolledBack;
            to.phase = Phase::None;
            to.reason = why.clone();
            to.phase_started_ms = now;
            let pinned = !matches!(m.stage, Stage::Validate)
                && !matches!(m.paused_from, Some((Stage::Validate, _)));
            Transition {
                to,
                weights: None,
                pin: pinned.then_some(None),
                action: "migration_aborted",
                detail: why,
            }
        }
    };
    Ok(t)
}

/// The transition that continues a paused migration where it paused.
pub(super) fn resume_transition(m: &Migration, reason: &str) -> Result<Transition, PolicyError> {
    match (m.stage, m.paused_from) {
        (Stage::Paused, Some((stage, phase))) => {
            let mut to = m.clone();
            to.stage = stage;
            to.phase = phase;
            to.paused_from = None;
            to.reason = String::new();
            to.phase_started_ms = now_ms();
            Ok(Transition::plain("migration_resumed", to, reason))
        }
        (s, _) => Err(PolicyError::Precondition(format!(
            "migration {} is {}, not PAUSED",
            m.id,
            s.as_str()
        ))),
    }
}
