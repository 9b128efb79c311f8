//! The real `ferry proxy`, taking its config over xDS.

use super::*;

/// `ferry proxy` taking its config from an xDS server on `xds_port`.
pub struct FerryProxy {
    pub listen_port: u16,
    pub admin_port: u16,
    pub node_id: String,
    dir: tempfile::TempDir,
    proc: Proc,
}

impl FerryProxy {
    pub async fn start(xds_port: u16) -> Self {
        Self::start_with(xds_port, &[]).await
    }

    /// Starts a proxy with `extra` command-line flags.
    pub async fn start_with(xds_port: u16, extra: &[&str]) -> Self {
        let proxy = Self::spawn(&format!("http://127.0.0.1:{xds_port}"), None, extra);
        proxy.wait_ready().await;
        proxy
    }

    /// Starts a proxy taking its config from `xds` (a URL) as `node_id`
    /// (default: one of its own), and returns at once: it may never get
    /// a config.
    pub fn spawn(xds: &str, node_id: Option<&str>, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listen_port, admin_port) = (free_port(), free_port());
        let node_id = node_id.map_or_else(|| format!("ferry-proxy-{listen_port}"), str::to_owned);
        let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log");
        let proc = Proc::spawn(
            Command::new(env!("CARGO_BIN_EXE_ferry"))
                .arg("proxy")
                .args(["--xds", xds])
                .args(["--node-id", &node_id])
                .args(["--listen", &format!("127.0.0.1:{listen_port}")])
                .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
                .args(["--workers", "2"])
                .args(extra)
                .env("RUST_LOG", "info,ferry_xds=debug")
                .stdout(Stdio::null())
                .stderr(log),
        );
        Self {
            listen_port,
            admin_port,
            node_id,
            dir,
            proc,
        }
    }

    /// Waits until the proxy has a config (`/ready` answers 200).
    pub async fn wait_ready(&self) {
        let port = self.admin_port;
        eventually(
            Duration::from_secs(20),
            "ferry proxy /ready",
            || async move { matches!(http_get(port, "localhost", "/ready").await, Ok((200, _))) },
        )
        .await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    pub async fn admin(&self, path: &str) -> String {
        http_get(self.admin_port, "localhost", path)
            .await
            .expect("proxy admin")
            .1
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }
}
