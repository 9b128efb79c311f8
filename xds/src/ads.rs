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

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ferry_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use ferry_discovery::untrusted::Escaped;

use crate::session::{Limits, Refusal, Session, Variant};
use crate::snapshot::SnapshotCache;
use crate::status::ClientRegistry;

/// What one xDS client may ask of the control plane.
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
fn refused(reason: &'static str, peer: Option<std::net::SocketAddr>, node: &str, status: &Status) {
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

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The ADS gRPC service.
#[derive(Debug, Clone)]
pub struct AdsServer {
    inner: Arc<Shared>,
    limits: XdsLimits,
}

#[derive(Debug)]
struct Shared {
    cache: Arc<SnapshotCache>,
    clients: Arc<ClientRegistry>,
    next_stream: AtomicU64,
    shutdown: CancellationToken,
}

impl AdsServer {
    /// `shutdown` ends every open stream, so a graceful server shutdown
    /// does not wait on long-lived ADS streams.
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
            limits: XdsLimits::default(),
        }
    }

    /// Bounds what each client may ask.
    pub fn with_limits(mut self, limits: XdsLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The tonic service to mount on a server.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        let max = self.limits.max_message_bytes;
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(256 * 1024 * 1024)
    }

    fn open<Req, Resp>(
        &self,
        request: Request<Streaming<Req>>,
        variant: Variant,
    ) -> Result<ResponseStream<Resp>, Status>
    where
        Req: Wire<Resp> + Send + 'static,
        Resp: Send + 'static,
    {
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let shared = self.inner.clone();
        let id = shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let limits = self.limits;
        let status = shared
            .clients
            .register(id, variant, peer, limits.max_streams_per_peer)
            .map_err(|e| {
                let status = Status::resource_exhausted(e.to_string());
                refused("too_many_streams_per_peer", peer, "", &status);
                status
            })?;
        let session = Session::new(id, variant, status).with_limits(Limits {
            max_names: limits.max_names,
        });
        tokio::spawn(async move {
            let _guard = StreamGuard::new(&shared, id, variant);
            tracing::debug!(stream = id, peer = ?peer, variant = variant.as_str(), "xds stream opened");
            run_stream::<Req, Resp>(&shared, session, inbound, tx, peer).await;
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// Ties a request type to its session handling and response type.
trait Wire<Resp>: prost::Message + Default {
    fn apply(&self, session: &mut Session) -> Result<(), Refusal>;
    fn responses(session: &mut Session, snapshot: &Arc<crate::Snapshot>) -> Vec<Resp>;
}

impl Wire<DiscoveryResponse> for DiscoveryRequest {
    fn apply(&self, session: &mut Session) -> Result<(), Refusal> {
        session.on_sotw_request(self)
    }
    fn responses(session: &mut Session, snapshot: &Arc<crate::Snapshot>) -> Vec<DiscoveryResponse> {
        session.sotw_responses(snapshot)
    }
}

impl Wire<DeltaDiscoveryResponse> for DeltaDiscoveryRequest {
    fn apply(&self, session: &mut Session) -> Result<(), Refusal> {
        session.on_delta_request(self)
    }
    fn responses(
        session: &mut Session,
        snapshot: &Arc<crate::Snapshot>,
    ) -> Vec<DeltaDiscoveryResponse> {
        session.delta_responses(snapshot)
    }
}

async fn run_stream<Req, Resp>(
    shared: &Shared,
    mut session: Session,
    mut inbound: Streaming<Req>,
    tx: mpsc::Sender<Result<Resp, Status>>,
    peer: Option<std::net::SocketAddr>,
) where
    Req: Wire<Resp> + Send + 'static,
    Resp: Send + 'static,
{
    let mut snapshots = shared.cache.subscribe();
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
        for response in Req::responses(&mut session, &snapshot) {
            if tx.send(Ok(response)).await.is_err() {
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

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.open(request, Variant::Sotw)?))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.open(request, Variant::Delta)?))
    }
}
