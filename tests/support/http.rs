//! HTTP on loopback: in-test backends that answer with their label, a
//! client, and the steady streams of requests tests measure.

use super::*;

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
