//! What one `xds_fanout` run measured, and its Markdown summary.

use std::path::PathBuf;

use serde::Serialize;

use crate::ferry::ProcSample;
use crate::provenance;
use crate::stats::{Summary, fmt_mib, fmt_ms};

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
