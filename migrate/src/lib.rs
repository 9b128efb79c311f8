//! Ferry's traffic policy: per-service weights and pins set through the
//! traffic API, persisted before they take effect, audited, and handed to
//! the xDS translation as weight overrides.
//!
//! - [`policy`]: the rules (validation, pin ownership, compare-and-set) and
//!   the in-memory state every change goes through;
//! - [`store`]: the embedded `redb` store (one file under `--data-dir`);
//! - [`api`]: the `ferry.v1.Traffic` gRPC service.

pub mod api;
pub mod auth;
pub mod campaign;
pub mod campaign_api;
pub mod deploy;
pub mod engine;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod fleet;
pub mod leadership;
pub mod migration;
pub mod migration_api;
pub mod policy;
pub mod prometheus;
pub mod returning;
pub mod store;

pub use engine::{Engine, EngineConfig};
pub use policy::{Policy, PolicyError};
pub use store::{Store, StoreError};
