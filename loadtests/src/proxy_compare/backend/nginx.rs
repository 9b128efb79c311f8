//! The nginx backend (`--backend nginx`, the default): an nginx of its own
//! answering every request with 200 and a fixed small body, HTTP/1.1 on
//! one port and h2c (prior knowledge) on another, with `stub_status` for
//! the count of connections it accepted.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use bytes::Bytes;

use super::super::fixed_rate::admin_get;
use super::super::nginx;
use super::super::process::{Process, free_addrs};
use super::super::upstream;

/// Where `stub_status` answers.
const STATUS_PATH: &str = "/ferry-backend-status";

/// A running nginx backend; dropping it stops nginx.
#[derive(Debug)]
pub struct NginxBackend {
    pub h1: SocketAddr,
    pub h2: SocketAddr,
    process: Process,
    /// `stub_status` reads so far: each is a connection of its own, which
    /// [`NginxBackend::accepted`] leaves out.
    status_reads: u64,
}

impl NginxBackend {
    /// Starts nginx on `cores`, its files in `dir`.
    pub fn start(binary: &Path, cores: &str, dir: &Path, body: &Bytes) -> anyhow::Result<Self> {
        let [h1, h2] = free_addrs()?;
        let text = std::str::from_utf8(body).context("the backend's body must be UTF-8")?;
        let config = nginx::config(dir, &http_block(h1, h2, text));
        let process = nginx::spawn("nginx backend", binary, cores, dir, &config)?;
        Ok(Self {
            h1,
            h2,
            process,
            status_reads: 0,
        })
    }

    /// Connections accepted so far, its own status reads left out.
    pub async fn accepted(&mut self) -> anyhow::Result<u64> {
        self.process.check_running()?;
        let (status, page) = admin_get(self.h1, STATUS_PATH).await?;
        self.status_reads += 1;
        anyhow::ensure!(
            status == 200,
            "nginx backend {STATUS_PATH}: {status} {page}"
        );
        let accepts = upstream::nginx_accepts(&page)?;
        Ok(accepts.saturating_sub(self.status_reads))
    }

    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}

fn http_block(h1: SocketAddr, h2: SocketAddr, body: &str) -> String {
    format!(
        "    server {{
        listen {h1};
        listen {h2} http2;
        default_type text/plain;
        location / {{ return 200 {body}; }}
        location = {STATUS_PATH} {{ stub_status; }}
    }}
",
        body = nginx::quoted(body)
    )
}
