//! Campaigns in the engine: created, paused, resumed, aborted and retried
//! on request, and advanced on every tick by [`campaign::next`]. A
//! campaign's own audit entries are filed under the service
//! `<id>.campaigns` (`ferry audit --service camp-1.campaigns`); its
//! migrations' under their services, as any migration's.

use super::*;
use crate::campaign::{self, CampaignPlan, CampaignState, ServiceState, Step};

/// How many steps one campaign may take in one tick (launches, outcomes).
const STEPS_PER_TICK: usize = 64;

/// Every campaign audit action, zero-registered at start.
const CAMPAIGN_ACTIONS: [&str; 11] = [
    "campaign_created",
    "campaign_paused",
    "campaign_resumed",
    "campaign_aborting",
    "campaign_retried",
    "campaign_service_ended",
    "campaign_service_skipped",
    "campaign_halting",
    "campaign_done",
    "campaign_halted",
    "campaign_aborted",
];

/// The audit subject of a campaign's own entries.
pub fn campaign_subject(id: &str) -> Result<ServiceName, PolicyError> {
    ServiceName::new(id, "campaigns").map_err(|e| PolicyError::InvalidArgument {
        field: "id".into(),
        reason: e.to_string(),
    })
}

/// The engine as a campaign sees it.
struct View<'a> {
    migrations: &'a Migrations,
    policy: &'a Policy,
    catalog: &'a CatalogSnapshot,
}

impl campaign::Fleet for View<'_> {
    fn migration(&self, id: &str) -> Option<(StageName, String)> {
        self.migrations
            .get(id)
            .map(|m| (m.stage.name(), m.reason.clone()))
    }

    fn obstacle(&self, service: &ServiceName, targets: &[ClusterName]) -> Option<String> {
        if let Some(pin) = self.policy.pin_of(service) {
            return Some(format!("pinned by {}: {}", pin.owner, pin.reason));
        }
        if let Some(m) = self
            .migrations
            .active()
            .find(|m| m.plan.service == *service)
        {
            return Some(format!("migration {} is {} on it", m.id, m.stage.as_str()));
        }
        let Some(s) = self.catalog.services.get(service) else {
            return Some("no longer in the catalog".into());
        };
        targets.iter().find_map(|to| match s.backends.get(to) {
            Some(b) if b.ready_endpoints() > 0 => None,
            Some(_) => Some(format!("no ready endpoint in target cluster {to}")),
            None => Some(format!("no backend in target cluster {to}")),
        })
    }
}

fn encode_campaign(c: &Campaign) -> Result<String, PolicyError> {
    serde_json::to_string(c).map_err(|e| {
        PolicyError::Store(crate::StoreError::Db(format!(
            "cannot encode campaign {}: {e}",
            c.id
        )))
    })
}

fn campaign_not_found(id: &str) -> PolicyError {
    PolicyError::NotFound(format!("no campaign {id:?}"))
}

impl Engine {
    pub(super) fn register_campaign_metrics() {
        for action in CAMPAIGN_ACTIONS {
            metrics::counter!("ferry_migrate_campaign_transitions_total", "action" => action)
                .increment(0);
        }
    }

    /// The campaigns, locked (after the migrations, when both are).
    pub(super) fn lock_campaigns(&self) -> std::sync::MutexGuard<'_, Campaigns> {
        self.campaigns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn announce_campaign(&self, c: Campaign) {
        let n = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.campaign_updates.send((n, c));
    }

    /// Every change to any campaign from now on, numbered.
    pub fn campaign_updates(&self) -> broadcast::Receiver<(u64, Campaign)> {
        self.campaign_updates.subscribe()
    }

    /// A campaign with the number of the last change made before it was
    /// read.
    pub fn get_campaign_numbered(&self, id: &str) -> Result<(u64, Campaign), PolicyError> {
        let held = self.lock_campaigns();
        let c = held
            .get(id)
            .cloned()
            .ok_or_else(|| campaign_not_found(id))?;
        Ok((self.sequence.load(Ordering::SeqCst), c))
    }

    pub fn get_campaign(&self, id: &str) -> Result<Campaign, PolicyError> {
        self.lock_campaigns()
            .get(id)
            .cloned()
            .ok_or_else(|| campaign_not_found(id))
    }

    /// Campaigns, oldest first.
    pub fn list_campaigns(&self, active_only: bool) -> Vec<Campaign> {
        let mut out: Vec<Campaign> = self
            .lock_campaigns()
            .values()
            .filter(|c| !active_only || !c.state.is_terminal())
            .cloned()
            .collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        out
    }

    /// Records a campaign and takes every service with a backend in its
    /// source cluster (that its globs and namespaces select); the engine
    /// launches their migrations. Refused (changing nothing) when no
    /// service matches.
    pub async fn create_campaign(
        &self,
        plan: CampaignPlan,
        actor: &str,
        reason: &str,
    ) -> Result<Campaign, PolicyError> {
        require_reason(reason)?;
        campaign::check_patterns(&plan)?;
        let catalog = self.catalog.current();
        let now = now_ms();
        let services = campaign::select(&plan, &catalog, now);
        if services.is_empty() {
            return Err(PolicyError::Precondition(format!(
                "no service has a backend in cluster {}{}",
                plan.from,
                if plan.services.is_empty() && plan.namespaces.is_empty() {
                    String::new()
                } else {
                    " among those the services and namespaces select".to_owned()
                }
            )));
        }
        let _writer = self.writer.lock().await;
        let number = self
            .lock_campaigns()
            .keys()
            .filter_map(|id| id.strip_prefix("camp-").and_then(|n| n.parse::<u64>().ok()))
            .max()
            .unwrap_or(0)
            + 1;
        let c = Campaign {
            id: format!("camp-{number}"),
            plan,
            state: CampaignState::Running,
            reason: String::new(),
            purpose: reason.to_owned(),
            services,
            created_by: actor.to_owned(),
            created_at_ms: now,
            updated_at_ms: now,
            ended_at_ms: None,
        };
        let detail = format!(
            "{} → {}: {} services, concurrency {}, max failures {}, {}",
            c.plan.from,
            c.plan.template.targets_text(),
            c.services.len(),
            c.plan.concurrency,
            c.plan.max_failures,
            c.plan.order.as_str()
        );
        let c = self
            .record_campaign(c, actor, "campaign_created", reason, detail)
            .await?;
        self.wake.notify_one();
        Ok(c)
    }

    /// Stops launching; in-flight migrations stop at the end of their
    /// current step.
    pub async fn pause_campaign(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Campaign, PolicyError> {
        let why = format!("paused by {actor}: {reason}");
        let detail = format!("campaign {id} paused: stops after this step");
        self.steer(
            id,
            actor,
            reason,
            ("campaign_paused", reason.to_owned()),
            |c| campaign::pause(c, why, now_ms()),
            |m| {
                let holdable = matches!(
                    m.stage,
                    Stage::Validate | Stage::DoubleDeploy | Stage::Shift { .. }
                );
                (holdable && !m.hold).then(|| {
                    let mut held = m.clone();
                    held.hold = true;
                    Transition::plain("migration_hold", held, &detail)
                })
            },
        )
        .await
    }

    /// Launches again, and lets the migrations it held go on.
    pub async fn resume_campaign(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Campaign, PolicyError> {
        let detail = format!("campaign {id} resumed");
        self.steer(
            id,
            actor,
            reason,
            ("campaign_resumed", reason.to_owned()),
            |c| campaign::resume(c, now_ms()),
            |m| {
                if !m.hold {
                    return None;
                }
                Some(match migration::resume(m, reason, now_ms()) {
                    Ok(mut t) => {
                        t.to.hold = false;
                        t
                    }
                    Err(_) => {
                        let mut free = m.clone();
                        free.hold = false;
                        Transition::plain("migration_released", free, &detail)
                    }
                })
            },
        )
        .await
    }

    /// Launches nothing more and rolls back the migrations in flight (on
    /// the following ticks).
    pub async fn abort_campaign(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Campaign, PolicyError> {
        let why = format!("aborted by {actor}: {reason}");
        self.steer(
            id,
            actor,
            reason,
            ("campaign_aborting", reason.to_owned()),
            |c| campaign::abort(c, why, now_ms()),
            |_| None,
        )
        .await
    }

    /// Queues skipped and rolled-back services again (those named, or
    /// all).
    pub async fn retry_campaign(
        &self,
        id: &str,
        services: &[String],
        actor: &str,
        reason: &str,
    ) -> Result<Campaign, PolicyError> {
        let detail = if services.is_empty() {
            "every skipped and rolled-back service".to_owned()
        } else {
            services.join(", ")
        };
        self.steer(
            id,
            actor,
            reason,
            ("campaign_retried", detail),
            |c| campaign::retry(c, services, now_ms()),
            |_| None,
        )
        .await
    }

    /// A request about campaign `id`: `decide` makes its new record, which
    /// is persisted with `audit` (action, detail), then each of its
    /// in-flight migrations gets the transition `each` names, if any.
    async fn steer(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        audit: (&'static str, String),
        decide: impl FnOnce(&Campaign) -> Result<Campaign, PolicyError>,
        mut each: impl FnMut(&Migration) -> Option<Transition>,
    ) -> Result<Campaign, PolicyError> {
        require_reason(reason)?;
        let _writer = self.writer.lock().await;
        let c = self.get_campaign(id)?;
        let to = decide(&c)?;
        let (action, detail) = audit;
        let to = self
            .record_campaign(to, actor, action, reason, detail)
            .await?;
        let in_flight = in_flight(&to, &self.lock());
        for m in in_flight {
            if let Some(t) = each(&m) {
                self.apply(t, actor).await?;
            }
        }
        self.wake.notify_one();
        Ok(to)
    }

    /// Persists a campaign record with its audit entry, then holds it.
    /// Called holding `writer`.
    async fn record_campaign(
        &self,
        mut to: Campaign,
        actor: &str,
        action: &'static str,
        reason: &str,
        detail: String,
    ) -> Result<Campaign, PolicyError> {
        to.updated_at_ms = now_ms();
        let change = Change {
            campaign: Some((to.id.clone(), encode_campaign(&to)?)),
            ..Change::new(
                campaign_subject(&to.id)?,
                actor,
                action,
                reason,
                format!("{}: {detail}", to.id),
            )
        };
        self.policy.transact(change).await?;
        tracing::info!(id = %to.id, state = to.state.as_str(), action, %detail, "campaign");
        metrics::counter!("ferry_migrate_campaign_transitions_total", "action" => action)
            .increment(1);
        let mut held = self.lock_campaigns();
        held.insert(to.id.clone(), to.clone());
        self.export_campaign_gauges(&held);
        self.announce_campaign(to.clone());
        Ok(to)
    }

    fn export_campaign_gauges(&self, held: &Campaigns) {
        let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut services: BTreeMap<&'static str, u64> = BTreeMap::new();
        for c in held.values() {
            *by_state.entry(c.state.as_str()).or_default() += 1;
            if !c.state.is_terminal() {
                for s in &c.services {
                    *services.entry(s.state.as_str()).or_default() += 1;
                }
            }
        }
        for state in [
            CampaignState::Running,
            CampaignState::Paused,
            CampaignState::Halting,
            CampaignState::Aborting,
            CampaignState::Done,
            CampaignState::Halted,
            CampaignState::Aborted,
        ] {
            let n = by_state.get(state.as_str()).copied().unwrap_or(0);
            metrics::gauge!("ferry_migrate_campaigns", "state" => state.as_str()).set(n as f64);
        }
        for state in ["queued", "in_flight", "done", "rolled_back", "skipped"] {
            let n = services.get(state).copied().unwrap_or(0);
            metrics::gauge!("ferry_migrate_campaign_services", "state" => state).set(n as f64);
        }
    }

    /// Advances every campaign that has not ended (called by `tick`,
    /// holding `writer`).
    pub(super) async fn tick_campaigns(&self, catalog: &CatalogSnapshot, now: i64) {
        let active: Vec<String> = self
            .lock_campaigns()
            .values()
            .filter(|c| !c.state.is_terminal())
            .map(|c| c.id.clone())
            .collect();
        for id in active {
            for _ in 0..STEPS_PER_TICK {
                let Some(c) = self.lock_campaigns().get(&id).cloned() else {
                    break;
                };
                let step = {
                    let map = self.lock();
                    let view = View {
                        migrations: &map,
                        policy: &self.policy,
                        catalog,
                    };
                    campaign::next(&c, &view, now)
                };
                let Some(step) = step else {
                    break;
                };
                if let Err(e) = self.take_step(&c, step, now).await {
                    tracing::error!(id = %c.id, error = %e, "campaign step not persisted; retrying");
                    metrics::counter!("ferry_migrate_store_errors_total").increment(1);
                    break;
                }
            }
        }
    }

    async fn take_step(&self, c: &Campaign, step: Step, now: i64) -> Result<(), PolicyError> {
        let actor = c.owner();
        match step {
            Step::Record { to, action, detail } => {
                let reason = if to.reason.is_empty() {
                    to.purpose.clone()
                } else {
                    to.reason.clone()
                };
                self.record_campaign(*to, &actor, action, &reason, detail)
                    .await?;
            }
            Step::Abort { migration } => {
                let Ok(m) = self.get(&migration) else {
                    return Ok(());
                };
                let t = migration::abort(&m, &actor, &c.reason, now)?;
                self.apply(t, &actor).await?;
            }
            Step::Launch { index, plan } => {
                let service = plan.service.clone();
                let prepared = self.prepare(&self.lock(), *plan, &actor, &c.purpose);
                let launched = match prepared {
                    Ok((m, detail)) => self.launch(c, index, m, &detail, now).await,
                    Err(e) => Err(e),
                };
                match launched {
                    Ok(()) => {}
                    Err(e @ PolicyError::Store(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(campaign = %c.id, %service, error = %e, "service skipped");
                        if let Step::Record { to, action, detail } =
                            campaign::skip(c, index, e.to_string(), now)
                        {
                            self.record_campaign(*to, &actor, action, &c.purpose, detail)
                                .await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes a campaign's new migration and the campaign's record of it
    /// in one transaction: a service is never launched twice.
    async fn launch(
        &self,
        c: &Campaign,
        index: usize,
        m: Migration,
        detail: &str,
        now: i64,
    ) -> Result<(), PolicyError> {
        let actor = c.owner();
        let to = campaign::launched(c, index, &m.id, now);
        let change = Change {
            acting_owner: Some(actor.clone()),
            migration: Some((m.id.clone(), encode(&m)?)),
            campaign: Some((to.id.clone(), encode_campaign(&to)?)),
            ..Change::new(
                m.plan.service.clone(),
                &actor,
                "migration_created",
                &c.purpose,
                format!("{} (campaign {}): {detail}", m.id, c.id),
            )
        };
        self.policy.transact(change).await?;
        tracing::info!(campaign = %c.id, id = %m.id, service = %m.plan.service, "campaign launched a migration");
        metrics::counter!("ferry_migrate_transitions_total", "action" => "migration_created")
            .increment(1);
        let mut map = self.lock();
        map.insert(m.id.clone(), m.clone());
        self.export_gauges(&map);
        self.announce(m);
        drop(map);
        let mut held = self.lock_campaigns();
        held.insert(to.id.clone(), to.clone());
        self.export_campaign_gauges(&held);
        self.announce_campaign(to);
        Ok(())
    }
}

/// The migrations a campaign has in flight.
fn in_flight(c: &Campaign, map: &Migrations) -> Vec<Migration> {
    c.services
        .iter()
        .filter_map(|s| match &s.state {
            ServiceState::InFlight { migration } => map.get(migration).cloned(),
            _ => None,
        })
        .collect()
}
