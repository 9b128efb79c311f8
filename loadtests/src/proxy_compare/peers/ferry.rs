//! `ferry proxy --workers N`, configured by `ferry control` over delta
//! ADS. It counts the connections it makes to upstreams in its metrics
//! (`ferry_proxy_upstream_http1_connects_total`, per cluster).

use std::net::SocketAddr;
use std::path::Path;

use super::super::fixed_rate::admin_get;
use super::super::machine::pinned;
use super::super::process::{Process, free_addrs};
use super::super::upstream;
use super::{Peer, PeerKind, Setting};

pub fn start(setting: &Setting<'_>, core: &str, dir: &Path) -> anyhow::Result<Peer> {
    let [listen, admin] = free_addrs()?;
    let mut command = pinned(core, &setting.binaries.ferry);
    command
        .arg("proxy")
        .args(["--xds", &format!("http://{}", setting.xds)])
        .args(["--node-id", "proxy-compare-ferry"])
        .args(["--listen", &listen.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--workers", &setting.workers.to_string()])
        .env("RUST_LOG", "info");
    let process = Process::spawn("ferry proxy", command, dir.join("ferry-proxy.log"))?;
    Ok(Peer {
        kind: PeerKind::Ferry,
        h1: listen,
        h2: listen,
        admin: Some(admin),
        process: Some(process),
    })
}

/// The upstream connections the proxy made, from its admin `/metrics`.
pub async fn upstream_connections(admin: SocketAddr) -> anyhow::Result<u64> {
    let (status, page) = admin_get(admin, "/metrics").await?;
    anyhow::ensure!(status == 200, "ferry proxy /metrics: {status} {page}");
    Ok(upstream::ferry_upstream_connects(&page)?)
}
