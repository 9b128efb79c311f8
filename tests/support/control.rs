//! The real `ferry control`: started on ephemeral loopback ports, and
//! driven through its CLI and API.

use super::*;

/// `ferry control` on ephemeral loopback ports, with its catalog in a
/// temporary directory.
pub struct Ferry {
    pub dir: tempfile::TempDir,
    pub catalog: PathBuf,
    pub xds_port: u16,
    pub admin_port: u16,
    pub listener_port: u16,
    pub api_port: u16,
    /// Extra `ferry control` flags.
    extra: Vec<String>,
    proc: Proc,
}

impl Ferry {
    pub async fn start(catalog_yaml: &str) -> Self {
        Self::start_with(catalog_yaml, &[]).await
    }

    /// Starts with extra `ferry control` flags.
    pub async fn start_with(catalog_yaml: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let catalog = dir.path().join("catalog.yaml");
        std::fs::write(&catalog, catalog_yaml).expect("write catalog");
        Self::start_in(dir, catalog, extra).await
    }

    /// Starts on a catalog path the caller laid out in `dir` (a symlink
    /// into a ConfigMap-style directory, say).
    pub async fn start_in(dir: tempfile::TempDir, catalog: PathBuf, extra: &[&str]) -> Self {
        let mut ferry = Self {
            dir,
            catalog,
            xds_port: free_port(),
            admin_port: free_port(),
            listener_port: free_port(),
            api_port: free_port(),
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            proc: Proc(None),
        };
        // A port picked free can be taken by another test before ferry
        // binds it; ferry then exits at once, and gets fresh ports.
        for _ in 0..3 {
            ferry.launch();
            if ferry.ready_or_exited().await {
                return ferry;
            }
            ferry.xds_port = free_port();
            ferry.admin_port = free_port();
            ferry.listener_port = free_port();
            ferry.api_port = free_port();
        }
        panic!("ferry control did not start:\n{}", ferry.log());
    }

    /// Waits for /readyz; false if the process exited first.
    async fn ready_or_exited(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.proc.exited() {
                return false;
            }
            if matches!(
                http_get(self.admin_port, "localhost", "/readyz").await,
                Ok((200, _))
            ) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "timed out after 20s waiting for ferry /readyz:\n{}",
            self.log()
        );
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("ferry.log"))
            .expect("log file");
        self.proc = Proc::spawn(
            Command::new(env!("CARGO_BIN_EXE_ferry"))
                .arg("control")
                .arg("--catalog")
                .arg(&self.catalog)
                .args(["--xds-addr", &format!("127.0.0.1:{}", self.xds_port)])
                .args(["--admin-addr", &format!("127.0.0.1:{}", self.admin_port)])
                .args([
                    "--listener-addr",
                    &format!("127.0.0.1:{}", self.listener_port),
                ])
                .args(["--api-addr", &format!("127.0.0.1:{}", self.api_port)])
                .arg("--data-dir")
                .arg(self.dir.path().join("data"))
                .args(&self.extra)
                .env("RUST_LOG", "info,ferry_xds=debug")
                .stdout(Stdio::null())
                .stderr(log),
        );
    }

    pub async fn wait_ready(&self) {
        let port = self.admin_port;
        eventually(Duration::from_secs(20), "ferry /readyz", || async move {
            matches!(http_get(port, "localhost", "/readyz").await, Ok((200, _)))
        })
        .await;
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.launch();
        self.wait_ready().await;
    }

    /// Replaces the catalog atomically (write and rename), as editors and
    /// config management do.
    pub fn write_catalog(&self, yaml: &str) {
        let tmp = self.dir.path().join(".catalog.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write catalog");
        std::fs::rename(&tmp, &self.catalog).expect("rename catalog");
    }

    pub async fn status(&self) -> serde_json::Value {
        let (code, body) = http_get(self.admin_port, "localhost", "/status")
            .await
            .expect("GET /status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin_port, "localhost", "/metrics")
            .await
            .expect("GET /metrics")
            .1
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ferry.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The control plane's resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pid()
            .and_then(vm_rss_kib)
            .expect("ferry control is running")
    }

    /// How long /healthz takes to answer now.
    pub async fn healthz_latency(&self) -> Duration {
        let started = Instant::now();
        let (code, _) = http_get(self.admin_port, "localhost", "/healthz")
            .await
            .expect("GET /healthz");
        assert_eq!(code, 200);
        started.elapsed()
    }
}

/// `VmRSS` of process `pid`, in KiB, from `/proc/<pid>/status`.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs the `ferry` CLI against `ferry`'s API as actor "alice";
/// (success, stdout, stderr).
pub fn ferry_cli(ferry: &Ferry, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .args(["--server", &format!("http://127.0.0.1:{}", ferry.api_port)])
        .env("FERRY_ACTOR", "alice")
        .output()
        .expect("run ferry CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The catalog most tests use: `checkout.shop` on backends `old/a` and
/// `new/a`, all traffic declared on `old`.
pub fn checkout_catalog(backends: &Backends) -> String {
    format!(
        "services:\n  - name: checkout\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n      new: {{endpoints: [\"{}\"]}}\n    weights: {{old: 10000, new: 0}}\n",
        backends.addr("old/a"),
        backends.addr("new/a")
    )
}

/// A migration of `checkout.shop` from `old` to `new` in `steps` (percent),
/// each baked for `bake`, gated on at least 20 requests per side.
pub fn migration_plan(steps: &[f64], bake: &str) -> ferry_proto::ferry::v1::CreateMigrationRequest {
    ferry_proto::ferry::v1::CreateMigrationRequest {
        service: "checkout.shop".into(),
        from: vec!["old".into()],
        to: "new".into(),
        steps: steps.to_vec(),
        bake: bake.into(),
        gates: Some(ferry_proto::ferry::v1::Gates {
            min_requests: 20,
            data_timeout: "10s".into(),
            ..Default::default()
        }),
        ack_timeout: "10s".into(),
        drain: "1s".into(),
        reason: "move checkout to the new cluster".into(),
        ..Default::default()
    }
}

/// A gRPC channel to a control plane's API, once it accepts connections.
pub async fn api_channel(ferry: &Ferry) -> tonic::transport::Channel {
    let url = format!("http://127.0.0.1:{}", ferry.api_port);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(endpoint) = tonic::transport::Channel::from_shared(url.clone())
            && let Ok(c) = endpoint.connect().await
        {
            return c;
        }
        assert!(Instant::now() < deadline, "API not reachable at {url}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
