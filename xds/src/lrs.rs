//! The Load Reporting Service (LRS): proxies (Envoy, Ferry's own) stream
//! per-cluster request and error counts to the control plane, which keeps
//! them as a short time series per service and Kubernetes cluster for the
//! migration gates.
//!
//! Ferry asks every client for all of its clusters (`send_all_clusters`) at
//! a fixed interval. Each report carries the counts since the client's
//! previous report; they are stored at the time they arrive, so a window
//! query sums the reports received inside it.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_proto::envoy::config::endpoint::v3::ClusterStats;
use ferry_proto::envoy::service::load_stats::v3::load_reporting_service_server::{
    LoadReportingService, LoadReportingServiceServer,
};
use ferry_proto::envoy::service::load_stats::v3::{LoadStatsRequest, LoadStatsResponse};
use ferry_proto::google::protobuf::Duration as PbDuration;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Request counts over some span of time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Completed requests (successful plus errors).
    pub requests: u64,
    /// 5xx responses and failed upstream requests.
    pub errors: u64,
}

impl Load {
    /// Errors per request, when there were requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: i64,
    load: Load,
}

/// Reported load per (service, Kubernetes cluster), kept for `retention`.
#[derive(Debug)]
pub struct LoadReports {
    series: Mutex<BTreeMap<(String, String), VecDeque<Sample>>>,
    /// Everything this control plane's own clients reported since it
    /// started, per (service, cluster): what it shares with its peers.
    totals: Mutex<BTreeMap<(String, String), Load>>,
    retention: Duration,
}

impl Default for LoadReports {
    fn default() -> Self {
        Self::new(Duration::from_secs(3600))
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Splits an xDS cluster name `name.namespace:port@cluster` into the
/// service (`name.namespace`) and the Kubernetes cluster.
pub fn split_cluster_name(name: &str) -> Option<(&str, &str)> {
    let (service_port, cluster) = name.rsplit_once('@')?;
    let (service, _port) = service_port.rsplit_once(':')?;
    (!service.is_empty() && !cluster.is_empty()).then_some((service, cluster))
}

impl LoadReports {
    pub fn new(retention: Duration) -> Self {
        Self {
            series: Mutex::new(BTreeMap::new()),
            totals: Mutex::new(BTreeMap::new()),
            retention,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), VecDeque<Sample>>> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one report's counts for one xDS cluster, at `at_ms`.
    pub fn record_at(&self, cluster_name: &str, load: Load, at_ms: i64) {
        let Some((service, cluster)) = split_cluster_name(cluster_name) else {
            return;
        };
        if load == Load::default() {
            return;
        }
        metrics::counter!("ferry_lrs_requests_total", "outcome" => "total")
            .increment(load.requests);
        metrics::counter!("ferry_lrs_requests_total", "outcome" => "error").increment(load.errors);
        {
            let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
            let total = totals
                .entry((service.to_owned(), cluster.to_owned()))
                .or_default();
            total.requests += load.requests;
            total.errors += load.errors;
        }
        self.record_remote(service, cluster, load, at_ms);
    }

    /// Everything this control plane's own clients reported since it
    /// started, per (service, cluster).
    pub fn totals(&self) -> BTreeMap<(String, String), Load> {
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records load another control plane's clients reported (shared
    /// through the HA store), at `at_ms`.
    pub fn record_remote(&self, service: &str, cluster: &str, load: Load, at_ms: i64) {
        if load == Load::default() {
            return;
        }
        let mut series = self.lock();
        let entry = series
            .entry((service.to_owned(), cluster.to_owned()))
            .or_default();
        entry.push_back(Sample { at_ms, load });
        let horizon = at_ms - self.retention.as_millis() as i64;
        while entry.front().is_some_and(|s| s.at_ms < horizon) {
            entry.pop_front();
        }
    }

    /// The load `service` received in `cluster` from reports that arrived
    /// at or after `since_ms`.
    pub fn since(&self, service: &str, cluster: &str, since_ms: i64) -> Load {
        let series = self.lock();
        let mut total = Load::default();
        if let Some(samples) = series.get(&(service.to_owned(), cluster.to_owned())) {
            for s in samples.iter().rev().take_while(|s| s.at_ms >= since_ms) {
                total.requests += s.load.requests;
                total.errors += s.load.errors;
            }
        }
        total
    }

    fn record_stats(&self, stats: &[ClusterStats]) {
        let at = now_ms();
        for cluster in stats {
            let mut load = Load::default();
            for locality in &cluster.upstream_locality_stats {
                load.requests += locality.total_successful_requests + locality.total_error_requests;
                load.errors += locality.total_error_requests;
            }
            self.record_at(&cluster.cluster_name, load, at);
        }
    }
}

/// The LRS gRPC service.
#[derive(Debug, Clone)]
pub struct LrsServer {
    reports: Arc<LoadReports>,
    interval: Duration,
    shutdown: CancellationToken,
}

impl LrsServer {
    /// Clients report every `interval`.
    pub fn new(reports: Arc<LoadReports>, interval: Duration, shutdown: CancellationToken) -> Self {
        Self {
            reports,
            interval,
            shutdown,
        }
    }

    pub fn into_service(self) -> LoadReportingServiceServer<Self> {
        LoadReportingServiceServer::new(self)
    }

    fn response(&self) -> LoadStatsResponse {
        LoadStatsResponse {
            send_all_clusters: true,
            load_reporting_interval: Some(PbDuration {
                seconds: self.interval.as_secs() as i64,
                nanos: self.interval.subsec_nanos() as i32,
            }),
            ..Default::default()
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<LoadStatsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LoadReportingService for LrsServer {
    type StreamLoadStatsStream = ResponseStream;

    async fn stream_load_stats(
        &self,
        request: Request<Streaming<LoadStatsRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut node = String::new();
            let mut answered = false;
            metrics::gauge!("ferry_lrs_connected_clients").increment(1.0);
            loop {
                let message = tokio::select! {
                    _ = this.shutdown.cancelled() => break,
                    m = inbound.message() => m,
                };
                match message {
                    Ok(Some(req)) => {
                        if let Some(n) = &req.node
                            && node.is_empty()
                        {
                            node.clone_from(&n.id);
                            tracing::debug!(node = %node, "load reporting stream opened");
                        }
                        this.reports.record_stats(&req.cluster_stats);
                        metrics::counter!("ferry_lrs_reports_total").increment(1);
                        // One response starts reporting; Envoy keeps the
                        // interval until told otherwise.
                        if !answered {
                            answered = true;
                            if tx.send(Ok(this.response())).await.is_err() {
                                break;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node = %node, error = %status, "load reporting stream ended");
                        break;
                    }
                }
            }
            metrics::gauge!("ferry_lrs_connected_clients").decrement(1.0);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_split_into_service_and_cluster() {
        assert_eq!(
            split_cluster_name("web.shop:80@old"),
            Some(("web.shop", "old"))
        );
        assert_eq!(split_cluster_name("xds"), None);
        assert_eq!(split_cluster_name("web.shop@old"), None);
    }

    #[test]
    fn windows_sum_the_reports_inside_them() {
        let reports = LoadReports::new(Duration::from_secs(10));
        let load = |requests, errors| Load { requests, errors };
        reports.record_at("web.shop:80@old", load(10, 1), 1_000);
        reports.record_at("web.shop:8080@old", load(5, 0), 2_000);
        reports.record_at("web.shop:80@new", load(7, 7), 2_000);
        reports.record_at("web.shop:80@old", load(3, 3), 3_000);
        assert_eq!(reports.since("web.shop", "old", 0), load(18, 4));
        assert_eq!(reports.since("web.shop", "old", 2_000), load(8, 3));
        assert_eq!(reports.since("web.shop", "new", 0), load(7, 7));
        assert_eq!(reports.since("web.shop", "gone", 0), Load::default());
        // Past the retention, old reports are dropped.
        reports.record_at("web.shop:80@old", load(1, 0), 20_000);
        assert_eq!(reports.since("web.shop", "old", 0), load(1, 0));
    }
}
