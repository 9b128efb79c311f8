//! `ferry proxy`: runs the data plane, taking its config from a control
//! plane over delta xDS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_proxy::ProxyConfig;
use ferry_proxy::forward::PoolConfig;
use ferry_xds::channel::XdsSecurity;
use ferry_xds::client::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::telemetry;

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// The control plane's xDS address (http://host:port, or
    /// https://host:port with --xds-ca).
    #[arg(long, default_value = "http://127.0.0.1:18000", value_name = "URL")]
    xds: String,

    /// The CA (PEM) the control plane's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    xds_ca: Option<PathBuf>,

    /// This proxy's client certificate chain (PEM) for the control
    /// plane's mutual TLS; needs --xds-key. Read again on each reconnect.
    #[arg(long, value_name = "FILE", requires = "xds_key")]
    xds_cert: Option<PathBuf>,

    /// The private key (PEM) of --xds-cert.
    #[arg(long, value_name = "FILE", requires = "xds_cert")]
    xds_key: Option<PathBuf>,

    /// A file holding a bearer token for the control plane (for a
    /// proxy without a client certificate). Read again on each reconnect.
    #[arg(long, value_name = "FILE")]
    xds_token_file: Option<PathBuf>,

    /// The name the control plane's certificate must carry, when not
    /// the host of --xds.
    #[arg(long, value_name = "NAME")]
    xds_server_name: Option<String>,

    /// This proxy's node id, as the control plane lists its clients.
    #[arg(long, value_name = "ID")]
    node_id: String,

    /// The node's cluster (a fleet name).
    #[arg(long, default_value = "ferry-proxy", value_name = "NAME")]
    node_cluster: String,

    /// Address for user traffic (HTTP/1.1 and HTTP/2 cleartext).
    #[arg(long, default_value = "0.0.0.0:8080", value_name = "ADDR")]
    listen: SocketAddr,

    /// Admin address: /ready, /config_dump, /metrics, POST /drain.
    #[arg(long, default_value = "127.0.0.1:9902", value_name = "ADDR")]
    admin_addr: SocketAddr,

    /// Worker threads (default: one per core; 1 runs everything on one
    /// thread).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,

    /// Upstream request timeout when a route sets none.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    timeout: Duration,

    /// Client connections with no request in flight for this long are
    /// closed (HTTP/2 ones with a GOAWAY); HTTP/2 peers are also pinged at
    /// half this and dropped when they stop answering.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    idle_timeout: Duration,

    /// A request head must arrive within this long of its first byte
    /// (however long the connection was idle before); slower ones are
    /// dropped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    request_head_timeout: Duration,

    /// The largest request head (request line and headers) a client may
    /// send, in KiB: 431 beyond it, 414 when the request line alone is
    /// that long. HTTP/2 header lists are bounded alike.
    #[arg(long, default_value_t = 60, value_name = "KIB")]
    max_request_headers_kb: usize,

    /// Upstream connect timeout.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    connect_timeout: Duration,

    /// Idle upstream connections are closed after this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    upstream_idle_timeout: Duration,

    /// Idle HTTP/1.1 connections kept per upstream endpoint.
    #[arg(long, default_value_t = 256, value_name = "N")]
    upstream_max_idle: usize,

    /// Address for TLS user traffic (HTTP/1.1 and HTTP/2 by ALPN); needs
    /// --tls-cert.
    #[arg(long, value_name = "ADDR", requires = "tls_cert")]
    tls_listen: Option<SocketAddr>,

    /// A certificate chain and its key, PEM: CERT,KEY. Repeat for more
    /// names; each is served by SNI, the first to clients that send none.
    #[arg(long, value_name = "CERT,KEY", requires = "tls_listen")]
    tls_cert: Vec<ferry_proxy::tls::CertPair>,

    /// How often certificate files (the TLS listener's, and those the
    /// catalog names for TLS to services) are checked for changes.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    tls_reload_interval: Duration,

    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    drain_grace: Duration,
}

impl ProxyArgs {
    pub fn workers(&self) -> Option<usize> {
        self.workers
    }
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let metrics = telemetry::init_metrics().context("installing the metrics recorder")?;
    // Series that dashboards read exist from the start (at 0).
    metrics::gauge!("ferry_proxy_upstream_http2_connections").increment(0.0);
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::control::watch_signals(shutdown.clone()));
    anyhow::ensure!(
        !args.idle_timeout.is_zero() && !args.request_head_timeout.is_zero(),
        "--idle-timeout and --request-head-timeout must be longer than 0"
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.max_request_headers_kb),
        "--max-request-headers-kb must be within 1..=1024"
    );
    anyhow::ensure!(
        !args.upstream_idle_timeout.is_zero() && !args.connect_timeout.is_zero(),
        "--upstream-idle-timeout and --connect-timeout must be longer than 0"
    );
    let security = XdsSecurity {
        ca: args.xds_ca.clone(),
        identity: args.xds_cert.clone().zip(args.xds_key.clone()),
        token_file: args.xds_token_file.clone(),
        server_name: args.xds_server_name.clone(),
    };
    security.check(&args.xds).context("--xds")?;
    let config = ProxyConfig {
        xds: ClientConfig {
            security: security.clone(),
            server: args.xds,
            node_id: args.node_id,
            node_cluster: args.node_cluster,
        },
        listen: args.listen,
        tls: args.tls_listen.map(|addr| ferry_proxy::TlsListen {
            addr,
            certs: args.tls_cert.clone(),
        }),
        pool: PoolConfig {
            connect_timeout: args.connect_timeout,
            idle_timeout: args.upstream_idle_timeout,
            max_idle_per_endpoint: args.upstream_max_idle,
        },
        admin: args.admin_addr,
        default_timeout: args.timeout,
        drain_grace: args.drain_grace,
        limits: ferry_proxy::connection::ClientLimits {
            idle_timeout: args.idle_timeout,
            head_timeout: args.request_head_timeout,
            max_head_bytes: args.max_request_headers_kb * 1024,
        },
        tls_reload_every: args.tls_reload_interval,
    };
    let render: ferry_proxy::admin::RenderMetrics = Arc::new(move || {
        metrics.run_upkeep();
        metrics.render()
    });
    ferry_proxy::run(config, render, shutdown)
        .await
        .context("ferry proxy")
}
