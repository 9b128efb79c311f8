//! Load assignments: a cluster's endpoints by zone, with their health.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ferry_discovery::EndpointState;
use ferry_proto::envoy::config::core::v3::{
    HealthStatus, Locality, SocketAddress, address, socket_address,
};
use ferry_proto::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};

fn health(state: EndpointState) -> HealthStatus {
    match state {
        EndpointState::Ready => HealthStatus::Healthy,
        EndpointState::NotReady => HealthStatus::Unhealthy,
        EndpointState::Terminating => HealthStatus::Draining,
    }
}

pub(super) fn load_assignment(
    name: &str,
    port_name: &str,
    backend: &ferry_discovery::Backend,
) -> ClusterLoadAssignment {
    let mut by_zone: BTreeMap<&str, Vec<LbEndpoint>> = BTreeMap::new();
    for endpoint in backend.endpoints.iter() {
        let Some(&port) = endpoint.ports.get(port_name) else {
            continue;
        };
        let lb = LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(SocketAddr::new(endpoint.ip, port))),
                ..Default::default()
            })),
            health_status: health(endpoint.state) as i32,
            ..Default::default()
        };
        by_zone
            .entry(endpoint.zone.as_deref().unwrap_or(""))
            .or_default()
            .push(lb);
    }
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: by_zone
            .into_iter()
            .map(|(zone, lb_endpoints)| LocalityLbEndpoints {
                locality: Some(Locality {
                    zone: zone.to_owned(),
                    ..Default::default()
                }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub(super) fn socket_address(addr: SocketAddr) -> ferry_proto::envoy::config::core::v3::Address {
    ferry_proto::envoy::config::core::v3::Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    }
}
