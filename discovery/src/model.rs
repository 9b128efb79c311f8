//! The catalog's model: a service, its ports, and one backend per cluster
//! holding endpoints with readiness and zone.

use std::collections::BTreeMap;
use std::net::IpAddr;

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
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    pub endpoints: Vec<Endpoint>,
}

impl Backend {
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
    /// Requests carrying this header are sticky: the header's value picks
    /// the cluster, the same on every Ferry proxy.
    pub sticky_header: Option<String>,
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
