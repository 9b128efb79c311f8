//! The service behind the peers, chosen with `--backend`: an nginx of its
//! own (the default: a backend as fast as the peers' own kind, so the
//! direct rate is a real ceiling) or a minimal hyper server in this
//! process. Either answers every request with 200 and the run's body
//! (`--body-bytes`), with as many workers as the peers get, on the load
//! cores, and counts the connections it accepted.

pub mod hyper;
pub mod nginx;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;

use bytes::Bytes;
use serde::Serialize;

use self::hyper::HyperBackend;
use self::nginx::NginxBackend;

/// Which backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Nginx,
    Hyper,
}

/// A `--backend` value that names no backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backend {0:?}: expected nginx or hyper")]
pub struct UnknownBackend(String);

impl FromStr for BackendKind {
    type Err = UnknownBackend;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nginx" => Ok(Self::Nginx),
            "hyper" => Ok(Self::Hyper),
            other => Err(UnknownBackend(other.to_owned())),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nginx => "nginx",
            Self::Hyper => "hyper",
        })
    }
}

/// A running backend; dropping it stops it.
#[derive(Debug)]
pub enum Backend {
    Nginx(NginxBackend),
    Hyper(HyperBackend),
}

impl Backend {
    /// Starts `kind` with `workers` workers on `cores`; nginx keeps its
    /// files in `dir`.
    pub fn start(
        kind: BackendKind,
        nginx_binary: &Path,
        cores: &str,
        dir: &Path,
        body: &Bytes,
        workers: usize,
    ) -> anyhow::Result<Self> {
        Ok(match kind {
            BackendKind::Nginx => Self::Nginx(NginxBackend::start(
                nginx_binary,
                cores,
                dir,
                body,
                workers,
            )?),
            BackendKind::Hyper => {
                Self::Hyper(HyperBackend::start_with(cores, body.clone(), workers)?)
            }
        })
    }

    /// Where it takes HTTP/1.1.
    pub fn h1(&self) -> SocketAddr {
        match self {
            Self::Nginx(b) => b.h1,
            Self::Hyper(b) => b.addr,
        }
    }

    /// Where it takes h2c (prior knowledge).
    pub fn h2(&self) -> SocketAddr {
        match self {
            Self::Nginx(b) => b.h2,
            Self::Hyper(b) => b.addr,
        }
    }

    /// Connections accepted so far (its own status reads left out).
    pub async fn accepted(&mut self) -> anyhow::Result<u64> {
        match self {
            Self::Nginx(b) => b.accepted().await,
            Self::Hyper(b) => Ok(b.accepted()),
        }
    }

    /// Fails, with its log, if the nginx backend exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Nginx(b) => b.process().check_running(),
            Self::Hyper(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::provenance::locate;
    use crate::proxy_compare::fixed_rate::get_once;

    #[test]
    fn backends_are_named() {
        assert_eq!("nginx".parse(), Ok(BackendKind::Nginx));
        assert_eq!("hyper".parse(), Ok(BackendKind::Hyper));
        assert!("apache".parse::<BackendKind>().is_err());
        assert_eq!(BackendKind::default().to_string(), "nginx");
    }

    /// Needs Debian's nginx (scripts/test.sh installs it); fails without.
    #[tokio::test]
    async fn the_nginx_backend_answers_and_counts_connections() {
        let nginx =
            locate(Path::new("nginx")).expect("nginx is not installed (apt-get install nginx)");
        let dir = tempfile::tempdir().unwrap();
        let body = Bytes::from_static(b"the body\n");
        let mut backend =
            Backend::start(BackendKind::Nginx, &nginx, "0", dir.path(), &body, 1).unwrap();
        let before = wait_accepting(&mut backend).await;
        for addr in [backend.h1(), backend.h1()] {
            let (status, answer) = get_once(addr, "x", Duration::from_secs(5)).await.unwrap();
            assert_eq!((status, answer), (200, body.clone()));
        }
        assert_eq!(backend.accepted().await.unwrap(), before + 2);
    }

    /// A 64 KiB body (served from a file) by two workers, over both
    /// protocols' ports.
    #[tokio::test]
    async fn the_nginx_backend_answers_a_large_body_with_two_workers() {
        let nginx =
            locate(Path::new("nginx")).expect("nginx is not installed (apt-get install nginx)");
        let dir = tempfile::tempdir().unwrap();
        let body = crate::proxy_compare::body(65_536);
        let mut backend =
            Backend::start(BackendKind::Nginx, &nginx, "0", dir.path(), &body, 2).unwrap();
        wait_accepting(&mut backend).await;
        let (status, answer) = get_once(backend.h1(), "x", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(answer, body);
        let Backend::Nginx(nginx) = &mut backend else {
            unreachable!("started as nginx")
        };
        let workers = crate::proxy_compare::process::descendants(nginx.process().pid);
        assert_eq!(workers.len(), 2, "a master and two workers");
    }

    /// The accepted count once nginx answers (it starts in the background).
    async fn wait_accepting(backend: &mut Backend) -> u64 {
        for _ in 0..50 {
            if let Ok(n) = backend.accepted().await {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the nginx backend did not start within 5 s");
    }
}
