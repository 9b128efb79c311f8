//! The catalog's model: a service, its ports, and one backend per cluster
//! holding endpoints with readiness and zone.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::names::{ClusterName, ServiceName};
use crate::weights::Weights;

/// Whether an endpoint takes new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointState {
    /// Ready: takes new requests.
    Ready,
    /// Not ready: takes no requests.
    NotReady,
    /// Terminating: takes no new requests but finishes the ones it has.
    Terminating,
}

impl EndpointState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::NotReady => "not_ready",
            Self::Terminating => "terminating",
        }
    }
}

/// One pod (or address) serving a service in one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Target port per service port name.
    pub ports: BTreeMap<String, u16>,
    pub state: EndpointState,
    pub zone: Option<String>,
}

/// A service's endpoints in one cluster.
///
/// The list is held once and shared: the source that read it, the catalog
/// and every snapshot hold the same `Arc`, so cloning a service copies no
/// endpoint, and two backends that share their list are equal without
/// looking at it. A changed backend is a new list.
#[derive(Debug, Clone, Default)]
pub struct Backend {
    pub endpoints: Arc<[Endpoint]>,
}

impl PartialEq for Backend {
    fn eq(&self, other: &Self) -> bool {
        // `Arc<[T]>`'s own equality compares every element even when both
        // point at one list.
        self.shares_endpoints(other) || self.endpoints == other.endpoints
    }
}

impl Eq for Backend {}

impl std::hash::Hash for Backend {
    // Equal backends have equal lists: hashing the list agrees with `eq`.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.endpoints.hash(state);
    }
}

impl From<Vec<Endpoint>> for Backend {
    fn from(endpoints: Vec<Endpoint>) -> Self {
        Self {
            endpoints: endpoints.into(),
        }
    }
}

impl Backend {
    /// Whether `self` and `other` share one endpoint list.
    pub fn shares_endpoints(&self, other: &Backend) -> bool {
        Arc::ptr_eq(&self.endpoints, &other.endpoints)
    }

    pub fn ready_endpoints(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|e| e.state == EndpointState::Ready)
            .count()
    }
}

/// A named service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
}

/// One service across every cluster that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    pub name: ServiceName,
    /// At least one; the first is the default port.
    pub ports: Vec<ServicePort>,
    /// Extra domains routed to this service.
    pub hosts: Vec<String>,
    pub backends: BTreeMap<ClusterName, Backend>,
    /// Declared weights; `None` spreads traffic by ready endpoints.
    pub weights: Option<Weights>,
    /// Requests carrying this key (a header or a cookie) are sticky: its
    /// value picks the cluster, the same on every Ferry proxy.
    pub sticky: Option<StickyKey>,
    /// How proxies talk to the service: protocol, timeout, retries,
    /// outlier detection.
    pub requests: RequestPolicy,
}

/// What makes requests sticky to a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StickyKey {
    /// A header's value (lower-case header name).
    Header(String),
    /// A cookie's value.
    Cookie(String),
}

/// The protocol a service's endpoints speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// HTTP/1.1 (the default).
    #[default]
    Http1,
    /// HTTP/2 without TLS (h2c, prior knowledge): gRPC services.
    Http2,
}

/// How proxies send requests to a service. Everything is off unless the
/// catalog (or the service's `appProtocol`) asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct RequestPolicy {
    pub protocol: Protocol,
    /// Whole-request timeout, retries included.
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub outlier_detection: Option<OutlierDetection>,
    pub health_check: Option<HealthCheck>,
    pub tls: Option<UpstreamTls>,
    /// Protocols a client may upgrade a request to (lowercase; WebSocket
    /// when unset). `h2c` is never among them.
    pub upgrades: Option<Vec<String>>,
}

/// TLS from proxies to the service's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// The name sent as SNI and checked against the endpoints'
    /// certificates.
    pub server_name: String,
    /// The CA bundle (PEM) that signs those certificates, as a path on
    /// the proxies' hosts.
    pub ca_file: std::path::PathBuf,
    /// The proxies' own certificate, for endpoints that require one
    /// (mutual TLS).
    pub client_cert: Option<ClientCert>,
}

/// A certificate chain and its private key (PEM files on the proxies'
/// hosts) that proxies present to endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientCert {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
}

/// Active health checking: proxies probe each endpoint with an HTTP GET.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// Path probed; a 2xx answer is healthy.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed probes in a row that make an endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Passed probes in a row that make it healthy again.
    pub healthy_threshold: u32,
}

/// What makes an attempt worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RetryOn {
    /// No connection could be made (nothing was sent: safe for any method).
    ConnectFailure,
    /// The connection broke before a response (idempotent methods only).
    Reset,
    /// Any 5xx answer or a per-try timeout (idempotent methods only).
    ServerError,
    /// 502, 503 or 504 (idempotent methods only).
    GatewayError,
}

impl RetryOn {
    /// The name in the catalog and in Envoy's `retry_on`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectFailure => "connect-failure",
            Self::Reset => "reset",
            Self::ServerError => "5xx",
            Self::GatewayError => "gateway-error",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::ConnectFailure,
            Self::Reset,
            Self::ServerError,
            Self::GatewayError,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }
}

/// Retries of failed attempts, bounded by the proxy's retry budget.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Retries {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    pub per_try_timeout: Option<Duration>,
}

/// Passive health: endpoints that keep failing are ejected for a while.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers or connect failures that eject an endpoint.
    pub consecutive_5xx: u32,
    /// The first ejection's length; each further one doubles it.
    pub base_ejection_time: Duration,
    /// At most this share of a cluster's endpoints is ejected at once.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

impl Service {
    /// The weights traffic follows: the declared ones, or else a split in
    /// proportion to each cluster's ready endpoints. `None` only for a
    /// service with no backends at all.
    pub fn effective_weights(&self) -> Option<Weights> {
        if let Some(w) = &self.weights {
            return Some(w.clone());
        }
        let shares = self
            .backends
            .iter()
            .map(|(c, b)| (c.clone(), b.ready_endpoints() as u64))
            .collect();
        Weights::proportional(&shares).ok()
    }

    /// Ready endpoints across every cluster.
    pub fn ready_endpoints(&self) -> usize {
        self.backends.values().map(Backend::ready_endpoints).sum()
    }
}
