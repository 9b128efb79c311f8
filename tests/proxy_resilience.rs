//! `ferry proxy` when upstreams misbehave: outlier ejection and recovery,
//! retries (idempotent requests and connect failures only, elsewhere when
//! possible), and timeouts, with config from a real Ferry control plane
//! and the policies written in its catalog.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{Backends, Ferry, FerryProxy, eventually, free_port, h2c, http_get, metric_sum};

const HOST: &str = "checkout.shop";

/// A catalog with one service in cluster `old` on `endpoints`, and extra
/// service-level YAML (`    key: value` lines).
fn catalog(endpoints: &[String], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "services:\n  - name: checkout\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [{}]}}\n{extra}",
        list.join(", ")
    )
}

/// What a scripted backend answers to its `n`th request (from 0).
type Script = dyn Fn(u64, &hyper::Method) -> (u16, Duration) + Send + Sync;

/// A backend whose answers follow a script; counts requests by method.
struct Scripted {
    addr: SocketAddr,
    seen: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    async fn start(script: Arc<Script>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let count = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (script, s, count) = (script.clone(), s.clone(), count.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        *s.lock()
                            .unwrap()
                            .entry(req.method().to_string())
                            .or_insert(0) += 1;
                        let (status, delay) = script(n, req.method());
                        async move {
                            tokio::time::sleep(delay).await;
                            let mut r = hyper::Response::new(Full::new(Bytes::from("scripted")));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    fn seen(&self, method: &str) -> u64 {
        self.seen.lock().unwrap().get(method).copied().unwrap_or(0)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request with `method` and no body through the proxy; its status.
async fn send(port: u16, method: hyper::Method) -> u16 {
    send_body(port, method, "").await
}

/// One request with `method` and `body` through the proxy; its status.
async fn send_body(port: u16, method: hyper::Method, body: &'static str) -> u16 {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = Full::new(Bytes::from_static(body.as_bytes()));
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}/"))
        .header("host", HOST)
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("no answer within 10 s")
        .expect("request");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// The sum of the metric lines starting with `prefix` (0 when absent).
fn metric(text: &str, prefix: &str) -> f64 {
    metric_sum(text, prefix, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_and_comes_back_when_healthy() {
    let backends = Backends::start(&["old/a", "old/b"]).await;
    let endpoints = [backends.addr("old/a"), backends.addr("old/b")];
    let ferry = Ferry::start(&catalog(
        &endpoints,
        "    outlier_detection: {consecutive_5xx: 3, base_ejection_time: 2s, max_ejection_percent: 50}\n",
    ))
    .await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    eventually(Duration::from_secs(10), "routes in the proxy", || async {
        matches!(http_get(proxy.listen_port, HOST, "/").await, Ok((200, _)))
    })
    .await;

    // a answers slowly and b fails fast, so the balancer prefers b until
    // it is ejected (which endpoint wins otherwise is up to latency noise).
    backends.set_delay("old/a", 10);
    backends.set_status("old/b", 503);
    let before = backends.hits["old/b"].load(Ordering::Relaxed);
    let b_hits = || backends.hits["old/b"].load(Ordering::Relaxed) - before;
    let mut failed = 0;
    let mut sent = 0;
    while b_hits() < 3 && sent < 100 {
        if send(proxy.listen_port, hyper::Method::GET).await == 503 {
            failed += 1;
        }
        sent += 1;
    }
    // Three 503s in a row eject b; it gets nothing more while ejected
    // (20 requests to a take about 0.3 s of the 2 s ejection).
    for _ in 0..20 {
        if send(proxy.listen_port, hyper::Method::GET).await == 503 {
            failed += 1;
        }
    }
    assert_eq!(failed, 3, "exactly the three failures that ejected b");
    assert_eq!(b_hits(), 3);
    let dump: serde_json::Value = serde_json::from_str(&proxy.admin("/config_dump").await).unwrap();
    let cluster = &dump["upstreams"]["checkout.shop:8080@old"];
    let b = cluster
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == endpoints[1].as_str())
        .unwrap();
    assert_eq!(b["ejected"], true, "{dump}");
    let metrics = proxy.admin("/metrics").await;
    assert_eq!(
        metric(&metrics, "ferry_proxy_ejections_total{"),
        1.0,
        "{metrics}"
    );

    // Healthy again: once the 2 s ejection ends, b takes traffic again.
    backends.set_status("old/b", 200);
    backends.set_delay("old/a", 0);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let before = backends.hits["old/b"].load(Ordering::Relaxed);
    for _ in 0..300 {
        assert_eq!(send(proxy.listen_port, hyper::Method::GET).await, 200);
    }
    let b_hits = backends.hits["old/b"].load(Ordering::Relaxed) - before;
    assert!(b_hits > 0, "b never came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_and_a_post_never_is() {
    // Every other request fails: 503, 200, 503, 200, …
    let backend = Scripted::start(Arc::new(|n: u64, _: &hyper::Method| {
        (if n.is_multiple_of(2) { 503 } else { 200 }, Duration::ZERO)
    }))
    .await;
    let ferry = Ferry::start(&catalog(
        &[backend.addr.to_string()],
        "    retries: {attempts: 2, on: [5xx, connect-failure]}\n",
    ))
    .await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    eventually(Duration::from_secs(10), "routes in the proxy", || async {
        // Either answer means the route is in; retries make it 200.
        matches!(http_get(proxy.listen_port, HOST, "/").await, Ok((200, _)))
    })
    .await;
    let gets_before = backend.seen("GET");
    // Sequential requests keep the alternation: each GET meets a 503,
    // is retried and gets the 200.
    for i in 0..20 {
        assert_eq!(
            send(proxy.listen_port, hyper::Method::GET).await,
            200,
            "GET {i}"
        );
    }
    assert_eq!(backend.seen("GET") - gets_before, 40, "one retry per GET");

    // A POST that meets a 503 is not sent again.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(send(proxy.listen_port, hyper::Method::POST).await);
    }
    assert_eq!(
        backend.seen("POST"),
        10,
        "no POST was retried: {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        5,
        "{statuses:?}"
    );
    let metrics = proxy.admin("/metrics").await;
    assert!(
        metric(&metrics, "ferry_proxy_retries_total{") >= 20.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_failure_is_retried_on_another_endpoint_even_for_a_post() {
    let backends = Backends::start(&["old/a"]).await;
    // A port nothing listens on: connections are refused.
    let dead = format!("127.0.0.1:{}", free_port());
    let ferry = Ferry::start(&catalog(
        &[backends.addr("old/a"), dead],
        "    retries: {attempts: 1, on: [connect-failure]}\n",
    ))
    .await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    eventually(Duration::from_secs(10), "routes in the proxy", || async {
        matches!(http_get(proxy.listen_port, HOST, "/").await, Ok((200, _)))
    })
    .await;
    // Slow answers raise the live endpoint's cost, so concurrent requests
    // go to the dead one too.
    backends.set_delay("old/a", 100);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let port = proxy.listen_port;
        tasks.push(tokio::spawn(async move {
            send_body(port, hyper::Method::POST, "{\"order\": 1}").await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let metrics = proxy.admin("/metrics").await;
    assert!(
        metric(&metrics, "ferry_proxy_retries_total{") >= 1.0,
        "the dead endpoint was never tried: {metrics}"
    );
    let failed = metric_sum(&metrics, "ferry_proxy_requests_total{", "class=\"5xx\"");
    assert_eq!(failed, 0.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_bound_the_request_and_each_attempt() {
    // The route's timeout: a 2 s backend gets a 504 after 300 ms.
    let slow = Scripted::start(Arc::new(|_: u64, _: &hyper::Method| {
        (200, Duration::from_secs(2))
    }))
    .await;
    let ferry = Ferry::start(&catalog(&[slow.addr.to_string()], "    timeout: 300ms\n")).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    eventually(Duration::from_secs(10), "routes in the proxy", || async {
        matches!(http_get(proxy.listen_port, HOST, "/").await, Ok((504, _)))
    })
    .await;
    let started = Instant::now();
    assert_eq!(send(proxy.listen_port, hyper::Method::GET).await, 504);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1_500),
        "{took:?}"
    );

    // A per-try timeout: the first attempt hangs, the retry answers.
    let first_hangs = Scripted::start(Arc::new(|n: u64, _: &hyper::Method| {
        let delay = if n.is_multiple_of(2) {
            Duration::from_secs(3)
        } else {
            Duration::ZERO
        };
        (200, delay)
    }))
    .await;
    ferry.write_catalog(&catalog(
        &[first_hangs.addr.to_string()],
        "    timeout: 2s\n    retries: {attempts: 1, on: [5xx], per_try_timeout: 200ms}\n",
    ));
    eventually(Duration::from_secs(10), "the new catalog", || async {
        first_hangs.seen("GET") > 0
            || matches!(http_get(proxy.listen_port, HOST, "/").await, Ok((200, _)))
    })
    .await;
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(send(proxy.listen_port, hyper::Method::GET).await, 200);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1_000), "{took:?}");
    }
    let gets = first_hangs.seen("GET");
    assert!(gets >= 10, "each GET took two attempts: {gets}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_an_endpoint_out_and_bring_it_back() {
    let backends = Backends::start(&["old/a", "old/b"]).await;
    let endpoints = [backends.addr("old/a"), backends.addr("old/b")];
    // No outlier detection: only the probes can take b out.
    let ferry = Ferry::start(&catalog(
        &endpoints,
        "    health_check: {path: /healthz, interval: 200ms, timeout: 100ms, unhealthy_threshold: 2, healthy_threshold: 1}\n",
    ))
    .await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    eventually(Duration::from_secs(10), "routes in the proxy", || async {
        matches!(http_get(proxy.listen_port, HOST, "/").await, Ok((200, _)))
    })
    .await;
    let healthy = |dump: &serde_json::Value, addr: &str| {
        dump["upstreams"]["checkout.shop:8080@old"]
            .as_array()
            .and_then(|eps| eps.iter().find(|e| e["address"] == addr))
            .map(|e| e["healthy"] == true)
    };

    // b fails its probes (with no user traffic at all) and is taken out.
    backends.set_status("old/b", 503);
    eventually(Duration::from_secs(5), "b marked unhealthy", || async {
        let dump: serde_json::Value =
            serde_json::from_str(&proxy.admin("/config_dump").await).unwrap();
        healthy(&dump, &endpoints[1]) == Some(false)
    })
    .await;
    let before = backends.hits["old/b"].load(Ordering::Relaxed);
    for _ in 0..100 {
        assert_eq!(send(proxy.listen_port, hyper::Method::GET).await, 200);
    }
    let probes_meanwhile = 10; // at most ~5 probes per second reach b
    let b_hits = backends.hits["old/b"].load(Ordering::Relaxed) - before;
    assert!(
        b_hits <= probes_meanwhile,
        "b got user traffic while unhealthy: {b_hits} requests"
    );

    // Passing again: back in balancing.
    backends.set_status("old/b", 200);
    eventually(Duration::from_secs(5), "b healthy again", || async {
        let dump: serde_json::Value =
            serde_json::from_str(&proxy.admin("/config_dump").await).unwrap();
        healthy(&dump, &endpoints[1]) == Some(true)
    })
    .await;
    let metrics = proxy.admin("/metrics").await;
    assert!(
        metric(&metrics, "ferry_proxy_health_checks_total{") >= 4.0,
        "{metrics}"
    );
}

/// Sends one HTTP/1.1 request on `stream` and reads its whole response.
async fn exchange(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The backend's answer is small: head and body arrive together.
    while !String::from_utf8_lossy(&got).contains("old/a") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed mid-response");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_are_closed_and_busy_ones_kept() {
    use tokio::io::AsyncReadExt;
    let backends = Backends::start(&["old/a"]).await;
    let ferry = Ferry::start(&catalog(&[backends.addr("old/a")], "")).await;
    let proxy = FerryProxy::start_with(ferry.xds_port, &["--idle-timeout", "1s"]).await;
    eventually(Duration::from_secs(10), "routes in the proxy", || async {
        matches!(http_get(proxy.listen_port, HOST, "/").await, Ok((200, _)))
    })
    .await;

    // A connection that keeps asking stays open past the idle timeout.
    let mut busy = tokio::net::TcpStream::connect(("127.0.0.1", proxy.listen_port))
        .await
        .unwrap();
    for _ in 0..8 {
        assert!(exchange(&mut busy).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    // One left idle after a request is closed by the proxy.
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", proxy.listen_port))
        .await
        .unwrap();
    assert!(exchange(&mut idle).await.starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("the proxy closes an idle connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected the connection closed");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(800) && after < Duration::from_secs(4),
        "closed after {after:?}"
    );

    // The same for HTTP/2: a connection with requests every 400 ms stays,
    // then is closed (with a GOAWAY) about 1 s after its last response.
    let (mut sender, mut conn) = h2c(proxy.listen_port).await;
    for _ in 0..8 {
        let req = hyper::Request::get(format!("http://{HOST}/"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.expect("kept while busy");
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), &mut conn)
        .await
        .expect("the proxy closes an idle HTTP/2 connection")
        .unwrap()
        .expect("closed cleanly");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(400) && after < Duration::from_secs(4),
        "closed after {after:?}"
    );
    let metrics = proxy.admin("/metrics").await;
    assert!(
        metric(&metrics, "ferry_proxy_idle_connections_closed_total") >= 1.0,
        "{metrics}"
    );
}
