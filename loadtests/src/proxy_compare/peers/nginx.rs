//! nginx as a peer: `proxy_pass` to an upstream block holding keep-alive
//! connections, HTTP/1.1 to the backend, `worker_processes N` (one
//! worker: one process, `master_process off`). Answers are passed on as
//! they come, never spilled to a temporary file
//! (`proxy_max_temp_file_size 0`), as the other peers stream them.
//! nginx 1.22 (Debian 12) serves h2c only on a listener of its own
//! (`listen … http2`), hence two ports.

use std::net::SocketAddr;
use std::path::Path;

use super::super::nginx;
use super::super::process::free_addrs;
use super::{Peer, PeerKind, Setting};

pub fn start(setting: &Setting<'_>, core: &str, dir: &Path) -> anyhow::Result<Peer> {
    let [h1, h2] = free_addrs()?;
    let config = nginx::config(
        dir,
        setting.workers,
        &http_block(h1, h2, setting.backend_h1),
    );
    let process = nginx::spawn("nginx", &setting.binaries.nginx, core, dir, &config)?;
    Ok(Peer {
        kind: PeerKind::Nginx,
        h1,
        h2,
        admin: None,
        process: Some(process),
    })
}

fn http_block(h1: SocketAddr, h2: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "    upstream backend {{
        server {backend};
        # Idle connections kept per worker: more than any run's concurrency.
        keepalive 1024;
        keepalive_requests 1000000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {h1};
        listen {h2} http2;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
            proxy_max_temp_file_size 0;
        }}
    }}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_with_upstream_keepalive() {
        let text = http_block(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            "127.0.0.1:3".parse().unwrap(),
        );
        assert!(text.contains("server 127.0.0.1:3;"), "{text}");
        assert!(text.contains("keepalive 1024;"), "{text}");
        assert!(text.contains("proxy_http_version 1.1;"), "{text}");
        assert!(text.contains("proxy_set_header Connection \"\";"), "{text}");
        assert!(text.contains("listen 127.0.0.1:2 http2;"), "{text}");
        assert!(text.contains("proxy_max_temp_file_size 0;"), "{text}");
    }
}
