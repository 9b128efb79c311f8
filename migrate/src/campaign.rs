//! A campaign: every service with a backend in one cluster, moved to
//! another, each by an ordinary migration (same stages, gates,
//! acknowledgements and audit), a few at a time.
//!
//! Like a migration's, a campaign's decisions are a pure function
//! ([`next`]) of its record, what the engine sees ([`Fleet`]) and the time:
//! it waits, or names one step (record an outcome, launch a service's
//! migration, abort one). The engine persists each step before it takes
//! effect, a launch in the same transaction as the migration it creates, so
//! a restart or a new leader resumes the campaign where its record says and
//! never migrates a service twice.

use ferry_discovery::{CatalogSnapshot, ClusterName, ServiceName};
use serde::{Deserialize, Serialize};

use crate::migration::{Plan, StageName};
use crate::policy::PolicyError;

/// Which services go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// Fewest endpoints in the source cluster first: small services prove
    /// the way for big ones.
    #[default]
    SmallestFirst,
    LargestFirst,
    /// By `name.namespace`.
    Name,
}

impl Order {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        match text.trim() {
            "" | "smallest-first" => Ok(Self::SmallestFirst),
            "largest-first" => Ok(Self::LargestFirst),
            "name" => Ok(Self::Name),
            other => Err(PolicyError::InvalidArgument {
                field: "order".into(),
                reason: format!(
                    "{other:?} is not an order (smallest-first, largest-first or name)"
                ),
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SmallestFirst => "smallest-first",
            Self::LargestFirst => "largest-first",
            Self::Name => "name",
        }
    }
}

/// What a campaign was asked to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignPlan {
    pub from: ClusterName,
    pub to: ClusterName,
    /// Globs on `name.namespace` (`checkout.*`, `*.shop`); empty: all.
    pub services: Vec<String>,
    /// Namespaces; empty: all.
    pub namespaces: Vec<String>,
    /// Migrations of this campaign in flight at once.
    pub concurrency: u32,
    /// Rolled-back or failed services after which no more are launched
    /// (0: never stop).
    pub max_failures: u32,
    pub order: Order,
    /// Every service's migration plan, but for its service (filled in at
    /// launch).
    pub template: Plan,
}

/// Where a campaign stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CampaignState {
    /// Launching migrations as slots free up.
    Running,
    /// Launching nothing; migrations in flight stop at their next step.
    Paused,
    /// Too many failures: launching nothing, in-flight migrations finish.
    Halting,
    /// Aborted: in-flight migrations are rolled back.
    Aborting,
    /// Every service is done, rolled back or skipped.
    Done,
    /// Stopped after `max_failures` failures.
    Halted,
    Aborted,
}

impl CampaignState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Paused => "PAUSED",
            Self::Halting => "HALTING",
            Self::Aborting => "ABORTING",
            Self::Done => "DONE",
            Self::Halted => "HALTED",
            Self::Aborted => "ABORTED",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Halted | Self::Aborted)
    }
}

/// One service's place in a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ServiceState {
    Queued,
    /// Its migration is running.
    InFlight {
        migration: String,
    },
    Done {
        migration: String,
    },
    /// Its migration rolled back (or failed): it stays on the source.
    RolledBack {
        migration: String,
        reason: String,
    },
    /// Not migrated: pinned by someone else, no healthy target, refused.
    Skipped {
        reason: String,
    },
}

impl ServiceState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::InFlight { .. } => "in_flight",
            Self::Done { .. } => "done",
            Self::RolledBack { .. } => "rolled_back",
            Self::Skipped { .. } => "skipped",
        }
    }

    pub fn migration(&self) -> Option<&str> {
        match self {
            Self::InFlight { migration }
            | Self::Done { migration }
            | Self::RolledBack { migration, .. } => Some(migration),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignService {
    pub service: ServiceName,
    /// Endpoints in the source cluster when the campaign was created.
    pub endpoints: usize,
    pub state: ServiceState,
    pub updated_at_ms: i64,
}

/// Counts of a campaign's services by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Counts {
    pub queued: usize,
    pub in_flight: usize,
    pub done: usize,
    pub rolled_back: usize,
    pub skipped: usize,
}

/// A campaign as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    pub id: String,
    pub plan: CampaignPlan,
    pub state: CampaignState,
    /// Why it was halted, aborted or paused.
    pub reason: String,
    /// Why it was started (the audit reason).
    pub purpose: String,
    pub services: Vec<CampaignService>,
    pub created_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// When it reached its final state.
    #[serde(default)]
    pub ended_at_ms: Option<i64>,
}

impl Campaign {
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for s in &self.services {
            match s.state {
                ServiceState::Queued => c.queued += 1,
                ServiceState::InFlight { .. } => c.in_flight += 1,
                ServiceState::Done { .. } => c.done += 1,
                ServiceState::RolledBack { .. } => c.rolled_back += 1,
                ServiceState::Skipped { .. } => c.skipped += 1,
            }
        }
        c
    }

    /// Whether `max_failures` rolled-back services stop the campaign.
    pub fn failed_out(&self) -> bool {
        self.plan.max_failures > 0 && self.counts().rolled_back >= self.plan.max_failures as usize
    }

    /// The pin-like owner its audit entries name.
    pub fn owner(&self) -> String {
        format!("campaign/{}", self.id)
    }

    /// The migration plan of the service at `index`.
    pub fn plan_for(&self, index: usize) -> Option<Plan> {
        let service = self.services.get(index)?.service.clone();
        Some(Plan {
            service,
            from: vec![self.plan.from.clone()],
            ..self.plan.template.clone()
        })
    }
}

/// Matches `name.namespace` against a glob (`*` any run, `?` one
/// character).
fn glob_match(pattern: &str, text: &str) -> bool {
    glob::Pattern::new(pattern).is_ok_and(|p| p.matches(text))
}

/// Checks the glob patterns of a plan; errors name the field.
pub fn check_patterns(plan: &CampaignPlan) -> Result<(), PolicyError> {
    for (i, p) in plan.services.iter().enumerate() {
        glob::Pattern::new(p).map_err(|e| PolicyError::InvalidArgument {
            field: format!("services[{i}]"),
            reason: format!("{p:?} is not a glob: {e}"),
        })?;
    }
    Ok(())
}

/// The services a new campaign takes: every service with a backend in
/// `plan.from` that the globs and namespaces select, in the plan's order.
pub fn select(plan: &CampaignPlan, catalog: &CatalogSnapshot, now: i64) -> Vec<CampaignService> {
    let mut out: Vec<CampaignService> = catalog
        .services
        .values()
        .filter_map(|s| {
            let backend = s.backends.get(&plan.from)?;
            let name = s.name.to_string();
            let by_glob =
                plan.services.is_empty() || plan.services.iter().any(|p| glob_match(p, &name));
            let by_namespace = plan.namespaces.is_empty()
                || plan.namespaces.iter().any(|n| n == s.name.namespace());
            (by_glob && by_namespace).then(|| CampaignService {
                service: s.name.clone(),
                endpoints: backend.endpoints.len(),
                state: ServiceState::Queued,
                updated_at_ms: now,
            })
        })
        .collect();
    match plan.order {
        Order::SmallestFirst => out.sort_by_key(|s| (s.endpoints, s.service.to_string())),
        Order::LargestFirst => {
            out.sort_by_key(|s| (std::cmp::Reverse(s.endpoints), s.service.to_string()))
        }
        Order::Name => out.sort_by_key(|s| s.service.to_string()),
    }
    out
}

/// What a campaign reads of the engine.
pub trait Fleet {
    /// A migration's stage and reason.
    fn migration(&self, id: &str) -> Option<(StageName, String)>;
    /// Why `service` cannot be migrated now (pinned by someone else,
    /// another migration running on it, no ready endpoint in a target),
    /// if so.
    fn obstacle(&self, service: &ServiceName, targets: &[ClusterName]) -> Option<String>;
}

/// One thing a campaign does.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A new record, nothing else (an outcome recorded, a state change).
    Record {
        to: Box<Campaign>,
        action: &'static str,
        detail: String,
    },
    /// Start the migration of service `index`; `to` records it in flight
    /// once the engine fills in the migration id.
    Launch { index: usize, plan: Box<Plan> },
    /// Roll back an in-flight migration (an aborting campaign).
    Abort { migration: String },
}

/// The campaign's next step, or `None` to wait.
pub fn next(c: &Campaign, fleet: &dyn Fleet, now: i64) -> Option<Step> {
    if c.state.is_terminal() {
        return None;
    }
    // Outcomes first: a migration that ended frees its slot.
    for (i, s) in c.services.iter().enumerate() {
        let ServiceState::InFlight { migration } = &s.state else {
            continue;
        };
        let outcome = match fleet.migration(migration) {
            Some((StageName::Done, _)) => ServiceState::Done {
                migration: migration.clone(),
            },
            Some((StageName::RolledBack | StageName::Failed, reason)) => ServiceState::RolledBack {
                migration: migration.clone(),
                reason,
            },
            Some(_) => continue,
            None => ServiceState::RolledBack {
                migration: migration.clone(),
                reason: format!("migration {migration} is gone"),
            },
        };
        let mut to = c.clone();
        let detail = format!(
            "{} {} ({migration})",
            s.service,
            match &outcome {
                ServiceState::Done { .. } => "done".to_owned(),
                ServiceState::RolledBack { reason, .. } => format!("rolled back: {reason}"),
                _ => String::new(),
            }
        );
        to.services[i].state = outcome;
        to.services[i].updated_at_ms = now;
        return Some(Step::Record {
            to: Box::new(to),
            action: "campaign_service_ended",
            detail,
        });
    }
    let counts = c.counts();
    match c.state {
        CampaignState::Running if c.failed_out() => {
            let mut to = c.clone();
            to.state = CampaignState::Halting;
            to.reason = format!(
                "{} services rolled back (--max-failures {}): launching no more",
                counts.rolled_back, c.plan.max_failures
            );
            Some(record(to, "campaign_halting", now))
        }
        CampaignState::Running => launch(c, fleet, now, counts),
        CampaignState::Aborting => c
            .services
            .iter()
            .filter_map(|s| {
                s.state
                    .migration()
                    .filter(|_| s.state.as_str() == "in_flight")
            })
            .find(|m| {
                fleet
                    .migration(m)
                    .is_some_and(|(stage, _)| !matches!(stage, StageName::RollingBack))
            })
            .map(|m| Step::Abort {
                migration: m.to_owned(),
            })
            .or_else(|| (counts.in_flight == 0).then(|| finish(c, CampaignState::Aborted, now))),
        CampaignState::Halting if counts.in_flight == 0 => {
            Some(finish(c, CampaignState::Halted, now))
        }
        _ => None,
    }
}

/// Launches the next queued service (or skips it), or ends the campaign
/// when nothing is left.
fn launch(c: &Campaign, fleet: &dyn Fleet, now: i64, counts: Counts) -> Option<Step> {
    if counts.queued == 0 {
        return (counts.in_flight == 0).then(|| finish(c, CampaignState::Done, now));
    }
    if counts.in_flight >= c.plan.concurrency.max(1) as usize {
        return None;
    }
    let (index, s) = c
        .services
        .iter()
        .enumerate()
        .find(|(_, s)| s.state == ServiceState::Queued)?;
    let targets: Vec<ClusterName> = c
        .plan
        .template
        .target_shares()
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    if let Some(reason) = fleet.obstacle(&s.service, &targets) {
        return Some(skip(c, index, reason, now));
    }
    let plan = c.plan_for(index)?;
    Some(Step::Launch {
        index,
        plan: Box::new(plan),
    })
}

/// Records service `index` skipped (its launch refused, or an obstacle).
pub fn skip(c: &Campaign, index: usize, reason: String, now: i64) -> Step {
    let mut to = c.clone();
    let service = to.services[index].service.to_string();
    to.services[index].state = ServiceState::Skipped {
        reason: reason.clone(),
    };
    to.services[index].updated_at_ms = now;
    Step::Record {
        to: Box::new(to),
        action: "campaign_service_skipped",
        detail: format!("{service} skipped: {reason}"),
    }
}

/// Records service `index` in flight as `migration`.
pub fn launched(c: &Campaign, index: usize, migration: &str, now: i64) -> Campaign {
    let mut to = c.clone();
    if let Some(s) = to.services.get_mut(index) {
        s.state = ServiceState::InFlight {
            migration: migration.to_owned(),
        };
        s.updated_at_ms = now;
    }
    to.updated_at_ms = now;
    to
}

fn record(mut to: Campaign, action: &'static str, now: i64) -> Step {
    to.updated_at_ms = now;
    let detail = to.reason.clone();
    Step::Record {
        to: Box::new(to),
        action,
        detail,
    }
}

fn finish(c: &Campaign, state: CampaignState, now: i64) -> Step {
    let mut to = c.clone();
    to.state = state;
    to.ended_at_ms = Some(now);
    let counts = c.counts();
    let failures: Vec<String> = c
        .services
        .iter()
        .filter_map(|s| match &s.state {
            ServiceState::RolledBack { reason, .. } => Some(format!("{}: {reason}", s.service)),
            _ => None,
        })
        .collect();
    let summary = format!(
        "{} done, {} rolled back, {} skipped",
        counts.done, counts.rolled_back, counts.skipped
    );
    to.reason = match state {
        CampaignState::Halted => {
            format!("{}; {summary}; failures: {}", c.reason, failures.join("; "))
        }
        CampaignState::Aborted => format!("{}; {summary}", c.reason),
        _ => summary,
    };
    let action = match state {
        CampaignState::Halted => "campaign_halted",
        CampaignState::Aborted => "campaign_aborted",
        _ => "campaign_done",
    };
    record(to, action, now)
}

/// Pauses a running campaign: it launches nothing more.
pub fn pause(c: &Campaign, why: String, now: i64) -> Result<Campaign, PolicyError> {
    match c.state {
        CampaignState::Running => {
            let mut to = c.clone();
            to.state = CampaignState::Paused;
            to.reason = why;
            to.updated_at_ms = now;
            Ok(to)
        }
        s => Err(precondition(c, s, "only a RUNNING campaign can be paused")),
    }
}

/// Resumes a paused campaign.
pub fn resume(c: &Campaign, now: i64) -> Result<Campaign, PolicyError> {
    match c.state {
        CampaignState::Paused => {
            let mut to = c.clone();
            to.state = CampaignState::Running;
            to.reason = String::new();
            to.updated_at_ms = now;
            Ok(to)
        }
        s => Err(precondition(c, s, "only a PAUSED campaign can be resumed")),
    }
}

/// Aborts a campaign: nothing more is launched and in-flight migrations
/// roll back.
pub fn abort(c: &Campaign, why: String, now: i64) -> Result<Campaign, PolicyError> {
    match c.state {
        s if s.is_terminal() => Err(precondition(c, s, "it has already ended")),
        CampaignState::Aborting => Err(precondition(c, c.state, "it is already aborting")),
        _ => {
            let mut to = c.clone();
            to.state = CampaignState::Aborting;
            to.reason = why;
            to.updated_at_ms = now;
            Ok(to)
        }
    }
}

/// Queues skipped and rolled-back services again (those named, or all),
/// and sets an ended or halting campaign running again.
pub fn retry(c: &Campaign, services: &[String], now: i64) -> Result<Campaign, PolicyError> {
    if matches!(c.state, CampaignState::Aborting | CampaignState::Aborted) {
        return Err(precondition(
            c,
            c.state,
            "an aborted campaign is not retried",
        ));
    }
    for name in services {
        if !c.services.iter().any(|s| s.service.to_string() == *name) {
            return Err(PolicyError::InvalidArgument {
                field: "services".into(),
                reason: format!("{name} is not in campaign {}", c.id),
            });
        }
    }
    let mut to = c.clone();
    let mut queued = 0;
    for s in &mut to.services {
        let named = services.is_empty() || services.contains(&s.service.to_string());
        if named
            && matches!(
                s.state,
                ServiceState::Skipped { .. } | ServiceState::RolledBack { .. }
            )
        {
            s.state = ServiceState::Queued;
            s.updated_at_ms = now;
            queued += 1;
        }
    }
    if queued == 0 {
        return Err(PolicyError::Precondition(format!(
            "campaign {} has no skipped or rolled-back service to retry{}",
            c.id,
            if services.is_empty() {
                ""
            } else {
                " among those named"
            }
        )));
    }
    if to.state != CampaignState::Paused {
        to.state = CampaignState::Running;
    }
    to.reason = String::new();
    to.ended_at_ms = None;
    to.updated_at_ms = now;
    Ok(to)
}

fn precondition(c: &Campaign, s: CampaignState, why: &str) -> PolicyError {
    PolicyError::Precondition(format!("campaign {} is {}; {why}", c.id, s.as_str()))
}

#[cfg(test)]
mod tests;
