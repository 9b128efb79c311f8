//! `ferry proxy --workers 1`, configured by `ferry control` over delta
//! ADS. It exports no count of HTTP/1.1 upstream connections (only
//! `ferry_proxy_upstream_http2_connects_total`, for HTTP/2 upstreams), so
//! the backend's count is the one for it.

use std::path::Path;

use super::super::machine::pinned;
use super::super::process::{Process, free_addrs};
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
        .args(["--workers", "1"])
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
