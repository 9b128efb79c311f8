//! What the console shows, as one JSON document built from the control
//! plane's own state: catalog and weights, pins, load history, migrations
//! and their gates, the audit log, xDS clients and discovery health.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_discovery::kubernetes::{self, ClusterHealth};
use ferry_migrate::migration::{GateOutcome, GateResult, Migration, Stage, StageName};
use ferry_migrate::store::AuditRecord;
use ferry_xds::history::Chart;
use serde::Serialize;

use crate::admin::AdminState;

/// Audit entries shown.
const AUDIT_TAIL: usize = 20;

/// Migrations shown: every one in flight, and the latest ended ones.
const ENDED_SHOWN: usize = 10;

#[derive(Debug, Serialize)]
pub struct ConsoleState {
    pub at_ms: i64,
    pub ready: bool,
    pub policy_version: u64,
    pub store: &'static str,
    pub leading: bool,
    pub services: Vec<ServiceView>,
    pub migrations: Vec<MigrationView>,
    pub audit: Vec<AuditRecord>,
    /// Why the audit log could not be read, if it could not.
    pub audit_error: Option<String>,
    pub clients: Vec<ClientView>,
    pub discovery: Vec<DiscoveryView>,
}

#[derive(Debug, Serialize)]
pub struct ServiceView {
    pub name: String,
    pub ports: Vec<u16>,
    pub weights_from: &'static str,
    pub pin: Option<PinView>,
    pub clusters: Vec<BackendView>,
}

#[derive(Debug, Serialize)]
pub struct PinView {
    pub owner: String,
    pub reason: String,
    pub pinned_at_ms: i64,
    /// 0: no expiry.
    pub expires_at_ms: i64,
}

#[derive(Debug, Serialize)]
pub struct BackendView {
    pub cluster: String,
    pub weight_bp: u32,
    pub endpoints: usize,
    pub ready: usize,
    pub stale: bool,
    /// The last 15 minutes of load reports, when there were any.
    pub chart: Option<Chart>,
}

#[derive(Debug, Serialize)]
pub struct MigrationView {
    pub id: String,
    pub service: String,
    pub from: Vec<String>,
    pub to: String,
    pub stage: &'static str,
    pub phase: &'static str,
    pub timeline: Vec<TimelineStage>,
    /// 1-based; 0 before the first step.
    pub step: usize,
    /// The target's share at each step, basis points.
    pub steps_bp: Vec<u32>,
    pub weights_bp: BTreeMap<String, u32>,
    pub reason: String,
    pub purpose: String,
    pub created_by: String,
    pub updated_at_ms: i64,
    pub waiting: String,
    pub gates: Vec<GateResult>,
}

/// One stage of a migration's course and where the migration is on it.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct TimelineStage {
    pub stage: &'static str,
    /// "done", "current" or "pending".
    pub state: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ClientView {
    pub node_id: String,
    pub variant: &'static str,
    pub peer: Option<String>,
    /// Who the stream authenticated as, on a port with TLS or auth.
    pub identity: Option<String>,
    pub connected_at_ms: i64,
    /// Per resource type: the ACKed version, whether an update awaits its
    /// ACK, NACK count and the last NACK.
    pub types: BTreeMap<&'static str, TypeView>,
}

#[derive(Debug, Serialize)]
pub struct TypeView {
    pub acked_version: Option<String>,
    pub awaiting_ack: bool,
    pub nacks: u64,
    pub last_nack: Option<NackView>,
}

#[derive(Debug, Serialize)]
pub struct NackView {
    pub rejected_version: String,
    pub message: String,
    pub at_ms: i64,
}

#[derive(Debug, Serialize)]
pub struct DiscoveryView {
    pub cluster: String,
    /// "connecting", "connected", "stale" or "unauthorized".
    pub health: &'static str,
    pub last_sync_ms: Option<i64>,
    pub last_error: Option<String>,
    pub services: usize,
    pub endpoints: usize,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The console's state now.
pub async fn build(state: &AdminState) -> ConsoleState {
    let now = unix_ms(SystemTime::now());
    let (audit, audit_error) = match state.policy.audit(None, AUDIT_TAIL).await {
        Ok(records) => (records, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    ConsoleState {
        at_ms: now,
        ready: state.catalog.current().is_loaded() && state.cache.current().is_ready(),
        policy_version: state.policy.version(),
        store: state.store,
        leading: state.engine.is_leading(),
        services: services(state, now),
        migrations: migrations(state),
        audit,
        audit_error,
        clients: clients(state),
        discovery: discovery(state),
    }
}

fn services(state: &AdminState, now_ms: i64) -> Vec<ServiceView> {
    let catalog = state.catalog.current();
    let stale = kubernetes::stale_clusters(&state.clusters);
    let mut charts = state.loads.history().charts(now_ms);
    catalog
        .services
        .values()
        .map(|s| {
            let name = s.name.to_string();
            let resolved = state.policy.weights(&name).ok();
            let clusters = s
                .backends
                .iter()
                .map(|(c, b)| BackendView {
                    cluster: c.to_string(),
                    weight_bp: resolved.as_ref().map_or(0, |r| r.1.get(c).basis_points()),
                    endpoints: b.endpoints.len(),
                    ready: b.ready_endpoints(),
                    stale: stale.contains(c.as_str()),
                    chart: charts.remove(&(name.clone(), c.to_string())),
                })
                .collect();
            ServiceView {
                pin: state.policy.pin_of(&s.name).map(|p| PinView {
                    owner: p.owner,
                    reason: p.reason,
                    pinned_at_ms: p.pinned_at_ms,
                    expires_at_ms: p.expires_at_ms,
                }),
                weights_from: resolved.as_ref().map_or("none", |r| r.2.as_str()),
                ports: s.ports.iter().map(|p| p.port).collect(),
                name,
                clusters,
            }
        })
        .collect()
}

fn migrations(state: &AdminState) -> Vec<MigrationView> {
    let mut all = state.engine.recent(ENDED_SHOWN);
    // In flight first, then the most recently changed.
    all.sort_by_key(|m| (m.stage.is_terminal(), std::cmp::Reverse(m.updated_at_ms)));
    let in_flight = all.iter().filter(|m| !m.stage.is_terminal()).count();
    all.into_iter()
        .take(in_flight + ENDED_SHOWN)
        .map(|m| MigrationView {
            timeline: timeline(&m),
            waiting: ferry_migrate::migration_api::waiting(&m),
            service: m.plan.service.to_string(),
            from: m.plan.from.iter().map(ToString::to_string).collect(),
            to: m.plan.to.to_string(),
            stage: m.stage.as_str(),
            phase: m.stage.phase_str(),
            step: if m.stage == Stage::Validate {
                0
            } else {
                m.step_reached() + 1
            },
            steps_bp: m.plan.steps.clone(),
            weights_bp: m.weights.iter().map(|(c, w)| (c.to_string(), *w)).collect(),
            id: m.id,
            reason: m.reason,
            purpose: m.purpose,
            created_by: m.created_by,
            updated_at_ms: m.updated_at_ms,
            gates: m.gates,
        })
        .collect()
}

/// The course a migration takes, VALIDATE to DONE, or to ROLLED_BACK
/// (or FAILED) once it turned back; a paused one shows the stage it was
/// paused in.
pub fn timeline(m: &Migration) -> Vec<TimelineStage> {
    let at = match m.stage {
        Stage::Paused { resume } => resume.stage().name(),
        stage => stage.name(),
    };
    // Weights were moved (or a gate failed) before it turned back: it
    // got as far as SHIFT.
    let shifted = !m.weights.is_empty() || m.gates.iter().any(|g| g.outcome == GateOutcome::Fail);
    course(at, shifted)
}

fn course(at: StageName, shifted: bool) -> Vec<TimelineStage> {
    const FORWARD: [StageName; 6] = [
        StageName::Validate,
        StageName::DoubleDeploy,
        StageName::Shift,
        StageName::Cleanup,
        StageName::Unpin,
        StageName::Done,
    ];
    let stages: Vec<StageName> = match at {
        StageName::RollingBack | StageName::RolledBack | StageName::Failed => {
            let mut stages = FORWARD[..if shifted { 3 } else { 1 }].to_vec();
            if at == StageName::RolledBack {
                stages.push(StageName::RollingBack);
            }
            stages.push(at);
            stages
        }
        _ => FORWARD.to_vec(),
    };
    let current = stages.iter().position(|s| *s == at).unwrap_or(0);
    stages
        .iter()
        .enumerate()
        .map(|(i, stage)| TimelineStage {
            stage: stage.as_str(),
            state: if i < current || (i == current && at.is_terminal()) {
                "done"
            } else if i == current {
                "current"
            } else {
                "pending"
            },
        })
        .collect()
}

fn clients(state: &AdminState) -> Vec<ClientView> {
    state
        .clients
        .snapshot()
        .into_iter()
        .map(|c| ClientView {
            node_id: c.node_id,
            variant: c.variant.as_str(),
            peer: c.peer,
            identity: c.identity,
            connected_at_ms: unix_ms(c.connected_at),
            types: c
                .types
                .into_iter()
                .map(|(kind, t)| {
                    let view = TypeView {
                        acked_version: t.acked_version,
                        awaiting_ack: t.awaiting_ack,
                        nacks: t.nacks,
                        last_nack: t.last_nack.map(|n| NackView {
                            rejected_version: n.rejected_version,
                            message: n.message,
                            at_ms: unix_ms(n.at),
                        }),
                    };
                    (kind, view)
                })
                .collect(),
        })
        .collect()
}

fn discovery(state: &AdminState) -> Vec<DiscoveryView> {
    state
        .clusters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|c| DiscoveryView {
            cluster: c.cluster.clone(),
            health: match c.health {
                ClusterHealth::Connecting => "connecting",
                ClusterHealth::Connected => "connected",
                ClusterHealth::Stale => "stale",
                ClusterHealth::Unauthorized => "unauthorized",
            },
            last_sync_ms: c.last_sync.map(unix_ms),
            last_error: c.last_error.clone(),
            services: c.services,
            endpoints: c.endpoints,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(at: StageName, shifted: bool) -> Vec<String> {
        course(at, shifted)
            .into_iter()
            .map(|t| format!("{}:{}", t.stage, t.state))
            .collect()
    }

    #[test]
    fn a_timeline_marks_done_current_and_pending_stages() {
        assert_eq!(
            states(StageName::Shift, true),
            [
                "VALIDATE:done",
                "DOUBLE_DEPLOY:done",
                "SHIFT:current",
                "CLEANUP:pending",
                "UNPIN:pending",
                "DONE:pending"
            ]
        );
        assert!(
            states(StageName::Done, true)
                .iter()
                .all(|s| s.ends_with(":done"))
        );
    }

    #[test]
    fn a_rolled_back_timeline_ends_in_its_rollback() {
        assert_eq!(
            states(StageName::RolledBack, true),
            [
                "VALIDATE:done",
                "DOUBLE_DEPLOY:done",
                "SHIFT:done",
                "ROLLING_BACK:done",
                "ROLLED_BACK:done"
            ]
        );
        assert_eq!(
            states(StageName::RollingBack, true)
                .last()
                .map(String::as_str),
            Some("ROLLING_BACK:current")
        );
        // Refused before anything moved.
        assert_eq!(
            states(StageName::Failed, false),
            ["VALIDATE:done", "FAILED:done"]
        );
    }
}
