//! Traffic policy: weights and pins set through the API.
//!
//! Every change is validated against the catalog, checked against pins
//! and the caller's expected version, written to the store (with its audit
//! entry) and only then applied and published. A rejected change leaves
//! weights, pins, version and served config exactly as they were.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_discovery::untrusted::Escaped;
use ferry_discovery::{Catalog, ClusterName, ServiceName, TOTAL_WEIGHT, Weights};
use ferry_xds::translate::{PolicyOverrides, WeightOverrides};
use tokio::sync::{broadcast, watch};

use crate::store::{AuditRecord, Backend, Commit, Loaded, StoreError, StoredPin};

/// Why a policy change was refused. Each names the field or rule.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    /// The request is well formed but the system is not in a state to
    /// accept it (e.g. a migration already runs on the service).
    #[error("{0}")]
    Precondition(String),
    #[error("service {service} is pinned by {owner:?} ({reason}); only that owner may change it")]
    Pinned {
        service: String,
        owner: String,
        reason: String,
    },
    #[error("policy version is {actual}, not the expected {expected}: re-read and retry")]
    VersionMismatch { expected: u64, actual: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The longest reason or owner a client may send, in bytes: enough for
/// any explanation, and small enough that a page of the audit log stays
/// small.
pub const MAX_TEXT_BYTES: usize = 1024;

/// Refuses a client's text longer than [`MAX_TEXT_BYTES`]. An identifier
/// (an owner) may not hold control characters either: it is matched and
/// shown, never wrapped.
pub fn check_text(field: &str, value: &str, identifier: bool) -> Result<(), PolicyError> {
    if value.len() > MAX_TEXT_BYTES {
        return Err(invalid(
            field,
            format!(
                "{} bytes is longer than the {MAX_TEXT_BYTES} allowed",
                value.len()
            ),
        ));
    }
    if identifier && value.chars().any(char::is_control) {
        return Err(invalid(field, "may not contain control characters"));
    }
    Ok(())
}

/// Where a service's weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsSource {
    Policy,
    Declared,
    ReadyEndpoints,
}

impl WeightsSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Declared => "declared",
            Self::ReadyEndpoints => "ready_endpoints",
        }
    }
}

/// A pin: the service's workload is frozen for its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub service: ServiceName,
    pub owner: String,
    pub reason: String,
    pub pinned_at_ms: i64,
    pub expires_at_ms: i64,
}

/// One change to the policy, persisted as one transaction.
#[derive(Debug, Clone)]
pub struct Change {
    pub service: ServiceName,
    pub actor: String,
    pub action: String,
    pub reason: String,
    pub detail: String,
    /// `Some(Some(w))` sets weights, `Some(None)` clears them.
    pub weights: Option<Option<Weights>>,
    /// `Some(Some(p))` sets the pin, `Some(None)` releases it.
    pub pin: Option<Option<StoredPin>>,
    /// The pin owner this change acts as: refused when another owner pins
    /// the service.
    pub acting_owner: Option<String>,
    /// `(id, JSON)` of the acting migration's record, written with the change.
    pub migration: Option<(String, String)>,
    /// `(id, JSON)` of a campaign's record, written with the change.
    pub campaign: Option<(String, String)>,
}

impl Change {
    /// A change that, until fields are set, only writes its audit entry.
    pub fn new(
        service: ServiceName,
        actor: impl Into<String>,
        action: impl Into<String>,
        reason: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            service,
            actor: actor.into(),
            action: action.into(),
            reason: reason.into(),
            detail: detail.into(),
            weights: None,
            pin: None,
            acting_owner: None,
            migration: None,
            campaign: None,
        }
    }
}

/// Stored records by id (JSON).
pub type Records = BTreeMap<String, String>;

/// A weights change request, as parsed from the API.
#[derive(Debug, Clone, Default)]
pub struct WeightsChange {
    pub service: String,
    /// `(cluster, basis points)`; empty clears the policy weights.
    pub weights: Vec<(String, u32)>,
    pub expected_version: u64,
    pub reason: String,
    pub owner: String,
}

/// One accepted weights change: the policy version it made and the
/// weights the service follows from that version on.
#[derive(Debug, Clone)]
pub struct Committed {
    pub service: ServiceName,
    pub version: u64,
    pub weights: Weights,
    pub source: WeightsSource,
}

/// The policy at one version. Replaced whole on every change, so readers
/// never wait on a writer (whose store write may take a network round trip).
#[derive(Debug, Clone, Default)]
struct State {
    version: u64,
    weights: WeightOverrides,
    pins: BTreeMap<ServiceName, StoredPin>,
}

/// The traffic policy and every rule about changing it.
#[derive(Debug)]
pub struct Policy {
    store: Box<dyn Backend>,
    /// Serializes writers: a change is validated against, and applied on
    /// top of, the state no other writer can move meanwhile. Writers queue
    /// on it without holding a runtime worker; readers never take it.
    writer: tokio::sync::Mutex<()>,
    state: RwLock<Arc<State>>,
    catalog: Arc<Catalog>,
    overrides: watch::Sender<Arc<PolicyOverrides>>,
    events: broadcast::Sender<AuditRecord>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn format_weights(w: &Weights) -> String {
    w.iter()
        .map(|(c, bp)| format!("{c}={}", bp.basis_points()))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Policy {
    /// Loads the persisted policy. Call before serving xDS so a restart
    /// never serves default weights.
    pub async fn load(store: Box<dyn Backend>, catalog: Arc<Catalog>) -> Result<Self, PolicyError> {
        let loaded = store.load().await?;
        let (weights, pins) = decode(&loaded)?;
        tracing::info!(
            version = loaded.version,
            services_with_weights = weights.len(),
            pins = pins.len(),
            "traffic policy loaded"
        );
        metrics::gauge!("ferry_migrate_policy_version").set(loaded.version as f64);
        let (overrides, _) = watch::channel(Arc::new(PolicyOverrides {
            version: loaded.version,
            weights: weights.clone(),
        }));
        let (events, _) = broadcast::channel(1024);
        Ok(Self {
            store,
            writer: tokio::sync::Mutex::new(()),
            state: RwLock::new(Arc::new(State {
                version: loaded.version,
                weights,
                pins,
            })),
            catalog,
            overrides,
            events,
        })
    }

    /// Reloads the policy from the store when it holds a newer version
    /// (another control plane wrote it); returns whether anything changed.
    pub async fn reload(&self) -> Result<bool, PolicyError> {
        let _writer = self.writer.lock().await;
        let current = self.state();
        let loaded = self.store.load().await?;
        if loaded.version == current.version {
            return Ok(false);
        }
        let (weights, pins) = decode(&loaded)?;
        tracing::info!(
            from = current.version,
            to = loaded.version,
            "traffic policy followed the store"
        );
        self.publish(State {
            version: loaded.version,
            weights,
            pins,
        });
        Ok(true)
    }

    /// The policy now.
    fn state(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes `next` the policy and hands its weights to translation.
    fn publish(&self, next: State) {
        metrics::gauge!("ferry_migrate_policy_version").set(next.version as f64);
        // The weights the policy sets, per service and cluster (what
        // dashboards draw over time).
        let previous = self.state();
        for (service, weights) in &next.weights {
            if previous.weights.get(service) == Some(weights) {
                continue;
            }
            for (cluster, w) in weights.iter() {
                metrics::gauge!(
                    "ferry_migrate_weight_basis_points",
                    "service" => service.to_string(),
                    "cluster" => cluster.to_string()
                )
                .set(f64::from(w.basis_points()));
            }
        }
        let overrides = Arc::new(PolicyOverrides {
            version: next.version,
            weights: next.weights.clone(),
        });
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        self.overrides.send_replace(overrides);
    }

    /// The weight overrides the xDS translation applies.
    pub fn overrides(&self) -> watch::Receiver<Arc<PolicyOverrides>> {
        self.overrides.subscribe()
    }

    /// Every accepted change from now on.
    pub fn events(&self) -> broadcast::Receiver<AuditRecord> {
        self.events.subscribe()
    }

    pub fn version(&self) -> u64 {
        self.state().version
    }

    /// The weights `service` follows now, their source, and the version.
    pub fn weights(
        &self,
        service: &str,
    ) -> Result<(ServiceName, Weights, WeightsSource, u64), PolicyError> {
        let name = parse_service(service)?;
        let inner = self.state();
        let catalog = self.catalog.current();
        let svc = catalog.services.get(&name).ok_or_else(|| {
            PolicyError::NotFound(format!("service {name} is not in the catalog"))
        })?;
        if let Some(w) = inner.weights.get(&name) {
            return Ok((name, w.clone(), WeightsSource::Policy, inner.version));
        }
        let source = if svc.weights.is_some() {
            WeightsSource::Declared
        } else {
            WeightsSource::ReadyEndpoints
        };
        let w = svc
            .effective_weights()
            .ok_or_else(|| PolicyError::NotFound(format!("service {name} has no backends")))?;
        Ok((name, w, source, inner.version))
    }

    /// Sets (or, with no weights, clears) a service's weights; returns
    /// this change's own commit, whatever other writers do after it.
    pub async fn set_weights(
        &self,
        change: &WeightsChange,
        actor: &str,
    ) -> Result<Committed, PolicyError> {
        let name = parse_service(&change.service)?;
        check_text("reason", &change.reason, false)?;
        check_text("owner", &change.owner, true)?;
        if change.reason.trim().is_empty() {
            return Err(invalid(
                "reason",
                "a reason is required; it goes into the audit log",
            ));
        }
        let requested = parse_weights(&change.weights)?;
        let _writer = self.writer.lock().await;
        let inner = self.state();
        let catalog = self.catalog.current();
        let service = catalog.services.get(&name).ok_or_else(|| {
            PolicyError::NotFound(format!("service {name} is not in the catalog"))
        })?;
        // Indexes name the request's own entries, in its order.
        for (i, (cluster, _)) in change.weights.iter().enumerate() {
            let known = ClusterName::new(cluster).is_ok_and(|c| service.backends.contains_key(&c));
            if !known {
                let have: Vec<String> = service.backends.keys().map(|c| c.to_string()).collect();
                return Err(invalid(
                    format!("weights[{i}].cluster"),
                    format!(
                        "service {name} has no backend in cluster {cluster} (it has: {})",
                        have.join(", ")
                    ),
                ));
            }
        }
        check_pin(&inner, &name, &change.owner)?;
        check_version(&inner, change.expected_version)?;
        if requested.is_none() && !inner.weights.contains_key(&name) {
            return Err(PolicyError::NotFound(format!(
                "service {name} has no weights set through the API"
            )));
        }
        let (action, detail) = match &requested {
            Some(w) => ("set_weights", format_weights(w)),
            None => ("clear_weights", "back to the catalog's weights".to_owned()),
        };
        // What the service follows after this commit, read before another
        // writer can move it.
        let (weights, source) = match &requested {
            Some(w) => (Some(w.clone()), WeightsSource::Policy),
            None if service.weights.is_some() => {
                (service.effective_weights(), WeightsSource::Declared)
            }
            None => (service.effective_weights(), WeightsSource::ReadyEndpoints),
        };
        let weights = weights
            .ok_or_else(|| PolicyError::NotFound(format!("service {name} has no backends")))?;
        let version = self
            .commit_locked(
                &inner,
                Change {
                    weights: Some(requested),
                    ..Change::new(
                        name.clone(),
                        actor.to_owned(),
                        action.to_owned(),
                        change.reason.clone(),
                        detail,
                    )
                },
            )
            .await?;
        Ok(Committed {
            service: name,
            version,
            weights,
            source,
        })
    }

    /// Pins a service for `owner`; the owner may refresh its own pin.
    pub async fn pin(
        &self,
        service: &str,
        owner: &str,
        reason: &str,
        ttl_seconds: u64,
    ) -> Result<Pin, PolicyError> {
        let name = parse_service(service)?;
        check_text("owner", owner, true)?;
        check_text("reason", reason, false)?;
        if owner.trim().is_empty() {
            return Err(invalid("owner", "an owner is required"));
        }
        if reason.trim().is_empty() {
            return Err(invalid(
                "reason",
                "a reason is required; it goes into the audit log",
            ));
        }
        if ttl_seconds > 365 * 24 * 3600 {
            return Err(invalid("ttl_seconds", "at most one year"));
        }
        let _writer = self.writer.lock().await;
        let inner = self.state();
        if !self.catalog.current().services.contains_key(&name) {
            return Err(PolicyError::NotFound(format!(
                "service {name} is not in the catalog"
            )));
        }
        check_pin(&inner, &name, owner)?;
        let now = now_ms();
        let pin = StoredPin {
            owner: owner.to_owned(),
            reason: reason.to_owned(),
            pinned_at_ms: now,
            expires_at_ms: if ttl_seconds == 0 {
                0
            } else {
                now + ttl_seconds as i64 * 1000
            },
        };
        let detail = if ttl_seconds == 0 {
            "no expiry".to_owned()
        } else {
            format!("ttl {ttl_seconds}s")
        };
        self.commit_locked(
            &inner,
            Change {
                pin: Some(Some(pin.clone())),
                ..Change::new(
                    name.clone(),
                    owner.to_owned(),
                    "pin".to_owned(),
                    reason.to_owned(),
                    detail,
                )
            },
        )
        .await?;
        Ok(to_pin(&name, &pin))
    }

    /// Releases a pin; only its owner may.
    pub async fn unpin(
        &self,
        service: &str,
        owner: &str,
        reason: &str,
    ) -> Result<u64, PolicyError> {
        let name = parse_service(service)?;
        check_text("owner", owner, true)?;
        check_text("reason", reason, false)?;
        if owner.trim().is_empty() {
            return Err(invalid("owner", "an owner is required"));
        }
        let _writer = self.writer.lock().await;
        let inner = self.state();
        let Some(pin) = inner.pins.get(&name) else {
            return Err(PolicyError::NotFound(format!(
                "service {name} is not pinned"
            )));
        };
        if pin.owner != owner {
            return Err(PolicyError::Pinned {
                service: name.to_string(),
                owner: pin.owner.clone(),
                reason: pin.reason.clone(),
            });
        }
        self.remove_pin(&inner, &name, owner, "unpin", reason).await
    }

    /// Releases every pin whose TTL has passed; returns how many.
    pub async fn expire_pins(&self) -> Result<usize, PolicyError> {
        let _writer = self.writer.lock().await;
        let inner = self.state();
        let now = now_ms();
        let expired: Vec<ServiceName> = inner
            .pins
            .iter()
            .filter(|(_, p)| p.expires_at_ms != 0 && p.expires_at_ms <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in &expired {
            self.remove_pin(&self.state(), name, "ferry", "pin_expired", "TTL passed")
                .await?;
        }
        Ok(expired.len())
    }

    async fn remove_pin(
        &self,
        inner: &State,
        name: &ServiceName,
        actor: &str,
        action: &str,
        reason: &str,
    ) -> Result<u64, PolicyError> {
        let owner = inner
            .pins
            .get(name)
            .map(|p| p.owner.clone())
            .unwrap_or_default();
        self.commit_locked(
            inner,
            Change {
                pin: Some(None),
                ..Change::new(
                    name.clone(),
                    actor.to_owned(),
                    action.to_owned(),
                    reason.to_owned(),
                    format!("pin of {owner:?} released"),
                )
            },
        )
        .await
    }

    /// Applies one change made on behalf of a pin owner (the migration
    /// engine): weights, pin and the owner's own record, persisted in one
    /// transaction before any of it takes effect. Refused, changing
    /// nothing, when another owner holds the service's pin.
    pub async fn transact(&self, change: Change) -> Result<u64, PolicyError> {
        let _writer = self.writer.lock().await;
        let inner = self.state();
        if let Some(owner) = &change.acting_owner {
            check_pin(&inner, &change.service, owner)?;
        }
        self.commit_locked(&inner, change).await
    }

    /// Persists `change`, then applies and publishes it.
    async fn commit_locked(&self, inner: &State, change: Change) -> Result<u64, PolicyError> {
        let version = inner.version + 1;
        let commit = Commit {
            version,
            service: change.service.to_string(),
            weights: change.weights.as_ref().map(|w| {
                w.as_ref().map(|w| {
                    w.iter()
                        .map(|(c, bp)| (c.to_string(), bp.basis_points()))
                        .collect()
                })
            }),
            pin: change.pin.clone(),
            migration: change.migration,
            campaign: change.campaign,
            audit: AuditRecord {
                version,
                at_ms: now_ms(),
                actor: change.actor,
                action: change.action,
                service: change.service.to_string(),
                reason: change.reason,
                detail: change.detail,
            },
        };
        self.store.commit(&commit).await?;
        let mut next = inner.clone();
        next.version = version;
        if let Some(weights) = change.weights {
            match weights {
                Some(w) => next.weights.insert(change.service.clone(), w),
                None => next.weights.remove(&change.service),
            };
        }
        match change.pin {
            Some(Some(pin)) => {
                next.pins.insert(change.service.clone(), pin);
            }
            Some(None) => {
                next.pins.remove(&change.service);
            }
            None => {}
        }
        self.publish(next);
        self.accepted(commit.audit);
        Ok(version)
    }

    /// Stored migration and campaign records (id → JSON), for the engine
    /// to resume, read at one point in time.
    pub async fn stored_records(&self) -> Result<(Records, Records), PolicyError> {
        let loaded = self.store.load().await?;
        Ok((loaded.migrations, loaded.campaigns))
    }

    pub fn pins(&self) -> Vec<Pin> {
        self.state()
            .pins
            .iter()
            .map(|(n, p)| to_pin(n, p))
            .collect()
    }

    pub fn pin_of(&self, name: &ServiceName) -> Option<Pin> {
        self.state().pins.get(name).map(|p| to_pin(name, p))
    }

    pub async fn audit(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, PolicyError> {
        Ok(self.store.audit(service, limit).await?)
    }

    /// Records the proxies connected to control plane `node` (see
    /// [`crate::returning`]).
    pub async fn save_proxies(
        &self,
        node: &str,
        proxies: &std::collections::BTreeSet<String>,
    ) -> Result<(), PolicyError> {
        Ok(self.store.save_proxies(node, proxies).await?)
    }

    /// The proxies last recorded for control plane `node`.
    pub async fn saved_proxies(
        &self,
        node: &str,
    ) -> Result<std::collections::BTreeSet<String>, PolicyError> {
        Ok(self.store.saved_proxies(node).await?)
    }

    fn accepted(&self, record: AuditRecord) {
        metrics::counter!("ferry_migrate_policy_changes_total", "action" => record.action.clone())
            .increment(1);
        tracing::info!(
            version = record.version, actor = %Escaped(&record.actor), action = %record.action,
            service = %record.service, reason = %Escaped(&record.reason), detail = %Escaped(&record.detail),
            "policy change accepted"
        );
        let _ = self.events.send(record);
    }
}

type Decoded = (WeightOverrides, BTreeMap<ServiceName, StoredPin>);

/// Weights and pins from their stored form; a record that does not parse
/// is corruption, named by its key.
fn decode(loaded: &Loaded) -> Result<Decoded, PolicyError> {
    let corrupt = |key: &str, e: &dyn std::fmt::Display| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    };
    let mut weights = WeightOverrides::new();
    for (service, entries) in &loaded.weights {
        let name = ServiceName::parse(service).map_err(|e| corrupt(service, &e))?;
        let mut map = BTreeMap::new();
        for (cluster, bp) in entries {
            let c = ClusterName::new(cluster).map_err(|e| corrupt(service, &e))?;
            map.insert(c, *bp);
        }
        let w = Weights::new(map).map_err(|e| corrupt(service, &e))?;
        weights.insert(name, w);
    }
    let mut pins = BTreeMap::new();
    for (service, pin) in &loaded.pins {
        let name = ServiceName::parse(service).map_err(|e| corrupt(service, &e))?;
        pins.insert(name, pin.clone());
    }
    Ok((weights, pins))
}

fn to_pin(name: &ServiceName, p: &StoredPin) -> Pin {
    Pin {
        service: name.clone(),
        owner: p.owner.clone(),
        reason: p.reason.clone(),
        pinned_at_ms: p.pinned_at_ms,
        expires_at_ms: p.expires_at_ms,
    }
}

fn parse_service(service: &str) -> Result<ServiceName, PolicyError> {
    ServiceName::parse(service)
        .map_err(|e| invalid("service", format!("{e} (expected name.namespace)")))
}

/// Parses requested weights; `None` for an empty list (clear).
fn parse_weights(entries: &[(String, u32)]) -> Result<Option<Weights>, PolicyError> {
    if entries.is_empty() {
        return Ok(None);
    }
    let mut map = BTreeMap::new();
    for (i, (cluster, bp)) in entries.iter().enumerate() {
        let c = ClusterName::new(cluster)
            .map_err(|e| invalid(format!("weights[{i}].cluster"), e.to_string()))?;
        if *bp > TOTAL_WEIGHT {
            return Err(invalid(
                format!("weights[{i}].basis_points"),
                format!("{bp} is more than 10000 basis points"),
            ));
        }
        if map.insert(c, *bp).is_some() {
            return Err(invalid(
                format!("weights[{i}].cluster"),
                format!("cluster {cluster} is listed twice"),
            ));
        }
    }
    Weights::new(map)
        .map(Some)
        .map_err(|e| invalid("weights", e.to_string()))
}

fn check_pin(inner: &State, name: &ServiceName, owner: &str) -> Result<(), PolicyError> {
    match inner.pins.get(name) {
        Some(pin)
            if pin.owner != owner && (pin.expires_at_ms == 0 || pin.expires_at_ms > now_ms()) =>
        {
            Err(PolicyError::Pinned {
                service: name.to_string(),
                owner: pin.owner.clone(),
                reason: pin.reason.clone(),
            })
        }
        _ => Ok(()),
    }
}

fn check_version(inner: &State, expected: u64) -> Result<(), PolicyError> {
    if expected != 0 && expected != inner.version {
        return Err(PolicyError::VersionMismatch {
            expected,
            actual: inner.version,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
