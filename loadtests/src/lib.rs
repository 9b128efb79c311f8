//! Whole-system load tests of Ferry.
//!
//! [`run`] is the `xds_fanout` test: it generates a catalog file
//! ([`catalog`]), starts a real `ferry control` on free loopback ports
//! ([`ferry`]), connects many simulated delta-xDS clients multiplexed over
//! a few HTTP/2 connections ([`client`]), and measures
//!
//! - how long every client takes to get its initial config (wildcard CDS
//!   and EDS);
//! - for each of a few rounds that flip the readiness of ONE endpoint in
//!   the catalog file, the time from the file's rename to each client's
//!   receipt of the EDS response carrying that load assignment. This
//!   includes Ferry's file-watch settle time (30 ms) and its `--debounce`
//!   (100 ms by default): it is the end-to-end latency an operator sees;
//! - Ferry's resident memory and CPU time, idle after the initial sync and
//!   after the rounds.
//!
//! Every wait is bounded in time, all traffic stays on loopback, and Ferry
//! is killed when the test ends, however it ends. The binary `xds_fanout`
//! is the command line; `tests/loadtest_smoke.rs` runs a small instance in
//! CI.
//!
//! [`kube_scale`] is the second test: Ferry's Kubernetes source against
//! three fake API servers holding 100,000 endpoints (binary `kube_scale`,
//! smoke test `tests/kube_scale_smoke.rs`).
//!
//! [`campaign_scale`] runs one campaign over many services (1,000 at
//! concurrency 50 by default) with simulated proxies that ACK routes and
//! report load following the weights: wall time, time per migration, the
//! engine's cost per pass (binary `campaign_scale`, smoke test
//! `tests/campaign_scale_smoke.rs`).
//!
//! [`proxy_compare`] measures Ferry's proxy against Envoy (configured by
//! Ferry, and static), nginx and HAProxy, each alone on one pinned core:
//! requests per second (HTTP/1.1 and h2c), latency at a fixed rate,
//! memory, CPU and upstream connections (binary `proxy_compare`, smoke
//! test `tests/proxy_compare_smoke.rs`).

pub mod campaign_scale;
pub mod catalog;
pub mod client;
mod fanout_report;
pub mod ferry;
pub mod kube_scale;
pub mod provenance;
pub mod proxy_compare;
pub mod stats;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::catalog::{CLUSTERS, CatalogSpec, write_atomically};
use crate::client::{Event, Shared};
use crate::ferry::{FerryOptions, FerryProcess};
use crate::stats::{Summary, fmt_mib, fmt_ms};

pub use crate::fanout_report::{Change, FerryUsage, InitialSync, Report, RoundResult, Setup};

/// Name of the test, in result file names.
pub const TEST_NAME: &str = "xds_fanout";

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `ferry` binary.
    pub ferry: PathBuf,
    /// Simulated xDS clients.
    pub clients: usize,
    /// Endpoints in the catalog (rounded up to whole services).
    pub endpoints: usize,
    pub endpoints_per_backend: usize,
    /// Change rounds, each flipping one endpoint's readiness.
    pub rounds: usize,
    /// Client streams per HTTP/2 connection.
    pub clients_per_connection: usize,
    /// Clients fetching their initial config at once (0: no limit).
    pub sync_concurrency: usize,
    /// Ferry's `--debounce`.
    pub debounce: Duration,
    /// Longest wait for every client to get one change.
    pub round_timeout: Duration,
    /// Longest wait for every client's initial config.
    pub sync_timeout: Duration,
    /// Longest wait for Ferry's `/readyz`.
    pub ready_timeout: Duration,
    /// `RUST_LOG` for Ferry.
    pub ferry_log: String,
    /// Where to write the JSON and Markdown results; `None`: not written.
    pub results_dir: Option<PathBuf>,
    /// Where to copy Ferry's log at the end; `None`: it is discarded.
    pub keep_ferry_log: Option<PathBuf>,
    /// Ferry is killed and the test stopped if Ferry's and the load
    /// generator's resident memory together pass this: a load that does not
    /// fit the machine stops cleanly instead of meeting the OOM killer.
    pub max_rss_bytes: u64,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ferry: PathBuf::from("target/release/ferry"),
            clients: 1_000,
            endpoints: 10_000,
            endpoints_per_backend: 50,
            rounds: 5,
            clients_per_connection: 100,
            sync_concurrency: 1_000,
            debounce: Duration::from_millis(100),
            round_timeout: Duration::from_secs(30),
            sync_timeout: Duration::from_secs(600),
            ready_timeout: Duration::from_secs(120),
            ferry_log: "info".to_owned(),
            results_dir: None,
            keep_ferry_log: None,
            max_rss_bytes: 14 << 30,
            progress: false,
        }
    }
}

/// Stops the test when Ferry's and the load generator's resident memory
/// together pass a limit, so a load that does not fit cannot push the
/// machine into the OOM killer.
struct RssGuard {
    pid: u32,
    limit: u64,
    interval: tokio::time::Interval,
    /// Ferry's largest RSS seen.
    peak: u64,
}

impl RssGuard {
    fn new(pid: u32, limit: u64) -> Self {
        let mut interval = tokio::time::interval(Duration::from_millis(200));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            pid,
            limit,
            interval,
            peak: 0,
        }
    }

    /// Why to stop, if over the limit.
    fn check(&mut self) -> Option<String> {
        let rss = ferry::sample_process(self.pid).ok()?.rss_bytes;
        let own = ferry::sample_process(std::process::id()).map_or(0, |s| s.rss_bytes);
        self.peak = self.peak.max(rss);
        (rss + own > self.limit).then(|| {
            format!(
                "ferry's RSS reached {} and the load generator's {} (limit {} together); ferry was killed",
                fmt_mib(rss),
                fmt_mib(own),
                fmt_mib(self.limit)
            )
        })
    }
}

/// The coordinator's side of a run: client events, bounded by a deadline
/// and by the memory guard.
struct Coordinator {
    events: mpsc::UnboundedReceiver<Event>,
    clients: Clients,
    guard: RssGuard,
    aborted: Option<String>,
}

impl Coordinator {
    /// The next client event; `None` at the deadline, or once aborted.
    async fn next(&mut self, deadline: tokio::time::Instant) -> Option<Event> {
        while self.aborted.is_none() {
            tokio::select! {
                event = self.events.recv() => return event,
                _ = tokio::time::sleep_until(deadline) => return None,
                _ = self.guard.interval.tick() => self.aborted = self.guard.check(),
            }
        }
        None
    }
}

/// Runs the `xds_fanout` load test and writes its results.
pub async fn run(config: Config) -> anyhow::Result<Report> {
    anyhow::ensure!(config.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        config.clients_per_connection > 0,
        "--clients-per-connection must be at least 1"
    );
    ferry::check_binary(&config.ferry)?;
    let spec = CatalogSpec::for_endpoints(config.endpoints, config.endpoints_per_backend)?;
    let progress = |msg: String| {
        if config.progress {
            eprintln!("[xds_fanout] {msg}");
        }
    };

    let dir = tempfile::Builder::new()
        .prefix("ferry-loadtest-")
        .tempdir()
        .context("creating a temporary directory")?;
    let catalog_path = dir.path().join("catalog.yaml");
    write_atomically(&catalog_path, &spec.render(true))?;
    progress(format!(
        "catalog: {} services x {} clusters x {} endpoints = {} endpoints",
        spec.services,
        CLUSTERS.len(),
        spec.endpoints_per_backend,
        spec.endpoints()
    ));

    let mut ferry = FerryProcess::spawn(&FerryOptions {
        binary: config.ferry.clone(),
        catalog: catalog_path.clone(),
        debounce: config.debounce,
        listener_addr: ferry::UNBOUND_LISTENER,
        log_filter: config.ferry_log.clone(),
        log_file: dir.path().join("ferry.log"),
        extra_args: Vec::new(),
    })?;
    let ready = ferry.wait_ready(config.ready_timeout).await?;
    let at_ready = ferry.sample()?;
    progress(format!(
        "ferry pid {} ready in {:.2} s (xds {}, admin {})",
        ferry.pid,
        ready.as_secs_f64(),
        ferry.xds_addr,
        ferry.admin_addr
    ));

    let connections = config.clients.div_ceil(config.clients_per_connection);
    let connect_started = Instant::now();
    let endpoint = Endpoint::from_shared(format!("http://{}", ferry.xds_addr))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        let channel = tokio::time::timeout(Duration::from_secs(10), endpoint.connect())
            .await
            .context("connecting to ferry timed out")?
            .context("connecting to ferry")?;
        channels.push(channel);
    }
    let connect_s = connect_started.elapsed().as_secs_f64();

    let (events_tx, events) = mpsc::unbounded_channel();
    let permits = match config.sync_concurrency {
        0 => config.clients,
        n => n.min(config.clients),
    };
    let shared = Arc::new(Shared {
        round: AtomicU64::new(0),
        target: spec.target_resource(),
        target_address: spec.target_address(),
        events: events_tx,
        sync_permits: Arc::new(Semaphore::new(permits)),
        expected_clusters: spec.clusters(),
        cancel: CancellationToken::new(),
    });
    let mut co = Coordinator {
        events,
        clients: Clients::new(config.clients),
        guard: RssGuard::new(ferry.pid, config.max_rss_bytes),
        aborted: None,
    };
    let mut tasks = JoinSet::new();
    let sync_started = Instant::now();
    for (id, channel) in (0..config.clients).zip(channels.iter().cycle()) {
        tasks.spawn(client::run(id, channel.clone(), shared.clone()));
    }
    progress(format!(
        "{} clients over {connections} connections, at most {permits} syncing at once",
        config.clients
    ));

    // Initial sync.
    let deadline = tokio::time::Instant::now() + config.sync_timeout;
    let mut sync_latencies = Vec::with_capacity(config.clients);
    let mut last_synced = None;
    let (mut incomplete, mut config_bytes) = (0, 0);
    let mut next_progress = config.clients.div_ceil(10);
    while co.clients.synced + co.clients.failed_before_sync < config.clients {
        let Some(event) = co.next(deadline).await else {
            break;
        };
        match event {
            Event::Synced {
                client,
                opened,
                at,
                clusters,
                load_assignments,
                bytes,
            } => {
                co.clients.on_synced(client);
                sync_latencies.push(at.saturating_duration_since(opened));
                last_synced = Some(at);
                config_bytes += bytes;
                if clusters != spec.clusters() || load_assignments != spec.clusters() {
                    incomplete += 1;
                }
                if co.clients.synced >= next_progress {
                    let rss = |pid| {
                        ferry::sample_process(pid).map_or("?".to_owned(), |s| fmt_mib(s.rss_bytes))
                    };
                    progress(format!(
                        "{} clients synced after {:.2} s, RSS ferry {} load generator {}",
                        co.clients.synced,
                        sync_started.elapsed().as_secs_f64(),
                        rss(ferry.pid),
                        rss(std::process::id())
                    ));
                    next_progress += config.clients.div_ceil(10);
                }
            }
            Event::Ended { client, error } => co.clients.on_ended(client, error),
            Event::Target { .. } => co.clients.stray += 1,
        }
    }
    let synced = co.clients.synced;
    let initial_sync = InitialSync {
        all_synced_s: last_synced
            .filter(|_| synced == config.clients)
            .map(|at| at.saturating_duration_since(sync_started).as_secs_f64()),
        connect_s,
        synced_clients: synced,
        failed_clients: config.clients - synced,
        incomplete_config: incomplete,
        config_bytes_per_client: config_bytes / synced.max(1),
        per_client: Summary::of(&sync_latencies),
    };
    progress(format!(
        "initial sync: {synced}/{} clients in {:.2} s",
        config.clients,
        sync_started.elapsed().as_secs_f64()
    ));

    let settle = Duration::from_secs(2);
    let mut idle_after_sync = None;
    if co.aborted.is_none() {
        tokio::time::sleep(settle).await;
        anyhow::ensure!(
            ferry.is_running(),
            "ferry died during the initial sync; its log ends with:\n{}",
            ferry.log_tail(20)
        );
        idle_after_sync = Some(ferry.sample()?);
    }

    // Change rounds.
    let mut round_results = Vec::with_capacity(config.rounds);
    let mut all_latencies = Vec::new();
    for round in 1..=config.rounds {
        if co.aborted.is_some() {
            break;
        }
        let target_ready = round % 2 == 0;
        let text = spec.render(target_ready);
        shared.round.store(round as u64, Ordering::SeqCst);
        write_atomically(&catalog_path, &text)?;
        let written = Instant::now();
        let written_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(0.0);
        let deadline = tokio::time::Instant::from_std(written + config.round_timeout);
        let mut got: Vec<bool> = vec![false; config.clients];
        let mut latencies = Vec::with_capacity(config.clients);
        let mut wrong = 0;
        while latencies.len() < co.clients.listening {
            let Some(event) = co.next(deadline).await else {
                break;
            };
            match event {
                Event::Target {
                    client,
                    round: seen,
                    at,
                    healthy,
                } if seen == round as u64 && got.get(client).is_some_and(|g| !g) => {
                    got[client] = true;
                    latencies.push(at.saturating_duration_since(written));
                    if healthy != Some(target_ready) {
                        wrong += 1;
                    }
                }
                Event::Target { .. } => co.clients.stray += 1,
                Event::Synced { client, .. } => co.clients.on_synced(client),
                Event::Ended { client, error } => co.clients.on_ended(client, error),
            }
        }
        shared.round.store(0, Ordering::SeqCst);
        let result = RoundResult {
            round,
            written_at_unix_ms,
            target_ready,
            received: latencies.len(),
            missed: config.clients - latencies.len(),
            wrong_content: wrong,
            latency: Summary::of(&latencies),
        };
        progress(format!(
            "round {round}: {}/{} clients, p50 {} p99 {} max {}",
            result.received,
            config.clients,
            fmt_ms(result.latency.p50_ms),
            fmt_ms(result.latency.p99_ms),
            fmt_ms(result.latency.max_ms)
        ));
        all_latencies.extend(latencies);
        round_results.push(result);
        // Let this round's change settle before the next (no coalescing).
        tokio::time::sleep(config.debounce + Duration::from_millis(500)).await;
    }

    let (mut after_rounds, mut after_disconnect, mut metrics) = (None, None, Vec::new());
    let mut at_abort = None;
    if let Some(reason) = &co.aborted {
        at_abort = ferry.sample().ok();
        ferry.kill();
        progress(format!("aborted: {reason}"));
    } else {
        tokio::time::sleep(settle).await;
        anyhow::ensure!(
            ferry.is_running(),
            "ferry died during the change rounds; its log ends with:\n{}",
            ferry.log_tail(20)
        );
        after_rounds = Some(ferry.sample()?);
        metrics = ferry
            .metrics(&[
                "ferry_xds_translate_duration_seconds",
                "ferry_xds_push_latency_seconds",
                "ferry_xds_pushes_total",
                "ferry_xds_nacks_total",
                "ferry_xds_stale_requests_total",
                "ferry_xds_connected_clients",
            ])
            .await
            .unwrap_or_else(|e| vec![format!("metrics unavailable: {e:#}")]);
    }

    shared.cancel.cancel();
    if tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tasks.abort_all();
    }
    drop(channels);
    if co.aborted.is_none() {
        tokio::time::sleep(settle).await;
        after_disconnect = ferry.sample().ok();
    }
    let load_generator = ferry::sample_process(std::process::id()).unwrap_or_default();
    drop(ferry);
    if let Some(copy) = &config.keep_ferry_log {
        std::fs::copy(dir.path().join("ferry.log"), copy)
            .with_context(|| format!("copying ferry's log to {}", copy.display()))?;
    }

    let last_sample = at_abort
        .or(after_disconnect)
        .or(after_rounds)
        .or(idle_after_sync);
    let peak_rss_bytes = last_sample
        .map(|s| s.peak_rss_bytes)
        .unwrap_or(0)
        .max(co.guard.peak)
        .max(at_ready.peak_rss_bytes);
    let expected = config.clients * config.rounds;
    let received = all_latencies.len();
    let report = Report {
        test: TEST_NAME,
        commit: provenance::commit(Path::new(env!("CARGO_MANIFEST_DIR"))),
        ferry_sha256: provenance::sha256_file(&config.ferry).ok(),
        setup: Setup {
            clients: config.clients,
            connections,
            sync_concurrency: permits,
            services: spec.services,
            clusters_per_service: CLUSTERS.len(),
            endpoints_per_backend: spec.endpoints_per_backend,
            endpoints: spec.endpoints(),
            rounds: config.rounds,
            debounce_ms: config.debounce.as_secs_f64() * 1e3,
            round_timeout_s: config.round_timeout.as_secs_f64(),
            max_rss_bytes: config.max_rss_bytes,
            target_resource: spec.target_resource(),
            ferry_binary: config.ferry.clone(),
        },
        aborted: co.aborted,
        initial_sync,
        change: Change {
            measured: "from the catalog file's rename to the client's receipt of the EDS response carrying the changed load assignment; includes ferry's 30 ms file-settle delay and its --debounce",
            expected,
            received,
            missed: expected - received,
            wrong_content: round_results.iter().map(|r| r.wrong_content).sum(),
            stray: co.clients.stray,
            latency: Summary::of(&all_latencies),
            rounds: round_results,
        },
        ferry: FerryUsage {
            ready_s: ready.as_secs_f64(),
            at_ready,
            idle_after_sync,
            after_rounds,
            after_disconnect,
            at_abort,
            peak_rss_bytes,
            cpu_sync_s: idle_after_sync.map(|s| s.cpu_seconds - at_ready.cpu_seconds),
            cpu_rounds_s: after_rounds
                .zip(idle_after_sync)
                .map(|(a, b)| a.cpu_seconds - b.cpu_seconds),
            metrics,
        },
        load_generator_cpu_s: load_generator.cpu_seconds,
        load_generator_peak_rss_bytes: load_generator.peak_rss_bytes,
        client_errors: co.clients.errors,
        files: Vec::new(),
    };
    write_results(report, config.results_dir.as_deref())
}

/// What the coordinator knows of each client.
struct Clients {
    synced_flags: Vec<bool>,
    alive: Vec<bool>,
    synced: usize,
    failed_before_sync: usize,
    /// Synced and still connected: the clients a change round waits for.
    listening: usize,
    stray: usize,
    errors: Vec<String>,
}

impl Clients {
    fn new(n: usize) -> Self {
        Self {
            synced_flags: vec![false; n],
            alive: vec![true; n],
            synced: 0,
            failed_before_sync: 0,
            listening: 0,
            stray: 0,
            errors: Vec::new(),
        }
    }

    fn on_synced(&mut self, client: usize) {
        if let Some(flag) = self.synced_flags.get_mut(client)
            && !*flag
        {
            *flag = true;
            self.synced += 1;
            if self.alive.get(client).copied().unwrap_or(false) {
                self.listening += 1;
            }
        }
    }

    fn on_ended(&mut self, client: usize, error: Option<String>) {
        let synced = self.synced_flags.get(client).copied().unwrap_or(false);
        if let Some(alive) = self.alive.get_mut(client)
            && *alive
        {
            *alive = false;
            if synced {
                self.listening -= 1;
            } else {
                self.failed_before_sync += 1;
            }
        }
        if let Some(e) = error
            && self.errors.len() < 5
            && !self.errors.contains(&e)
        {
            self.errors.push(e);
        }
    }
}

fn write_results(mut report: Report, dir: Option<&std::path::Path>) -> anyhow::Result<Report> {
    let Some(dir) = dir else {
        return Ok(report);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = format!(
        "{TEST_NAME}-{}c-{}e",
        report.setup.clients, report.setup.endpoints
    );
    let json = dir.join(format!("{stem}.json"));
    let md = dir.join(format!("{stem}.md"));
    let mut text = serde_json::to_string_pretty(&report)?;
    text.push('\n');
    std::fs::write(&json, text).with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(&md, report.markdown()).with_context(|| format!("writing {}", md.display()))?;
    report.files = vec![json, md];
    Ok(report)
}

/// An Envoy bootstrap that takes everything from Ferry's xDS server at
/// `xds` over one ADS stream (`api_type`: `GRPC` or `DELTA_GRPC`) and
/// reports load to it; admin on `admin`. The integration tests and the
/// `proxy_compare` load test both start Envoy with it.
pub fn envoy_bootstrap(
    node_id: &str,
    node_cluster: &str,
    api_type: &str,
    xds: std::net::SocketAddr,
    admin: std::net::SocketAddr,
) -> String {
    envoy_bootstrap_split(node_id, node_cluster, api_type, xds, xds, admin)
}

pub use ferry_xds::bootstrap::envoy_bootstrap_split;
