//! The migration engine: runs every migration's stage machine on a tick,
//! under a concurrency limit, one migration per service.
//!
//! Every transition goes through [`Policy::transact`]: the migration's
//! record, its weights or pin and the audit entry are written in one
//! transaction before anything takes effect. On start the engine loads the
//! records and resumes each migration where it was.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_discovery::{Catalog, CatalogSnapshot, ClusterName, Service, ServiceName, Weights};
use ferry_xds::lrs::{Load, LoadReports};
use ferry_xds::status::ClientRegistry;
use ferry_xds::{ResourceType, Snapshot, SnapshotCache};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::campaign::Campaign;
use crate::deploy::{DeployConfig, Deployer};
use crate::fleet::{Fleet, local_acks};
use crate::migration::{
    self, Acks, GateOutcome, Latency, Migration, Next, Plan, Stage, StageName, StepPhase,
    Transition, World,
};
use crate::migration::{DeployProgress, DeployStep};
use crate::policy::{Change, Policy, PolicyError, now_ms};
use crate::prometheus::{Prometheus, render};
use crate::returning::Returning;

mod campaigns;
mod deploys;
mod operations;
mod proxies;
mod records;
#[cfg(test)]
mod tests;
mod world;

use self::records::Migrations;
use self::world::{LatencyReading, LiveWorld};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Migrations that may be in flight at once; more wait in VALIDATE.
    pub concurrency: usize,
    /// How often every migration is looked at.
    pub tick: Duration,
    /// This control plane's name in the store (its proxies are recorded
    /// under it).
    pub node: String,
    /// After a restart, how long an acknowledgement also waits for the
    /// proxies that were connected before it.
    pub restart_grace: Duration,
    /// The deploy hook of migrations with `--deploy hook`.
    pub deploy: DeployConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            concurrency: 10,
            tick: Duration::from_millis(100),
            node: "local".into(),
            restart_grace: Duration::from_secs(30),
            deploy: DeployConfig::default(),
        }
    }
}

/// Every transition's audit action (the `action` label of
/// `ferry_migrate_transitions_total`).
const TRANSITIONS: [&str; 14] = [
    "migration_created",
    "migration_pin",
    "migration_shift",
    "migration_acked",
    "migration_cleanup_started",
    "migration_cleanup",
    "migration_done",
    "migration_paused",
    "migration_resumed",
    "migration_rollback",
    "migration_rolled_back",
    "migration_aborted",
    "migration_failed",
    "migration_source_deleted",
];

/// How often the connected proxies are looked at (and recorded on change).
const PROXIES_EVERY: Duration = Duration::from_millis(500);

/// The migration engine.
#[derive(Debug)]
pub struct Engine {
    policy: Arc<Policy>,
    catalog: Arc<Catalog>,
    cache: Arc<SnapshotCache>,
    clients: Arc<ClientRegistry>,
    loads: Arc<LoadReports>,
    fleet: Arc<Fleet>,
    config: EngineConfig,
    /// Serializes what changes migrations and campaigns (the tick, and
    /// people's requests): each is decided on records no other writer
    /// moves meanwhile. Writers queue on it without holding a runtime
    /// worker; readers never take it.
    writer: tokio::sync::Mutex<()>,
    /// The records, for readers and writers alike; never held across
    /// store I/O.
    migrations: Mutex<Migrations>,
    /// Campaigns; locked after `migrations` when both are.
    campaigns: Mutex<BTreeMap<String, Campaign>>,
    /// Every change to a campaign, numbered like `updates`.
    campaign_updates: broadcast::Sender<(u64, Campaign)>,
    /// Every change, numbered in the order it was made (under the lock).
    updates: broadcast::Sender<(u64, Migration)>,
    sequence: std::sync::atomic::AtomicU64,
    wake: Arc<Notify>,
    /// Whether migrations run here: always with the embedded store; with
    /// etcd, only while this control plane is the elected leader.
    leading: AtomicBool,
    prometheus: Prometheus,
    latencies: Mutex<BTreeMap<String, LatencyReading>>,
    /// Proxies awaited after a restart; when they were last looked at.
    returning: Mutex<(Returning, Option<Instant>)>,
    deployer: Deployer,
    /// Deploy work by migration and step (in memory: after a restart, work
    /// that is asked for again runs again).
    deploys: Arc<Mutex<Deploys>>,
    /// When a source deletion last failed, by migration.
    deletion_backoff: Mutex<BTreeMap<String, Instant>>,
}

type Deploys = BTreeMap<(String, DeployStep), DeployProgress>;

impl Engine {
    /// Loads the persisted migrations; those in flight resume on [`run`](Self::run).
    pub async fn load(
        policy: Arc<Policy>,
        catalog: Arc<Catalog>,
        cache: Arc<SnapshotCache>,
        clients: Arc<ClientRegistry>,
        loads: Arc<LoadReports>,
        fleet: Arc<Fleet>,
        config: EngineConfig,
    ) -> Result<Arc<Self>, PolicyError> {
        let (migrations, campaigns) = stored(&policy).await?;
        let saved = policy.saved_proxies(&config.node).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the proxies connected before this start; waiting for none");
            BTreeSet::new()
        });
        if !saved.is_empty() {
            tracing::info!(
                proxies = saved.len(),
                grace = ?config.restart_grace,
                "steps are acknowledged once the proxies connected before this start are back, or after the grace period"
            );
        }
        metrics::gauge!("ferry_migrate_returning_proxies").set(saved.len() as f64);
        // Every transition's counter exists from the start (at 0), so an
        // alert on its increase sees the first one.
        for action in TRANSITIONS {
            metrics::counter!("ferry_migrate_transitions_total", "action" => action).increment(0);
        }
        Self::register_campaign_metrics();
        let returning = Returning::new(saved, Instant::now(), config.restart_grace);
        let (updates, _) = broadcast::channel(1024);
        let config_deploy = config.deploy.clone();
        let engine = Arc::new(Self {
            policy,
            catalog,
            cache,
            clients,
            loads,
            fleet,
            config,
            writer: tokio::sync::Mutex::new(()),
            migrations: Mutex::new(migrations),
            campaigns: Mutex::new(campaigns),
            campaign_updates: broadcast::channel(256).0,
            updates,
            sequence: std::sync::atomic::AtomicU64::new(0),
            wake: Arc::new(Notify::new()),
            leading: AtomicBool::new(true),
            prometheus: Prometheus::default(),
            latencies: Mutex::new(BTreeMap::new()),
            returning: Mutex::new((returning, None)),
            deployer: Deployer::new(config_deploy),
            deploys: Arc::new(Mutex::new(BTreeMap::new())),
            deletion_backoff: Mutex::new(BTreeMap::new()),
        });
        engine.export_gauges(&engine.lock());
        Ok(engine)
    }

    /// Starts or stops running migrations here (leadership).
    pub fn set_leading(&self, leading: bool) {
        let was = self.leading.swap(leading, Ordering::SeqCst);
        if was != leading {
            tracing::info!(
                leading,
                "migration engine {}",
                if leading {
                    "runs"
                } else {
                    "stopped: not the leader"
                }
            );
            self.wake.notify_one();
        }
    }

    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// Replaces the migrations with the stored ones (a follower following
    /// the leader, or a new leader taking over).
    pub async fn reload(&self) -> Result<(), PolicyError> {
        let _writer = self.writer.lock().await;
        let (migrations, campaigns) = stored(&self.policy).await?;
        let mut map = self.lock();
        for (id, m) in migrations.iter() {
            if map.get(id) != Some(m) {
                self.announce(m.clone());
            }
        }
        *map = migrations;
        self.export_gauges(&map);
        drop(map);
        let mut held = self.lock_campaigns();
        for (id, c) in &campaigns {
            if held.get(id) != Some(c) {
                self.announce_campaign(c.clone());
            }
        }
        *held = campaigns;
        Ok(())
    }

    /// The migrations, locked for a moment: no holder waits on anything.
    fn lock(&self) -> std::sync::MutexGuard<'_, Migrations> {
        self.migrations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every change to any migration from now on, each with its sequence
    /// number.
    pub fn updates(&self) -> broadcast::Receiver<(u64, Migration)> {
        self.updates.subscribe()
    }

    /// A migration with the sequence number of the last change made before
    /// it was read: updates numbered up to it are already in it.
    pub fn get_numbered(&self, id: &str) -> Result<(u64, Migration), PolicyError> {
        let map = self.lock();
        let m = map.get(id).cloned().ok_or_else(|| not_found(id))?;
        Ok((self.sequence.load(Ordering::SeqCst), m))
    }

    /// Numbers and sends one change (called with the migrations locked).
    fn announce(&self, m: Migration) {
        let n = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.updates.send((n, m));
    }

    pub fn get(&self, id: &str) -> Result<Migration, PolicyError> {
        self.lock().get(id).cloned().ok_or_else(|| not_found(id))
    }

    /// Migrations (of one service, if given), oldest first.
    pub fn list(&self, service: Option<&str>, active_only: bool) -> Vec<Migration> {
        let map = self.lock();
        let candidates: Box<dyn Iterator<Item = &Migration>> = if active_only {
            Box::new(map.active())
        } else {
            Box::new(map.values())
        };
        let mut out: Vec<Migration> = candidates
            .filter(|m| service.is_none_or(|s| m.plan.service.to_string() == s))
            .cloned()
            .collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        out
    }

    /// Those not ended, then up to `ended` of those that ended last: what
    /// status pages show, at the cost of what is active.
    pub fn recent(&self, ended: usize) -> Vec<Migration> {
        self.lock().recent(ended)
    }

    /// Persists a transition, then makes it the migration's state. One
    /// that sets weights or the pin acts as the migration's pin owner (and
    /// is refused if someone else holds the service); one that only records
    /// the migration's state does not need to. Called holding `writer`.
    async fn apply(&self, t: Transition, actor: &str) -> Result<Migration, PolicyError> {
        let mut to = t.to;
        to.updated_at_ms = now_ms();
        let reason = if to.reason.is_empty() {
            to.purpose.clone()
        } else {
            to.reason.clone()
        };
        let acting = t.weights.is_some() || t.pin.is_some();
        let change = Change {
            weights: t.weights.map(Some),
            acting_owner: acting.then(|| to.owner()),
            pin: t.pin,
            migration: Some((to.id.clone(), encode(&to)?)),
            ..Change::new(
                to.plan.service.clone(),
                actor,
                t.action,
                reason,
                format!("{}: {}", to.id, t.detail),
            )
        };
        let sets_weights = change.weights.is_some();
        let version = self.policy.transact(change).await?;
        if sets_weights {
            to.applied_version = version;
        }
        tracing::info!(
            id = %to.id, service = %to.plan.service, stage = to.stage.as_str(),
            phase = to.stage.phase_str(), step = to.step_reached() + 1, action = t.action,
            detail = %t.detail, "migration transition"
        );
        metrics::counter!("ferry_migrate_transitions_total", "action" => t.action).increment(1);
        if let Some(g) = to.gates.last() {
            metrics::counter!("ferry_migrate_gate_evaluations_total", "outcome" => g.outcome.as_str())
                .increment(u64::from(g.outcome != GateOutcome::NotEnoughData));
        }
        let mut map = self.lock();
        map.insert(to.id.clone(), to.clone());
        self.export_gauges(&map);
        self.announce(to.clone());
        Ok(to)
    }

    fn export_gauges(&self, map: &Migrations) {
        for stage in StageName::ALL {
            metrics::gauge!("ferry_migrate_migrations", "stage" => stage.as_str())
                .set(map.count(stage) as f64);
        }
    }

    /// Advances every migration once (only while leading).
    pub async fn tick(&self) {
        let returning = self.observe_proxies().await;
        if !self.is_leading() {
            return;
        }
        let catalog = self.catalog.current();
        // Before the first catalog (just after a start) every service
        // looks gone: judge nothing yet.
        if !catalog.is_loaded() {
            return;
        }
        let _writer = self.writer.lock().await;
        let now = now_ms();
        // Decided against one view of the world, which is gone before
        // anything is written.
        let (decisions, asked) = {
            let snapshot = self.cache.current();
            let latencies = self
                .latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let deploys = self
                .deploys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let world = LiveWorld {
                deploys: &deploys,
                asked: Default::default(),
                latencies: &latencies,
                catalog: &catalog,
                snapshot: &snapshot,
                clients: &self.clients,
                loads: &self.loads,
                policy: &self.policy,
                fleet: &self.fleet,
                returning,
            };
            let decisions = self.decide(&world, now);
            (decisions, world.asked.take())
        };
        self.act(decisions, now).await;
        self.start_deploys(asked);
        self.tick_deletions(now).await;
        self.tick_campaigns(&catalog, now).await;
    }

    /// What the stage machine decides for each active migration, against
    /// `world` at `now` (within the concurrency limit, oldest first).
    fn decide(&self, world: &dyn World, now: i64) -> Vec<(Migration, Next)> {
        let map = self.lock();
        let active = map.active().filter(|m| m.stage.is_active()).count();
        let mut slots = self.config.concurrency.saturating_sub(active);
        let mut order: Vec<&Migration> = map
            .active()
            .filter(|m| !matches!(m.stage, Stage::Paused { .. }))
            .collect();
        order.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        let mut decisions = Vec::new();
        for m in order {
            if m.stage == Stage::Validate {
                if slots == 0 {
                    continue;
                }
                slots -= 1;
            }
            match migration::next(m, world, now) {
                Next::Wait => {}
                next => decisions.push((m.clone(), next)),
            }
        }
        decisions
    }

    /// Persists and makes effective what [`decide`](Self::decide) decided.
    async fn act(&self, decisions: Vec<(Migration, Next)>, now: i64) {
        for (m, next) in decisions {
            match next {
                Next::Wait => {}
                Next::Observe(seen) => {
                    let mut map = self.lock();
                    self.announce((*seen).clone());
                    map.insert(m.id.clone(), *seen);
                }
                Next::Transition(t) => {
                    if t.action == "migration_acked" {
                        // How long proxies took to hold the step's weights.
                        let waited = (now - m.phase_started_ms).max(0) as f64 / 1000.0;
                        metrics::histogram!("ferry_migrate_ack_wait_seconds").record(waited);
                    }
                    let actor = m.owner();
                    match self.apply(*t, &actor).await {
                        Ok(_) => {}
                        Err(e @ PolicyError::Pinned { .. }) => {
                            // Someone else holds the service: stop, changing nothing.
                            let mut failed = m.clone();
                            failed.stage = Stage::Failed;
                            failed.reason = format!("cannot proceed: {e}");
                            let t = Transition {
                                to: failed,
                                weights: None,
                                pin: None,
                                action: "migration_failed",
                                detail: e.to_string(),
                            };
                            if let Err(e) = self.apply(t, &actor).await {
                                tracing::error!(id = %m.id, error = %e, "cannot record a failed migration");
                            }
                        }
                        Err(e) => {
                            tracing::error!(id = %m.id, error = %e, "migration transition not persisted; retrying");
                            metrics::counter!("ferry_migrate_store_errors_total").increment(1);
                        }
                    }
                }
            }
        }
    }

    /// One pass over migrations and campaigns against `world` at `now`,
    /// as `tick` does with the live world and clock: for tests with a
    /// world and a clock of their own.
    #[cfg(test)]
    pub(crate) async fn tick_at(&self, world: &dyn World, now: i64) {
        let catalog = self.catalog.current();
        let _writer = self.writer.lock().await;
        let decisions = self.decide(world, now);
        self.act(decisions, now).await;
        self.tick_campaigns(&catalog, now).await;
    }

    /// Runs the engine until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        tracing::info!(
            concurrency = self.config.concurrency,
            "migration engine running"
        );
        loop {
            self.refresh_latencies().await;
            let started = Instant::now();
            self.tick().await;
            // What one pass over the active migrations and campaigns costs.
            metrics::histogram!("ferry_migrate_tick_seconds")
                .record(started.elapsed().as_secs_f64());
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.config.tick) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

fn require_reason(reason: &str) -> Result<(), PolicyError> {
    crate::policy::check_text("reason", reason, false)?;
    if reason.trim().is_empty() {
        return Err(PolicyError::InvalidArgument {
            field: "reason".into(),
            reason: "a reason is required; it goes into the audit log".into(),
        });
    }
    Ok(())
}

fn not_found(id: &str) -> PolicyError {
    PolicyError::NotFound(format!("no migration {id:?}"))
}

/// The stored migrations and campaigns, ready to resume.
async fn stored(policy: &Policy) -> Result<(Migrations, Campaigns), PolicyError> {
    let mut migrations = BTreeMap::new();
    let loaded_version = policy.version();
    let (migration_records, campaign_records) = policy.stored_records().await?;
    for (id, json) in migration_records {
        let mut m: Migration =
            serde_json::from_str(&json).map_err(|e| crate::StoreError::Corrupt {
                key: format!("migrations/{id}"),
                reason: e.to_string(),
            })?;
        // Whatever a migration awaits was persisted at or before the
        // loaded version.
        m.applied_version = loaded_version;
        if !m.stage.is_terminal() {
            tracing::info!(
                id = %m.id, service = %m.plan.service, stage = m.stage.as_str(),
                phase = m.stage.phase_str(), step = m.step_reached() + 1, "migration loaded"
            );
        }
        migrations.insert(id, m);
    }
    let mut campaigns = BTreeMap::new();
    for (id, json) in campaign_records {
        let c: Campaign = serde_json::from_str(&json).map_err(|e| crate::StoreError::Corrupt {
            key: format!("campaigns/{id}"),
            reason: e.to_string(),
        })?;
        if !c.state.is_terminal() {
            let counts = c.counts();
            tracing::info!(
                id = %c.id, state = c.state.as_str(), done = counts.done,
                in_flight = counts.in_flight, queued = counts.queued, "campaign loaded"
            );
        }
        campaigns.insert(id, c);
    }
    Ok((Migrations::new(migrations), campaigns))
}

type Campaigns = BTreeMap<String, Campaign>;

fn encode(m: &Migration) -> Result<String, PolicyError> {
    serde_json::to_string(m).map_err(|e| {
        PolicyError::Store(crate::StoreError::Db(format!(
            "cannot encode migration {}: {e}",
            m.id
        )))
    })
}
