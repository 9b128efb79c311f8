//! The catalog: immutable, versioned snapshots of every service, published
//! to subscribers on each change.
//!
//! A source hands the catalog its whole view; services equal to the ones
//! already held keep their `Arc`, so consumers can skip unchanged services
//! by pointer comparison and re-translate only what moved.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::model::Service;
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
#[derive(Debug)]
pub struct Catalog {
    tx: watch::Sender<Arc<CatalogSnapshot>>,
}

impl Default for Catalog {
    fn default() -> Self {
        Self::new()
    }
}

impl Catalog {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(CatalogSnapshot::empty()));
        Self { tx }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<CatalogSnapshot>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<CatalogSnapshot> {
        self.tx.borrow().clone()
    }

    /// Replaces the catalog's services. Publishes a new version only when
    /// something changed (or on the first load); returns whether it did.
    pub fn replace(&self, services: Vec<Service>) -> bool {
        let current = self.current();
        let mut next = BTreeMap::new();
        let mut changed = !current.is_loaded() || current.services.len() != services.len();
        for service in services {
            let kept = current
                .services
                .get(&service.name)
                .filter(|old| ***old == service)
                .cloned();
            let entry = match kept {
                Some(old) => old,
                None => {
                    changed = true;
                    Arc::new(service)
                }
            };
            next.insert(entry.name.clone(), entry);
        }
        if !changed {
            return false;
        }
        let snapshot = CatalogSnapshot {
            version: current.version + 1,
            services: next,
            published_at: Instant::now(),
        };
        metrics::gauge!("ferry_discovery_catalog_version").set(snapshot.version as f64);
        metrics::gauge!("ferry_discovery_services").set(snapshot.services.len() as f64);
        metrics::gauge!("ferry_discovery_endpoints").set(snapshot.endpoint_count() as f64);
        tracing::info!(
            version = snapshot.version,
            services = snapshot.services.len(),
            endpoints = snapshot.endpoint_count(),
            "catalog updated"
        );
        self.tx.send_replace(Arc::new(snapshot));
        true
    }
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
                Backend {
                    endpoints: vec![endpoint; endpoints],
                },
            )]),
            weights: None,
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
    fn first_load_publishes_even_when_empty() {
        let catalog = Catalog::new();
        let mut rx = catalog.subscribe();
        assert!(catalog.replace(vec![]));
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().is_loaded());
    }
}
