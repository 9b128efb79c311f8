//! The innermost service: sends one attempt to the endpoint the balancer
//! chose, over pooled connections: HTTP/1.1 with keep-alive, or HTTP/2
//! (h2c, one multiplexed connection per endpoint) when the cluster says so.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::{PathAndQuery, Scheme};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;

use crate::call::{Body, Call, Failure, Outcome};
use crate::config::Protocol;

/// How upstream connections are made and kept.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this long.
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A pool of TLS connections to one cluster's endpoints.
pub type TlsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

fn connector(config: &PoolConfig) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector
}

/// A TLS client for a cluster: certificates must chain to `roots` and
/// name `server_name`, which is also sent as SNI; ALPN offers HTTP/2 or
/// HTTP/1.1 as the cluster speaks.
pub fn tls_client(
    config: &PoolConfig,
    roots: rustls::RootCertStore,
    server_name: rustls::pki_types::ServerName<'static>,
    protocol: Protocol,
) -> Result<TlsClient, String> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("no TLS client: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(server_name));
    let mut tcp = connector(config);
    tcp.enforce_http(false);
    let https = match protocol {
        Protocol::Http1 => builder.enable_http1().wrap_connector(tcp),
        Protocol::Http2 => builder.enable_http2().wrap_connector(tcp),
    };
    Ok(Client::builder(TokioExecutor::new())
        .http2_only(protocol == Protocol::Http2)
        .pool_idle_timeout(config.idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// Bytes read from an upstream HTTP/1.1 connection at a time.
const READ_BUFFER: usize = 4096;

/// The upstream connection pools, shared by every clone of the stack.
#[derive(Clone, Debug)]
pub struct Forward {
    pools: Arc<Pools>,
}

#[derive(Debug)]
struct Pools {
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
}

impl Forward {
    pub fn new(config: PoolConfig) -> Self {
        let connector = connector(&config);
        // Responses are streamed through, so a small fixed read buffer per
        // upstream connection does (hyper's default starts at 8 KiB and
        // grows to 400 KiB).
        let http1 = Client::builder(TokioExecutor::new())
            .http1_read_buf_exact_size(READ_BUFFER)
            .pool_idle_timeout(config.idle_timeout)
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(config.idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(30))
            .build(connector);
        Self {
            pools: Arc::new(Pools { http1, http2 }),
        }
    }
}

/// The error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Service<Call> for Forward {
    type Response = http::Response<Body>;
    type Error = Failure;
    type Future = Pin<Box<dyn Future<Output = Outcome> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let Some(endpoint) = call.endpoint else {
            return Box::pin(std::future::ready(Err(Failure::NoEndpoint)));
        };
        let mut request = call.request;
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let tls = call.upstream.tls.as_ref();
        let uri = Uri::builder()
            .scheme(if tls.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            })
            .authority(endpoint.authority.clone())
            .path_and_query(path)
            .build();
        match uri {
            Ok(uri) => *request.uri_mut() = uri,
            Err(e) => {
                return Box::pin(std::future::ready(Err(Failure::Reset(format!(
                    "cannot address the request at {}: {e}",
                    endpoint.addr
                )))));
            }
        }
        let client = match call.upstream.protocol {
            Protocol::Http1 => {
                *request.version_mut() = http::Version::HTTP_11;
                &self.pools.http1
            }
            Protocol::Http2 => {
                *request.version_mut() = http::Version::HTTP_2;
                // The :authority comes from the URI.
                request.headers_mut().remove(http::header::HOST);
                &self.pools.http2
            }
        };
        let future = match tls {
            Some(tls) => tls.client.request(request),
            None => client.request(request),
        };
        Box::pin(async move {
            match future.await {
                Ok(response) => Ok(response.map(|b| b.map_err(Into::into).boxed())),
                Err(e) if e.is_connect() => Err(Failure::Connect(chain(&e))),
                Err(e) => Err(Failure::Reset(chain(&e))),
            }
        })
    }
}
