//! The `ferry.v1.Migrations` gRPC service over the [`Engine`].
//!
//! Requests are parsed into a [`Plan`] with errors that name the field;
//! everything else (state rules, persistence) is the engine's.

use std::pin::Pin as BoxPin;
use std::sync::Arc;
use std::time::Duration;

use ferry_discovery::{ClusterName, ServiceName, TOTAL_WEIGHT};
use ferry_proto::ferry::v1 as pb;
use ferry_proto::ferry::v1::migrations_server::{Migrations, MigrationsServer};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::api::actor;
use crate::engine::Engine;
use crate::migration::{DEFAULT_P99_QUERY, Deploy, Gates, LatencyGate, Migration, Plan};
use crate::policy::PolicyError;

/// The migrations API.
#[derive(Debug, Clone)]
pub struct MigrationsApi {
    engine: Arc<Engine>,
    /// Ends every open `WatchMigration` stream, so a shutdown never waits
    /// on a watcher.
    shutdown: CancellationToken,
}

impl MigrationsApi {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self {
            engine,
            shutdown: CancellationToken::new(),
        }
    }

    /// Open watches end when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    pub fn into_service(self) -> MigrationsServer<Self> {
        MigrationsServer::new(self)
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError::InvalidArgument {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// A duration field: empty takes the default; at most a day.
fn duration(field: &str, text: &str, default: Duration) -> Result<u64, PolicyError> {
    if text.trim().is_empty() {
        return Ok(default.as_millis() as u64);
    }
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        invalid(
            field,
            format!("{text:?} is not a duration (e.g. 30s, 5m): {e}"),
        )
    })?;
    if d > Duration::from_secs(24 * 3600) {
        return Err(invalid(field, format!("{text:?} is longer than a day")));
    }
    Ok(d.as_millis() as u64)
}

/// A fraction field: 0 takes the default.
fn fraction(field: &str, value: f64, default: f64) -> Result<f64, PolicyError> {
    if value == 0.0 {
        return Ok(default);
    }
    if !value.is_finite() || !(0.0..=1.0).contains(&value) {
        return Err(invalid(field, format!("{value} is not within 0..1")));
    }
    Ok(value)
}

fn percent(field: &str, value: f64) -> Result<f64, PolicyError> {
    if !value.is_finite() || !(0.0..=100.0).contains(&value) {
        return Err(invalid(
            field,
            format!("{value} is not a percentage within 0..100"),
        ));
    }
    Ok(value / 100.0)
}

/// Basis points of a percent with at most two decimals.
fn basis_points(field: &str, percent: f64) -> Result<u32, PolicyError> {
    if !percent.is_finite() || percent <= 0.0 || percent > 100.0 {
        return Err(invalid(
            field,
            format!("{percent} is not a percentage in (0, 100]"),
        ));
    }
    let bp = (percent * 100.0).round();
    if (bp - percent * 100.0).abs() > 1e-6 {
        return Err(invalid(
            field,
            format!("{percent} has more than two decimals"),
        ));
    }
    Ok(bp as u32)
}

/// The target (`to`) or targets (`targets`, with shares summing to 100).
pub fn targets_from_request(
    r: &pb::CreateMigrationRequest,
    from: &[ClusterName],
) -> Result<(ClusterName, Vec<(ClusterName, u32)>), PolicyError> {
    if r.targets.is_empty() {
        let to = ClusterName::new(&r.to).map_err(|e| invalid("to", e.to_string()))?;
        if from.contains(&to) {
            return Err(invalid("to", format!("cluster {to} is also a source")));
        }
        return Ok((to, Vec::new()));
    }
    if !r.to.is_empty() {
        return Err(invalid("to", "give `to` or `targets`, not both"));
    }
    let mut targets: Vec<(ClusterName, u32)> = Vec::with_capacity(r.targets.len());
    for (i, t) in r.targets.iter().enumerate() {
        let field = format!("targets[{i}]");
        let c = ClusterName::new(&t.cluster).map_err(|e| invalid(&field, e.to_string()))?;
        if from.contains(&c) {
            return Err(invalid(&field, format!("cluster {c} is also a source")));
        }
        if targets.iter().any(|(seen, _)| *seen == c) {
            return Err(invalid(&field, format!("cluster {c} is listed twice")));
        }
        let bp = basis_points(&format!("{field}.percent"), t.percent)?;
        targets.push((c, bp));
    }
    let sum: u32 = targets.iter().map(|(_, bp)| bp).sum();
    if sum != TOTAL_WEIGHT {
        return Err(invalid(
            "targets",
            format!(
                "shares sum to {}.{:02} %, must be 100 %",
                sum / 100,
                sum % 100
            ),
        ));
    }
    let to = targets[0].0.clone();
    if targets.len() == 1 {
        return Ok((to, Vec::new()));
    }
    Ok((to, targets))
}

/// Parses and checks a create request; every error names its field.
pub fn plan_from_request(r: &pb::CreateMigrationRequest) -> Result<Plan, PolicyError> {
    let service = ServiceName::parse(&r.service)
        .map_err(|e| invalid("service", format!("{e} (expected name.namespace)")))?;
    if r.from.is_empty() {
        return Err(invalid("from", "at least one source cluster is required"));
    }
    let mut from = Vec::with_capacity(r.from.len());
    for (i, c) in r.from.iter().enumerate() {
        let c = ClusterName::new(c).map_err(|e| invalid(&format!("from[{i}]"), e.to_string()))?;
        if from.contains(&c) {
            return Err(invalid(
                &format!("from[{i}]"),
                format!("cluster {c} is listed twice"),
            ));
        }
        from.push(c);
    }
    let (to, targets) = targets_from_request(r, &from)?;
    if r.steps.is_empty() {
        return Err(invalid(
            "steps",
            "at least one step is required, ending at 100",
        ));
    }
    let mut steps = Vec::with_capacity(r.steps.len());
    for (i, p) in r.steps.iter().enumerate() {
        let field = format!("steps[{i}]");
        let bp = basis_points(&field, *p)?;
        if steps.last().is_some_and(|last| bp <= *last) {
            return Err(invalid(
                &field,
                format!("{p} does not increase on the step before"),
            ));
        }
        steps.push(bp);
    }
    if steps.last() != Some(&TOTAL_WEIGHT) {
        return Err(invalid(
            &format!("steps[{}]", steps.len() - 1),
            "the last step must be 100",
        ));
    }
    let g = r.gates.clone().unwrap_or_default();
    let defaults = Gates::default();
    let latency = if g.max_p99_ratio != 0.0 || g.max_p99_ms != 0 {
        if !g.prometheus_url.starts_with("http://") {
            return Err(invalid(
                "gates.prometheus_url",
                "latency gates read p99s from Prometheus: give its http:// URL",
            ));
        }
        if !g.max_p99_ratio.is_finite() || g.max_p99_ratio < 0.0 {
            return Err(invalid(
                "gates.max_p99_ratio",
                format!("{} is not a ratio ≥ 0", g.max_p99_ratio),
            ));
        }
        let p99_query = if g.p99_query.trim().is_empty() {
            DEFAULT_P99_QUERY.to_owned()
        } else if g.p99_query.contains("{cluster}") {
            g.p99_query.clone()
        } else {
            return Err(invalid(
                "gates.p99_query",
                "must use {cluster} (and usually {name}, {namespace}, {window})",
            ));
        };
        Some(LatencyGate {
            prometheus_url: g.prometheus_url.clone(),
            p99_query,
            max_p99_ratio: g.max_p99_ratio,
            max_p99_ms: g.max_p99_ms,
        })
    } else if !g.prometheus_url.is_empty() || !g.p99_query.is_empty() {
        return Err(invalid(
            "gates.max_p99_ratio",
            "a Prometheus URL or query without max_p99_ratio or max_p99_ms gates nothing",
        ));
    } else {
        None
    };
    let gates = Gates {
        max_error_rate_increase: if g.max_error_rate_increase_pct == 0.0 {
            defaults.max_error_rate_increase
        } else {
            percent(
                "gates.max_error_rate_increase_pct",
                g.max_error_rate_increase_pct,
            )?
        },
        max_error_rate: percent("gates.max_error_rate_pct", g.max_error_rate_pct)?,
        min_requests: if g.min_requests == 0 {
            defaults.min_requests
        } else {
            g.min_requests
        },
        data_timeout_ms: duration(
            "gates.data_timeout",
            &g.data_timeout,
            Duration::from_millis(defaults.data_timeout_ms),
        )?,
        latency,
    };
    let deploy = match r.deploy.trim() {
        "" | "none" => Deploy::None,
        "hook" => Deploy::Hook,
        "kube" => Deploy::Kube {
            copy_secrets: r.copy_secrets,
            delete_source: r.delete_source,
            retain_ms: duration(
                "retain",
                &r.retain,
                Duration::from_millis(crate::migration::DEFAULT_RETAIN_MS),
            )?,
        },
        other => {
            return Err(invalid(
                "deploy",
                format!("{other:?} is not a deploy mode (none, hook or kube)"),
            ));
        }
    };
    for (field, given) in [
        ("copy_secrets", r.copy_secrets),
        ("delete_source", r.delete_source),
        ("retain", !r.retain.is_empty()),
    ] {
        if given && !matches!(deploy, Deploy::Kube { .. }) {
            return Err(invalid(field, "goes with deploy \"kube\""));
        }
    }
    Ok(Plan {
        service,
        from,
        to,
        targets,
        deploy,
        steps,
        bake_ms: duration("bake", &r.bake, Duration::from_secs(60))?,
        gates,
        ack_share: fraction("ack_share", r.ack_share, 1.0)?,
        ack_timeout_ms: duration("ack_timeout", &r.ack_timeout, Duration::from_secs(60))?,
        double_deploy_timeout_ms: duration(
            "double_deploy_timeout",
            &r.double_deploy_timeout,
            Duration::from_secs(300),
        )?,
        min_capacity: if r.min_capacity == 0.0 {
            0.5
        } else if r.min_capacity.is_finite() && r.min_capacity > 0.0 && r.min_capacity <= 10.0 {
            r.min_capacity
        } else {
            return Err(invalid(
                "min_capacity",
                format!("{} is not a fraction within 0..10", r.min_capacity),
            ));
        },
        drain_ms: duration("drain", &r.drain, Duration::from_secs(10))?,
        min_proxies: match r.min_proxies {
            0 => 1,
            n @ 1..=1_000_000 => n,
            n => {
                return Err(invalid(
                    "min_proxies",
                    format!("{n} is more than 1000000 proxies"),
                ));
            }
        },
    })
}

/// Every target with its share, in percent.
pub fn target_shares(plan: &Plan) -> Vec<pb::TargetShare> {
    plan.target_shares()
        .into_iter()
        .map(|(c, bp)| pb::TargetShare {
            cluster: c.to_string(),
            percent: f64::from(bp) / 100.0,
        })
        .collect()
}

/// The wire form of a migration.
pub fn to_proto(m: &Migration) -> pb::Migration {
    pb::Migration {
        id: m.id.clone(),
        service: m.plan.service.to_string(),
        from: m.plan.from.iter().map(|c| c.to_string()).collect(),
        to: m.plan.to.to_string(),
        targets: target_shares(&m.plan),
        deploy: m.plan.deploy.as_str().to_owned(),
        steps_bp: m.plan.steps.clone(),
        stage: m.stage.as_str().to_owned(),
        phase: m.stage.phase_str().to_owned(),
        step: m.step_reached() as u32,
        weights: m.weights.iter().map(|(c, w)| (c.to_string(), *w)).collect(),
        reason: m.reason.clone(),
        gates: m
            .gates
            .iter()
            .map(|g| pb::GateResult {
                step: g.step as u32,
                outcome: g.outcome.as_str().to_owned(),
                source_requests: g.source.0,
                source_errors: g.source.1,
                target_requests: g.target.0,
                target_errors: g.target.1,
                source_p99_ms: g.latency.source_p99_ms.unwrap_or(f64::NAN),
                target_p99_ms: g.latency.target_p99_ms.unwrap_or(f64::NAN),
                detail: g.detail.clone(),
                at_unix_ms: g.at_ms,
            })
            .collect(),
        created_by: m.created_by.clone(),
        created_at_unix_ms: m.created_at_ms,
        updated_at_unix_ms: m.updated_at_ms,
        phase_started_at_unix_ms: m.phase_started_ms,
        acked_clients: m.acks.unwrap_or_default().acked as u32,
        connected_clients: m.acks.unwrap_or_default().connected as u32,
        bake: humantime::format_duration(Duration::from_millis(m.plan.bake_ms)).to_string(),
        min_proxies: m.plan.min_proxies,
        returning_clients: m.acks.unwrap_or_default().returning as u32,
        waiting: waiting(m),
    }
}

/// What a step awaiting acknowledgement waits for (empty otherwise).
pub fn waiting(m: &Migration) -> String {
    if m.stage.awaits_ack() {
        match m.acks {
            Some(acks) => acks.waiting_for(&m.plan),
            None => "proxies to acknowledge the step's weights".to_owned(),
        }
    } else {
        String::new()
    }
}

impl MigrationsApi {
    /// Pause, resume or abort: the engine's `action` on the request's
    /// migration, as the caller.
    async fn act(
        &self,
        request: Request<pb::MigrationActionRequest>,
        action: Action,
    ) -> Result<Response<pb::Migration>, Status> {
        let actor = actor(&request, "");
        let r = request.into_inner();
        let (e, id, reason) = (&self.engine, &r.id, &r.reason);
        let m = match action {
            Action::Pause => e.pause(id, &actor, reason).await,
            Action::Resume => e.resume(id, &actor, reason).await,
            Action::Abort => e.abort(id, &actor, reason).await,
        }?;
        Ok(Response::new(to_proto(&m)))
    }
}

/// What a person asks of a running migration or campaign.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Action {
    Pause,
    Resume,
    Abort,
}

type MigrationStream = BoxPin<Box<dyn Stream<Item = Result<pb::Migration, Status>> + Send>>;

#[tonic::async_trait]
impl Migrations for MigrationsApi {
    async fn create_migration(
        &self,
        request: Request<pb::CreateMigrationRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        let actor = actor(&request, "");
        let r = request.into_inner();
        let plan = plan_from_request(&r)?;
        let m = self.engine.create(plan, &actor, &r.reason).await?;
        Ok(Response::new(to_proto(&m)))
    }

    async fn get_migration(
        &self,
        request: Request<pb::GetMigrationRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        Ok(Response::new(to_proto(
            &self.engine.get(&request.get_ref().id)?,
        )))
    }

    async fn list_migrations(
        &self,
        request: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsResponse>, Status> {
        let r = request.into_inner();
        let service = (!r.service.is_empty()).then_some(r.service.as_str());
        Ok(Response::new(pb::ListMigrationsResponse {
            migrations: self
                .engine
                .list(service, r.active_only)
                .iter()
                .map(to_proto)
                .collect(),
        }))
    }

    async fn pause_migration(
        &self,
        request: Request<pb::MigrationActionRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        self.act(request, Action::Pause).await
    }

    async fn resume_migration(
        &self,
        request: Request<pb::MigrationActionRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        self.act(request, Action::Resume).await
    }

    async fn abort_migration(
        &self,
        request: Request<pb::MigrationActionRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        self.act(request, Action::Abort).await
    }

    type WatchMigrationStream = MigrationStream;

    async fn watch_migration(
        &self,
        request: Request<pb::GetMigrationRequest>,
    ) -> Result<Response<MigrationStream>, Status> {
        let id = request.into_inner().id;
        // Subscribe before reading so no change falls between.
        let updates = self.engine.updates();
        let (seen, first) = self.engine.get_numbered(&id)?;
        let ended = first.stage.is_terminal();
        let head = futures::stream::once({
            let first = to_proto(&first);
            async move { Ok(first) }
        });
        if ended {
            return Ok(Response::new(Box::pin(head)));
        }
        let updates = tokio_stream::wrappers::BroadcastStream::new(updates);
        // The stream ends right after the update that ends the migration
        // (or after an error), without waiting for another update.
        let tail = futures::stream::unfold(Some(updates), move |state| {
            let id = id.clone();
            async move {
                let mut updates = state?;
                loop {
                    match updates.next().await? {
                        // Skip what the first answer already holds, so the
                        // stream never goes back in time.
                        Ok((n, m)) if m.id == id && n > seen => {
                            let last = m.stage.is_terminal();
                            return Some((Ok(to_proto(&m)), (!last).then_some(updates)));
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            let status = Status::data_loss(format!(
                                "watcher fell behind: {e}; get the migration and watch again"
                            ));
                            return Some((Err(status), None));
                        }
                    }
                }
            }
        });
        let tail = tail.take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(head.chain(tail))))
    }
}
