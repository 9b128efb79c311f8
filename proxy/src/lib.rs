//! Ferry's proxy: the L7 data plane that takes its whole config from a
//! control plane over delta xDS and forwards user traffic to each
//! service's cluster backends by weight.
//!
//! - [`config`]: the routing snapshot, built and validated from the xDS
//!   resources held, swapped atomically;
//! - [`pick`]: weighted and sticky cluster picks;
//! - [`server`]: listeners (cleartext and [`tls`]), routing, header
//!   rewriting, upgrades;
//! - [`stack`]: the upstream layers in one place: [`observe`],
//!   [`timeout`], [`retry`], [`balance`] (with [`outlier`] detection),
//!   [`forward`]; [`health`]: active health checks;
//! - [`admin`]: `/ready`, `/config_dump`, `/metrics`, `/drain`.

pub mod admin;
pub mod balance;
pub mod call;
pub mod client_body;
pub mod config;
pub mod connection;
pub mod forward;
pub mod h1pool;
pub mod h2pool;
pub mod headers;
pub mod health;
pub mod lrs;
pub mod observe;
pub mod outlier;
pub mod pick;
pub mod retry;
pub mod server;
pub mod stack;
pub mod timeout;
pub use ferry_tls as tls;
pub mod tunnel;
pub mod upstream_tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_xds_core::ResourceType;
use ferry_xds_core::client::{ClientConfig, ConfigSink, Resources};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use server::Proxy;

/// What `ferry proxy` was asked to do.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub xds: ClientConfig,
    pub listen: SocketAddr,
    /// A TLS listener and the certificates it serves by SNI.
    pub tls: Option<TlsListen>,
    pub admin: SocketAddr,
    /// Upstream request timeout when a route sets none.
    pub default_timeout: Duration,
    /// How long in-flight requests may take to finish on shutdown.
    pub drain_grace: Duration,
    /// What a client connection may take (idle time, request heads).
    pub limits: connection::ClientLimits,
    pub pool: forward::PoolConfig,
    /// How often certificate files (the listener's, and those of TLS to
    /// upstreams) are checked for changes.
    pub tls_reload_every: Duration,
}

/// Where TLS is terminated, and with which certificates.
#[derive(Debug, Clone)]
pub struct TlsListen {
    pub addr: SocketAddr,
    pub certs: Vec<tls::CertPair>,
}

/// Takes validated config from the xDS client into the proxy.
struct Sink {
    proxy: Arc<Proxy>,
    pool: forward::PoolConfig,
}

impl ConfigSink for Sink {
    fn apply(&mut self, resources: &Resources, changed: ResourceType) -> Result<(), String> {
        let current = self.proxy.routing.load_full();
        let routing = config::build_with(resources, &current, &self.pool)?;
        tracing::debug!(
            r#type = changed.short(),
            upstreams = routing.upstreams.len(),
            "config applied"
        );
        let warm = routing.warm();
        self.proxy.routing.store(Arc::new(routing));
        if warm && !self.proxy.configured.swap(true, Ordering::SeqCst) {
            tracing::info!("config complete (routes and their clusters): ready");
        }
        metrics::counter!("ferry_proxy_config_swaps_total").increment(1);
        // When the config in use was swapped in (its versions are on
        // /config_dump; as labels they would grow without bound).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        metrics::gauge!("ferry_proxy_config_last_swap_timestamp_seconds").set(now);
        Ok(())
    }

    fn connected(&mut self, up: bool) {
        metrics::gauge!("ferry_proxy_xds_connected").set(if up { 1.0 } else { 0.0 });
    }
}

/// Runs the proxy until `shutdown`: the xDS client, the admin server and
/// the listener; then drains.
pub async fn run(
    config: ProxyConfig,
    metrics: admin::RenderMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let proxy = Proxy::new(config.default_timeout, config.limits, config.pool);
    let mut listeners = vec![server::Listener {
        tcp: TcpListener::bind(config.listen).await?,
        tls: None,
    }];
    if let Some(tls) = &config.tls {
        let certs = tls::Certificates::load(tls.certs.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        tokio::spawn(
            certs
                .clone()
                .watch(config.tls_reload_every, shutdown.clone()),
        );
        listeners.push(server::Listener {
            tcp: TcpListener::bind(tls.addr).await?,
            tls: Some(tokio_rustls::TlsAcceptor::from(tls::server_config(certs))),
        });
        tracing::info!(listen = %tls.addr, certificates = tls.certs.len(), "TLS listener");
    }
    let admin_listener = TcpListener::bind(config.admin).await?;
    tracing::info!(listen = %config.listen, admin = %config.admin, xds = %config.xds.server, node = %config.xds.node_id, "ferry proxy starting");
    let xds = tokio::spawn(ferry_xds_core::client::run(
        config.xds.clone(),
        Sink {
            proxy: proxy.clone(),
            pool: config.pool,
        },
        shutdown.clone(),
    ));
    let health = tokio::spawn(health::run(proxy.clone(), shutdown.clone()));
    let upstream_tls = tokio::spawn(upstream_tls::watch(
        proxy.clone(),
        config.tls_reload_every,
        shutdown.clone(),
    ));
    let lrs = tokio::spawn(lrs::run(
        config.xds.server.clone(),
        config.xds.security.clone(),
        ferry_proto::envoy::config::core::v3::Node {
            id: config.xds.node_id.clone(),
            cluster: config.xds.node_cluster.clone(),
            user_agent_name: "ferry-proxy".to_owned(),
            ..Default::default()
        },
        proxy.clone(),
        shutdown.clone(),
    ));
    // Draining (SIGTERM or /drain) stops the listener; the xDS client and
    // the admin endpoint run until shutdown.
    let drain = shutdown.child_token();
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        proxy.clone(),
        metrics,
        drain.clone(),
        shutdown.clone(),
    ));
    server::serve(listeners, proxy, drain, config.drain_grace).await;
    shutdown.cancelled().await;
    let _ = xds.await;
    let _ = lrs.await;
    let _ = health.await;
    let _ = upstream_tls.await;
    let _ = admin.await;
    tracing::info!("ferry proxy stopped");
    Ok(())
}
