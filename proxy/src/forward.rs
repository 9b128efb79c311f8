//! The innermost service: sends one attempt to the endpoint the balancer
//! chose, over pooled connections: HTTP/1.1 with keep-alive, or HTTP/2
//! (multiplexed connections per endpoint, see `h2pool`) when the
//! cluster says so. Either way the request keeps the client's host.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;

use crate::call::{Body, Call, Failure, Outcome};
use crate::config::{Endpoint, Protocol};
use crate::h2pool::H2Pool;

/// How upstream connections are made and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Makes TLS connections to one cluster's endpoints.
pub type TlsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A pool of TLS connections to one cluster's endpoints.
pub enum TlsClient {
    Http1(Box<Client<TlsConnector, Body>>),
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
        Protocol::Http1 => TlsClient::Http1(Box::new(
            Client::builder(TokioExecutor::new())
                .http1_max_buf_size(MAX_RESPONSE_HEAD)
                .pool_idle_timeout(config.idle_timeout)
                .pool_timer(TokioTimer::new())
                .build(builder.enable_http1().wrap_connector(tcp)),
        )),
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
    http1: Client<HttpConnector, Body>,
    http2: Arc<H2Pool<HttpConnector>>,
}

impl Forward {
    pub fn new(config: PoolConfig) -> Self {
        let connector = connector(&config);
        // Responses are streamed through: the read buffer per upstream
        // connection stays at hyper's initial 8 KiB unless a large response
        // head needs more (up to MAX_RESPONSE_HEAD, not hyper's 400 KiB).
        let http1 = Client::builder(TokioExecutor::new())
            .http1_max_buf_size(MAX_RESPONSE_HEAD)
            .pool_idle_timeout(config.idle_timeout)
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
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
        let Some(endpoint) = call.endpoint else {
            return Box::pin(std::future::ready(Err(Failure::NoEndpoint)));
        };
        let fault = call.client_fault.clone();
        let tls = call.upstream.tls.as_ref().map(|t| t.state());
        let sent = match (tls.as_ref().map(|t| &t.client), call.upstream.protocol) {
            (Some(TlsClient::Http1(client)), _) => {
                http1(client, Scheme::HTTPS, &endpoint, call.request)
            }
            (Some(TlsClient::Http2(pool)), _) => {
                http2(pool.clone(), Scheme::HTTPS, &endpoint, call.request)
            }
            (None, Protocol::Http1) => {
                http1(&self.pools.http1, Scheme::HTTP, &endpoint, call.request)
            }
            (None, Protocol::Http2) => http2(
                self.pools.http2.clone(),
                Scheme::HTTP,
                &endpoint,
                call.request,
            ),
        };
        // A failure while the client's own body could not be read is the
        // client's, whatever the upstream exchange made of it.
        Box::pin(async move {
            match sent.await {
                Err(_) if fault.get().is_some() => Err(Failure::ClientBody(
                    fault.get().unwrap_or_default().to_owned(),
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

/// Sends over HTTP/1.1: the pool is keyed by the URI's authority, the
/// endpoint; the client's host stays in the Host header.
fn http1<C>(
    client: &Client<C, Body>,
    scheme: Scheme,
    endpoint: &Endpoint,
    mut request: http::Request<Body>,
) -> Pin<Box<dyn Future<Output = Outcome> + Send>>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    match aim(&request, scheme, endpoint.authority.clone()) {
        Ok(uri) => *request.uri_mut() = uri,
        Err(failure) => return Box::pin(std::future::ready(Err(failure))),
    }
    *request.version_mut() = http::Version::HTTP_11;
    let future = client.request(request);
    Box::pin(async move {
        match future.await {
            Ok(response) => Ok(response.map(|b| b.map_err(Into::into).boxed())),
            Err(e) if e.is_connect() => Err(Failure::Connect(chain(&e))),
            Err(e) => Err(Failure::Reset(chain(&e))),
        }
    })
}
/// Sends over HTTP/2: the client's host becomes the `:authority`, and the
/// connection goes to the endpoint.
fn http2<C>(
    pool: Arc<H2Pool<C>>,
    scheme: Scheme,
    endpoint: &Endpoint,
    mut request: http::Request<Body>,
) -> Pin<Box<dyn Future<Output = Outcome> + Send>>
where
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<crate::call::BoxError>,
{
    let host = client_authority(&request).unwrap_or_else(|| endpoint.authority.clone());
    match aim(&request, scheme, host) {
        Ok(uri) => *request.uri_mut() = uri,
        Err(failure) => return Box::pin(std::future::ready(Err(failure))),
    }
    *request.version_mut() = http::Version::HTTP_2;
    request.headers_mut().remove(http::header::HOST);
    let addr = endpoint.addr;
    Box::pin(async move { pool.send(addr, request).await })
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
