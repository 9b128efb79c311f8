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

mod clusters;
mod endpoints;
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
use ferry_proto::envoy::config::route::v3::{RouteConfiguration, VirtualHost, weighted_cluster};
use ferry_proto::google::protobuf::{Duration as PbDuration, UInt32Value};

use crate::resources::{Resource, ResourceType};

pub use clusters::{HTTP_PROTOCOL_OPTIONS, UPSTREAM_TLS, cluster_resource_name, cluster_stat_name};
pub use routes::IDEMPOTENT_METHODS;

use clusters::eds_cluster;
use endpoints::load_assignment;
use listener::listener;
use routes::{domains, virtual_host};

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
