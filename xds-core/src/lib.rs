//! What both sides of Ferry's xDS share, and nothing else: the control
//! plane (`ferry-xds`) and the data plane (`ferry-proxy`) build on it, so
//! the proxy compiles no Kubernetes client and no control plane.
//!
//! - [`resources`]: the resource types Ferry serves and their encoded form;
//! - [`names::BackendKey`]: the name of one service port's backend in one
//!   Kubernetes cluster, built and parsed in one place;
//! - [`client`]: the delta ADS client a proxy keeps its config with;
//! - [`channel`]: how a proxy reaches the control plane (TLS, mutual TLS,
//!   a bearer token);
//! - [`latency`]: the latency buckets a proxy reports load in.

pub mod channel;
pub mod client;
pub mod latency;
pub mod names;
pub mod resources;

pub use names::BackendKey;
pub use resources::{Resource, ResourceType};
