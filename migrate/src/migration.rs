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
    /// Latency gates, read from Prometheus.
    #[serde(default)]
    pub latency: Option<LatencyGate>,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            max_error_rate_increase: 0.01,
            max_error_rate: 0.0,
            min_requests: 50,
            data_timeout_ms: 300_000,
            latency: None,
        }
    }
}

/// The default p99 query: Envoy's upstream request time (milliseconds) of
/// one side's clusters, which Ferry names `name_namespace_port_cluster` for
/// statistics.
pub const DEFAULT_P99_QUERY: &str = r#"histogram_quantile(0.99, sum by (le) (rate(envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=~"{name}_{namespace}_[0-9]+_{cluster}"}[{window}])))"#;

/// p99 latency gates: target against source, from a Prometheus server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyGate {
    /// Base URL of the Prometheus server (`http://host:port`).
    pub prometheus_url: String,
    /// PromQL with `{name}`, `{namespace}`, `{cluster}`, `{window}`; the
    /// result is one side's p99 in milliseconds.
    pub p99_query: String,
    /// Target p99 ≤ this × source p99 (0 = off).
    pub max_p99_ratio: f64,
    /// Target p99 ≤ this many milliseconds (0 = off).
    pub max_p99_ms: u64,
}

/// p99 latencies (milliseconds) of both sides over a step's window, when
/// Prometheus has them.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Latency {
    pub source_p99_ms: Option<f64>,
    pub target_p99_ms: Option<f64>,
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
    /// Connected proxies that must hold a step's weights before it bakes:
    /// no proxy is never an acknowledgement.
    #[serde(default = "one_proxy")]
    pub min_proxies: u32,
}

fn one_proxy() -> u32 {
    1
}

/// What the acknowledgement wait reads: the proxies holding a policy
/// version, out of those connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Acks {
    /// Connected proxies holding routes of the version or a later one.
    pub acked: usize,
    /// Connected proxies that take routes.
    pub connected: usize,
    /// Proxies connected before this control plane restarted that have
    /// not come back yet (within the restart grace period).
    pub returning: usize,
}

impl Acks {
    /// Whether `plan`'s step may count as acknowledged.
    pub fn enough(&self, plan: &Plan) -> bool {
        self.connected >= plan.min_proxies.max(1) as usize
            && self.returning == 0
            && self.acked as f64 >= (plan.ack_share * self.connected as f64).ceil()
    }

    /// What an unacknowledged step waits for, in words.
    pub fn waiting_for(&self, plan: &Plan) -> String {
        let min = plan.min_proxies.max(1) as usize;
        if self.connected < min {
            return format!(
                "{} of at least {min} proxies connected; no proxy is no acknowledgement",
                self.connected
            );
        }
        if self.returning > 0 {
            return format!(
                "{} proxies connected before the control plane restarted have not reconnected",
                self.returning
            );
        }
        let need = (plan.ack_share * self.connected as f64).ceil() as usize;
        format!(
            "{}/{} proxies hold the step's weights; {need} needed",
            self.acked, self.connected
        )
    }
}

/// One gate evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    pub step: usize,
    pub outcome: GateOutcome,
    pub source: (u64, u64),
    pub target: (u64, u64),
    #[serde(default)]
    pub latency: Latency,
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
    /// Proxies that acknowledged the step, out of those connected (none
    /// until first looked at).
    #[serde(skip)]
    pub acks: Option<Acks>,
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
    /// Connected proxies (of every control plane) that hold routes
    /// translated from policy version `policy_version` or later, out of all
    /// connected proxies that take routes, and those still awaited after a
    /// restart.
    fn acks(&self, policy_version: u64) -> Acks;
    /// The load a service's backend in `cluster` reported since `since_ms`.
    fn load(&self, service: &ServiceName, cluster: &ClusterName, since_ms: i64) -> Load;
    /// The latest p99 readings for migration `m`'s current step (latency
    /// gates only).
    fn latency(&self, m: &Migration) -> Latency;
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

impl Transition {
    /// A transition of the record alone: no weights, no pin.
    pub fn plain(action: &'static str, to: Migration, detail: &str) -> Self {
        Self {
            to,
            weights: None,
            pin: None,
            action,
            detail: detail.to_owned(),
        }
    }
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
    to.acks = None;
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
                to.acks = None;
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
    let acks = world.acks(m.applied_version);
    let Acks {
        acked,
        connected: total,
        ..
    } = acks;
    let enough = acks.enough(&m.plan);
    let timed_out = elapsed.as_millis() as u64 > m.plan.ack_timeout_ms;
    if m.stage == Stage::RollingBack {
        if enough || timed_out {
            let mut to = m.clone();
            to.stage = Stage::RolledBack;
            to.phase = Phase::None;
            to.acks = Some(acks);
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
        to.acks = Some(acks);
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
                "step {} was not acknowledged within {:?}: {}",
                m.step + 1,
                Duration::from_millis(m.plan.ack_timeout_ms),
                acks.waiting_for(&m.plan)
            ),
            now,
        );
    }
    if Some(acks) != m.acks {
        let mut seen = m.clone();
        seen.acks = Some(acks);
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
    latency: Latency,
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
    let Some(gate) = &gates.latency else {
        return (GateOutcome::Pass, describe);
    };
    let Some(target_p99) = latency.target_p99_ms else {
        return (
            GateOutcome::NotEnoughData,
            format!("{describe}; no p99 for the target from Prometheus yet"),
        );
    };
    if gate.max_p99_ms > 0 && target_p99 > gate.max_p99_ms as f64 {
        return (
            GateOutcome::Fail,
            format!(
                "{describe}; target p99 {target_p99:.1} ms is above {} ms",
                gate.max_p99_ms
            ),
        );
    }
    if gate.max_p99_ratio > 0.0 {
        let Some(source_p99) = latency.source_p99_ms.filter(|s| *s > 0.0) else {
            return (
                GateOutcome::NotEnoughData,
                format!("{describe}; no p99 for the source from Prometheus yet"),
            );
        };
        if target_p99 > gate.max_p99_ratio * source_p99 {
            return (
                GateOutcome::Fail,
                format!(
                    "{describe}; target p99 {target_p99:.1} ms is more than {:.2} × the source's {source_p99:.1} ms",
                    gate.max_p99_ratio
                ),
            );
        }
        return (
            GateOutcome::Pass,
            format!("{describe}; p99 {target_p99:.1} ms vs {source_p99:.1} ms"),
        );
    }
    (
        GateOutcome::Pass,
        format!("{describe}; target p99 {target_p99:.1} ms"),
    )
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
    let (outcome, detail) = judge(&m.plan.gates, source, target, baseline, latency);
    let result = GateResult {
        step: m.step,
        outcome,
        source: (source.requests, source.errors),
        target: (target.requests, target.errors),
        latency,
        detail: detail.clone(),
        at_ms: now,
    };
    let mut judged = m.clone();
    match judged.gates.last_mut() {
        Some(last) if last.step == m.step => *last = result,
        _ => judged.gates.push(result),
    }
    let baked = elapsed.as_millis() as u64 >= m.plan.bake_ms;
    let outcome = match outcome {
        GateOutcome::Pass if baked && m.step + 1 == m.plan.steps.len() => {
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
                to.acks = None;
                to.acks = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_discovery::file::parse_catalog;
    use std::path::Path;

    /// A world whose every reading the test sets.
    struct Fixed {
        service: Service,
        acks: Acks,
        load: BTreeMap<String, Load>,
        latency: Latency,
    }

    impl World for Fixed {
        fn service(&self, _: &ServiceName) -> Option<&Service> {
            Some(&self.service)
        }
        fn weights(&self, _: &ServiceName) -> Option<Weights> {
            self.service.effective_weights()
        }
        fn acks(&self, _: u64) -> Acks {
            self.acks
        }
        fn load(&self, _: &ServiceName, cluster: &ClusterName, _: i64) -> Load {
            self.load.get(cluster.as_str()).copied().unwrap_or_default()
        }
        fn latency(&self, _: &Migration) -> Latency {
            self.latency
        }
    }

    fn acks(acked: usize, connected: usize, returning: usize) -> Acks {
        Acks {
            acked,
            connected,
            returning,
        }
    }

    fn c(name: &str) -> ClusterName {
        ClusterName::new(name).unwrap()
    }

    fn world() -> Fixed {
        let yaml = "services:\n  - name: a\n    namespace: ns\n    ports: [{name: http, port: 80}]\n    backends:\n      old1: {endpoints: [\"127.0.0.1:1\", \"127.0.0.2:1\"]}\n      old2: {endpoints: [\"127.0.0.3:1\"]}\n      new: {endpoints: [\"127.0.0.4:1\", \"127.0.0.5:1\"]}\n    weights: {old1: 7500, old2: 2500, new: 0}\n";
        let service = parse_catalog(Path::new("t.yaml"), yaml).unwrap().remove(0);
        Fixed {
            service,
            acks: acks(1, 1, 0),
            load: BTreeMap::new(),
            latency: Latency::default(),
        }
    }

    fn migration() -> Migration {
        Migration {
            id: "mig-1".into(),
            plan: Plan {
                service: ServiceName::parse("a.ns").unwrap(),
                from: vec![c("old1"), c("old2")],
                to: c("new"),
                steps: vec![1000, 5000, 10000],
                bake_ms: 1000,
                gates: Gates {
                    min_requests: 10,
                    data_timeout_ms: 5000,
                    ..Gates::default()
                },
                ack_share: 1.0,
                ack_timeout_ms: 2000,
                double_deploy_timeout_ms: 3000,
                min_capacity: 0.5,
                drain_ms: 500,
                min_proxies: 1,
            },
            stage: Stage::Validate,
            phase: Phase::None,
            step: 0,
            paused_from: None,
            source_weights: BTreeMap::new(),
            weights: BTreeMap::new(),
            reason: String::new(),
            purpose: "test".into(),
            gates: Vec::new(),
            created_by: "t".into(),
            created_at_ms: 0,
            updated_at_ms: 0,
            phase_started_ms: 0,
            applied_version: 0,
            acks: None,
        }
    }

    fn take(next: Next) -> Transition {
        match next {
            Next::Transition(t) => *t,
            other => panic!("expected a transition, got {other:?}"),
        }
    }

    fn bp(w: &Weights, cluster: &str) -> u32 {
        w.get(&c(cluster)).basis_points()
    }

    #[test]
    fn a_migration_walks_every_stage_and_splits_sources_as_they_were() {
        let mut w = world();
        let mut m = migration();
        // Validate → pinned, sources' split recorded.
        let t = take(next(&m, &w, 0));
        assert_eq!(t.to.stage, Stage::DoubleDeploy);
        assert!(matches!(&t.pin, Some(Some(p)) if p.owner == "migration/mig-1"));
        assert_eq!(
            t.to.source_weights,
            BTreeMap::from([(c("old1"), 7500), (c("old2"), 2500)])
        );
        m = t.to;
        // Double deploy → first step: 10 % to new, 90 % split 3:1.
        let t = take(next(&m, &w, 10));
        let weights = t.weights.clone().unwrap();
        assert_eq!(
            (
                bp(&weights, "new"),
                bp(&weights, "old1"),
                bp(&weights, "old2")
            ),
            (1000, 6750, 2250)
        );
        m = t.to;
        assert_eq!((m.stage, m.phase), (Stage::Shift, Phase::AwaitingAck));
        // Waits for every proxy, then bakes.
        w.acks = acks(1, 2, 0);
        assert!(matches!(next(&m, &w, 20), Next::Observe(_)));
        w.acks = acks(2, 2, 0);
        m = take(next(&m, &w, 30)).to;
        assert_eq!(m.phase, Phase::Baking);
        // Healthy data, but the bake is not over: no step yet.
        w.load.insert(
            "old1".into(),
            Load {
                requests: 100,
                errors: 1,
            },
        );
        w.load.insert(
            "new".into(),
            Load {
                requests: 20,
                errors: 0,
            },
        );
        assert!(!matches!(next(&m, &w, 500), Next::Transition(_)));
        let t = take(next(&m, &w, 1100));
        assert_eq!(t.to.step, 1);
        assert_eq!(bp(t.weights.as_ref().unwrap(), "new"), 5000);
        m = t.to;
        m = take(next(&m, &w, 1200)).to; // acked
        m = take(next(&m, &w, 2300)).to; // step 3
        assert_eq!(m.step, 2);
        m = take(next(&m, &w, 2400)).to; // acked
        // Last step: the sources carry nothing; the reference is the
        // source's rate from the step before. It ends only once the
        // sources were seen idle for SOURCES_QUIET_MS.
        w.load.remove("old1");
        assert!(!matches!(next(&m, &w, 3500), Next::Transition(_)));
        let t = take(next(&m, &w, 2400 + SOURCES_QUIET_MS));
        assert_eq!(t.to.stage, Stage::Cleanup);
        assert_eq!(bp(t.weights.as_ref().unwrap(), "new"), 10000);
        m = t.to;
        let cleanup = m.phase_started_ms;
        assert!(
            matches!(next(&m, &w, cleanup + 100), Next::Wait),
            "drains first"
        );
        m = take(next(&m, &w, cleanup + 600)).to;
        assert_eq!(m.stage, Stage::Unpin);
        let t = take(next(&m, &w, cleanup + 700));
        assert_eq!(t.to.stage, Stage::Done);
        assert_eq!(t.pin, Some(None), "the pin is released");
    }

    #[test]
    fn a_worse_target_rolls_back_at_once_to_the_sources() {
        let mut w = world();
        let mut m = migration();
        m = take(next(&m, &w, 0)).to;
        m = take(next(&m, &w, 0)).to;
        m = take(next(&m, &w, 0)).to;
        assert_eq!(m.phase, Phase::Baking);
        w.load.insert(
            "old1".into(),
            Load {
                requests: 100,
                errors: 0,
            },
        );
        w.load.insert(
            "new".into(),
            Load {
                requests: 10,
                errors: 3,
            },
        );
        // Well before the bake ends.
        let t = take(next(&m, &w, 100));
        assert_eq!(t.to.stage, Stage::RollingBack);
        assert!(
            t.to.reason.contains("gate failed at step 1"),
            "{}",
            t.to.reason
        );
        let weights = t.weights.unwrap();
        assert_eq!(
            (
                bp(&weights, "new"),
                bp(&weights, "old1"),
                bp(&weights, "old2")
            ),
            (0, 7500, 2500)
        );
        assert_eq!(t.to.gates.last().unwrap().outcome, GateOutcome::Fail);
        // Once proxies hold the source weights: rolled back and unpinned.
        let t = take(next(&t.to, &w, 200));
        assert_eq!(t.to.stage, Stage::RolledBack);
        assert_eq!(t.pin, Some(None));
    }

    #[test]
    fn not_enough_data_is_never_a_pass() {
        let mut w = world();
        let mut m = migration();
        m = take(next(&m, &w, 0)).to;
        m = take(next(&m, &w, 0)).to;
        m = take(next(&m, &w, 0)).to;
        w.load.insert(
            "old1".into(),
            Load {
                requests: 100,
                errors: 0,
            },
        );
        w.load.insert(
            "new".into(),
            Load {
                requests: 3,
                errors: 0,
            },
        );
        // Past the bake, within the data timeout: keeps waiting.
        match next(&m, &w, 2000) {
            Next::Observe(seen) => {
                assert_eq!(
                    seen.gates.last().unwrap().outcome,
                    GateOutcome::NotEnoughData
                )
            }
            other => panic!("{other:?}"),
        }
        // Past bake + data timeout: the gate fails.
        let t = take(next(&m, &w, 7000));
        assert_eq!(t.to.stage, Stage::RollingBack);
        assert!(t.to.reason.contains("not enough data"), "{}", t.to.reason);
    }

    #[test]
    fn proxies_that_never_ack_roll_the_step_back() {
        let mut w = world();
        let mut m = migration();
        m = take(next(&m, &w, 0)).to;
        m = take(next(&m, &w, 0)).to;
        w.acks = acks(1, 3, 0);
        assert!(!matches!(next(&m, &w, 1000), Next::Transition(_)));
        let t = take(next(&m, &w, 2500));
        assert_eq!(t.to.stage, Stage::RollingBack);
        assert!(
            t.to.reason
                .contains("1/3 proxies hold the step's weights; 3 needed"),
            "{}",
            t.to.reason
        );
    }

    #[test]
    fn no_proxy_is_never_an_acknowledgement() {
        let mut w = world();
        let mut m = migration();
        m = take(next(&m, &w, 0)).to;
        m = take(next(&m, &w, 0)).to;
        assert_eq!(m.phase, Phase::AwaitingAck);
        w.acks = acks(0, 0, 0);
        assert!(!matches!(next(&m, &w, 100), Next::Transition(_)));
        assert_eq!(
            w.acks.waiting_for(&m.plan),
            "0 of at least 1 proxies connected; no proxy is no acknowledgement"
        );
        // More proxies may be required; fewer connected wait.
        m.plan.min_proxies = 3;
        w.acks = acks(2, 2, 0);
        assert!(!matches!(next(&m, &w, 200), Next::Transition(_)));
        // Nobody ever came: the step rolls back at the ACK timeout.
        w.acks = acks(0, 0, 0);
        let t = take(next(&m, &w, 2500));
        assert_eq!(t.to.stage, Stage::RollingBack);
        assert!(
            t.to.reason.contains("no proxy is no acknowledgement"),
            "{}",
            t.to.reason
        );
    }

    #[test]
    fn proxies_connected_before_a_restart_are_waited_for() {
        let mut w = world();
        let mut m = migration();
        m = take(next(&m, &w, 0)).to;
        m = take(next(&m, &w, 0)).to;
        // One proxy is back and holds the weights; another one that was
        // connected before the restart is not back yet.
        w.acks = acks(1, 1, 1);
        match next(&m, &w, 100) {
            Next::Observe(seen) => assert!(
                seen.acks
                    .unwrap_or_default()
                    .waiting_for(&seen.plan)
                    .contains("1 proxies connected before"),
                "{}",
                seen.acks.unwrap_or_default().waiting_for(&seen.plan)
            ),
            other => panic!("{other:?}"),
        }
        w.acks = acks(2, 2, 0);
        assert_eq!(take(next(&m, &w, 200)).to.phase, Phase::Baking);
    }

    #[test]
    fn the_last_step_never_ends_while_the_sources_still_serve() {
        let mut w = world();
        let mut m = migration();
        m.plan.steps = vec![5000, 10000];
        m = take(next(&m, &w, 0)).to;
        m = take(next(&m, &w, 0)).to;
        m = take(next(&m, &w, 0)).to;
        let load = |requests| Load {
            requests,
            errors: 0,
        };
        w.load.insert("new".into(), load(100));
        w.load.insert("old2".into(), load(100));
        m = take(next(&m, &w, 1000)).to; // step 1 passed
        m = take(next(&m, &w, 1000)).to; // step 2 acknowledged
        assert_eq!((m.stage, m.phase, m.step), (Stage::Shift, Phase::Baking, 1));
        // Every proxy acknowledged, the target is healthy, but a source
        // still serves: some proxy routes by older weights.
        match next(&m, &w, 1000 + SOURCES_QUIET_MS + 100) {
            Next::Observe(seen) => {
                let g = seen.gates.last().unwrap();
                assert_eq!(g.outcome, GateOutcome::NotEnoughData);
                assert!(
                    g.detail.contains("sources still served 100 requests"),
                    "{}",
                    g.detail
                );
            }
            other => panic!("{other:?}"),
        }
        // It never reaches CLEANUP; past the data timeout it rolls back.
        let t = take(next(&m, &w, 1000 + 1000 + 5000 + 1));
        assert_eq!(t.to.stage, Stage::RollingBack);
        assert!(
            t.to.reason.contains("some proxy still routes to them"),
            "{}",
            t.to.reason
        );
        // Had the sources been idle, it would have ended.
        w.load.remove("old2");
        let t = take(next(&m, &w, 1000 + SOURCES_QUIET_MS + 200));
        assert_eq!(t.to.stage, Stage::Cleanup);
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let w = world();
        let mut plan = migration().plan;
        plan.to = c("mars");
        let e = validate(&plan, Some(&w.service)).unwrap_err().to_string();
        assert!(e.starts_with("to:") && e.contains("mars"), "{e}");
        let mut plan = migration().plan;
        plan.from = vec![c("old1")];
        // old2 carries 25 % and is neither source nor target.
        let e = source_weights(&plan, &w.service.effective_weights().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("old2"), "{e}");
        let mut plan = migration().plan;
        plan.min_capacity = 2.0;
        let e = validate(&plan, Some(&w.service)).unwrap_err().to_string();
        assert!(e.contains("ready endpoints"), "{e}");
    }
}

#[cfg(test)]
mod latency_tests {
    use super::*;

    fn gates(ratio: f64, max_ms: u64) -> Gates {
        Gates {
            min_requests: 10,
            latency: Some(LatencyGate {
                prometheus_url: "http://127.0.0.1:9090".into(),
                p99_query: DEFAULT_P99_QUERY.into(),
                max_p99_ratio: ratio,
                max_p99_ms: max_ms,
            }),
            ..Gates::default()
        }
    }

    #[test]
    fn latency_gates_need_readings_and_judge_them() {
        let load = Load {
            requests: 100,
            errors: 0,
        };
        let read = |s: Option<f64>, t: Option<f64>| Latency {
            source_p99_ms: s,
            target_p99_ms: t,
        };
        let judge_with = |g: &Gates, l| judge(g, load, load, None, l).0;
        assert_eq!(
            judge_with(&gates(2.0, 0), read(Some(10.0), None)),
            GateOutcome::NotEnoughData
        );
        assert_eq!(
            judge_with(&gates(2.0, 0), read(None, Some(10.0))),
            GateOutcome::NotEnoughData
        );
        assert_eq!(
            judge_with(&gates(2.0, 0), read(Some(10.0), Some(19.0))),
            GateOutcome::Pass
        );
        assert_eq!(
            judge_with(&gates(2.0, 0), read(Some(10.0), Some(25.0))),
            GateOutcome::Fail
        );
        assert_eq!(
            judge_with(&gates(0.0, 50), read(None, Some(49.0))),
            GateOutcome::Pass
        );
        let (outcome, detail) = judge(&gates(0.0, 50), load, load, None, read(None, Some(80.0)));
        assert_eq!(outcome, GateOutcome::Fail);
        assert!(detail.contains("p99 80.0 ms is above 50 ms"), "{detail}");
    }
}
