//! Ferry's xDS control plane.
//!
//! Data flows one way: a [`ferry_discovery::CatalogSnapshot`] is translated
//! ([`translate`]) into Envoy resources, gathered into an immutable,
//! versioned [`snapshot::Snapshot`], and served by the ADS server ([`ads`])
//! over both state-of-the-world and delta streams. Per-client protocol state
//! (subscriptions, nonces, ACK/NACK) lives in one place, [`session`].

pub mod ads;
pub mod auth;
pub use ferry_xds_core::{channel, client, resources};
pub mod bootstrap;
pub mod client_kind;
pub mod history;
pub mod lrs;
pub mod secrets;
pub mod session;
pub mod snapshot;
pub mod status;
pub mod translate;
pub mod transport;
pub mod wire;

pub use ads::AdsServer;
pub use client_kind::ClientKind;
pub use resources::{Resource, ResourceType};
pub use snapshot::{Snapshot, SnapshotCache};
pub use translate::{TranslateOptions, Translator, UpstreamTlsMode};
