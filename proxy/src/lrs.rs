//! Load reports (LRS) to the control plane: per cluster, the requests
//! completed and failed since the last report, at the interval the
//! control plane asks for. Ferry's migration gates compare these between a
//! service's source and target clusters.
//!
//! Each cluster's report also carries its latency histogram as named
//! metrics, one `load_metric_stats` entry per non-empty bucket (the
//! encoding is described in [`ferry_xds_core::latency`]); the control plane's
//! console draws p50 and p99 from them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_proto::envoy::config::core::v3::Node;
use ferry_proto::envoy::config::endpoint::v3::{
    ClusterStats, EndpointLoadMetricStats, UpstreamLocalityStats,
};
use ferry_proto::envoy::service::load_stats::v3::LoadStatsRequest;
use ferry_proto::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
use ferry_xds_core::channel::{XdsSecurity, with_token};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::LoadCounters;
use crate::server::Proxy;

/// Reports load until `cancel`, reconnecting with backoff; a control
/// plane without LRS just gets no reports.
pub async fn run(
    server: String,
    security: XdsSecurity,
    node: Node,
    proxy: Arc<Proxy>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(500);
    while !cancel.is_cancelled() {
        match report(&server, &security, &node, &proxy, &cancel).await {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) => tracing::debug!(error = %e, "load reporting stream ended"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn report(
    server: &str,
    security: &XdsSecurity,
    node: &Node,
    proxy: &Proxy,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let (channel, token) = security
        .connect(server, Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    let mut client = LoadReportingServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(LoadStatsRequest {
        node: Some(node.clone()),
        cluster_stats: Vec::new(),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut inbound = client
        .stream_load_stats(with_token(ReceiverStream::new(rx), &token))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let first = inbound
        .message()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the control plane closed the load reporting stream")?;
    let mut interval = first
        .load_reporting_interval
        .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(10));
    tracing::info!(?interval, "reporting load to the control plane");
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
            message = inbound.message() => {
                match message.map_err(|e| e.to_string())? {
                    Some(update) => {
                        if let Some(d) = update.load_reporting_interval {
                            let d = Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32);
                            if !d.is_zero() {
                                interval = d;
                            }
                        }
                        continue;
                    }
                    None => return Ok(()),
                }
            }
        }
        let elapsed = last.elapsed();
        last = tokio::time::Instant::now();
        let routing = proxy.routing.load_full();
        let cluster_stats: Vec<ClusterStats> = routing
            .upstreams
            .values()
            .filter_map(|u| {
                let ok = u.load.successful.swap(0, Ordering::Relaxed);
                let errors = u.load.errors.swap(0, Ordering::Relaxed);
                (ok + errors > 0).then(|| ClusterStats {
                    cluster_name: u.name.clone(),
                    upstream_locality_stats: vec![UpstreamLocalityStats {
                        total_successful_requests: ok,
                        total_error_requests: errors,
                        total_issued_requests: ok + errors,
                        load_metric_stats: latency_stats(&u.load),
                        ..Default::default()
                    }],
                    load_report_interval: Some(ferry_proto::google::protobuf::Duration {
                        seconds: elapsed.as_secs() as i64,
                        nanos: elapsed.subsec_nanos() as i32,
                    }),
                    ..Default::default()
                })
            })
            .collect();
        metrics::counter!("ferry_proxy_load_reports_total").increment(1);
        tx.send(LoadStatsRequest {
            node: None,
            cluster_stats,
        })
        .await
        .map_err(|e| e.to_string())?;
    }
}

/// The latency buckets filled since the last report, as named metrics;
/// resets them.
fn latency_stats(load: &LoadCounters) -> Vec<EndpointLoadMetricStats> {
    load.latency
        .iter()
        .enumerate()
        .filter_map(|(slot, bucket)| {
            let n = bucket.swap(0, Ordering::Relaxed);
            (n > 0).then(|| EndpointLoadMetricStats {
                metric_name: ferry_xds_core::latency::latency_metric_name(slot),
                num_requests_finished_with_metric: n,
                total_metric_value: n as f64,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_become_named_metrics_and_reset() {
        let load = LoadCounters::default();
        load.latency[0].store(3, Ordering::Relaxed);
        load.latency[ferry_xds_core::latency::LATENCY_SLOTS - 1].store(1, Ordering::Relaxed);
        let stats = latency_stats(&load);
        let named: Vec<(&str, u64)> = stats
            .iter()
            .map(|s| (s.metric_name.as_str(), s.num_requests_finished_with_metric))
            .collect();
        assert_eq!(
            named,
            [("ferry.latency_ms.le_1", 3), ("ferry.latency_ms.le_inf", 1)]
        );
        assert!(latency_stats(&load).is_empty());
    }
}
