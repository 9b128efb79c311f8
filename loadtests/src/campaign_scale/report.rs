//! What one `campaign_scale` run measured, and its Markdown summary.

use super::*;

/// What was run.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub services: usize,
    pub concurrency: usize,
    pub proxies: usize,
    pub steps: Vec<f64>,
    pub bake_ms: f64,
    pub min_requests: u64,
    pub drain_ms: f64,
    pub ack_timeout_s: f64,
    pub data_timeout_s: f64,
    pub report_interval_ms: f64,
    pub requests_per_report: u64,
    pub campaign_timeout_s: f64,
    pub ferry_binary: PathBuf,
    pub command: Option<String>,
    /// Cores the machine offers, and its load average when the run began.
    pub cores: usize,
    pub loadavg_at_start: String,
}

/// How the campaign ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The campaign's last state (DONE, HALTED, ABORTED, or RUNNING when
    /// the wait timed out).
    pub state: String,
    pub reason: String,
    pub timed_out: bool,
    /// Services in the campaign, and how many ended in each state.
    pub services: usize,
    pub done: u32,
    pub rolled_back: u32,
    pub skipped: u32,
    pub queued: u32,
    pub in_flight: u32,
    /// From the campaign's creation to its end (Ferry's own timestamps),
    /// or to the last poll when it did not end.
    pub wall_s: f64,
    /// Finished services per minute over `wall_s`.
    pub services_per_minute: f64,
    /// Ferry's own services-per-minute figure at the end.
    pub ferry_per_minute: f64,
    /// Services not done, with their state and reason (first few).
    pub not_done: Vec<String>,
    /// Migrations still in flight at the end, by stage/phase.
    pub in_flight_by_stage: BTreeMap<String, usize>,
    /// What some of them were waiting for (first few, distinct).
    pub waiting: Vec<String>,
}

impl Outcome {
    /// Whether the campaign ended DONE with every service done.
    pub fn completed(&self) -> bool {
        self.state == "DONE" && self.done as usize == self.services
    }
}

/// Per-migration times, from `ListMigrations`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationTimes {
    /// Migrations listed, and how many ended DONE.
    pub listed: usize,
    pub done: usize,
    /// Created → ended (`updated_at`) of DONE migrations.
    pub duration: Summary,
    /// Gate results recorded over every listed migration.
    pub gate_results: usize,
    /// Where the time of a DONE migration goes, from its gate results'
    /// times: creation → the first step's gate passed (validate, pin,
    /// double deploy, ACK, bake, enough data), then each later step's
    /// gate (ACK, bake, and at the last step the sources' quiet time),
    /// then the last gate → DONE (cleanup, drain, unpin).
    pub phases: Vec<(String, Summary)>,
}

/// [`MigrationTimes::phases`] of the DONE migrations in `done`.
pub(super) fn phases(done: &[&Migration]) -> Vec<(String, Summary)> {
    let ms = |from: i64, to: i64| Duration::from_millis(to.saturating_sub(from).max(0) as u64);
    let steps = done.iter().map(|m| m.gates.len()).max().unwrap_or(0);
    let mut out = Vec::new();
    for step in 0..steps {
        let spans: Vec<Duration> = done
            .iter()
            .filter_map(|m| {
                let at = m.gates.get(step)?.at_unix_ms;
                let from = match step {
                    0 => m.created_at_unix_ms,
                    n => m.gates.get(n - 1)?.at_unix_ms,
                };
                Some(ms(from, at))
            })
            .collect();
        let label = if step == 0 {
            "created → step 1 gate passed".to_owned()
        } else {
            format!("step {step} → step {} gate passed", step + 1)
        };
        out.push((label, Summary::of(&spans)));
    }
    let ends: Vec<Duration> = done
        .iter()
        .filter_map(|m| Some(ms(m.gates.last()?.at_unix_ms, m.updated_at_unix_ms)))
        .collect();
    if !ends.is_empty() {
        out.push(("last gate → DONE".to_owned(), Summary::of(&ends)));
    }
    out
}

/// A Prometheus histogram as scraped: cumulative buckets, sum and count.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Histogram {
    /// (upper bound, cumulative count), in the page's order.
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// The unlabelled histogram `name` in a Prometheus text page; `None`
    /// if the page has no `name_count`.
    pub fn parse(page: &str, name: &str) -> Option<Self> {
        let (bucket, sum, count) = (
            format!("{name}_bucket"),
            format!("{name}_sum"),
            format!("{name}_count"),
        );
        let mut h = Self::default();
        let mut seen = false;
        for line in page.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let metric = series.split('{').next().unwrap_or(series).trim();
            if metric == bucket {
                let Some(le) = series
                    .split_once("le=\"")
                    .and_then(|(_, rest)| rest.split_once('"'))
                    .map(|(le, _)| le)
                else {
                    continue;
                };
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    match le.parse() {
                        Ok(b) => b,
                        Err(_) => continue,
                    }
                };
                h.buckets.push((bound, value));
            } else if metric == sum {
                h.sum = value;
            } else if metric == count {
                h.count = value;
                seen = true;
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        seen.then_some(h)
    }

    /// What was recorded between `earlier` and `self`.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before: BTreeMap<u64, f64> = earlier
            .buckets
            .iter()
            .map(|(b, c)| (b.to_bits(), *c))
            .collect();
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(b, c)| (*b, c - before.get(&b.to_bits()).copied().unwrap_or(0.0)))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The mean observation; `None` without any.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The upper bound of the bucket holding quantile `q`: the smallest
    /// bound with at least `q` of the observations at or under it
    /// (infinite past the last finite bucket); `None` without any.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let wanted = q * self.count;
        self.buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= wanted)
            .map(|(bound, _)| *bound)
            .or(Some(f64::INFINITY))
    }
}

/// The engine's cost over the campaign.
#[derive(Debug, Clone, Serialize)]
pub struct EngineCost {
    /// Passes over the active migrations and campaigns.
    pub ticks: u64,
    pub mean_ms: Option<f64>,
    /// Upper bound of the bucket holding the 99th percentile.
    pub p99_bound_ms: Option<f64>,
    /// Upper bound of the bucket holding the largest pass.
    pub max_bound_ms: Option<f64>,
    /// Time spent in passes, and its share of the wall time.
    pub total_s: f64,
    pub share_of_wall: f64,
    /// The histogram over the campaign.
    pub histogram: Option<Histogram>,
}

/// Ferry's resources.
#[derive(Debug, Clone, Serialize)]
pub struct FerryUsage {
    /// From spawn to `/readyz` 200.
    pub ready_s: f64,
    pub at_ready: ProcSample,
    /// Just before the campaign was created (proxies synced and reporting).
    pub before_campaign: ProcSample,
    /// When the campaign ended (or the wait timed out).
    pub after_campaign: ProcSample,
    /// CPU seconds over the campaign, per finished migration, and as
    /// cores busy on average.
    pub cpu_campaign_s: f64,
    pub cpu_per_migration_ms: Option<f64>,
    pub cpu_cores: f64,
    pub peak_rss_bytes: u64,
    /// A few of Ferry's own metrics at the end.
    pub metrics: Vec<String>,
}

/// What the simulated proxies did.
#[derive(Debug, Clone, Serialize)]
pub struct Fleet {
    /// Route configurations received (per proxy, summed).
    pub route_updates: u64,
    /// Encoded bytes of the route configurations received.
    pub route_bytes: u64,
    pub load_reports: u64,
    pub reported_requests: u64,
    /// Seconds from opening the streams to every proxy routing every
    /// service.
    pub sync_s: f64,
}

/// Progress at one moment of the campaign.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressPoint {
    pub at_s: f64,
    pub finished: u32,
    pub in_flight: u32,
    pub ferry_cpu_s: f64,
    pub ferry_rss_bytes: u64,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub test: &'static str,
    pub mode: &'static str,
    /// `git rev-parse HEAD` of the tree the load generator was built
    /// from (`-dirty` with uncommitted changes to tracked files).
    pub commit: String,
    pub ferry_sha256: String,
    pub setup: Setup,
    pub outcome: Outcome,
    pub migrations: MigrationTimes,
    pub engine: EngineCost,
    pub ferry: FerryUsage,
    pub fleet: Fleet,
    /// About every tenth of the services finished.
    pub progress: Vec<ProgressPoint>,
    pub load_generator_cpu_s: f64,
    pub load_generator_peak_rss_bytes: u64,
    /// The first few distinct errors of proxies and polls.
    pub errors: Vec<String>,
    #[serde(skip)]
    pub files: Vec<PathBuf>,
}

fn ms_or_dash(v: Option<f64>) -> String {
    match v {
        Some(ms) if ms.is_infinite() => "> 10 s".to_owned(),
        Some(ms) => fmt_ms(ms),
        None => "—".to_owned(),
    }
}

impl Report {
    /// A short Markdown summary.
    pub fn markdown(&self) -> String {
        let s = &self.setup;
        let o = &self.outcome;
        let m = &self.migrations;
        let e = &self.engine;
        let f = &self.ferry;
        let steps = s
            .steps
            .iter()
            .map(|p| format!("{p}%"))
            .collect::<Vec<_>>()
            .join(" → ");
        let mut out = format!(
            "### {}: {} services, concurrency {}, bake {} ({})\n\n",
            self.test,
            s.services,
            s.concurrency,
            fmt_ms(s.bake_ms),
            self.mode
        );
        let _ = writeln!(
            out,
            "Commit `{}`, ferry binary `{}` (sha256 `{}`), {} cores (load average {} at the start).",
            self.commit,
            s.ferry_binary.display(),
            self.ferry_sha256,
            s.cores,
            s.loadavg_at_start
        );
        if let Some(command) = &s.command {
            let _ = writeln!(out, "Command: `{command}`.");
        }
        let _ = writeln!(
            out,
            "\nOne campaign `{FROM}` → `{TO}` over {} services (one endpoint per cluster, loopback, never dialled); steps {steps}, bake {}, gates min {} requests per side, drain {}, unlimited failures; `--max-concurrent-migrations {}`. {} simulated proxies (delta ADS, wildcard CDS/EDS/LDS/RDS, each route config applied then ACKed) report load over LRS every {} ({} requests per service per report, split by the weights of the routes they hold, no errors).\n",
            s.services,
            fmt_ms(s.bake_ms),
            s.min_requests,
            fmt_ms(s.drain_ms),
            s.concurrency,
            s.proxies,
            fmt_ms(s.report_interval_ms),
            s.requests_per_report
        );
        let state = if o.timed_out {
            format!(
                "**not finished** after {:.0} s (timeout): {}",
                o.wall_s, o.state
            )
        } else {
            o.state.clone()
        };
        let mut rows: Vec<(String, String)> = vec![
            (
                "campaign".to_owned(),
                format!(
                    "{state}: {}/{} done, {} rolled back, {} skipped, {} in flight, {} queued",
                    o.done, o.services, o.rolled_back, o.skipped, o.in_flight, o.queued
                ),
            ),
            (
                "wall time (created → ended)".to_owned(),
                format!("{:.1} s", o.wall_s),
            ),
            (
                "services per minute".to_owned(),
                format!(
                    "{:.0} (ferry's own figure: {:.0})",
                    o.services_per_minute, o.ferry_per_minute
                ),
            ),
            (
                format!(
                    "time per migration, created → DONE ({} migrations): p50 / p90 / p99 / max",
                    m.done
                ),
                if m.duration.samples == 0 {
                    "—".to_owned()
                } else {
                    format!(
                        "{} / {} / {} / {}",
                        fmt_ms(m.duration.p50_ms),
                        fmt_ms(m.duration.p90_ms),
                        fmt_ms(m.duration.p99_ms),
                        fmt_ms(m.duration.max_ms)
                    )
                },
            ),
            (
                "engine tick (`ferry_migrate_tick_seconds`): passes / mean / p99 bucket / max bucket"
                    .to_owned(),
                format!(
                    "{} / {} / ≤ {} / ≤ {}",
                    e.ticks,
                    ms_or_dash(e.mean_ms),
                    ms_or_dash(e.p99_bound_ms),
                    ms_or_dash(e.max_bound_ms)
                ),
            ),
            (
                "engine time in ticks / share of wall time".to_owned(),
                format!("{:.2} s / {:.1} %", e.total_s, e.share_of_wall * 100.0),
            ),
            (
                "ferry CPU during the campaign / per finished migration / cores busy".to_owned(),
                format!(
                    "{:.2} s / {} / {:.2}",
                    f.cpu_campaign_s,
                    ms_or_dash(f.cpu_per_migration_ms),
                    f.cpu_cores
                ),
            ),
            (
                "ferry RSS: ready / before campaign / after / peak".to_owned(),
                format!(
                    "{} / {} / {} / {}",
                    fmt_mib(f.at_ready.rss_bytes),
                    fmt_mib(f.before_campaign.rss_bytes),
                    fmt_mib(f.after_campaign.rss_bytes),
                    fmt_mib(f.peak_rss_bytes)
                ),
            ),
            (
                "ferry ready / proxies routing every service".to_owned(),
                format!("{:.2} s / {:.2} s", f.ready_s, self.fleet.sync_s),
            ),
            (
                "route configs received (all proxies) / bytes".to_owned(),
                format!(
                    "{} / {}",
                    self.fleet.route_updates,
                    fmt_mib(self.fleet.route_bytes)
                ),
            ),
            (
                "load reports sent / requests reported".to_owned(),
                format!(
                    "{} / {}",
                    self.fleet.load_reports, self.fleet.reported_requests
                ),
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
        if !o.in_flight_by_stage.is_empty() {
            rows.push((
                "in flight at the end, by stage/phase".to_owned(),
                o.in_flight_by_stage
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        out.push_str("| metric | value |\n|---|---|\n");
        for (k, v) in rows {
            let _ = writeln!(out, "| {k} | {v} |");
        }
        if !self.progress.is_empty() {
            out.push_str(
                "\n| at | finished | in flight | ferry CPU since the campaign began | ferry RSS |\n|---|---|---|---|---|\n",
            );
            for p in &self.progress {
                let _ = writeln!(
                    out,
                    "| {:.1} s | {} | {} | {:.2} s | {} |",
                    p.at_s,
                    p.finished,
                    p.in_flight,
                    p.ferry_cpu_s,
                    fmt_mib(p.ferry_rss_bytes)
                );
            }
        }
        if !m.phases.is_empty() {
            out.push_str(
                "\n| part of a DONE migration | p50 | p90 | p99 | max |\n|---|---|---|---|---|\n",
            );
            for (label, t) in &m.phases {
                let _ = writeln!(
                    out,
                    "| {label} | {} | {} | {} | {} |",
                    fmt_ms(t.p50_ms),
                    fmt_ms(t.p90_ms),
                    fmt_ms(t.p99_ms),
                    fmt_ms(t.max_ms)
                );
            }
        }
        if let Some(h) = &e.histogram
            && h.count > 0.0
        {
            out.push_str("\nEngine passes by duration (bucket upper bound: passes):");
            let mut previous = 0.0;
            for (bound, cumulative) in &h.buckets {
                let n = cumulative - previous;
                previous = *cumulative;
                if n > 0.0 {
                    let label = if bound.is_infinite() {
                        "+Inf".to_owned()
                    } else {
                        fmt_ms(bound * 1e3)
                    };
                    let _ = write!(out, " ≤ {label}: {n:.0};");
                }
            }
            out.push('\n');
        }
        if !o.not_done.is_empty() || !o.waiting.is_empty() || !o.reason.is_empty() {
            out.push('\n');
            if !o.reason.is_empty() {
                let _ = writeln!(out, "Campaign reason: {}\n", o.reason);
            }
            for line in &o.not_done {
                let _ = writeln!(out, "- not done: {line}");
            }
            for line in &o.waiting {
                let _ = writeln!(out, "- waiting: {line}");
            }
        }
        if !self.errors.is_empty() {
            out.push_str("\nErrors (first few):\n\n");
            for e in &self.errors {
                let _ = writeln!(out, "- {e}");
            }
        }
        out
    }
}
