//! Closed-loop saturation runs with the standard tools: `wrk` for HTTP/1.1
//! keep-alive, `h2load` for HTTP/2 cleartext (prior knowledge), each run
//! under `taskset` on the load cores, and their summaries parsed.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::machine::pinned;

/// The HTTP version of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    #[serde(rename = "http/1.1")]
    Http1,
    #[serde(rename = "h2c")]
    Http2,
}

impl Protocol {
    /// The tool that loads it, and the Debian package holding the tool.
    pub fn tool(self) -> (&'static str, &'static str) {
        match self {
            Self::Http1 => ("wrk", "wrk"),
            Self::Http2 => ("h2load", "nghttp2-client"),
        }
    }
}

/// One saturation run.
#[derive(Debug, Clone)]
pub struct Load {
    pub protocol: Protocol,
    pub addr: SocketAddr,
    /// The `Host` header (`:authority` in HTTP/2).
    pub host: String,
    /// Whole seconds (both tools count in seconds).
    pub duration: Duration,
    pub connections: usize,
    /// Concurrent streams per connection (HTTP/2 only).
    pub streams: usize,
    /// The tool's threads (`-t`), at most `connections`.
    pub threads: usize,
}

/// What the tool reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Measured {
    /// Completed requests (any status).
    pub requests: u64,
    pub rps: f64,
    /// Answers that were not 2xx (`wrk`: not 2xx or 3xx).
    pub non_2xx: u64,
    /// Connect, read, write errors and timeouts; HTTP/2 requests that failed.
    pub errors: u64,
    /// `wrk`'s latency distribution (p50, p90, p99), in ms; HTTP/2: mean only.
    pub latency_ms: Vec<(String, f64)>,
}

impl Measured {
    /// Failed requests per attempted request.
    pub fn error_share(&self) -> f64 {
        (self.non_2xx + self.errors) as f64 / (self.requests + self.errors).max(1) as f64
    }
}

/// Whole seconds, at least one.
fn seconds(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// Runs the tool for `load` on `cores`; fails if it fails or its output
/// cannot be read.
pub async fn run(load: &Load, cores: &str) -> anyhow::Result<Measured> {
    let secs = seconds(load.duration);
    let url = format!("http://{}/", load.addr);
    let (tool, package) = load.protocol.tool();
    let mut command = pinned(cores, tool);
    let threads = format!("-t{}", load.threads.clamp(1, load.connections.max(1)));
    match load.protocol {
        Protocol::Http1 => command
            .arg(&threads)
            .arg(format!("-c{}", load.connections))
            .arg(format!("-d{secs}s"))
            .args(["--timeout", "5s", "--latency"])
            .args(["-H", &format!("Host: {}", load.host)])
            .arg(&url),
        Protocol::Http2 => command
            .arg(&threads)
            .arg(format!("-c{}", load.connections))
            .arg(format!("-m{}", load.streams))
            .arg(format!("-D{secs}"))
            .args(["-H", &format!(":authority: {}", load.host)])
            .arg(&url),
    };
    let mut command = tokio::process::Command::from(command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(secs + 30), command.output())
        .await
        .with_context(|| format!("{tool} did not finish within {} s", secs + 30))?
        .with_context(|| format!("running {tool} (Debian package {package})"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "{tool} failed ({}): {}{}",
        output.status,
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed = match load.protocol {
        Protocol::Http1 => parse_wrk(&stdout),
        Protocol::Http2 => parse_h2load(&stdout),
    };
    parsed.with_context(|| format!("unexpected {tool} output:\n{stdout}"))
}

/// The numbers following `key` on the first line holding it.
fn numbers_after<'a>(text: &'a str, key: &str) -> Option<Vec<&'a str>> {
    let line = text.lines().find(|l| l.contains(key))?;
    let rest = &line[line.find(key)? + key.len()..];
    Some(
        rest.split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty())
            .collect(),
    )
}

/// `1.23ms`, `456.00us`, `2.00s` as milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(n / 1e3),
        "ms" => Some(n),
        "s" => Some(n * 1e3),
        "m" => Some(n * 60e3),
        _ => None,
    }
}

fn parse_wrk(out: &str) -> Option<Measured> {
    let requests = out
        .lines()
        .find(|l| l.contains("requests in"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let rps = numbers_after(out, "Requests/sec:")?.first()?.parse().ok()?;
    let non_2xx = match numbers_after(out, "Non-2xx or 3xx responses:") {
        Some(n) => n.first()?.parse().ok()?,
        None => 0,
    };
    let errors = match numbers_after(out, "Socket errors:") {
        // connect N, read N, write N, timeout N
        Some(words) => words.iter().filter_map(|w| w.parse::<u64>().ok()).sum(),
        None => 0,
    };
    let latency_ms = ["50%", "90%", "99%"]
        .iter()
        .filter_map(|p| {
            let line = out.lines().find(|l| l.trim_start().starts_with(p))?;
            let value = duration_ms(line.split_whitespace().nth(1)?)?;
            Some((format!("p{}", p.trim_end_matches('%')), value))
        })
        .collect();
    Some(Measured {
        requests,
        rps,
        non_2xx,
        errors,
        latency_ms,
    })
}

fn parse_h2load(out: &str) -> Option<Measured> {
    // finished in 10.00s, 12345.67 req/s, 1.23MB/s
    let finished = numbers_after(out, "finished in")?;
    let rps: f64 = finished.get(1)?.parse().ok()?;
    // requests: T total, S started, D done, OK succeeded, F failed, E errored, X timeout
    let requests = numbers_after(out, "requests:")?;
    let count = |label: &str| -> Option<u64> {
        let at = requests.iter().position(|w| *w == label)?;
        requests.get(at.checked_sub(1)?)?.parse().ok()
    };
    let done = count("done")?;
    let errors = count("failed")? + count("errored")? + count("timeout")?;
    // status codes: A 2xx, B 3xx, C 4xx, D 5xx
    let codes = numbers_after(out, "status codes:")?;
    let code = |label: &str| -> Option<u64> {
        let at = codes.iter().position(|w| *w == label)?;
        codes.get(at.checked_sub(1)?)?.parse().ok()
    };
    let non_2xx = code("3xx")? + code("4xx")? + code("5xx")?;
    let mean = numbers_after(out, "time for request:")
        .and_then(|w| Some(("mean".to_owned(), duration_ms(w.get(2)?)?)));
    Some(Measured {
        requests: done,
        rps,
        non_2xx,
        errors,
        latency_ms: mean.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 1s test @ http://127.0.0.1:18777/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   617.23us    9.48ms  51.56ms   74.00%
    Req/Sec    34.50k     1.26k   36.00k    50.00%
  Latency Distribution
     50%  515.32us
     75%  720.70us
     90%    1.92ms
     99%    5.76ms
  344567 requests in 10.00s, 41.11MB read
  Non-2xx or 3xx responses: 12
  Socket errors: connect 0, read 3, write 0, timeout 2
Requests/sec:  34456.36
Transfer/sec:      4.10MB
";

    const H2LOAD: &str = "finished in 10.00s, 52345.60 req/s, 1.23MB/s
requests: 523456 total, 523460 started, 523456 done, 523450 succeeded, 6 failed, 1 errored, 0 timeout
status codes: 523450 2xx, 0 3xx, 4 4xx, 2 5xx
traffic: 680B (680) total, 0B (0) headers (space savings 0.00%), 0B (0) data
                     min         max         mean         sd        +/- sd
time for request:      101us     12.30ms       297us       137us    90.00%
time for connect:      137us       332us       234us       137us   100.00%
";

    #[test]
    fn reads_wrk() {
        let m = parse_wrk(WRK).unwrap();
        assert_eq!((m.requests, m.non_2xx, m.errors), (344_567, 12, 5));
        assert_eq!(m.rps, 34_456.36);
        assert_eq!(
            m.latency_ms,
            vec![
                ("p50".to_owned(), 0.51532),
                ("p90".to_owned(), 1.92),
                ("p99".to_owned(), 5.76)
            ]
        );
        let clean = WRK
            .lines()
            .filter(|l| !l.contains("Non-2xx") && !l.contains("Socket errors"))
            .collect::<Vec<_>>()
            .join("\n");
        let m = parse_wrk(&clean).unwrap();
        assert_eq!((m.non_2xx, m.errors), (0, 0));
        assert!(parse_wrk("garbage").is_none());
    }

    #[test]
    fn reads_h2load() {
        let m = parse_h2load(H2LOAD).unwrap();
        assert_eq!((m.requests, m.non_2xx, m.errors), (523_456, 6, 7));
        assert_eq!(m.rps, 52_345.6);
        assert_eq!(m.latency_ms, vec![("mean".to_owned(), 0.297)]);
        assert!(parse_h2load("finished in 1s").is_none());
    }

    #[test]
    fn errors_are_a_share_of_attempts() {
        let m = Measured {
            requests: 98,
            non_2xx: 1,
            errors: 2,
            ..Measured::default()
        };
        assert_eq!(m.error_share(), 0.03);
    }
}
