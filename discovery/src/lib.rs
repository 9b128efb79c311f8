//! Ferry's cross-cluster service catalog.
//!
//! Sources (today the static catalog file) describe where each service runs:
//! one [`Service`] per `name.namespace`, one [`Backend`] per Kubernetes
//! cluster, endpoints with readiness and zone. The [`catalog`] module merges
//! them into immutable, versioned [`CatalogSnapshot`]s and notifies
//! subscribers of each new one. This crate knows nothing of xDS.

pub mod catalog;
pub mod file;
pub mod kubernetes;
pub mod model;
pub mod names;
pub mod untrusted;
pub mod weights;

pub use catalog::{Catalog, CatalogSnapshot};
pub use model::{
    Backend, ClientCert, Endpoint, EndpointState, HealthCheck, OutlierDetection, Protocol,
    RequestPolicy, Retries, RetryOn, Service, ServicePort, StickyKey, UpstreamTls,
};
pub use names::{ClusterName, NameError, ServiceName};
pub use weights::{TOTAL_WEIGHT, Weight, Weights, WeightsError};
