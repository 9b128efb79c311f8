//! The runs against one running peer: warm-up and saturation (HTTP/1.1
//! and h2c), and the fixed-rate run, each sampled for the peer's CPU and
//! memory.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::fixed_rate::{self, Plan};
use super::machine::CoreList;
use super::peers::{Peer, PeerKind};
use super::report::{Latency, Saturation, core_note, saturation_line};
use super::sampling::{Usage, max_of, sampled};
use super::saturation::{self, Load, Protocol};
use super::{Config, HOST, TEST_NAME};

/// A peer under load: where to send requests, and the process to sample.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub kind: PeerKind,
    pub h1: SocketAddr,
    pub h2: SocketAddr,
    pub pid: Option<u32>,
}

impl Target {
    pub fn of(peer: &Peer) -> Self {
        Self {
            kind: peer.kind,
            h1: peer.h1,
            h2: peer.h2,
            pid: peer.pid(),
        }
    }
}

/// Saturation results of one peer.
#[derive(Debug, Clone)]
pub struct Saturated {
    pub h1: Saturation,
    pub h2: Saturation,
    pub max_rss: Option<u64>,
}

/// Runs load with one configuration, on the load cores.
#[derive(Debug)]
pub struct Runner<'a> {
    pub config: &'a Config,
    /// Where the peers run: their time is sampled during each run.
    pub proxy_cores: &'a CoreList,
    pub load_cores: &'a str,
    pub started: Instant,
}

impl Runner<'_> {
    pub fn progress(&self, msg: &str) {
        if self.config.progress && !msg.is_empty() {
            eprintln!(
                "[{TEST_NAME} {:6.1}s] {msg}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// Warm-up, then HTTP/1.1 and h2c saturation.
    pub async fn saturate_peer(&self, target: &Target) -> anyhow::Result<Saturated> {
        if !self.config.warmup.is_zero() {
            self.progress(&format!("{:12} warm-up", target.kind.name()));
            self.saturate(target, Protocol::Http1, self.config.warmup)
                .await?;
        }
        let duration = self.config.duration;
        let (h1, u1) = self.saturate(target, Protocol::Http1, duration).await?;
        self.progress(&saturation_line(target.kind, &h1));
        self.progress(&core_note(h1.proxy_core));
        let (h2, u2) = self.saturate(target, Protocol::Http2, duration).await?;
        self.progress(&saturation_line(target.kind, &h2));
        self.progress(&core_note(h2.proxy_core));
        Ok(Saturated {
            h1,
            h2,
            max_rss: max_of(u1.max_rss, u2.max_rss),
        })
    }

    async fn saturate(
        &self,
        target: &Target,
        protocol: Protocol,
        duration: Duration,
    ) -> anyhow::Result<(Saturation, Usage)> {
        let (addr, connections, streams) = match protocol {
            Protocol::Http1 => (target.h1, self.config.h1_connections, 1),
            Protocol::Http2 => (
                target.h2,
                self.config.h2_connections,
                self.config.h2_streams,
            ),
        };
        let load = Load {
            protocol,
            addr,
            host: HOST.to_owned(),
            duration,
            connections,
            streams,
            threads: self.config.workers,
        };
        let (measured, usage) = sampled(
            target.pid,
            self.proxy_cores,
            saturation::run(&load, self.load_cores),
        )
        .await
        .with_context(|| format!("{} {protocol:?}", target.kind))?;
        let result = Saturation {
            protocol,
            connections,
            streams_per_connection: streams,
            wall_s: usage.wall_s,
            error_share: measured.error_share(),
            cpu: usage.cpu(measured.requests),
            proxy_core: usage.proxy_core(),
            measured,
        };
        Ok((result, usage))
    }

    /// The open-loop HTTP/1.1 run at `rate`.
    pub async fn fixed_rate(&self, target: &Target, rate: f64) -> anyhow::Result<(Latency, Usage)> {
        let plan = Plan {
            addr: target.h1,
            host: HOST.to_owned(),
            rate,
            duration: self.config.fixed_rate_duration,
            connections: self.config.fixed_rate_connections,
            grace: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        };
        let (run, usage) = sampled(
            target.pid,
            self.proxy_cores,
            fixed_rate::run(plan, self.load_cores),
        )
        .await
        .with_context(|| format!("{} at a fixed rate", target.kind))?;
        let latency = Latency {
            error_share: run.error_share(),
            cpu: usage.cpu((run.ok + run.non_2xx) as u64),
            proxy_core: usage.proxy_core(),
            run,
        };
        Ok((latency, usage))
    }
}
