//! The Aggregated Discovery Service: one gRPC server with both
//! `StreamAggregatedResources` (state of the world) and
//! `DeltaAggregatedResources`.
//!
//! Each stream runs one task that owns its [`Session`]: it reads requests,
//! watches the snapshot cache, and writes responses in push order. No
//! response is sent before the first snapshot exists, so a restarted
//! control plane never serves an empty or default config.
//!
//! Every client is bounded ([`XdsLimits`]): request size, resource names
//! per stream, streams per peer address (and, on the server, streams per
//! connection). A request past a limit, or one that does not decode, ends
//! its stream with `RESOURCE_EXHAUSTED` or `INVALID_ARGUMENT`, a warning
//! and `ferry_xds_refused_total{reason}`.

use std::convert::Infallible;
use std::future::Ready;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use ferry_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::server::NamedService;

use ferry_discovery::untrusted::Escaped;

use crate::auth::{AuthSource, Caller};
use crate::session::{Limits, Refusal, Session, Variant};
use crate::snapshot::SnapshotCache;
use crate::status::ClientRegistry;
use crate::transport::PeerInfo;
use crate::wire::{DeltaReply, Outgoing, Reply, ReplyBody, SotwReply};

#[derive(Debug, Clone, Copy)]
pub struct XdsLimits {
    /// The largest request message decoded.
    pub max_message_bytes: usize,
    /// Resource names one stream may hold over all types.
    pub max_names: usize,
    /// ADS streams open at once from one peer IP address.
    pub max_streams_per_peer: usize,
}

impl Default for XdsLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_names: Limits::default().max_names,
            max_streams_per_peer: 1024,
        }
    }
}

/// Counts and logs a refused client.
fn refused(reason: &'static str, peer: Option<SocketAddr>, node: &str, status: &Status) {
    metrics::counter!("ferry_xds_refused_total", "reason" => reason).increment(1);
    tracing::warn!(
        peer = ?peer, node = %Escaped(node), reason, code = ?status.code(),
        message = %Escaped(status.message()), "xds client refused"
    );
}

/// The status that ends a stream whose request could not be read, and
/// its metric label; `None` when the client went away.
fn unreadable(status: &Status) -> Option<(&'static str, Status)> {
    match status.code() {
        // tonic's answer to a message over the size limit.
        tonic::Code::OutOfRange => Some((
            "message_too_large",
            Status::resource_exhausted(status.message().to_owned()),
        )),
        // A body that is not the request message.
        tonic::Code::Internal => Some((
            "malformed",
            Status::invalid_argument(format!(
                "the request could not be decoded: {}",
                status.message()
            )),
        )),
        _ => None,
    }
}

#[derive(Debug, Clone)]
pub struct AdsServer {
    inner: Arc<Shared>,
    limits: XdsLimits,
    /// With `--xds-auth`: who may connect, as which nodes.
    auth: Option<Arc<AuthSource>>,
}

#[derive(Debug)]
struct Shared {
    cache: Arc<SnapshotCache>,
    clients: Arc<ClientRegistry>,
    next_stream: AtomicU64,
    shutdown: CancellationToken,
}

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

impl AdsServer {
    pub fn new(
        cache: Arc<SnapshotCache>,
        clients: Arc<ClientRegistry>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Shared {
                cache,
                clients,
                next_stream: AtomicU64::new(1),
                shutdown,
            }),
            auth: None,
            limits: XdsLimits::default(),
        }
    }

    /// Requires every stream to authenticate, and to claim only the nodes
    /// its identity may.
    pub fn with_auth(mut self, auth: Option<Arc<AuthSource>>) -> Self {
        self.auth = auth;
        self
    }

    pub fn with_limits(mut self, limits: XdsLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The gRPC service, for a tonic server's `add_service`. Requests are
    /// decoded by tonic; responses are written by [`crate::wire`], from
    /// resources encoded once for all streams.
    pub fn into_service(self) -> Self {
        self
    }

    fn open<Req, R>(&self, request: http::Request<Body>, variant: Variant) -> http::Response<Body>
    where
        Req: Wire<R> + Send + 'static,
        R: Reply + Unpin,
    {
        let info = PeerInfo::of(&request);
        let peer = info.remote;
        let caller = match caller(self.auth.as_deref(), &info, &request) {
            Ok(caller) => caller,
            Err(status) => return status.into_http(),
        };
        let shared = self.inner.clone();
        let id = shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let limits = self.limits;
        let status = match shared
            .clients
            .register(id, variant, peer, limits.max_streams_per_peer)
        {
            Ok(status) => status,
            Err(e) => {
                let status = Status::resource_exhausted(e.to_string());
                refused("too_many_streams_per_peer", peer, "", &status);
                // Trailers-only: the call fails as it opens.
                return status.into_http();
            }
        };
        if let Some(caller) = &caller {
            status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .identity = Some(caller.identity.clone());
        }
        let (tx, rx) = mpsc::channel(16);
        let inbound = Streaming::<Req>::new_request(
            tonic_prost::ProstDecoder::<Req>::default(),
            request.into_body(),
            None,
            Some(limits.max_message_bytes),
        );
        let session = Session::new(id, variant, status).with_limits(Limits {
            max_names: limits.max_names,
            ..Limits::default()
        });
        tokio::spawn(async move {
            let _guard = StreamGuard::new(&shared, id, variant);
            tracing::debug!(stream = id, peer = ?peer, variant = variant.as_str(), "xds stream opened");
            run_stream::<Req, R>(&shared, session, inbound, tx, peer, caller).await;
        });
        grpc_response(ReplyBody::new(rx))
    }
}

/// Who a stream's caller is: with an auth file, its token's or client
/// certificate's identity, or the refusal (counted and logged) that ends
/// the call as it opens; without one, the verified certificate's names.
fn caller(
    auth: Option<&AuthSource>,
    info: &PeerInfo,
    request: &http::Request<Body>,
) -> Result<Option<Caller>, Status> {
    let Some(auth) = auth else {
        return Ok(info.certificate.as_deref().map(Caller::unrestricted));
    };
    let authorization = request.headers().get(http::header::AUTHORIZATION);
    auth.current()
        .authenticate(info.certificate.as_deref(), authorization)
        .map(Some)
        .map_err(|denied| {
            denied.count();
            let status = denied.status();
            refused(denied.reason(), info.remote, "", &status);
            status
        })
}

/// A gRPC response whose messages and status come from `body`.
fn grpc_response<R: Reply + Unpin>(body: ReplyBody<R>) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

impl NamedService for AdsServer {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl tonic::codegen::Service<http::Request<Body>> for AdsServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let response = match request.uri().path() {
            SOTW_PATH => self.open::<DiscoveryRequest, SotwReply>(request, Variant::Sotw),
            DELTA_PATH => self.open::<DeltaDiscoveryRequest, DeltaReply>(request, Variant::Delta),
            path => {
                // Trailers-only: the call fails as it opens.
                Status::unimplemented(format!("{} has no method {path}", Self::NAME)).into_http()
            }
        };
        std::future::ready(Ok(response))
    }
}

trait Wire<R>: prost::Message + Default {
    fn apply(&self, session: &mut Session) -> Result<(), Refusal>;
    fn replies(session: &mut Session, snapshot: &Arc<crate::Snapshot>) -> Vec<R>;
}

impl Wire<SotwReply> for DiscoveryRequest {
    fn apply(&self, session: &mut Session) -> Result<(), Refusal> {
        session.on_sotw_request(self)
    }
    fn replies(session: &mut Session, snapshot: &Arc<crate::Snapshot>) -> Vec<SotwReply> {
        session.sotw_replies(snapshot)
    }
}

impl Wire<DeltaReply> for DeltaDiscoveryRequest {
    fn apply(&self, session: &mut Session) -> Result<(), Refusal> {
        session.on_delta_request(self)
    }
    fn replies(session: &mut Session, snapshot: &Arc<crate::Snapshot>) -> Vec<DeltaReply> {
        session.delta_replies(snapshot)
    }
}

async fn run_stream<Req, R>(
    shared: &Shared,
    mut session: Session,
    mut inbound: Streaming<Req>,
    tx: mpsc::Sender<Outgoing<R>>,
    peer: Option<SocketAddr>,
    caller: Option<Caller>,
) where
    Req: Wire<R> + Send + 'static,
    R: Reply,
{
    let mut snapshots = shared.cache.subscribe();
    // The node the first request claims is checked before anything is
    // sent (a caller without an auth file's grant may claim any).
    let mut unchecked = caller.is_some();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("control plane shutting down"))).await;
                return;
            }
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    if let Err(refusal) = request.apply(&mut session) {
                        let status = refusal.status();
                        refused(refusal.reason(), peer, session.node_id(), &status);
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    if std::mem::take(&mut unchecked)
                        && let Some(caller) = &caller
                        && let Err(denied) = caller.authorize(session.node_id(), session.node_cluster())
                    {
                        denied.count();
                        let status = denied.status();
                        refused(denied.reason(), peer, session.node_id(), &status);
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    if let Some((reason, answer)) = unreadable(&status) {
                        refused(reason, peer, session.node_id(), &answer);
                        let _ = tx.send(Err(answer)).await;
                    } else {
                        tracing::debug!(stream_node = %Escaped(session.node_id()), error = %status, "xds stream ended");
                    }
                    return;
                }
            },
            changed = snapshots.changed() => if changed.is_err() { return },
        }
        let snapshot = snapshots.borrow_and_update().clone();
        for reply in Req::replies(&mut session, &snapshot) {
            if tx.send(Ok(reply)).await.is_err() {
                return;
            }
        }
    }
}

/// Keeps the connected-clients gauge and registry right however a stream ends.
struct StreamGuard<'a> {
    shared: &'a Shared,
    id: u64,
    variant: Variant,
}

impl<'a> StreamGuard<'a> {
    fn new(shared: &'a Shared, id: u64, variant: Variant) -> Self {
        metrics::gauge!("ferry_xds_connected_clients", "variant" => variant.as_str())
            .increment(1.0);
        metrics::counter!("ferry_xds_streams_total", "variant" => variant.as_str()).increment(1);
        Self {
            shared,
            id,
            variant,
        }
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        metrics::gauge!("ferry_xds_connected_clients", "variant" => self.variant.as_str())
            .decrement(1.0);
        self.shared.clients.unregister(self.id);
        tracing::debug!(stream = self.id, "xds stream closed");
    }
}
