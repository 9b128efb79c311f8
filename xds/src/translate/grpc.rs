//! What proxyless gRPC clients are served ([`crate::ClientKind::Grpc`]).
//!
//! A gRPC client resolves `xds:///checkout.shop:8080` by asking for the
//! Listener `checkout.shop:8080`. Per service port Ferry serves:
//!
//! - a `Listener` for each name the port answers to (the same names a
//!   proxy's virtual host matches, without wildcards), whose `api_listener`
//!   is an HTTP connection manager taking the port's route configuration
//!   by RDS, the router its only (and so last) filter;
//! - a `RouteConfiguration` named `name.namespace:port`, one virtual host
//!   whose domains are those listener names and whose one route splits
//!   calls over the same weighted clusters, in basis points, as proxies get
//!   (without `total_weight`: gRPC sums the weights);
//! - per cluster, a `Cluster` and a `ClusterLoadAssignment` under the same
//!   names as the proxies' (`name.namespace:port@cluster`), so load
//!   reports name them the same way.
//!
//! Everything is kept to what gRPC accepts (gRFCs A27, A28, A42, A52):
//!
//! - clusters are EDS over ADS with `lb_policy: ROUND_ROBIN`, which every
//!   gRPC client takes, and a `load_balancing_policy` list for the clients
//!   that read it: least request (what proxies use) falling back to round
//!   robin; for a service sticky by header, ring hash falling back to
//!   round robin, with the route's header `hash_policy`;
//! - clusters report load to the same server (`lrs_server: self`), so
//!   migration gates count gRPC calls too;
//! - localities carry a `load_balancing_weight` (gRPC drops localities
//!   without one): the number of their healthy endpoints, at least 1;
//! - a service `timeout` becomes the route's `max_stream_duration`.
//!
//! Left out, since gRPC rejects or ignores them: the cluster's TLS (a gRPC
//! client's channel credentials decide TLS), HTTP/2 options, active health
//! checks, consecutive-5xx outlier detection, the route's retry policy and
//! upgrades, and cookie stickiness.

use std::sync::Arc;

use ferry_discovery::{Service, StickyKey, Weights};
use ferry_proto::envoy::config::cluster::v3::load_balancing_policy::Policy;
use ferry_proto::envoy::config::cluster::v3::{Cluster, LoadBalancingPolicy, cluster};
use ferry_proto::envoy::config::core::v3::{
    ApiVersion, ConfigSource, HealthStatus, SelfConfigSource, TypedExtensionConfig, config_source,
};
use ferry_proto::envoy::config::listener::v3::{ApiListener, Listener};
use ferry_proto::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster, route,
    route_action, route_match, weighted_cluster,
};
use ferry_proto::envoy::extensions::filters::http::router::v3::Router;
use ferry_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use ferry_proto::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
use ferry_proto::envoy::extensions::load_balancing_policies::ring_hash::v3::RingHash;
use ferry_proto::envoy::extensions::load_balancing_policies::round_robin::v3::RoundRobin;
use ferry_proto::google::protobuf::UInt32Value;
use ferry_proto::pack;

use crate::resources::{Resource, ResourceType};

use super::endpoints::load_assignment;
use super::{ads_config_source, cluster_resource_name, pb_duration};

/// What one service gives gRPC clients, by type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GrpcResources {
    pub clusters: Vec<Arc<Resource>>,
    pub endpoints: Vec<Arc<Resource>>,
    pub listeners: Vec<Arc<Resource>>,
    pub routes: Vec<Arc<Resource>>,
}

impl GrpcResources {
    /// Every resource, with its type.
    pub fn each(&self) -> impl Iterator<Item = (ResourceType, &Arc<Resource>)> {
        [
            (ResourceType::Cluster, &self.clusters),
            (ResourceType::Endpoint, &self.endpoints),
            (ResourceType::Listener, &self.listeners),
            (ResourceType::Route, &self.routes),
        ]
        .into_iter()
        .flat_map(|(kind, list)| list.iter().map(move |r| (kind, r)))
    }
}

/// The router filter's name, the last (and only) HTTP filter.
pub const ROUTER_FILTER: &str = "envoy.filters.http.router";

/// Translates one service for gRPC clients, with the traffic split in
/// `weights` (the ones proxies get).
pub(super) fn translate(
    service: &Service,
    weights: Option<&Weights>,
    short_name_unique: bool,
) -> GrpcResources {
    let mut out = GrpcResources::default();
    let sticky_header = match &service.sticky {
        Some(StickyKey::Header(name)) => Some(name.as_str()),
        _ => None,
    };
    for (index, port) in service.ports.iter().enumerate() {
        let mut weighted = Vec::new();
        for (cluster_name, backend) in &service.backends {
            let name = cluster_resource_name(&service.name, port.port, cluster_name.as_str());
            out.clusters.push(Arc::new(Resource::new(
                name.clone(),
                &grpc_cluster(&name, sticky_header.is_some()),
            )));
            let mut cla = load_assignment(&name, &port.name, backend);
            for locality in &mut cla.endpoints {
                let healthy = locality
                    .lb_endpoints
                    .iter()
                    .filter(|e| e.health_status == HealthStatus::Healthy as i32)
                    .count();
                locality.load_balancing_weight = Some(UInt32Value {
                    value: u32::try_from(healthy).unwrap_or(u32::MAX).max(1),
                });
            }
            out.endpoints
                .push(Arc::new(Resource::new(name.clone(), &cla)));
            let weight = weights
                .map(|w| w.get(cluster_name).basis_points())
                .unwrap_or(0);
            if weight > 0 {
                weighted.push(weighted_cluster::ClusterWeight {
                    name,
                    weight: Some(UInt32Value { value: weight }),
                    ..Default::default()
                });
            }
        }
        let route_name = format!("{}:{}", service.name, port.port);
        let targets = targets(service, port.port, index == 0, short_name_unique);
        for target in &targets {
            out.listeners.push(Arc::new(Resource::new(
                target.clone(),
                &api_listener(target, &route_name),
            )));
        }
        let config = route_configuration(
            &route_name,
            targets,
            weighted,
            sticky_header,
            service.requests.timeout,
        );
        out.routes
            .push(Arc::new(Resource::new(route_name.clone(), &config)));
    }
    out
}

/// The names a gRPC target may give this port: `name.namespace`,
/// `name.namespace.svc` and `name.namespace.svc.cluster.local` with the
/// port, and (for the default port) without it; the bare `name` likewise
/// when no other namespace uses it; and, for the default port, each exact
/// (not wildcard) host, bare and with each of the service's ports, as a
/// proxy routes `host:*` to the default port.
pub fn targets(
    service: &Service,
    port: u16,
    default_port: bool,
    short_name_unique: bool,
) -> Vec<String> {
    let (n, ns) = (service.name.name(), service.name.namespace());
    let mut bare = Vec::with_capacity(4);
    bare.push(format!("{n}.{ns}"));
    bare.push(format!("{n}.{ns}.svc"));
    bare.push(format!("{n}.{ns}.svc.cluster.local"));
    if short_name_unique {
        bare.push(n.to_owned());
    }
    let mut names: Vec<String> = bare.iter().map(|b| format!("{b}:{port}")).collect();
    if default_port {
        names.extend(bare);
        for host in service.hosts.iter().filter(|h| !h.starts_with("*.")) {
            names.push(host.clone());
            names.extend(service.ports.iter().map(|p| format!("{host}:{}", p.port)));
        }
    }
    names
}

/// The cluster's LB policy: round robin for every client, and, for those
/// that read `load_balancing_policy`, the first they support of least
/// request (ring hash when `hashed`) and round robin.
fn grpc_cluster(name: &str, hashed: bool) -> Cluster {
    let policy = |name: &str, config| Policy {
        typed_extension_config: Some(TypedExtensionConfig {
            name: name.to_owned(),
            typed_config: Some(config),
        }),
    };
    let preferred = if hashed {
        policy(
            "envoy.load_balancing_policies.ring_hash",
            pack(&RingHash::default()),
        )
    } else {
        policy(
            "envoy.load_balancing_policies.least_request",
            pack(&LeastRequest::default()),
        )
    };
    let round_robin = policy(
        "envoy.load_balancing_policies.round_robin",
        pack(&RoundRobin::default()),
    );
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: String::new(),
        }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        load_balancing_policy: Some(LoadBalancingPolicy {
            policies: vec![preferred, round_robin],
        }),
        lrs_server: Some(ConfigSource {
            resource_api_version: ApiVersion::V3 as i32,
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::Self_(
                SelfConfigSource {
                    transport_api_version: ApiVersion::V3 as i32,
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Listener a gRPC client resolves `target` through.
fn api_listener(target: &str, route_name: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: target.to_owned(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: route_name.to_owned(),
        })),
        http_filters: vec![HttpFilter {
            name: ROUTER_FILTER.to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: target.to_owned(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack(&hcm)),
        }),
        ..Default::default()
    }
}

fn route_configuration(
    name: &str,
    domains: Vec<String>,
    clusters: Vec<weighted_cluster::ClusterWeight>,
    sticky_header: Option<&str>,
    timeout: Option<std::time::Duration>,
) -> RouteConfiguration {
    let hash_policy = sticky_header
        .map(|header| route_action::HashPolicy {
            policy_specifier: Some(route_action::hash_policy::PolicySpecifier::Header(
                route_action::hash_policy::Header {
                    header_name: header.to_owned(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        })
        .into_iter()
        .collect();
    let action = RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
            WeightedCluster {
                clusters,
                ..Default::default()
            },
        )),
        hash_policy,
        max_stream_duration: timeout.map(|t| route_action::MaxStreamDuration {
            max_stream_duration: Some(pb_duration(t)),
            ..Default::default()
        }),
        ..Default::default()
    };
    RouteConfiguration {
        name: name.to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: name.to_owned(),
            domains,
            routes: vec![Route {
                name: "default".to_owned(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(action)),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}
