//! The innermost service: sends one attempt to the endpoint the balancer
//! chose, over pooled connections: HTTP/1.1 with keep-alive (see
//! `h1pool`), or HTTP/2 (multiplexed connections per endpoint, see
//! `h2pool`) when the cluster says so. Either way the request keeps the
//! client's host.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;

use crate::call::{Body, Call, Failure, Outcome};
use crate::config::{Endpoint, Protocol, Upstream};
use crate::h1pool::H1Pool;
use crate::h2pool::H2Pool;

/// How upstream connections are made and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this long.
    pub idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per endpoint; more are closed as
    /// their responses end.
    pub max_idle_per_endpoint: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
            max_idle_per_endpoint: 256,
        }
    }
}

/// Makes TLS connections to one cluster's endpoints.
pub type TlsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A pool of TLS connections to one cluster's endpoints.
#[derive(Clone)]
pub enum TlsClient {
    Http1(Arc<H1Pool<TlsConnector>>),
    Http2(Arc<H2Pool<TlsConnector>>),
}

fn connector(config: &PoolConfig) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector
}

/// The proxy's own certificate chain and key, for mutual TLS.
pub type ClientAuth = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// A TLS client for a cluster: certificates must chain to `roots` and
/// name `server_name`, which is also sent as SNI; the proxy shows
/// `client_auth` when given; ALPN offers HTTP/2 or HTTP/1.1 as the cluster
/// speaks.
pub fn tls_client(
    config: &PoolConfig,
    roots: rustls::RootCertStore,
    server_name: rustls::pki_types::ServerName<'static>,
    client_auth: Option<ClientAuth>,
    protocol: Protocol,
) -> Result<TlsClient, String> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("no TLS client: {e}"))?
    .with_root_certificates(roots);
    let tls = match client_auth {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("tls_certificates: {e}"))?,
    };
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(server_name));
    let mut tcp = connector(config);
    tcp.enforce_http(false);
    Ok(match protocol {
        Protocol::Http1 => TlsClient::Http1(Arc::new(H1Pool::new(
            builder.enable_http1().wrap_connector(tcp),
            Scheme::HTTPS,
            *config,
        ))),
        Protocol::Http2 => TlsClient::Http2(Arc::new(H2Pool::new(
            builder.enable_http2().wrap_connector(tcp),
            Scheme::HTTPS,
            *config,
        ))),
    })
}

/// The largest response head an upstream may send (as Envoy's default
/// 60 KiB for headers, plus the status line): hyper's read buffer starts
/// at 8 KiB per connection and grows to this only for a head that needs it.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The upstream connection pools, shared by every clone of the stack.
#[derive(Clone, Debug)]
pub struct Forward {
    pools: Arc<Pools>,
}

#[derive(Debug)]
struct Pools {
    http1: Arc<H1Pool<HttpConnector>>,
    http2: Arc<H2Pool<HttpConnector>>,
}

impl Forward {
    pub fn new(config: PoolConfig) -> Self {
        let connector = connector(&config);
        let http1 = Arc::new(H1Pool::new(connector.clone(), Scheme::HTTP, config));
        let http2 = Arc::new(H2Pool::new(connector, Scheme::HTTP, config));
        Self {
            pools: Arc::new(Pools { http1, http2 }),
        }
    }
}

/// The error and its causes, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
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
        let Call {
            request,
            upstream,
            endpoint,
            client_fault,
            ..
        } = call;
        let Some(endpoint) = endpoint else {
            return Box::pin(std::future::ready(Err(Failure::NoEndpoint)));
        };
        let tls = upstream.tls.as_ref().map(|t| t.state().client.clone());
        let pools = self.pools.clone();
        Box::pin(async move {
            let sent = match (tls, upstream.protocol) {
                (Some(TlsClient::Http1(pool)), _) => {
                    http1(&pool, &upstream, &endpoint, request).await
                }
                (Some(TlsClient::Http2(pool)), _) => {
                    http2(&pool, Scheme::HTTPS, &endpoint, request).await
                }
                (None, Protocol::Http1) => http1(&pools.http1, &upstream, &endpoint, request).await,
                (None, Protocol::Http2) => {
                    http2(&pools.http2, Scheme::HTTP, &endpoint, request).await
                }
            };
            // A failure while the client's own body could not be read is
            // the client's, whatever the upstream exchange made of it.
            match sent {
                Err(_) if client_fault.get().is_some() => Err(Failure::ClientBody(
                    client_fault.get().unwrap_or_default().to_owned(),
                )),
                other => other,
            }
        })
    }
}

/// The request's URI, aimed at `authority` over `scheme`.
fn aim(
    request: &http::Request<Body>,
    scheme: Scheme,
    authority: Authority,
) -> Result<Uri, Failure> {
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(scheme)
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|e| Failure::Reset(format!("cannot address the request at {authority}: {e}")))
}

/// Sends over HTTP/1.1 to the endpoint, the request in origin form (the
/// client's host stays in the Host header).
async fn http1<C>(
    pool: &H1Pool<C>,
    upstream: &Upstream,
    endpoint: &Endpoint,
    mut request: http::Request<Body>,
) -> Outcome
where
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<crate::call::BoxError>,
{
    if request.uri().scheme().is_some() || request.uri().path_and_query().is_none() {
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
    }
    *request.version_mut() = http::Version::HTTP_11;
    let connects = &upstream.metrics.http1_connects;
    pool.send(endpoint.addr, connects, request).await
}

/// Sends over HTTP/2: the client's host becomes the `:authority`, and the
/// connection goes to the endpoint.
async fn http2<C>(
    pool: &H2Pool<C>,
    scheme: Scheme,
    endpoint: &Endpoint,
    mut request: http::Request<Body>,
) -> Outcome
where
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<crate::call::BoxError>,
{
    let host = client_authority(&request).unwrap_or_else(|| endpoint.authority.clone());
    *request.uri_mut() = aim(&request, scheme, host)?;
    *request.version_mut() = http::Version::HTTP_2;
    request.headers_mut().remove(http::header::HOST);
    pool.send(endpoint.addr, request).await
}

/// The authority the client addressed: the URI's (HTTP/2, or an absolute
/// form) or else the Host header's.
fn client_authority(request: &http::Request<Body>) -> Option<Authority> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.clone());
    }
    let host = request.headers().get(http::header::HOST)?.to_str().ok()?;
    host.parse().ok()
}
