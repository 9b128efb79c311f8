//! The `ferry control` process under test: started on free loopback ports,
//! waited on until `/readyz` answers 200, sampled through `/proc`, and
//! killed when the guard is dropped, however the load test ends.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Linux reports process times in USER_HZ ticks, 100 per second on every
/// architecture Ferry runs on.
const USER_HZ: f64 = 100.0;

/// The `--listener-addr` of runs without an Envoy: served, never bound.
pub const UNBOUND_LISTENER: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10000));

/// How `ferry control` is started.
#[derive(Debug, Clone)]
pub struct FerryOptions {
    pub binary: PathBuf,
    pub catalog: PathBuf,
    pub debounce: Duration,
    /// Its `--listener-addr`: where the Envoys it configures listen.
    pub listener_addr: SocketAddr,
    /// `RUST_LOG` for the process.
    pub log_filter: String,
    /// Where its stdout and stderr go.
    pub log_file: PathBuf,
    /// More `ferry control` flags, after the ones every run gets.
    pub extra_args: Vec<String>,
}

/// A running `ferry control`; dropping it kills the process.
#[derive(Debug)]
pub struct FerryProcess {
    child: Child,
    pub pid: u32,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The traffic, migrations and campaigns gRPC API.
    pub api_addr: SocketAddr,
    log_file: PathBuf,
}

/// Resident memory and CPU time of a process at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    /// VmRSS.
    pub rss_bytes: u64,
    /// VmHWM: the peak resident size so far.
    pub peak_rss_bytes: u64,
    /// utime + stime since the process started.
    pub cpu_seconds: f64,
}

/// Three free loopback ports, held until all are picked.
fn free_ports() -> anyhow::Result<[SocketAddr; 3]> {
    let bind = || TcpListener::bind("127.0.0.1:0").context("finding a free port");
    let held = [bind()?, bind()?, bind()?];
    Ok([
        held[0].local_addr()?,
        held[1].local_addr()?,
        held[2].local_addr()?,
    ])
}

impl FerryProcess {
    /// Starts `ferry control` on free loopback ports.
    pub fn spawn(options: &FerryOptions) -> anyhow::Result<Self> {
        let [xds_addr, admin_addr, api_addr] = free_ports()?;
        let log = std::fs::File::create(&options.log_file)
            .with_context(|| format!("creating {}", options.log_file.display()))?;
        let child = Command::new(&options.binary)
            .arg("control")
            .arg("--catalog")
            .arg(&options.catalog)
            .arg("--xds-addr")
            .arg(xds_addr.to_string())
            .arg("--admin-addr")
            .arg(admin_addr.to_string())
            .arg("--listener-addr")
            .arg(options.listener_addr.to_string())
            .arg("--api-addr")
            .arg(api_addr.to_string())
            .arg("--data-dir")
            .arg(
                options
                    .log_file
                    .parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join("ferry-data"),
            )
            .arg("--debounce")
            .arg(humantime::format_duration(options.debounce).to_string())
            // Every simulated client connects from loopback, and many
            // share one HTTP/2 connection.
            .args(["--xds-max-streams-per-peer", "1000000"])
            .args(["--xds-max-streams-per-connection", "100000"])
            .args(&options.extra_args)
            .env("RUST_LOG", &options.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it with `cargo build --release -p ferry`)",
                    options.binary.display()
                )
            })?;
        Ok(Self {
            pid: child.id(),
            child,
            xds_addr,
            admin_addr,
            api_addr,
            log_file: options.log_file.clone(),
        })
    }

    /// Waits until `/readyz` answers 200; fails early if the process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "ferry exited before it was ready ({status}); its log ends with:\n{}",
                    self.log_tail(20)
                );
            }
            if let Ok((200, _)) = http_get(self.admin_addr, "/readyz").await {
                return Ok(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!(
            "ferry was not ready within {timeout:?}; its log ends with:\n{}",
            self.log_tail(20)
        )
    }

    /// Kills the process now (dropping the guard does the same).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Memory and CPU time of the process now.
    pub fn sample(&self) -> anyhow::Result<ProcSample> {
        sample_process(self.pid)
    }

    /// The whole `/metrics` page.
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        let (status, body) = http_get(self.admin_addr, "/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(body)
    }

    /// Prometheus lines (not histogram buckets) whose names start with one
    /// of `prefixes`, from `/metrics`.
    pub async fn metrics(&self, prefixes: &[&str]) -> anyhow::Result<Vec<String>> {
        let body = self.metrics_text().await?;
        Ok(body
            .lines()
            .filter(|l| prefixes.iter().any(|p| l.starts_with(p)) && !l.contains("_bucket"))
            .map(str::to_owned)
            .collect())
    }

    /// The last `lines` lines of the process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for FerryProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads VmRSS and VmHWM from `/proc/PID/status` and utime + stime from
/// `/proc/PID/stat`.
pub fn sample_process(pid: u32) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| n * 1024)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(ProcSample {
        rss_bytes: kib("VmRSS:").context("no VmRSS in /proc/PID/status")?,
        peak_rss_bytes: kib("VmHWM:").context("no VmHWM in /proc/PID/status")?,
        cpu_seconds: cpu_seconds(&stat).context("unexpected /proc/PID/stat format")?,
    })
}

/// utime + stime, in seconds, from the text of `/proc/PID/stat`.
fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields from the last ')'. Field 3 (state) is then index 0, so
    // utime (field 14) is index 11 and stime (field 15) index 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// A plain HTTP/1.0 GET (no chunked encoding to undo): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.take(64 * 1024 * 1024).read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET http://{addr}{path}: no HTTP status line"))?;
    Ok((status, body.to_owned()))
}

/// Whether `path` looks like an executable file.
pub fn check_binary(path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        path.is_file(),
        "{} does not exist: build it with `cargo build --release -p ferry` or pass --ferry",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_counts_from_the_last_parenthesis() {
        let stat = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(cpu_seconds("garbage"), None);
    }

    #[test]
    fn samples_this_process() {
        let s = sample_process(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0 && s.peak_rss_bytes >= s.rss_bytes);
    }
}
