//! The catalog: immutable, versioned snapshots of every service, published
//! to subscribers on each change.
//!
//! A source hands the catalog its whole view; services equal to the ones
//! already held keep their `Arc`, so consumers can skip unchanged services
//! by pointer comparison and re-translate only what moved.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::model::{RequestPolicy, Service};
use crate::names::ServiceName;

/// One immutable view of every service. Version 0 is the empty catalog
/// before any source has loaded.
#[derive(Debug, Clone)]
pub struct CatalogSnapshot {
    pub version: u64,
    pub services: BTreeMap<ServiceName, Arc<Service>>,
    /// When this snapshot was published; push latency is measured from here.
    pub published_at: Instant,
}

impl CatalogSnapshot {
    fn empty() -> Self {
        Self {
            version: 0,
            services: BTreeMap::new(),
            published_at: Instant::now(),
        }
    }

    /// Whether any source has loaded.
    pub fn is_loaded(&self) -> bool {
        self.version > 0
    }

    pub fn endpoint_count(&self) -> usize {
        self.services
            .values()
            .flat_map(|s| s.backends.values())
            .map(|b| b.endpoints.len())
            .sum()
    }
}

/// Holds the current snapshot and notifies subscribers of new ones.
///
/// Several sources feed one catalog (the catalog file, one per Kubernetes
/// cluster); each contributes services by name. The merged service takes
/// its ports and declared weights from the first source (in source-id
/// order) that has them, and the union of every source's backends and
/// hosts (on a cluster named by two sources, the first with endpoints
/// wins). Updates are incremental: only the services a change names are
/// merged again.
#[derive(Debug)]
pub struct Catalog {
    sources: Mutex<BTreeMap<String, BTreeMap<ServiceName, Arc<Service>>>>,
    tx: watch::Sender<Arc<CatalogSnapshot>>,
}

/// The source id of the catalog file.
pub const FILE_SOURCE: &str = "file";

impl Default for Catalog {
    fn default() -> Self {
        Self::new()
    }
}

impl Catalog {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(CatalogSnapshot::empty()));
        Self {
            sources: Mutex::new(BTreeMap::new()),
            tx,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<CatalogSnapshot>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<CatalogSnapshot> {
        self.tx.borrow().clone()
    }

    /// Replaces the catalog file's services (see [`Catalog::set_source`]).
    pub fn replace(&self, services: Vec<Service>) -> bool {
        self.set_source(FILE_SOURCE, services)
    }

    /// Replaces everything `source` contributes. Publishes a new version
    /// only when the merged catalog changed (or on the first load); returns
    /// whether it did.
    ///
    /// A service equal to the one held keeps the held `Arc` and is not
    /// merged again; only added, changed and removed services are. Equal
    /// backends that share their endpoint list compare by pointer, so an
    /// unchanged view costs one comparison per service and copies nothing.
    pub fn set_source(&self, source: &str, services: Vec<Service>) -> bool {
        let mut sources = self.lock();
        let entry = sources.entry(source.to_owned()).or_default();
        let mut previous = std::mem::take(entry);
        let mut touched = BTreeSet::new();
        for service in services {
            match previous.remove_entry(&service.name) {
                Some((name, old)) if *old == service => {
                    entry.insert(name, old);
                }
                held => {
                    let name = match held {
                        Some((name, _)) => name,
                        None => service.name.clone(),
                    };
                    touched.insert(name.clone());
                    entry.insert(name, Arc::new(service));
                }
            }
        }
        // What the source no longer has.
        touched.extend(previous.into_keys());
        self.publish(&sources, touched)
    }

    /// Applies a partial change from `source`: services added or replaced,
    /// and services it no longer has.
    pub fn update_source(
        &self,
        source: &str,
        upserts: Vec<Service>,
        removals: Vec<ServiceName>,
    ) -> bool {
        let mut sources = self.lock();
        let entry = sources.entry(source.to_owned()).or_default();
        let mut touched = BTreeSet::new();
        for name in removals {
            if entry.remove(&name).is_some() {
                touched.insert(name);
            }
        }
        for service in upserts {
            if entry.get(&service.name).is_some_and(|old| **old == service) {
                continue;
            }
            touched.insert(service.name.clone());
            entry.insert(service.name.clone(), Arc::new(service));
        }
        self.publish(&sources, touched)
    }

    /// Drops everything `source` contributed (a source deliberately removed).
    pub fn remove_source(&self, source: &str) -> bool {
        let mut sources = self.lock();
        let Some(old) = sources.remove(source) else {
            return false;
        };
        self.publish(&sources, old.into_keys().collect())
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<ServiceName, Arc<Service>>>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-merges the `touched` services and publishes if anything changed.
    fn publish(
        &self,
        sources: &BTreeMap<String, BTreeMap<ServiceName, Arc<Service>>>,
        touched: BTreeSet<ServiceName>,
    ) -> bool {
        let current = self.current();
        // What changes, found before anything is copied: a no-op update
        // (a relist, an unchanged file) costs no copy of the catalog.
        let mut changes: Vec<(ServiceName, Option<Arc<Service>>)> = Vec::new();
        for name in touched {
            let merged = merge(sources.values().filter_map(|s| s.get(&name)));
            match (merged, current.services.get(&name)) {
                (None, None) => {}
                (Some(m), Some(old)) if Arc::ptr_eq(old, &m) || **old == *m => {}
                (merged, _) => changes.push((name, merged)),
            }
        }
        if changes.is_empty() && current.is_loaded() {
            return false;
        }
        let mut services = current.services.clone();
        for (name, merged) in changes {
            match merged {
                Some(m) => services.insert(name, m),
                None => services.remove(&name),
            };
        }
        let snapshot = CatalogSnapshot {
            version: current.version + 1,
            services,
            published_at: Instant::now(),
        };
        metrics::gauge!("ferry_discovery_catalog_version").set(snapshot.version as f64);
        metrics::gauge!("ferry_discovery_services").set(snapshot.services.len() as f64);
        metrics::gauge!("ferry_discovery_endpoints").set(snapshot.endpoint_count() as f64);
        tracing::debug!(
            version = snapshot.version,
            services = snapshot.services.len(),
            "catalog updated"
        );
        self.tx.send_replace(Arc::new(snapshot));
        true
    }
}

/// Merges one service's contributions, in source order. A single
/// contribution is shared as is.
fn merge<'a>(mut parts: impl Iterator<Item = &'a Arc<Service>>) -> Option<Arc<Service>> {
    let first = parts.next()?;
    let mut rest = parts.peekable();
    if rest.peek().is_none() {
        return Some(first.clone());
    }
    let mut merged = (**first).clone();
    for part in rest {
        for (cluster, backend) in &part.backends {
            // A static backend with no endpoints (listed only so weights
            // can name its cluster) gives way to a discovered one.
            let slot = merged.backends.entry(cluster.clone()).or_default();
            if slot.endpoints.is_empty() {
                slot.clone_from(backend);
            }
        }
        for host in &part.hosts {
            if !merged.hosts.contains(host) {
                merged.hosts.push(host.clone());
            }
        }
        if merged.sticky.is_none() {
            merged.sticky.clone_from(&part.sticky);
        }
        if merged.requests == RequestPolicy::default() {
            merged.requests.clone_from(&part.requests);
        }
        if merged.weights.is_none() {
            merged.weights.clone_from(&part.weights);
        }
    }
    Some(Arc::new(merged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, ServicePort};
    use crate::names::ClusterName;

    fn service(name: &str, endpoints: usize) -> Service {
        let ip = "10.0.0.1".parse().unwrap_or_else(|_| unreachable!());
        let endpoint = crate::model::Endpoint {
            ip,
            ports: BTreeMap::from([("http".to_owned(), 8080)]),
            state: crate::model::EndpointState::Ready,
            zone: None,
        };
        Service {
            name: ServiceName::new(name, "shop").unwrap(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 8080,
            }],
            hosts: vec![],
            backends: BTreeMap::from([(
                ClusterName::new("old").unwrap(),
                Backend::from(vec![endpoint; endpoints]),
            )]),
            weights: None,
            sticky: None,
            requests: Default::default(),
        }
    }

    #[test]
    fn unchanged_services_keep_their_arc_and_version() {
        let catalog = Catalog::new();
        assert!(!catalog.current().is_loaded());
        assert!(catalog.replace(vec![service("a", 1), service("b", 1)]));
        let first = catalog.current();
        assert_eq!(first.version, 1);

        assert!(!catalog.replace(vec![service("a", 1), service("b", 1)]));
        assert_eq!(catalog.current().version, 1);

        assert!(catalog.replace(vec![service("a", 1), service("b", 2)]));
        let second = catalog.current();
        assert_eq!(second.version, 2);
        let a = ServiceName::new("a", "shop").unwrap();
        let b = ServiceName::new("b", "shop").unwrap();
        assert!(Arc::ptr_eq(&first.services[&a], &second.services[&a]));
        assert!(!Arc::ptr_eq(&first.services[&b], &second.services[&b]));

        assert!(catalog.replace(vec![service("a", 1)]));
        assert_eq!(catalog.current().services.len(), 1);
    }

    #[test]
    fn endpoint_lists_are_held_once_and_a_no_op_copies_nothing() {
        let old = ClusterName::new("old").unwrap();
        let a = ServiceName::new("a", "shop").unwrap();
        let mut view = vec![service("a", 3), service("b", 3)];
        let catalog = Catalog::new();
        assert!(catalog.replace(view.clone()));
        let first = catalog.current();
        // The snapshot holds the very lists the source handed over.
        assert!(first.services[&a].backends[&old].shares_endpoints(&view[0].backends[&old]));

        // The same view again publishes nothing: no new snapshot at all.
        assert!(!catalog.replace(view.clone()));
        assert!(Arc::ptr_eq(&first, &catalog.current()));

        // One backend changes: the other service keeps its `Arc`, the
        // changed one carries the new list, nothing else is copied.
        let mut endpoints = view[1].backends[&old].endpoints.to_vec();
        endpoints[0].state = crate::model::EndpointState::NotReady;
        view[1]
            .backends
            .insert(old.clone(), Backend::from(endpoints));
        assert!(catalog.replace(view.clone()));
        let second = catalog.current();
        assert!(Arc::ptr_eq(&first.services[&a], &second.services[&a]));
        let b = ServiceName::new("b", "shop").unwrap();
        assert!(second.services[&b].backends[&old].shares_endpoints(&view[1].backends[&old]));

        // A second source's contribution to `a` makes a merged service
        // that shares both sources' lists.
        let mut east = service("a", 2);
        let backend = east.backends.remove(&old).unwrap();
        east.backends
            .insert(ClusterName::new("east").unwrap(), backend.clone());
        assert!(catalog.update_source("kubernetes/east", vec![east], vec![]));
        let merged = catalog.current();
        let a_merged = &merged.services[&a];
        assert!(a_merged.backends[&old].shares_endpoints(&view[0].backends[&old]));
        assert!(a_merged.backends[&ClusterName::new("east").unwrap()].shares_endpoints(&backend));
    }

    #[test]
    fn first_load_publishes_even_when_empty() {
        let catalog = Catalog::new();
        let mut rx = catalog.subscribe();
        assert!(catalog.replace(vec![]));
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().is_loaded());
    }

    #[test]
    fn sources_merge_by_service_and_update_incrementally() {
        let catalog = Catalog::new();
        catalog.replace(vec![service("a", 1)]);
        let mut east = service("a", 3);
        let backend = east
            .backends
            .remove(&ClusterName::new("old").unwrap())
            .unwrap();
        east.backends
            .insert(ClusterName::new("east").unwrap(), backend);
        assert!(catalog.update_source(
            "kubernetes/east",
            vec![east.clone(), service("b", 2)],
            vec![]
        ));
        let snap = catalog.current();
        let a = &snap.services[&ServiceName::new("a", "shop").unwrap()];
        let clusters: Vec<_> = a.backends.keys().map(|c| c.to_string()).collect();
        assert_eq!(clusters, ["east", "old"]);
        assert_eq!(snap.services.len(), 2);

        // An identical update publishes nothing.
        assert!(!catalog.update_source("kubernetes/east", vec![east], vec![]));
        // Removing a source removes its backends, not the others'.
        assert!(catalog.remove_source("kubernetes/east"));
        let snap = catalog.current();
        assert_eq!(snap.services.len(), 1);
        let a = &snap.services[&ServiceName::new("a", "shop").unwrap()];
        assert_eq!(a.backends.len(), 1);
    }

    #[test]
    fn a_static_backend_without_endpoints_gives_way_to_a_discovered_one() {
        let catalog = Catalog::new();
        let mut declared = service("a", 0);
        declared.weights = Some(crate::weights::Weights::all_to(
            ClusterName::new("old").unwrap(),
        ));
        catalog.replace(vec![declared]);
        catalog.update_source("kubernetes/old", vec![service("a", 4)], vec![]);
        let snap = catalog.current();
        let a = &snap.services[&ServiceName::new("a", "shop").unwrap()];
        assert_eq!(
            a.backends[&ClusterName::new("old").unwrap()]
                .endpoints
                .len(),
            4
        );
        assert!(a.weights.is_some(), "declared weights kept");
    }
}
