//! The `kube_scale` load test: Ferry's Kubernetes source at fleet scale.
//!
//! [`run`] starts three fake Kubernetes API servers (`ferry-testkube`,
//! the real list/watch protocol over HTTPS) named "east", "west" and
//! "north", fills them with exported Services and EndpointSlices
//! ([`layout`]), writes their kubeconfigs and a catalog file holding only
//! the `kubernetes:` section, then, once per `--debounce` value, starts a
//! real `ferry control` (the [`crate::ferry`] guard) and measures
//!
//! - **initial sync**, from spawning Ferry: until `/status` shows all three
//!   clusters `connected` holding every endpoint, and until one delta-xDS
//!   client ([`crate::client::DeltaStream`]: wildcard CDS + EDS, ACKing
//!   every response, connected as soon as Ferry is ready) holds load
//!   assignments with every endpoint;
//! - **change → push**: each round flips the readiness of one endpoint in
//!   one EndpointSlice (through the API server, as a controller would) and
//!   times until the client receives that service's
//!   `ClusterLoadAssignment` (`name.namespace:port@cluster`) with the
//!   endpoint's new health. This includes the API server's watch delivery,
//!   Ferry's discovery, its `--debounce`, translation and the push;
//! - Ferry's resident memory (VmRSS) after the sync and after the rounds.
//!
//! Everything stays on loopback (the endpoint addresses in 10.0.0.0/8 are
//! data, never dialled), every wait is bounded, and each Ferry is killed
//! when its run ends, however it ends.

pub mod layout;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_proto::envoy::config::core::v3::HealthStatus;
use ferry_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use ferry_proto::type_url;
use ferry_testkube::TestKube;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::client::{DeltaStream, decode_load_assignment, endpoint_count, endpoint_health};
use crate::ferry::{self, FerryOptions, FerryProcess, ProcSample, http_get};
use crate::stats::{Summary, fmt_mib, fmt_ms};
use layout::{CLUSTERS, Layout, Objects};

/// Name of the test, in result file names.
pub const TEST_NAME: &str = "kube_scale";
/// Initial sync target, from Ferry's start.
pub const TARGET_SYNC_S: f64 = 10.0;
/// Change → push p99 target, on top of the debounce.
pub const TARGET_PUSH_P99_MS: f64 = 200.0;
/// Resident memory target.
pub const TARGET_RSS_MIB: f64 = 500.0;

const TOKEN: &str = "kube-scale-token";
const MIB: f64 = 1024.0 * 1024.0;

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `ferry` binary.
    pub ferry: PathBuf,
    /// Endpoints over the three clusters (rounded up to whole slices).
    pub endpoints: usize,
    pub endpoints_per_slice: usize,
    /// Slices of one service in one cluster.
    pub slices_per_backend: usize,
    /// Change rounds per Ferry run.
    pub rounds: usize,
    /// One Ferry run per value of its `--debounce`.
    pub debounces: Vec<Duration>,
    /// Longest wait for one change to arrive.
    pub round_timeout: Duration,
    /// Longest wait for the initial sync, from Ferry's start.
    pub sync_timeout: Duration,
    /// Longest wait for Ferry's `/readyz`.
    pub ready_timeout: Duration,
    /// How often `/status` is polled during the initial sync.
    pub status_poll: Duration,
    /// Pause after each round before the next (on top of the debounce).
    pub round_gap: Duration,
    /// `RUST_LOG` for Ferry.
    pub ferry_log: String,
    /// Where to write the JSON and Markdown results; `None`: not written.
    pub results_dir: Option<PathBuf>,
    /// Where to copy each run's Ferry log; `None`: they are discarded.
    pub keep_ferry_logs: Option<PathBuf>,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ferry: PathBuf::from("target/release/ferry"),
            endpoints: 100_000,
            endpoints_per_slice: 100,
            slices_per_backend: 1,
            rounds: 20,
            debounces: vec![Duration::from_millis(100), Duration::ZERO],
            round_timeout: Duration::from_secs(10),
            sync_timeout: Duration::from_secs(120),
            ready_timeout: Duration::from_secs(60),
            status_poll: Duration::from_millis(50),
            round_gap: Duration::from_millis(300),
            ferry_log: "info".to_owned(),
            results_dir: None,
            keep_ferry_logs: None,
            progress: false,
        }
    }
}

/// What was run.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub clusters: Vec<ClusterSetup>,
    pub services: usize,
    /// Service backends: Envoy clusters and load assignments.
    pub load_assignments: usize,
    pub slices: usize,
    pub endpoints_per_slice: usize,
    pub slices_per_backend: usize,
    pub endpoints: usize,
    pub rounds: usize,
    pub debounces_ms: Vec<f64>,
    pub status_poll_ms: f64,
    /// Creating every object through the fake API servers' Rust API.
    pub populate_s: f64,
    pub ferry_binary: PathBuf,
}

/// One fake cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSetup {
    pub name: &'static str,
    pub services: usize,
    pub slices: usize,
    pub endpoints: usize,
}

/// How Ferry got from start to serving every endpoint. Times are from
/// spawning the process; `None`: not reached within the sync timeout.
#[derive(Debug, Clone, Serialize)]
pub struct InitialSync {
    /// `/readyz` 200 (the catalog file loaded and translated).
    pub ready_s: f64,
    /// Per cluster: `/status` shows it connected with all its endpoints.
    pub cluster_synced_s: BTreeMap<String, Option<f64>>,
    /// Every cluster synced on `/status` (to within one poll interval).
    pub status_synced_s: Option<f64>,
    /// The xDS client holds load assignments with every endpoint.
    pub xds_synced_s: Option<f64>,
    /// What the xDS client held at the end of the sync phase.
    pub xds_clusters: usize,
    pub xds_load_assignments: usize,
    pub xds_endpoints: usize,
    /// EDS responses the client got until synced (or the timeout).
    pub eds_responses: usize,
    pub status_errors: usize,
}

/// One change round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundResult {
    pub round: usize,
    pub cluster: &'static str,
    pub slice: String,
    pub endpoint: String,
    /// The endpoint's readiness after the flip.
    pub ready: bool,
    pub load_assignment: String,
    /// `None`: the update did not arrive within the round timeout.
    pub latency_ms: Option<f64>,
    /// Receipts of the load assignment with the old health first.
    pub stale_receipts: usize,
}

/// Change → push over every round of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub measured: &'static str,
    pub expected: usize,
    pub received: usize,
    pub missed: usize,
    pub latency: Summary,
    /// EDS responses for other load assignments during the rounds.
    pub other_eds_updates: usize,
    pub rounds: Vec<RoundResult>,
}

/// Ferry's resources in one run.
#[derive(Debug, Clone, Serialize)]
pub struct FerryUsage {
    pub at_ready: ProcSample,
    /// Two seconds after the initial sync.
    pub after_sync: ProcSample,
    /// Two seconds after the last round.
    pub after_rounds: ProcSample,
    /// CPU seconds from ready to idle after the initial sync.
    pub cpu_sync_s: f64,
    pub cpu_rounds_s: f64,
    /// A few of Ferry's own metrics at the end.
    pub metrics: Vec<String>,
}

/// The targets, checked for one run.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Both sync times under [`TARGET_SYNC_S`].
    pub initial_sync: bool,
    /// p99 under [`TARGET_PUSH_P99_MS`] plus the debounce, nothing missed.
    pub change_p99: bool,
    /// VmRSS after sync and after the rounds under [`TARGET_RSS_MIB`].
    pub rss: bool,
}

/// One Ferry process, at one `--debounce`.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub debounce_ms: f64,
    pub initial_sync: InitialSync,
    pub change: Change,
    pub ferry: FerryUsage,
    pub verdict: Verdict,
    /// The first few distinct errors (xDS stream, `/status`).
    pub errors: Vec<String>,
}

/// The targets compared against.
#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    pub initial_sync_s: f64,
    pub change_p99_ms_plus_debounce: f64,
    pub rss_mib: f64,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub test: &'static str,
    pub setup: Setup,
    pub targets: Targets,
    pub runs: Vec<Run>,
    /// CPU seconds of this process (fake API servers and xDS client).
    pub load_generator_cpu_s: f64,
    /// The result files written.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
}

impl Report {
    /// Whether every update of every run arrived.
    pub fn all_received(&self) -> bool {
        self.runs.iter().all(|r| r.change.missed == 0)
    }
}

/// Runs the `kube_scale` load test and writes its results.
pub async fn run(config: Config) -> anyhow::Result<Report> {
    anyhow::ensure!(
        !config.debounces.is_empty(),
        "at least one --debounce is needed"
    );
    ferry::check_binary(&config.ferry)?;
    let layout = Layout::for_endpoints(
        config.endpoints,
        config.endpoints_per_slice,
        config.slices_per_backend,
    )?;
    let progress = |msg: String| {
        if config.progress {
            eprintln!("[{TEST_NAME}] {msg}");
        }
    };

    ferry_testkube::install_crypto_provider();
    let objects_total = layout.slices + layout.backends();
    let options = ferry_testkube::Options {
        // Every object and every flip stays in the watch history.
        history_limit: (objects_total + config.rounds * config.debounces.len() + 1_000).max(10_000),
        ..ferry_testkube::Options::default()
    };
    let mut kubes = Vec::with_capacity(CLUSTERS.len());
    for _ in CLUSTERS {
        let kube = TestKube::try_start_with(TOKEN, options.clone())
            .await
            .context("starting a fake API server")?;
        kubes.push(kube);
    }
    let mut objects = Objects::new(layout);
    let populate_started = Instant::now();
    objects.populate(&kubes);
    let populate_s = populate_started.elapsed().as_secs_f64();
    let clusters: Vec<ClusterSetup> = CLUSTERS
        .iter()
        .enumerate()
        .map(|(c, name)| ClusterSetup {
            name,
            services: layout.services_in(c),
            slices: layout.slices_in(c),
            endpoints: layout.slices_in(c) * layout.endpoints_per_slice,
        })
        .collect();
    progress(format!(
        "{} endpoints in {} slices of {}, {} services x 3 clusters ({} load assignments), created in {populate_s:.2} s",
        layout.endpoints(),
        layout.slices,
        layout.endpoints_per_slice,
        layout.services(),
        layout.backends()
    ));

    let dir = tempfile::Builder::new()
        .prefix("ferry-kube-scale-")
        .tempdir()
        .context("creating a temporary directory")?;
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(&catalog, catalog_yaml(dir.path(), &kubes)?)
        .with_context(|| format!("writing {}", catalog.display()))?;

    let mut runs = Vec::with_capacity(config.debounces.len());
    for (i, debounce) in config.debounces.iter().enumerate() {
        let run = RunContext {
            config: &config,
            debounce: *debounce,
            clusters: &clusters,
            catalog: &catalog,
            dir: dir.path(),
            round_offset: i * config.rounds,
        };
        runs.push(run.execute(&mut objects, &kubes).await?);
    }

    let load_generator_cpu_s = ferry::sample_process(std::process::id())
        .map(|s| s.cpu_seconds)
        .unwrap_or(0.0);
    let report = Report {
        test: TEST_NAME,
        setup: Setup {
            clusters,
            services: layout.services(),
            load_assignments: layout.backends(),
            slices: layout.slices,
            endpoints_per_slice: layout.endpoints_per_slice,
            slices_per_backend: layout.slices_per_backend,
            endpoints: layout.endpoints(),
            rounds: config.rounds,
            debounces_ms: config.debounces.iter().map(|d| ms(*d)).collect(),
            status_poll_ms: ms(config.status_poll),
            populate_s,
            ferry_binary: config.ferry.clone(),
        },
        targets: Targets {
            initial_sync_s: TARGET_SYNC_S,
            change_p99_ms_plus_debounce: TARGET_PUSH_P99_MS,
            rss_mib: TARGET_RSS_MIB,
        },
        runs,
        load_generator_cpu_s,
        files: Vec::new(),
    };
    drop(kubes);
    write_results(report, config.results_dir.as_deref())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The catalog file: only the `kubernetes:` section, with a kubeconfig per
/// cluster written beside it.
fn catalog_yaml(dir: &Path, kubes: &[TestKube]) -> anyhow::Result<String> {
    let mut yaml = String::from("kubernetes:\n  clusters:\n");
    for (name, kube) in CLUSTERS.iter().zip(kubes) {
        let path = dir.join(format!("{name}.kubeconfig"));
        kube.kubeconfig(&path, name, None)
            .with_context(|| format!("writing {}", path.display()))?;
        yaml.push_str(&format!(
            "    - {{name: {name}, kubeconfig: \"{}\"}}\n",
            path.display()
        ));
    }
    Ok(yaml)
}

/// What the xDS client task tells the coordinator.
#[derive(Debug)]
enum XdsEvent {
    Response {
        at: Instant,
        eds: bool,
        /// Upserted names, with the decoded load assignment for EDS.
        upserted: Vec<(String, Option<ClusterLoadAssignment>)>,
        removed: Vec<String>,
    },
    Ended(Option<String>),
}

/// Runs one delta-xDS client (wildcard CDS + EDS) until `cancel` or the
/// stream ends; always sends one [`XdsEvent::Ended`] last.
async fn xds_client(
    channel: Channel,
    events: mpsc::UnboundedSender<XdsEvent>,
    cancel: CancellationToken,
) {
    let session = async {
        let mut stream = DeltaStream::open_wildcard(
            channel,
            "kube-scale".to_owned(),
            &[type_url::CLUSTER, type_url::ENDPOINT],
        )
        .await?;
        while let Some((at, response)) = stream.next().await? {
            let eds = response.type_url == type_url::ENDPOINT;
            if !eds && response.type_url != type_url::CLUSTER {
                continue;
            }
            let upserted = response
                .resources
                .iter()
                .map(|r| {
                    (
                        r.name.clone(),
                        eds.then(|| decode_load_assignment(r)).flatten(),
                    )
                })
                .collect();
            let event = XdsEvent::Response {
                at,
                eds,
                upserted,
                removed: response.removed_resources,
            };
            if events.send(event).is_err() {
                return Ok(());
            }
        }
        anyhow::bail!("the server ended the stream")
    };
    let error = tokio::select! {
        _ = cancel.cancelled() => None,
        result = session => result.err().map(|e| format!("xds client: {e:#}")),
    };
    let _ = events.send(XdsEvent::Ended(error));
}

/// What the client holds.
#[derive(Debug, Default)]
struct XdsView {
    clusters: HashSet<String>,
    load_assignments: HashMap<String, usize>,
    endpoints: usize,
    eds_responses: usize,
    undecodable: usize,
}

impl XdsView {
    fn apply(
        &mut self,
        eds: bool,
        upserted: &[(String, Option<ClusterLoadAssignment>)],
        removed: &[String],
    ) {
        if !eds {
            for name in removed {
                self.clusters.remove(name);
            }
            self.clusters
                .extend(upserted.iter().map(|(name, _)| name.clone()));
            return;
        }
        self.eds_responses += 1;
        for name in removed {
            self.endpoints -= self.load_assignments.remove(name).unwrap_or(0);
        }
        for (name, cla) in upserted {
            let count = match cla {
                Some(cla) => endpoint_count(cla),
                None => {
                    self.undecodable += 1;
                    0
                }
            };
            let old = self.load_assignments.insert(name.clone(), count);
            self.endpoints = self.endpoints - old.unwrap_or(0) + count;
        }
    }

    fn complete(&self, layout: &Layout) -> bool {
        self.endpoints == layout.endpoints()
            && self.load_assignments.len() == layout.backends()
            && self.clusters.len() == layout.backends()
    }
}

/// Per cluster: (health, endpoints) as `/status` shows them.
fn kube_status(status: &serde_json::Value) -> HashMap<String, (String, u64)> {
    status["catalog"]["kubernetes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                c["cluster"].as_str()?.to_owned(),
                (
                    c["health"].as_str().unwrap_or_default().to_owned(),
                    c["endpoints"].as_u64().unwrap_or(0),
                ),
            ))
        })
        .collect()
}

/// The first few distinct errors.
#[derive(Debug, Default)]
struct Errors(Vec<String>);

impl Errors {
    fn note(&mut self, error: String) {
        if self.0.len() < 5 && !self.0.contains(&error) {
            self.0.push(error);
        }
    }
}

struct RunContext<'a> {
    config: &'a Config,
    debounce: Duration,
    clusters: &'a [ClusterSetup],
    catalog: &'a Path,
    dir: &'a Path,
    round_offset: usize,
}

impl RunContext<'_> {
    fn progress(&self, msg: String) {
        if self.config.progress {
            eprintln!(
                "[{TEST_NAME} debounce {}] {msg}",
                humantime::format_duration(self.debounce)
            );
        }
    }

    async fn execute(&self, objects: &mut Objects, kubes: &[TestKube]) -> anyhow::Result<Run> {
        let config = self.config;
        let layout = objects.layout;
        let label = format!("debounce-{}ms", self.debounce.as_millis());
        let log_file = self.dir.join(format!("ferry-{label}.log"));
        let spawned = Instant::now();
        let mut ferry = FerryProcess::spawn(&FerryOptions {
            binary: config.ferry.clone(),
            catalog: self.catalog.to_owned(),
            debounce: self.debounce,
            listener_addr: ferry::UNBOUND_LISTENER,
            log_filter: config.ferry_log.clone(),
            log_file: log_file.clone(),
            extra_args: Vec::new(),
        })?;
        ferry.wait_ready(config.ready_timeout).await?;
        let ready_s = spawned.elapsed().as_secs_f64();
        let at_ready = ferry.sample()?;
        self.progress(format!(
            "ferry pid {} ready after {ready_s:.2} s (xds {}, admin {})",
            ferry.pid, ferry.xds_addr, ferry.admin_addr
        ));

        let channel = Endpoint::from_shared(format!("http://{}", ferry.xds_addr))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let channel = tokio::time::timeout(Duration::from_secs(10), channel.connect())
            .await
            .context("connecting to ferry timed out")?
            .context("connecting to ferry")?;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let client = tokio::spawn(xds_client(channel, events_tx, cancel.clone()));
        // Stops the client however this run ends.
        let _stop_client = cancel.clone().drop_guard();

        let mut view = XdsView::default();
        let mut errors = Errors::default();
        let mut stream_ended = false;

        // Initial sync.
        let deadline = tokio::time::Instant::from_std(spawned + config.sync_timeout);
        let mut cluster_synced: BTreeMap<String, Option<f64>> =
            CLUSTERS.iter().map(|c| ((*c).to_owned(), None)).collect();
        let mut status_synced = None;
        let mut xds_synced = None;
        let mut status_errors = 0;
        let mut poll = tokio::time::interval(config.status_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while status_synced.is_none() || xds_synced.is_none() {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                event = events.recv() => match event {
                    Some(XdsEvent::Response { at, eds, upserted, removed }) => {
                        view.apply(eds, &upserted, &removed);
                        if xds_synced.is_none() && view.complete(&layout) {
                            xds_synced = Some(at.saturating_duration_since(spawned).as_secs_f64());
                            self.progress(format!(
                                "xds client holds all {} endpoints after {:.2} s ({} EDS responses)",
                                view.endpoints,
                                xds_synced.unwrap_or_default(),
                                view.eds_responses
                            ));
                        }
                    }
                    ended => {
                        errors.note(end_message(ended));
                        stream_ended = true;
                        break;
                    }
                },
                _ = poll.tick(), if status_synced.is_none() => {
                    anyhow::ensure!(
                        ferry.is_running(),
                        "ferry died during the initial sync; its log ends with:\n{}",
                        ferry.log_tail(20)
                    );
                    let status = match http_get(ferry.admin_addr, "/status").await {
                        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                            .map_err(|e| format!("/status: {e}")),
                        Ok((code, _)) => Err(format!("/status answered {code}")),
                        Err(e) => Err(format!("{e:#}")),
                    };
                    let at = spawned.elapsed().as_secs_f64();
                    match status {
                        Ok(status) => {
                            let kube = kube_status(&status);
                            for (c, setup) in self.clusters.iter().enumerate() {
                                let synced = kube.get(CLUSTERS[c]).is_some_and(|(health, endpoints)| {
                                    health == "connected" && *endpoints == setup.endpoints as u64
                                });
                                let slot = cluster_synced.entry(CLUSTERS[c].to_owned()).or_default();
                                if synced && slot.is_none() {
                                    *slot = Some(at);
                                    self.progress(format!("{} synced on /status after {at:.2} s", CLUSTERS[c]));
                                }
                            }
                            if cluster_synced.values().all(Option::is_some) {
                                status_synced = Some(at);
                            }
                        }
                        Err(e) => {
                            status_errors += 1;
                            errors.note(e);
                        }
                    }
                },
            }
        }
        let initial_sync = InitialSync {
            ready_s,
            cluster_synced_s: cluster_synced,
            status_synced_s: status_synced,
            xds_synced_s: xds_synced,
            xds_clusters: view.clusters.len(),
            xds_load_assignments: view.load_assignments.len(),
            xds_endpoints: view.endpoints,
            eds_responses: view.eds_responses,
            status_errors,
        };
        self.progress(format!(
            "initial sync: status {}, xds {} (client holds {} endpoints in {} load assignments)",
            secs(status_synced),
            secs(xds_synced),
            view.endpoints,
            view.load_assignments.len()
        ));

        let settle = Duration::from_secs(2);
        if !stream_ended {
            stream_ended = drain(&mut events, &mut view, &mut errors, settle).await;
        }
        anyhow::ensure!(
            ferry.is_running(),
            "ferry died after the initial sync; its log ends with:\n{}",
            ferry.log_tail(20)
        );
        let after_sync = ferry.sample()?;
        self.progress(format!("RSS after sync {}", fmt_mib(after_sync.rss_bytes)));

        // Change rounds.
        let mut rounds = Vec::with_capacity(config.rounds);
        let mut latencies = Vec::with_capacity(config.rounds);
        let mut other_eds_updates = 0;
        for r in 0..config.rounds {
            let round = self.round_offset + r;
            let started = Instant::now();
            let flip = objects.flip(kubes, round);
            let wanted = if flip.ready {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            };
            let ip = flip.ip.to_string();
            let deadline = tokio::time::Instant::from_std(started + config.round_timeout);
            let mut latency = None;
            let mut stale_receipts = 0;
            while latency.is_none() && !stream_ended {
                let Ok(event) = tokio::time::timeout_at(deadline, events.recv()).await else {
                    break;
                };
                match event {
                    Some(XdsEvent::Response {
                        at,
                        eds,
                        upserted,
                        removed,
                    }) => {
                        view.apply(eds, &upserted, &removed);
                        if !eds {
                            continue;
                        }
                        for (name, cla) in &upserted {
                            if *name != flip.load_assignment {
                                other_eds_updates += 1;
                                continue;
                            }
                            let health = cla.as_ref().and_then(|c| endpoint_health(c, &ip));
                            if health == Some(wanted) {
                                latency = Some(at.saturating_duration_since(started));
                            } else {
                                stale_receipts += 1;
                            }
                        }
                    }
                    ended => {
                        errors.note(end_message(ended));
                        stream_ended = true;
                    }
                }
            }
            let result = RoundResult {
                round: r + 1,
                cluster: CLUSTERS[flip.place.cluster],
                slice: layout::slice_name(flip.place),
                endpoint: ip,
                ready: flip.ready,
                load_assignment: flip.load_assignment,
                latency_ms: latency.map(ms),
                stale_receipts,
            };
            self.progress(format!(
                "round {}: {} {} in {} ready={} -> {}",
                result.round,
                result.cluster,
                result.endpoint,
                result.slice,
                result.ready,
                result.latency_ms.map_or("missed".to_owned(), fmt_ms)
            ));
            latencies.extend(latency);
            rounds.push(result);
            if !stream_ended {
                // Let this change settle before the next (no coalescing).
                stream_ended = drain(
                    &mut events,
                    &mut view,
                    &mut errors,
                    self.debounce + config.round_gap,
                )
                .await;
            }
        }

        if !stream_ended {
            drain(&mut events, &mut view, &mut errors, settle).await;
        }
        anyhow::ensure!(
            ferry.is_running(),
            "ferry died during the change rounds; its log ends with:\n{}",
            ferry.log_tail(20)
        );
        let after_rounds = ferry.sample()?;
        let metrics = ferry
            .metrics(&[
                "ferry_xds_translate_duration_seconds",
                "ferry_xds_push_latency_seconds",
                "ferry_xds_services_translated_total",
                "ferry_xds_pushes_total",
                "ferry_xds_nacks_total",
                "ferry_xds_snapshot_version",
                "ferry_discovery_catalog_version",
                "ferry_discovery_cluster_endpoints",
                "ferry_discovery_watch_errors_total",
            ])
            .await
            .unwrap_or_else(|e| vec![format!("metrics unavailable: {e:#}")]);
        if view.endpoints != layout.endpoints() {
            errors.note(format!(
                "the client held {} endpoints after the rounds, not {}",
                view.endpoints,
                layout.endpoints()
            ));
        }
        if view.undecodable > 0 {
            errors.note(format!(
                "{} load assignments did not decode",
                view.undecodable
            ));
        }
        cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), client).await;
        drop(ferry);
        if let Some(keep) = &config.keep_ferry_logs {
            std::fs::create_dir_all(keep)
                .with_context(|| format!("creating {}", keep.display()))?;
            let to = keep.join(format!("{TEST_NAME}-{}e-{label}.log", layout.endpoints()));
            std::fs::copy(&log_file, &to)
                .with_context(|| format!("copying ferry's log to {}", to.display()))?;
        }

        let received = latencies.len();
        let change = Change {
            measured: "from applying the EndpointSlice on the fake API server to the delta-xDS client's receipt of the ClusterLoadAssignment with the endpoint's new health; includes watch delivery, ferry's discovery, its --debounce, translation and the push",
            expected: config.rounds,
            received,
            missed: config.rounds - received,
            latency: Summary::of(&latencies),
            other_eds_updates,
            rounds,
        };
        let debounce_ms = ms(self.debounce);
        let rss_mib = |s: &ProcSample| s.rss_bytes as f64 / MIB;
        let verdict = Verdict {
            initial_sync: [initial_sync.status_synced_s, initial_sync.xds_synced_s]
                .iter()
                .all(|s| s.is_some_and(|s| s < TARGET_SYNC_S)),
            change_p99: change.missed == 0
                && change.latency.p99_ms < TARGET_PUSH_P99_MS + debounce_ms,
            rss: rss_mib(&after_sync) < TARGET_RSS_MIB && rss_mib(&after_rounds) < TARGET_RSS_MIB,
        };
        Ok(Run {
            debounce_ms,
            initial_sync,
            change,
            ferry: FerryUsage {
                at_ready,
                after_sync,
                after_rounds,
                cpu_sync_s: after_sync.cpu_seconds - at_ready.cpu_seconds,
                cpu_rounds_s: after_rounds.cpu_seconds - after_sync.cpu_seconds,
                metrics,
            },
            verdict,
            errors: errors.0,
        })
    }
}

/// Applies client events for `period`; returns whether the stream ended.
async fn drain(
    events: &mut mpsc::UnboundedReceiver<XdsEvent>,
    view: &mut XdsView,
    errors: &mut Errors,
    period: Duration,
) -> bool {
    let until = tokio::time::Instant::now() + period;
    while let Ok(event) = tokio::time::timeout_at(until, events.recv()).await {
        match event {
            Some(XdsEvent::Response {
                eds,
                upserted,
                removed,
                ..
            }) => view.apply(eds, &upserted, &removed),
            ended => {
                errors.note(end_message(ended));
                return true;
            }
        }
    }
    false
}

/// Why the client stopped, from its last event.
fn end_message(event: Option<XdsEvent>) -> String {
    match event {
        Some(XdsEvent::Ended(Some(error))) => error,
        _ => "the xds client stopped".to_owned(),
    }
}

fn secs(s: Option<f64>) -> String {
    s.map_or("not reached".to_owned(), |s| format!("{s:.2} s"))
}

fn write_results(mut report: Report, dir: Option<&Path>) -> anyhow::Result<Report> {
    let Some(dir) = dir else {
        return Ok(report);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = format!("{TEST_NAME}-{}e", report.setup.endpoints);
    let json = dir.join(format!("{stem}.json"));
    let md = dir.join(format!("{stem}.md"));
    let mut text = serde_json::to_string_pretty(&report)?;
    text.push('\n');
    std::fs::write(&json, text).with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(&md, report.markdown()).with_context(|| format!("writing {}", md.display()))?;
    report.files = vec![json, md];
    Ok(report)
}

fn check(ok: bool) -> &'static str {
    if ok { "✅" } else { "❌" }
}

impl Report {
    /// A short Markdown summary: one column per Ferry run.
    pub fn markdown(&self) -> String {
        let s = &self.setup;
        let mut out = format!(
            "### {}: {} endpoints in 3 clusters\n\n\
             {} exported services × 3 clusters ({} load assignments), {} EndpointSlices of {} endpoints \
             ({} per service and cluster); per cluster: {}. Objects created in {:.2} s. \
             `/status` polled every {} ms during the sync.\n\n",
            self.test,
            s.endpoints,
            s.services,
            s.load_assignments,
            s.slices,
            s.endpoints_per_slice,
            s.slices_per_backend,
            s.clusters
                .iter()
                .map(|c| format!(
                    "{} {} services / {} endpoints",
                    c.name, c.services, c.endpoints
                ))
                .collect::<Vec<_>>()
                .join(", "),
            s.populate_s,
            s.status_poll_ms,
        );
        out.push_str("| metric | target |");
        for r in &self.runs {
            out.push_str(&format!(" debounce {} ms |", r.debounce_ms));
        }
        out.push_str("\n|---|---|");
        for _ in &self.runs {
            out.push_str("---|");
        }
        out.push('\n');
        let mut row = |name: &str, target: &str, cell: &dyn Fn(&Run) -> String| {
            out.push_str(&format!("| {name} | {target} |"));
            for r in &self.runs {
                out.push_str(&format!(" {} |", cell(r)));
            }
            out.push('\n');
        };
        let t = &self.targets;
        row("ferry ready (/readyz)", "", &|r| {
            format!("{:.2} s", r.initial_sync.ready_s)
        });
        row(
            "all clusters connected with every endpoint (/status)",
            &format!("< {} s", t.initial_sync_s),
            &|r| {
                format!(
                    "{} {}",
                    secs(r.initial_sync.status_synced_s),
                    check(
                        r.initial_sync
                            .status_synced_s
                            .is_some_and(|x| x < t.initial_sync_s)
                    )
                )
            },
        );
        row(
            "xDS client holds every endpoint",
            &format!("< {} s", t.initial_sync_s),
            &|r| {
                format!(
                    "{} {} ({} EDS responses)",
                    secs(r.initial_sync.xds_synced_s),
                    check(
                        r.initial_sync
                            .xds_synced_s
                            .is_some_and(|x| x < t.initial_sync_s)
                    ),
                    r.initial_sync.eds_responses
                )
            },
        );
        row("per cluster synced (/status)", "", &|r| {
            r.initial_sync
                .cluster_synced_s
                .iter()
                .map(|(c, s)| format!("{c} {}", secs(*s)))
                .collect::<Vec<_>>()
                .join(", ")
        });
        row(
            "change → push p50 / p99 / max",
            &format!("p99 < {} ms + debounce", t.change_p99_ms_plus_debounce),
            &|r| {
                let l = &r.change.latency;
                format!(
                    "{} / {} / {} {}",
                    fmt_ms(l.p50_ms),
                    fmt_ms(l.p99_ms),
                    fmt_ms(l.max_ms),
                    check(r.verdict.change_p99)
                )
            },
        );
        row("updates received / rounds", "all", &|r| {
            format!("{} / {}", r.change.received, r.change.expected)
        });
        row(
            "ferry RSS after sync / after rounds",
            &format!("< {} MiB", t.rss_mib),
            &|r| {
                format!(
                    "{} / {} {}",
                    fmt_mib(r.ferry.after_sync.rss_bytes),
                    fmt_mib(r.ferry.after_rounds.rss_bytes),
                    check(r.verdict.rss)
                )
            },
        );
        row("ferry peak RSS (VmHWM)", "", &|r| {
            fmt_mib(r.ferry.after_rounds.peak_rss_bytes)
        });
        row("ferry CPU: initial sync / rounds", "", &|r| {
            format!(
                "{:.2} s / {:.2} s",
                r.ferry.cpu_sync_s, r.ferry.cpu_rounds_s
            )
        });
        out.push_str(&format!(
            "\nLoad generator (fake API servers + xDS client, same machine): {:.2} s CPU.\n\
             Change → push is timed from applying the EndpointSlice to the client's receipt of the \
             updated ClusterLoadAssignment; it includes the watch delivery and ferry's --debounce.\n",
            self.load_generator_cpu_s
        ));
        for r in &self.runs {
            out.push_str(&format!(
                "\n#### Rounds, debounce {} ms\n\n| round | cluster | slice | endpoint | ready | latency |\n|---|---|---|---|---|---|\n",
                r.debounce_ms
            ));
            for x in &r.change.rounds {
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} |\n",
                    x.round,
                    x.cluster,
                    x.slice,
                    x.endpoint,
                    x.ready,
                    x.latency_ms.map_or("missed".to_owned(), fmt_ms)
                ));
            }
            if !r.errors.is_empty() {
                out.push_str("\nErrors (first few):\n\n");
                for e in &r.errors {
                    out.push_str(&format!("- {e}\n"));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::envoy::config::endpoint::v3::{LbEndpoint, LocalityLbEndpoints};

    fn cla(endpoints: usize) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            cluster_name: "x".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint::default(); endpoints],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_view_counts_endpoints_through_deltas() {
        let layout = Layout::for_endpoints(300, 100, 1).unwrap();
        let mut view = XdsView::default();
        let names: Vec<String> = (0..3).map(|i| format!("c{i}")).collect();
        view.apply(
            false,
            &names.iter().map(|n| (n.clone(), None)).collect::<Vec<_>>(),
            &[],
        );
        view.apply(
            true,
            &names
                .iter()
                .map(|n| (n.clone(), Some(cla(100))))
                .collect::<Vec<_>>(),
            &[],
        );
        assert!(view.complete(&layout));
        view.apply(true, &[("c1".into(), Some(cla(99)))], &[]);
        assert_eq!(view.endpoints, 299);
        assert!(!view.complete(&layout));
        view.apply(true, &[], &["c2".into()]);
        assert_eq!((view.endpoints, view.load_assignments.len()), (199, 2));
        view.apply(true, &[("c9".into(), None)], &[]);
        assert_eq!(view.undecodable, 1);
    }

    #[test]
    fn reads_cluster_health_from_status() {
        let status = serde_json::json!({"catalog": {"kubernetes": [
            {"cluster": "east", "health": "connected", "endpoints": 5},
            {"cluster": "west", "health": "connecting", "endpoints": 0},
        ]}});
        let k = kube_status(&status);
        assert_eq!(k["east"], ("connected".to_owned(), 5));
        assert_eq!(k["west"].0, "connecting");
        assert!(kube_status(&serde_json::json!({})).is_empty());
    }
}
