//! The `ferry.v1.Traffic` gRPC service over [`Policy`].
//!
//! Errors map to precise codes: `INVALID_ARGUMENT` (bad input, naming the
//! field), `NOT_FOUND`, `FAILED_PRECONDITION` (pinned by another owner),
//! `ABORTED` (compare-and-set version mismatch), `INTERNAL` (store).

use std::pin::Pin as BoxPin;
use std::sync::Arc;

use ferry_discovery::Catalog;
use ferry_discovery::kubernetes::{ClusterStatuses, stale_clusters};
use ferry_proto::ferry::v1::traffic_server::{Traffic, TrafficServer};
use ferry_proto::ferry::v1::{
    AuditEntry, BackendInfo, ClearWeightsRequest, ClusterWeight, GetWeightsRequest,
    ListAuditRequest, ListAuditResponse, ListPinsRequest, ListPinsResponse, ListServicesRequest,
    ListServicesResponse, PinRecord, PinRequest, PolicyEvent, ServiceInfo, ServiceWeights,
    SetWeightsRequest, UnpinRequest, UnpinResponse, WatchPolicyRequest,
};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use ferry_discovery::{ServiceName, Weights};

use crate::policy::{Committed, Pin, Policy, PolicyError, WeightsChange, WeightsSource};
use crate::store::AuditRecord;

/// The traffic API.
#[derive(Debug, Clone)]
pub struct TrafficApi {
    policy: Arc<Policy>,
    catalog: Arc<Catalog>,
    clusters: ClusterStatuses,
    /// Ends every open `WatchPolicy` stream, so a shutdown never waits on
    /// a watcher.
    shutdown: CancellationToken,
}

impl TrafficApi {
    /// `clusters`: the Kubernetes clusters' health, for staleness.
    pub fn new(policy: Arc<Policy>, catalog: Arc<Catalog>, clusters: ClusterStatuses) -> Self {
        Self {
            policy,
            catalog,
            clusters,
            shutdown: CancellationToken::new(),
        }
    }

    /// Open watches end when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    pub fn into_service(self) -> TrafficServer<Self> {
        TrafficServer::new(self)
    }
}

impl From<PolicyError> for Status {
    fn from(e: PolicyError) -> Self {
        let message = e.to_string();
        match e {
            PolicyError::InvalidArgument { .. } => Status::invalid_argument(message),
            PolicyError::NotFound(_) => Status::not_found(message),
            PolicyError::Pinned { .. } | PolicyError::Precondition(_) => {
                Status::failed_precondition(message)
            }
            PolicyError::VersionMismatch { .. } => Status::aborted(message),
            // Another control plane leads: retry there (or later).
            PolicyError::Store(
                crate::StoreError::NotLeader { .. } | crate::StoreError::Fenced(_),
            ) => Status::unavailable(message),
            PolicyError::Store(_) => Status::internal(message),
        }
    }
}

fn pin_record(p: &Pin) -> PinRecord {
    PinRecord {
        service: p.service.to_string(),
        owner: p.owner.clone(),
        reason: p.reason.clone(),
        pinned_at_unix_ms: p.pinned_at_ms,
        expires_at_unix_ms: p.expires_at_ms,
    }
}

fn audit_entry(r: AuditRecord) -> AuditEntry {
    AuditEntry {
        policy_version: r.version,
        at_unix_ms: r.at_ms,
        actor: r.actor,
        action: r.action,
        service: r.service,
        reason: r.reason,
        detail: r.detail,
    }
}

/// The actor of a request: its `x-ferry-actor` metadata, else the owner
/// it acts as, else "anonymous"; at most 256 bytes, control characters
/// escaped (it is a label for the audit log, not an identity to match).
pub(crate) fn actor<T>(request: &Request<T>, owner: &str) -> String {
    let actor = request
        .metadata()
        .get("x-ferry-actor")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|a| !a.is_empty())
        .or_else(|| (!owner.is_empty()).then(|| owner.to_owned()))
        .unwrap_or_else(|| "anonymous".to_owned());
    let mut out = ferry_discovery::untrusted::escape(&actor).into_owned();
    let mut end = out.len().min(256);
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    out.truncate(end);
    out
}

fn service_weights(
    name: &ServiceName,
    weights: &Weights,
    source: WeightsSource,
    version: u64,
) -> ServiceWeights {
    ServiceWeights {
        service: name.to_string(),
        weights: weights
            .iter()
            .map(|(c, w)| ClusterWeight {
                cluster: c.to_string(),
                basis_points: w.basis_points(),
            })
            .collect(),
        source: source.as_str().to_owned(),
        policy_version: version,
    }
}

/// The answer to a weights change: the caller's own commit, not the
/// policy as it is by the time the answer is built.
fn committed_response(c: &Committed) -> ServiceWeights {
    service_weights(&c.service, &c.weights, c.source, c.version)
}

impl TrafficApi {
    fn weights_response(&self, service: &str) -> Result<ServiceWeights, Status> {
        let (name, weights, source, version) = self.policy.weights(service)?;
        Ok(service_weights(&name, &weights, source, version))
    }
}

type EventStream = BoxPin<Box<dyn Stream<Item = Result<PolicyEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Traffic for TrafficApi {
    async fn list_services(
        &self,
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let catalog = self.catalog.current();
        let stale = stale_clusters(&self.clusters);
        let mut services = Vec::with_capacity(catalog.services.len());
        for (name, svc) in &catalog.services {
            let (_, weights, source, _) = self.policy.weights(&name.to_string())?;
            services.push(ServiceInfo {
                service: name.to_string(),
                backends: svc
                    .backends
                    .iter()
                    .map(|(c, b)| BackendInfo {
                        cluster: c.to_string(),
                        basis_points: weights.get(c).basis_points(),
                        endpoints: b.endpoints.len() as u32,
                        ready: b.ready_endpoints() as u32,
                        stale: stale.contains(c.as_str()),
                    })
                    .collect(),
                weights_source: source.as_str().to_owned(),
                pin: self.policy.pin_of(name).as_ref().map(pin_record),
            });
        }
        Ok(Response::new(ListServicesResponse {
            services,
            policy_version: self.policy.version(),
        }))
    }

    async fn get_weights(
        &self,
        request: Request<GetWeightsRequest>,
    ) -> Result<Response<ServiceWeights>, Status> {
        Ok(Response::new(
            self.weights_response(&request.get_ref().service)?,
        ))
    }

    async fn set_weights(
        &self,
        request: Request<SetWeightsRequest>,
    ) -> Result<Response<ServiceWeights>, Status> {
        let actor = actor(&request, &request.get_ref().owner);
        let r = request.into_inner();
        let change = WeightsChange {
            service: r.service.clone(),
            weights: r
                .weights
                .into_iter()
                .map(|w| (w.cluster, w.basis_points))
                .collect(),
            expected_version: r.expected_version,
            reason: r.reason,
            owner: r.owner,
        };
        if change.weights.is_empty() {
            return Err(Status::invalid_argument(
                "weights: at least one cluster weight is required (use ClearWeights to go back to the catalog's)",
            ));
        }
        let committed = self.policy.set_weights(&change, &actor).await?;
        Ok(Response::new(committed_response(&committed)))
    }

    async fn clear_weights(
        &self,
        request: Request<ClearWeightsRequest>,
    ) -> Result<Response<ServiceWeights>, Status> {
        let actor = actor(&request, &request.get_ref().owner);
        let r = request.into_inner();
        let change = WeightsChange {
            service: r.service.clone(),
            weights: Vec::new(),
            expected_version: r.expected_version,
            reason: r.reason,
            owner: r.owner,
        };
        let committed = self.policy.set_weights(&change, &actor).await?;
        Ok(Response::new(committed_response(&committed)))
    }

    type WatchPolicyStream = EventStream;

    async fn watch_policy(
        &self,
        _: Request<WatchPolicyRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // Subscribe before reading the version so no change falls between.
        let events = self.policy.events();
        let first = PolicyEvent {
            policy_version: self.policy.version(),
            change: None,
        };
        Ok(Response::new(Box::pin(
            policy_stream(first, events).take_until(self.shutdown.clone().cancelled_owned()),
        )))
    }

    async fn pin(&self, request: Request<PinRequest>) -> Result<Response<PinRecord>, Status> {
        let r = request.into_inner();
        let pin = self
            .policy
            .pin(&r.service, &r.owner, &r.reason, r.ttl_seconds)
            .await?;
        Ok(Response::new(pin_record(&pin)))
    }

    async fn unpin(
        &self,
        request: Request<UnpinRequest>,
    ) -> Result<Response<UnpinResponse>, Status> {
        let r = request.into_inner();
        let reason = if r.reason.is_empty() {
            "released"
        } else {
            r.reason.as_str()
        };
        let version = self.policy.unpin(&r.service, &r.owner, reason).await?;
        Ok(Response::new(UnpinResponse {
            policy_version: version,
        }))
    }

    async fn list_pins(
        &self,
        _: Request<ListPinsRequest>,
    ) -> Result<Response<ListPinsResponse>, Status> {
        Ok(Response::new(ListPinsResponse {
            pins: self.policy.pins().iter().map(pin_record).collect(),
        }))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let r = request.into_inner();
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(10_000) as usize
        };
        let service = (!r.service.is_empty()).then_some(r.service.as_str());
        let all: Vec<AuditEntry> = self
            .policy
            .audit(service, limit)
            .await?
            .into_iter()
            .map(audit_entry)
            .collect();
        Ok(Response::new(page_by_size(all, MAX_AUDIT_PAGE_BYTES)))
    }
}

/// The most a `ListAudit` answer carries, encoded.
const MAX_AUDIT_PAGE_BYTES: usize = 1 << 20;

/// The newest of `entries` (oldest first) that fit in `max` bytes, and
/// how many older ones were left out.
fn page_by_size(entries: Vec<AuditEntry>, max: usize) -> ListAuditResponse {
    use prost::Message;
    let mut size = 0;
    let keep = entries
        .iter()
        .rev()
        .take_while(|e| {
            size += e.encoded_len() + 8;
            size <= max
        })
        .count();
    let omitted = entries.len() - keep;
    ListAuditResponse {
        entries: entries.into_iter().skip(omitted).collect(),
        omitted: u32::try_from(omitted).unwrap_or(u32::MAX),
    }
}

/// The current version first, then every accepted change as it happens.
fn policy_stream(
    first: PolicyEvent,
    events: tokio::sync::broadcast::Receiver<AuditRecord>,
) -> EventStream {
    let head = futures::stream::once(async move { Ok(first) });
    let tail = tokio_stream::wrappers::BroadcastStream::new(events).map(|r| match r {
        Ok(record) => Ok(PolicyEvent {
            policy_version: record.version,
            change: Some(audit_entry(record)),
        }),
        Err(e) => Err(Status::data_loss(format!(
            "watcher fell behind: {e}; re-read and watch again"
        ))),
    });
    Box::pin(head.chain(tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(version: u64, reason: usize) -> AuditEntry {
        AuditEntry {
            policy_version: version,
            reason: "r".repeat(reason),
            ..Default::default()
        }
    }

    #[test]
    fn an_audit_page_keeps_the_newest_entries_that_fit() {
        let entries: Vec<AuditEntry> = (1..=100).map(|v| entry(v, 1000)).collect();
        let page = page_by_size(entries.clone(), 20_000);
        assert!(page.omitted > 0 && page.entries.len() < 100);
        assert_eq!(page.omitted as usize + page.entries.len(), 100);
        // Oldest first, ending with the newest.
        assert_eq!(page.entries.last().map(|e| e.policy_version), Some(100));
        let size: usize = page.entries.iter().map(prost::Message::encoded_len).sum();
        assert!(size <= 20_000, "{size}");
        // Small enough: nothing left out.
        let page = page_by_size(entries, 1 << 20);
        assert_eq!((page.omitted, page.entries.len()), (0, 100));
    }
}
