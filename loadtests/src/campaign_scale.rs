//! `campaign_scale`: one campaign moving many services from cluster `old`
//! to `new`, against a real `ferry control` over loopback gRPC and xDS,
//! with a simulated fleet.
//!
//! - The catalog holds `services` services `svcNNNN.shop`, each with one
//!   endpoint in `old` and one in `new` (loopback addresses on port 9:
//!   nothing is ever dialled) and all traffic on `old`.
//! - `proxies` simulated proxies each open one HTTP/2 connection to the
//!   xDS port, subscribe wildcard to CDS, EDS, LDS and RDS on one delta
//!   ADS stream, apply every RouteConfiguration they receive and then ACK
//!   it, as a proxy that accepts a config does. Every connected proxy that
//!   takes routes must ACK a step's routes before the step bakes.
//! - Each proxy also streams load reports (LRS) as its node id, from the
//!   same connection (Ferry counts a report only when its node holds a
//!   live ADS stream from that address): every `report_interval`,
//!   `requests_per_report` requests per service split by the weights of
//!   the routes it holds, no errors. The gates see target traffic grow
//!   with each step, and the sources go quiet once the last step's routes
//!   are held, which the last step waits for.
//! - A campaign over every service (`old` → `new`, `concurrency` at once,
//!   unlimited failures, steps and bake as configured) is created with the
//!   campaigns API and polled until it ends or `campaign_timeout`.
//!
//! Measured: the campaign's wall time and services per minute; each
//! migration's duration (created → ended, from `ListMigrations`); the
//! engine's cost per pass (`ferry_migrate_tick_seconds`, scraped from
//! `/metrics` before and after); Ferry's CPU time and resident memory.
//! Every wait is bounded, all traffic stays on loopback, and Ferry is
//! killed when the run ends, however it ends.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_proto::envoy::config::core::v3::Node;
use ferry_proto::envoy::config::endpoint::v3::{ClusterStats, UpstreamLocalityStats};
use ferry_proto::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use ferry_proto::envoy::service::load_stats::v3::LoadStatsRequest;
use ferry_proto::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
use ferry_proto::ferry::v1::campaigns_client::CampaignsClient;
use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
use ferry_proto::ferry::v1::{
    Campaign, CreateCampaignRequest, CreateMigrationRequest, Gates, GetCampaignRequest,
    ListMigrationsRequest, Migration,
};
use ferry_proto::type_url;
use prost::Message;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::catalog::write_atomically;
use crate::client::DeltaStream;
use crate::ferry::{self, FerryOptions, FerryProcess, ProcSample};
use crate::provenance;
use crate::stats::{Summary, fmt_mib, fmt_ms};

mod report;
use self::report::phases;
pub use self::report::*;

/// Name of the test.
pub const TEST_NAME: &str = "campaign_scale";
/// Namespace of every generated service.
pub const NAMESPACE: &str = "shop";
/// Service port of every generated service.
pub const PORT: u16 = 8080;
/// The cluster every service leaves, and the one it moves to.
pub const FROM: &str = "old";
pub const TO: &str = "new";

/// The engine's per-pass histogram.
const TICK_METRIC: &str = "ferry_migrate_tick_seconds";
/// Largest API or xDS message the load generator decodes.
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `ferry` binary.
    pub ferry: PathBuf,
    pub services: usize,
    /// The campaign's concurrency, and Ferry's
    /// `--max-concurrent-migrations`.
    pub concurrency: usize,
    /// Bake time of each step.
    pub bake: Duration,
    /// Simulated proxies (ADS + LRS each).
    pub proxies: usize,
    /// Target share of each step, in percent; the last is 100.
    pub steps: Vec<f64>,
    /// Requests each side needs in a step's window for its gate.
    pub min_requests: u64,
    pub drain: Duration,
    pub ack_timeout: Duration,
    /// How long a gate waits past the bake for enough data.
    pub data_timeout: Duration,
    /// How often each proxy reports load.
    pub report_interval: Duration,
    /// Requests per service per report of one proxy, split by weight.
    pub requests_per_report: u64,
    /// Longest wait for the campaign to end, from its creation.
    pub campaign_timeout: Duration,
    /// Longest wait for Ferry's `/readyz`.
    pub ready_timeout: Duration,
    /// Longest wait for every proxy to hold every service's route.
    pub sync_timeout: Duration,
    /// How often the campaign is read.
    pub poll_interval: Duration,
    /// `RUST_LOG` for Ferry.
    pub ferry_log: String,
    /// Where to write the Markdown report (JSON beside it); `None`: not
    /// written.
    pub out: Option<PathBuf>,
    /// Where to copy Ferry's log at the end; `None`: it is discarded.
    pub keep_ferry_log: Option<PathBuf>,
    /// The command line, for the report.
    pub command: Option<String>,
    /// Whether this is the small CI instance (a label in the report).
    pub smoke: bool,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ferry: PathBuf::from("target/release/ferry"),
            services: 1_000,
            concurrency: 50,
            bake: Duration::from_millis(200),
            proxies: 2,
            steps: vec![50.0, 100.0],
            min_requests: 5,
            drain: Duration::ZERO,
            ack_timeout: Duration::from_secs(60),
            data_timeout: Duration::from_secs(30),
            report_interval: Duration::from_millis(250),
            requests_per_report: 20,
            campaign_timeout: Duration::from_secs(30 * 60),
            ready_timeout: Duration::from_secs(60),
            sync_timeout: Duration::from_secs(120),
            poll_interval: Duration::from_secs(1),
            ferry_log: "info".to_owned(),
            out: None,
            keep_ferry_log: None,
            command: None,
            smoke: false,
            progress: false,
        }
    }
}

/// Name of the `index`th generated service.
pub fn service_name(index: usize) -> String {
    format!("svc{index:04}")
}

/// The catalog: `services` services, one endpoint in each cluster, all
/// traffic on `old`.
pub fn render_catalog(services: usize) -> String {
    let mut out = String::with_capacity(services * 220);
    out.push_str("# Generated by ferry-loadtests campaign_scale; addresses are never dialled.\n");
    out.push_str("services:\n");
    for i in 0..services {
        let (hi, lo) = ((i >> 8) & 0xff, i & 0xff);
        let _ = write!(
            out,
            "  - name: {}\n    namespace: {NAMESPACE}\n    ports: [{{name: http, port: {PORT}}}]\n    backends:\n      {FROM}: {{endpoints: [\"127.1.{hi}.{lo}:9\"]}}\n      {TO}: {{endpoints: [\"127.2.{hi}.{lo}:9\"]}}\n    weights: {{{FROM}: 10000, {TO}: 0}}\n",
            service_name(i)
        );
    }
    out
}

/// What one proxy's routes say to report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteLoad {
    /// Services with a weighted route.
    pub services: usize,
    /// Requests per report, per xDS cluster that gets any.
    pub per_cluster: Vec<(String, u64)>,
}

/// Splits `per_service` requests of every service by the weights of its
/// route in `routes`.
pub fn route_load(routes: &RouteConfiguration, per_service: u64) -> RouteLoad {
    let mut load = RouteLoad::default();
    for vhost in &routes.virtual_hosts {
        let Some(route::Action::Route(action)) =
            vhost.routes.first().and_then(|r| r.action.as_ref())
        else {
            continue;
        };
        let Some(route_action::ClusterSpecifier::WeightedClusters(split)) =
            &action.cluster_specifier
        else {
            continue;
        };
        let weights: Vec<(&str, u64)> = split
            .clusters
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    c.weight.as_ref().map_or(0, |w| u64::from(w.value)),
                )
            })
            .collect();
        let total: u64 = weights.iter().map(|(_, w)| w).sum();
        if total == 0 {
            continue;
        }
        load.services += 1;
        for (name, weight) in weights {
            let n = (per_service * weight + total / 2) / total;
            if n > 0 {
                load.per_cluster.push((name.to_owned(), n));
            }
        }
    }
    load
}

/// Counters the proxies share with the coordinator.
#[derive(Debug, Default)]
struct FleetCounters {
    route_updates: AtomicU64,
    route_bytes: AtomicU64,
    load_reports: AtomicU64,
    reported_requests: AtomicU64,
}

fn node_id(index: usize) -> String {
    format!("campaign-scale-proxy-{index}")
}

fn node(index: usize) -> Node {
    Node {
        id: node_id(index),
        cluster: "ferry-loadtests".to_owned(),
        ..Default::default()
    }
}

/// One simulated proxy until cancelled or a stream fails.
async fn run_proxy(
    index: usize,
    channel: Channel,
    config: Arc<Config>,
    routes: watch::Sender<Arc<RouteLoad>>,
    counters: Arc<FleetCounters>,
) -> anyhow::Result<()> {
    let mut stream = DeltaStream::open_wildcard(
        channel.clone(),
        node_id(index),
        &[
            type_url::CLUSTER,
            type_url::ENDPOINT,
            type_url::LISTENER,
            type_url::ROUTE,
        ],
    )
    .await
    .context("opening the ADS stream")?;
    let reports = report_load(
        index,
        channel,
        routes.subscribe(),
        config.clone(),
        counters.clone(),
    );
    let ads = async {
        while let Some((_, response)) = stream.recv().await? {
            if response.type_url == type_url::ROUTE {
                for resource in &response.resources {
                    let Some(body) = resource.resource.as_ref() else {
                        continue;
                    };
                    let config_routes = RouteConfiguration::decode(body.value.as_slice())
                        .context("decoding a RouteConfiguration")?;
                    counters.route_updates.fetch_add(1, Ordering::Relaxed);
                    counters
                        .route_bytes
                        .fetch_add(body.value.len() as u64, Ordering::Relaxed);
                    routes.send_replace(Arc::new(route_load(
                        &config_routes,
                        config.requests_per_report,
                    )));
                }
            }
            // Applied, then accepted.
            stream.ack(&response).await?;
        }
        Err::<(), _>(anyhow::anyhow!("the server ended the ADS stream"))
    };
    tokio::select! {
        r = ads => r,
        r = reports => r.context("load reporting"),
    }
}

/// Reports load every interval as the routes last received split it,
/// once the proxy holds routes (its ADS stream, and so its node id, is
/// known to Ferry by then).
async fn report_load(
    index: usize,
    channel: Channel,
    mut routes: watch::Receiver<Arc<RouteLoad>>,
    config: Arc<Config>,
    counters: Arc<FleetCounters>,
) -> anyhow::Result<()> {
    routes.wait_for(|r| r.services > 0).await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(LoadStatsRequest {
        node: Some(node(index)),
        cluster_stats: Vec::new(),
    })
    .await?;
    let mut client = LoadReportingServiceClient::new(channel);
    let mut inbound = client
        .stream_load_stats(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut tick = tokio::time::interval(config.report_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            message = inbound.message() => match message? {
                Some(_) => continue,
                None => anyhow::bail!("the server ended the load reporting stream"),
            },
        }
        let elapsed = last.elapsed();
        last = Instant::now();
        let load = routes.borrow().clone();
        let mut requests = 0;
        let cluster_stats: Vec<ClusterStats> = load
            .per_cluster
            .iter()
            .map(|(name, n)| {
                requests += n;
                ClusterStats {
                    cluster_name: name.clone(),
                    upstream_locality_stats: vec![UpstreamLocalityStats {
                        total_successful_requests: *n,
                        total_issued_requests: *n,
                        ..Default::default()
                    }],
                    load_report_interval: Some(ferry_proto::google::protobuf::Duration {
                        seconds: elapsed.as_secs() as i64,
                        nanos: elapsed.subsec_nanos() as i32,
                    }),
                    ..Default::default()
                }
            })
            .collect();
        tx.send(LoadStatsRequest {
            node: None,
            cluster_stats,
        })
        .await?;
        counters.load_reports.fetch_add(1, Ordering::Relaxed);
        counters
            .reported_requests
            .fetch_add(requests, Ordering::Relaxed);
    }
}

fn remember(errors: &mut Vec<String>, error: String) {
    if errors.len() < 8 && !errors.contains(&error) {
        errors.push(error);
    }
}

async fn api_channel(ferry: &FerryProcess) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{}", ferry.api_addr))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true);
    let mut last = None;
    for _ in 0..100 {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(anyhow::anyhow!(
        "the API at {} is not reachable: {last:?}",
        ferry.api_addr
    ))
}

fn create_request(config: &Config) -> CreateCampaignRequest {
    let fmt = |d: Duration| humantime::format_duration(d).to_string();
    CreateCampaignRequest {
        from: FROM.to_owned(),
        to: TO.to_owned(),
        concurrency: config.concurrency as u32,
        unlimited_failures: true,
        order: "name".to_owned(),
        migration: Some(CreateMigrationRequest {
            steps: config.steps.clone(),
            bake: fmt(config.bake),
            gates: Some(Gates {
                min_requests: config.min_requests,
                data_timeout: fmt(config.data_timeout),
                ..Default::default()
            }),
            ack_timeout: fmt(config.ack_timeout),
            drain: fmt(config.drain),
            ..Default::default()
        }),
        reason: format!("{TEST_NAME} load test"),
        ..Default::default()
    }
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "DONE" | "HALTED" | "ABORTED")
}

/// Runs the `campaign_scale` load test and writes its report.
pub async fn run(config: Config) -> anyhow::Result<Report> {
    anyhow::ensure!(config.services > 0, "--services must be at least 1");
    anyhow::ensure!(
        config.services <= 1 << 16,
        "at most 65536 services (their addresses are 127.1.x.y)"
    );
    anyhow::ensure!(config.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(config.proxies > 0, "--proxies must be at least 1");
    anyhow::ensure!(
        !config.report_interval.is_zero(),
        "--report-interval must be positive"
    );
    ferry::check_binary(&config.ferry)?;
    let config = Arc::new(config);
    let progress = |msg: String| {
        if config.progress {
            eprintln!("[{TEST_NAME}] {msg}");
        }
    };
    let loadavg_at_start = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();

    let dir = tempfile::Builder::new()
        .prefix("ferry-campaign-scale-")
        .tempdir()
        .context("creating a temporary directory")?;
    let catalog_path = dir.path().join("catalog.yaml");
    write_atomically(&catalog_path, &render_catalog(config.services))?;

    let mut ferry = FerryProcess::spawn(&FerryOptions {
        binary: config.ferry.clone(),
        catalog: catalog_path,
        debounce: Duration::from_millis(100),
        listener_addr: ferry::UNBOUND_LISTENER,
        log_filter: config.ferry_log.clone(),
        log_file: dir.path().join("ferry.log"),
        extra_args: vec![
            "--max-concurrent-migrations".to_owned(),
            config.concurrency.to_string(),
        ],
    })?;
    let ready = ferry.wait_ready(config.ready_timeout).await?;
    let at_ready = ferry.sample()?;
    progress(format!(
        "ferry pid {} ready in {:.2} s (xds {}, api {}, admin {})",
        ferry.pid,
        ready.as_secs_f64(),
        ferry.xds_addr,
        ferry.api_addr,
        ferry.admin_addr
    ));

    // The fleet.
    let xds = Endpoint::from_shared(format!("http://{}", ferry.xds_addr))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let counters = Arc::new(FleetCounters::default());
    let cancel = CancellationToken::new();
    let mut proxies = JoinSet::new();
    let mut route_views = Vec::with_capacity(config.proxies);
    let sync_started = Instant::now();
    for index in 0..config.proxies {
        let channel = tokio::time::timeout(Duration::from_secs(10), xds.connect())
            .await
            .context("connecting to ferry's xDS port timed out")?
            .context("connecting to ferry's xDS port")?;
        let (tx, rx) = watch::channel(Arc::new(RouteLoad::default()));
        route_views.push(rx);
        let (config, counters, cancel) = (config.clone(), counters.clone(), cancel.clone());
        proxies.spawn(async move {
            let result = tokio::select! {
                _ = cancel.cancelled() => Ok(()),
                r = run_proxy(index, channel, config, tx, counters) => r,
            };
            result.map_err(|e| format!("proxy {index}: {e:#}"))
        });
    }
    let mut errors = Vec::new();
    let synced = tokio::time::timeout(config.sync_timeout, async {
        for view in &mut route_views {
            view.wait_for(|r| r.services >= config.services).await?;
        }
        anyhow::Ok(())
    })
    .await;
    let sync_s = sync_started.elapsed().as_secs_f64();
    match synced {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => {
            cancel.cancel();
            while let Some(r) = proxies.join_next().await {
                if let Ok(Err(e)) = r {
                    remember(&mut errors, e);
                }
            }
            anyhow::bail!(
                "the proxies did not all route {} services within {:?}: {errors:?}",
                config.services,
                config.sync_timeout
            );
        }
    }
    progress(format!(
        "{} proxies route {} services after {sync_s:.2} s",
        config.proxies, config.services
    ));
    // Let every proxy's first load reports land.
    tokio::time::sleep(config.report_interval * 2).await;

    let api = api_channel(&ferry).await?;
    let mut campaigns = CampaignsClient::new(api.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut migrations = MigrationsClient::new(api.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let metrics_before = ferry.metrics_text().await?;
    let before_campaign = ferry.sample()?;
    let started = Instant::now();
    let created = campaigns
        .create_campaign(create_request(&config))
        .await
        .context("creating the campaign")?
        .into_inner();
    progress(format!(
        "campaign {} created: {} services, concurrency {}",
        created.id,
        created.services.len(),
        created.concurrency
    ));

    // Follow it.
    let deadline = started + config.campaign_timeout;
    let mut last: Campaign = created.clone();
    let mut peak_rss = at_ready.peak_rss_bytes;
    let mut points = Vec::new();
    let step = config.services.div_ceil(10).max(1) as u32;
    let mut next_point = step;
    let mut next_progress = Instant::now() + Duration::from_secs(10);
    let mut timed_out = false;
    let mut after_campaign;
    loop {
        if !ferry.is_running() {
            anyhow::bail!(
                "ferry exited during the campaign; its log ends with:\n{}",
                ferry.log_tail(20)
            );
        }
        match campaigns
            .get_campaign(GetCampaignRequest {
                id: created.id.clone(),
            })
            .await
        {
            Ok(reply) => last = reply.into_inner(),
            Err(e) => remember(&mut errors, format!("GetCampaign: {e}")),
        }
        let sample = ferry.sample()?;
        after_campaign = sample;
        peak_rss = peak_rss.max(sample.peak_rss_bytes);
        let counts = last.counts.unwrap_or_default();
        let finished = counts.done + counts.rolled_back + counts.skipped;
        if finished >= next_point || is_terminal(&last.state) {
            points.push(ProgressPoint {
                at_s: started.elapsed().as_secs_f64(),
                finished,
                in_flight: counts.in_flight,
                ferry_cpu_s: sample.cpu_seconds - before_campaign.cpu_seconds,
                ferry_rss_bytes: sample.rss_bytes,
            });
            while next_point <= finished {
                next_point += step;
            }
        }
        if is_terminal(&last.state) {
            break;
        }
        if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(10);
            progress(format!(
                "{:.0} s: {} done, {} rolled back, {} in flight, {} queued ({:.0}/min)",
                started.elapsed().as_secs_f64(),
                counts.done,
                counts.rolled_back,
                counts.in_flight,
                counts.queued,
                last.per_minute
            ));
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        tokio::time::sleep(config.poll_interval).await;
    }
    let wall_client_s = started.elapsed().as_secs_f64();
    let metrics_after = ferry.metrics_text().await.unwrap_or_else(|e| {
        remember(&mut errors, format!("/metrics: {e:#}"));
        String::new()
    });
    let listed = migrations
        .list_migrations(ListMigrationsRequest::default())
        .await
        .map(|r| r.into_inner().migrations)
        .unwrap_or_else(|e| {
            remember(&mut errors, format!("ListMigrations: {e}"));
            Vec::new()
        });
    progress(format!(
        "campaign {} after {wall_client_s:.1} s",
        if timed_out { "timed out" } else { &last.state }
    ));

    // Stop the fleet.
    cancel.cancel();
    if tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(r) = proxies.join_next().await {
            if let Ok(Err(e)) = r {
                remember(&mut errors, e);
            }
        }
    })
    .await
    .is_err()
    {
        proxies.abort_all();
    }
    drop((campaigns, migrations, api));
    let load_generator = ferry::sample_process(std::process::id()).unwrap_or_default();
    ferry.kill();
    if let Some(copy) = &config.keep_ferry_log {
        std::fs::copy(dir.path().join("ferry.log"), copy)
            .with_context(|| format!("copying ferry's log to {}", copy.display()))?;
    }

    // Figures.
    let counts = last.counts.unwrap_or_default();
    let wall_s = if last.ended_at_unix_ms > 0 {
        (last.ended_at_unix_ms - last.created_at_unix_ms) as f64 / 1e3
    } else {
        wall_client_s
    };
    let finished = counts.done + counts.rolled_back;
    let mut in_flight_by_stage = BTreeMap::new();
    let mut waiting = Vec::new();
    for m in listed
        .iter()
        .filter(|m| !matches!(m.stage.as_str(), "DONE" | "ROLLED_BACK" | "FAILED"))
    {
        *in_flight_by_stage
            .entry(format!("{}/{}", m.stage, m.phase))
            .or_insert(0) += 1;
        if !m.waiting.is_empty() && waiting.len() < 5 && !waiting.contains(&m.waiting) {
            waiting.push(m.waiting.clone());
        }
    }
    let outcome = Outcome {
        state: last.state.clone(),
        reason: last.reason.clone(),
        timed_out,
        services: last.services.len(),
        done: counts.done,
        rolled_back: counts.rolled_back,
        skipped: counts.skipped,
        queued: counts.queued,
        in_flight: counts.in_flight,
        wall_s,
        services_per_minute: if wall_s > 0.0 {
            finished as f64 * 60.0 / wall_s
        } else {
            0.0
        },
        ferry_per_minute: last.per_minute,
        not_done: last
            .services
            .iter()
            .filter(|s| s.state != "done")
            .take(10)
            .map(|s| format!("{}: {} {}", s.service, s.state, s.reason))
            .collect(),
        in_flight_by_stage,
        waiting,
    };
    let done: Vec<&Migration> = listed.iter().filter(|m| m.stage == "DONE").collect();
    let durations: Vec<Duration> = done
        .iter()
        .map(|m| {
            Duration::from_millis(
                m.updated_at_unix_ms
                    .saturating_sub(m.created_at_unix_ms)
                    .max(0) as u64,
            )
        })
        .collect();
    let times = MigrationTimes {
        listed: listed.len(),
        done: done.len(),
        duration: Summary::of(&durations),
        gate_results: listed.iter().map(|m| m.gates.len()).sum(),
        phases: phases(&done),
    };
    let tick = match (
        Histogram::parse(&metrics_after, TICK_METRIC),
        Histogram::parse(&metrics_before, TICK_METRIC),
    ) {
        (Some(after), Some(before)) => Some(after.since(&before)),
        (Some(after), None) => Some(after),
        _ => None,
    };
    let engine = EngineCost {
        ticks: tick.as_ref().map_or(0, |h| h.count.max(0.0) as u64),
        mean_ms: tick.as_ref().and_then(Histogram::mean).map(|s| s * 1e3),
        p99_bound_ms: tick
            .as_ref()
            .and_then(|h| h.quantile_bound(0.99))
            .map(|s| s * 1e3),
        max_bound_ms: tick
            .as_ref()
            .and_then(|h| h.quantile_bound(1.0))
            .map(|s| s * 1e3),
        total_s: tick.as_ref().map_or(0.0, |h| h.sum),
        share_of_wall: tick.as_ref().map_or(0.0, |h| h.sum / wall_client_s),
        histogram: tick,
    };
    let cpu_campaign_s = after_campaign.cpu_seconds - before_campaign.cpu_seconds;
    let metrics = metrics_after
        .lines()
        .filter(|l| {
            [
                "ferry_migrate_ack_wait_seconds_sum",
                "ferry_migrate_ack_wait_seconds_count",
                "ferry_migrate_gate_evaluations_total",
                "ferry_lrs_refused_total",
                "ferry_lrs_reports_total",
                "ferry_xds_pushes_total",
                "ferry_xds_nacks_total",
                "ferry_xds_translate_duration_seconds_sum",
                "ferry_xds_translate_duration_seconds_count",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .map(str::to_owned)
        .collect();
    let fleet = Fleet {
        route_updates: counters.route_updates.load(Ordering::Relaxed),
        route_bytes: counters.route_bytes.load(Ordering::Relaxed),
        load_reports: counters.load_reports.load(Ordering::Relaxed),
        reported_requests: counters.reported_requests.load(Ordering::Relaxed),
        sync_s,
    };
    let report = Report {
        test: TEST_NAME,
        mode: if config.smoke { "smoke" } else { "full" },
        commit: provenance::commit(Path::new(env!("CARGO_MANIFEST_DIR"))).map_or_else(
            || "unknown".to_owned(),
            |c| {
                if c.dirty {
                    format!("{}-dirty", c.id)
                } else {
                    c.id
                }
            },
        ),
        ferry_sha256: provenance::sha256_file(&config.ferry)
            .unwrap_or_else(|_| "unavailable".to_owned()),
        setup: Setup {
            services: config.services,
            concurrency: config.concurrency,
            proxies: config.proxies,
            steps: config.steps.clone(),
            bake_ms: config.bake.as_secs_f64() * 1e3,
            min_requests: config.min_requests,
            drain_ms: config.drain.as_secs_f64() * 1e3,
            ack_timeout_s: config.ack_timeout.as_secs_f64(),
            data_timeout_s: config.data_timeout.as_secs_f64(),
            report_interval_ms: config.report_interval.as_secs_f64() * 1e3,
            requests_per_report: config.requests_per_report,
            campaign_timeout_s: config.campaign_timeout.as_secs_f64(),
            ferry_binary: config.ferry.clone(),
            command: config.command.clone(),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            loadavg_at_start,
        },
        outcome,
        migrations: times,
        engine,
        ferry: FerryUsage {
            ready_s: ready.as_secs_f64(),
            at_ready,
            before_campaign,
            after_campaign,
            cpu_campaign_s,
            cpu_per_migration_ms: (finished > 0)
                .then(|| cpu_campaign_s * 1e3 / f64::from(finished)),
            cpu_cores: cpu_campaign_s / wall_client_s.max(1e-9),
            peak_rss_bytes: peak_rss.max(after_campaign.peak_rss_bytes),
            metrics,
        },
        fleet,
        progress: points,
        load_generator_cpu_s: load_generator.cpu_seconds,
        load_generator_peak_rss_bytes: load_generator.peak_rss_bytes,
        errors,
        files: Vec::new(),
    };
    write_report(report, config.out.as_deref())
}

fn write_report(mut report: Report, out: Option<&Path>) -> anyhow::Result<Report> {
    let Some(md) = out else {
        return Ok(report);
    };
    if let Some(parent) = md.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let json = md.with_extension("json");
    let mut text = serde_json::to_string_pretty(&report)?;
    text.push('\n');
    std::fs::write(&json, text).with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(md, report.markdown()).with_context(|| format!("writing {}", md.display()))?;
    report.files = vec![md.to_owned(), json];
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::envoy::config::route::v3::{
        Route, RouteAction, VirtualHost, WeightedCluster, weighted_cluster,
    };
    use ferry_proto::google::protobuf::UInt32Value;

    #[test]
    fn ferry_accepts_the_catalog() {
        let text = render_catalog(300);
        let services = ferry_discovery::file::parse_catalog(Path::new("c.yaml"), &text).unwrap();
        assert_eq!(services.len(), 300);
        assert_eq!(services[0].name.to_string(), "svc0000.shop");
        assert!(text.contains("\"127.1.1.43:9\"") && text.contains("\"127.2.1.43:9\""));
        for s in &services {
            assert_eq!(s.backends.len(), 2);
            assert!(s.backends.values().all(|b| b.endpoints.len() == 1));
        }
    }

    fn vhost(weights: &[(&str, u32)]) -> VirtualHost {
        let clusters = weights
            .iter()
            .map(|(name, w)| weighted_cluster::ClusterWeight {
                name: (*name).to_owned(),
                weight: Some(UInt32Value { value: *w }),
                ..Default::default()
            })
            .collect();
        VirtualHost {
            name: "v".into(),
            routes: vec![Route {
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
                        WeightedCluster {
                            clusters,
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn load_follows_the_route_weights() {
        let routes = RouteConfiguration {
            name: "ferry_http".into(),
            virtual_hosts: vec![
                vhost(&[("a.shop:8080@old", 10_000), ("a.shop:8080@new", 0)]),
                vhost(&[("b.shop:8080@old", 5_000), ("b.shop:8080@new", 5_000)]),
                vhost(&[("c.shop:8080@new", 10_000)]),
                vhost(&[("d.shop:8080@old", 0)]),
                VirtualHost::default(),
            ],
            ..Default::default()
        };
        let load = route_load(&routes, 20);
        assert_eq!(load.services, 3);
        assert_eq!(
            load.per_cluster,
            [
                ("a.shop:8080@old".to_owned(), 20),
                ("b.shop:8080@old".to_owned(), 10),
                ("b.shop:8080@new".to_owned(), 10),
                ("c.shop:8080@new".to_owned(), 20),
            ]
        );
    }

    const PAGE: &str = "\
# TYPE ferry_migrate_tick_seconds histogram
ferry_migrate_tick_seconds_bucket{le=\"0.0005\"} 90
ferry_migrate_tick_seconds_bucket{le=\"0.001\"} 98
ferry_migrate_tick_seconds_bucket{le=\"0.0025\"} 100
ferry_migrate_tick_seconds_bucket{le=\"+Inf\"} 100
ferry_migrate_tick_seconds_sum 0.04
ferry_migrate_tick_seconds_count 100
ferry_migrate_ticks_other 5
";

    #[test]
    fn histograms_parse_and_subtract() {
        let h = Histogram::parse(PAGE, "ferry_migrate_tick_seconds").unwrap();
        assert_eq!(h.count, 100.0);
        assert_eq!(h.buckets.len(), 4);
        assert!((h.mean().unwrap() - 0.0004).abs() < 1e-12);
        assert_eq!(h.quantile_bound(0.5), Some(0.0005));
        assert_eq!(h.quantile_bound(0.95), Some(0.001));
        assert_eq!(h.quantile_bound(0.99), Some(0.0025));
        assert_eq!(h.quantile_bound(1.0), Some(0.0025));
        assert!(Histogram::parse(PAGE, "ferry_nothing").is_none());

        let earlier = Histogram {
            buckets: vec![
                (0.0005, 90.0),
                (0.001, 90.0),
                (0.0025, 90.0),
                (f64::INFINITY, 90.0),
            ],
            sum: 0.03,
            count: 90.0,
        };
        let d = h.since(&earlier);
        assert_eq!(d.count, 10.0);
        assert_eq!(d.quantile_bound(0.5), Some(0.001));
        assert_eq!(d.quantile_bound(0.99), Some(0.0025));
        assert_eq!(Histogram::default().quantile_bound(0.99), None);
        let slow = Histogram {
            buckets: vec![(0.001, 0.0), (f64::INFINITY, 3.0)],
            sum: 60.0,
            count: 3.0,
        };
        assert_eq!(slow.quantile_bound(0.99), Some(f64::INFINITY));
    }

    #[test]
    fn the_request_takes_the_campaign_settings() {
        let r = create_request(&Config {
            concurrency: 7,
            bake: Duration::from_millis(200),
            ..Config::default()
        });
        assert_eq!(
            (r.from.as_str(), r.to.as_str(), r.concurrency),
            ("old", "new", 7)
        );
        assert!(r.unlimited_failures && r.max_failures == 0);
        let m = r.migration.unwrap();
        assert_eq!(m.bake, "200ms");
        assert_eq!(m.drain, "0s");
        assert_eq!(m.steps, [50.0, 100.0]);
        assert_eq!(m.gates.unwrap().min_requests, 5);
    }
}
