//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics`, `/status`,
//! and the web console (`/`, see [`crate::console`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use ferry_discovery::Catalog;
use ferry_discovery::file::FileStatus;
use ferry_discovery::kubernetes::{self, ClusterStatuses};
use ferry_xds::SnapshotCache;
use ferry_xds::lrs::LoadReports;
use ferry_xds::status::{ClientRegistry, ClientStatus};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AdminState {
    pub catalog: Arc<Catalog>,
    pub cache: Arc<SnapshotCache>,
    pub clients: Arc<ClientRegistry>,
    /// The upstream TLS secrets served over SDS (none in file mode).
    pub secrets: Option<Arc<ferry_xds::secrets::SecretStore>>,
    pub file_status: Arc<Mutex<FileStatus>>,
    pub clusters: ClusterStatuses,
    /// The cluster Secrets watch (`kubernetes.cluster_secrets`).
    pub cluster_secrets: kubernetes::SecretsStatusHandle,
    pub policy: Arc<ferry_migrate::Policy>,
    pub engine: Arc<ferry_migrate::Engine>,
    /// "embedded" (redb under --data-dir) or "etcd".
    pub store: &'static str,
    pub metrics: PrometheusHandle,
    /// Reported load, whose history the console charts.
    pub loads: Arc<LoadReports>,
    pub console: crate::console::Console,
}

pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tokio::spawn(crate::console::publish(state.clone(), shutdown.clone()));
    let app = crate::console::routes()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Ready once the first catalog is loaded and translated: before that no
/// xDS client is answered.
async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.catalog.current().is_loaded() && state.cache.current().is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no valid catalog loaded yet\n",
        )
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    state.metrics.run_upkeep();
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

#[derive(Serialize)]
struct StatusPage {
    ready: bool,
    catalog: CatalogStatus,
    xds: XdsStatus,
    policy: PolicyStatus,
}

#[derive(Serialize)]
struct PolicyStatus {
    version: u64,
    store: &'static str,
    /// Whether this control plane writes and runs migrations (always with
    /// the embedded store; the elected leader with etcd).
    leading: bool,
    /// Proxies connected before this control plane's last start that are
    /// not back yet: no step is acknowledged while any is awaited.
    returning_proxies: usize,
    migrations: Vec<MigrationStatus>,
}

#[derive(Serialize)]
struct MigrationStatus {
    id: String,
    service: String,
    stage: &'static str,
    phase: &'static str,
    step: usize,
    steps: usize,
    weights_bp: BTreeMap<String, u32>,
    reason: String,
    /// Proxies holding the step's weights, out of those connected.
    acked: usize,
    connected: usize,
    /// While a step awaits acknowledgement: what it waits for.
    waiting: String,
}

/// Ended migrations `/status` shows besides those in flight.
const ENDED_SHOWN: usize = 20;

#[derive(Serialize)]
struct CatalogStatus {
    version: u64,
    source: FileStatus,
    /// Watched Kubernetes clusters: health (connected, stale,
    /// unauthorized), last sync, counts.
    kubernetes: Vec<kubernetes::ClusterStatus>,
    /// Member clusters from Secrets: the watch's health and each Secret,
    /// with why it is not used if it is not. Absent without
    /// `cluster_secrets`.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_secrets: Option<kubernetes::SecretsStatus>,
    services: Vec<ServiceStatus>,
}

#[derive(Serialize)]
struct ServiceStatus {
    name: String,
    ports: Vec<u16>,
    /// "policy" (traffic API), "declared" (catalog weights) or
    /// "ready_endpoints" (proportional).
    weights_from: &'static str,
    clusters: BTreeMap<String, ClusterStatus>,
}

#[derive(Serialize)]
struct ClusterStatus {
    weight_bp: u32,
    endpoints: usize,
    ready: usize,
    /// The cluster's API server is unreachable (or refuses Ferry): these
    /// are its last known endpoints.
    stale: bool,
}

#[derive(Serialize)]
struct XdsStatus {
    snapshot_version: u64,
    catalog_version: u64,
    resources: BTreeMap<&'static str, usize>,
    /// Upstream TLS secrets: their files, the version served, and why the
    /// files are not served as they are now, if they are not.
    secrets: Vec<ferry_xds::secrets::SecretStatus>,
    /// What proxyless gRPC clients are served, by type.
    grpc_resources: BTreeMap<&'static str, usize>,
    clients: Vec<ClientStatus>,
}

async fn status(State(state): State<AdminState>) -> Json<StatusPage> {
    let catalog = state.catalog.current();
    let snapshot = state.cache.current();
    let clusters: Vec<kubernetes::ClusterStatus> = state
        .clusters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    let stale = kubernetes::stale_clusters(&state.clusters);
    let services = catalog
        .services
        .values()
        .map(|s| {
            let resolved = state.policy.weights(&s.name.to_string()).ok();
            let weights_from = resolved.as_ref().map(|r| r.2.as_str()).unwrap_or("none");
            let weights = resolved.map(|r| r.1);
            let clusters = s
                .backends
                .iter()
                .map(|(c, b)| {
                    let weight_bp = weights
                        .as_ref()
                        .map(|w| w.get(c).basis_points())
                        .unwrap_or(0);
                    let status = ClusterStatus {
                        weight_bp,
                        endpoints: b.endpoints.len(),
                        ready: b.ready_endpoints(),
                        stale: stale.contains(c.as_str()),
                    };
                    (c.to_string(), status)
                })
                .collect();
            ServiceStatus {
                name: s.name.to_string(),
                ports: s.ports.iter().map(|p| p.port).collect(),
                weights_from,
                clusters,
            }
        })
        .collect();
    let source = state
        .file_status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let resources = ferry_xds::ResourceType::ALL
        .into_iter()
        .map(|k| (k.short(), snapshot.of(k).len()))
        .collect();
    let grpc_resources = ferry_xds::ResourceType::ALL
        .into_iter()
        .map(|k| {
            (
                k.short(),
                snapshot.served(ferry_xds::ClientKind::Grpc, k).len(),
            )
        })
        .collect();
    // Those in flight and the last ones that ended: /status costs what is
    // active, not every migration ever run (`ferry migrate list` has all).
    let mut recent = state.engine.recent(ENDED_SHOWN);
    recent.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    let migrations = recent
        .into_iter()
        .map(|m| MigrationStatus {
            waiting: ferry_migrate::migration_api::waiting(&m),
            acked: m.acks.unwrap_or_default().acked,
            connected: m.acks.unwrap_or_default().connected,
            step: m.step_reached() + 1,
            id: m.id,
            service: m.plan.service.to_string(),
            stage: m.stage.as_str(),
            phase: m.stage.phase_str(),
            steps: m.plan.steps.len(),
            weights_bp: m.weights.iter().map(|(c, w)| (c.to_string(), *w)).collect(),
            reason: m.reason,
        })
        .collect();
    Json(StatusPage {
        ready: catalog.is_loaded() && snapshot.is_ready(),
        policy: PolicyStatus {
            version: state.policy.version(),
            store: state.store,
            leading: state.engine.is_leading(),
            returning_proxies: state.engine.returning_proxies(),
            migrations,
        },
        catalog: CatalogStatus {
            version: catalog.version,
            source,
            kubernetes: clusters.clone(),
            cluster_secrets: state
                .cluster_secrets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            services,
        },
        xds: XdsStatus {
            snapshot_version: snapshot.version,
            catalog_version: snapshot.catalog_version,
            resources,
            secrets: state
                .secrets
                .as_ref()
                .map(|s| s.status())
                .unwrap_or_default(),
            grpc_resources,
            clients: state.clients.snapshot(),
        },
    })
}
