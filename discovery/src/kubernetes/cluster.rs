//! One cluster's watchers: credentials, the watch streams of every kind,
//! and the loop that rebuilds them with backoff.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::state::ClusterState;
use super::{
    Access, ClusterConfig, ClusterHealth, ClusterStatus, ClusterStatuses, SERVICE_EXPORT_GROUP,
    SERVICE_EXPORT_KIND, SERVICE_EXPORT_PLURAL, SERVICE_EXPORT_RETRY, SERVICE_EXPORT_VERSION,
    ServiceExports, lock, source_id,
};
use crate::catalog::Catalog;

#[derive(Debug, thiserror::Error)]
pub(super) enum WatchError {
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

impl WatchError {
    /// The health this error leaves the cluster in, and what to tell the
    /// operator.
    pub(super) fn health(&self) -> (ClusterHealth, String) {
        match self {
            WatchError::Unauthorized { code, message } => (
                ClusterHealth::Unauthorized,
                format!("API server refused the credentials ({code}): {message}"),
            ),
            WatchError::CertificateRefused(alert) => (
                ClusterHealth::Unauthorized,
                format!(
                    "API server refused the client certificate in the TLS handshake \
                     (alert {alert:?}): check that the kubeconfig's client certificate \
                     is signed by a CA the cluster trusts"
                ),
            ),
            e => (ClusterHealth::Stale, e.to_string()),
        }
    }
}

/// Why one watcher generation ended without an error.
enum Ended {
    Cancelled,
    /// The cluster's credentials changed: reconnect with them.
    Reconfigured,
}

/// Watches one cluster until `cancel`, rebuilding its watchers with
/// backoff after every failure, and at once when its credentials change.
pub(super) async fn run_cluster(
    mut config: watch::Receiver<ClusterConfig>,
    namespaces: Vec<String>,
    catalog: Arc<Catalog>,
    statuses: ClusterStatuses,
    cancel: CancellationToken,
) {
    let first = config.borrow_and_update().clone();
    let cluster = first.name.to_string();
    lock(&statuses).insert(
        cluster.clone(),
        ClusterStatus {
            cluster: cluster.clone(),
            credentials: first.access.describe(),
            health: ClusterHealth::Connecting,
            last_sync: None,
            last_error: None,
            services: 0,
            endpoints: 0,
            relists: 0,
            service_exports: ServiceExports::Unknown,
        },
    );
    let mut state = ClusterState::new(first.name.clone());
    let mut delay = Duration::from_millis(250);
    loop {
        let cfg = config.borrow_and_update().clone();
        if let Some(s) = lock(&statuses).get_mut(&cluster) {
            s.credentials = cfg.access.describe();
        }
        let result = watch_once(
            &cfg,
            &namespaces,
            &mut state,
            &catalog,
            &statuses,
            &mut config,
            &cancel,
        )
        .await;
        if cancel.is_cancelled() {
            return;
        }
        let error = match result {
            Ok(Ended::Cancelled) => return,
            Ok(Ended::Reconfigured) => {
                tracing::info!(
                    cluster = %cluster,
                    "cluster credentials changed; reconnecting with them (its endpoints are \
                     kept until the new list completes)"
                );
                metrics::counter!("ferry_discovery_credential_reloads_total", "cluster" => cluster.clone())
                    .increment(1);
                delay = Duration::from_millis(250);
                continue;
            }
            Err(e) => e,
        };
        let (health, message) = error.health();
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
            // New credentials are tried at once (a rotated token after a
            // refusal, say).
            changed = config.changed() => {
                if changed.is_err() {
                    return;
                }
                delay = Duration::from_millis(250);
                continue;
            }
            _ = tokio::time::sleep(delay + jitter) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// A kube client configuration for `access`.
pub(super) async fn kube_config(access: &Access) -> Result<kube::Config, WatchError> {
    match access {
        Access::Kubeconfig { path, context } => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| WatchError::Config(format!("{}: {e}", path.display())))?;
            let options = kube::config::KubeConfigOptions {
                context: context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| WatchError::Config(format!("{}: {e}", path.display())))
        }
        Access::InCluster => {
            kube::Config::incluster().map_err(|e| WatchError::Config(e.to_string()))
        }
        Access::Secret { secret, kubeconfig } => {
            let parsed = kube::config::Kubeconfig::from_yaml(kubeconfig.text())
                .map_err(|e| WatchError::Config(format!("secret {secret}: {e}")))?;
            kube::Config::from_custom_kubeconfig(parsed, &Default::default())
                .await
                .map_err(|e| WatchError::Config(format!("secret {secret}: {e}")))
        }
    }
}

/// A kube client for `access`, or why there is none.
pub async fn client(access: &Access) -> Result<Client, String> {
    client_for(access).await.map_err(|e| e.to_string())
}

pub(super) async fn client_for(access: &Access) -> Result<Client, WatchError> {
    let config = kube_config(access).await?;
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

pub(super) fn classify(error: watcher::Error) -> WatchError {
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
    config: &mut watch::Receiver<ClusterConfig>,
    cancel: &CancellationToken,
) -> Result<Ended, WatchError> {
    let client = client_for(&cfg.access).await?;
    let cluster = cfg.name.to_string();
    let mut changes = Box::pin(streams(&client, namespaces, &cluster, SERVICE_EXPORT_RETRY));
    state.begin_generation(namespaces);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let change = tokio::select! {
            _ = cancel.cancelled() => return Ok(Ended::Cancelled),
            changed = config.changed() => {
                return Ok(if changed.is_ok() { Ended::Reconfigured } else { Ended::Cancelled });
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

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
