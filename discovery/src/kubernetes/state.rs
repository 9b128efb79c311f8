//! What one cluster's watchers know: mirrors of its Services,
//! EndpointSlices and ServiceExports, folded into that cluster's backends.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::DynamicObject;
use kube::runtime::watcher::Event;

use super::cluster::Change;
use super::{EXPORT_LABEL, SERVICE_NAME_LABEL, ServiceExports};
use crate::model::{
    Backend, Endpoint, EndpointState, Protocol, RequestPolicy, Service, ServicePort,
};
use crate::names::{ClusterName, ServiceName};

/// `(namespace, name)` of an object.
pub type Key = (String, String);

fn key_of<K: ResourceExt>(obj: &K) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// A mirror of one kind of object across a cluster's watch streams. During
/// a (re-)list the old objects stay until the list completes.
#[derive(Debug)]
pub(super) struct Mirror<T> {
    pub(super) live: HashMap<Key, T>,
    pending: HashMap<usize, HashMap<Key, T>>,
    pub(super) listed: BTreeSet<usize>,
}

impl<T> Default for Mirror<T> {
    fn default() -> Self {
        Self {
            live: HashMap::new(),
            pending: HashMap::new(),
            listed: BTreeSet::new(),
        }
    }
}

impl<T> Mirror<T> {
    /// Applies one event; returns the (old, new) values of changed keys.
    pub(super) fn apply<K: ResourceExt>(
        &mut self,
        stream: usize,
        scope: Option<&str>,
        event: Event<K>,
        convert: impl Fn(&K) -> T,
    ) -> Vec<(Key, Option<T>)> {
        match event {
            Event::Apply(obj) => {
                let key = key_of(&obj);
                let old = self.live.insert(key.clone(), convert(&obj));
                vec![(key, old)]
            }
            Event::Delete(obj) => {
                let key = key_of(&obj);
                let old = self.live.remove(&key);
                vec![(key, old)]
            }
            Event::Init => {
                self.pending.insert(stream, HashMap::new());
                Vec::new()
            }
            Event::InitApply(obj) => {
                self.pending
                    .entry(stream)
                    .or_default()
                    .insert(key_of(&obj), convert(&obj));
                Vec::new()
            }
            Event::InitDone => {
                let fresh = self.pending.remove(&stream).unwrap_or_default();
                self.listed.insert(stream);
                let in_scope = |k: &Key| scope.is_none_or(|ns| ns == k.0);
                let gone: Vec<Key> = self
                    .live
                    .keys()
                    .filter(|k| in_scope(k) && !fresh.contains_key(*k))
                    .cloned()
                    .collect();
                let mut touched = Vec::new();
                for key in gone {
                    let old = self.live.remove(&key);
                    touched.push((key, old));
                }
                for (key, value) in fresh {
                    let old = self.live.insert(key.clone(), value);
                    touched.push((key, old));
                }
                touched
            }
        }
    }
}

/// What Ferry keeps of every Service, exported or not.
#[derive(Debug, Clone, PartialEq)]
struct ServiceSummary {
    ports: Vec<ServicePort>,
    /// From the first port's `appProtocol` (`kubernetes.io/h2c`, `grpc`).
    protocol: Protocol,
    /// Carries `ferry.io/export=true`.
    labelled: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct SliceSummary {
    service: Option<String>,
    /// By address, one per address (the readiest state wins): the form a
    /// backend holds, so a service's only slice can share its list with
    /// the backend.
    endpoints: Arc<[Endpoint]>,
}

/// What one cluster's watchers know: a mirror of its Services,
/// ServiceExports and EndpointSlices, and the backends the exported
/// Services make.
#[derive(Debug)]
pub struct ClusterState {
    cluster: ClusterName,
    scopes: Vec<Option<String>>,
    services: Mirror<ServiceSummary>,
    slices: Mirror<SliceSummary>,
    /// Which ServiceExports exist (their content does not matter).
    exports: Mirror<()>,
    service_exports: ServiceExports,
    /// Slices by the service they belong to.
    by_service: HashMap<Key, BTreeSet<Key>>,
    streams: usize,
    pub(super) synced_once: bool,
    pub(super) last_sync: Option<Instant>,
}

impl ClusterState {
    pub fn new(cluster: ClusterName) -> Self {
        Self {
            cluster,
            scopes: Vec::new(),
            services: Mirror::default(),
            slices: Mirror::default(),
            exports: Mirror::default(),
            service_exports: ServiceExports::Unknown,
            by_service: HashMap::new(),
            streams: 0,
            synced_once: false,
            last_sync: None,
        }
    }

    /// Starts a watcher generation over `namespaces` (empty: all).
    pub fn begin_generation(&mut self, namespaces: &[String]) {
        self.scopes = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.iter().cloned().map(Some).collect()
        };
        self.streams = 3 * self.scopes.len();
        self.services.listed.clear();
        self.slices.listed.clear();
        self.exports.listed.clear();
        self.services.pending.clear();
        self.slices.pending.clear();
        self.exports.pending.clear();
    }

    pub(super) fn all_listed(&self) -> bool {
        self.services.listed.len() + self.slices.listed.len() + self.exports.listed.len()
            >= self.streams
    }

    /// Whether the cluster's ServiceExports are watched (the last word of
    /// any of its export streams).
    pub fn service_exports(&self) -> ServiceExports {
        self.service_exports
    }

    /// Exported services and all endpoints.
    pub(super) fn counts(&self) -> (usize, usize) {
        let endpoints = self.slices.live.values().map(|s| s.endpoints.len()).sum();
        let services = self
            .services
            .live
            .iter()
            .filter(|(key, summary)| self.is_exported(key, summary))
            .count();
        (services, endpoints)
    }

    /// Labelled, or named by a ServiceExport.
    fn is_exported(&self, key: &Key, summary: &ServiceSummary) -> bool {
        summary.labelled || self.exports.live.contains_key(key)
    }

    /// Applies a change; returns the services it touched.
    pub fn apply(&mut self, change: Change) -> BTreeSet<Key> {
        let mut touched = BTreeSet::new();
        match change {
            Change::Service(i, event) => {
                let scope = self.scope(i);
                for (key, _) in self
                    .services
                    .apply(i, scope.as_deref(), *event, service_summary)
                {
                    touched.insert(key);
                }
            }
            Change::Slice(i, event) => {
                let scope = self.scope(i);
                for (key, old) in self
                    .slices
                    .apply(i, scope.as_deref(), *event, slice_summary)
                {
                    if let Some(svc) = old.and_then(|o| o.service) {
                        let svc_key = (key.0.clone(), svc);
                        if let Some(set) = self.by_service.get_mut(&svc_key) {
                            set.remove(&key);
                        }
                        touched.insert(svc_key);
                    }
                    if let Some(svc) = self.slices.live.get(&key).and_then(|s| s.service.clone()) {
                        let svc_key = (key.0.clone(), svc);
                        self.by_service
                            .entry(svc_key.clone())
                            .or_default()
                            .insert(key);
                        touched.insert(svc_key);
                    }
                }
            }
            Change::Export(i, event) => {
                // `Init` comes before the list request; anything after it
                // means the kind is served.
                if !matches!(*event, Event::Init) {
                    self.service_exports = ServiceExports::Watched;
                }
                let scope = self.scope(i);
                let changed = self.exports.apply(i, scope.as_deref(), *event, |_| ());
                touched.extend(changed.into_iter().map(|(key, _)| key));
            }
            Change::ExportsUnavailable(i, why) => {
                self.service_exports = why;
                let scope = self.scope(i);
                self.exports
                    .apply(i, scope.as_deref(), Event::<DynamicObject>::Init, |_| ());
                let changed = self.exports.apply(
                    i,
                    scope.as_deref(),
                    Event::<DynamicObject>::InitDone,
                    |_| (),
                );
                touched.extend(changed.into_iter().map(|(key, _)| key));
            }
        }
        touched
    }

    /// The namespace stream `i` (of each kind) watches; `None` for all.
    fn scope(&self, stream: usize) -> Option<String> {
        self.scopes.get(stream).cloned().flatten()
    }

    /// This cluster's view of the touched services: exported ones as
    /// upserts, the rest as removals.
    pub fn contributions(&self, touched: &BTreeSet<Key>) -> (Vec<Service>, Vec<ServiceName>) {
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for key in touched {
            let Ok(name) = ServiceName::new(&key.1, &key.0) else {
                continue;
            };
            let Some(summary) = self
                .services
                .live
                .get(key)
                .filter(|summary| self.is_exported(key, summary))
            else {
                removals.push(name);
                continue;
            };
            if summary.ports.is_empty() {
                removals.push(name);
                continue;
            }
            upserts.push(Service {
                name,
                ports: summary.ports.clone(),
                hosts: Vec::new(),
                backends: BTreeMap::from([(
                    self.cluster.clone(),
                    self.backend(key, &summary.ports),
                )]),
                weights: None,
                sticky: None,
                requests: RequestPolicy {
                    protocol: summary.protocol,
                    ..Default::default()
                },
            });
        }
        (upserts, removals)
    }

    /// The service's endpoints in this cluster: every slice's endpoints,
    /// duplicates across slices folded (the readiest state wins). A service
    /// with one slice whose endpoints name exactly the service's ports
    /// (the common case) shares that slice's list: the endpoints are held
    /// once, by the slice, the catalog and its snapshots alike.
    fn backend(&self, service: &Key, ports: &[ServicePort]) -> Backend {
        let mut slices = self
            .by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| self.slices.live.get(key));
        let (first, second) = (slices.next(), slices.next());
        if let (Some(only), None) = (first, second)
            && only
                .endpoints
                .iter()
                .all(|e| names_exactly(&e.ports, ports))
        {
            return Backend {
                endpoints: only.endpoints.clone(),
            };
        }
        let mut by_ip: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
        for slice in first.into_iter().chain(second).chain(slices) {
            for endpoint in slice.endpoints.iter() {
                let mut endpoint = endpoint.clone();
                // Service ports without a matching slice port use the
                // service port number, as kube-proxy would.
                for p in ports {
                    endpoint.ports.entry(p.name.clone()).or_insert(p.port);
                }
                endpoint
                    .ports
                    .retain(|name, _| ports.iter().any(|p| &p.name == name));
                fold(&mut by_ip, endpoint);
            }
        }
        Backend {
            endpoints: by_ip.into_values().collect(),
        }
    }
}

/// Whether an endpoint's ports are exactly the service's port names (so
/// adding the missing ones and dropping the others would change nothing).
fn names_exactly(endpoint_ports: &BTreeMap<String, u16>, ports: &[ServicePort]) -> bool {
    endpoint_ports.len() == ports.len()
        && ports.iter().all(|p| endpoint_ports.contains_key(&p.name))
}

/// Adds `endpoint` to `by_ip`; of two at one address the readiest stays.
fn fold(by_ip: &mut BTreeMap<IpAddr, Endpoint>, endpoint: Endpoint) {
    match by_ip.entry(endpoint.ip) {
        std::collections::btree_map::Entry::Vacant(slot) => {
            slot.insert(endpoint);
        }
        std::collections::btree_map::Entry::Occupied(mut slot) => {
            if endpoint.state < slot.get().state {
                slot.insert(endpoint);
            }
        }
    }
}

fn service_summary(svc: &KubeService) -> ServiceSummary {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| {
                    let port = u16::try_from(p.port).ok().filter(|p| *p > 0)?;
                    Some(ServicePort {
                        name: p.name.clone().unwrap_or_default(),
                        port,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let labelled = svc.labels().get(EXPORT_LABEL).is_some_and(|v| v == "true");
    // The first port is the service's default; its appProtocol says how
    // proxies must speak to the endpoints.
    let protocol = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|ports| ports.first())
        .and_then(|p| p.app_protocol.as_deref())
        .map(|a| match a.to_ascii_lowercase().as_str() {
            "kubernetes.io/h2c" | "h2c" | "grpc" | "http2" => Protocol::Http2,
            _ => Protocol::Http1,
        })
        .unwrap_or_default();
    ServiceSummary {
        ports,
        protocol,
        labelled,
    }
}

fn slice_summary(slice: &EndpointSlice) -> SliceSummary {
    let service = slice.labels().get(SERVICE_NAME_LABEL).cloned();
    let ports: BTreeMap<String, u16> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let port = u16::try_from(p.port?).ok().filter(|p| *p > 0)?;
            Some((p.name.clone().unwrap_or_default(), port))
        })
        .collect();
    let mut by_ip = BTreeMap::new();
    for e in slice.endpoints.iter().flatten() {
        let conditions = e.conditions.clone().unwrap_or_default();
        // Kubernetes: an unset `ready` means ready.
        let state = if conditions.terminating.unwrap_or(false) {
            EndpointState::Terminating
        } else if conditions.ready.unwrap_or(true) {
            EndpointState::Ready
        } else {
            EndpointState::NotReady
        };
        for address in &e.addresses {
            let Ok(ip) = address.parse::<IpAddr>() else {
                continue;
            };
            let endpoint = Endpoint {
                ip,
                ports: ports.clone(),
                state,
                zone: e.zone.clone(),
            };
            fold(&mut by_ip, endpoint);
        }
    }
    SliceSummary {
        service,
        endpoints: by_ip.into_values().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort as KubePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{
        Endpoint as KubeEndpoint, EndpointConditions, EndpointPort,
    };
    use kube::api::{ApiResource, GroupVersionKind, ObjectMeta};

    use crate::kubernetes::{
        SERVICE_EXPORT_GROUP, SERVICE_EXPORT_KIND, SERVICE_EXPORT_PLURAL, SERVICE_EXPORT_VERSION,
    };

    fn svc(name: &str) -> KubeService {
        KubeService {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some(BTreeMap::from([(EXPORT_LABEL.into(), "true".into())])),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(vec![KubePort {
                    name: Some("http".into()),
                    port: 8080,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(name: &str, service: &str, endpoints: &[(&str, bool, bool)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.into(),
                    service.into(),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(ip, ready, terminating)| KubeEndpoint {
                        addresses: vec![ip.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(*ready),
                            serving: Some(*ready),
                            terminating: Some(*terminating),
                        }),
                        zone: Some("z1".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(9000),
                ..Default::default()
            }]),
        }
    }

    fn sv(event: Event<KubeService>) -> Change {
        Change::Service(0, Box::new(event))
    }

    fn sl(event: Event<EndpointSlice>) -> Change {
        Change::Slice(0, Box::new(event))
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::new(ClusterName::new("east").unwrap());
        s.begin_generation(&[]);
        s
    }

    fn endpoints(s: &ClusterState) -> Vec<(String, EndpointState)> {
        let touched = BTreeSet::from([("shop".to_owned(), "checkout".to_owned())]);
        let (upserts, _) = s.contributions(&touched);
        upserts
            .first()
            .map(|svc| {
                svc.backends[&s.cluster]
                    .endpoints
                    .iter()
                    .map(|e| (format!("{}:{}", e.ip, e.ports["http"]), e.state))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn slices_fold_into_one_backend_with_readiness() {
        let mut s = state();
        s.apply(sv(Event::Apply(svc("checkout"))));
        s.apply(sl(Event::Apply(slice(
            "a",
            "checkout",
            &[("10.0.0.1", true, false), ("10.0.0.2", false, false)],
        ))));
        // The same pod in a second slice, ready there: folded, readiest wins.
        s.apply(sl(Event::Apply(slice(
            "b",
            "checkout",
            &[("10.0.0.2", true, false), ("10.0.0.3", false, true)],
        ))));
        assert_eq!(
            endpoints(&s),
            [
                ("10.0.0.1:9000".into(), EndpointState::Ready),
                ("10.0.0.2:9000".into(), EndpointState::Ready),
                ("10.0.0.3:9000".into(), EndpointState::Terminating),
            ]
        );
        let touched = s.apply(sl(Event::Delete(slice("b", "checkout", &[]))));
        assert!(touched.contains(&("shop".to_owned(), "checkout".to_owned())));
        assert_eq!(endpoints(&s).len(), 2);
    }

    #[test]
    fn a_service_with_one_slice_shares_its_endpoint_list() {
        let mut s = state();
        s.apply(sv(Event::Apply(svc("checkout"))));
        s.apply(sl(Event::Apply(slice(
            "a",
            "checkout",
            &[("10.0.0.2", true, false), ("10.0.0.1", false, false)],
        ))));
        let backend = |s: &ClusterState| {
            let (upserts, _) = s.contributions(&BTreeSet::from([checkout()]));
            upserts[0].backends[&s.cluster].clone()
        };
        let first = backend(&s);
        assert!(
            first.shares_endpoints(&backend(&s)),
            "each contribution shares the slice's list"
        );
        assert_eq!(
            endpoints(&s),
            [
                ("10.0.0.1:9000".into(), EndpointState::NotReady),
                ("10.0.0.2:9000".into(), EndpointState::Ready),
            ],
            "by address"
        );
        // A second slice: the backend is a fold of both, a list of its own.
        s.apply(sl(Event::Apply(slice(
            "b",
            "checkout",
            &[("10.0.0.3", true, false)],
        ))));
        let folded = backend(&s);
        assert_eq!(folded.endpoints.len(), 3);
        assert!(!folded.shares_endpoints(&first));
    }

    #[test]
    fn a_relist_keeps_old_endpoints_until_it_completes() {
        let mut s = state();
        s.apply(sv(Event::Apply(svc("checkout"))));
        s.apply(sl(Event::Apply(slice(
            "a",
            "checkout",
            &[("10.0.0.1", true, false)],
        ))));
        // The watcher restarts (after an outage or a 410) and lists again.
        s.begin_generation(&[]);
        s.apply(sl(Event::Init));
        s.apply(sl(Event::InitApply(slice(
            "c",
            "checkout",
            &[("10.0.0.9", true, false)],
        ))));
        assert_eq!(
            endpoints(&s),
            [("10.0.0.1:9000".into(), EndpointState::Ready)],
            "old kept mid-list"
        );
        assert!(!s.all_listed());
        let touched = s.apply(sl(Event::InitDone));
        assert!(touched.contains(&("shop".to_owned(), "checkout".to_owned())));
        assert_eq!(
            endpoints(&s),
            [("10.0.0.9:9000".into(), EndpointState::Ready)],
            "converged, no phantom"
        );
    }

    #[test]
    fn an_unexported_service_is_removed() {
        let mut s = state();
        s.apply(sv(Event::Apply(svc("checkout"))));
        let touched = s.apply(sv(Event::Delete(svc("checkout"))));
        let (upserts, removals) = s.contributions(&touched);
        assert!(upserts.is_empty());
        assert_eq!(removals, [ServiceName::new("checkout", "shop").unwrap()]);
    }

    fn unlabelled(name: &str) -> KubeService {
        let mut service = svc(name);
        service.metadata.labels = None;
        service
    }

    fn export(name: &str) -> DynamicObject {
        let kind = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(
                SERVICE_EXPORT_GROUP,
                SERVICE_EXPORT_VERSION,
                SERVICE_EXPORT_KIND,
            ),
            SERVICE_EXPORT_PLURAL,
        );
        DynamicObject::new(name, &kind).within("shop")
    }

    fn ex(event: Event<DynamicObject>) -> Change {
        Change::Export(0, Box::new(event))
    }

    fn checkout() -> Key {
        ("shop".to_owned(), "checkout".to_owned())
    }

    fn exported(s: &ClusterState) -> bool {
        let (upserts, removals) = s.contributions(&BTreeSet::from([checkout()]));
        assert_eq!(upserts.len() + removals.len(), 1);
        !upserts.is_empty()
    }

    #[test]
    fn a_service_export_exports_an_unlabelled_service_until_deleted() {
        let mut s = state();
        s.apply(sv(Event::Apply(unlabelled("checkout"))));
        s.apply(sl(Event::Apply(slice(
            "a",
            "checkout",
            &[("10.0.0.1", true, false)],
        ))));
        assert!(!exported(&s), "neither label nor ServiceExport");
        assert_eq!(s.counts().0, 0);

        let touched = s.apply(ex(Event::Apply(export("checkout"))));
        assert_eq!(touched, BTreeSet::from([checkout()]), "that service only");
        assert!(exported(&s));
        assert_eq!(s.service_exports(), ServiceExports::Watched);
        assert_eq!(
            endpoints(&s),
            [("10.0.0.1:9000".into(), EndpointState::Ready)]
        );
        assert_eq!(s.counts().0, 1);

        let touched = s.apply(ex(Event::Delete(export("checkout"))));
        assert_eq!(touched, BTreeSet::from([checkout()]));
        assert!(!exported(&s));
    }

    #[test]
    fn the_label_or_a_service_export_is_enough() {
        let mut s = state();
        s.apply(sv(Event::Apply(svc("checkout"))));
        s.apply(ex(Event::Apply(export("checkout"))));
        s.apply(sv(Event::Apply(unlabelled("checkout"))));
        assert!(exported(&s), "still named by its ServiceExport");
        s.apply(sv(Event::Apply(svc("checkout"))));
        s.apply(ex(Event::Delete(export("checkout"))));
        assert!(exported(&s), "still labelled");
        s.apply(sv(Event::Delete(svc("checkout"))));
        assert!(!exported(&s), "no Service, nothing to export");
        // A ServiceExport without its Service exports nothing.
        s.apply(ex(Event::Apply(export("checkout"))));
        assert!(!exported(&s));
    }

    #[test]
    fn an_unavailable_export_kind_counts_as_listed_and_empty() {
        let mut s = state();
        for change in [
            sv(Event::Init),
            sv(Event::InitApply(unlabelled("checkout"))),
            sv(Event::InitDone),
            sl(Event::Init),
            sl(Event::InitDone),
            ex(Event::Init),
            ex(Event::InitApply(export("checkout"))),
            ex(Event::InitDone),
        ] {
            assert!(!s.all_listed());
            s.apply(change);
        }
        assert!(s.all_listed());
        assert!(exported(&s));

        // The CRD goes away; the next generation cannot list the kind.
        s.begin_generation(&[]);
        s.apply(sv(Event::Init));
        s.apply(sv(Event::InitApply(unlabelled("checkout"))));
        s.apply(sv(Event::InitDone));
        s.apply(sl(Event::Init));
        s.apply(sl(Event::InitDone));
        assert!(!s.all_listed(), "waits for the export stream");
        assert!(exported(&s), "old exports kept until the kind answers");
        let touched = s.apply(Change::ExportsUnavailable(0, ServiceExports::NotInstalled));
        assert!(s.all_listed());
        assert_eq!(touched, BTreeSet::from([checkout()]));
        assert!(!exported(&s));
        assert_eq!(s.service_exports(), ServiceExports::NotInstalled);
    }
}
