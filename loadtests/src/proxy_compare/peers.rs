//! The proxies under test, `ferry proxy` and Envoy, both configured by the
//! same `ferry control` over delta ADS, both started under `taskset` on the
//! proxy core, and killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;

use super::fixed_rate::get_once;
use super::machine::pinned;
use crate::ferry::{self, ProcSample};

/// A proxy process; dropping it kills the process.
#[derive(Debug)]
pub struct ProxyProcess {
    pub name: &'static str,
    pub pid: u32,
    /// Where it takes user traffic.
    pub listen: SocketAddr,
    child: Child,
    spawned: Instant,
    log_file: PathBuf,
}

/// Free loopback ports, all held until every one is picked.
pub fn free_addrs<const N: usize>() -> anyhow::Result<[SocketAddr; N]> {
    let listeners = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut addrs = [SocketAddr::from(([127, 0, 0, 1], 0)); N];
    for (addr, listener) in addrs.iter_mut().zip(&listeners) {
        *addr = listener.local_addr()?;
    }
    Ok(addrs)
}

impl ProxyProcess {
    /// `ferry proxy` with one worker thread, on `core`.
    pub fn ferry(binary: &Path, xds: SocketAddr, core: usize, dir: &Path) -> anyhow::Result<Self> {
        let [listen, admin] = free_addrs()?;
        let log_file = dir.join("ferry-proxy.log");
        let mut command = pinned(&core.to_string(), binary);
        command
            .arg("proxy")
            .args(["--xds", &format!("http://{xds}")])
            .args(["--node-id", "proxy-compare-ferry"])
            .args(["--listen", &listen.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--workers", "1"])
            .env("RUST_LOG", "info");
        Self::spawn("ferry", command, listen, log_file)
    }

    /// Envoy with `--concurrency 1`, on `core`, taking everything over ADS
    /// from `xds`; it listens where the control plane's Listener says.
    pub fn envoy(
        binary: &Path,
        xds: SocketAddr,
        listen: SocketAddr,
        core: usize,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let [admin] = free_addrs()?;
        let bootstrap = dir.join("envoy-bootstrap.yaml");
        std::fs::write(
            &bootstrap,
            crate::envoy_bootstrap(
                "proxy-compare-envoy",
                "proxy-compare",
                "DELTA_GRPC",
                xds,
                admin,
            ),
        )
        .with_context(|| format!("writing {}", bootstrap.display()))?;
        let log_file = dir.join("envoy.log");
        let mut command = pinned(&core.to_string(), binary);
        command
            .arg("-c")
            .arg(&bootstrap)
            .args(["--concurrency", "1", "-l", "info"])
            .args(["--base-id", &admin.port().to_string()]);
        Self::spawn("envoy", command, listen, log_file)
    }

    fn spawn(
        name: &'static str,
        mut command: std::process::Command,
        listen: SocketAddr,
        log_file: PathBuf,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(&log_file)
            .with_context(|| format!("creating {}", log_file.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!("starting {name} under taskset (Debian package util-linux)")
            })?;
        Ok(Self {
            name,
            pid: child.id(),
            listen,
            child,
            spawned: Instant::now(),
            log_file,
        })
    }

    /// Waits until a request through the proxy for `host` gets 200 and
    /// `body` (the whole config has arrived and routes); the time from the
    /// process's start.
    pub async fn wait_routing(
        &mut self,
        host: &str,
        body: &Bytes,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        while started.elapsed() < timeout {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "{} exited ({status}); its log ends with:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            match get_once(self.listen, host, Duration::from_secs(2)).await {
                Ok((200, answer)) if answer == *body => return Ok(self.spawned.elapsed()),
                Ok((status, answer)) => {
                    last = format!("{status} {:?}", String::from_utf8_lossy(&answer));
                }
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "{} did not route {host} to the backend within {timeout:?} (last answer: {last}); its log ends with:\n{}",
            self.name,
            self.log_tail(20)
        )
    }

    pub fn sample(&self) -> anyhow::Result<ProcSample> {
        ferry::sample_process(self.pid)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log_file(&self) -> &Path {
        &self.log_file
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `envoy --version`'s version field (`1.40.0/Clean/RELEASE/BoringSSL`).
pub fn envoy_version(binary: &Path) -> anyhow::Result<String> {
    let output = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "running {} --version (set FERRY_ENVOY or pass --envoy)",
                binary.display()
            )
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split("version:")
        .nth(1)
        .map(str::trim)
        .and_then(|v| v.split_once('/').map(|(_, rest)| rest.to_owned()))
        .with_context(|| format!("unexpected `envoy --version` output: {text}"))?;
    Ok(version)
}
