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
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::catalog::{CLUSTERS, CatalogSpec, write_atomically};
use crate::client::{Event, Shared};
use crate::ferry::{FerryOptions, FerryProcess, ProcSample};
use crate::stats::{Summary, fmt_mib, fmt_ms};

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

/// What was run.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub clients: usize,
    pub connections: usize,
    pub sync_concurrency: usize,
    pub services: usize,
    pub clusters_per_service: usize,
    pub endpoints_per_backend: usize,
    pub endpoints: usize,
    pub rounds: usize,
    pub debounce_ms: f64,
    pub round_timeout_s: f64,
    /// Limit on Ferry's + the load generator's RSS.
    pub max_rss_bytes: u64,
    /// The load assignment whose endpoint flips.
    pub target_resource: String,
    pub ferry_binary: PathBuf,
}

/// How the clients got their initial config.
#[derive(Debug, Clone, Serialize)]
pub struct InitialSync {
    /// From the first stream opened to the last client synced; `None` if
    /// not every client synced in time.
    pub all_synced_s: Option<f64>,
    /// Opening the HTTP/2 connections, before any stream.
    pub connect_s: f64,
    pub synced_clients: usize,
    pub failed_clients: usize,
    /// Clients whose initial CDS or EDS did not hold every resource.
    pub incomplete_config: usize,
    /// Encoded size of one client's initial CDS + EDS responses (mean).
    pub config_bytes_per_client: usize,
    /// Per client, from opening its stream to holding CDS and EDS.
    pub per_client: Summary,
}

/// One change round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundResult {
    pub round: usize,
    /// Wall-clock time of the catalog rename, to line up with Ferry's log.
    pub written_at_unix_ms: f64,
    /// The flipped endpoint's readiness in this round's catalog.
    pub target_ready: bool,
    pub received: usize,
    pub missed: usize,
    /// Receipts where the endpoint's health was not the new one.
    pub wrong_content: usize,
    pub latency: Summary,
}

/// Change → receipt over every round.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub measured: &'static str,
    /// clients × rounds.
    pub expected: usize,
    pub received: usize,
    pub missed: usize,
    pub wrong_content: usize,
    /// Receipts of the watched resource outside any round.
    pub stray: usize,
    pub latency: Summary,
    pub rounds: Vec<RoundResult>,
}

/// Ferry's resources. A sample is `None` when the test stopped before it.
#[derive(Debug, Clone, Serialize)]
pub struct FerryUsage {
    /// From spawn to `/readyz` 200 (the catalog parsed and translated).
    pub ready_s: f64,
    pub at_ready: ProcSample,
    pub idle_after_sync: Option<ProcSample>,
    pub after_rounds: Option<ProcSample>,
    /// After every client disconnected: what Ferry gives back.
    pub after_disconnect: Option<ProcSample>,
    /// Just before Ferry was killed, when the test was aborted.
    pub at_abort: Option<ProcSample>,
    /// The largest resident size seen (VmHWM, or the watchdog's samples).
    pub peak_rss_bytes: u64,
    /// CPU seconds Ferry spent from ready to idle after the initial sync.
    pub cpu_sync_s: Option<f64>,
    /// CPU seconds Ferry spent during the rounds.
    pub cpu_rounds_s: Option<f64>,
    /// A few of Ferry's own metrics after the rounds.
    pub metrics: Vec<String>,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub test: &'static str,
    /// The source tree measured, and the hash of the ferry binary run.
    pub commit: Option<provenance::Commit>,
    pub ferry_sha256: Option<String>,
    pub setup: Setup,
    /// Why the test stopped early (memory over the limit), if it did.
    pub aborted: Option<String>,
    pub initial_sync: InitialSync,
    pub change: Change,
    pub ferry: FerryUsage,
    /// CPU seconds of the load generator itself (it shares the machine).
    pub load_generator_cpu_s: f64,
    /// Peak resident memory of the load generator (its clients hold their
    /// own copy of the config, and tonic's per-stream read buffers).
    pub load_generator_peak_rss_bytes: u64,
    /// The first few distinct client errors.
    pub client_errors: Vec<String>,
    /// The result files written.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
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

impl Report {
    /// A short Markdown summary.
    pub fn markdown(&self) -> String {
        let s = &self.setup;
        let sync = &self.initial_sync;
        let c = &self.change;
        let f = &self.ferry;
        let mib =
            |sample: Option<ProcSample>| sample.map_or("—".to_owned(), |x| fmt_mib(x.rss_bytes));
        let secs = |v: Option<f64>| v.map_or("—".to_owned(), |x| format!("{x:.2} s"));
        let all_synced = match sync.all_synced_s {
            Some(secs) => format!("{secs:.2} s"),
            None => format!("not all: {}/{} synced", sync.synced_clients, s.clients),
        };
        let mut rows = vec![
            (
                "catalog".to_owned(),
                format!(
                    "{} services × {} clusters × {} endpoints = {} endpoints",
                    s.services, s.clusters_per_service, s.endpoints_per_backend, s.endpoints
                ),
            ),
            (
                "clients (delta ADS, wildcard CDS+EDS)".to_owned(),
                format!(
                    "{} over {} HTTP/2 connections, ≤ {} syncing at once",
                    s.clients, s.connections, s.sync_concurrency
                ),
            ),
            (
                "initial config per client (CDS + EDS)".to_owned(),
                format!("{:.0} KiB", sync.config_bytes_per_client as f64 / 1024.0),
            ),
            (
                "ferry ready (parse + translate)".to_owned(),
                format!("{:.2} s", f.ready_s),
            ),
            ("initial sync, all clients".to_owned(), all_synced),
            (
                "initial sync per client p50 / p99 / max".to_owned(),
                format!(
                    "{} / {} / {}",
                    fmt_ms(sync.per_client.p50_ms),
                    fmt_ms(sync.per_client.p99_ms),
                    fmt_ms(sync.per_client.max_ms)
                ),
            ),
            (
                format!(
                    "change → receipt p50 / p99 / max ({} rounds, incl. {} ms debounce)",
                    c.rounds.len(),
                    s.debounce_ms
                ),
                if c.latency.samples == 0 {
                    "—".to_owned()
                } else {
                    format!(
                        "{} / {} / {}",
                        fmt_ms(c.latency.p50_ms),
                        fmt_ms(c.latency.p99_ms),
                        fmt_ms(c.latency.max_ms)
                    )
                },
            ),
            (
                "updates received / missed / wrong content".to_owned(),
                format!("{} / {} / {}", c.received, c.missed, c.wrong_content),
            ),
            (
                "ferry RSS: ready / idle after sync / after rounds / clients gone / peak"
                    .to_owned(),
                format!(
                    "{} / {} / {} / {} / {}",
                    fmt_mib(f.at_ready.rss_bytes),
                    mib(f.idle_after_sync),
                    mib(f.after_rounds),
                    mib(f.after_disconnect),
                    fmt_mib(f.peak_rss_bytes)
                ),
            ),
            (
                "ferry CPU: initial sync / rounds".to_owned(),
                format!("{} / {}", secs(f.cpu_sync_s), secs(f.cpu_rounds_s)),
            ),
            (
                "load generator CPU / peak RSS (same machine)".to_owned(),
                format!(
                    "{:.2} s / {}",
                    self.load_generator_cpu_s,
                    fmt_mib(self.load_generator_peak_rss_bytes)
                ),
            ),
        ];
        if sync.failed_clients > 0 || sync.incomplete_config > 0 {
            rows.push((
                "clients failed / incomplete initial config".to_owned(),
                format!("{} / {}", sync.failed_clients, sync.incomplete_config),
            ));
        }
        if let Some(reason) = &self.aborted {
            rows.push(("**aborted**".to_owned(), reason.clone()));
        }
        rows.push((
            "commit / ferry sha256".to_owned(),
            format!(
                "{}{} / {}",
                self.commit.as_ref().map_or("unknown", |c| c.id.as_str()),
                if self.commit.as_ref().is_some_and(|c| c.dirty) {
                    " (with uncommitted changes)"
                } else {
                    ""
                },
                self.ferry_sha256.as_deref().unwrap_or("unknown")
            ),
        ));
        if let Some(at) = f.at_abort {
            rows.push((
                "ferry at abort: RSS / CPU since start".to_owned(),
                format!("{} / {:.2} s", fmt_mib(at.rss_bytes), at.cpu_seconds),
            ));
        }
        let mut out = format!(
            "### {}: {} clients × {} endpoints\n\n| metric | value |\n|---|---|\n",
            self.test, s.clients, s.endpoints
        );
        for (k, v) in rows {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        if !c.rounds.is_empty() {
            out.push_str(
                "\n| round | target ready | received | p50 | p99 | max |\n|---|---|---|---|---|---|\n",
            );
        }
        for r in &c.rounds {
            out.push_str(&format!(
                "| {} | {} | {}/{} | {} | {} | {} |\n",
                r.round,
                r.target_ready,
                r.received,
                s.clients,
                fmt_ms(r.latency.p50_ms),
                fmt_ms(r.latency.p99_ms),
                fmt_ms(r.latency.max_ms)
            ));
        }
        if !self.client_errors.is_empty() {
            out.push_str("\nClient errors (first few):\n\n");
            for e in &self.client_errors {
                out.push_str(&format!("- {e}\n"));
            }
        }
        out
    }
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
