//! Where the policy lives and who may write it: one trait for the embedded
//! store (this control plane always leads) and the etcd store (one leader
//! among peers, elected), so the control plane does not care which.

use std::sync::Arc;

use ferry_xds::SnapshotCache;
use ferry_xds::lrs::LoadReports;
use ferry_xds::status::ClientRegistry;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::fleet::Fleet;
use crate::policy::Policy;
use crate::store::{Backend, Store};

/// What a store keeps in step with its peers.
pub struct Shared {
    pub policy: Arc<Policy>,
    pub engine: Arc<Engine>,
    pub cache: Arc<SnapshotCache>,
    pub clients: Arc<ClientRegistry>,
    pub loads: Arc<LoadReports>,
    pub fleet: Arc<Fleet>,
}

/// A policy store and the leadership that goes with it.
pub trait Leadership: Send {
    /// "embedded" or "etcd", for status pages.
    fn kind(&self) -> &'static str;
    /// This control plane's name in the store.
    fn node(&self) -> &str;
    /// The store the policy is loaded from and written to.
    fn backend(&self) -> Box<dyn Backend>;
    /// Starts whatever keeps this control plane in step with its peers
    /// (election, following, shared observations); the engine runs only
    /// while this control plane leads.
    fn start(self: Box<Self>, shared: Shared, shutdown: CancellationToken);
}

/// The embedded store: one control plane, always leading.
#[derive(Debug, Clone)]
pub struct Standalone {
    pub store: Store,
}

impl Leadership for Standalone {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn node(&self) -> &str {
        "local"
    }

    fn backend(&self) -> Box<dyn Backend> {
        Box::new(self.store.clone())
    }

    fn start(self: Box<Self>, _: Shared, _: CancellationToken) {}
}
