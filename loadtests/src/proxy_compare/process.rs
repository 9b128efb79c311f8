//! A process the comparison starts (a peer, the nginx backend): started
//! under `taskset` on the cores it is given, its output in a log file,
//! killed when dropped, however the test ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::ferry::{self, ProcSample};

/// A running process; dropping it kills it.
#[derive(Debug)]
pub struct Process {
    pub name: &'static str,
    pub pid: u32,
    child: Child,
    spawned: Instant,
    log_file: PathBuf,
}

impl Process {
    /// Runs `command` with its stdout and stderr in `log_file`.
    pub fn spawn(
        name: &'static str,
        mut command: Command,
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
            child,
            spawned: Instant::now(),
            log_file,
        })
    }

    /// Since it was started.
    pub fn age(&self) -> Duration {
        self.spawned.elapsed()
    }

    /// Fails, with the end of its log, if it has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                self.log_tail(20)
            );
        }
        Ok(())
    }

    pub fn sample(&self) -> anyhow::Result<ProcSample> {
        ferry::sample_process(self.pid)
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

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// The first line of a command's output (stdout, else stderr): tools print
/// their version on either.
pub fn version_line(binary: &Path, arg: &str) -> anyhow::Result<String> {
    let output = Command::new(binary)
        .arg(arg)
        .output()
        .with_context(|| format!("running {} {arg}", binary.display()))?;
    let text = if output.stdout.is_empty() {
        output.stderr
    } else {
        output.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .with_context(|| format!("{} {arg} printed nothing", binary.display()))
}
