//! A process the comparison starts (a peer, the nginx backend): started
//! under `taskset` on the cores it is given, its output in a log file,
//! killed when dropped with every process it started (nginx's workers),
//! however the test ends.

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

    /// Its memory and CPU, with those of its descendants (nginx's workers).
    pub fn sample(&self) -> anyhow::Result<ProcSample> {
        sample_tree(self.pid)
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
        // Found first: once it is killed, its children are re-parented.
        let descendants = descendants(self.pid);
        let _ = self.child.kill();
        if !descendants.is_empty() {
            let pids: Vec<String> = descendants.iter().map(u32::to_string).collect();
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--"])
                .args(&pids)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.wait();
    }
}

/// The parent of `pid`, from `/proc/PID/stat`.
fn parent(stat: &str) -> Option<u32> {
    // The command name (field 2) is in parentheses and may hold spaces;
    // after it come the state and the parent's pid.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Every live process descended from `pid` (children, theirs, …).
pub fn descendants(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            Some((p, parent(&stat)?))
        })
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(at) = frontier.pop() {
        for &(child, _) in parents.iter().filter(|(_, parent)| *parent == at) {
            if !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}

/// [`ferry::sample_process`] of `pid` and every descendant, summed. The
/// resident sizes of several processes count the pages they share once
/// per process.
pub fn sample_tree(pid: u32) -> anyhow::Result<ProcSample> {
    let mut total = ferry::sample_process(pid)?;
    for child in descendants(pid) {
        // A child may end between the listing and the reading.
        if let Ok(s) = ferry::sample_process(child) {
            total.rss_bytes += s.rss_bytes;
            total.peak_rss_bytes += s.peak_rss_bytes;
            total.cpu_seconds += s.cpu_seconds;
        }
    }
    Ok(total)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_parent_past_a_name_with_spaces() {
        assert_eq!(parent("42 (nginx: worker process) S 41 42 1 0"), Some(41));
        assert_eq!(parent("garbage"), None);
    }

    #[test]
    fn finds_and_kills_the_children_it_started() {
        let mut command = Command::new("sh");
        // A shell with a child of its own that would outlive it.
        command.args(["-c", "sleep 60 & wait"]);
        let dir = tempfile::tempdir().unwrap();
        let process = Process::spawn("sh", command, dir.path().join("sh.log")).unwrap();
        let mut children = Vec::new();
        for _ in 0..100 {
            children = descendants(process.pid);
            if !children.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(children.len(), 1, "the shell's sleep");
        let both = sample_tree(process.pid).unwrap();
        let alone = ferry::sample_process(process.pid).unwrap();
        assert!(both.rss_bytes > alone.rss_bytes);
        drop(process);
        // Killed with its parent, reaped by init soon after.
        let gone = (0..100).any(|_| {
            let state = std::fs::read_to_string(format!("/proc/{}/stat", children[0]));
            let dead = state.map_or(true, |s| s.contains(") Z "));
            if !dead {
                std::thread::sleep(Duration::from_millis(20));
            }
            dead
        });
        assert!(gone, "the child outlived its parent");
    }
}
