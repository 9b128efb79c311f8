//! What a peer's processes cost during one run: CPU time, the largest
//! resident size sampled every 100 ms, and where the proxy cores' time
//! went (from `/proc`).

use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::machine::{self, CoreList, CoreTime};
use super::process;

/// CPU a proxy spent in one run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cpu {
    pub seconds: f64,
    /// `seconds` over the run's wall time: 1.0 is one core saturated.
    pub cores: f64,
    pub us_per_request: f64,
}

/// Where the proxy cores' time went during a run (as shares of all their
/// time), and how much of it went to processes other than the proxy under
/// test.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProxyCore {
    #[serde(flatten)]
    pub time: CoreTime,
    /// `processes` minus the proxy's own CPU.
    pub other_processes: f64,
}

/// How a proxy process fared during one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    pub wall_s: f64,
    pub cpu_s: Option<f64>,
    pub max_rss: Option<u64>,
    pub core: Option<CoreTime>,
    /// How many cores `core` covers.
    pub cores: usize,
}

impl Usage {
    /// `None` without a proxy process (the backend reached directly).
    pub fn proxy_core(&self) -> Option<ProxyCore> {
        let time = self.core?;
        let own = self.cpu_s? / self.wall_s.max(1e-9) / self.cores.max(1) as f64;
        Some(ProxyCore {
            time,
            other_processes: (time.processes - own).max(0.0),
        })
    }

    pub fn cpu(&self, requests: u64) -> Option<Cpu> {
        let seconds = self.cpu_s?;
        Some(Cpu {
            seconds,
            cores: seconds / self.wall_s.max(1e-9),
            us_per_request: seconds * 1e6 / requests.max(1) as f64,
        })
    }
}

/// Runs `work` while sampling the RSS of `pid` and its descendants every
/// 100 ms and their CPU time before and after, and the time of `cores`.
pub async fn sampled<T>(
    pid: Option<u32>,
    cores: &CoreList,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Usage)> {
    let sample = || pid.and_then(|p| process::sample_tree(p).ok());
    let core_before = machine::cores_jiffies(cores);
    let before = sample();
    let started = Instant::now();
    let mut max_rss = before.map(|s| s.rss_bytes);
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(work);
    let value = loop {
        tokio::select! {
            value = &mut work => break value?,
            _ = ticks.tick() => {
                if let Some(s) = sample() {
                    max_rss = Some(max_rss.unwrap_or(0).max(s.rss_bytes));
                }
            }
        }
    };
    let wall_s = started.elapsed().as_secs_f64();
    let after = sample();
    if let Some(s) = after {
        max_rss = Some(max_rss.unwrap_or(0).max(s.rss_bytes));
    }
    let cpu_s = before
        .zip(after)
        .map(|(b, a)| a.cpu_seconds - b.cpu_seconds);
    let core = core_before
        .zip(machine::cores_jiffies(cores))
        .map(|(b, a)| CoreTime::between(b, a));
    Ok((
        value,
        Usage {
            wall_s,
            cpu_s,
            max_rss,
            core,
            cores: cores.len(),
        },
    ))
}

pub fn max_of(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}
