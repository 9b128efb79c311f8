//! The proxy's routing table: one immutable snapshot built from the xDS
//! resources it holds, validated as a whole, swapped in atomically.
//!
//! From the Listener it takes the name of its RouteConfiguration; from
//! that, virtual hosts (domains → routes → weighted clusters, with an
//! optional hash header for sticky picks); from Clusters and
//! ClusterLoadAssignments, each cluster's endpoints that may take new
//! requests (healthy or unknown; never unhealthy or draining).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use tower::retry::budget::TpsBudget;

use crate::balance::PeakEwma;
use crate::health::{HealthCheckConfig, Probe};
use crate::outlier::{Health, OutlierConfig};
use crate::retry::RetryConfig;

use ferry_proto::envoy::config::cluster::v3::Cluster;
use ferry_proto::envoy::config::core::v3::{HealthStatus, address, socket_address};
use ferry_proto::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use ferry_proto::envoy::config::listener::v3::Listener;
use ferry_proto::envoy::config::route::v3::{RouteConfiguration, route, route_action, route_match};
use ferry_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use ferry_xds_core::ResourceType;
use ferry_xds_core::client::Resources;
use prost::Message;

/// One upstream endpoint; its counters, latency estimate and health
/// outlive config swaps.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, made once.
    pub authority: http::uri::Authority,
    /// Requests in flight to it.
    pub outstanding: AtomicU32,
    pub ewma: PeakEwma,
    pub health: Health,
    /// Active health checks, when the cluster has them.
    pub probe: Probe,
}

impl Endpoint {
    /// `n` endpoints on 127.0.0.1, ports 9000 and up (for tests).
    pub fn loopback(n: u16) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| Arc::new(Endpoint::new(([127, 0, 0, 1], 9000 + i).into())))
            .collect()
    }

    pub fn new(addr: SocketAddr) -> Self {
        let authority = http::uri::Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| http::uri::Authority::from_static("0.0.0.0"));
        Self {
            addr,
            authority,
            outstanding: AtomicU32::new(0),
            ewma: PeakEwma::default(),
            health: Health::default(),
            probe: Probe::default(),
        }
    }
}

/// The protocol spoken to a cluster's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c): gRPC.
    Http2,
}

pub use crate::upstream_tls::UpstreamTls;

/// Metric handles of one cluster, registered once per config build so the
/// request path does no label lookups.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    /// Requests by status class: 1xx … 5xx.
    pub requests: [metrics::Counter; 5],
    /// Requests whose own body could not be read (class
    /// `downstream_error`): the client's failure, neither 4xx nor 5xx.
    pub downstream_errors: metrics::Counter,
    pub duration: metrics::Histogram,
    pub upstream_errors: metrics::Counter,
    pub retries: metrics::Counter,
    pub retries_refused: metrics::Counter,
    pub ejections: metrics::Counter,
    /// HTTP/1.1 connections made to the cluster's endpoints (as Envoy's
    /// `upstream_cx_total`), by result.
    pub http1_connects: crate::h1pool::Connects,
}

impl UpstreamMetrics {
    fn new(service: &str, cluster: &str) -> Self {
        let labels = [
            ("service", service.to_owned()),
            ("cluster", cluster.to_owned()),
        ];
        let class = |c: &'static str| {
            let mut l = labels.to_vec();
            l.push(("class", c.to_owned()));
            metrics::counter!("ferry_proxy_requests_total", &l)
        };
        let connects = |result: &'static str| {
            let mut l = labels.to_vec();
            l.push(("result", result.to_owned()));
            metrics::counter!("ferry_proxy_upstream_http1_connects_total", &l)
        };
        Self {
            requests: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            downstream_errors: class("downstream_error"),
            duration: metrics::histogram!("ferry_proxy_request_duration_seconds", &labels),
            upstream_errors: metrics::counter!("ferry_proxy_upstream_errors_total", &labels),
            retries: metrics::counter!("ferry_proxy_retries_total", &labels),
            retries_refused: metrics::counter!("ferry_proxy_retries_over_budget_total", &labels),
            ejections: metrics::counter!("ferry_proxy_ejections_total", &labels),
            http1_connects: crate::h1pool::Connects {
                ok: connects("ok"),
                error: connects("error"),
            },
        }
    }
}

/// The retry budget of a cluster: retries may add 20 % to its requests,
/// plus 10 per second (linkerd's and Finagle's defaults).
pub fn retry_budget() -> TpsBudget {
    TpsBudget::new(Duration::from_secs(10), 10, 0.2)
}

/// Requests a cluster completed since the last load report.
#[derive(Debug, Default)]
pub struct LoadCounters {
    pub successful: std::sync::atomic::AtomicU64,
    /// 5xx answers and failed requests.
    pub errors: std::sync::atomic::AtomicU64,
    /// Requests per latency bucket (bounds in
    /// [`ferry_xds_core::latency::LATENCY_BOUNDS_MS`]).
    pub latency: [std::sync::atomic::AtomicU64; ferry_xds_core::latency::LATENCY_SLOTS],
}

/// A cluster and the endpoints that may take new requests.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    /// The service (`name.namespace`) and Kubernetes cluster it stands for,
    /// from Ferry's naming (`name.namespace:port@cluster`), for metrics.
    pub service: String,
    pub kube_cluster: String,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Kept across config swaps, like the endpoints' counters.
    pub load: Arc<LoadCounters>,
    pub protocol: Protocol,
    pub outlier: Option<OutlierConfig>,
    pub health_check: Option<HealthCheckConfig>,
    pub tls: Option<Arc<UpstreamTls>>,
    /// Kept across config swaps.
    pub budget: Arc<TpsBudget>,
    pub metrics: UpstreamMetrics,
}

impl Upstream {
    /// A plain HTTP/1.1 cluster with no outlier detection.
    pub fn for_tests(name: &str, endpoints: Vec<Arc<Endpoint>>) -> Self {
        Self {
            name: name.to_owned(),
            service: name.to_owned(),
            kube_cluster: String::new(),
            endpoints,
            load: Default::default(),
            protocol: Protocol::Http1,
            outlier: None,
            health_check: None,
            tls: None,
            budget: Arc::new(retry_budget()),
            metrics: UpstreamMetrics::new(name, ""),
        }
    }
}

/// A weighted target of a route.
#[derive(Debug, Clone)]
pub struct Target {
    pub cluster: String,
    pub weight: u32,
}

/// What a sticky route hashes.
#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
}

impl HashKey {
    /// The key's value in `headers`, if the request carries it.
    pub fn value<'a>(&self, headers: &'a http::HeaderMap) -> Option<&'a [u8]> {
        match self {
            Self::Header(name) => headers.get(name).map(|v| v.as_bytes()),
            Self::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
                .find_map(|pair| {
                    let pair = pair.trim_ascii_start();
                    let rest = pair.strip_prefix(name.as_bytes())?;
                    rest.strip_prefix(b"=")
                }),
        }
    }
}

/// One route of a virtual host.
#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub targets: Vec<Target>,
    /// Hash requests on this key's value for sticky picks.
    pub hash_key: Option<HashKey>,
    pub timeout: Option<Duration>,
    pub retry: Option<Arc<RetryConfig>>,
    /// Protocols a request may upgrade to (lowercase): the listener's
    /// `upgrade_configs`, as the route's own enable or disable.
    pub upgrades: Vec<String>,
}

/// The upgrade types `configs` enable, on top of `base` (those a config
/// disables are removed).
fn upgrades(base: &[String], configs: &[http_connection_manager::UpgradeConfig]) -> Vec<String> {
    let mut out = base.to_vec();
    for c in configs {
        let name = c.upgrade_type.to_ascii_lowercase();
        let enabled = c.enabled.as_ref().is_none_or(|e| e.value);
        out.retain(|u| *u != name);
        if enabled {
            out.push(name);
        }
    }
    out
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Route>,
}

/// Everything the request path needs, at one config version.
#[derive(Debug, Default)]
pub struct Routing {
    /// Versions of the resources it was built from, per type.
    pub versions: BTreeMap<&'static str, BTreeMap<String, String>>,
    pub route_config: String,
    exact: HashMap<String, Arc<VirtualHost>>,
    /// `*.suffix` (stored as `.suffix`) and `prefix*` domains.
    suffixes: Vec<(String, Arc<VirtualHost>)>,
    prefixes: Vec<(String, Arc<VirtualHost>)>,
    any: Option<Arc<VirtualHost>>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
}

impl Routing {
    /// Whether the config is whole enough to serve: the listener's route
    /// configuration has arrived, and so has every cluster its routes
    /// name (as Envoy warms a listener before it takes traffic).
    pub fn warm(&self) -> bool {
        let hosts = self
            .exact
            .values()
            .chain(self.suffixes.iter().map(|(_, v)| v))
            .chain(self.prefixes.iter().map(|(_, v)| v))
            .chain(self.any.iter());
        !self.route_config.is_empty()
            && self
                .versions
                .get(ResourceType::Route.short())
                .is_some_and(|v| v.contains_key(&self.route_config))
            && hosts
                .flat_map(|h| h.routes.iter())
                .flat_map(|r| r.targets.iter())
                .all(|t| self.upstreams.contains_key(&t.cluster))
    }

    /// The virtual host for a request's authority (as Envoy matches
    /// domains: exact, then the longest `*.suffix`, then the longest
    /// `prefix*`, then `*`).
    pub fn virtual_host(&self, authority: &str) -> Option<&Arc<VirtualHost>> {
        let host: std::borrow::Cow<'_, str> = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            authority.to_ascii_lowercase().into()
        } else {
            authority.into()
        };
        if let Some(v) = self.exact.get(host.as_ref()) {
            return Some(v);
        }
        fn best<'a>(
            list: &'a [(String, Arc<VirtualHost>)],
            hit: &dyn Fn(&str) -> bool,
        ) -> Option<&'a Arc<VirtualHost>> {
            list.iter()
                .filter(|(p, _)| hit(p))
                .max_by_key(|(p, _)| p.len())
                .map(|(_, v)| v)
        }
        best(&self.suffixes, &|s| host.ends_with(s))
            .or_else(|| best(&self.prefixes, &|p| host.starts_with(p)))
            .or(self.any.as_ref())
    }

    /// All endpoints, for keeping their counters across swaps.
    fn endpoint(&self, cluster: &str, addr: SocketAddr) -> Option<Arc<Endpoint>> {
        self.upstreams
            .get(cluster)?
            .endpoints
            .iter()
            .find(|e| e.addr == addr)
            .cloned()
    }
}

fn duration(d: &ferry_proto::google::protobuf::Duration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )
}

/// The cluster's first health check, which must be an HTTP one.
fn health_check(cluster: &Cluster) -> Result<Option<HealthCheckConfig>, String> {
    use ferry_proto::envoy::config::core::v3::health_check::HealthChecker;
    let Some(check) = cluster.health_checks.first() else {
        return Ok(None);
    };
    let Some(HealthChecker::HttpHealthCheck(http)) = &check.health_checker else {
        return Err("only HTTP health checks are supported".to_owned());
    };
    if !http.path.starts_with('/') {
        return Err(format!(
            "http_health_check.path: {:?} is not a path",
            http.path
        ));
    }
    let interval = check.interval.as_ref().map(duration).unwrap_or_default();
    if interval.is_zero() {
        return Err("interval: must be longer than 0".to_owned());
    }
    let timeout = check
        .timeout
        .as_ref()
        .map(duration)
        .filter(|t| !t.is_zero())
        .unwrap_or(Duration::from_secs(1));
    let threshold = |v: &Option<ferry_proto::google::protobuf::UInt32Value>| {
        v.as_ref().map(|v| v.value).unwrap_or(1).max(1)
    };
    Ok(Some(HealthCheckConfig {
        path: http.path.clone(),
        host: http.host.clone(),
        interval,
        timeout,
        unhealthy_threshold: threshold(&check.unhealthy_threshold),
        healthy_threshold: threshold(&check.healthy_threshold),
    }))
}

/// HTTP/2 when the cluster's `HttpProtocolOptions` say so explicitly.
fn upstream_protocol(cluster: &Cluster) -> Result<Protocol, String> {
    use ferry_proto::envoy::extensions::upstreams::http::v3::{
        HttpProtocolOptions, http_protocol_options,
    };
    use http_protocol_options::explicit_http_config::ProtocolConfig;
    let Some(any) = cluster
        .typed_extension_protocol_options
        .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    else {
        return Ok(Protocol::Http1);
    };
    let options = HttpProtocolOptions::decode(any.value.as_slice())
        .map_err(|e| format!("cannot decode HttpProtocolOptions: {e}"))?;
    match options.upstream_protocol_options {
        Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(c)) => {
            match c.protocol_config {
                Some(ProtocolConfig::Http2ProtocolOptions(_)) => Ok(Protocol::Http2),
                Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                    Err("HTTP/3 upstreams are not supported".to_owned())
                }
                _ => Ok(Protocol::Http1),
            }
        }
        _ => Ok(Protocol::Http1),
    }
}

fn decode<M: Message + Default>(
    kind: &str,
    name: &str,
    any: &ferry_proto::Any,
) -> Result<M, String> {
    M::decode(any.value.as_slice()).map_err(|e| format!("{kind} {name}: cannot decode: {e}"))
}

fn socket(addr: &Option<ferry_proto::envoy::config::core::v3::Address>) -> Option<SocketAddr> {
    let address::Address::SocketAddress(sa) = addr.as_ref()?.address.as_ref()? else {
        return None;
    };
    let ip: IpAddr = sa.address.parse().ok()?;
    let socket_address::PortSpecifier::PortValue(port) = sa.port_specifier.as_ref()? else {
        return None;
    };
    Some(SocketAddr::new(ip, u16::try_from(*port).ok()?))
}

/// Builds and validates a routing snapshot from every held resource. The
/// error names the resource and what is wrong with it.
pub fn build(resources: &Resources, previous: &Routing) -> Result<Routing, String> {
    build_with(resources, previous, &crate::forward::PoolConfig::default())
}

/// [`build`], with the pool settings new upstream clients get.
pub fn build_with(
    resources: &Resources,
    previous: &Routing,
    pool: &crate::forward::PoolConfig,
) -> Result<Routing, String> {
    let mut routing = Routing::default();
    for kind in ResourceType::ALL {
        routing.versions.insert(
            kind.short(),
            resources[kind.index()]
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
        );
    }
    // Clusters and their endpoints.
    let assignments = &resources[ResourceType::Endpoint.index()];
    for (name, (_, any)) in &resources[ResourceType::Cluster.index()] {
        let cluster: Cluster = decode("cluster", name, any)?;
        let service_name = cluster
            .eds_cluster_config
            .as_ref()
            .map(|e| e.service_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| cluster.name.clone());
        let mut endpoints = Vec::new();
        if let Some((_, any)) = assignments.get(&service_name) {
            let cla: ClusterLoadAssignment = decode("cluster load assignment", &service_name, any)?;
            for (li, locality) in cla.endpoints.iter().enumerate() {
                for (ei, lb) in locality.lb_endpoints.iter().enumerate() {
                    let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &lb.host_identifier else {
                        continue;
                    };
                    let addr = socket(&e.address).ok_or_else(|| {
                        format!(
                            "cluster load assignment {service_name}: endpoints[{li}].lb_endpoints[{ei}].endpoint.address: not an IP socket address"
                        )
                    })?;
                    let usable = matches!(
                        HealthStatus::try_from(lb.health_status),
                        Ok(HealthStatus::Healthy | HealthStatus::Unknown)
                    );
                    if usable {
                        let endpoint = previous
                            .endpoint(name, addr)
                            .unwrap_or_else(|| Arc::new(Endpoint::new(addr)));
                        endpoints.push(endpoint);
                    }
                }
            }
        }
        let (service, kube_cluster) = ferry_xds_core::BackendKey::parse(name)
            .map(|k| (k.service, k.cluster))
            .map(|(s, c)| (s.to_owned(), c.to_owned()))
            .unwrap_or_else(|| (name.clone(), String::new()));
        let protocol = upstream_protocol(&cluster)
            .map_err(|e| format!("cluster {name}: typed_extension_protocol_options: {e}"))?;
        let outlier = cluster.outlier_detection.as_ref().map(|o| {
            let defaults = OutlierConfig::default();
            OutlierConfig {
                consecutive_5xx: o
                    .consecutive_5xx
                    .map(|v| v.value)
                    .unwrap_or(defaults.consecutive_5xx)
                    .max(1),
                base_ejection_time: o
                    .base_ejection_time
                    .as_ref()
                    .map(duration)
                    .unwrap_or(defaults.base_ejection_time),
                max_ejection_time: o
                    .max_ejection_time
                    .as_ref()
                    .map(duration)
                    .unwrap_or(defaults.max_ejection_time),
                max_ejection_percent: o
                    .max_ejection_percent
                    .map(|v| v.value.min(100))
                    .unwrap_or(defaults.max_ejection_percent),
            }
        });
        if outlier.is_none() {
            // Kept endpoints may carry ejections from a policy now gone.
            for e in &endpoints {
                e.health.clear();
            }
        }
        let health_check =
            health_check(&cluster).map_err(|e| format!("cluster {name}: health_checks[0]: {e}"))?;
        let kept = previous.upstreams.get(name);
        let tls = crate::upstream_tls::from_cluster(
            &cluster,
            protocol,
            kept.and_then(|u| u.tls.as_ref()),
            pool,
            &resources[ResourceType::Secret.index()],
        )
        .map_err(|e| format!("cluster {name}: transport_socket: {e}"))?;
        routing.upstreams.insert(
            name.clone(),
            Arc::new(Upstream {
                name: name.clone(),
                metrics: UpstreamMetrics::new(&service, &kube_cluster),
                service,
                kube_cluster,
                endpoints,
                load: kept.map(|u| u.load.clone()).unwrap_or_default(),
                protocol,
                outlier,
                health_check,
                tls,
                budget: kept
                    .map(|u| u.budget.clone())
                    .unwrap_or_else(|| Arc::new(retry_budget())),
            }),
        );
    }
    // The first listener's HTTP connection manager names its routes.
    let Some((listener_name, (_, any))) = resources[ResourceType::Listener.index()].iter().next()
    else {
        return Ok(routing);
    };
    let listener: Listener = decode("listener", listener_name, any)?;
    let hcm = listener
        .filter_chains
        .iter()
        .flat_map(|c| c.filters.iter())
        .find_map(|f| match &f.config_type {
            Some(ferry_proto::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
                any,
            )) => HttpConnectionManager::decode(any.value.as_slice()).ok(),
            _ => None,
        })
        .ok_or_else(|| format!("listener {listener_name}: no HTTP connection manager"))?;
    let route_name = match hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => rds.route_config_name,
        _ => {
            return Err(format!(
                "listener {listener_name}: the HTTP connection manager must take its routes by RDS"
            ));
        }
    };
    routing.route_config = route_name.clone();
    let listener_upgrades = upgrades(&[], &hcm.upgrade_configs);
    let Some((_, any)) = resources[ResourceType::Route.index()].get(&route_name) else {
        return Ok(routing);
    };
    let config: RouteConfiguration = decode("route configuration", &route_name, any)?;
    for (vi, vh) in config.virtual_hosts.iter().enumerate() {
        let mut routes = Vec::new();
        for (ri, r) in vh.routes.iter().enumerate() {
            let at = format!(
                "route configuration {route_name}: virtual_hosts[{vi}] ({}).routes[{ri}]",
                vh.name
            );
            let prefix = match r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()) {
                Some(route_match::PathSpecifier::Prefix(p)) => p.clone(),
                Some(route_match::PathSpecifier::Path(p)) => p.clone(),
                None => "/".to_owned(),
                Some(_) => {
                    return Err(format!(
                        "{at}.match: only prefix and path matches are supported"
                    ));
                }
            };
            let Some(route::Action::Route(action)) = &r.action else {
                return Err(format!("{at}: only route actions are supported"));
            };
            let targets = match &action.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) => vec![Target {
                    cluster: c.clone(),
                    weight: 1,
                }],
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
                    .clusters
                    .iter()
                    .map(|c| Target {
                        cluster: c.name.clone(),
                        weight: c.weight.as_ref().map(|w| w.value).unwrap_or(0),
                    })
                    .collect(),
                _ => return Err(format!("{at}.route: needs a cluster or weighted clusters")),
            };
            let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
            if total == 0 {
                return Err(format!(
                    "{at}.route.weighted_clusters: the weights sum to 0"
                ));
            }
            let hash_key = action.hash_policy.iter().find_map(|h| {
                use ferry_proto::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier;
                match &h.policy_specifier {
                    Some(PolicySpecifier::Header(header)) => {
                        http::HeaderName::from_bytes(header.header_name.as_bytes())
                            .ok()
                            .map(HashKey::Header)
                    }
                    Some(PolicySpecifier::Cookie(cookie)) if !cookie.name.is_empty() => {
                        Some(HashKey::Cookie(cookie.name.clone()))
                    }
                    _ => None,
                }
            });
            let timeout = action
                .timeout
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero());
            let retry = action
                .retry_policy
                .as_ref()
                .map(|p| {
                    RetryConfig::from_xds(p).map_err(|e| format!("{at}.route.retry_policy: {e}"))
                })
                .transpose()?
                .map(Arc::new);
            let route_upgrades: Vec<_> = action
                .upgrade_configs
                .iter()
                .map(|u| http_connection_manager::UpgradeConfig {
                    upgrade_type: u.upgrade_type.clone(),
                    enabled: u.enabled,
                    ..Default::default()
                })
                .collect();
            routes.push(Route {
                prefix,
                targets,
                hash_key,
                timeout,
                retry,
                upgrades: upgrades(&listener_upgrades, &route_upgrades),
            });
        }
        let host = Arc::new(VirtualHost {
            name: vh.name.clone(),
            routes,
        });
        for domain in &vh.domains {
            let d = domain.to_ascii_lowercase();
            let taken = if d == "*" {
                routing.any.replace(host.clone()).is_some()
            } else if let Some(suffix) = d.strip_prefix('*') {
                routing.suffixes.push((suffix.to_owned(), host.clone()));
                false
            } else if let Some(prefix) = d.strip_suffix('*') {
                routing.prefixes.push((prefix.to_owned(), host.clone()));
                false
            } else {
                routing.exact.insert(d.clone(), host.clone()).is_some()
            };
            if taken {
                return Err(format!(
                    "route configuration {route_name}: virtual_hosts[{vi}] ({}): domain {domain:?} is already used by another virtual host",
                    vh.name
                ));
            }
        }
    }
    Ok(routing)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_route_enables_and_disables_the_listeners_upgrades() {
        let config = |name: &str, enabled: Option<bool>| http_connection_manager::UpgradeConfig {
            upgrade_type: name.to_owned(),
            enabled: enabled.map(|value| ferry_proto::google::protobuf::BoolValue { value }),
            ..Default::default()
        };
        let listener = upgrades(&[], &[config("WebSocket", None)]);
        assert_eq!(listener, ["websocket"]);
        let route = upgrades(
            &listener,
            &[
                config("websocket", Some(false)),
                config("tls/1.3", Some(true)),
            ],
        );
        assert_eq!(route, ["tls/1.3"]);
        assert_eq!(upgrades(&listener, &[]), ["websocket"]);
    }

    use super::*;

    #[test]
    fn a_cookie_key_is_found_among_the_cookies() {
        let key = HashKey::Cookie("session".into());
        let mut headers = http::HeaderMap::new();
        assert_eq!(key.value(&headers), None);
        headers.append(
            http::header::COOKIE,
            "theme=dark; sessionx=no".parse().unwrap(),
        );
        assert_eq!(key.value(&headers), None, "a longer name is another cookie");
        headers.append(
            http::header::COOKIE,
            "a=1;session=u-42; b=2".parse().unwrap(),
        );
        assert_eq!(key.value(&headers), Some(&b"u-42"[..]));
        let header = HashKey::Header(http::HeaderName::from_static("x-user"));
        headers.insert("x-user", "alice".parse().unwrap());
        assert_eq!(header.value(&headers), Some(&b"alice"[..]));
    }
}
