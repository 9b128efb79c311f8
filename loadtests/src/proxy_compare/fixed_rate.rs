//! An open-loop, constant-rate HTTP/1.1 load generator (what `wrk2 -R`
//! does, which Debian's `wrk` cannot).
//!
//! `connections` keep-alive connections share the schedule: request `k`
//! is due at `start + k / rate` and goes on connection `k % connections`.
//! A request's latency runs from when it was sent, or from when it was due
//! if its connection was still busy then: a slow server is charged for the
//! queue it causes (no coordinated omission), while the generator's own
//! timer lag (about a millisecond) is not charged to anyone. The run is
//! bounded: requests not sent by `duration + grace` count as unsent.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::machine::pin_current_thread;
use crate::stats::Summary;

/// One fixed-rate run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: String,
    pub rate: f64,
    pub duration: Duration,
    pub connections: usize,
    /// How long after `duration` late requests may still finish.
    pub grace: Duration,
    /// Per request.
    pub timeout: Duration,
}

/// What a fixed-rate run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FixedRate {
    pub target_rps: f64,
    pub connections: usize,
    pub scheduled: usize,
    /// Answered with 2xx.
    pub ok: usize,
    pub non_2xx: usize,
    /// Connect, send, receive failures and timeouts.
    pub errors: usize,
    /// Not sent by the end of the grace period.
    pub unsent: usize,
    /// Answers (any status) per second, over the time the requests were
    /// sent in (at least the planned duration): below the target when the
    /// peer could not keep up.
    pub achieved_rps: f64,
    pub wall_s: f64,
    /// Over every 2xx answer.
    pub latency: Summary,
}

impl FixedRate {
    /// Failed requests (non-2xx, errors, unsent) per scheduled request.
    pub fn error_share(&self) -> f64 {
        (self.non_2xx + self.errors + self.unsent) as f64 / self.scheduled.max(1) as f64
    }
}

/// Runs `plan` on a thread of its own pinned to `cores`.
pub async fn run(plan: Plan, cores: &str) -> anyhow::Result<FixedRate> {
    anyhow::ensure!(plan.rate > 0.0, "the fixed rate must be above 0");
    anyhow::ensure!(plan.connections > 0, "at least one connection is needed");
    let (done_tx, done) = oneshot::channel();
    let cores = cores.to_owned();
    std::thread::Builder::new()
        .name("fixed-rate".to_owned())
        .spawn(move || {
            let result = pin_current_thread(&cores)
                .and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("building the load runtime")
                })
                .map(|runtime| runtime.block_on(generate(plan)));
            let _ = done_tx.send(result);
        })
        .context("starting the load thread")?;
    done.await.context("the load thread panicked")?
}

/// What one connection's share of the schedule gave.
#[derive(Debug, Default)]
struct Share {
    latencies: Vec<Duration>,
    ok: usize,
    non_2xx: usize,
    errors: usize,
    unsent: usize,
    /// When the last request was sent.
    last_sent: Option<Instant>,
}

async fn generate(plan: Plan) -> FixedRate {
    let scheduled = (plan.rate * plan.duration.as_secs_f64()).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / plan.rate);
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + plan.duration + plan.grace;
    let mut tasks = tokio::task::JoinSet::new();
    for first in 0..plan.connections.min(scheduled.max(1)) {
        let plan = plan.clone();
        tasks.spawn(async move {
            let dues = (first..scheduled)
                .step_by(plan.connections)
                .map(|k| start + interval.mul_f64(k as f64));
            connection(&plan, dues, deadline).await
        });
    }
    let mut all = Share::default();
    while let Some(joined) = tasks.join_next().await {
        let share = joined.unwrap_or_else(|_| Share {
            errors: 1,
            ..Share::default()
        });
        all.latencies.extend(share.latencies);
        all.ok += share.ok;
        all.non_2xx += share.non_2xx;
        all.errors += share.errors;
        all.unsent += share.unsent;
        all.last_sent = all.last_sent.max(share.last_sent);
    }
    let wall_s = start.elapsed().as_secs_f64();
    let sending_s = all
        .last_sent
        .map_or(0.0, |t| t.saturating_duration_since(start).as_secs_f64())
        .max(plan.duration.as_secs_f64());
    FixedRate {
        target_rps: plan.rate,
        connections: plan.connections,
        scheduled,
        ok: all.ok,
        non_2xx: all.non_2xx,
        errors: all.errors,
        unsent: all.unsent,
        achieved_rps: (all.ok + all.non_2xx) as f64 / sending_s.max(1e-9),
        wall_s,
        latency: Summary::of(&all.latencies),
    }
}

/// Sends the requests due at `dues` one after the other on one
/// keep-alive connection, reconnecting after a failure.
async fn connection(
    plan: &Plan,
    dues: impl ExactSizeIterator<Item = Instant>,
    deadline: Instant,
) -> Share {
    let mut share = Share {
        latencies: Vec::with_capacity(dues.len()),
        ..Share::default()
    };
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    let total = dues.len();
    for (sent, due) in dues.enumerate() {
        if Instant::now() >= deadline {
            share.unsent += total - sent;
            break;
        }
        let begin = if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
            Instant::now()
        } else {
            due
        };
        share.last_sent = Some(Instant::now());
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = tokio::time::timeout(
            plan.timeout.min(left),
            request(&mut sender, plan.addr, &plan.host),
        )
        .await;
        match answer {
            Ok(Ok(status)) if (200..300).contains(&status) => {
                share.ok += 1;
                share.latencies.push(begin.elapsed());
            }
            Ok(Ok(_)) => share.non_2xx += 1,
            Ok(Err(_)) | Err(_) => {
                share.errors += 1;
                sender = None;
            }
        }
    }
    share
}

/// One GET on the connection in `sender`, opened first if there is none;
/// the answer's status, after its whole body.
async fn request(
    sender: &mut Option<SendRequest<Empty<Bytes>>>,
    addr: SocketAddr,
    host: &str,
) -> anyhow::Result<u16> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = Some(connect(addr).await?);
    }
    let Some(s) = sender.as_mut() else {
        anyhow::bail!("no connection");
    };
    s.ready().await?;
    let response = s.send_request(get(host)?).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// A GET in origin form (`GET / HTTP/1.1` and a `Host` header), as
/// browsers and `wrk` send it.
fn get(host: &str) -> anyhow::Result<hyper::Request<Empty<Bytes>>> {
    get_path(host, "/")
}

fn get_path(host: &str, path: &str) -> anyhow::Result<hyper::Request<Empty<Bytes>>> {
    Ok(hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .body(Empty::new())?)
}

/// One GET of `/` on a fresh connection: the status and the body.
pub async fn get_once(
    addr: SocketAddr,
    host: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, Bytes)> {
    get_path_once(addr, host, "/", timeout).await
}

/// One HTTP/1.1 GET of `path` on a fresh connection (admin and stats
/// pages: Envoy's admin refuses HTTP/1.0): the status and the body.
pub async fn get_path_once(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, Bytes)> {
    let exchange = async {
        let mut sender = connect(addr).await?;
        let response = sender.send_request(get_path(host, path)?).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("GET http://{addr}{path} (Host: {host}) timed out"))?
}

/// [`get_path_once`] on `addr` itself, the body as text.
pub async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let (status, body) =
        get_path_once(addr, &addr.to_string(), path, Duration::from_secs(10)).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::super::backend::hyper::HyperBackend as Backend;
    use super::*;

    #[tokio::test]
    async fn keeps_the_rate_and_counts_every_request() {
        let backend = Backend::start("0", Bytes::from_static(b"ok")).unwrap();
        let plan = Plan {
            addr: backend.addr,
            host: "x".to_owned(),
            rate: 200.0,
            duration: Duration::from_millis(500),
            connections: 4,
            grace: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
        };
        let result = run(plan, "0").await.unwrap();
        assert_eq!(result.scheduled, 100);
        assert_eq!(result.ok, 100, "{result:?}");
        assert_eq!(backend.served(), 100);
        assert_eq!(result.error_share(), 0.0);
        // Paced, not as fast as possible.
        assert!(result.wall_s >= 0.45, "{result:?}");
        assert!(result.latency.p50_ms < 100.0, "{result:?}");
    }

    #[tokio::test]
    async fn a_dead_server_counts_as_errors() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let plan = Plan {
            addr,
            host: "x".to_owned(),
            rate: 100.0,
            duration: Duration::from_millis(100),
            connections: 2,
            grace: Duration::from_millis(500),
            timeout: Duration::from_millis(200),
        };
        let result = run(plan, "0").await.unwrap();
        assert_eq!(result.ok, 0);
        assert_eq!(result.errors + result.unsent, result.scheduled);
        assert_eq!(result.error_share(), 1.0);
    }
}
