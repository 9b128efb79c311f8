//! Translation of the catalog into Envoy resources.
//!
//! Per service port and cluster: an EDS `Cluster` and a
//! `ClusterLoadAssignment` named `name.namespace:port@cluster`. Per service
//! port: a `VirtualHost` whose route splits traffic with `weighted_clusters`
//! in basis points. One `RouteConfiguration` holds every virtual host and one
//! HTTP `Listener` points at it through RDS.
//!
//! Translation is incremental: each service's output is cached with the
//! `Arc<Service>` it came from, and only services whose `Arc` (or content)
//! changed are translated again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_discovery::{
    CatalogSnapshot, EndpointState, Protocol, RequestPolicy, RetryOn, Service, ServiceName,
    StickyKey, Weights,
};
use ferry_proto::envoy::config::cluster::v3::{Cluster, OutlierDetection, cluster};
use ferry_proto::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, HealthCheck, HealthStatus, Locality,
    SocketAddress, address, config_source, health_check, socket_address,
};
use ferry_proto::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use ferry_proto::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use ferry_proto::envoy::config::route::v3::{
    HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    WeightedCluster, header_matcher, route, route_action, route_match, weighted_cluster,
};
use ferry_proto::envoy::extensions::filters::http::router::v3::Router;
use ferry_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use ferry_proto::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use ferry_proto::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use ferry_proto::envoy::r#type::v3::{CodecClientType, Percent};
use ferry_proto::google::protobuf::{BoolValue, Duration as PbDuration, UInt32Value};
use ferry_proto::pack;

use crate::resources::{Resource, ResourceType};

/// What translation needs besides the catalog.
#[derive(Debug, Clone)]
pub struct TranslateOptions {
    /// Name of the HTTP listener and of its route configuration.
    pub listener_name: String,
    /// Where proxies listen for user traffic.
    pub listener_addr: SocketAddr,
    pub connect_timeout: Duration,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            listener_name: "ferry_http".to_owned(),
            listener_addr: SocketAddr::from(([0, 0, 0, 0], 10_000)),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// The Envoy resource name of one service port in one cluster.
pub fn cluster_resource_name(service: &ServiceName, port: u16, cluster: &str) -> String {
    format!("{service}:{port}@{cluster}")
}

/// The name a cluster's statistics go by (Envoy's `alt_stat_name`):
/// `name_namespace_port_cluster`. Envoy cuts stat names at dots, so the
/// resource name itself would garble the `envoy_cluster_name` label; every
/// part is a DNS label (no `_`), so this one splits back unambiguously.
pub fn cluster_stat_name(service: &ServiceName, port: u16, cluster: &str) -> String {
    format!(
        "{}_{}_{port}_{cluster}",
        service.name(),
        service.namespace()
    )
}

/// What one service translates to.
#[derive(Debug, Clone, Default)]
pub struct ServiceResources {
    pub clusters: Vec<Arc<Resource>>,
    pub endpoints: Vec<Arc<Resource>>,
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Debug)]
struct Cached {
    input: Arc<Service>,
    short_name_unique: bool,
    weights: Option<Weights>,
    output: Arc<ServiceResources>,
}

/// Weights set through the traffic API, by service. They take precedence
/// over the catalog's declared or default weights.
pub type WeightOverrides = BTreeMap<ServiceName, Weights>;

/// The traffic policy as translation sees it: weights per service at one
/// policy version (carried into the snapshot so callers can tell when a
/// policy change is being served).
#[derive(Debug, Clone, Default)]
pub struct PolicyOverrides {
    pub version: u64,
    pub weights: WeightOverrides,
}

/// All resources of a catalog, by type then name.
pub type ResourceMaps = [BTreeMap<String, Arc<Resource>>; 4];

/// Translates catalog snapshots, re-translating only services that changed.
#[derive(Debug)]
pub struct Translator {
    options: TranslateOptions,
    cache: HashMap<ServiceName, Cached>,
    listener: Arc<Resource>,
    /// Services translated by the last call, for metrics and tests.
    last_translated: usize,
}

impl Translator {
    pub fn new(options: TranslateOptions) -> Self {
        let listener = Arc::new(listener(&options));
        Self {
            options,
            cache: HashMap::new(),
            listener,
            last_translated: 0,
        }
    }

    /// How many services the last [`Translator::translate`] call translated.
    pub fn last_translated(&self) -> usize {
        self.last_translated
    }

    /// Translates a catalog into every resource, by type.
    pub fn translate(&mut self, catalog: &CatalogSnapshot) -> ResourceMaps {
        self.translate_with(catalog, &WeightOverrides::new())
    }

    /// Translates a catalog with traffic-policy weights applied.
    pub fn translate_with(
        &mut self,
        catalog: &CatalogSnapshot,
        overrides: &WeightOverrides,
    ) -> ResourceMaps {
        let ambiguous = ambiguous_short_names(catalog);
        self.cache
            .retain(|name, _| catalog.services.contains_key(name));
        self.last_translated = 0;
        let mut maps: ResourceMaps = Default::default();
        let mut virtual_hosts = Vec::new();
        for (name, service) in &catalog.services {
            let unique = !ambiguous.contains(name.name());
            let output = self.service(service, unique, overrides.get(name));
            for c in &output.clusters {
                maps[ResourceType::Cluster.index()].insert(c.name.clone(), c.clone());
            }
            for e in &output.endpoints {
                maps[ResourceType::Endpoint.index()].insert(e.name.clone(), e.clone());
            }
            virtual_hosts.extend(output.virtual_hosts.iter().cloned());
        }
        let routes = RouteConfiguration {
            name: self.options.listener_name.clone(),
            virtual_hosts,
            ..Default::default()
        };
        maps[ResourceType::Route.index()].insert(
            routes.name.clone(),
            Arc::new(Resource::new(routes.name.clone(), &routes)),
        );
        maps[ResourceType::Listener.index()]
            .insert(self.listener.name.clone(), self.listener.clone());
        maps
    }

    fn service(
        &mut self,
        service: &Arc<Service>,
        short_name_unique: bool,
        weights: Option<&Weights>,
    ) -> Arc<ServiceResources> {
        if let Some(cached) = self.cache.get(&service.name)
            && cached.short_name_unique == short_name_unique
            && cached.weights.as_ref() == weights
            && (Arc::ptr_eq(&cached.input, service) || *cached.input == **service)
        {
            return cached.output.clone();
        }
        self.last_translated += 1;
        let output = Arc::new(translate_service(
            service,
            weights,
            short_name_unique,
            &self.options,
        ));
        self.cache.insert(
            service.name.clone(),
            Cached {
                input: service.clone(),
                short_name_unique,
                weights: weights.cloned(),
                output: output.clone(),
            },
        );
        output
    }
}

/// Short names (`checkout`) used by services in more than one namespace:
/// those get no bare-name domain, since Envoy refuses duplicate domains.
fn ambiguous_short_names(catalog: &CatalogSnapshot) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut ambiguous = BTreeSet::new();
    for name in catalog.services.keys() {
        if !seen.insert(name.name()) {
            ambiguous.insert(name.name().to_owned());
        }
    }
    ambiguous
}

/// Translates one service. `policy` weights win over the catalog's, as
/// long as they give some weight to a cluster the service still has.
pub fn translate_service(
    service: &Service,
    policy: Option<&Weights>,
    short_name_unique: bool,
    options: &TranslateOptions,
) -> ServiceResources {
    let mut out = ServiceResources::default();
    let applicable = policy.filter(|w| {
        w.iter()
            .any(|(c, bp)| bp.basis_points() > 0 && service.backends.contains_key(c))
    });
    let weights = applicable.cloned().or_else(|| service.effective_weights());
    for (index, port) in service.ports.iter().enumerate() {
        let mut weighted = Vec::new();
        for (cluster_name, backend) in &service.backends {
            let name = cluster_resource_name(&service.name, port.port, cluster_name.as_str());
            out.clusters.push(Arc::new(Resource::new(
                name.clone(),
                &eds_cluster(
                    &name,
                    &cluster_stat_name(&service.name, port.port, cluster_name.as_str()),
                    &service.requests,
                    options,
                ),
            )));
            let cla = load_assignment(&name, &port.name, backend);
            out.endpoints
                .push(Arc::new(Resource::new(name.clone(), &cla)));
            let weight = weights
                .as_ref()
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
        let domains = domains(service, port.port, index == 0, short_name_unique);
        out.virtual_hosts.push(virtual_host(
            format!("{}:{}", service.name, port.port),
            domains,
            weighted,
            service.sticky.as_ref(),
            &service.requests,
        ));
    }
    out
}

fn domains(
    service: &Service,
    port: u16,
    default_port: bool,
    short_name_unique: bool,
) -> Vec<String> {
    let (n, ns) = (service.name.name(), service.name.namespace());
    let mut bare = Vec::with_capacity(4);
    if short_name_unique {
        bare.push(n.to_owned());
    }
    bare.push(format!("{n}.{ns}"));
    bare.push(format!("{n}.{ns}.svc"));
    bare.push(format!("{n}.{ns}.svc.cluster.local"));
    let mut domains: Vec<String> = bare.iter().map(|d| format!("{d}:{port}")).collect();
    if default_port {
        domains.extend(bare);
        for host in &service.hosts {
            domains.push(host.clone());
            domains.push(format!("{host}:*"));
        }
    }
    domains
}

fn virtual_host(
    name: String,
    domains: Vec<String>,
    clusters: Vec<weighted_cluster::ClusterWeight>,
    sticky: Option<&StickyKey>,
    requests: &RequestPolicy,
) -> VirtualHost {
    // A header hash policy makes Ferry's proxy pick the cluster by the
    // header's value (Envoy uses it for load balancing within a cluster).
    let hash_policy = sticky
        .map(|key| {
            let specifier = match key {
                StickyKey::Header(name) => route_action::hash_policy::PolicySpecifier::Header(
                    route_action::hash_policy::Header {
                        header_name: name.clone(),
                        ..Default::default()
                    },
                ),
                StickyKey::Cookie(name) => route_action::hash_policy::PolicySpecifier::Cookie(
                    route_action::hash_policy::Cookie {
                        name: name.clone(),
                        ..Default::default()
                    },
                ),
            };
            vec![route_action::HashPolicy {
                policy_specifier: Some(specifier),
                ..Default::default()
            }]
        })
        .unwrap_or_default();
    let action = RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
            WeightedCluster {
                clusters,
                ..Default::default()
            },
        )),
        hash_policy,
        upgrade_configs: route_upgrades(requests.upgrades.as_deref()),
        timeout: requests.timeout.map(pb_duration),
        retry_policy: requests.retries.as_ref().map(|r| {
            // 5xx and reset retries are for idempotent methods only.
            let only_idempotent = r.on.iter().any(|o| *o != RetryOn::ConnectFailure);
            RetryPolicy {
                retry_on: r
                    .on
                    .iter()
                    .map(|o| o.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                num_retries: Some(UInt32Value { value: r.attempts }),
                per_try_timeout: r.per_try_timeout.map(pb_duration),
                retriable_request_headers: if only_idempotent {
                    vec![idempotent_methods()]
                } else {
                    Vec::new()
                },
                ..Default::default()
            }
        }),
        ..Default::default()
    };
    VirtualHost {
        name,
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
    }
}

/// A route's upgrades: the listener allows WebSocket; a service that lists
/// its own enables those and turns WebSocket off when it is not listed.
fn route_upgrades(upgrades: Option<&[String]>) -> Vec<route_action::UpgradeConfig> {
    let Some(list) = upgrades else {
        return Vec::new();
    };
    let mut configs: Vec<route_action::UpgradeConfig> = list
        .iter()
        .map(|u| route_action::UpgradeConfig {
            upgrade_type: u.clone(),
            enabled: Some(BoolValue { value: true }),
            ..Default::default()
        })
        .collect();
    if !list.iter().any(|u| u == "websocket") {
        configs.push(route_action::UpgradeConfig {
            upgrade_type: "websocket".to_owned(),
            enabled: Some(BoolValue { value: false }),
            ..Default::default()
        });
    }
    configs
}

fn ads_config_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// Methods that may be sent twice (RFC 9110 section 9.2.2).
pub const IDEMPOTENT_METHODS: &str = "GET|HEAD|OPTIONS|TRACE|PUT|DELETE";

fn idempotent_methods() -> HeaderMatcher {
    HeaderMatcher {
        name: ":method".to_owned(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                    regex: IDEMPOTENT_METHODS.to_owned(),
                    ..Default::default()
                })),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The transport socket name of TLS to endpoints.
pub const UPSTREAM_TLS: &str = "envoy.transport_sockets.tls";

/// The extension key Envoy reads a cluster's upstream HTTP options from.
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

fn eds_cluster(
    name: &str,
    stat_name: &str,
    requests: &RequestPolicy,
    options: &TranslateOptions,
) -> Cluster {
    let timeout = options.connect_timeout;
    let mut protocol_options = HashMap::new();
    if requests.protocol == Protocol::Http2 {
        protocol_options.insert(
            HTTP_PROTOCOL_OPTIONS.to_owned(),
            pack(&HttpProtocolOptions {
                upstream_protocol_options: Some(
                    http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                        http_protocol_options::ExplicitHttpConfig {
                            protocol_config: Some(
                                http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                    Default::default(),
                                ),
                            ),
                        },
                    ),
                ),
                ..Default::default()
            }),
        );
    }
    let outlier_detection = requests
        .outlier_detection
        .as_ref()
        .map(|o| OutlierDetection {
            consecutive_5xx: Some(UInt32Value {
                value: o.consecutive_5xx,
            }),
            // Connect failures count as 5xx (Envoy's default), the same
            // as in Ferry's proxy.
            base_ejection_time: Some(pb_duration(o.base_ejection_time)),
            max_ejection_percent: Some(UInt32Value {
                value: o.max_ejection_percent,
            }),
            interval: Some(pb_duration(Duration::from_secs(1))),
            ..Default::default()
        });
    let health_checks = requests
        .health_check
        .iter()
        .map(|h| HealthCheck {
            timeout: Some(pb_duration(h.timeout)),
            interval: Some(pb_duration(h.interval)),
            unhealthy_threshold: Some(UInt32Value {
                value: h.unhealthy_threshold,
            }),
            healthy_threshold: Some(UInt32Value {
                value: h.healthy_threshold,
            }),
            health_checker: Some(health_check::HealthChecker::HttpHealthCheck(
                health_check::HttpHealthCheck {
                    path: h.path.clone(),
                    // Probes speak the service's protocol (gRPC servers
                    // answer HTTP/2 only); they go over the cluster's TLS.
                    codec_client_type: match requests.protocol {
                        Protocol::Http1 => CodecClientType::Http1,
                        Protocol::Http2 => CodecClientType::Http2,
                    } as i32,
                    ..Default::default()
                },
            )),
            ..Default::default()
        })
        .collect();
    let transport_socket = requests.tls.as_ref().map(|tls| {
        use ferry_proto::envoy::config::core::v3::{
            DataSource, TransportSocket, data_source, transport_socket,
        };
        use ferry_proto::envoy::extensions::transport_sockets::tls::v3::{
            CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, TlsCertificate,
            UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
        };
        let file = |path: &std::path::Path| DataSource {
            specifier: Some(data_source::Specifier::Filename(path.display().to_string())),
            ..Default::default()
        };
        let alpn = match requests.protocol {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2",
        };
        let context = UpstreamTlsContext {
            sni: tls.server_name.clone(),
            common_tls_context: Some(CommonTlsContext {
                alpn_protocols: vec![alpn.to_owned()],
                tls_certificates: tls
                    .client_cert
                    .iter()
                    .map(|c| TlsCertificate {
                        certificate_chain: Some(file(&c.cert_file)),
                        private_key: Some(file(&c.key_file)),
                        ..Default::default()
                    })
                    .collect(),
                validation_context_type: Some(
                    common_tls_context::ValidationContextType::ValidationContext(
                        CertificateValidationContext {
                            trusted_ca: Some(file(&tls.ca_file)),
                            // Envoy checks names only when told to.
                            match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                                san_type: subject_alt_name_matcher::SanType::Dns as i32,
                                matcher: Some(StringMatcher {
                                    match_pattern: Some(string_matcher::MatchPattern::Exact(
                                        tls.server_name.clone(),
                                    )),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }],
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        TransportSocket {
            name: UPSTREAM_TLS.to_owned(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&context))),
        }
    });
    Cluster {
        transport_socket,
        typed_extension_protocol_options: protocol_options,
        outlier_detection,
        health_checks,
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: String::new(),
        }),
        connect_timeout: Some(pb_duration(timeout)),
        alt_stat_name: stat_name.to_owned(),
        lb_policy: cluster::LbPolicy::LeastRequest as i32,
        // Never spread load onto unready endpoints: Envoy's default 50 %
        // panic threshold would send traffic to them when few are ready.
        common_lb_config: Some(cluster::CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: 0.0 }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn health(state: EndpointState) -> HealthStatus {
    match state {
        EndpointState::Ready => HealthStatus::Healthy,
        EndpointState::NotReady => HealthStatus::Unhealthy,
        EndpointState::Terminating => HealthStatus::Draining,
    }
}

fn load_assignment(
    name: &str,
    port_name: &str,
    backend: &ferry_discovery::Backend,
) -> ClusterLoadAssignment {
    let mut by_zone: BTreeMap<&str, Vec<LbEndpoint>> = BTreeMap::new();
    for endpoint in &backend.endpoints {
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

fn socket_address(addr: SocketAddr) -> ferry_proto::envoy::config::core::v3::Address {
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

fn listener(options: &TranslateOptions) -> Resource {
    let hcm = HttpConnectionManager {
        stat_prefix: options.listener_name.clone(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: options.listener_name.clone(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        // WebSocket upgrades pass through to the service.
        upgrade_configs: vec![http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".to_owned(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let listener = Listener {
        name: options.listener_name.clone(),
        address: Some(socket_address(options.listener_addr)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".to_owned(),
                config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::new(options.listener_name.clone(), &listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_discovery::Catalog;
    use ferry_discovery::file::parse_catalog;
    use prost::Message;
    use std::path::Path;

    const CATALOG: &str = r#"
services:
  - name: checkout
    namespace: shop
    ports: [{name: http, port: 8080}]
    hosts: [checkout.example.com]
    backends:
      old: {endpoints: ["127.0.0.1:9001", {address: "127.0.0.1:9002", ready: false, zone: a}]}
      new: {endpoints: ["127.0.0.1:9101"]}
    weights: {old: 9000, new: 1000}
  - name: cart
    namespace: shop
    ports: [{name: http, port: 80}]
    backends:
      old: {endpoints: ["127.0.0.1:9201", "127.0.0.1:9202"]}
      new: {endpoints: ["127.0.0.1:9301"]}
"#;

    fn catalog(text: &str) -> Catalog {
        let catalog = Catalog::new();
        catalog.replace(parse_catalog(Path::new("t.yaml"), text).unwrap());
        catalog
    }

    fn decode<M: Message + Default>(r: &Resource) -> M {
        M::decode(r.body.value.as_slice()).unwrap()
    }

    fn vhost(maps: &ResourceMaps, name: &str) -> VirtualHost {
        let rc: RouteConfiguration = decode(&maps[ResourceType::Route.index()]["ferry_http"]);
        rc.virtual_hosts
            .into_iter()
            .find(|v| v.name == name)
            .unwrap()
    }

    fn route_weights(maps: &ResourceMaps, vhost: &str) -> Vec<(String, u32)> {
        let rc: RouteConfiguration = decode(&maps[ResourceType::Route.index()]["ferry_http"]);
        let vh = rc.virtual_hosts.iter().find(|v| v.name == vhost).unwrap();
        let Some(route::Action::Route(action)) = &vh.routes[0].action else {
            panic!("no route action")
        };
        let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) = &action.cluster_specifier
        else {
            panic!("no weighted clusters")
        };
        wc.clusters
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    c.weight.as_ref().map(|w| w.value).unwrap_or(0),
                )
            })
            .collect()
    }

    #[test]
    fn names_follow_the_design() {
        let c = catalog(CATALOG);
        let maps = Translator::new(TranslateOptions::default()).translate(&c.current());
        let clusters: Vec<_> = maps[ResourceType::Cluster.index()]
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            clusters,
            [
                "cart.shop:80@new",
                "cart.shop:80@old",
                "checkout.shop:8080@new",
                "checkout.shop:8080@old"
            ]
        );
        assert_eq!(maps[ResourceType::Endpoint.index()].len(), 4);
        assert!(maps[ResourceType::Listener.index()].contains_key("ferry_http"));
    }

    #[test]
    fn request_policies_become_envoy_fields() {
        let text = CATALOG.replacen(
            "    weights: {old: 9000, new: 1000}\n",
            "    weights: {old: 9000, new: 1000}\n    protocol: grpc\n    timeout: 3s\n    retries: {attempts: 2, on: [5xx, connect-failure], per_try_timeout: 1s}\n    outlier_detection: {consecutive_5xx: 4}\n    health_check: {path: /healthz}\n",
            1,
        );
        let maps =
            Translator::new(TranslateOptions::default()).translate(&catalog(&text).current());
        let cluster: Cluster =
            decode(&maps[ResourceType::Cluster.index()]["checkout.shop:8080@old"]);
        assert!(
            cluster
                .typed_extension_protocol_options
                .contains_key(HTTP_PROTOCOL_OPTIONS)
        );
        let outlier = cluster.outlier_detection.unwrap();
        assert_eq!(outlier.consecutive_5xx.map(|v| v.value), Some(4));
        assert_eq!(outlier.max_ejection_percent.map(|v| v.value), Some(50));
        let Some(health_check::HealthChecker::HttpHealthCheck(h)) =
            &cluster.health_checks[0].health_checker
        else {
            panic!("no HTTP health check")
        };
        assert_eq!(h.path, "/healthz");
        assert_eq!(h.codec_client_type, CodecClientType::Http2 as i32);
        let vh = vhost(&maps, "checkout.shop:8080");
        let Some(route::Action::Route(action)) = &vh.routes[0].action else {
            panic!("no route action")
        };
        assert_eq!(action.timeout.as_ref().map(|d| d.seconds), Some(3));
        let retry = action.retry_policy.as_ref().unwrap();
        assert_eq!(retry.retry_on, "connect-failure,5xx");
        assert_eq!(retry.num_retries.as_ref().map(|n| n.value), Some(2));
        assert_eq!(retry.retriable_request_headers[0].name, ":method");
        // A service without them gets none.
        let plain: Cluster = decode(&maps[ResourceType::Cluster.index()]["cart.shop:80@old"]);
        assert!(plain.outlier_detection.is_none() && plain.health_checks.is_empty());
        assert!(plain.typed_extension_protocol_options.is_empty());
    }

    #[test]
    fn declared_weights_become_weighted_clusters() {
        let maps =
            Translator::new(TranslateOptions::default()).translate(&catalog(CATALOG).current());
        assert_eq!(
            route_weights(&maps, "checkout.shop:8080"),
            [
                ("checkout.shop:8080@new".into(), 1000),
                ("checkout.shop:8080@old".into(), 9000)
            ]
        );
        // No declared weights: by ready endpoints, 2 to 1.
        assert_eq!(
            route_weights(&maps, "cart.shop:80"),
            [
                ("cart.shop:80@new".into(), 3333),
                ("cart.shop:80@old".into(), 6667)
            ]
        );
    }

    #[test]
    fn virtual_host_domains_cover_every_cluster_local_name() {
        let maps =
            Translator::new(TranslateOptions::default()).translate(&catalog(CATALOG).current());
        let vh = vhost(&maps, "checkout.shop:8080");
        for d in [
            "checkout",
            "checkout:8080",
            "checkout.shop",
            "checkout.shop.svc:8080",
            "checkout.shop.svc.cluster.local",
            "checkout.shop.svc.cluster.local:8080",
            "checkout.example.com",
        ] {
            assert!(
                vh.domains.iter().any(|x| x == d),
                "missing {d} in {:?}",
                vh.domains
            );
        }
    }

    #[test]
    fn endpoint_health_follows_readiness_and_zone() {
        let maps =
            Translator::new(TranslateOptions::default()).translate(&catalog(CATALOG).current());
        let cla: ClusterLoadAssignment =
            decode(&maps[ResourceType::Endpoint.index()]["checkout.shop:8080@old"]);
        let zones: Vec<_> = cla
            .endpoints
            .iter()
            .map(|l| l.locality.clone().unwrap_or_default().zone)
            .collect();
        assert_eq!(zones, ["", "a"]);
        assert_eq!(
            cla.endpoints[0].lb_endpoints[0].health_status,
            HealthStatus::Healthy as i32
        );
        assert_eq!(
            cla.endpoints[1].lb_endpoints[0].health_status,
            HealthStatus::Unhealthy as i32
        );
    }

    #[test]
    fn one_changed_service_is_the_only_one_translated() {
        let c = catalog(CATALOG);
        let mut t = Translator::new(TranslateOptions::default());
        let before = t.translate(&c.current());
        assert_eq!(t.last_translated(), 2);
        c.replace(parse_catalog(Path::new("t.yaml"), &CATALOG.replace("9202", "9203")).unwrap());
        let after = t.translate(&c.current());
        assert_eq!(t.last_translated(), 1);
        let eds = ResourceType::Endpoint.index();
        assert_eq!(
            before[eds]["checkout.shop:8080@old"].version,
            after[eds]["checkout.shop:8080@old"].version
        );
        assert_ne!(
            before[eds]["cart.shop:80@old"].version,
            after[eds]["cart.shop:80@old"].version
        );
        let cds = ResourceType::Cluster.index();
        assert_eq!(
            before[cds]["cart.shop:80@old"].version,
            after[cds]["cart.shop:80@old"].version
        );
    }

    #[test]
    fn same_short_name_in_two_namespaces_gets_no_bare_domain() {
        let text = format!(
            "{CATALOG}{}",
            r#"
  - name: cart
    namespace: prod
    ports: [{name: http, port: 80}]
    backends: {old: {endpoints: ["127.0.0.1:1"]}}
"#
        );
        let maps =
            Translator::new(TranslateOptions::default()).translate(&catalog(&text).current());
        let rc: RouteConfiguration = decode(&maps[ResourceType::Route.index()]["ferry_http"]);
        let mut all: Vec<&String> = rc.virtual_hosts.iter().flat_map(|v| &v.domains).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "duplicate domains");
        assert!(!all.iter().any(|d| d.as_str() == "cart"));
    }
}
