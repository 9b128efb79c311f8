//! The Kubernetes source: one set of watchers per cluster, turning exported
//! Services and their EndpointSlices into that cluster's backends.
//!
//! Each cluster's contribution goes into the catalog as its own source
//! (`kubernetes/<cluster>`), so the same Service exported in several
//! clusters becomes one service with one backend per cluster. One
//! EndpointSlice (or Service, or ServiceExport) event re-merges that one
//! service only.
//!
//! **Exported** means the Service carries the label `ferry.io/export=true`
//! *or* an MCS `ServiceExport` (`multicluster.x-k8s.io/v1alpha1`) of the
//! same name and namespace exists. Services are therefore watched without a
//! label selector and mirrored as small summaries (ports and the label
//! flag), so a ServiceExport arriving later exports its Service without a
//! re-list; only exported ones reach the catalog. The ServiceExport kind is
//! optional: a cluster without its CRD (404) or that may not read it (403)
//! exports by label alone, and is looked at again every few minutes and on
//! every reconnect.
//!
//! **Stale but serving.** When a cluster's API server is unreachable or its
//! watch fails, the cluster's last known endpoints stay in the catalog and
//! the cluster is marked stale (status and `ferry_discovery_cluster_up`).
//! The watchers are then rebuilt with backoff; a rebuilt watcher lists
//! afresh, and its result replaces the old state only once the list is
//! complete (`InitDone`), so a failure never empties a service.

mod cluster;
mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use self::cluster::Change;
pub use self::state::{ClusterState, Key};
use crate::catalog::Catalog;
use crate::names::ClusterName;

/// Services carrying this label (value `"true"`) are exported to Ferry.
pub const EXPORT_LABEL: &str = "ferry.io/export";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The MCS API group of `ServiceExport`: a ServiceExport named like a
/// Service in its namespace exports that Service.
const SERVICE_EXPORT_GROUP: &str = "multicluster.x-k8s.io";
const SERVICE_EXPORT_VERSION: &str = "v1alpha1";
const SERVICE_EXPORT_KIND: &str = "ServiceExport";
const SERVICE_EXPORT_PLURAL: &str = "serviceexports";
/// How long a cluster whose ServiceExport kind could not be listed waits
/// before looking again (it also looks on every reconnect).
const SERVICE_EXPORT_RETRY: Duration = Duration::from_secs(180);

/// How to reach one cluster's API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A kubeconfig file, optionally a context in it.
    Kubeconfig {
        path: PathBuf,
        context: Option<String>,
    },
    /// The pod's own service account (in-cluster).
    InCluster,
}

/// One watched cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub name: ClusterName,
    pub access: Access,
}

/// The `kubernetes:` section of the catalog file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KubernetesConfig {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    pub clusters: Vec<ClusterConfig>,
}

/// Connection state of one cluster, as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterHealth {
    /// Watchers starting; nothing listed yet.
    Connecting,
    /// Listed and watching.
    Connected,
    /// The API server is unreachable or the watch failed: last known
    /// endpoints are served.
    Stale,
    /// The API server refused the credentials (401/403).
    Unauthorized,
}

/// Whether a cluster's MCS `ServiceExport`s are watched. Not an error
/// either way: without them, Services are exported by label alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceExports {
    /// Not listed yet.
    Unknown,
    /// The kind is served and watched.
    Watched,
    /// The API server does not know the kind (404: the CRD is not
    /// installed).
    NotInstalled,
    /// The API server refused to list the kind (403: RBAC).
    Forbidden,
}

/// One cluster's status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterStatus {
    pub cluster: String,
    pub health: ClusterHealth,
    pub last_sync: Option<SystemTime>,
    pub last_error: Option<String>,
    /// Exported services (by label or ServiceExport).
    pub services: usize,
    pub endpoints: usize,
    pub relists: u64,
    pub service_exports: ServiceExports,
}

/// Status of every watched cluster, shared with the admin endpoint.
pub type ClusterStatuses = Arc<Mutex<BTreeMap<String, ClusterStatus>>>;

/// Clusters whose endpoints are last-known only: the API server is
/// unreachable or refuses Ferry.
pub fn stale_clusters(statuses: &ClusterStatuses) -> std::collections::BTreeSet<String> {
    lock(statuses)
        .values()
        .filter(|c| matches!(c.health, ClusterHealth::Stale | ClusterHealth::Unauthorized))
        .map(|c| c.cluster.clone())
        .collect()
}

/// The catalog source id of a cluster.
pub fn source_id(cluster: &ClusterName) -> String {
    format!("kubernetes/{cluster}")
}

/// backends are removed deliberately, a changed one restarts.
pub async fn run(
    mut config: watch::Receiver<KubernetesConfig>,
    catalog: Arc<Catalog>,
    statuses: ClusterStatuses,
    cancel: CancellationToken,
) {
    let mut running: BTreeMap<ClusterName, (ClusterConfig, Vec<String>, CancellationToken)> =
        BTreeMap::new();
    loop {
        let desired = config.borrow_and_update().clone();
        let wanted: BTreeMap<_, _> = desired
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.clone()))
            .collect();
        let stale: Vec<ClusterName> = running
            .iter()
            .filter(|(name, (cfg, ns, _))| {
                wanted.get(*name) != Some(cfg) || *ns != desired.namespaces
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some((_, _, token)) = running.remove(&name) {
                token.cancel();
            }
            if !wanted.contains_key(&name) {
                catalog.remove_source(&source_id(&name));
                lock(&statuses).remove(name.as_str());
                metrics::gauge!("ferry_discovery_cluster_up", "cluster" => name.to_string())
                    .set(0.0);
                tracing::info!(cluster = %name, "cluster removed from config; its backends are withdrawn");
            }
        }
        for (name, cfg) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let token = cancel.child_token();
            tracing::info!(cluster = %name, "watching cluster");
            tokio::spawn(cluster::run_cluster(
                cfg.clone(),
                desired.namespaces.clone(),
                catalog.clone(),
                statuses.clone(),
                token.clone(),
            ));
            running.insert(name, (cfg, desired.namespaces.clone(), token));
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = config.changed() => if changed.is_err() { return },
        }
    }
}

fn lock(statuses: &ClusterStatuses) -> std::sync::MutexGuard<'_, BTreeMap<String, ClusterStatus>> {
    statuses.lock().unwrap_or_else(|p| p.into_inner())
}
