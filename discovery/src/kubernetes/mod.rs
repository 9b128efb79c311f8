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
//!
//! **Clusters from Secrets.** With `cluster_secrets`, member clusters also
//! come from Secrets labelled `ferry.io/cluster: NAME` in the control
//! plane's namespace, each holding a kubeconfig (`ferry cluster join`
//! writes them): a new Secret starts that cluster's watchers, a deleted one
//! withdraws the cluster on purpose, and a changed one (a rotated token)
//! reconnects with the new credentials while the last known endpoints keep
//! being served.

mod cluster;
mod secrets;
mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use self::cluster::{Change, client as kube_client};
pub use self::secrets::{
    CLUSTER_LABEL, KUBECONFIG_KEY, SecretError, SecretStatus, SecretsStatus, SecretsStatusHandle,
    parse_secret,
};
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
    /// A kubeconfig held in a cluster Secret (`cluster_secrets`).
    Secret {
        /// `namespace/name` of the Secret.
        secret: String,
        kubeconfig: InlineKubeconfig,
    },
}

/// A kubeconfig's text, read from a Secret. It carries credentials, so
/// `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct InlineKubeconfig(Arc<str>);

impl InlineKubeconfig {
    pub fn new(text: impl Into<Arc<str>>) -> Self {
        Self(text.into())
    }

    pub fn text(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for InlineKubeconfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InlineKubeconfig({} bytes)", self.0.len())
    }
}

impl Access {
    /// Where the credentials come from, for status pages and logs.
    pub fn describe(&self) -> String {
        match self {
            Access::Kubeconfig { path, .. } => format!("kubeconfig {}", path.display()),
            Access::InCluster => "in-cluster service account".to_owned(),
            Access::Secret { secret, .. } => format!("secret {secret}"),
        }
    }
}

/// Where cluster Secrets are read from (`kubernetes.cluster_secrets`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSecrets {
    /// The namespace holding them; `None`: the namespace of the access's
    /// credentials (in a pod: its own namespace).
    pub namespace: Option<String>,
    /// How to reach the cluster that holds them (default: in-cluster).
    pub access: Access,
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
    /// Member clusters from labelled Secrets, besides `clusters`.
    pub cluster_secrets: Option<ClusterSecrets>,
    /// Write credentials per cluster, for `--deploy kube`
    /// (`deploy_kubeconfig`); discovery never uses them.
    pub deploy: BTreeMap<ClusterName, Access>,
}

impl KubernetesConfig {
    /// Whether services may come from Kubernetes at all.
    pub fn discovers(&self) -> bool {
        !self.clusters.is_empty() || self.cluster_secrets.is_some()
    }
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
    /// Where its credentials come from (`kubeconfig PATH`, `in-cluster
    /// service account`, `secret NS/NAME`).
    pub credentials: String,
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

/// One cluster's running watchers.
struct Running {
    config: watch::Sender<ClusterConfig>,
    namespaces: Vec<String>,
    cancel: CancellationToken,
}

/// Runs the watchers of every configured cluster (the catalog file's and,
/// with `cluster_secrets`, the Secrets'), following changes to either: an
/// added cluster starts, a removed one stops and its backends are removed
/// deliberately, one with new credentials reconnects with them (keeping its
/// endpoints until the new list completes), and one with new namespaces
/// restarts. A cluster named both in the file and by a Secret is the
/// file's.
pub async fn run(
    mut config: watch::Receiver<KubernetesConfig>,
    catalog: Arc<Catalog>,
    statuses: ClusterStatuses,
    secrets_status: SecretsStatusHandle,
    cancel: CancellationToken,
) {
    let (from_secrets_tx, mut from_secrets) = watch::channel(BTreeMap::new());
    let from_secrets_tx = Arc::new(from_secrets_tx);
    let mut secrets_watch: Option<(ClusterSecrets, CancellationToken)> = None;
    let mut running: BTreeMap<ClusterName, Running> = BTreeMap::new();
    loop {
        let desired = config.borrow_and_update().clone();
        if secrets_watch.as_ref().map(|(c, _)| c) != desired.cluster_secrets.as_ref() {
            if let Some((_, token)) = secrets_watch.take() {
                token.cancel();
            }
            match &desired.cluster_secrets {
                Some(source) => {
                    let token = cancel.child_token();
                    tokio::spawn(secrets::run(
                        source.clone(),
                        from_secrets_tx.clone(),
                        secrets_status.clone(),
                        token.clone(),
                    ));
                    secrets_watch = Some((source.clone(), token));
                }
                None => {
                    from_secrets_tx.send_replace(BTreeMap::new());
                    *secrets::lock(&secrets_status) = None;
                }
            }
        }
        let mut wanted: BTreeMap<ClusterName, ClusterConfig> = desired
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.clone()))
            .collect();
        let secret_clusters = from_secrets.borrow_and_update().clone();
        let mut shadowed = Vec::new();
        for (name, cfg) in secret_clusters {
            match wanted.entry(name) {
                std::collections::btree_map::Entry::Occupied(file) => {
                    shadowed.push(file.key().clone());
                }
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(cfg);
                }
            }
        }
        secrets::mark_shadowed(&secrets_status, &shadowed);
        let gone: Vec<ClusterName> = running
            .iter()
            .filter(|(name, r)| !wanted.contains_key(*name) || r.namespaces != desired.namespaces)
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(r) = running.remove(&name) {
                r.cancel.cancel();
            }
            if !wanted.contains_key(&name) {
                catalog.remove_source(&source_id(&name));
                lock(&statuses).remove(name.as_str());
                metrics::gauge!("ferry_discovery_cluster_up", "cluster" => name.to_string())
                    .set(0.0);
                tracing::info!(cluster = %name, "cluster removed; its backends are withdrawn");
            }
        }
        for (name, cfg) in wanted {
            if let Some(r) = running.get(&name) {
                // New credentials: the cluster's watchers reconnect with
                // them.
                r.config.send_if_modified(|current| {
                    let differs = *current != cfg;
                    if differs {
                        *current = cfg.clone();
                    }
                    differs
                });
                continue;
            }
            let token = cancel.child_token();
            tracing::info!(cluster = %name, credentials = %cfg.access.describe(), "watching cluster");
            let (config_tx, config_rx) = watch::channel(cfg);
            tokio::spawn(cluster::run_cluster(
                config_rx,
                desired.namespaces.clone(),
                catalog.clone(),
                statuses.clone(),
                token.clone(),
            ));
            running.insert(
                name,
                Running {
                    config: config_tx,
                    namespaces: desired.namespaces.clone(),
                    cancel: token,
                },
            );
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = config.changed() => if changed.is_err() { return },
            _ = from_secrets.changed() => {}
        }
    }
}

fn lock(statuses: &ClusterStatuses) -> std::sync::MutexGuard<'_, BTreeMap<String, ClusterStatus>> {
    statuses.lock().unwrap_or_else(|p| p.into_inner())
}
