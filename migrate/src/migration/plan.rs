//! Checking a plan, and the weights of its steps and of a rollback.

use super::*;

/// Checks a plan against the service as the catalog has it now. The
/// error names the field or the rule that refuses it.
pub fn validate(plan: &Plan, service: Option<&Service>) -> Result<(), PolicyError> {
    let Some(service) = service else {
        return Err(PolicyError::NotFound(format!(
            "service {} is not in the catalog",
            plan.service
        )));
    };
    let have = || {
        service
            .backends
            .keys()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, c) in plan.from.iter().enumerate() {
        if !service.backends.contains_key(c) {
            return Err(PolicyError::InvalidArgument {
                field: format!("from[{i}]"),
                reason: format!(
                    "service {} has no backend in cluster {c} (it has: {})",
                    plan.service,
                    have()
                ),
            });
        }
    }
    // A deploy mode makes the target(s): they are checked once deployed.
    if !plan.deploy.is_none() {
        return Ok(());
    }
    validate_targets(plan, service)
}

/// The target(s) run the service, ready, with enough capacity.
pub fn validate_targets(plan: &Plan, service: &Service) -> Result<(), PolicyError> {
    let have = || {
        service
            .backends
            .keys()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut target_ready = 0;
    for (i, (cluster, _)) in plan.target_shares().iter().enumerate() {
        let field = if plan.targets.is_empty() {
            "to".to_owned()
        } else {
            format!("targets[{i}]")
        };
        let Some(target) = service.backends.get(cluster) else {
            return Err(PolicyError::InvalidArgument {
                field,
                reason: format!(
                    "service {} has no backend in cluster {cluster} (it has: {})",
                    plan.service,
                    have()
                ),
            });
        };
        if target.ready_endpoints() == 0 {
            return Err(PolicyError::Precondition(format!(
                "target cluster {cluster} has no ready endpoints for {}",
                plan.service
            )));
        }
        target_ready += target.ready_endpoints();
    }
    let source_ready: usize = plan
        .from
        .iter()
        .filter_map(|c| service.backends.get(c))
        .map(|b| b.ready_endpoints())
        .sum();
    if (target_ready as f64) < plan.min_capacity * source_ready as f64 {
        return Err(PolicyError::Precondition(format!(
            "target {} has {target_ready} ready endpoints, less than {:.0} % of the source's {source_ready}",
            plan.targets_text(),
            plan.min_capacity * 100.0
        )));
    }
    Ok(())
}

/// The sources' share of the current weights (what a rollback restores),
/// refusing a service whose traffic also goes elsewhere.
pub fn source_weights(
    plan: &Plan,
    current: &Weights,
) -> Result<BTreeMap<ClusterName, u32>, PolicyError> {
    for (cluster, w) in current.iter() {
        if w.basis_points() > 0 && !plan.is_target(cluster) && !plan.from.contains(cluster) {
            return Err(PolicyError::Precondition(format!(
                "cluster {cluster} carries {w} of {}'s traffic and is neither a source nor the target; include it in `from`",
                plan.service
            )));
        }
    }
    let shares: BTreeMap<ClusterName, u64> = plan
        .from
        .iter()
        .map(|c| (c.clone(), u64::from(current.get(c).basis_points())))
        .collect();
    Ok(split_proportionally(TOTAL_WEIGHT, &shares))
}

/// The weights of step `step`: the target's share, the rest split among
/// the sources as they were split at the start.
pub fn step_weights(m: &Migration, step: usize) -> Weights {
    let target = m.plan.steps.get(step).copied().unwrap_or(TOTAL_WEIGHT);
    let shares = m
        .source_weights
        .iter()
        .map(|(c, w)| (c.clone(), u64::from(*w)))
        .collect();
    let mut map = split_proportionally(TOTAL_WEIGHT - target, &shares);
    map.extend(m.plan.split_targets(target));
    Weights::new(map).unwrap_or_else(|_| Weights::all_to(m.plan.to.clone()))
}

/// All traffic back to the sources.
pub fn rollback_weights(m: &Migration) -> Weights {
    let mut map = m.source_weights.clone();
    for (target, _) in m.plan.target_shares() {
        map.insert(target, 0);
    }
    Weights::new(map).unwrap_or_else(|_| {
        Weights::all_to(m.plan.from.first().cloned().unwrap_or(m.plan.to.clone()))
    })
}

pub(super) fn to_map(w: &Weights) -> BTreeMap<ClusterName, u32> {
    w.iter()
        .map(|(c, bp)| (c.clone(), bp.basis_points()))
        .collect()
}

pub(super) fn pct(bp: u32) -> String {
    format!("{}.{:02} %", bp / 100, bp % 100)
}

/// Starts rolling back: weights to the sources at once, with the reason.
pub fn begin_rollback(m: &Migration, reason: String, now: i64) -> Next {
    let weights = rollback_weights(m);
    let mut to = m.clone();
    to.stage = Stage::RollingBack;
    to.acks = None;
    to.weights = to_map(&weights);
    to.reason = reason.clone();
    to.phase_started_ms = now;
    transition(to, "migration_rollback", reason, Some(weights), None)
}

/// Ends without having changed any weight (releasing the pin if held).
pub(super) fn fail(m: &Migration, reason: String, now: i64, release_pin: bool) -> Next {
    let mut to = m.clone();
    to.stage = Stage::Failed;
    to.reason = reason.clone();
    to.phase_started_ms = now;
    transition(
        to,
        "migration_failed",
        reason,
        None,
        release_pin.then_some(None),
    )
}
