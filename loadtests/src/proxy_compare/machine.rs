//! The machine a run measured, and the CPU pinning that keeps the proxy
//! under test on its own cores: processes start under `taskset -c`, and
//! the in-process load threads pin themselves with `taskset -p -c`.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;

use anyhow::Context;
use serde::Serialize;

/// What the figures were measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Cores this process may run on.
    pub cores: usize,
    /// `/proc/sys/kernel/osrelease`.
    pub kernel: String,
    /// `MemTotal` from `/proc/meminfo`.
    pub memory_bytes: u64,
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpu_model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".to_owned()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned()),
            memory_bytes: field(&meminfo, "MemTotal")
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024),
        }
    }
}

/// Cores the whole machine kept busy over `period` (from `/proc/stat`):
/// another process's work on a machine meant to be quiet shows here.
pub async fn busy_cores(period: std::time::Duration) -> Option<f64> {
    let before = cpu_jiffies()?;
    tokio::time::sleep(period).await;
    let after = cpu_jiffies()?;
    let total = after.1.checked_sub(before.1)?;
    let busy = after.0.checked_sub(before.0)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(busy as f64 / total.max(1) as f64 * cores as f64)
}

/// Where one core's time went over a period, as shares of the period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CoreTime {
    /// user + nice + system: processes, whichever they are.
    pub processes: f64,
    /// irq + softirq: packet processing the kernel does not charge to a
    /// process.
    pub interrupts: f64,
    /// Taken by the hypervisor.
    pub steal: f64,
    pub idle: f64,
}

/// The jiffies of `cores`' `cpuN` lines of `/proc/stat`, summed: user
/// nice system idle iowait irq softirq steal.
pub fn cores_jiffies(cores: &CoreList) -> Option<[u64; 8]> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut sum = [0u64; 8];
    for core in cores.iter() {
        let name = format!("cpu{core}");
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
        let values: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|w| w.parse().ok())
            .collect::<Option<_>>()?;
        for (total, value) in sum.iter_mut().zip(values) {
            *total += value;
        }
    }
    Some(sum)
}

impl CoreTime {
    /// Between two [`core_jiffies`] readings.
    pub fn between(before: [u64; 8], after: [u64; 8]) -> Self {
        let d: Vec<f64> = after
            .iter()
            .zip(before)
            .map(|(a, b)| a.saturating_sub(b) as f64)
            .collect();
        let total = d.iter().sum::<f64>().max(1.0);
        Self {
            processes: (d[0] + d[1] + d[2]) / total,
            interrupts: (d[5] + d[6]) / total,
            steal: d[7] / total,
            idle: (d[3] + d[4]) / total,
        }
    }
}

/// (busy, total) jiffies of every core, from the `cpu` line of
/// `/proc/stat`: busy is all but idle and iowait.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(stat.lines().next()?)
}

fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut words = line.split_whitespace();
    (words.next()? == "cpu").then_some(())?;
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user).
    let values: Vec<u64> = words
        .take(8)
        .map(|w| w.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = values.iter().sum();
    let idle = values.get(3)? + values.get(4)?;
    Some((total - idle, total))
}

/// The value of the first `key: value` line of a `/proc` text file.
fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}

/// A set of cores, as `taskset -c` takes them: `0`, `0-1`, `0,2-3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreList(BTreeSet<usize>);

/// Why a core list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreListError {
    #[error("a core list must name at least one core")]
    Empty,
    #[error("{0:?} is not a core number or a range of them (`0`, `0-1`, `0,2-3`)")]
    NotACore(String),
    #[error("the range {0:?} runs backwards")]
    Backwards(String),
}

impl CoreList {
    /// Cores `0` to `n - 1`; `0` alone for `n` = 0.
    pub fn first(n: usize) -> Self {
        Self((0..n.max(1)).collect())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().copied()
    }

    pub fn contains(&self, core: usize) -> bool {
        self.0.contains(&core)
    }

    /// The largest core named.
    pub fn max(&self) -> usize {
        self.0.last().copied().unwrap_or(0)
    }
}

impl FromStr for CoreList {
    type Err = CoreListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cores = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let number = |n: &str| {
                n.trim()
                    .parse::<usize>()
                    .map_err(|_| CoreListError::NotACore(part.to_owned()))
            };
            match part.split_once('-') {
                Some((from, to)) => {
                    let (from, to) = (number(from)?, number(to)?);
                    if from > to {
                        return Err(CoreListError::Backwards(part.to_owned()));
                    }
                    cores.extend(from..=to);
                }
                None => {
                    cores.insert(number(part)?);
                }
            }
        }
        if cores.is_empty() {
            return Err(CoreListError::Empty);
        }
        Ok(Self(cores))
    }
}

impl fmt::Display for CoreList {
    /// Runs of consecutive cores as ranges: `0-1`, `0,2-3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for core in self.iter() {
            match runs.last_mut() {
                Some((_, end)) if *end + 1 == core => *end = core,
                _ => runs.push((core, core)),
            }
        }
        let text: Vec<String> = runs
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        f.write_str(&text.join(","))
    }
}

/// Every core but the proxy's, as a `taskset` list (`1`, `1-3`, `0,2-7`),
/// and whether that leaves none, so the load shares the proxy's cores
/// (then every core of the machine is the load's).
pub fn other_cores(proxy: &CoreList, cores: usize) -> (String, bool) {
    let others: BTreeSet<usize> = (0..cores).filter(|c| !proxy.contains(*c)).collect();
    if others.is_empty() {
        (CoreList::first(cores).to_string(), true)
    } else {
        (CoreList(others).to_string(), false)
    }
}

/// Fails, naming the Debian package to install, when `tool` is not on
/// the `PATH`.
pub fn require_tool(tool: &str, package: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    anyhow::ensure!(
        found,
        "`{tool}` is not installed: install the Debian package `{package}` (apt-get install {package})"
    );
    Ok(())
}

/// A command that runs `program` on `cores` only.
pub fn pinned(cores: &str, program: impl AsRef<Path>) -> Command {
    let mut command = Command::new("taskset");
    command.arg("-c").arg(cores).arg(program.as_ref());
    command
}

/// Pins the calling thread (only it, and the threads it starts later) to
/// `cores`.
pub fn pin_current_thread(cores: &str) -> anyhow::Result<()> {
    let link = std::fs::read_link("/proc/thread-self").context("reading /proc/thread-self")?;
    let tid = link
        .file_name()
        .and_then(|t| t.to_str())
        .context("/proc/thread-self does not name a thread")?
        .to_owned();
    let status = Command::new("taskset")
        .args(["-p", "-c", cores, &tid])
        .stdout(Stdio::null())
        .status()
        .context("running taskset (Debian package util-linux)")?;
    anyhow::ensure!(status.success(), "taskset -p -c {cores} {tid}: {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cores(text: &str) -> CoreList {
        text.parse().unwrap()
    }

    #[test]
    fn the_load_gets_every_other_core() {
        assert_eq!(other_cores(&cores("0"), 2), ("1".to_owned(), false));
        assert_eq!(other_cores(&cores("1"), 4), ("0,2-3".to_owned(), false));
        assert_eq!(other_cores(&cores("0-1"), 4), ("2-3".to_owned(), false));
        // No core left: the load shares the proxy's, and says so.
        assert_eq!(other_cores(&cores("0"), 1), ("0".to_owned(), true));
        assert_eq!(other_cores(&cores("0-1"), 2), ("0-1".to_owned(), true));
    }

    #[test]
    fn core_lists_read_as_taskset_writes_them() {
        assert_eq!(cores("0").iter().collect::<Vec<_>>(), [0]);
        assert_eq!(cores("0-1").iter().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(cores("3,0-1").to_string(), "0-1,3");
        assert_eq!(cores("0,1,2").to_string(), "0-2");
        assert_eq!(CoreList::first(2), cores("0-1"));
        assert_eq!(cores("2-3").max(), 3);
        assert_eq!("".parse::<CoreList>(), Err(CoreListError::Empty));
        assert_eq!(
            "a".parse::<CoreList>(),
            Err(CoreListError::NotACore("a".into()))
        );
        assert_eq!(
            "3-1".parse::<CoreList>(),
            Err(CoreListError::Backwards("3-1".into()))
        );
    }

    #[test]
    fn reads_proc_fields() {
        let text = "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t: a b\n";
        assert_eq!(field(text, "model name").unwrap(), "Some CPU @ 2.0GHz");
        assert_eq!(field(text, "missing"), None);
    }

    #[test]
    fn busy_is_all_but_idle_and_iowait() {
        let line = "cpu  100 5 20 800 10 1 2 3 0 0";
        assert_eq!(parse_cpu_line(line), Some((131, 941)));
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8"), None);
    }

    #[test]
    fn core_time_is_shared_out() {
        let t = CoreTime::between([0; 8], [10, 0, 10, 50, 0, 5, 15, 10]);
        assert_eq!(
            (t.processes, t.interrupts, t.steal, t.idle),
            (0.2, 0.2, 0.1, 0.5)
        );
        let one = cores_jiffies(&cores("0")).unwrap();
        assert!(one.iter().sum::<u64>() > 0);
    }

    #[test]
    fn a_missing_tool_names_its_package() {
        let err = require_tool("no-such-tool-here", "some-package").unwrap_err();
        assert!(err.to_string().contains("some-package"), "{err}");
    }
}
