//! The peers compared, each started alone under `taskset` on the proxy
//! cores and stopped before the next one starts, each with as many
//! workers as the run asks (`--workers`, 1 by default):
//!
//! - `direct`: the backend itself, no proxy (the ceiling);
//! - `ferry`: `ferry proxy --workers N`, configured by `ferry control`
//!   over delta ADS ([`ferry`]);
//! - `envoy`: Envoy `--concurrency N` configured by the same
//!   `ferry control` ([`envoy`]);
//! - `envoy-static`: the same Envoy with a static config of one listener,
//!   one route and one cluster: the control for `envoy`, so an Envoy made
//!   slow by Ferry's config shows as such;
//! - `nginx`: `proxy_pass` to an upstream with keep-alive,
//!   `worker_processes N` (one worker: `master_process off`) ([`nginx`]);
//! - `haproxy`: `nbthread N`, `http-reuse always` ([`haproxy`]).

pub mod envoy;
pub mod ferry;
pub mod haproxy;
pub mod nginx;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use super::fixed_rate::get_once;
use super::process::Process;

/// One peer of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerKind {
    Direct,
    Ferry,
    Envoy,
    EnvoyStatic,
    Nginx,
    Haproxy,
}

impl PeerKind {
    /// Every peer, in the order they run and are reported.
    pub const ALL: [Self; 6] = [
        Self::Direct,
        Self::Ferry,
        Self::Envoy,
        Self::EnvoyStatic,
        Self::Nginx,
        Self::Haproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Ferry => "ferry",
            Self::Envoy => "envoy",
            Self::EnvoyStatic => "envoy-static",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
        }
    }

    /// A proxy (every peer but `direct`).
    pub fn is_proxy(self) -> bool {
        self != Self::Direct
    }
}

/// A `--peers` entry that names no peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown peer {0:?}: expected direct, ferry, envoy, envoy-static, nginx or haproxy")]
pub struct UnknownPeer(String);

impl FromStr for PeerKind {
    type Err = UnknownPeer;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| UnknownPeer(s.to_owned()))
    }
}

impl fmt::Display for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The binaries the peers run.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub ferry: PathBuf,
    pub envoy: PathBuf,
    pub nginx: PathBuf,
    pub haproxy: PathBuf,
}

/// What every peer is started with.
#[derive(Debug, Clone)]
pub struct Setting<'a> {
    pub binaries: &'a Binaries,
    /// The backend's HTTP/1.1 address: every proxy's upstream.
    pub backend_h1: SocketAddr,
    /// The backend's h2c address (the `direct` peer's h2c target).
    pub backend_h2: SocketAddr,
    /// `ferry control`'s xDS address.
    pub xds: SocketAddr,
    /// Where `ferry control` tells Envoy to listen.
    pub envoy_listen: SocketAddr,
    /// The proxy cores, as `taskset -c` takes them.
    pub cores: &'a str,
    /// Workers (threads or processes) of each peer that has the setting.
    pub workers: usize,
    /// A directory for the peer's config and log.
    pub dir: &'a Path,
}

/// A running peer; dropping it stops it.
#[derive(Debug)]
pub struct Peer {
    pub kind: PeerKind,
    /// Where it takes HTTP/1.1 and h2c (prior knowledge).
    pub h1: SocketAddr,
    pub h2: SocketAddr,
    /// Its admin or stats address, where it has one.
    pub admin: Option<SocketAddr>,
    /// `None` for `direct`.
    pub process: Option<Process>,
}

impl Peer {
    pub fn start(kind: PeerKind, setting: &Setting<'_>) -> anyhow::Result<Self> {
        let dir = setting.dir.join(kind.name());
        std::fs::create_dir_all(&dir)?;
        let core = setting.cores;
        match kind {
            PeerKind::Direct => Ok(Self {
                kind,
                h1: setting.backend_h1,
                h2: setting.backend_h2,
                admin: None,
                process: None,
            }),
            PeerKind::Ferry => ferry::start(setting, core, &dir),
            PeerKind::Envoy => envoy::start_configured(setting, core, &dir),
            PeerKind::EnvoyStatic => envoy::start_static(setting, core, &dir),
            PeerKind::Nginx => nginx::start(setting, core, &dir),
            PeerKind::Haproxy => haproxy::start(setting, core, &dir),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid)
    }

    /// Waits until a request through the peer for `host` gets 200 and
    /// `body` on HTTP/1.1 (for Ferry and Envoy: the whole config has
    /// arrived); the time from the process's start. Fails, with the
    /// peer's log, if it has not by `timeout`: a peer that does not route
    /// fails the test.
    pub async fn wait_routing(
        &mut self,
        host: &str,
        body: &Bytes,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        while started.elapsed() < timeout {
            if let Some(process) = &mut self.process {
                process.check_running()?;
            }
            match get_once(self.h1, host, Duration::from_secs(2)).await {
                Ok((200, answer)) if answer == *body => {
                    return Ok(self.process.as_ref().map_or(Duration::ZERO, Process::age));
                }
                Ok((status, answer)) => {
                    last = format!("{status} {:?}", String::from_utf8_lossy(&answer));
                }
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = self
            .process
            .as_ref()
            .map_or(String::new(), |p| p.log_tail(20));
        anyhow::bail!(
            "{} did not route {host} to the backend within {timeout:?} (last answer: {last}); its log ends with:\n{log}",
            self.kind
        )
    }

    /// The upstream connections the peer says it opened over its life,
    /// where it reports them (see [`super::upstream`]).
    pub async fn reported_upstream_connections(&self) -> anyhow::Result<Option<u64>> {
        let Some(admin) = self.admin else {
            return Ok(None);
        };
        let count = match self.kind {
            PeerKind::Envoy | PeerKind::EnvoyStatic => envoy::upstream_connections(admin).await?,
            PeerKind::Haproxy => haproxy::upstream_connections(admin).await?,
            PeerKind::Ferry => ferry::upstream_connections(admin).await?,
            PeerKind::Direct | PeerKind::Nginx => return Ok(None),
        };
        Ok(Some(count))
    }

    /// Fails, with its log, if it exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.process.as_mut().map_or(Ok(()), Process::check_running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_named() {
        for kind in PeerKind::ALL {
            assert_eq!(kind.name().parse(), Ok(kind));
        }
        assert!("apache".parse::<PeerKind>().is_err());
        assert_eq!(
            serde_json::to_string(&PeerKind::EnvoyStatic).unwrap(),
            "\"envoy-static\""
        );
    }
}
