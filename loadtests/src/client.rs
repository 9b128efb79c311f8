//! One simulated delta-xDS client, as Ferry's own proxy behaves on ADS.
//!
//! It opens `DeltaAggregatedResources` on a shared HTTP/2 channel,
//! subscribes wildcard CDS then wildcard EDS (the first request of a type
//! with no names), and ACKs every response with its nonce. It reports to
//! the coordinator through [`Event`]s: when it holds its initial config
//! (a CDS and an EDS response), and each time an EDS response carries the
//! watched load assignment, with the health the flipped endpoint has there.
//! Nothing from the network is trusted: a malformed response is an error
//! event, never a panic.
//!
//! [`DeltaStream`] (open, subscribe wildcard, ACK each response) and the
//! load-assignment helpers are shared with the `kube_scale` test.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ferry_proto::envoy::config::core::v3::{HealthStatus, Node, address, socket_address};
use ferry_proto::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use ferry_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ferry_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use ferry_proto::type_url;
use prost::Message;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Largest response a client accepts; a full EDS state of 100,000
/// endpoints is about 4 MiB, tonic's default limit.
const MAX_RESPONSE_BYTES: usize = 512 * 1024 * 1024;

/// What a client tells the coordinator.
#[derive(Debug)]
pub enum Event {
    /// The client holds its initial config.
    Synced {
        client: usize,
        /// When its stream was opened.
        opened: Instant,
        at: Instant,
        clusters: usize,
        load_assignments: usize,
        /// Encoded size of the initial CDS and EDS responses.
        bytes: usize,
    },
    /// An EDS response carried the watched load assignment.
    Target {
        client: usize,
        /// The coordinator's round when it arrived (0: between rounds).
        round: u64,
        at: Instant,
        /// Whether the flipped endpoint is HEALTHY in it; `None` if the
        /// endpoint is missing or the resource does not decode.
        healthy: Option<bool>,
    },
    /// The client stopped: `error` is `None` when it was told to.
    Ended {
        client: usize,
        error: Option<String>,
    },
}

/// State every client shares with the coordinator.
#[derive(Debug)]
pub struct Shared {
    /// The current change round; 0 between rounds.
    pub round: AtomicU64,
    /// Name of the watched `ClusterLoadAssignment`.
    pub target: String,
    /// Address of the endpoint whose readiness flips.
    pub target_address: Ipv4Addr,
    pub events: mpsc::UnboundedSender<Event>,
    /// Bounds how many clients are fetching their initial config at once.
    pub sync_permits: Arc<Semaphore>,
    /// Clusters (and as many load assignments) a whole initial config has:
    /// the server may send it in several responses per type.
    pub expected_clusters: usize,
    pub cancel: CancellationToken,
}

fn request(type_url: &str, node: Option<Node>, nonce: String) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node,
        type_url: type_url.to_owned(),
        response_nonce: nonce,
        ..Default::default()
    }
}

/// Runs client `id` until cancelled or its stream fails; always sends one
/// [`Event::Ended`] last.
pub async fn run(id: usize, channel: Channel, shared: Arc<Shared>) {
    let error = tokio::select! {
        _ = shared.cancel.cancelled() => None,
        result = session(id, channel, &shared) => match result {
            Ok(()) => None,
            Err(e) => Some(format!("{e:#}")),
        },
    };
    let _ = shared.events.send(Event::Ended { client: id, error });
}

async fn session(id: usize, channel: Channel, shared: &Shared) -> anyhow::Result<()> {
    let permit = shared.sync_permits.clone().acquire_owned().await?;
    let mut permit = Some(permit);
    let opened = Instant::now();
    let mut stream = DeltaStream::open_wildcard(
        channel,
        format!("loadtest-{id}"),
        &[type_url::CLUSTER, type_url::ENDPOINT],
    )
    .await?;

    let (mut clusters, mut load_assignments) = (0, 0);
    let (mut synced, mut bytes) = (false, 0);
    while let Some((at, response)) = stream.next().await? {
        if !synced {
            bytes += response.encoded_len();
        }
        if response.type_url == type_url::CLUSTER {
            if !synced {
                clusters += response.resources.len();
            }
        } else if response.type_url == type_url::ENDPOINT {
            if synced {
                report_target(id, &response, at, shared);
            } else {
                load_assignments += response.resources.len();
            }
        }
        let whole = shared.expected_clusters;
        if !synced && clusters >= whole && load_assignments >= whole {
            synced = true;
            permit.take();
            let _ = shared.events.send(Event::Synced {
                client: id,
                opened,
                at,
                clusters,
                load_assignments,
                bytes,
            });
        }
    }
    anyhow::bail!("the server ended the stream")
}

/// One delta ADS stream that ACKs every response as it arrives, as Envoy
/// does when it accepts a config.
#[derive(Debug)]
pub struct DeltaStream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    inbound: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl DeltaStream {
    /// Opens `DeltaAggregatedResources` on `channel` as node `node_id` and
    /// subscribes wildcard to each of `type_urls`, in order (the first
    /// request of a type names nothing).
    pub async fn open_wildcard(
        channel: Channel,
        node_id: String,
        type_urls: &[&str],
    ) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(16);
        let mut node = Some(Node {
            id: node_id,
            cluster: "ferry-loadtests".to_owned(),
            ..Default::default()
        });
        for url in type_urls {
            tx.send(request(url, node.take(), String::new())).await?;
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let inbound = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { tx, inbound })
    }

    /// The next response with the time it arrived, ACKed before it is
    /// returned; `None` once the server ends the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<(Instant, DeltaDiscoveryResponse)>> {
        let Some((at, response)) = self.recv().await? else {
            return Ok(None);
        };
        self.ack(&response).await?;
        Ok(Some((at, response)))
    }

    /// The next response with the time it arrived, not yet ACKed (a client
    /// that applies a config before accepting it calls [`Self::ack`]
    /// after); `None` once the server ends the stream.
    pub async fn recv(&mut self) -> anyhow::Result<Option<(Instant, DeltaDiscoveryResponse)>> {
        let Some(response) = self.inbound.message().await? else {
            return Ok(None);
        };
        Ok(Some((Instant::now(), response)))
    }

    /// ACKs `response`.
    pub async fn ack(&self, response: &DeltaDiscoveryResponse) -> anyhow::Result<()> {
        self.tx
            .send(request(&response.type_url, None, response.nonce.clone()))
            .await?;
        Ok(())
    }
}

fn report_target(id: usize, response: &DeltaDiscoveryResponse, at: Instant, shared: &Shared) {
    let Some(resource) = response.resources.iter().find(|r| r.name == shared.target) else {
        return;
    };
    let _ = shared.events.send(Event::Target {
        client: id,
        round: shared.round.load(Ordering::SeqCst),
        at,
        healthy: target_health(resource, shared.target_address),
    });
}

/// Whether the endpoint at `address` is HEALTHY in a delta resource holding
/// a `ClusterLoadAssignment`.
fn target_health(resource: &Resource, address: Ipv4Addr) -> Option<bool> {
    let cla = decode_load_assignment(resource)?;
    endpoint_health(&cla, &address.to_string()).map(|h| h == HealthStatus::Healthy)
}

/// The `ClusterLoadAssignment` in a delta resource; `None` if it is missing
/// or does not decode.
pub fn decode_load_assignment(resource: &Resource) -> Option<ClusterLoadAssignment> {
    let body = resource.resource.as_ref()?;
    ClusterLoadAssignment::decode(body.value.as_slice()).ok()
}

/// Endpoints in a load assignment, over every locality.
pub fn endpoint_count(cla: &ClusterLoadAssignment) -> usize {
    cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum()
}

/// The health of the endpoint with IP `ip` (and a port) in a load
/// assignment; `None` if it is not there.
pub fn endpoint_health(cla: &ClusterLoadAssignment, ip: &str) -> Option<HealthStatus> {
    cla.endpoints
        .iter()
        .flat_map(|locality| &locality.lb_endpoints)
        .find(|lb| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &lb.host_identifier else {
                return false;
            };
            matches!(
                endpoint.address.as_ref().and_then(|a| a.address.as_ref()),
                Some(address::Address::SocketAddress(sa))
                    if sa.address == ip
                        && matches!(sa.port_specifier, Some(socket_address::PortSpecifier::PortValue(_)))
            )
        })
        .map(|lb| HealthStatus::try_from(lb.health_status).unwrap_or(HealthStatus::Unknown))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::envoy::config::core::v3::{Address, SocketAddress};
    use ferry_proto::envoy::config::endpoint::v3::{Endpoint, LbEndpoint, LocalityLbEndpoints};

    fn resource(health: HealthStatus) -> Resource {
        let lb = |ip: &str, health: HealthStatus| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: ip.to_owned(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            health_status: health as i32,
            ..Default::default()
        };
        let cla = ClusterLoadAssignment {
            cluster_name: "svc-00000.load:8080@old".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![
                    lb("127.0.0.2", HealthStatus::Healthy),
                    lb("127.0.0.1", health),
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        Resource {
            name: cla.cluster_name.clone(),
            resource: Some(ferry_proto::pack(&cla)),
            ..Default::default()
        }
    }

    #[test]
    fn finds_the_flipped_endpoints_health() {
        let target = Ipv4Addr::new(127, 0, 0, 1);
        assert_eq!(
            target_health(&resource(HealthStatus::Healthy), target),
            Some(true)
        );
        assert_eq!(
            target_health(&resource(HealthStatus::Unhealthy), target),
            Some(false)
        );
        assert_eq!(
            target_health(
                &resource(HealthStatus::Healthy),
                Ipv4Addr::new(127, 0, 0, 9)
            ),
            None
        );
        let mut broken = resource(HealthStatus::Healthy);
        if let Some(any) = broken.resource.as_mut() {
            any.value = vec![0xff, 0xff, 0xff];
        }
        assert_eq!(target_health(&broken, target), None);
    }
}
