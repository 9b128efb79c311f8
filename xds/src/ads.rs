//! The Aggregated Discovery Service: one gRPC server with both
//! `StreamAggregatedResources` (state of the world) and
//! `DeltaAggregatedResources`.
//!
//! Each stream runs one task that owns its [`Session`]: it reads requests,
//! watches the snapshot cache, and writes responses in push order. No
//! response is sent before the first snapshot exists, so a restarted
//! control plane never serves an empty or default config.

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

use crate::session::{Session, Variant};
use crate::snapshot::SnapshotCache;
use crate::status::ClientRegistry;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The ADS gRPC service.
#[derive(Debug, Clone)]
pub struct AdsServer {
    inner: Arc<Shared>,
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
        }
    }

    /// The tonic service to mount on a server.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024)
    }

    fn open<Req, Resp>(
        &self,
        request: Request<Streaming<Req>>,
        variant: Variant,
    ) -> ResponseStream<Resp>
    where
        Req: Wire<Resp> + Send + 'static,
        Resp: Send + 'static,
    {
        let peer = request.remote_addr().map(|a| a.to_string());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let shared = self.inner.clone();
        let id = shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let status = shared.clients.register(id, variant, peer.clone());
        let session = Session::new(id, variant, status);
        tokio::spawn(async move {
            let _guard = StreamGuard::new(&shared, id, variant);
            tracing::debug!(stream = id, peer = ?peer, variant = variant.as_str(), "xds stream opened");
            run_stream::<Req, Resp>(&shared, session, inbound, tx).await;
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// Ties a request type to its session handling and response type.
trait Wire<Resp>: prost::Message + Default {
    fn apply(&self, session: &mut Session);
    fn responses(session: &mut Session, snapshot: &Arc<crate::Snapshot>) -> Vec<Resp>;
}

impl Wire<DiscoveryResponse> for DiscoveryRequest {
    fn apply(&self, session: &mut Session) {
        session.on_sotw_request(self);
    }
    fn responses(session: &mut Session, snapshot: &Arc<crate::Snapshot>) -> Vec<DiscoveryResponse> {
        session.sotw_responses(snapshot)
    }
}

impl Wire<DeltaDiscoveryResponse> for DeltaDiscoveryRequest {
    fn apply(&self, session: &mut Session) {
        session.on_delta_request(self);
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
                Ok(Some(request)) => request.apply(&mut session),
                Ok(None) => return,
                Err(status) => {
                    tracing::debug!(stream_node = session.node_id(), error = %status, "xds stream ended");
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
        Ok(Response::new(self.open(request, Variant::Sotw)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.open(request, Variant::Delta)))
    }
}
