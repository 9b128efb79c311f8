//! The demo's processes: one `ferry control`, two `ferry proxy` and, when
//! asked, one Envoy, each the real program (this very binary for Ferry's),
//! with its log in the demo's directory. They are killed when the demo
//! ends.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A child process, killed when dropped.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, mut command: Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            log,
            child,
        })
    }

    /// Fails, with the end of its log, when the process has exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            bail!(
                "{} exited ({status}); the end of {}:\n{}",
                self.name,
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// An address for a server of the demo: the one asked for when it is free
/// (port 0: any free port), or an error naming the flag that moves it.
pub fn reserve(addr: SocketAddr, flag: &str) -> anyhow::Result<SocketAddr> {
    match TcpListener::bind(addr) {
        Ok(listener) => Ok(listener.local_addr()?),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!("{addr} is in use: choose another address with {flag}")
        }
        Err(e) => bail!("cannot listen on {addr} ({flag}): {e}"),
    }
}

/// Polls `url` (plain HTTP GET) until it answers 200, `limit` passes, or
/// `proc` exits.
pub async fn wait_ready(
    proc: &mut Proc,
    addr: SocketAddr,
    path: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        proc.check()?;
        if get_ok(addr, path).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} was not ready within {limit:?} (GET {path} on {addr}); see {}",
                proc.name,
                proc.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get_ok(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut head)).await,
        Ok(Ok(_)) if &head[9..12] == b"200"
    )
}

/// Where the control plane listens.
#[derive(Debug, Clone, Copy)]
pub struct ControlAddrs {
    pub xds: SocketAddr,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    pub envoy_listener: SocketAddr,
}

pub fn control(dir: &Path, catalog: &Path, addrs: ControlAddrs) -> anyhow::Result<Proc> {
    let mut c = Command::new(std::env::current_exe().context("locating the ferry binary")?);
    c.arg("control")
        .arg("--catalog")
        .arg(catalog)
        .args(["--xds-addr", &addrs.xds.to_string()])
        .args(["--api-addr", &addrs.api.to_string()])
        .args(["--admin-addr", &addrs.admin.to_string()])
        .args(["--listener-addr", &addrs.envoy_listener.to_string()])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "info");
    Proc::spawn("ferry-control", c, dir)
}

pub fn proxy(
    dir: &Path,
    name: &str,
    xds: SocketAddr,
    listen: SocketAddr,
    admin: SocketAddr,
) -> anyhow::Result<Proc> {
    let mut c = Command::new(std::env::current_exe().context("locating the ferry binary")?);
    c.arg("proxy")
        .args(["--xds", &format!("http://{xds}")])
        .args(["--node-id", name])
        .args(["--listen", &listen.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--workers", "1"])
        .env("RUST_LOG", "info");
    Proc::spawn(name, c, dir)
}

pub fn envoy(
    dir: &Path,
    binary: &Path,
    xds: SocketAddr,
    admin: SocketAddr,
) -> anyhow::Result<Proc> {
    let bootstrap = ferry_xds::bootstrap::envoy_bootstrap_split(
        "demo-envoy",
        "ferry-demo",
        "DELTA_GRPC",
        xds,
        xds,
        admin,
    );
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, bootstrap).context("writing Envoy's bootstrap")?;
    let mut c = Command::new(binary);
    c.arg("-c")
        .arg(&path)
        .args(["--concurrency", "1", "-l", "warn"])
        .args(["--base-id", &admin.port().to_string()]);
    Proc::spawn("envoy", c, dir)
}
