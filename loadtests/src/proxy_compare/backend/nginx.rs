//! The nginx backend (`--backend nginx`, the default): an nginx of its own
//! answering every request with 200 and the run's body, HTTP/1.1 on one
//! port and h2c (prior knowledge) on another, with `stub_status` for the
//! count of connections it accepted. A body that fits in an nginx string
//! is answered with `return`; a larger one (nginx refuses parameters past
//! 4 KiB) from a file, kept open (`open_file_cache`) and sent with
//! `sendfile`.

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
/// The longest body (as an nginx string literal) answered with `return`.
const INLINE_MAX: usize = 2048;

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
    /// Starts nginx with `workers` workers on `cores`, its files in `dir`.
    pub fn start(
        binary: &Path,
        cores: &str,
        dir: &Path,
        body: &Bytes,
        workers: usize,
    ) -> anyhow::Result<Self> {
        let [h1, h2] = free_addrs()?;
        let text = std::str::from_utf8(body).context("the backend's body must be UTF-8")?;
        let answer = if nginx::quoted(text).len() <= INLINE_MAX {
            Answer::Inline(text)
        } else {
            let root = dir.join("www");
            std::fs::create_dir_all(&root)
                .with_context(|| format!("creating {}", root.display()))?;
            let file = root.join(BODY_FILE);
            std::fs::write(&file, body).with_context(|| format!("writing {}", file.display()))?;
            Answer::File(root)
        };
        let config = nginx::config(dir, workers, &http_block(h1, h2, &answer));
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

/// The body file's name, in the `www` directory.
const BODY_FILE: &str = "body";

/// How the backend answers.
enum Answer<'a> {
    /// `return 200` with the body.
    Inline(&'a str),
    /// The body file in this directory.
    File(std::path::PathBuf),
}

fn http_block(h1: SocketAddr, h2: SocketAddr, answer: &Answer<'_>) -> String {
    let location = match answer {
        Answer::Inline(body) => format!("return 200 {};", nginx::quoted(body)),
        Answer::File(root) => format!(
            "root {}; try_files /{BODY_FILE} =500; sendfile on; open_file_cache max=16 inactive=3600s; open_file_cache_valid 3600s;",
            nginx::quoted(&root.display().to_string())
        ),
    };
    format!(
        "    server {{
        listen {h1};
        listen {h2} http2;
        default_type text/plain;
        location / {{ {location} }}
        location = {STATUS_PATH} {{ stub_status; }}
    }}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_body_is_returned_a_large_one_served_from_a_file() {
        let (h1, h2) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let small = http_block(h1, h2, &Answer::Inline("hi\n"));
        assert!(
            small.contains("location / { return 200 \"hi\\n\"; }"),
            "{small}"
        );
        let large = http_block(h1, h2, &Answer::File("/tmp/x/www".into()));
        assert!(
            large.contains("root \"/tmp/x/www\"; try_files /body =500;"),
            "{large}"
        );
        assert!(large.contains("open_file_cache"), "{large}");
    }
}
