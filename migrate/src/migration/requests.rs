//! What people ask of a migration, as pure functions of the record, the
//! request and the time, next to the stage machine's [`super::next`]: the
//! engine persists the transition they name, or answers their error.

use super::*;

/// A new migration of `plan`, checked against its service as the catalog
/// has it and the weights it follows now (`None` when it has none): the
/// record to write, and the audit detail. Nothing is written.
pub fn create(
    id: String,
    plan: Plan,
    service: Option<&Service>,
    current: Option<&Weights>,
    actor: &str,
    reason: &str,
    now: i64,
) -> Result<(Migration, String), PolicyError> {
    validate(&plan, service)?;
    let current = current.ok_or_else(|| {
        PolicyError::NotFound(format!("service {} has no backends", plan.service))
    })?;
    let source_weights = source_weights(&plan, current)?;
    let detail = format!(
        "{} → {}, steps {:?} bp, bake {:?}",
        plan.from
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join("+"),
        plan.targets_text(),
        plan.steps,
        Duration::from_millis(plan.bake_ms)
    );
    let m = Migration {
        id,
        plan,
        stage: Stage::Validate,
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
    Ok((m, detail))
}

/// Holds a migration at its current weights.
pub fn pause(m: &Migration, actor: &str, reason: &str) -> Result<Transition, PolicyError> {
    let resume = match m.stage {
        Stage::Validate => Resume::Validate,
        Stage::DoubleDeploy => Resume::DoubleDeploy,
        Stage::Shift { step, phase } => Resume::Shift { step, phase },
        s => {
            return Err(PolicyError::Precondition(format!(
                "migration {} is {}; only a migration in VALIDATE, DOUBLE_DEPLOY or SHIFT can be paused",
                m.id,
                s.as_str()
            )));
        }
    };
    let mut to = m.clone();
    to.stage = Stage::Paused { resume };
    to.reason = format!("paused by {actor}: {reason}");
    Ok(Transition::plain("migration_paused", to, reason))
}

/// The transition that continues a paused migration where it paused.
pub fn resume(m: &Migration, reason: &str, now: i64) -> Result<Transition, PolicyError> {
    match m.stage {
        Stage::Paused { resume } => {
            let mut to = m.clone();
            to.stage = resume.stage();
            to.reason = String::new();
            to.phase_started_ms = now;
            Ok(Transition::plain("migration_resumed", to, reason))
        }
        s => Err(PolicyError::Precondition(format!(
            "migration {} is {}, not PAUSED",
            m.id,
            s.as_str()
        ))),
    }
}

/// The transition that aborts `m`: a rollback when it has changed weights,
/// the end otherwise.
pub fn abort(
    m: &Migration,
    actor: &str,
    reason: &str,
    now: i64,
) -> Result<Transition, PolicyError> {
    let why = format!("aborted by {actor}: {reason}");
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
        _ if touched_weights
            || (!m.plan.deploy.is_none()
                && matches!(
                    m.stage,
                    Stage::DoubleDeploy
                        | Stage::Paused {
                            resume: Resume::DoubleDeploy
                        }
                )) =>
        {
            match begin_rollback(m, why, now) {
                Next::Transition(t) => *t,
                _ => return Err(PolicyError::Precondition("nothing to roll back".into())),
            }
        }
        _ => {
            // No weight was changed yet: it ends here.
            let mut to = m.clone();
            to.stage = Stage::RolledBack;
            to.reason = why.clone();
            to.phase_started_ms = now;
            let pinned = !matches!(
                m.stage,
                Stage::Validate
                    | Stage::Paused {
                        resume: Resume::Validate
                    }
            );
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
