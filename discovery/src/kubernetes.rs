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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::model::{
    Backend, Endpoint, EndpointState, Protocol, RequestPolicy, Service, ServicePort,
};
use crate::names::{ClusterName, ServiceName};

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

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("cannot load credentials: {0}")]
    Config(String),
    #[error("unauthorized ({code}): {message}")]
    Unauthorized { code: u16, message: String },
    #[error("client certificate refused in the TLS handshake (alert {0:?})")]
    CertificateRefused(rustls::AlertDescription),
    #[error("{0}")]
    Watch(String),
    #[error("watch stream ended")]
    Ended,
}

/// Runs the watchers of every configured cluster, following changes to the
/// configuration: an added cluster starts, a removed one stops and its
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
            tokio::spawn(run_cluster(
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

/// Watches one cluster until `cancel`, rebuilding its watchers with
/// backoff after every failure.
async fn run_cluster(
    cfg: ClusterConfig,
    namespaces: Vec<String>,
    catalog: Arc<Catalog>,
    statuses: ClusterStatuses,
    cancel: CancellationToken,
) {
    let cluster = cfg.name.to_string();
    lock(&statuses).insert(
        cluster.clone(),
        ClusterStatus {
            cluster: cluster.clone(),
            health: ClusterHealth::Connecting,
            last_sync: None,
            last_error: None,
            services: 0,
            endpoints: 0,
            relists: 0,
            service_exports: ServiceExports::Unknown,
        },
    );
    let mut state = ClusterState::new(cfg.name.clone());
    let mut delay = Duration::from_millis(250);
    loop {
        let result = watch_once(&cfg, &namespaces, &mut state, &catalog, &statuses, &cancel).await;
        if cancel.is_cancelled() {
            return;
        }
        let (health, message) = match result {
            Err(WatchError::Unauthorized { code, message }) => (
                ClusterHealth::Unauthorized,
                format!("API server refused the credentials ({code}): {message}"),
            ),
            Err(WatchError::CertificateRefused(alert)) => (
                ClusterHealth::Unauthorized,
                format!(
                    "API server refused the client certificate in the TLS handshake \
                     (alert {alert:?}): check that the kubeconfig's client certificate \
                     is signed by a CA the cluster trusts"
                ),
            ),
            Err(e) => (ClusterHealth::Stale, e.to_string()),
            Ok(()) => return,
        };
        if state.synced_once {
            delay = Duration::from_millis(250);
        }
        tracing::warn!(
            cluster = %cluster, health = ?health, error = %message, retry_in = ?delay,
            "cluster watch failed; serving its last known endpoints"
        );
        metrics::gauge!("ferry_discovery_cluster_up", "cluster" => cluster.clone()).set(0.0);
        metrics::counter!("ferry_discovery_watch_errors_total", "cluster" => cluster.clone())
            .increment(1);
        if let Some(s) = lock(&statuses).get_mut(&cluster) {
            s.health = health;
            s.last_error = Some(message);
        }
        state.synced_once = false;
        let jitter = Duration::from_millis(rand::random_range(0..=delay.as_millis() as u64 / 4));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay + jitter) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn client_for(access: &Access) -> Result<Client, WatchError> {
    let config = match access {
        Access::Kubeconfig { path, context } => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| WatchError::Config(format!("{}: {e}", path.display())))?;
            let options = kube::config::KubeConfigOptions {
                context: context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| WatchError::Config(format!("{}: {e}", path.display())))?
        }
        Access::InCluster => {
            kube::Config::incluster().map_err(|e| WatchError::Config(e.to_string()))?
        }
    };
    Client::try_from(config).map_err(|e| WatchError::Config(e.to_string()))
}

/// The API server's `Status` behind a watcher error, if it sent one.
fn api_status(error: &watcher::Error) -> Option<&kube::core::Status> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
        watcher::Error::WatchError(s) => Some(s.as_ref()),
        _ => None,
    }
}

fn classify(error: watcher::Error) -> WatchError {
    if let Some(s) = api_status(&error)
        && (s.code == 401 || s.code == 403)
    {
        return WatchError::Unauthorized {
            code: s.code,
            message: s.message.clone(),
        };
    }
    if let Some(alert) = refused_certificate(&error) {
        return WatchError::CertificateRefused(alert);
    }
    WatchError::Watch(error.to_string())
}

/// The TLS alert by which the API server refused Ferry's client
/// certificate, when that is what `error` comes down to. The server only
/// sends certificate alerts about the client's certificate.
fn refused_certificate(
    error: &(dyn std::error::Error + 'static),
) -> Option<rustls::AlertDescription> {
    use rustls::AlertDescription as A;
    let mut next = Some(error);
    while let Some(e) = next {
        // An io::Error's `source()` skips the error it wraps.
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for candidate in [Some(e), wrapped].into_iter().flatten() {
            if let Some(rustls::Error::AlertReceived(alert)) = candidate.downcast_ref()
                && matches!(
                    alert,
                    A::BadCertificate
                        | A::UnsupportedCertificate
                        | A::CertificateRevoked
                        | A::CertificateExpired
                        | A::CertificateUnknown
                        | A::UnknownCA
                        | A::AccessDenied
                        | A::CertificateRequired
                )
            {
                return Some(*alert);
            }
        }
        next = e.source();
    }
    None
}

/// One watch event, tagged with its stream (namespace) index.
#[derive(Debug)]
pub enum Change {
    Service(usize, Box<Event<KubeService>>),
    Slice(usize, Box<Event<EndpointSlice>>),
    Export(usize, Box<Event<DynamicObject>>),
    /// The ServiceExport kind cannot be listed in this stream's scope
    /// (why: not installed or forbidden); counts as an empty list.
    ExportsUnavailable(usize, ServiceExports),
}

type ChangeStream = BoxStream<'static, Result<Change, watcher::Error>>;

fn streams(
    client: &Client,
    namespaces: &[String],
    cluster: &str,
    export_retry: Duration,
) -> impl Stream<Item = Result<Change, watcher::Error>> + Send + use<> {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    let export_kind = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(
            SERVICE_EXPORT_GROUP,
            SERVICE_EXPORT_VERSION,
            SERVICE_EXPORT_KIND,
        ),
        SERVICE_EXPORT_PLURAL,
    );
    let mut all: Vec<ChangeStream> = Vec::new();
    for (i, scope) in scopes.into_iter().enumerate() {
        let (services, slices, exports): (Api<KubeService>, Api<EndpointSlice>, _) = match &scope {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced_with(client.clone(), ns, &export_kind),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all_with(client.clone(), &export_kind),
            ),
        };
        // Every Service, not only labelled ones: a ServiceExport may export
        // any of them.
        let config = watcher::Config::default().page_size(500);
        all.push(
            watcher::watcher(services, config.clone())
                .map(move |e| e.map(|e| Change::Service(i, Box::new(e))))
                .boxed(),
        );
        all.push(
            watcher::watcher(slices, config)
                .map(move |e| e.map(|e| Change::Slice(i, Box::new(e))))
                .boxed(),
        );
        all.push(export_stream(exports, i, export_retry, cluster.to_owned()));
    }
    futures::stream::select_all(all)
}

/// ServiceExports in one scope. The kind is optional: when the API server
/// does not serve it (404) or refuses it (403), the stream says so once
/// ([`Change::ExportsUnavailable`]) and looks again after `retry`; any
/// other error is the cluster's, as for the other kinds.
fn export_stream(
    api: Api<DynamicObject>,
    stream: usize,
    retry: Duration,
    cluster: String,
) -> ChangeStream {
    let open = |api: &Api<DynamicObject>| {
        watcher::watcher(api.clone(), watcher::Config::default().page_size(500)).boxed()
    };
    let first = open(&api);
    futures::stream::unfold(Some(first), move |current| {
        let api = api.clone();
        let cluster = cluster.clone();
        async move {
            let mut events = match current {
                Some(events) => events,
                None => {
                    tokio::time::sleep(retry).await;
                    tracing::debug!(cluster = %cluster, "looking for the ServiceExport kind again");
                    open(&api)
                }
            };
            let item = match events.next().await? {
                Ok(event) => Ok(Change::Export(stream, Box::new(event))),
                Err(e) => match exports_unavailable(&e) {
                    Some(why) => return Some((Ok(Change::ExportsUnavailable(stream, why)), None)),
                    None => Err(e),
                },
            };
            Some((item, Some(events)))
        }
    })
    .boxed()
}

fn exports_unavailable(error: &watcher::Error) -> Option<ServiceExports> {
    match api_status(error)?.code {
        404 => Some(ServiceExports::NotInstalled),
        403 => Some(ServiceExports::Forbidden),
        _ => None,
    }
}

/// One watcher generation: list, then follow, until an error or `cancel`.
async fn watch_once(
    cfg: &ClusterConfig,
    namespaces: &[String],
    state: &mut ClusterState,
    catalog: &Catalog,
    statuses: &ClusterStatuses,
    cancel: &CancellationToken,
) -> Result<(), WatchError> {
    let client = client_for(&cfg.access).await?;
    let cluster = cfg.name.to_string();
    let mut changes = Box::pin(streams(&client, namespaces, &cluster, SERVICE_EXPORT_RETRY));
    state.begin_generation(namespaces);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let change = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {
                if let Some(at) = state.last_sync {
                    metrics::gauge!("ferry_discovery_last_sync_age_seconds", "cluster" => cluster.clone())
                        .set(at.elapsed().as_secs_f64());
                }
                continue;
            }
            change = changes.next() => change,
        };
        let change = change.ok_or(WatchError::Ended)?.map_err(classify)?;
        let exports_before = state.service_exports();
        let touched = state.apply(change);
        if state.service_exports() != exports_before {
            announce_service_exports(&cluster, state.service_exports());
        }
        if !touched.is_empty() {
            let (upserts, removals) = state.contributions(&touched);
            catalog.update_source(&source_id(&cfg.name), upserts, removals);
        }
        if state.all_listed() {
            state.last_sync = Some(Instant::now());
            let newly = !state.synced_once;
            state.synced_once = true;
            let (services, endpoints) = state.counts();
            metrics::gauge!("ferry_discovery_cluster_up", "cluster" => cluster.clone()).set(1.0);
            metrics::gauge!("ferry_discovery_cluster_endpoints", "cluster" => cluster.clone())
                .set(endpoints as f64);
            let exports_watched = state.service_exports() == ServiceExports::Watched;
            metrics::gauge!("ferry_discovery_service_exports_watched", "cluster" => cluster.clone())
                .set(if exports_watched { 1.0 } else { 0.0 });
            if let Some(s) = lock(statuses).get_mut(&cluster) {
                s.health = ClusterHealth::Connected;
                s.last_sync = Some(SystemTime::now());
                s.last_error = None;
                s.services = services;
                s.endpoints = endpoints;
                s.service_exports = state.service_exports();
                if newly {
                    s.relists += 1;
                }
            }
            if newly {
                tracing::info!(cluster = %cluster, services, endpoints, "cluster listed; watching");
            }
        }
    }
}

/// Logs a change in whether the cluster's ServiceExports are watched.
fn announce_service_exports(cluster: &str, now: ServiceExports) {
    match now {
        ServiceExports::Unknown => {}
        ServiceExports::Watched => tracing::info!(
            cluster = %cluster,
            "watching ServiceExports: a ServiceExport exports the Service of its name"
        ),
        ServiceExports::NotInstalled => tracing::info!(
            cluster = %cluster,
            retry_in = ?SERVICE_EXPORT_RETRY,
            "no ServiceExport CRD ({SERVICE_EXPORT_GROUP}); Services are exported by label only"
        ),
        ServiceExports::Forbidden => tracing::warn!(
            cluster = %cluster,
            retry_in = ?SERVICE_EXPORT_RETRY,
            "listing ServiceExports ({SERVICE_EXPORT_GROUP}) is forbidden; Services are exported \
             by label only (grant list/watch on serviceexports to use them)"
        ),
    }
}

/// `(namespace, name)` of an object.
pub type Key = (String, String);

fn key_of<K: ResourceExt>(obj: &K) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// A mirror of one kind of object across a cluster's watch streams. During
/// a (re-)list the old objects stay until the list completes.
#[derive(Debug)]
struct Mirror<T> {
    live: HashMap<Key, T>,
    pending: HashMap<usize, HashMap<Key, T>>,
    listed: BTreeSet<usize>,
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
    fn apply<K: ResourceExt>(
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
    endpoints: Vec<Endpoint>,
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
    synced_once: bool,
    last_sync: Option<Instant>,
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

    fn all_listed(&self) -> bool {
        self.services.listed.len() + self.slices.listed.len() + self.exports.listed.len()
            >= self.streams
    }

    /// Whether the cluster's ServiceExports are watched (the last word of
    /// any of its export streams).
    pub fn service_exports(&self) -> ServiceExports {
        self.service_exports
    }

    /// Exported services and all endpoints.
    fn counts(&self) -> (usize, usize) {
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
    /// duplicates across slices folded (the readiest state wins).
    fn backend(&self, service: &Key, ports: &[ServicePort]) -> Backend {
        let mut by_ip: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
        for slice_key in self.by_service.get(service).into_iter().flatten() {
            let Some(slice) = self.slices.live.get(slice_key) else {
                continue;
            };
            for endpoint in &slice.endpoints {
                let mut endpoint = endpoint.clone();
                // Service ports without a matching slice port use the
                // service port number, as kube-proxy would.
                for p in ports {
                    endpoint.ports.entry(p.name.clone()).or_insert(p.port);
                }
                endpoint
                    .ports
                    .retain(|name, _| ports.iter().any(|p| &p.name == name));
                by_ip
                    .entry(endpoint.ip)
                    .and_modify(|e| {
                        if endpoint.state < e.state {
                            *e = endpoint.clone();
                        }
                    })
                    .or_insert(endpoint);
            }
        }
        Backend {
            endpoints: by_ip.into_values().collect(),
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
    let mut endpoints = Vec::new();
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
            endpoints.push(Endpoint {
                ip,
                ports: ports.clone(),
                state,
                zone: e.zone.clone(),
            });
        }
    }
    SliceSummary { service, endpoints }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort as KubePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{
        Endpoint as KubeEndpoint, EndpointConditions, EndpointPort,
    };
    use kube::api::ObjectMeta;

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

    #[test]
    fn a_certificate_alert_anywhere_in_the_chain_is_a_refused_certificate() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error")]
        struct Outer(#[source] std::io::Error);

        let alert = |a| {
            Outer(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(a),
            ))
        };
        assert_eq!(
            refused_certificate(&alert(rustls::AlertDescription::UnknownCA)),
            Some(rustls::AlertDescription::UnknownCA)
        );
        assert_eq!(
            refused_certificate(&alert(rustls::AlertDescription::HandshakeFailure)),
            None,
            "not about a certificate"
        );
        // Ferry not trusting the server is not the server refusing Ferry.
        let local = Outer(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert_eq!(refused_certificate(&local), None);
    }

    #[tokio::test]
    async fn the_export_stream_reports_a_missing_crd_and_finds_it_later() {
        let kube = ferry_testkube::TestKube::start("token").await;
        kube.set_service_export_crd(false);
        let client = kube.client().await;
        let mut changes = Box::pin(streams(
            &client,
            &["shop".to_owned()],
            "east",
            Duration::from_millis(300),
        ));
        let mut next_export = async || loop {
            let change = tokio::time::timeout(Duration::from_secs(10), changes.next())
                .await
                .expect("a change within 10 s")
                .expect("streams never end")
                .expect("no error");
            match change {
                Change::Export(_, event) => match *event {
                    Event::Init => continue,
                    Event::InitApply(o) | Event::Apply(o) => {
                        return format!("apply {}", o.name_any());
                    }
                    Event::Delete(o) => return format!("delete {}", o.name_any()),
                    Event::InitDone => return "listed".to_owned(),
                },
                Change::ExportsUnavailable(_, why) => return format!("{why:?}"),
                Change::Service(..) | Change::Slice(..) => continue,
            }
        };
        assert_eq!(next_export().await, "NotInstalled");
        let lists = kube.list_requests();
        // Installed later: found on the next look, without an error.
        kube.set_service_export_crd(true);
        kube.apply_service_export("shop", "checkout");
        assert_eq!(next_export().await, "apply checkout");
        assert_eq!(next_export().await, "listed");
        assert!(kube.list_requests() > lists);
        kube.delete_service_export("shop", "checkout");
        assert_eq!(next_export().await, "delete checkout");
        // And removed again: reported, not an error.
        kube.apply_service_export("shop", "cart");
        assert_eq!(next_export().await, "apply cart");
        kube.set_service_export_crd(false);
        assert_eq!(next_export().await, "delete cart");
        assert_eq!(next_export().await, "NotInstalled");
    }
}
