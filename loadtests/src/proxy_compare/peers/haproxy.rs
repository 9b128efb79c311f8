//! HAProxy as a peer: `nbthread N` (one by default), `http-reuse always`,
//! HTTP/1.1 to the backend. Its HTTP/1.1 bind takes h2c prior knowledge
//! too (HAProxy detects the HTTP/2 preface). A second frontend serves the
//! stats CSV, read for the upstream connection count.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

use super::super::fixed_rate::admin_get;
use super::super::machine::pinned;
use super::super::process::{Process, free_addrs};
use super::super::upstream;
use super::{Peer, PeerKind, Setting};

/// The Debian package holding HAProxy.
pub const PACKAGE: &str = "haproxy";
/// The `backend` section routing to the backend.
const BACKEND: &str = "backend";

pub fn start(setting: &Setting<'_>, core: &str, dir: &Path) -> anyhow::Result<Peer> {
    let [listen, stats] = free_addrs()?;
    let file = dir.join("haproxy.cfg");
    std::fs::write(
        &file,
        config(listen, stats, setting.backend_h1, setting.workers),
    )
    .with_context(|| format!("writing {}", file.display()))?;
    let mut command = pinned(core, &setting.binaries.haproxy);
    // -db: stay in the foreground, no daemon, no master process.
    command.arg("-db").arg("-f").arg(&file);
    let process = Process::spawn("haproxy", command, dir.join("haproxy.log"))?;
    Ok(Peer {
        kind: PeerKind::Haproxy,
        h1: listen,
        h2: listen,
        admin: Some(stats),
        process: Some(process),
    })
}

fn config(listen: SocketAddr, stats: SocketAddr, backend: SocketAddr, threads: usize) -> String {
    format!(
        "global
    nbthread {threads}
    # Within the file descriptor limit a test run gets (2 per connection).
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always

frontend proxy
    bind {listen}
    default_backend {BACKEND}

frontend stats
    bind {stats}
    stats enable
    stats uri /stats

backend {BACKEND}
    server s1 {backend}
"
    )
}

/// The `connect` column of the backend's servers in the stats CSV.
pub async fn upstream_connections(stats: SocketAddr) -> anyhow::Result<u64> {
    let (status, csv) = admin_get(stats, "/stats;csv").await?;
    anyhow::ensure!(status == 200, "haproxy /stats;csv: {status} {csv}");
    Ok(upstream::haproxy_connects(&csv, BACKEND)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_as_asked_and_connections_reused() {
        let text = config(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            "127.0.0.1:3".parse().unwrap(),
            1,
        );
        assert!(text.contains("nbthread 1\n"), "{text}");
        assert!(text.contains("http-reuse always\n"), "{text}");
        assert!(text.contains("server s1 127.0.0.1:3\n"), "{text}");
        assert!(text.contains("bind 127.0.0.1:1\n"), "{text}");
        let two = config(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            "127.0.0.1:3".parse().unwrap(),
            2,
        );
        assert!(two.contains("nbthread 2\n"), "{two}");
    }
}
