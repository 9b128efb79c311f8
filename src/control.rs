//! `ferry control`: wires the catalog file source, translation, the ADS
//! server and the admin endpoint together, and shuts them down gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_discovery::Catalog;
use ferry_discovery::file::{FileSource, RemovalLimit};
use ferry_discovery::kubernetes::{self, ClusterStatuses};
use ferry_migrate::api::TrafficApi;
use ferry_migrate::campaign_api::CampaignsApi;
use ferry_migrate::deploy::{DeployConfig, DeployHook};
use ferry_migrate::leadership::{Leadership, Shared, Standalone};
use ferry_migrate::migration_api::MigrationsApi;
use ferry_migrate::{Engine, EngineConfig, Policy, Store};
use ferry_xds::ads::XdsLimits;
use ferry_xds::lrs::{LoadReports, LrsServer};
use ferry_xds::secrets::SecretStore;
use ferry_xds::snapshot::{Debounce, run_translation};
use ferry_xds::status::ClientRegistry;
use ferry_xds::{AdsServer, SnapshotCache, TranslateOptions, Translator, UpstreamTlsMode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::telemetry;

#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// Catalog file (YAML) of services, their cluster backends and
    /// optional weights. Watched: edits apply without a restart; an
    /// invalid edit is refused and the last good catalog keeps serving.
    #[arg(long, value_name = "FILE")]
    catalog: PathBuf,

    /// The largest share of the catalog's services, in percent, one load
    /// of the file may remove; a load that removes more (or leaves no
    /// service at all) is refused and the last good catalog keeps serving.
    #[arg(long, default_value_t = 50.0, value_parser = percent, value_name = "PERCENT")]
    max_removed_share: f64,

    /// Accept any catalog load, however many services it removes, an
    /// empty catalog included.
    #[arg(long)]
    allow_mass_removal: bool,

    /// Address of the xDS gRPC server (ADS, state-of-the-world and delta).
    #[arg(long, default_value = "127.0.0.1:18000", value_name = "ADDR")]
    xds_addr: SocketAddr,

    /// Address of the admin HTTP server: the web console (`/`), /healthz,
    /// /readyz, /metrics, /status. With --api-auth the console needs one
    /// of its tokens.
    #[arg(long, default_value = "127.0.0.1:19000", value_name = "ADDR")]
    admin_addr: SocketAddr,

    /// Address proxies listen on for user traffic (the served Listener).
    #[arg(long, default_value = "0.0.0.0:10000", value_name = "ADDR")]
    listener_addr: SocketAddr,

    /// Quiet time that coalesces a burst of catalog changes into one push.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    debounce: Duration,

    /// Longest a push waits while changes keep arriving.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    debounce_max_delay: Duration,

    /// Directory of Ferry's own state: the traffic policy store
    /// (`policy.redb`: weights, pins, audit log). Created if missing.
    #[arg(long, default_value = ".ferry", value_name = "DIR")]
    data_dir: PathBuf,

    /// Address of the traffic API (gRPC `ferry.v1.Traffic`, plus gRPC
    /// health and reflection).
    #[arg(long, default_value = "127.0.0.1:18001", value_name = "ADDR")]
    api_addr: SocketAddr,

    /// etcd endpoints (comma separated, e.g. http://10.0.0.5:2379): keep
    /// the policy in etcd instead of `--data-dir`, for several control
    /// planes behind one state. One of them, elected on an etcd lease,
    /// writes and runs migrations; all of them serve xDS. Needs a ferry
    /// built with the `etcd` feature.
    #[arg(long, value_delimiter = ',', value_name = "URLS")]
    etcd_endpoints: Vec<String>,

    /// Key prefix of this deployment's state in etcd.
    #[arg(long, default_value = "/ferry", value_name = "PREFIX")]
    etcd_prefix: String,

    /// TTL of the leadership lease in etcd: a leader that stops renewing
    /// it is replaced within this time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    etcd_lease_ttl: Duration,

    /// This control plane's name in the leader election (default: the
    /// host name and the API address).
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,

    /// Serve the traffic and migrations APIs over TLS with this
    /// certificate chain (PEM); needs --api-tls-key.
    #[arg(long, value_name = "FILE", requires = "api_tls_key")]
    api_tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --api-tls-cert.
    #[arg(long, value_name = "FILE", requires = "api_tls_cert")]
    api_tls_key: Option<PathBuf>,

    /// Accept client certificates signed by this CA (PEM): mutual TLS. The
    /// certificate's subject CN is the caller's identity. Needs
    /// --api-tls-cert.
    #[arg(long, value_name = "FILE", requires = "api_tls_cert")]
    api_client_ca: Option<PathBuf>,

    /// Identities and roles (YAML: bearer tokens and client certificate
    /// names, each `read` or `write`). With it, every API call must be
    /// authenticated, and the identity is the audit log's actor.
    #[arg(long, value_name = "FILE")]
    api_auth: Option<PathBuf>,

    /// Migrations that may be in flight at once; more wait their turn.
    #[arg(long, default_value_t = 10, value_name = "N")]
    max_concurrent_migrations: usize,

    /// How often proxies report load (LRS) to the control plane; the
    /// migration gates read these reports.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    lrs_interval: Duration,

    /// Resource names one xDS stream may subscribe to (over all types);
    /// a stream asking for more is ended with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    xds_max_names: usize,

    /// xDS streams (ADS) open at once from one peer IP address; more are
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    xds_max_streams_per_peer: usize,

    /// Concurrent gRPC streams on one xDS connection (HTTP/2
    /// MAX_CONCURRENT_STREAMS).
    #[arg(long, default_value_t = 100, value_name = "N")]
    xds_max_streams_per_connection: u32,

    #[command(flatten)]
    xds_port: crate::xds_port::XdsPortArgs,

    /// Count load reports from any node. By default a report counts only
    /// when its node id holds a live ADS stream from the same IP address
    /// (with --xds-auth, it must also be a node the stream's identity may
    /// claim, whatever this flag says).
    #[arg(long)]
    lrs_any_node: bool,

    /// How clusters carry a service's upstream TLS files: `sds` serves
    /// their content as SDS secrets over ADS (the files live only where
    /// the control plane runs, and renewed certificates reach every proxy
    /// without a cluster change); `files` sends the paths for each proxy
    /// to read on its own host.
    #[arg(long, value_enum, default_value_t = UpstreamTlsArg::Sds, value_name = "MODE")]
    upstream_tls: UpstreamTlsArg,

    /// How often the upstream TLS files served as secrets are checked for
    /// changes.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    upstream_tls_reload_interval: Duration,

    /// Upstream connect timeout set on every served cluster.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    connect_timeout: Duration,

    /// After a restart, a migration step counts as acknowledged only once
    /// the proxies connected before it are back, or after this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    restart_grace: Duration,

    /// The deploy hook of migrations started with `--deploy hook`: a shell
    /// command run at DOUBLE_DEPLOY, CLEANUP and on a rollback, with
    /// FERRY_STAGE, FERRY_MIGRATION, FERRY_SERVICE, FERRY_SOURCES and
    /// FERRY_TARGETS in its environment; exit 0 is success.
    #[arg(long, value_name = "CMD", conflicts_with = "deploy_webhook")]
    deploy_hook: Option<String>,

    /// Like --deploy-hook, as a JSON POST to an http:// URL; a 2xx answer
    /// is success.
    #[arg(long, value_name = "URL")]
    deploy_webhook: Option<String>,

    /// The longest one deploy hook call may take.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    deploy_timeout: Duration,
}

impl ControlArgs {
    fn deploy(&self) -> anyhow::Result<DeployConfig> {
        let hook = match (&self.deploy_hook, &self.deploy_webhook) {
            (Some(command), _) if command.trim().is_empty() => {
                anyhow::bail!("--deploy-hook: the command is empty")
            }
            (Some(command), _) => DeployHook::Command(command.clone()),
            (None, Some(url)) if url.starts_with("http://") => DeployHook::Webhook(url.clone()),
            (None, Some(url)) => {
                anyhow::bail!("--deploy-webhook {url:?}: give an http:// URL")
            }
            (None, None) => DeployHook::None,
        };
        Ok(DeployConfig {
            hook,
            timeout: self.deploy_timeout,
            clusters: None,
        })
    }
}

pub async fn run(args: ControlArgs) -> anyhow::Result<()> {
    let metrics = telemetry::init_metrics().context("installing the metrics recorder")?;
    // Series that dashboards and alerts read exist from the start (at 0),
    // not only after the first event.
    for kind in ferry_xds::ResourceType::ALL {
        metrics::counter!("ferry_xds_nacks_total", "type" => kind.short()).increment(0);
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));

    let catalog = Arc::new(Catalog::new());
    let cache = Arc::new(SnapshotCache::new());

    // The persisted policy is loaded before anything is translated or
    // served, so a restart never serves default weights.
    let store = open_store(&args).await?;
    let policy = Arc::new(
        Policy::load(store.backend(), catalog.clone())
            .await
            .context("loading the traffic policy")?,
    );
    let clients = Arc::new(ClientRegistry::default());
    let loads = Arc::new(LoadReports::default());
    let source = FileSource::new(&args.catalog).with_removal_limit(RemovalLimit {
        max_share: args.max_removed_share / 100.0,
        allow: args.allow_mass_removal,
    });
    let mut deploy = args.deploy()?;
    deploy.clusters = Some(source.kubernetes());
    let fleet = Arc::new(ferry_migrate::fleet::Fleet::default());
    let engine = Engine::load(
        policy.clone(),
        catalog.clone(),
        cache.clone(),
        clients.clone(),
        loads.clone(),
        fleet.clone(),
        EngineConfig {
            concurrency: args.max_concurrent_migrations.max(1),
            node: store.node().to_owned(),
            restart_grace: args.restart_grace,
            deploy,
            ..EngineConfig::default()
        },
    )
    .await
    .context("loading the persisted migrations")?;
    let store_kind = store.kind();
    store.start(
        Shared {
            policy: policy.clone(),
            engine: engine.clone(),
            cache: cache.clone(),
            clients: clients.clone(),
            loads: loads.clone(),
            fleet,
        },
        shutdown.clone(),
    );

    let file_status = source.status();
    let kubernetes_config = source.kubernetes();
    let clusters: ClusterStatuses = Default::default();
    let cluster_secrets = kubernetes::SecretsStatusHandle::default();
    tokio::spawn(kubernetes::run(
        kubernetes_config,
        catalog.clone(),
        clusters.clone(),
        cluster_secrets.clone(),
        shutdown.clone(),
    ));
    let source_task = tokio::spawn(source.run(catalog.clone(), shutdown.clone()));

    let translator = Translator::new(TranslateOptions {
        listener_addr: args.listener_addr,
        connect_timeout: args.connect_timeout,
        upstream_tls: match args.upstream_tls {
            UpstreamTlsArg::Sds => UpstreamTlsMode::Sds,
            UpstreamTlsArg::Files => UpstreamTlsMode::Files,
        },
        ..TranslateOptions::default()
    });
    let secrets = (args.upstream_tls == UpstreamTlsArg::Sds).then(SecretStore::new);
    if let Some(store) = &secrets {
        tokio::spawn(
            store
                .clone()
                .watch(args.upstream_tls_reload_interval, shutdown.clone()),
        );
    }
    let debounce = Debounce {
        quiet: args.debounce,
        max_delay: args.debounce_max_delay,
    };
    let translate_task = tokio::spawn(run_translation(
        catalog.subscribe(),
        policy.overrides(),
        cache.clone(),
        translator,
        debounce,
        secrets.clone(),
        shutdown.clone(),
    ));

    let admin_listener = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin address {}", args.admin_addr))?;
    let api_security = ApiSecurity::load(&args)?;
    let api_listener = TcpListener::bind(args.api_addr)
        .await
        .with_context(|| format!("binding the traffic API address {}", args.api_addr))?;
    let xds_port = crate::xds_port::XdsPort::load(&args.xds_port, args.xds_addr, &shutdown)?;
    let xds_listener = TcpListener::bind(args.xds_addr)
        .await
        .with_context(|| format!("binding the xDS address {}", args.xds_addr))?;
    tracing::info!(
        xds = %args.xds_addr, admin = %args.admin_addr, catalog = %args.catalog.display(),
        listener = %args.listener_addr, "ferry control starting"
    );

    let admin_state = AdminState {
        catalog: catalog.clone(),
        cache: cache.clone(),
        clients: clients.clone(),
        secrets,
        file_status,
        clusters: clusters.clone(),
        cluster_secrets,
        policy: policy.clone(),
        engine: engine.clone(),
        store: store_kind,
        metrics,
        loads: loads.clone(),
        console: crate::console::Console::new(api_security.auth_config.clone()),
    };
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, shutdown.clone()));

    tokio::spawn(expire_pins(policy.clone(), shutdown.clone()));
    let api_task = tokio::spawn(serve_api(
        api_listener,
        api_security,
        TrafficApi::new(policy, catalog.clone(), clusters.clone()).with_shutdown(shutdown.clone()),
        MigrationsApi::new(engine.clone()).with_shutdown(shutdown.clone()),
        CampaignsApi::new(engine.clone()).with_shutdown(shutdown.clone()),
        shutdown.clone(),
    ));
    // Migrations resume once the served snapshot carries the persisted
    // policy (translation starts from it), so nothing shifts on stale state.
    let engine_task = tokio::spawn(engine.clone().run(shutdown.clone()));

    let lrs = LrsServer::new(
        loads,
        cache.clone(),
        clients.clone(),
        args.lrs_interval,
        shutdown.clone(),
    )
    .accept_any_node(args.lrs_any_node)
    .with_auth(xds_port.auth.clone());
    let ads = AdsServer::new(cache, clients, shutdown.clone())
        .with_limits(XdsLimits {
            max_names: args.xds_max_names,
            max_streams_per_peer: args.xds_max_streams_per_peer,
            ..XdsLimits::default()
        })
        .with_auth(xds_port.auth);
    let incoming = ferry_xds::transport::incoming(xds_listener, xds_port.tls, shutdown.clone());
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(args.xds_max_streams_per_connection))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(ads.into_service())
        .add_service(lrs.into_service())
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel();
    served.context("xDS server failed")?;

    match source_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "catalog watcher ended with an error"),
        Err(e) => tracing::warn!(error = %e, "catalog watcher panicked"),
        Ok(Ok(())) => {}
    }
    let _ = translate_task.await;
    let _ = engine_task.await;
    if let Ok(Err(e)) = api_task.await {
        tracing::warn!(error = %e, "traffic API server ended with an error");
    }
    if let Ok(Err(e)) = admin_task.await {
        tracing::warn!(error = %e, "admin server ended with an error");
    }
    tracing::info!("ferry control stopped");
    Ok(())
}

/// `--upstream-tls`: see [`UpstreamTlsMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum UpstreamTlsArg {
    Sds,
    Files,
}

/// A percentage, 0 to 100.
fn percent(text: &str) -> anyhow::Result<f64> {
    match text.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => anyhow::bail!("{text:?} is not a percentage from 0 to 100"),
    }
}

/// The policy store the flags choose, with its leadership.
async fn open_store(args: &ControlArgs) -> anyhow::Result<Box<dyn Leadership>> {
    if args.etcd_endpoints.is_empty() {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
        let store = Store::open(&args.data_dir.join("policy.redb"))
            .with_context(|| format!("opening the policy store in {}", args.data_dir.display()))?;
        return Ok(Box::new(Standalone { store }));
    }
    open_etcd(args).await
}

#[cfg(feature = "etcd")]
async fn open_etcd(args: &ControlArgs) -> anyhow::Result<Box<dyn Leadership>> {
    let node = args.node_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "ferry".to_owned());
        format!("{host}/{}", args.api_addr)
    });
    let config = ferry_migrate::etcd::EtcdConfig {
        endpoints: args.etcd_endpoints.clone(),
        prefix: args.etcd_prefix.clone(),
        node: node.clone(),
        lease_ttl: args.etcd_lease_ttl,
    };
    let (store, election) = ferry_migrate::etcd::connect(config)
        .await
        .with_context(|| format!("connecting to etcd at {}", args.etcd_endpoints.join(",")))?;
    tracing::info!(node = %node, endpoints = %args.etcd_endpoints.join(","), prefix = %args.etcd_prefix, "policy store: etcd");
    Ok(Box::new(ferry_migrate::etcd::EtcdLeadership {
        store,
        election,
        node,
    }))
}

#[cfg(not(feature = "etcd"))]
async fn open_etcd(_: &ControlArgs) -> anyhow::Result<Box<dyn Leadership>> {
    anyhow::bail!(
        "--etcd-endpoints: this ferry was built without etcd support; build it with `--features etcd`"
    )
}

/// The traffic API with gRPC health and reflection, so `grpcurl` works.
/// TLS and auth of the API server, read from the flags' files.
struct ApiSecurity {
    tls: Option<tonic::transport::ServerTlsConfig>,
    auth: ferry_migrate::auth::AuthLayer,
    /// The identities of --api-auth, which the web console asks for too.
    auth_config: Option<Arc<ferry_migrate::auth::AuthConfig>>,
}

impl ApiSecurity {
    fn load(args: &ControlArgs) -> anyhow::Result<Self> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).with_context(|| format!("{what}: reading {}", path.display()))
        };
        let tls = match (&args.api_tls_cert, &args.api_tls_key) {
            (Some(cert), Some(key)) => {
                let identity = tonic::transport::Identity::from_pem(
                    read(cert, "--api-tls-cert")?,
                    read(key, "--api-tls-key")?,
                );
                let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &args.api_client_ca {
                    tls = tls
                        .client_ca_root(tonic::transport::Certificate::from_pem(read(
                            ca,
                            "--api-client-ca",
                        )?))
                        // Bearer tokens remain a way in; the auth layer
                        // refuses calls with neither.
                        .client_auth_optional(args.api_auth.is_some());
                }
                Some(tls)
            }
            _ => None,
        };
        let auth = match &args.api_auth {
            Some(path) => Some(Arc::new(
                ferry_migrate::auth::AuthConfig::load(path).context("--api-auth")?,
            )),
            None => None,
        };
        if auth.is_none() && !args.api_addr.ip().is_loopback() {
            tracing::warn!(addr = %args.api_addr, "the traffic API is open to anyone who can reach it: use --api-auth");
        }
        Ok(Self {
            tls,
            auth: ferry_migrate::auth::AuthLayer::shared(auth.clone()),
            auth_config: auth,
        })
    }
}

async fn serve_api(
    listener: TcpListener,
    security: ApiSecurity,
    api: TrafficApi,
    migrations: MigrationsApi,
    campaigns: CampaignsApi,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ferry_proto::ferry::v1::traffic_server::TrafficServer<TrafficApi>>()
        .await;
    health_reporter
        .set_serving::<ferry_proto::ferry::v1::migrations_server::MigrationsServer<MigrationsApi>>()
        .await;
    health_reporter
        .set_serving::<ferry_proto::ferry::v1::campaigns_server::CampaignsServer<CampaignsApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferry_proto::ferry::v1::FILE_DESCRIPTOR_SET)
        .build_v1();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = security.tls {
        server = match server.tls_config(tls) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "invalid API TLS configuration");
                return Err(e);
            }
        };
    }
    let mut router = server
        .layer(security.auth)
        .add_service(health)
        .add_service(api.into_service())
        .add_service(migrations.into_service())
        .add_service(campaigns.into_service());
    if let Ok(reflection) = reflection {
        router = router.add_service(reflection);
    }
    router
        .serve_with_incoming_shutdown(tokio_stream_incoming(listener), shutdown.cancelled_owned())
        .await
}

/// Releases pins whose TTL passed, once a second.
async fn expire_pins(policy: Arc<Policy>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = policy.expire_pins().await {
                    tracing::error!(error = %e, "cannot release expired pins");
                }
            }
        }
    }
}

fn tokio_stream_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

pub async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
