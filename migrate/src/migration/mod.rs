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

/// Where a migration stands, with what only that stage has: a step and
/// its phase in SHIFT, where to resume when PAUSED, whether the source
/// was deleted once DONE. A record cannot name a step outside SHIFT, nor
/// pause from a stage that cannot be resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Accepted and waiting for a slot; validated again when it starts,
    /// and pinned as it leaves.
    Validate,
    DoubleDeploy,
    /// At `step` of the plan's steps.
    Shift {
        step: usize,
        phase: StepPhase,
    },
    Cleanup,
    Unpin,
    Done {
        /// With `--deploy kube --delete-source`: the source's objects were
        /// deleted after the retention.
        source_deleted: bool,
    },
    Paused {
        resume: Resume,
    },
    /// The source weights are set; waiting for proxies to acknowledge them.
    RollingBack,
    RolledBack,
    Failed,
}

/// Where a paused migration continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    Validate,
    DoubleDeploy,
    Shift { step: usize, phase: StepPhase },
}

impl Resume {
    /// The stage a resumed migration is in.
    pub fn stage(self) -> Stage {
        match self {
            Self::Validate => Stage::Validate,
            Self::DoubleDeploy => Stage::DoubleDeploy,
            Self::Shift { step, phase } => Stage::Shift { step, phase },
        }
    }
}

/// Where a SHIFT step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    /// Weights set; waiting for proxies to acknowledge them.
    AwaitingAck,
    /// Acknowledged; the step bakes and its gate is evaluated.
    Baking,
}

/// A stage's name alone: what is shown, counted and sent over the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StageName {
    Validate,
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

impl StageName {
    pub const ALL: [StageName; 10] = [
        Self::Validate,
        Self::DoubleDeploy,
        Self::Shift,
        Self::Cleanup,
        Self::Unpin,
        Self::Done,
        Self::Paused,
        Self::RollingBack,
        Self::RolledBack,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validate => "VALIDATE",
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
}

impl Stage {
    pub fn name(self) -> StageName {
        match self {
            Self::Validate => StageName::Validate,
            Self::DoubleDeploy => StageName::DoubleDeploy,
            Self::Shift { .. } => StageName::Shift,
            Self::Cleanup => StageName::Cleanup,
            Self::Unpin => StageName::Unpin,
            Self::Done { .. } => StageName::Done,
            Self::Paused { .. } => StageName::Paused,
            Self::RollingBack => StageName::RollingBack,
            Self::RolledBack => StageName::RolledBack,
            Self::Failed => StageName::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.name().as_str()
    }

    /// Ended: nothing more will happen to it.
    pub fn is_terminal(self) -> bool {
        self.name().is_terminal()
    }

    /// Holds a concurrency slot (started and not ended).
    pub fn is_active(self) -> bool {
        !self.is_terminal() && self != Self::Validate
    }

    /// The phase within the stage, for display: `AWAITING_ACK` while
    /// proxies are to acknowledge weights, `BAKING`, or empty.
    pub fn phase_str(self) -> &'static str {
        match self {
            Self::Shift {
                phase: StepPhase::AwaitingAck,
                ..
            }
            | Self::RollingBack => "AWAITING_ACK",
            Self::Shift {
                phase: StepPhase::Baking,
                ..
            } => "BAKING",
            _ => "",
        }
    }

    /// The SHIFT step it is at, or paused at.
    pub fn step(self) -> Option<usize> {
        match self {
            Self::Shift { step, .. }
            | Self::Paused {
                resume: Resume::Shift { step, .. },
            } => Some(step),
            _ => None,
        }
    }

    /// Waiting for proxies to acknowledge weights it set.
    pub fn awaits_ack(self) -> bool {
        self.phase_str() == "AWAITING_ACK"
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
    /// Several targets, each with its share of the target side in basis
    /// points (summing to 10000); `to` is the first. Empty: `to` alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<(ClusterName, u32)>,
    /// Who deploys the target and retires the source.
    #[serde(default, skip_serializing_if = "Deploy::is_none")]
    pub deploy: Deploy,
}

/// Who does the double deploy, and the cleanup after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Deploy {
    /// Someone else: DOUBLE_DEPLOY waits for both sides to be healthy.
    #[default]
    None,
    /// The control plane's deploy hook (a command or a webhook), called at
    /// DOUBLE_DEPLOY, CLEANUP and on a rollback.
    Hook,
    /// Ferry copies the workload to the target(s) by server-side apply,
    /// deletes what it created on a rollback, and scales the source to 0
    /// at CLEANUP.
    Kube {
        /// Copy the Secrets the pods use too.
        #[serde(default)]
        copy_secrets: bool,
        /// Delete the source's objects once `retain_ms` has passed after
        /// the migration ended DONE (otherwise they stay, scaled to 0).
        #[serde(default)]
        delete_source: bool,
        #[serde(default = "default_retain_ms")]
        retain_ms: u64,
    },
}

/// How long a source's objects are kept after DONE by default: a day.
pub const DEFAULT_RETAIN_MS: u64 = 24 * 3600 * 1000;

fn default_retain_ms() -> u64 {
    DEFAULT_RETAIN_MS
}

impl Deploy {
    pub fn is_none(&self) -> bool {
        *self == Deploy::None
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Deploy::None => "none",
            Deploy::Hook => "hook",
            Deploy::Kube { .. } => "kube",
        }
    }
}

/// Deploy work a migration waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeployStep {
    /// DOUBLE_DEPLOY: make the target(s) run the service.
    Deploy,
    /// CLEANUP, after the drain: retire the source.
    Retire,
    /// A rollback, once proxies hold the source weights: undo the deploy.
    Undo,
    /// `retain` after DONE, with `delete_source`: delete the source's
    /// objects.
    DeleteSource,
}

impl DeployStep {
    /// The stage name the hook is told.
    pub fn as_str(self) -> &'static str {
        match self {
            DeployStep::Deploy => "double_deploy",
            DeployStep::Retire => "cleanup",
            DeployStep::Undo => "rollback",
            DeployStep::DeleteSource => "delete_source",
        }
    }
}

/// How deploy work stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployProgress {
    /// Asked for, or running.
    Pending,
    Done,
    Failed(String),
}

fn one_proxy() -> u32 {
    1
}

impl Plan {
    /// Every target with its share of the target side (basis points).
    pub fn target_shares(&self) -> Vec<(ClusterName, u32)> {
        if self.targets.is_empty() {
            vec![(self.to.clone(), TOTAL_WEIGHT)]
        } else {
            self.targets.clone()
        }
    }

    pub fn is_target(&self, cluster: &ClusterName) -> bool {
        self.target_shares().iter().any(|(c, _)| c == cluster)
    }

    /// `new` or `new-a=60%+new-b=40%`, for messages.
    pub fn targets_text(&self) -> String {
        if self.targets.is_empty() {
            return self.to.to_string();
        }
        self.targets
            .iter()
            .map(|(c, bp)| format!("{c}={}%", f64::from(*bp) / 100.0))
            .collect::<Vec<_>>()
            .join("+")
    }

    /// `total` basis points split among the targets by their shares.
    pub fn split_targets(&self, total: u32) -> BTreeMap<ClusterName, u32> {
        let shares = self
            .target_shares()
            .into_iter()
            .map(|(c, bp)| (c, u64::from(bp)))
            .collect();
        split_proportionally(total, &shares)
    }
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

/// A migration, as the engine holds it. It is stored in a flat form
/// ([`record`]) that older records share; loading one refuses a stage
/// combination the machine could not have written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "record::Stored", try_from = "record::Stored")]
pub struct Migration {
    pub id: String,
    pub plan: Plan,
    pub stage: Stage,
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
    pub applied_version: u64,
    /// Proxies that acknowledged the step, out of those connected (none
    /// until first looked at; kept in memory).
    pub acks: Option<Acks>,
    /// Stop at the end of the current step (its campaign is paused): a
    /// step that passes pauses the migration instead of moving on.
    pub hold: bool,
}

impl Migration {
    /// When a DONE migration's source objects are due for deletion, if
    /// they are.
    pub fn source_deletion_due(&self) -> Option<i64> {
        match (self.plan.deploy, self.stage) {
            (
                Deploy::Kube {
                    delete_source: true,
                    retain_ms,
                    ..
                },
                Stage::Done {
                    source_deleted: false,
                },
            ) => Some(self.phase_started_ms.saturating_add(retain_ms as i64)),
            _ => None,
        }
    }

    /// The SHIFT step it is at or paused at; once it has left SHIFT, the
    /// last step judged (0 before any).
    pub fn step_reached(&self) -> usize {
        self.stage
            .step()
            .or_else(|| self.gates.last().map(|g| g.step))
            .unwrap_or(0)
    }
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
    /// How `step` of `m`'s deploy stands; asking starts it (only asked of a
    /// plan with a deploy mode).
    fn deploy(&self, m: &Migration, step: DeployStep) -> DeployProgress;
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

mod gates;
mod machine;
mod plan;
mod record;
mod requests;

pub use self::gates::judge;
pub use self::machine::{SOURCES_QUIET_MS, next};
pub use self::plan::{
    begin_rollback, rollback_weights, source_weights, step_weights, validate, validate_targets,
};
pub use self::record::RecordError;
pub use self::requests::{abort, create, pause, resume};

#[cfg(test)]
mod tests;
