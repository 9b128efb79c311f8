//! The Load Reporting Service (LRS): proxies (Envoy, Ferry's own) stream
//! per-cluster request and error counts to the control plane, which keeps
//! them as a short time series per service and Kubernetes cluster for the
//! migration gates.
//!
//! Ferry asks every client for all of its clusters (`send_all_clusters`) at
//! a fixed interval. Each report carries the counts since the client's
//! previous report; they are stored at the time they arrive, so a window
//! query sums the reports received inside it.
//!
//! Reports are untrusted input, so:
//! - counts add with saturating arithmetic, and a report claiming more
//!   than [`MAX_REQUESTS_PER_REPORT`] requests for one cluster is refused
//!   (a proxy reporting every second would need a billion requests per
//!   second; even at a 60 s interval it is 16 million per second);
//! - only clusters in the served snapshot count, so made-up names cannot
//!   grow the tables, and totals not reported for the retention period
//!   are dropped;
//! - with `--xds-auth`, a stream must authenticate (client certificate or
//!   bearer token) and its node must be one its identity may claim, or the
//!   stream ends (UNAUTHENTICATED, PERMISSION_DENIED) and none of its
//!   reports count;
//! - reports count only from a node id that holds a live ADS stream from
//!   the same peer IP address (unless the server is told to accept any
//!   node).
//!
//! Each refusal is counted in `ferry_lrs_refused_total{reason}`.
//!
//! Every recorded report also feeds the console's 15-minute [`History`],
//! with the latency histogram Ferry's proxy adds to its reports.

use ferry_xds_core::BackendKey;
use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_discovery::untrusted::Escaped;

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

use crate::auth::{AuthSource, Caller};
use crate::history::{History, LATENCY_SLOTS, LatencyCounts, latency_slot};
use crate::resources::ResourceType;
use crate::session::MAX_NODE_ID_BYTES;
use crate::snapshot::SnapshotCache;
use crate::status::ClientRegistry;
use crate::transport::PeerInfo;

/// The most requests one report may claim for one cluster.
pub const MAX_REQUESTS_PER_REPORT: u64 = 1_000_000_000;

/// The largest load report message decoded.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

fn refused(reason: &'static str, n: u64) {
    metrics::counter!("ferry_lrs_refused_total", "reason" => reason).increment(n);
}

/// Request counts over some span of time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Completed requests (successful plus errors).
    pub requests: u64,
    /// 5xx responses and failed upstream requests.
    pub errors: u64,
}

impl Load {
    /// `self + other`, saturating.
    pub fn plus(self, other: Load) -> Load {
        Load {
            requests: self.requests.saturating_add(other.requests),
            errors: self.errors.saturating_add(other.errors),
        }
    }

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
    /// started, per (service, cluster), with when it last grew: what it
    /// shares with its peers.
    totals: Mutex<BTreeMap<(String, String), (Load, i64)>>,
    retention: Duration,
    /// When the tables were last swept of expired entries.
    swept_ms: AtomicI64,
    history: History,
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

impl LoadReports {
    pub fn new(retention: Duration) -> Self {
        Self {
            series: Mutex::new(BTreeMap::new()),
            totals: Mutex::new(BTreeMap::new()),
            retention,
            swept_ms: AtomicI64::new(0),
            history: History::default(),
        }
    }

    /// Drops totals not reported within the retention, and series with
    /// no sample left; at most once a minute.
    fn sweep(&self, now_ms: i64) {
        let last = self.swept_ms.load(Ordering::Relaxed);
        if now_ms - last < 60_000
            || self
                .swept_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let horizon = now_ms - self.retention.as_millis() as i64;
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, at)| *at >= horizon);
        self.lock().retain(|_, samples| {
            while samples.front().is_some_and(|s| s.at_ms < horizon) {
                samples.pop_front();
            }
            !samples.is_empty()
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), VecDeque<Sample>>> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last 15 minutes of reports, for the console.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Records one report's counts for one xDS cluster, at `at_ms`.
    pub fn record_at(&self, cluster_name: &str, load: Load, at_ms: i64) {
        self.record_report(cluster_name, load, None, at_ms);
    }

    /// Records one report's counts, and latency histogram when it carried
    /// one, for one xDS cluster, at `at_ms`.
    fn record_report(
        &self,
        cluster_name: &str,
        load: Load,
        latency: Option<&LatencyCounts>,
        at_ms: i64,
    ) {
        let Some(BackendKey {
            service, cluster, ..
        }) = BackendKey::parse(cluster_name)
        else {
            return;
        };
        if load == Load::default() {
            return;
        }
        self.history.record(service, cluster, at_ms, load, latency);
        metrics::counter!("ferry_lrs_requests_total", "outcome" => "total")
            .increment(load.requests);
        metrics::counter!("ferry_lrs_requests_total", "outcome" => "error").increment(load.errors);
        {
            let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
            let total = totals
                .entry((service.to_owned(), cluster.to_owned()))
                .or_default();
            *total = (total.0.plus(load), at_ms);
        }
        self.append(service, cluster, load, at_ms);
        self.sweep(at_ms);
    }

    /// Everything this control plane's own clients reported since it
    /// started, per (service, cluster).
    pub fn totals(&self) -> BTreeMap<(String, String), Load> {
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, (load, _))| (k.clone(), *load))
            .collect()
    }

    /// How many (service, cluster) totals are kept.
    pub fn tracked(&self) -> usize {
        self.totals.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Records load another control plane's clients reported (shared
    /// through the HA store), at `at_ms`.
    /// Peers share counts only, so their clients add no latency.
    pub fn record_remote(&self, service: &str, cluster: &str, load: Load, at_ms: i64) {
        if load == Load::default() {
            return;
        }
        self.history.record(service, cluster, at_ms, load, None);
        self.append(service, cluster, load, at_ms);
    }

    /// Appends one sample to the gates' series.
    fn append(&self, service: &str, cluster: &str, load: Load, at_ms: i64) {
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
                total = total.plus(s.load);
            }
        }
        total
    }

    /// Records one report's clusters that `known` accepts; returns how
    /// many were refused.
    fn record_stats(&self, stats: &[ClusterStats], known: impl Fn(&str) -> bool) -> usize {
        let at = now_ms();
        let mut refusals = 0;
        for cluster in stats {
            if !known(&cluster.cluster_name) {
                refused("unknown_cluster", 1);
                refusals += 1;
                continue;
            }
            let Some(load) = cluster_load(cluster) else {
                refused("absurd_count", 1);
                refusals += 1;
                continue;
            };
            let latency = cluster_latency(cluster);
            self.record_report(&cluster.cluster_name, load, latency.as_ref(), at);
        }
        refusals
    }
}

/// One cluster's counts in a report; `None` when they exceed what a
/// report can hold ([`MAX_REQUESTS_PER_REPORT`]).
fn cluster_load(cluster: &ClusterStats) -> Option<Load> {
    let mut load = Load::default();
    for locality in &cluster.upstream_locality_stats {
        let requests = locality
            .total_successful_requests
            .checked_add(locality.total_error_requests)?;
        load = load.plus(Load {
            requests,
            errors: locality.total_error_requests,
        });
    }
    (load.requests <= MAX_REQUESTS_PER_REPORT).then_some(load)
}

/// One cluster's latency histogram in a report (see [`crate::history`]):
/// `None` when it carries none, as Envoy's reports do. Counts past what a
/// report can hold are left out.
fn cluster_latency(cluster: &ClusterStats) -> Option<LatencyCounts> {
    let mut counts = [0u64; LATENCY_SLOTS];
    let mut any = false;
    for locality in &cluster.upstream_locality_stats {
        for metric in &locality.load_metric_stats {
            let Some(slot) = latency_slot(&metric.metric_name) else {
                continue;
            };
            let n = metric.num_requests_finished_with_metric;
            if n > MAX_REQUESTS_PER_REPORT {
                refused("absurd_count", 1);
                continue;
            }
            counts[slot] = counts[slot].saturating_add(n);
            any = true;
        }
    }
    any.then_some(counts)
}

/// The LRS gRPC service.
#[derive(Debug, Clone)]
pub struct LrsServer {
    reports: Arc<LoadReports>,
    cache: Arc<SnapshotCache>,
    clients: Arc<ClientRegistry>,
    any_node: bool,
    interval: Duration,
    shutdown: CancellationToken,
    auth: Option<Arc<AuthSource>>,
}

impl LrsServer {
    /// Clients report every `interval`; reports count for the clusters
    /// `cache` serves, from nodes `clients` holds an ADS stream of.
    pub fn new(
        reports: Arc<LoadReports>,
        cache: Arc<SnapshotCache>,
        clients: Arc<ClientRegistry>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            reports,
            cache,
            clients,
            any_node: false,
            interval,
            shutdown,
            auth: None,
        }
    }

    /// Counts reports from any node, with or without an ADS stream here
    /// (proxies whose ADS and LRS streams reach different instances).
    pub fn accept_any_node(mut self, any: bool) -> Self {
        self.any_node = any;
        self
    }

    /// Requires every stream to authenticate and to report only as a node
    /// its identity may claim (see [`crate::auth`]).
    pub fn with_auth(mut self, auth: Option<Arc<AuthSource>>) -> Self {
        self.auth = auth;
        self
    }

    /// The caller of a stream, or the refusal that ends it as it opens.
    fn caller(
        &self,
        info: &PeerInfo,
        authorization: Option<&http::HeaderValue>,
    ) -> Result<Option<Caller>, Status> {
        let Some(auth) = &self.auth else {
            return Ok(info.certificate.as_deref().map(Caller::unrestricted));
        };
        auth.current()
            .authenticate(info.certificate.as_deref(), authorization)
            .map(Some)
            .map_err(|denied| {
                denied.count();
                refused(denied.reason(), 1);
                tracing::warn!(peer = ?info.remote, reason = denied.reason(), "load reporting stream refused");
                denied.status()
            })
    }

    pub fn into_service(self) -> LoadReportingServiceServer<Self> {
        LoadReportingServiceServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Records one request's reports if its node may report; returns
    /// whether it may.
    fn record(&self, node: &str, ip: Option<IpAddr>, stats: &[ClusterStats]) -> bool {
        let allowed = self.any_node || ip.is_some_and(|ip| self.clients.has_stream(node, ip));
        if !allowed {
            refused("no_ads_stream", 1);
            return false;
        }
        let snapshot = self.cache.current();
        let clusters = snapshot.of(ResourceType::Cluster);
        self.reports
            .record_stats(stats, |name| clusters.contains_key(name));
        true
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
        let info = match request.extensions().get::<PeerInfo>() {
            Some(info) => info.clone(),
            None => PeerInfo {
                remote: request.remote_addr(),
                certificate: None,
            },
        };
        let ip = info.remote.map(|a| a.ip());
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| http::HeaderValue::from_bytes(v.as_bytes()).ok());
        let caller = self.caller(&info, authorization.as_ref())?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut node = String::new();
            // The node the first report claims is checked before any counts.
            let mut unchecked = caller.is_some();
            let mut answered = false;
            let mut warned = false;
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
                            if n.id.len() > MAX_NODE_ID_BYTES {
                                refused("node_id_too_long", 1);
                                let status = Status::invalid_argument(format!(
                                    "node.id is {} bytes, more than the {MAX_NODE_ID_BYTES} accepted",
                                    n.id.len()
                                ));
                                tracing::warn!(peer = ?ip, "load report refused: node id too long");
                                let _ = tx.send(Err(status)).await;
                                break;
                            }
                            node.clone_from(&n.id);
                            tracing::debug!(node = %Escaped(&node), "load reporting stream opened");
                        }
                        if std::mem::take(&mut unchecked)
                            && let Some(caller) = &caller
                        {
                            let cluster = req.node.as_ref().map_or("", |n| n.cluster.as_str());
                            if let Err(denied) = caller.authorize(&node, cluster) {
                                denied.count();
                                refused(denied.reason(), 1);
                                tracing::warn!(
                                    node = %Escaped(&node), identity = %Escaped(&caller.identity), peer = ?ip,
                                    "load reports refused: the identity may not report as this node"
                                );
                                let _ = tx.send(Err(denied.status())).await;
                                break;
                            }
                        }
                        if !this.record(&node, ip, &req.cluster_stats) && !warned {
                            warned = true;
                            tracing::warn!(
                                node = %Escaped(&node), peer = ?ip,
                                "load reports refused: the node holds no ADS stream from this address"
                            );
                        }
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
                        tracing::debug!(node = %Escaped(&node), error = %status, "load reporting stream ended");
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
        let split = |name| BackendKey::parse(name).map(|k| (k.service, k.cluster));
        assert_eq!(split("web.shop:80@old"), Some(("web.shop", "old")));
        assert_eq!(split("xds"), None);
        assert_eq!(split("web.shop@old"), None);
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

    #[test]
    fn absurd_and_overflowing_counts_are_refused() {
        use ferry_proto::envoy::config::endpoint::v3::UpstreamLocalityStats;
        let stats = |ok: u64, err: u64| ClusterStats {
            cluster_name: "web.shop:80@old".to_owned(),
            upstream_locality_stats: vec![UpstreamLocalityStats {
                total_successful_requests: ok,
                total_error_requests: err,
                ..Default::default()
            }],
            ..Default::default()
        };
        let reports = LoadReports::default();
        assert_eq!(reports.record_stats(&[stats(u64::MAX, 1)], |_| true), 1);
        assert_eq!(
            reports.record_stats(&[stats(MAX_REQUESTS_PER_REPORT + 1, 0)], |_| true),
            1
        );
        assert_eq!(reports.record_stats(&[stats(10, 1)], |_| false), 1);
        assert_eq!(reports.tracked(), 0);
        assert_eq!(reports.record_stats(&[stats(10, 1)], |_| true), 0);
        assert_eq!(
            reports.since("web.shop", "old", 0),
            Load {
                requests: 11,
                errors: 1
            }
        );
        // Sums saturate rather than wrap.
        let big = Load {
            requests: u64::MAX,
            errors: u64::MAX,
        };
        assert_eq!(big.plus(big), big);
    }

    #[test]
    fn latency_metrics_reach_the_history_and_counts_alone_do_not() {
        use ferry_proto::envoy::config::endpoint::v3::{
            EndpointLoadMetricStats, UpstreamLocalityStats,
        };
        let metric = |name: &str, n: u64| EndpointLoadMetricStats {
            metric_name: name.to_owned(),
            num_requests_finished_with_metric: n,
            total_metric_value: n as f64,
        };
        let stats = |cluster: &str, metrics: Vec<EndpointLoadMetricStats>| ClusterStats {
            cluster_name: cluster.to_owned(),
            upstream_locality_stats: vec![UpstreamLocalityStats {
                total_successful_requests: 10,
                load_metric_stats: metrics,
                ..Default::default()
            }],
            ..Default::default()
        };
        let reports = LoadReports::default();
        let ferry = stats(
            "web.shop:80@new",
            vec![
                metric("ferry.latency_ms.le_10", 9),
                metric("ferry.latency_ms.le_inf", 1),
                metric("ferry.latency_ms.le_20", MAX_REQUESTS_PER_REPORT + 1),
                metric("cpu_utilization", 3),
            ],
        );
        let envoy = stats("web.shop:80@old", Vec::new());
        assert_eq!(reports.record_stats(&[ferry, envoy], |_| true), 0);
        let charts = reports
            .history()
            .charts(now_ms() + 2 * crate::history::BUCKET_MS);
        let new = &charts[&("web.shop".to_owned(), "new".to_owned())];
        assert!(new.latency_reported);
        assert!(
            new.p50_ms
                .iter()
                .flatten()
                .all(|p| (7.0..=10.0).contains(p))
        );
        assert!(new.p99_ms.iter().flatten().all(|&p| p == 5000.0));
        let old = &charts[&("web.shop".to_owned(), "old".to_owned())];
        assert!(!old.latency_reported);
        assert_eq!(old.requests_per_s.iter().sum::<f64>(), 2.0);
    }

    #[test]
    fn totals_not_reported_within_the_retention_expire() {
        let reports = LoadReports::new(Duration::from_secs(10));
        let load = Load {
            requests: 1,
            errors: 0,
        };
        reports.record_at("a.shop:80@old", load, 1_000);
        reports.record_at("b.shop:80@old", load, 100_000);
        assert_eq!(reports.tracked(), 1, "{:?}", reports.totals());
        assert_eq!(reports.since("a.shop", "old", 0), Load::default());
    }
}
