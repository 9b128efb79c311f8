//! The `ferry.v1.Campaigns` gRPC service over the [`Engine`].

use crate::migration_api::Action;
use std::pin::Pin as BoxPin;
use std::sync::Arc;

use ferry_discovery::ClusterName;
use ferry_proto::ferry::v1 as pb;
use ferry_proto::ferry::v1::campaigns_server::{Campaigns, CampaignsServer};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::api::actor;
use crate::campaign::{Campaign, CampaignPlan, Order, ServiceState};
use crate::engine::Engine;
use crate::migration_api::{plan_from_request, target_shares, targets_from_request};
use crate::policy::PolicyError;

/// Default migrations of one campaign in flight at once.
pub const DEFAULT_CONCURRENCY: u32 = 20;
/// Default rolled-back services after which a campaign stops launching.
pub const DEFAULT_MAX_FAILURES: u32 = 3;

/// The campaigns API.
#[derive(Debug, Clone)]
pub struct CampaignsApi {
    engine: Arc<Engine>,
    shutdown: CancellationToken,
}

impl CampaignsApi {
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

    pub fn into_service(self) -> CampaignsServer<Self> {
        CampaignsServer::new(self)
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError::InvalidArgument {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Parses and checks a create request; every error names its field.
pub fn campaign_plan_from_request(
    r: &pb::CreateCampaignRequest,
) -> Result<CampaignPlan, PolicyError> {
    let from = ClusterName::new(&r.from).map_err(|e| invalid("from", e.to_string()))?;
    let targets = pb::CreateMigrationRequest {
        to: r.to.clone(),
        targets: r.targets.clone(),
        ..Default::default()
    };
    let (to, _) = targets_from_request(&targets, std::slice::from_ref(&from))?;
    let mut template = r.migration.clone().unwrap_or_default();
    for (field, value) in [
        ("migration.service", template.service.as_str()),
        ("migration.to", template.to.as_str()),
        ("migration.reason", template.reason.as_str()),
    ] {
        if !value.is_empty() {
            return Err(invalid(field, "leave it empty: the campaign sets it"));
        }
    }
    if !template.from.is_empty() || !template.targets.is_empty() {
        return Err(invalid(
            "migration.from",
            "leave from, to and targets empty: the campaign sets them",
        ));
    }
    template.service = "template.campaign".into();
    template.from = vec![r.from.clone()];
    template.to = r.to.clone();
    template.targets = r.targets.clone();
    let template = plan_from_request(&template).map_err(|e| match e {
        PolicyError::InvalidArgument { field, reason } => PolicyError::InvalidArgument {
            field: format!("migration.{field}"),
            reason,
        },
        other => other,
    })?;
    for (i, ns) in r.namespaces.iter().enumerate() {
        if ns.is_empty()
            || ns.len() > 63
            || !ns
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                &format!("namespaces[{i}]"),
                format!("{ns:?} is not a namespace name"),
            ));
        }
    }
    let concurrency = match r.concurrency {
        0 => DEFAULT_CONCURRENCY,
        n @ 1..=10_000 => n,
        n => return Err(invalid("concurrency", format!("{n} is more than 10000"))),
    };
    let max_failures = match (r.unlimited_failures, r.max_failures) {
        (true, 0) => 0,
        (true, _) => {
            return Err(invalid(
                "max_failures",
                "give max_failures or unlimited_failures, not both",
            ));
        }
        (false, 0) => DEFAULT_MAX_FAILURES,
        (false, n) => n,
    };
    let plan = CampaignPlan {
        from,
        to,
        services: r.services.clone(),
        namespaces: r.namespaces.clone(),
        concurrency,
        max_failures,
        order: Order::parse(&r.order)?,
        template,
    };
    crate::campaign::check_patterns(&plan)?;
    Ok(plan)
}

/// The wire form of a campaign; in-flight services show their migration's
/// progress.
pub fn campaign_to_proto(c: &Campaign, engine: &Engine, now_ms: i64) -> pb::Campaign {
    let counts = c.counts();
    let finished = (counts.done + counts.rolled_back) as f64;
    let minutes = ((c.ended_at_ms.unwrap_or(now_ms) - c.created_at_ms).max(1) as f64) / 60_000.0;
    let per_minute = finished / minutes;
    let left = (counts.queued + counts.in_flight) as f64;
    let eta_seconds = if per_minute > 0.0 && left > 0.0 {
        (left / per_minute * 60.0).round() as i64
    } else {
        0
    };
    let services = c
        .services
        .iter()
        .map(|s| {
            let (reason, progress) = match &s.state {
                ServiceState::RolledBack { reason, .. } | ServiceState::Skipped { reason } => {
                    (reason.clone(), String::new())
                }
                ServiceState::InFlight { migration } => (
                    String::new(),
                    engine
                        .get(migration)
                        .map(|m| {
                            let mut p = m.stage.as_str().to_owned();
                            if !m.stage.phase_str().is_empty() {
                                p.push('/');
                                p.push_str(m.stage.phase_str());
                            }
                            if let Some(step) = m.stage.step() {
                                p.push_str(&format!(" {}/{}", step + 1, m.plan.steps.len()));
                            }
                            p
                        })
                        .unwrap_or_default(),
                ),
                _ => (String::new(), String::new()),
            };
            pb::CampaignService {
                service: s.service.to_string(),
                state: s.state.as_str().to_owned(),
                migration: s.state.migration().unwrap_or_default().to_owned(),
                reason,
                endpoints: s.endpoints as u32,
                updated_at_unix_ms: s.updated_at_ms,
                progress,
            }
        })
        .collect();
    pb::Campaign {
        id: c.id.clone(),
        from: c.plan.from.to_string(),
        to: c.plan.to.to_string(),
        targets: target_shares(&c.plan.template),
        state: c.state.as_str().to_owned(),
        reason: c.reason.clone(),
        concurrency: c.plan.concurrency,
        max_failures: c.plan.max_failures,
        order: c.plan.order.as_str().to_owned(),
        counts: Some(pb::CampaignCounts {
            queued: counts.queued as u32,
            in_flight: counts.in_flight as u32,
            done: counts.done as u32,
            rolled_back: counts.rolled_back as u32,
            skipped: counts.skipped as u32,
        }),
        services,
        created_by: c.created_by.clone(),
        created_at_unix_ms: c.created_at_ms,
        updated_at_unix_ms: c.updated_at_ms,
        ended_at_unix_ms: c.ended_at_ms.unwrap_or(0),
        per_minute,
        eta_seconds,
        purpose: c.purpose.clone(),
    }
}

impl CampaignsApi {
    fn wire(&self, c: &Campaign) -> pb::Campaign {
        campaign_to_proto(c, &self.engine, crate::policy::now_ms())
    }

    async fn act(
        &self,
        request: Request<pb::CampaignActionRequest>,
        action: Action,
    ) -> Result<Response<pb::Campaign>, Status> {
        let actor = actor(&request, "");
        let r = request.into_inner();
        let (e, id, reason) = (&self.engine, &r.id, &r.reason);
        let c = match action {
            Action::Pause => e.pause_campaign(id, &actor, reason).await,
            Action::Resume => e.resume_campaign(id, &actor, reason).await,
            Action::Abort => e.abort_campaign(id, &actor, reason).await,
        }?;
        Ok(Response::new(self.wire(&c)))
    }
}

type CampaignStream = BoxPin<Box<dyn Stream<Item = Result<pb::Campaign, Status>> + Send>>;

#[tonic::async_trait]
impl Campaigns for CampaignsApi {
    async fn create_campaign(
        &self,
        request: Request<pb::CreateCampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let actor = actor(&request, "");
        let r = request.into_inner();
        let plan = campaign_plan_from_request(&r)?;
        let c = self.engine.create_campaign(plan, &actor, &r.reason).await?;
        Ok(Response::new(self.wire(&c)))
    }

    async fn get_campaign(
        &self,
        request: Request<pb::GetCampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let c = self.engine.get_campaign(&request.get_ref().id)?;
        Ok(Response::new(self.wire(&c)))
    }

    async fn list_campaigns(
        &self,
        request: Request<pb::ListCampaignsRequest>,
    ) -> Result<Response<pb::ListCampaignsResponse>, Status> {
        let active_only = request.get_ref().active_only;
        Ok(Response::new(pb::ListCampaignsResponse {
            campaigns: self
                .engine
                .list_campaigns(active_only)
                .iter()
                .map(|c| self.wire(c))
                .collect(),
        }))
    }

    async fn pause_campaign(
        &self,
        request: Request<pb::CampaignActionRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        self.act(request, Action::Pause).await
    }

    async fn resume_campaign(
        &self,
        request: Request<pb::CampaignActionRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        self.act(request, Action::Resume).await
    }

    async fn abort_campaign(
        &self,
        request: Request<pb::CampaignActionRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        self.act(request, Action::Abort).await
    }

    async fn retry_campaign(
        &self,
        request: Request<pb::RetryCampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let actor = actor(&request, "");
        let r = request.into_inner();
        let c = self
            .engine
            .retry_campaign(&r.id, &r.services, &actor, &r.reason)
            .await?;
        Ok(Response::new(self.wire(&c)))
    }

    type WatchCampaignStream = CampaignStream;

    async fn watch_campaign(
        &self,
        request: Request<pb::GetCampaignRequest>,
    ) -> Result<Response<CampaignStream>, Status> {
        let id = request.into_inner().id;
        // Subscribe before reading so no change falls between. Migration
        // changes also update the campaign's view (its services' progress).
        let updates = self.engine.campaign_updates();
        let migrations = self.engine.updates();
        let (seen, first) = self.engine.get_campaign_numbered(&id)?;
        let head = futures::stream::once({
            let first = self.wire(&first);
            async move { Ok(first) }
        });
        if first.state.is_terminal() {
            return Ok(Response::new(Box::pin(head)));
        }
        let engine = self.engine.clone();
        let members: std::collections::BTreeSet<String> = first
            .services
            .iter()
            .map(|s| s.service.to_string())
            .collect();
        enum Event {
            Campaign(Result<(u64, Box<Campaign>), String>),
            Migration(Result<String, String>),
        }
        let campaign_events = tokio_stream::wrappers::BroadcastStream::new(updates)
            .map(|u| Event::Campaign(u.map(|(n, c)| (n, Box::new(c))).map_err(|e| e.to_string())));
        let migration_events = tokio_stream::wrappers::BroadcastStream::new(migrations).map(|u| {
            Event::Migration(
                u.map(|(_, m)| m.plan.service.to_string())
                    .map_err(|e| e.to_string()),
            )
        });
        let events = futures::stream::select(campaign_events, migration_events);
        let tail = futures::stream::unfold(Some(Box::pin(events)), move |state| {
            let id = id.clone();
            let engine = engine.clone();
            let members = members.clone();
            async move {
                let mut events = state?;
                loop {
                    let wire =
                        |c: &Campaign| campaign_to_proto(c, &engine, crate::policy::now_ms());
                    match events.next().await? {
                        Event::Campaign(Ok((n, c))) if c.id == id && n > seen => {
                            let last = c.state.is_terminal();
                            return Some((Ok(wire(&c)), (!last).then_some(events)));
                        }
                        Event::Migration(Ok(service)) if members.contains(&service) => {
                            if let Ok(c) = engine.get_campaign(&id) {
                                return Some((Ok(wire(&c)), Some(events)));
                            }
                        }
                        Event::Campaign(Err(e)) | Event::Migration(Err(e)) => {
                            let status = Status::data_loss(format!(
                                "watcher fell behind: {e}; get the campaign and watch again"
                            ));
                            return Some((Err(status), None));
                        }
                        _ => continue,
                    }
                }
            }
        });
        let tail = tail.take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(head.chain(tail))))
    }
}
