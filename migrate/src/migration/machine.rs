//! The stage machine: what a migration does next.

use super::plan::{fail, pct, to_map};
use super::*;

/// The stage machine: what to do with `m` now.
pub fn next(m: &Migration, world: &dyn World, now: i64) -> Next {
    let elapsed = Duration::from_millis((now - m.phase_started_ms).max(0) as u64);
    let service = world.service(&m.plan.service);
    match m.stage {
        // A held migration (its campaign paused) does not start.
        Stage::Validate if m.hold => held(m, Resume::Validate, now),
        Stage::Validate => match validate(&m.plan, service).and_then(|()| {
            let current = world.weights(&m.plan.service).ok_or_else(|| {
                PolicyError::NotFound(format!("service {} has no weights", m.plan.service))
            })?;
            source_weights(&m.plan, &current)
        }) {
            // A service missing from the catalog may be a source that has
            // not listed yet (a cluster reconnecting): wait a while.
            Err(PolicyError::NotFound(_))
                if elapsed.as_millis() as u64 <= m.plan.double_deploy_timeout_ms =>
            {
                Next::Wait
            }
            Err(e) => fail(m, format!("validation failed: {e}"), now, false),
            Ok(sources) => {
                let mut to = m.clone();
                to.source_weights = sources;
                to.stage = Stage::DoubleDeploy;
                to.phase_started_ms = now;
                let pin = StoredPin {
                    owner: m.owner(),
                    reason: format!("migration {} to {}", m.id, m.plan.targets_text()),
                    pinned_at_ms: now,
                    expires_at_ms: 0,
                };
                transition(
                    to,
                    "migration_pin",
                    format!("pinned as {}", m.owner()),
                    None,
                    Some(Some(pin)),
                )
            }
        },
        Stage::DoubleDeploy if !m.plan.deploy.is_none() => {
            match world.deploy(m, DeployStep::Deploy) {
                DeployProgress::Done => double_deploy(m, service, now, elapsed, true),
                DeployProgress::Failed(e) => fail(
                    m,
                    format!("the {} deploy failed: {e}", m.plan.deploy.as_str()),
                    now,
                    true,
                ),
                DeployProgress::Pending
                    if elapsed.as_millis() as u64 > m.plan.double_deploy_timeout_ms =>
                {
                    fail(
                        m,
                        format!(
                            "the {} deploy did not finish within {:?}",
                            m.plan.deploy.as_str(),
                            Duration::from_millis(m.plan.double_deploy_timeout_ms)
                        ),
                        now,
                        true,
                    )
                }
                DeployProgress::Pending => Next::Wait,
            }
        }
        Stage::DoubleDeploy => double_deploy(m, service, now, elapsed, false),
        Stage::RollingBack => await_rollback_ack(m, world, now, elapsed),
        Stage::Shift {
            step,
            phase: StepPhase::AwaitingAck,
        } => await_ack(m, step, world, now, elapsed),
        Stage::Shift {
            step,
            phase: StepPhase::Baking,
        } => bake(m, step, world, now, elapsed),
        Stage::Cleanup
            if elapsed.as_millis() as u64 >= m.plan.drain_ms && !m.plan.deploy.is_none() =>
        {
            match world.deploy(m, DeployStep::Retire) {
                DeployProgress::Pending => Next::Wait,
                DeployProgress::Done => cleaned(m, now, None),
                // The traffic has moved: a source that could not be
                // retired is reported, not rolled back to.
                DeployProgress::Failed(e) => cleaned(m, now, Some(e)),
            }
        }
        Stage::Cleanup if elapsed.as_millis() as u64 >= m.plan.drain_ms => cleaned(m, now, None),
        Stage::Unpin => {
            let mut to = m.clone();
            to.stage = Stage::Done {
                source_deleted: false,
            };
            to.phase_started_ms = now;
            transition(
                to,
                "migration_done",
                format!("all traffic on {}; pin released", m.plan.targets_text()),
                None,
                Some(None),
            )
        }
        _ => Next::Wait,
    }
}

/// Drained (and the source retired): on to UNPIN.
fn cleaned(m: &Migration, now: i64, retire_failed: Option<String>) -> Next {
    let mut to = m.clone();
    to.stage = Stage::Unpin;
    to.phase_started_ms = now;
    let mut detail = format!(
        "sources drained for {:?}",
        Duration::from_millis(m.plan.drain_ms)
    );
    if let Some(e) = retire_failed {
        detail.push_str(&format!("; the source was not retired: {e}"));
        to.reason = detail.clone();
    }
    transition(to, "migration_cleanup", detail, None, None)
}

/// DOUBLE_DEPLOY: once both sides are healthy, the first step.
fn double_deploy(
    m: &Migration,
    service: Option<&Service>,
    now: i64,
    elapsed: Duration,
    deployed: bool,
) -> Next {
    let healthy = validate(&m.plan, service).and_then(|()| match service {
        Some(s) if deployed => validate_targets(&m.plan, s),
        _ => Ok(()),
    });
    match healthy {
        Ok(()) if m.hold => held(m, Resume::DoubleDeploy, now),
        Ok(()) => {
            let weights = step_weights(m, 0);
            let mut to = m.clone();
            to.stage = Stage::Shift {
                step: 0,
                phase: StepPhase::AwaitingAck,
            };
            to.acks = None;
            to.weights = to_map(&weights);
            to.phase_started_ms = now;
            let detail = format!(
                "both sides healthy; step 1/{}: target {}",
                m.plan.steps.len(),
                pct(m.plan.steps.first().copied().unwrap_or(TOTAL_WEIGHT))
            );
            transition(to, "migration_shift", detail, Some(weights), None)
        }
        Err(e) if elapsed.as_millis() as u64 > m.plan.double_deploy_timeout_ms => fail(
            m,
            format!(
                "both sides were not healthy within {:?}: {e}",
                Duration::from_millis(m.plan.double_deploy_timeout_ms)
            ),
            now,
            true,
        ),
        Err(_) => Next::Wait,
    }
}

/// Pauses a held migration at a step boundary; resuming continues at
/// `resume` (a baking step bakes again in full).
fn held(m: &Migration, resume: Resume, now: i64) -> Next {
    let mut to = m.clone();
    to.stage = Stage::Paused { resume };
    to.phase_started_ms = now;
    to.reason = "paused with its campaign at the end of a step".to_owned();
    let detail = to.reason.clone();
    transition(to, "migration_paused", detail, None, None)
}

/// ROLLING_BACK: once proxies hold the source weights (or the wait timed
/// out), undo the deploy if there is one, and end.
fn await_rollback_ack(m: &Migration, world: &dyn World, now: i64, elapsed: Duration) -> Next {
    let acks = world.acks(m.applied_version);
    let enough = acks.enough(&m.plan);
    if !enough && elapsed.as_millis() as u64 <= m.plan.ack_timeout_ms {
        return observe_acks(m, acks);
    }
    // With a deploy mode, what was deployed is undone first.
    let undo = if m.plan.deploy.is_none() {
        None
    } else {
        match world.deploy(m, DeployStep::Undo) {
            DeployProgress::Pending => return Next::Wait,
            DeployProgress::Done => Some("the deploy was undone".to_owned()),
            DeployProgress::Failed(e) => Some(format!("undoing the deploy failed: {e}")),
        }
    };
    let mut to = m.clone();
    to.stage = Stage::RolledBack;
    to.acks = Some(acks);
    to.phase_started_ms = now;
    let Acks {
        acked, connected, ..
    } = acks;
    let detail = if enough {
        format!("{acked}/{connected} proxies hold the source weights; pin released")
    } else {
        format!("only {acked}/{connected} proxies acknowledged the rollback in time; pin released")
    };
    let detail = match undo {
        Some(undo) => format!("{detail}; {undo}"),
        None => detail,
    };
    transition(to, "migration_rolled_back", detail, None, Some(None))
}

/// SHIFT, awaiting acknowledgement of `step`'s weights: bake once enough
/// proxies hold them, roll back if they do not in time.
fn await_ack(m: &Migration, step: usize, world: &dyn World, now: i64, elapsed: Duration) -> Next {
    let acks = world.acks(m.applied_version);
    if acks.enough(&m.plan) {
        let mut to = m.clone();
        to.stage = Stage::Shift {
            step,
            phase: StepPhase::Baking,
        };
        to.acks = Some(acks);
        to.phase_started_ms = now;
        let detail = format!(
            "step {}/{}: {}/{} proxies acknowledged; baking {:?}",
            step + 1,
            m.plan.steps.len(),
            acks.acked,
            acks.connected,
            Duration::from_millis(m.plan.bake_ms)
        );
        return transition(to, "migration_acked", detail, None, None);
    }
    if elapsed.as_millis() as u64 > m.plan.ack_timeout_ms {
        return begin_rollback(
            m,
            format!(
                "step {} was not acknowledged within {:?}: {}",
                step + 1,
                Duration::from_millis(m.plan.ack_timeout_ms),
                acks.waiting_for(&m.plan)
            ),
            now,
        );
    }
    observe_acks(m, acks)
}

/// Shows new acknowledgement figures, persisting nothing.
fn observe_acks(m: &Migration, acks: Acks) -> Next {
    if Some(acks) == m.acks {
        return Next::Wait;
    }
    let mut seen = m.clone();
    seen.acks = Some(acks);
    Next::Observe(Box::new(seen))
}

fn sum_load(world: &dyn World, m: &Migration, clusters: &[ClusterName], since: i64) -> Load {
    let mut total = Load::default();
    for c in clusters {
        let l = world.load(&m.plan.service, c, since);
        total.requests += l.requests;
        total.errors += l.errors;
    }
    total
}

/// How long the sources must have been silent before the last step ends:
/// a proxy reports load about once a second, so a report that arrives just
/// after the step was acknowledged may still count requests routed before.
pub const SOURCES_QUIET_MS: i64 = 3_000;

/// At the last step every proxy should send the sources nothing. Requests
/// the sources served over the last [`SOURCES_QUIET_MS`] (or half the bake,
/// if longer) of the step mean some proxy still routes to them: the step
/// must not end, whatever the acknowledgements say.
fn sources_still_serve(m: &Migration, world: &dyn World, now: i64) -> Option<String> {
    let quiet = SOURCES_QUIET_MS.max((m.plan.bake_ms / 2) as i64);
    let since = now - quiet;
    if since < m.phase_started_ms {
        return Some(format!(
            "the sources must be seen idle for {:?} before the last step ends",
            Duration::from_millis(quiet as u64)
        ));
    }
    let load = sum_load(world, m, &m.plan.from, since);
    (load.requests > 0).then(|| {
        format!(
            "the sources still served {} requests in the last {:?}: some proxy still routes to them",
            load.requests,
            Duration::from_millis(quiet as u64)
        )
    })
}

fn bake(m: &Migration, step: usize, world: &dyn World, now: i64, elapsed: Duration) -> Next {
    let since = m.phase_started_ms;
    let source = sum_load(world, m, &m.plan.from, since);
    let targets: Vec<(ClusterName, Load)> = m
        .plan
        .target_shares()
        .into_iter()
        .map(|(c, _)| {
            let load = world.load(&m.plan.service, &c, since);
            (c, load)
        })
        .collect();
    let target = targets.iter().fold(Load::default(), |sum, (_, l)| Load {
        requests: sum.requests.saturating_add(l.requests),
        errors: sum.errors.saturating_add(l.errors),
    });
    // When the source carries nothing (the last step), compare with what
    // it showed in the step before.
    let baseline = m
        .gates
        .iter()
        .rev()
        .find(|g| g.outcome == GateOutcome::Pass)
        .map(|g| Load {
            requests: g.source.0,
            errors: g.source.1,
        });
    let mut latency = world.latency(m);
    if latency.source_p99_ms.is_none() {
        // Likewise for the source's latency.
        latency.source_p99_ms = m
            .gates
            .iter()
            .rev()
            .filter(|g| g.outcome == GateOutcome::Pass)
            .find_map(|g| g.latency.source_p99_ms);
    }
    // Each target is judged against the sources on its own.
    let (outcome, detail) = if targets.len() == 1 {
        judge(&m.plan.gates, source, target, baseline, latency)
    } else {
        let judged: Vec<(ClusterName, GateOutcome, String)> = targets
            .iter()
            .map(|(c, load)| {
                let (o, d) = judge(&m.plan.gates, source, *load, baseline, latency);
                (c.clone(), o, d)
            })
            .collect();
        let worst = if judged.iter().any(|(_, o, _)| *o == GateOutcome::Fail) {
            GateOutcome::Fail
        } else if judged
            .iter()
            .any(|(_, o, _)| *o == GateOutcome::NotEnoughData)
        {
            GateOutcome::NotEnoughData
        } else {
            GateOutcome::Pass
        };
        let detail = judged
            .iter()
            .map(|(c, o, d)| format!("{c} {}: {d}", o.as_str()))
            .collect::<Vec<_>>()
            .join("; ");
        (worst, detail)
    };
    let result = GateResult {
        step,
        outcome,
        source: (source.requests, source.errors),
        target: (target.requests, target.errors),
        latency,
        detail: detail.clone(),
        at_ms: now,
    };
    let mut judged = m.clone();
    match judged.gates.last_mut() {
        Some(last) if last.step == step => *last = result,
        _ => judged.gates.push(result),
    }
    let baked = elapsed.as_millis() as u64 >= m.plan.bake_ms;
    let outcome = match outcome {
        GateOutcome::Pass if baked && step + 1 == m.plan.steps.len() => {
            match sources_still_serve(m, world, now) {
                None => outcome,
                Some(still) => {
                    if let Some(last) = judged.gates.last_mut() {
                        last.outcome = GateOutcome::NotEnoughData;
                        last.detail = format!("{detail}; {still}");
                    }
                    GateOutcome::NotEnoughData
                }
            }
        }
        other => other,
    };
    let detail = judged
        .gates
        .last()
        .map(|g| g.detail.clone())
        .unwrap_or(detail);
    match outcome {
        GateOutcome::Fail => {
            let reason = format!(
                "gate failed at step {} ({}): {detail}",
                step + 1,
                pct(m.plan.steps[step])
            );
            begin_rollback(&judged, reason, now)
        }
        GateOutcome::NotEnoughData
            if elapsed.as_millis() as u64 > m.plan.bake_ms + m.plan.gates.data_timeout_ms =>
        {
            let reason = format!(
                "gate failed at step {} ({}): not enough data within {:?} after the bake: {detail}",
                step + 1,
                pct(m.plan.steps[step]),
                Duration::from_millis(m.plan.gates.data_timeout_ms)
            );
            begin_rollback(&judged, reason, now)
        }
        GateOutcome::Pass if baked && m.hold && step + 1 < m.plan.steps.len() => held(
            &judged,
            Resume::Shift {
                step,
                phase: StepPhase::Baking,
            },
            now,
        ),
        GateOutcome::Pass if baked => {
            let mut to = judged;
            to.phase_started_ms = now;
            if step + 1 < m.plan.steps.len() {
                let weights = step_weights(m, step + 1);
                to.stage = Stage::Shift {
                    step: step + 1,
                    phase: StepPhase::AwaitingAck,
                };
                to.acks = None;
                to.weights = to_map(&weights);
                let detail = format!(
                    "step {} passed ({detail}); step {}/{}: target {}",
                    step + 1,
                    step + 2,
                    m.plan.steps.len(),
                    pct(m.plan.steps[step + 1])
                );
                transition(to, "migration_shift", detail, Some(weights), None)
            } else {
                let weights = Weights::new(m.plan.split_targets(TOTAL_WEIGHT))
                    .unwrap_or_else(|_| Weights::all_to(m.plan.to.clone()));
                to.stage = Stage::Cleanup;
                to.weights = to_map(&weights);
                let detail = format!("last step passed ({detail}); sources drain");
                transition(to, "migration_cleanup_started", detail, Some(weights), None)
            }
        }
        _ if judged.gates != m.gates => Next::Observe(Box::new(judged)),
        _ => Next::Wait,
    }
}
