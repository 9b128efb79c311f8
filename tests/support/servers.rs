//! Other real servers the tests use: etcd, Prometheus, headless Chromium.

use super::*;

/// A real etcd (Debian's etcd-server; FERRY_ETCD names another binary) on
/// loopback ports, with its data in a temporary directory.
pub struct Etcd {
    pub endpoint: String,
    _dir: tempfile::TempDir,
    _proc: Proc,
}

impl Etcd {
    pub async fn start() -> Self {
        let bin = std::env::var("FERRY_ETCD").unwrap_or_else(|_| "etcd".to_owned());
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log");
        let proc = Proc::spawn(
            Command::new(&bin)
                .args(["--name", "ferry-test"])
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &endpoint])
                .args(["--advertise-client-urls", &endpoint])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("ferry-test={peer_url}")])
                .stdout(Stdio::null())
                .stderr(log),
        );
        let etcd = Self {
            endpoint,
            _dir: dir,
            _proc: proc,
        };
        eventually(Duration::from_secs(20), "etcd healthy", || async move {
            matches!(http_get(client, "localhost", "/health").await, Ok((200, body)) if body.contains("true"))
        })
        .await;
        etcd
    }
}

/// A real Prometheus (Debian's; FERRY_PROMETHEUS names another binary)
/// scraping one Envoy's admin `/stats/prometheus` every second.
pub struct Prometheus {
    pub url: String,
    pub port: u16,
    _dir: tempfile::TempDir,
    _proc: Proc,
}

impl Prometheus {
    pub async fn start(envoy: &Envoy) -> Self {
        let target = format!("127.0.0.1:{}", envoy.admin_port);
        Self::start_scraping(&[("envoy", &target, "/stats/prometheus")], None).await
    }

    /// A Prometheus scraping each `(job, host:port, path)` every second,
    /// evaluating the rules file `rules` (if any) every second.
    pub async fn start_scraping(targets: &[(&str, &str, &str)], rules: Option<&Path>) -> Self {
        let bin = std::env::var("FERRY_PROMETHEUS").unwrap_or_else(|_| "prometheus".to_owned());
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        let mut yaml = String::from("global: {scrape_interval: 1s, evaluation_interval: 1s}\n");
        if let Some(rules) = rules {
            yaml.push_str(&format!("rule_files: [\"{}\"]\n", rules.display()));
        }
        yaml.push_str("scrape_configs:\n");
        for (job, target, path) in targets {
            yaml.push_str(&format!(
                "  - job_name: {job}\n    metrics_path: {path}\n    static_configs: [{{targets: [\"{target}\"]}}]\n"
            ));
        }
        std::fs::write(&config, yaml).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let proc = Proc::spawn(
            Command::new(&bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(log),
        );
        let prometheus = Self {
            url: format!("http://127.0.0.1:{port}"),
            port,
            _dir: dir,
            _proc: proc,
        };
        eventually(Duration::from_secs(30), "prometheus ready", || async move {
            matches!(http_get(port, "localhost", "/-/ready").await, Ok((200, _)))
        })
        .await;
        prometheus
    }
}

/// Headless Chromium driven over WebDriver: Debian's `chromedriver` on a
/// free loopback port with `chromium` (FERRY_CHROMEDRIVER and
/// FERRY_CHROMIUM name other binaries), on a fresh profile. Both run in
/// their own process group, killed on drop with everything they started.
pub struct Browser {
    pub client: fantoccini::Client,
    profile: tempfile::TempDir,
    driver: Proc,
}

/// Chromium flags that work headless in containers, without a GPU or
/// anything reaching the network by itself.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,2000",
];

impl Browser {
    pub async fn start() -> Self {
        use std::os::unix::process::CommandExt;
        let chromium = std::env::var("FERRY_CHROMIUM").unwrap_or_else(|_| {
            // Debian's /usr/bin/chromium is a wrapper script; the binary
            // itself starts faster and quieter.
            let real = "/usr/lib/chromium/chromium";
            if Path::new(real).exists() {
                real
            } else {
                "chromium"
            }
            .to_owned()
        });
        let driver_bin =
            std::env::var("FERRY_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".to_owned());
        let profile = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).expect("log");
        let driver = Proc::spawn(
            Command::new(&driver_bin)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(log)
                .process_group(0),
        );
        eventually(Duration::from_secs(20), "chromedriver /status", || async {
            matches!(http_get(port, "localhost", "/status").await, Ok((200, body)) if body.contains("\"ready\":true"))
        })
        .await;
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ));
        let capabilities = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object literal");
        };
        let client = fantoccini::ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                panic!("cannot start a Chromium session through {driver_bin}: {e}")
            });
        Self {
            client,
            profile,
            driver,
        }
    }

    /// Runs `script` in the page (a function body: `return …`).
    pub async fn eval(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Ends the session (Chromium quits), then chromedriver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        self.kill_group();
    }

    fn kill_group(&mut self) {
        if let Some(pid) = self.driver.pid() {
            // `--` first: procps' kill reads a bare `-PID` after a signal
            // name as another option, not as a process group.
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
        self.driver.kill();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill_group();
    }
}
