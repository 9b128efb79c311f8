//! A delta ADS client: what Ferry's proxy uses to take its config from a
//! control plane (Ferry's, or any that speaks delta xDS).
//!
//! It subscribes to every Cluster, ClusterLoadAssignment, Listener and
//! RouteConfiguration (wildcard), keeps the resources it holds, and hands
//! each update, applied to a copy, to a [`ConfigSink`]. The sink validates
//! the whole config and swaps it in; the client then ACKs. If the sink
//! refuses it, the client NACKs with the sink's reason and keeps what it
//! had. The stream is reopened with jittered backoff, announcing the
//! versions held (`initial_resource_versions`) so the server sends only
//! what changed; meanwhile the last good config keeps serving.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ferry_proto::Any;
use ferry_proto::envoy::config::core::v3::Node;
use ferry_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ferry_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ferry_proto::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::channel::{XdsSecurity, with_token};
use crate::resources::ResourceType;

/// Every resource the client holds: per type, name → (version, body).
pub type Resources = [BTreeMap<String, (String, Any)>; ResourceType::COUNT];

/// Takes validated config.
pub trait ConfigSink: Send + 'static {
    /// Validates `resources` as a whole and, when good, makes them the
    /// config in use. An error (naming the resource and field) is sent to
    /// the server as a NACK, and the previous config stays.
    fn apply(&mut self, resources: &Resources, changed: ResourceType) -> Result<(), String>;
    /// The stream to the control plane opened or closed.
    fn connected(&mut self, _up: bool) {}
}

/// Where the control plane is and who this client is.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`
    pub server: String,
    /// TLS and credentials for `server`.
    pub security: XdsSecurity,
    pub node_id: String,
    pub node_cluster: String,
}

/// Runs the client until `cancel`.
pub async fn run<S: ConfigSink>(config: ClientConfig, mut sink: S, cancel: CancellationToken) {
    let mut held: Resources = Default::default();
    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        let outcome = session(&config, &mut sink, &mut held, &cancel).await;
        sink.connected(false);
        if cancel.is_cancelled() {
            return;
        }
        match outcome {
            Ok(()) => {
                tracing::info!(server = %config.server, "xds stream closed by the server; reconnecting")
            }
            Err(e) => {
                tracing::warn!(server = %config.server, error = %e, "xds stream failed; keeping the last config and reconnecting")
            }
        }
        metrics::counter!("ferry_proxy_xds_reconnects_total").increment(1);
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 + 1));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff / 2 + jitter / 2) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session<S: ConfigSink>(
    config: &ClientConfig,
    sink: &mut S,
    held: &mut Resources,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let (channel, token) = config
        .security
        .connect(&config.server, Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(16);
    let node = Node {
        id: config.node_id.clone(),
        cluster: config.node_cluster.clone(),
        user_agent_name: "ferry-proxy".to_owned(),
        ..Default::default()
    };
    // Subscribe to everything, in make-before-break order.
    for (i, kind) in ResourceType::ALL.into_iter().enumerate() {
        let initial: HashMap<String, String> = held[kind.index()]
            .iter()
            .map(|(n, (v, _))| (n.clone(), v.clone()))
            .collect();
        let request = DeltaDiscoveryRequest {
            node: (i == 0).then(|| node.clone()),
            type_url: kind.type_url().to_owned(),
            initial_resource_versions: initial,
            ..Default::default()
        };
        tx.send(request).await.map_err(|e| e.to_string())?;
    }
    let mut inbound = client
        .delta_aggregated_resources(with_token(ReceiverStream::new(rx), &token))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    sink.connected(true);
    tracing::info!(server = %config.server, node = %config.node_id, "xds stream open");
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = inbound.message() => m.map_err(|e| e.to_string())?,
        };
        let Some(response) = message else {
            return Ok(());
        };
        let reply = handle(response, sink, held);
        tx.send(reply).await.map_err(|e| e.to_string())?;
    }
}

/// Applies one response to a copy of what is held; the ACK or NACK to send.
fn handle<S: ConfigSink>(
    response: DeltaDiscoveryResponse,
    sink: &mut S,
    held: &mut Resources,
) -> DeltaDiscoveryRequest {
    let mut reply = DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    };
    let Some(kind) = ResourceType::ALL
        .into_iter()
        .find(|k| k.type_url() == response.type_url)
    else {
        reply.error_detail = Some(RpcStatus {
            code: 3,
            message: format!("type {} is not one Ferry's proxy uses", response.type_url),
            ..Default::default()
        });
        return reply;
    };
    let mut staged = held.clone();
    let table = &mut staged[kind.index()];
    for name in &response.removed_resources {
        table.remove(name);
    }
    for r in response.resources {
        match r.resource {
            Some(body) => {
                table.insert(r.name, (r.version, body));
            }
            None => {
                table.remove(&r.name);
            }
        }
    }
    match sink.apply(&staged, kind) {
        Ok(()) => {
            *held = staged;
            metrics::counter!("ferry_proxy_xds_updates_total", "type" => kind.short(), "result" => "ack")
                .increment(1);
        }
        Err(message) => {
            tracing::warn!(r#type = kind.short(), %message, "config refused (NACK); keeping the last good config");
            metrics::counter!("ferry_proxy_xds_updates_total", "type" => kind.short(), "result" => "nack")
                .increment(1);
            reply.error_detail = Some(RpcStatus {
                code: 3,
                message,
                ..Default::default()
            });
        }
    }
    reply
}
