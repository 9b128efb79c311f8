//! `ferry control`: wires the catalog file source, translation, the ADS
//! server and the admin endpoint together, and shuts them down gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_discovery::Catalog;
use ferry_discovery::file::FileSource;
use ferry_discovery::kubernetes::{self, ClusterStatuses};
use ferry_xds::snapshot::{Debounce, run_translation};
use ferry_xds::status::ClientRegistry;
use ferry_xds::{AdsServer, SnapshotCache, TranslateOptions, Translator};
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

    /// Address of the xDS gRPC server (ADS, state-of-the-world and delta).
    #[arg(long, default_value = "127.0.0.1:18000", value_name = "ADDR")]
    xds_addr: SocketAddr,

    /// Address of the admin HTTP server: /healthz, /readyz, /metrics, /status.
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

    /// Upstream connect timeout set on every served cluster.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    connect_timeout: Duration,
}

pub async fn run(args: ControlArgs) -> anyhow::Result<()> {
    let metrics = telemetry::init_metrics().context("installing the metrics recorder")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));

    let catalog = Arc::new(Catalog::new());
    let cache = Arc::new(SnapshotCache::new());
    let clients = Arc::new(ClientRegistry::default());

    let source = FileSource::new(&args.catalog);
    let file_status = source.status();
    let kubernetes_config = source.kubernetes();
    let clusters: ClusterStatuses = Default::default();
    tokio::spawn(kubernetes::run(
        kubernetes_config,
        catalog.clone(),
        clusters.clone(),
        shutdown.clone(),
    ));
    let source_task = tokio::spawn(source.run(catalog.clone(), shutdown.clone()));

    let translator = Translator::new(TranslateOptions {
        listener_addr: args.listener_addr,
        connect_timeout: args.connect_timeout,
        ..TranslateOptions::default()
    });
    let debounce = Debounce {
        quiet: args.debounce,
        max_delay: args.debounce_max_delay,
    };
    let translate_task = tokio::spawn(run_translation(
        catalog.subscribe(),
        cache.clone(),
        translator,
        debounce,
        shutdown.clone(),
    ));

    let admin_listener = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin address {}", args.admin_addr))?;
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
        file_status,
        clusters,
        metrics,
    };
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, shutdown.clone()));

    let ads = AdsServer::new(cache, clients, shutdown.clone());
    let incoming = tokio_stream_incoming(xds_listener);
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(ads.into_service())
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
    if let Ok(Err(e)) = admin_task.await {
        tracing::warn!(error = %e, "admin server ended with an error");
    }
    tracing::info!("ferry control stopped");
    Ok(())
}

fn tokio_stream_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn watch_signals(shutdown: CancellationToken) {
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
