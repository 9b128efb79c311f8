//! A migration: its plan, its stage machine and its gates.
//!
//! The stage machine is a pure function ([`next`]) of the migration, what
//! the control plane observes ([`World`]) and the time: it either waits or
//! names one transition (new record, weights, pin). The engine persists a
//! transition before it takes effect, so a restart resumes exactly where
//! the record says, bake timers included.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_discovery::weights::split_proportionally;
use ferry_discovery::{ClusterName, Service, ServiceName, TOTAL_WEIGHT, Weights};
use ferry_xds::lrs::Load;
use serde::{Deserialize, Serialize};

use crate::policy::PolicyError;
use crate::store::StoredPin;

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Stage {
    /// Accepted and waiting for a slot; validated again when it starts.
    Validate,
    Pin,
    DoubleDeploy,
    Shift,
    Cleanup,
    Unpin,
    Done,
    Paused,
    RollingBack,
    RolledBack,
    Failed,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validate => "VALIDATE",
            Self::Pin => "PIN",
            Self::DoubleDeploy => "DOUBLE_DEPLOY",
            Self::Shift => "SHIFT",
            Self::Cleanup => "CLEANUP",
            Self::Unpin => "UNPIN",
            Self::Done => "DONE",
            Self::Paused => "PAUSED",
            Self::RollingBack => "ROLLING_BACK",
            Self::RolledBack => "ROLLED_BACK",
            Self::Failed => "FAILED",
        }
    }

    /// Ended: nothing more will happen to it.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::RolledBack | Self::Failed)
    }

    /// Holds a concurrency slot (started and not ended).
    pub fn is_active(self) -> bool {
        !self.is_terminal() && self != Self::Validate
    }
}

/// Progress within SHIFT and ROLLING_BACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    #[default]
    None,
    /// Weights set; waiting for proxies to acknowledge them.
    AwaitingAck,
    /// Acknowledged; the step bakes and its gate is evaluated.
    Baking,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "",
            Self::AwaitingAck => "AWAITING_ACK",
            Self::Baking => "BAKING",
        }
    }
}

/// The gates every step must pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    /// Target error rate may exceed the source's by this much (a fraction).
    pub max_error_rate_increase: f64,
    /// Hard ceiling on the target's error rate (a fraction; 0 = none).
    pub max_error_rate: f64,
    /// Requests each side needs in a window before the gate decides.
    pub min_requests: u64,
    /// Longest wait for enough data past the bake time.
    pub data_timeout_ms: u64,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            max_error_rate_increase: 0.01,
            max_error_rate: 0.0,
            min_requests: 50,
            data_timeout_ms: 300_000,
        }
    }
}

/// What a migration was asked to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub service: ServiceName,
    pub from: Vec<ClusterName>,
    pub to: ClusterName,
    /// The target's share per step, basis points, strictly increasing,
    /// ending at 10000.
    pub steps: Vec<u32>,
    pub bake_ms: u64,
    pub gates: Gates,
    /// Share of connected proxies that must acknowledge each step.
    pub ack_share: f64,
    pub ack_timeout_ms: u64,
    pub double_deploy_timeout_ms: u64,
    /// Target ready endpoints ≥ this × the sources' ready endpoints.
    pub min_capacity: f64,
    pub drain_ms: u64,
}

/// One gate evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    pub step: usize,
    pub outcome: GateOutcome,
    pub source: (u64, u64),
    pub target: (u64, u64),
    pub detail: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOutcome {
    Pass,
    Fail,
    NotEnoughData,
}

impl GateOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::NotEnoughData => "not_enough_data",
        }
    }
}

/// A migration as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    pub id: String,
    pub plan: Plan,
    pub stage: Stage,
    pub phase: Phase,
    /// Index of the current step in `plan.steps`.
    pub step: usize,
    /// Where a paused migration resumes.
    pub paused_from: Option<(Stage, Phase)>,
    /// The sources' weights when the migration started (sum 10000): what
    /// a rollback restores.
    pub source_weights: BTreeMap<ClusterName, u32>,
    /// The weights the migration has set (empty before SHIFT).
    pub weights: BTreeMap<ClusterName, u32>,
    /// Why it failed, rolled back or paused.
    pub reason: String,
    /// Why it was started (the audit reason of its own changes).
    pub purpose: String,
    pub gates: Vec<GateResult>,
    pub created_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub phase_started_ms: i64,
    /// The policy version that carries the weights awaiting
    /// acknowledgement (kept in memory; after a restart, the loaded one).
    #[serde(skip)]
    pub applied_version: u64,
    /// Proxies that acknowledged the step, out of those connected.
    #[serde(skip)]
    pub acks: (usize, usize),
}

impl Migration {
    /// The pin owner a migration holds the service's pin as.
    pub fn owner(&self) -> String {
        format!("migration/{}", self.id)
    }
}

/// What the stage machine reads of the world.
pub trait World {
    fn service(&self, name: &ServiceName) -> Option<&Service>;
    /// The weights the service's traffic follows now.
    fn weights(&self, name: &ServiceName) -> Option<Weights>;
    /// The policy version the served xDS snapshot was translated with, and
    /// the snapshot version at which its routes last changed.
    fn served(&self) -> (u64, u64);
    /// Connected proxies that hold route version `route_version` or later,
    /// out of all connected proxies that take routes.
    fn acks(&self, route_version: u64) -> (usize, usize);
    /// The load a service's backend in `cluster` reported since `since_ms`.
    fn load(&self, service: &ServiceName, cluster: &ClusterName, since_ms: i64) -> Load;
}

/// One transition: the new record and what changes with it.
#[derive(Debug, Clone)]
pub struct Transition {
    pub to: Migration,
    pub weights: Option<Weights>,
    pub pin: Option<Option<StoredPin>>,
    pub action: &'static str,
    pub detail: String,
}

/// What the stage machine decides.
#[derive(Debug, Clone)]
pub enum Next {
    Wait,
    /// Nothing to persist, but what is shown changed (acks, interim gates).
    Observe(Box<Migration>),
    Transition(Box<Transition>),
}

fn transition(
    to: Migration,
    action: &'static str,
    detail: String,
    weights: Option<Weights>,
    pin: Option<Option<StoredPin>>,
) -> Next {
    Next::Transition(Box::new(Transition {
        to,
        weights,
        pin,
        action,
        detail,
    }))
}

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
    let Some(target) = service.backends.get(&plan.to) else {
        return Err(PolicyError::InvalidArgument {
            field: "to".into(),
            reason: format!(
                "service {} has no backend in cluster {} (it has: {})",
                plan.service,
                plan.to,
                have()
            ),
        });
    };
    let source_ready: usize = plan
        .from
        .iter()
        .filter_map(|c| service.backends.get(c))
        .map(|b| b.ready_endpoints())
        .sum();
    let target_ready = target.ready_endpoints();
    if target_ready == 0 {
        return Err(PolicyError::Precondition(format!(
            "target cluster {} has no ready endpoints for {}",
            plan.to, plan.service
        )));
    }
    if (target_ready as f64) < plan.min_capacity * source_ready as f64 {
        return Err(PolicyError::Precondition(format!(
            "target cluster {} has {target_ready} ready endpoints, less than {:.0} % of the source's {source_ready}",
            plan.to,
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
        if w.basis_points() > 0 && *cluster != plan.to && !plan.from.contains(cluster) {
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
    map.insert(m.plan.to.clone(), target);
    Weights::new(map).unwrap_or_else(|_| Weights::all_to(m.plan.to.clone()))
}

/// All traffic back to the sources.
pub fn rollback_weights(m: &Migration) -> Weights {
    let mut map = m.source_weights.clone();
    map.insert(m.plan.to.clone(), 0);
    Weights::new(map).unwrap_or_else(|_| {
        Weights::all_to(m.plan.from.first().cloned().unwrap_or(m.plan.to.clone()))
    })
}

fn to_map(w: &Weights) -> BTreeMap<ClusterName, u32> {
    w.iter()
        .map(|(c, bp)| (c.clone(), bp.basis_points()))
        .collect()
}

fn pct(bp: u32) -> String {
    format!("{}.{:02} %", bp / 100, bp % 100)
}

/// Starts rolling back: weights to the sources at once, with the reason.
pub fn begin_rollback(m: &Migration, reason: String, now: i64) -> Next {
    let weights = rollback_weights(m);
    let mut to = m.clone();
    to.stage = Stage::RollingBack;
    to.phase = Phase::AwaitingAck;
    to.paused_from = None;
    to.weights = to_map(&weights);
    to.reason = reason.clone();
    to.phase_started_ms = now;
    transition(to, "migration_rollback", reason, Some(weights), None)
}

/// Ends without having changed any weight (releasing the pin if held).
fn fail(m: &Migration, reason: String, now: i64, release_pin: bool) -> Next {
    let mut to = m.clone();
    to.stage = Stage::Failed;
    to.phase = Phase::None;
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

/// The stage machine: what to do with `m` now.
pub fn next(m: &Migration, world: &dyn World, now: i64) -> Next {
    let elapsed = Duration::from_millis((now - m.phase_started_ms).max(0) as u64);
    let service = world.service(&m.plan.service);
    match m.stage {
        Stage::Validate | Stage::Pin => match validate(&m.plan, service).and_then(|()| {
            let current = world.weights(&m.plan.service).ok_or_else(|| {
                PolicyError::NotFound(format!("service {} has no weights", m.plan.service))
            })?;
            source_weights(&m.plan, &current)
        }) {
            Err(e) => fail(m, format!("validation failed: {e}"), now, false),
            Ok(sources) => {
                let mut to = m.clone();
                to.source_weights = sources;
                to.stage = Stage::DoubleDeploy;
                to.phase_started_ms = now;
                let pin = StoredPin {
                    owner: m.owner(),
                    reason: format!("migration {} to {}", m.id, m.plan.to),
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
        Stage::DoubleDeploy => match validate(&m.plan, service) {
            Ok(()) => {
                let weights = step_weights(m, 0);
                let mut to = m.clone();
                to.stage = Stage::Shift;
                to.phase = Phase::AwaitingAck;
                to.step = 0;
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
        },
        Stage::Shift | Stage::RollingBack if m.phase == Phase::AwaitingAck => {
            await_ack(m, world, now, elapsed)
        }
        Stage::Shift => bake(m, world, now, elapsed),
        Stage::Cleanup if elapsed.as_millis() as u64 >= m.plan.drain_ms => {
            let mut to = m.clone();
            to.stage = Stage::Unpin;
            to.phase_started_ms = now;
            let detail = format!(
                "sources drained for {:?}",
                Duration::from_millis(m.plan.drain_ms)
            );
            transition(to, "migration_cleanup", detail, None, None)
        }
        Stage::Unpin => {
            let mut to = m.clone();
            to.stage = Stage::Done;
            to.phase_started_ms = now;
            transition(
                to,
                "migration_done",
                format!("all traffic on {}; pin released", m.plan.to),
                None,
                Some(None),
            )
        }
        _ => Next::Wait,
    }
}

fn await_ack(m: &Migration, world: &dyn World, now: i64, elapsed: Duration) -> Next {
    let (served_policy, route_version) = world.served();
    let acks = if served_policy >= m.applied_version {
        world.acks(route_version)
    } else {
        (0, world.acks(u64::MAX).1)
    };
    let (acked, total) = acks;
    let enough = served_policy >= m.applied_version
        && (total == 0 || acked as f64 >= (m.plan.ack_share * total as f64).ceil());
    let timed_out = elapsed.as_millis() as u64 > m.plan.ack_timeout_ms;
    if m.stage == Stage::RollingBack {
        if enough || timed_out {
            let mut to = m.clone();
            to.stage = Stage::RolledBack;
            to.phase = Phase::None;
            to.acks = acks;
            to.phase_started_ms = now;
            let detail = if enough {
                format!("{acked}/{total} proxies hold the source weights; pin released")
            } else {
                format!(
                    "only {acked}/{total} proxies acknowledged the rollback in time; pin released"
                )
            };
            return transition(to, "migration_rolled_back", detail, None, Some(None));
        }
    } else if enough {
        let mut to = m.clone();
        to.phase = Phase::Baking;
        to.acks = acks;
        to.phase_started_ms = now;
        let detail = format!(
            "step {}/{}: {acked}/{total} proxies acknowledged; baking {:?}",
            m.step + 1,
            m.plan.steps.len(),
            Duration::from_millis(m.plan.bake_ms)
        );
        return transition(to, "migration_acked", detail, None, None);
    } else if timed_out {
        return begin_rollback(
            m,
            format!(
                "only {acked} of {total} proxies acknowledged step {} within {:?} (need {:.0} %)",
                m.step + 1,
                Duration::from_millis(m.plan.ack_timeout_ms),
                m.plan.ack_share * 100.0
            ),
            now,
        );
    }
    if acks != m.acks {
        let mut seen = m.clone();
        seen.acks = acks;
        return Next::Observe(Box::new(seen));
    }
    Next::Wait
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

/// Judges the target against the source over one window.
pub fn judge(
    gates: &Gates,
    source: Load,
    target: Load,
    baseline: Option<Load>,
) -> (GateOutcome, String) {
    let reference = if source.requests >= gates.min_requests {
        Some(source)
    } else {
        baseline.filter(|b| b.requests >= gates.min_requests)
    };
    let Some(reference) = reference.filter(|_| target.requests >= gates.min_requests) else {
        return (
            GateOutcome::NotEnoughData,
            format!(
                "target served {} requests, source {}; each needs {}",
                target.requests, source.requests, gates.min_requests
            ),
        );
    };
    let t = target.error_rate().unwrap_or(0.0);
    let s = reference.error_rate().unwrap_or(0.0);
    let describe = format!(
        "target error rate {:.2} % ({}/{}) vs source {:.2} % ({}/{})",
        t * 100.0,
        target.errors,
        target.requests,
        s * 100.0,
        reference.errors,
        reference.requests
    );
    if t > s + gates.max_error_rate_increase {
        return (
            GateOutcome::Fail,
            format!(
                "{describe}: more than {:.2} points above the source",
                gates.max_error_rate_increase * 100.0
            ),
        );
    }
    if gates.max_error_rate > 0.0 && t > gates.max_error_rate {
        return (
            GateOutcome::Fail,
            format!(
                "{describe}: above the ceiling of {:.2} %",
                gates.max_error_rate * 100.0
            ),
        );
    }
    (GateOutcome::Pass, describe)
}

fn bake(m: &Migration, world: &dyn World, now: i64, elapsed: Duration) -> Next {
    let since = m.phase_started_ms;
    let source = sum_load(world, m, &m.plan.from, since);
    let target = world.load(&m.plan.service, &m.plan.to, since);
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
    let (outcome, detail) = judge(&m.plan.gates, source, target, baseline);
    let result = GateResult {
        step: m.step,
        outcome,
        source: (source.requests, source.errors),
        target: (target.requests, target.errors),
        detail: detail.clone(),
        at_ms: now,
    };
    let mut judged = m.clone();
    match judged.gates.last_mut() {
        Some(last) if last.step == m.step => *last = result,
        _ => judged.gates.push(result),
    }
    let baked = elapsed.as_millis() as u64 >= m.plan.bake_ms;
    match outcome {
        GateOutcome::Fail => {
            let reason = format!(
                "gate failed at step {} ({}): {detail}",
                m.step + 1,
                pct(m.plan.steps[m.step])
            );
            begin_rollback(&judged, reason, now)
        }
        GateOutcome::NotEnoughData
            if elapsed.as_millis() as u64 > m.plan.bake_ms + m.plan.gates.data_timeout_ms =>
        {
            let reason = format!(
                "gate failed at step {} ({}): not enough data within {:?} after the bake: {detail}",
                m.step + 1,
                pct(m.plan.steps[m.step]),
                Duration::from_millis(m.plan.gates.data_timeout_ms)
            );
            begin_rollback(&judged, reason, now)
        }
        GateOutcome::Pass if baked => {
            let mut to = judged;
            to.phase_started_ms = now;
            if m.step + 1 < m.plan.steps.len() {
                let weights = step_weights(m, m.step + 1);
                to.step = m.step + 1;
                to.phase = Phase::AwaitingAck;
                to.weights = to_map(&weights);
                let detail = format!(
                    "step {} passed ({detail}); step {}/{}: target {}",
                    m.step + 1,
                    m.step + 2,
                    m.plan.steps.len(),
                    pct(m.plan.steps[m.step + 1])
                );
                transition(to, "migration_shift", detail, Some(weights), None)
            } else {
                let weights = Weights::all_to(m.plan.to.clone());
                to.stage = Stage::Cleanup;
                to.phase = Phase::None;
                to.weights = to_map(&weights);
                let detail = format!("last step passed ({detail}); sources drain");
                transition(to, "migration_cleanup_started", detail, Some(weights), None)
            }
        }
        _ if judged.gates != m.gates => Next::Observe(Box::new(judged)),
        _ => Next::Wait,
    }
}
