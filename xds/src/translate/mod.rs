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
//! changed are translated again. Their resources replace the old ones in
//! the translator's last output, and the route configuration is assembled
//! from each service's encoded virtual hosts, only when one of them changed.
//!
//! Proxyless gRPC clients get resources of their own ([`grpc`]), made from
//! the same catalog and weights in the same pass and kept the same way.

mod clusters;
mod endpoints;
pub mod grpc;
#[cfg(test)]
mod grpc_tests;
mod listener;
mod routes;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_discovery::{CatalogSnapshot, Service, ServiceName, Weights};
use ferry_proto::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, config_source,
};
use ferry_proto::envoy::config::route::v3::weighted_cluster;
use ferry_proto::google::protobuf::{Duration as PbDuration, UInt32Value};

use crate::resources::{Resource, ResourceType};

pub use clusters::{HTTP_PROTOCOL_OPTIONS, UPSTREAM_TLS, cluster_resource_name, cluster_stat_name};
pub use routes::{EncodedVirtualHosts, IDEMPOTENT_METHODS};

use clusters::eds_cluster;
use endpoints::load_assignment;
use listener::listener;
use routes::{domains, route_configuration, virtual_host};

/// What translation needs besides the catalog.
#[derive(Debug, Clone)]
pub struct TranslateOptions {
    /// Name of the HTTP listener and of its route configuration.
    pub listener_name: String,
    /// Where proxies listen for user traffic.
    pub listener_addr: SocketAddr,
    pub connect_timeout: Duration,
    /// How clusters carry their upstream TLS material.
    pub upstream_tls: UpstreamTlsMode,
}

/// How a cluster's `UpstreamTlsContext` carries the CA bundle and client
/// certificate of a service's `tls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UpstreamTlsMode {
    /// As SDS secrets over ADS, by name: the control plane reads the files
    /// and every proxy gets renewed content without a cluster change.
    #[default]
    Sds,
    /// As file paths each proxy reads on its own host.
    Files,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            listener_name: "ferry_http".to_owned(),
            listener_addr: SocketAddr::from(([0, 0, 0, 0], 10_000)),
            connect_timeout: Duration::from_secs(1),
            upstream_tls: UpstreamTlsMode::default(),
        }
    }
}

/// What one service translates to.
#[derive(Debug, Clone, Default)]
pub struct ServiceResources {
    pub clusters: Vec<Arc<Resource>>,
    pub endpoints: Vec<Arc<Resource>>,
    /// One virtual host per port, already encoded for the route
    /// configuration.
    pub virtual_hosts: EncodedVirtualHosts,
    /// What gRPC clients get of the service.
    pub grpc: grpc::GrpcResources,
}

impl ServiceResources {
    /// Every cluster and load assignment, with its type.
    fn each(&self) -> impl Iterator<Item = (ResourceType, &Arc<Resource>)> {
        let clusters = self.clusters.iter().map(|c| (ResourceType::Cluster, c));
        let endpoints = self.endpoints.iter().map(|e| (ResourceType::Endpoint, e));
        clusters.chain(endpoints)
    }
}

/// One service's last translation and everything it was made from: while
/// these inputs are the same, so is the output.
#[derive(Debug)]
struct Cached {
    input: Arc<Service>,
    short_name_unique: bool,
    weights: Option<Weights>,
    output: ServiceResources,
}

impl Cached {
    fn holds(&self, service: &Arc<Service>, unique: bool, weights: Option<&Weights>) -> bool {
        self.short_name_unique == unique
            && self.weights.as_ref() == weights
            && (Arc::ptr_eq(&self.input, service) || *self.input == **service)
    }
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
pub type ResourceMaps = [BTreeMap<String, Arc<Resource>>; ResourceType::COUNT];

/// Translates catalog snapshots, re-translating only services that changed.
///
/// It keeps the resources of its last translation and edits them: a changed
/// service replaces its own clusters and load assignments, and the route
/// configuration is assembled again only when a virtual host changed (an
/// endpoint change that moves no weight leaves it as it was).
#[derive(Debug)]
pub struct Translator {
    options: TranslateOptions,
    cache: HashMap<ServiceName, Cached>,
    /// The last translation's resources.
    maps: ResourceMaps,
    /// The last translation's resources for gRPC clients.
    grpc_maps: ResourceMaps,
    /// Services translated by the last call, for metrics and tests.
    last_translated: usize,
}

impl Translator {
    pub fn new(options: TranslateOptions) -> Self {
        let listener = Arc::new(listener(&options));
        let mut maps: ResourceMaps = Default::default();
        maps[ResourceType::Listener.index()].insert(listener.name.clone(), listener);
        let routes = Arc::new(route_configuration(&options.listener_name, []));
        maps[ResourceType::Route.index()].insert(routes.name.clone(), routes);
        Self {
            options,
            cache: HashMap::new(),
            maps,
            grpc_maps: ResourceMaps::default(),
            last_translated: 0,
        }
    }

    /// How many services the last [`Translator::translate`] call translated.
    pub fn last_translated(&self) -> usize {
        self.last_translated
    }

    /// What gRPC clients are served after the last translation, by type.
    pub fn grpc_resources(&self) -> ResourceMaps {
        self.grpc_maps.clone()
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
        self.last_translated = 0;
        let ambiguous = ambiguous_short_names(catalog);
        let mut hosts_changed = false;
        for (name, service) in &catalog.services {
            let unique = !ambiguous.contains(name.name());
            hosts_changed |= self.service(service, unique, overrides.get(name));
        }
        hosts_changed |= self.forget_removed(catalog);
        if hosts_changed {
            self.assemble_routes(catalog);
        }
        self.maps.clone()
    }

    /// Drops the services the catalog no longer has; returns whether any
    /// was dropped (their virtual hosts go with them). Called once every
    /// catalog service is cached, so equal counts mean nothing to drop.
    fn forget_removed(&mut self, catalog: &CatalogSnapshot) -> bool {
        if self.cache.len() == catalog.services.len() {
            return false;
        }
        let removed: Vec<ServiceName> = self
            .cache
            .keys()
            .filter(|name| !catalog.services.contains_key(*name))
            .cloned()
            .collect();
        for name in &removed {
            if let Some(gone) = self.cache.remove(name) {
                self.unpublish(&gone.output);
            }
        }
        !removed.is_empty()
    }

    /// Translates `service` unless its cached output still holds; returns
    /// whether its virtual hosts changed.
    fn service(
        &mut self,
        service: &Arc<Service>,
        short_name_unique: bool,
        weights: Option<&Weights>,
    ) -> bool {
        let cached = self.cache.get(&service.name);
        if cached.is_some_and(|c| c.holds(service, short_name_unique, weights)) {
            return false;
        }
        self.last_translated += 1;
        let output = translate_service(service, weights, short_name_unique, &self.options);
        let hosts_changed = cached.is_none_or(|c| c.output.virtual_hosts != output.virtual_hosts);
        for (kind, resource) in output.each() {
            self.maps[kind.index()].insert(resource.name.clone(), resource.clone());
        }
        for (kind, resource) in output.grpc.each() {
            self.grpc_maps[kind.index()].insert(resource.name.clone(), resource.clone());
        }
        let previous = self.cache.insert(
            service.name.clone(),
            Cached {
                input: service.clone(),
                short_name_unique,
                weights: weights.cloned(),
                output,
            },
        );
        if let Some(previous) = previous {
            self.unpublish_stale(&service.name, &previous.output);
        }
        hosts_changed
    }

    /// Removes a dropped service's clusters and load assignments.
    fn unpublish(&mut self, output: &ServiceResources) {
        for (kind, resource) in output.each() {
            self.maps[kind.index()].remove(&resource.name);
        }
        for (kind, resource) in output.grpc.each() {
            remove_own(&mut self.grpc_maps[kind.index()], resource);
        }
    }

    /// Removes what `previous` had and the service's current output has
    /// not (a port or a cluster it lost).
    fn unpublish_stale(&mut self, service: &ServiceName, previous: &ServiceResources) {
        let Some(current) = self.cache.get(service) else {
            return;
        };
        for (kind, resource) in previous.each() {
            let kept = current
                .output
                .each()
                .any(|(k, r)| k == kind && r.name == resource.name);
            if !kept {
                self.maps[kind.index()].remove(&resource.name);
            }
        }
        for (kind, resource) in previous.grpc.each() {
            let kept = current
                .output
                .grpc
                .each()
                .any(|(k, r)| k == kind && r.name == resource.name);
            if !kept {
                remove_own(&mut self.grpc_maps[kind.index()], resource);
            }
        }
    }

    /// Joins every service's encoded virtual hosts, in catalog order, into
    /// the route configuration.
    fn assemble_routes(&mut self, catalog: &CatalogSnapshot) {
        let parts = catalog
            .services
            .keys()
            .filter_map(|name| self.cache.get(name))
            .map(|c| &c.output.virtual_hosts);
        let routes = route_configuration(&self.options.listener_name, parts);
        self.maps[ResourceType::Route.index()].insert(routes.name.clone(), Arc::new(routes));
    }
}

/// Removes `resource` from `map` unless another service's resource of the
/// same name has taken its place since.
fn remove_own(map: &mut BTreeMap<String, Arc<Resource>>, resource: &Arc<Resource>) {
    if map
        .get(&resource.name)
        .is_some_and(|r| Arc::ptr_eq(r, resource))
    {
        map.remove(&resource.name);
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
    let mut virtual_hosts = Vec::with_capacity(service.ports.len());
    let applicable = policy.filter(|w| {
        w.iter()
            .any(|(c, bp)| bp.basis_points() > 0 && service.backends.contains_key(c))
    });
    let weights = applicable.cloned().or_else(|| service.effective_weights());
    out.grpc = grpc::translate(service, weights.as_ref(), short_name_unique);
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
        virtual_hosts.push(virtual_host(
            format!("{}:{}", service.name, port.port),
            domains,
            weighted,
            service.sticky.as_ref(),
            &service.requests,
        ));
    }
    out.virtual_hosts = EncodedVirtualHosts::new(virtual_hosts);
    out
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

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}
