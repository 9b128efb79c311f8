//! The results: what was run ([`Setup`]), what each peer measured
//! ([`PeerResult`]), how Ferry's proxy compares, what to read with care
//! (flags); written as JSON and as a Markdown table.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use super::backend::BackendKind;
use super::fixed_rate::FixedRate;
use super::machine::Machine;
use super::peers::PeerKind;
use super::sampling::{Cpu, ProxyCore};
use super::saturation::{Measured, Protocol};
use super::upstream::Opened;
use super::verdict::{Comparison, Verdict, ratio, targets};
use super::{MAX_BUSY_CORES, MAX_ERROR_SHARE, Pinning, TEST_NAME};
use crate::provenance::{Binary, Commit};
use crate::stats::{fmt_mib, fmt_ms};

/// What was run.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub machine: Machine,
    /// The source tree's commit; `None` outside a git work tree.
    pub commit: Option<Commit>,
    /// Every binary run: path, version, SHA-256.
    pub binaries: Vec<Binary>,
    /// Cores the machine kept busy in the second before the test started
    /// and in the second after the runs (nothing under test running then
    /// but the backend and the control plane).
    pub busy_cores_before: Option<f64>,
    pub busy_cores_after: Option<f64>,
    pub backend: BackendKind,
    /// The backend's workers (nginx processes, hyper threads).
    pub backend_workers: usize,
    /// Workers of each peer that has the setting: `ferry proxy --workers`,
    /// Envoy `--concurrency`, nginx `worker_processes`, HAProxy `nbthread`.
    pub workers: usize,
    /// The cores every peer was pinned to (a `taskset` list).
    pub proxy_cores: String,
    pub load_cores: String,
    /// Whether the backend and the load generators ran on the proxy cores
    /// too (no core was left for them): the peers' figures then include
    /// that competition.
    pub load_shares_proxy_cores: bool,
    /// Threads of `wrk` and of `h2load`.
    pub load_threads: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub h1_connections: usize,
    pub h2_connections: usize,
    pub h2_streams: usize,
    pub fixed_rate_share: f64,
    pub fixed_rate_duration_s: f64,
    pub fixed_rate_connections: usize,
    pub body_bytes: usize,
}

/// A saturation run of one peer.
#[derive(Debug, Clone, Serialize)]
pub struct Saturation {
    pub protocol: Protocol,
    pub connections: usize,
    pub streams_per_connection: usize,
    pub wall_s: f64,
    #[serde(flatten)]
    pub measured: Measured,
    pub error_share: f64,
    /// The proxy's; `None` for the backend reached directly.
    pub cpu: Option<Cpu>,
    /// Where the proxy cores' time went.
    pub proxy_core: Option<ProxyCore>,
}

/// The fixed-rate run of one peer.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    #[serde(flatten)]
    pub run: FixedRate,
    pub error_share: f64,
    pub cpu: Option<Cpu>,
    pub proxy_core: Option<ProxyCore>,
}

/// Connections a peer opened to the backend, per phase (each phase runs a
/// fresh process of the peer).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct UpstreamConnections {
    /// Warm-up, HTTP/1.1 and h2c saturation.
    pub saturation: Opened,
    pub fixed_rate: Opened,
}

/// Everything measured for one peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerResult {
    pub peer: PeerKind,
    /// From start to the first request routed to the backend.
    pub routed_after_s: Option<f64>,
    pub h1: Saturation,
    pub h2: Saturation,
    pub fixed_rate: Latency,
    /// VmRSS once configured and routing, before any load.
    pub rss_idle_bytes: Option<u64>,
    /// The largest VmRSS sampled (every 100 ms) during the runs.
    pub rss_load_bytes: Option<u64>,
    /// VmHWM at the end of the saturation phase.
    pub rss_peak_bytes: Option<u64>,
    pub upstream_connections: UpstreamConnections,
    /// Runs to read with care: errors over 1 %, a proxy not saturated.
    pub flags: Vec<String>,
}

impl PeerResult {
    /// `wrk`'s p99 in the HTTP/1.1 saturation run.
    pub fn saturation_p99_ms(&self) -> Option<f64> {
        self.h1
            .measured
            .latency_ms
            .iter()
            .find(|(name, _)| name == "p99")
            .map(|(_, ms)| *ms)
    }

    fn failed(&self) -> u64 {
        let f = &self.fixed_rate.run;
        self.h1.measured.non_2xx
            + self.h1.measured.errors
            + self.h2.measured.non_2xx
            + self.h2.measured.errors
            + (f.non_2xx + f.errors + f.unsent) as u64
    }
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub test: &'static str,
    pub label: String,
    pub setup: Setup,
    pub peers: Vec<PeerResult>,
    pub comparison: Comparison,
    pub verdict: Verdict,
    /// Every peer's flags, prefixed with the peer.
    pub flags: Vec<String>,
    /// The result files written.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
}

impl Report {
    pub fn peer(&self, kind: PeerKind) -> Option<&PeerResult> {
        self.peers.iter().find(|p| p.peer == kind)
    }

    /// Writes `<dir>/proxy_compare-<label>.{json,md}`.
    pub fn write(mut self, dir: Option<&Path>) -> anyhow::Result<Self> {
        let Some(dir) = dir else {
            return Ok(self);
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stem = format!("{TEST_NAME}-{}", self.label);
        let json = dir.join(format!("{stem}.json"));
        let md = dir.join(format!("{stem}.md"));
        let mut text = serde_json::to_string_pretty(&self)?;
        text.push('\n');
        std::fs::write(&json, text).with_context(|| format!("writing {}", json.display()))?;
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        self.files = vec![json, md];
        Ok(self)
    }
}

pub fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Http1 => "http/1.1",
        Protocol::Http2 => "h2c",
    }
}

/// What to read with care in a peer's runs. When the load shares the
/// proxy cores (by choice: the setup says so), other processes on them
/// and a proxy short of its cores are expected, not flagged.
pub fn flags(peer: &PeerResult, pinning: Pinning<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let own_cores = pinning.cores.len() as f64;
    let crowded = |core: &Option<ProxyCore>| {
        core.filter(|c| !pinning.shared && c.other_processes > MAX_BUSY_CORES)
    };
    for s in [&peer.h1, &peer.h2] {
        let name = protocol_name(s.protocol);
        if s.error_share > MAX_ERROR_SHARE {
            out.push(format!(
                "{name} saturation: {:.2} % of requests failed ({} non-2xx, {} errors)",
                s.error_share * 100.0,
                s.measured.non_2xx,
                s.measured.errors
            ));
        }
        if let Some(core) = crowded(&s.proxy_core) {
            out.push(format!(
                "{name} saturation: other processes took {:.0} % of the proxy cores",
                core.other_processes * 100.0
            ));
        }
        if let Some(cpu) = s
            .cpu
            .filter(|c| !pinning.shared && c.cores < 0.9 * own_cores)
        {
            out.push(format!(
                "{name} saturation: the proxy used {:.2} of its {own_cores} core(s): something else (the load side, or another process on its cores) set this rate",
                cpu.cores
            ));
        }
    }
    let f = &peer.fixed_rate;
    if let Some(core) = crowded(&f.proxy_core) {
        out.push(format!(
            "fixed rate: other processes took {:.0} % of the proxy cores",
            core.other_processes * 100.0
        ));
    }
    if f.error_share > MAX_ERROR_SHARE {
        out.push(format!(
            "fixed rate: {:.2} % of requests failed ({} non-2xx, {} errors, {} unsent)",
            f.error_share * 100.0,
            f.run.non_2xx,
            f.run.errors,
            f.run.unsent
        ));
    }
    if f.run.achieved_rps < 0.95 * f.run.target_rps {
        out.push(format!(
            "fixed rate: achieved {:.0} of {:.0} requests/s",
            f.run.achieved_rps, f.run.target_rps
        ));
    }
    out
}

/// One progress line for a saturation run.
pub fn saturation_line(peer: PeerKind, s: &Saturation) -> String {
    format!(
        "{:12} {:8}: {:>9.0} requests/s, {} non-2xx, {} errors{}",
        peer.name(),
        protocol_name(s.protocol),
        s.measured.rps,
        s.measured.non_2xx,
        s.measured.errors,
        cpu_note(s.cpu)
    )
}

pub fn core_note(core: Option<ProxyCore>) -> String {
    core.map_or(String::new(), |c| {
        format!(
            "             proxy cores: {:.0} % processes ({:.0} % not the proxy), {:.0} % interrupts, {:.0} % steal, {:.0} % idle",
            c.time.processes * 100.0,
            c.other_processes * 100.0,
            c.time.interrupts * 100.0,
            c.time.steal * 100.0,
            c.time.idle * 100.0
        )
    })
}

pub fn cpu_note(cpu: Option<Cpu>) -> String {
    cpu.map_or(String::new(), |c| {
        format!(
            ", proxy CPU {:.2} cores ({:.1} µs/request)",
            c.cores, c.us_per_request
        )
    })
}

fn rss(bytes: Option<u64>) -> String {
    bytes.map_or("—".to_owned(), fmt_mib)
}

fn times(x: f64) -> String {
    format!("{x:.2}×")
}

fn percent(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

fn check(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

/// `accepted (reported)`, `—` for neither.
fn opened(o: Opened) -> String {
    match (o.backend_accepted, o.peer_reported) {
        (Some(a), Some(r)) => format!("{a} ({r})"),
        (Some(a), None) => a.to_string(),
        (None, Some(r)) => format!("— ({r})"),
        (None, None) => "—".to_owned(),
    }
}

impl Report {
    /// The results as Markdown: the figures, the targets, the machine.
    pub fn markdown(&self) -> String {
        let s = &self.setup;
        let on = if s.workers == 1 {
            "one core".to_owned()
        } else {
            format!("{} workers", s.workers)
        };
        let mut out = format!(
            "### {}: Ferry's proxy, Envoy, nginx and HAProxy on {on}, {} B answers ({})\n\n",
            self.test, s.body_bytes, self.label
        );
        self.peer_table(&mut out);
        self.target_table(&mut out);
        self.setup_notes(&mut out);
        if !self.flags.is_empty() {
            out.push_str("\nFlagged (⚑):\n\n");
            for f in &self.flags {
                out.push_str(&format!("- {f}\n"));
            }
        }
        out
    }

    fn peer_table(&self, out: &mut String) {
        let direct = self.peer(PeerKind::Direct);
        out.push_str(&format!(
            "| peer | HTTP/1.1 rps | h2c rps | % of direct (h1 / h2) | p99 at saturation (h1) | p50 / p99 / p99.9 at {:.0} rps | RSS idle / load | CPU µs per request (h1 / h2) | upstream connections opened (saturation / fixed rate) | failed |\n|---|---|---|---|---|---|---|---|---|---|\n",
            self.comparison.fixed_rate_rps
        ));
        for p in &self.peers {
            let of_direct = direct.map_or("—".to_owned(), |d| {
                format!(
                    "{} / {}",
                    percent(ratio(p.h1.measured.rps, d.h1.measured.rps)),
                    percent(ratio(p.h2.measured.rps, d.h2.measured.rps))
                )
            });
            let l = &p.fixed_rate.run.latency;
            let cpu = match (p.h1.cpu, p.h2.cpu) {
                (Some(a), Some(b)) => format!("{:.1} / {:.1}", a.us_per_request, b.us_per_request),
                _ => "—".to_owned(),
            };
            out.push_str(&format!(
                "| {} | {:.0} | {:.0} | {} | {} | {} / {} / {} | {} / {} | {} | {} / {} | {}{} |\n",
                p.peer,
                p.h1.measured.rps,
                p.h2.measured.rps,
                of_direct,
                p.saturation_p99_ms().map_or("—".to_owned(), fmt_ms),
                fmt_ms(l.p50_ms),
                fmt_ms(l.p99_ms),
                fmt_ms(l.p999_ms),
                rss(p.rss_idle_bytes),
                rss(p.rss_load_bytes),
                cpu,
                opened(p.upstream_connections.saturation),
                opened(p.upstream_connections.fixed_rate),
                p.failed(),
                if p.flags.is_empty() { "" } else { " ⚑" }
            ));
        }
    }

    fn target_table(&self, out: &mut String) {
        let c = &self.comparison;
        let v = &self.verdict;
        out.push_str("\n| target (Ferry's proxy) | measured | |\n|---|---|---|\n");
        out.push_str(&format!(
            "| requests/s ≥ nginx's and HAProxy's | {} HTTP/1.1, {} h2c of the better one | {} |\n",
            times(c.h1_vs_best_peer),
            times(c.h2_vs_best_peer),
            check(v.rps_vs_nginx_haproxy)
        ));
        out.push_str(&format!(
            "| ≥ {:.0} % of direct | {} HTTP/1.1, {} h2c | {} |\n",
            targets::OF_DIRECT * 100.0,
            percent(c.h1_of_direct),
            percent(c.h2_of_direct),
            check(v.of_direct)
        ));
        out.push_str(&format!(
            "| p99 at saturation ≤ the best other proxy's | {} vs {} | {} |\n",
            fmt_ms(c.p99_saturation_ms),
            fmt_ms(c.best_p99_saturation_ms),
            check(v.p99_saturation)
        ));
        out.push_str(&format!(
            "| p99 at {:.0} rps ≤ the best other proxy's | {} vs {} | {} |\n",
            c.fixed_rate_rps,
            fmt_ms(c.p99_fixed_rate_ms),
            fmt_ms(c.best_p99_fixed_rate_ms),
            check(v.p99_fixed_rate)
        ));
        out.push_str(&format!(
            "| RSS under load ≤ ⅓ of Envoy's | {} | {} |\n",
            times(c.rss_load_vs_envoy),
            check(v.rss_vs_envoy)
        ));
    }

    fn setup_notes(&self, out: &mut String) {
        let s = &self.setup;
        let c = &self.comparison;
        let commit = s.commit.as_ref().map_or("unknown".to_owned(), |c| {
            format!("{}{}", c.id, if c.dirty { " (with changes)" } else { "" })
        });
        let n = s.workers;
        let nginx = if n == 1 {
            "`master_process off` with one worker".to_owned()
        } else {
            format!("a master and `worker_processes {n}`")
        };
        let shared = if s.load_shares_proxy_cores {
            " No core was left for them: they shared the proxy cores, so every peer's \
             figures include that competition (the direct rate too)."
        } else {
            ""
        };
        out.push_str(&format!(
            "\nCommit {commit}. Machine: {}, {} cores, {} RAM, Linux {}. Each peer ran alone, \
             pinned to cores {} (`ferry proxy --workers {n}`, `envoy --concurrency {n}`, nginx \
             {nginx}, HAProxy `nbthread {n}`); Ferry and `envoy` configured by `ferry control` \
             over delta ADS, `envoy-static` by a static config. Backend ({}, {} worker(s)) and \
             load generators on cores {}.{shared} Saturation: {} s per run after a {} s \
             warm-up, `wrk -t{} -c{}` (HTTP/1.1 keep-alive) and `h2load -t{} -c{} -m{}` (h2c); \
             fixed rate: {:.0} % of the slowest proxy's ({}) \
             HTTP/1.1 maximum, open-loop HTTP/1.1 generator, {} connections, {} s, latency \
             from each request's due time when its connection was busy. Body {} bytes. RSS: \
             VmRSS (summed over a peer's processes: nginx's master and workers), idle after \
             routing, load = largest sample (every 100 ms) during the runs. \
             Upstream connections: accepted by the backend while the peer ran (in brackets: \
             the peer's own count, Envoy `upstream_cx_total`, HAProxy `connect`, Ferry \
             `ferry_proxy_upstream_http1_connects_total`).\n",
            s.machine.cpu_model,
            s.machine.cores,
            fmt_mib(s.machine.memory_bytes),
            s.machine.kernel,
            s.proxy_cores,
            s.backend,
            s.backend_workers,
            s.load_cores,
            s.duration_s,
            s.warmup_s,
            s.load_threads,
            s.h1_connections,
            s.load_threads,
            s.h2_connections,
            s.h2_streams,
            s.fixed_rate_share * 100.0,
            c.fixed_rate_set_by.map_or("—", PeerKind::name),
            s.fixed_rate_connections,
            s.fixed_rate_duration_s,
            s.body_bytes
        ));
        out.push_str("\n| binary | version | sha256 |\n|---|---|---|\n");
        for b in &s.binaries {
            out.push_str(&format!(
                "| {} | {} | `{}` |\n",
                b.name, b.version, b.sha256
            ));
        }
    }
}
