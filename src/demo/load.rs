//! The demo's users: a steady open-loop load (requests go out on
//! schedule, whether or not earlier ones have answered) of many users,
//! each with a sticky `x-user` header, spread over the four services and
//! sent through the proxies. Every answer is sorted: the backend's own
//! (which cluster served it), an injected 503, or a failure (anything
//! else: what a user would notice).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use super::pods::FAULT_HEADER;

/// Users in the demo.
pub const USERS: u32 = 600;
/// The window per-cluster rates and latencies are shown over.
pub const WINDOW: Duration = Duration::from_secs(5);
/// Requests in flight at most (past it a request counts as failed).
const MAX_IN_FLIGHT: usize = 2_000;

/// A proxy the load goes through.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub addr: SocketAddr,
    /// Its cluster picks are sticky per user (Ferry's proxy; Envoy hashes
    /// only within a cluster).
    pub sticky: bool,
}

/// One answer, as the users saw it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    latency: Duration,
    /// 0: the backend's own answer; 1: injected 503; 2: failed.
    kind: u8,
}

/// What the users saw, per service and cluster, and in all.
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: u64,
    pub answered: u64,
    pub failed: u64,
    pub injected: u64,
    /// (service, cluster) → requests it served.
    pub served: BTreeMap<(String, String), u64>,
    /// Recent samples per (service, cluster), for rates and latencies.
    recent: HashMap<(String, String), VecDeque<Sample>>,
    /// (service, user) → the cluster that served the user last, when the
    /// user goes through a sticky proxy.
    last_cluster: HashMap<(String, u32), String>,
    /// (service, user) pairs served by `new` and then by `old` again.
    pub moved_back: BTreeMap<String, std::collections::BTreeSet<u32>>,
    /// (service) → users seen through sticky proxies.
    pub sticky_users: BTreeMap<String, std::collections::BTreeSet<u32>>,
    /// The first few failures, as text.
    pub failures: Vec<String>,
}

/// Per-cluster figures over the last [`WINDOW`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Window {
    pub rps: f64,
    pub error_pct: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Stats {
    fn record(
        &mut self,
        service: &str,
        user: u32,
        sticky: bool,
        outcome: Result<(String, bool), String>,
        latency: Duration,
    ) {
        self.answered += 1;
        let now = Instant::now();
        let (cluster, kind) = match outcome {
            Ok((cluster, false)) => (cluster, 0),
            Ok((cluster, true)) => {
                self.injected += 1;
                (cluster, 1)
            }
            Err(why) => {
                self.failed += 1;
                if self.failures.len() < 10 {
                    self.failures.push(format!("{service}: {why}"));
                }
                ("?".to_owned(), 2)
            }
        };
        if kind != 2 {
            *self
                .served
                .entry((service.to_owned(), cluster.clone()))
                .or_default() += 1;
        }
        if sticky && kind == 0 {
            self.sticky_users
                .entry(service.to_owned())
                .or_default()
                .insert(user);
            let key = (service.to_owned(), user);
            if self.last_cluster.get(&key).is_some_and(|c| c == "new") && cluster == "old" {
                self.moved_back
                    .entry(service.to_owned())
                    .or_default()
                    .insert(user);
            }
            self.last_cluster.insert(key, cluster.clone());
        }
        let samples = self
            .recent
            .entry((service.to_owned(), cluster))
            .or_default();
        samples.push_back(Sample {
            at: now,
            latency,
            kind,
        });
        while samples.front().is_some_and(|s| now - s.at > WINDOW) {
            samples.pop_front();
        }
    }

    /// The last [`WINDOW`]'s figures for `service` in `cluster`.
    pub fn window(&self, service: &str, cluster: &str) -> Window {
        let now = Instant::now();
        let Some(samples) = self.recent.get(&(service.to_owned(), cluster.to_owned())) else {
            return Window::default();
        };
        let live: Vec<&Sample> = samples.iter().filter(|s| now - s.at <= WINDOW).collect();
        if live.is_empty() {
            return Window::default();
        }
        let mut ms: Vec<f64> = live
            .iter()
            .map(|s| s.latency.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
        let errors = live.iter().filter(|s| s.kind != 0).count();
        Window {
            rps: live.len() as f64 / WINDOW.as_secs_f64(),
            error_pct: errors as f64 * 100.0 / live.len() as f64,
            p50_ms: q(0.50),
            p99_ms: q(0.99),
        }
    }
}

pub type Shared = Arc<Mutex<Stats>>;

fn lock(stats: &Shared) -> std::sync::MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(|p| p.into_inner())
}

/// The proxy a user's requests go through: always the same one, as a
/// global load balancer with client affinity would send them.
fn entry_of(user: u32, entries: usize) -> usize {
    (user.wrapping_mul(2_654_435_761) >> 7) as usize % entries.max(1)
}

/// Sends `rate` requests per second through `entries` to `hosts` until
/// `stop`.
pub async fn run(
    entries: Vec<Entry>,
    hosts: Vec<(String, String)>,
    rate: f64,
    stats: Shared,
    stop: CancellationToken,
) {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(HttpConnector::new());
    let period = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let (service, host) = hosts[(n % hosts.len() as u64) as usize].clone();
        let user = rand::random::<u32>() % USERS;
        let entry = entries[entry_of(user, entries.len())].clone();
        lock(&stats).sent += 1;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            lock(&stats).record(
                &service,
                user,
                false,
                Err("too many requests in flight".into()),
                Duration::ZERO,
            );
            continue;
        };
        let (client, stats) = (client.clone(), stats.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = send(&client, &entry, &host, &service, user).await;
            lock(&stats).record(&service, user, entry.sticky, outcome, started.elapsed());
            drop(permit);
        });
    }
}

/// One request: Ok((cluster, injected)) for the backend's own answer or
/// an injected fault, Err(why) otherwise.
async fn send(
    client: &Client<HttpConnector, Empty<Bytes>>,
    entry: &Entry,
    host: &str,
    service: &str,
    user: u32,
) -> Result<(String, bool), String> {
    let request = hyper::Request::get(format!("http://{}/", entry.addr))
        .header(hyper::header::HOST, host)
        .header("x-user", format!("u{user}"))
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .map_err(|_| format!("{}: no answer within 5s", entry.name))?
        .map_err(|e| format!("{}: {e}", entry.name))?;
    let status = response.status();
    let injected = response.headers().contains_key(FAULT_HEADER);
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{}: {e}", entry.name))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    if injected && status == hyper::StatusCode::SERVICE_UNAVAILABLE {
        // The fault is injected only by new pods.
        return Ok(("new".to_owned(), true));
    }
    let mut parts = text.split('/');
    match (status.as_u16(), parts.next(), parts.next()) {
        (200, Some(s), Some(cluster)) if s == service => Ok((cluster.to_owned(), false)),
        _ => Err(format!(
            "{}: {status} {}",
            entry.name,
            text.chars().take(120).collect::<String>()
        )),
    }
}
