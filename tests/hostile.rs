//! What hostile clients and broken backends find in `ferry proxy`: each
//! input is replayed as raw bytes (HTTP/1.1 over a raw socket, HTTP/2 as
//! real frames) through a real proxy configured by a real control plane,
//! to a raw-socket backend that records what it receives. For each input
//! the test checks the client's answer, what the backend saw, that the
//! proxy still serves a normal request, and that nothing was blamed on the
//! endpoint when the client was at fault.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use support::{
    Ferry, FerryProxy, RAW_OK, RawBackend, eventually, metric_sum, raw_send, raw_status, vm_rss_kib,
};

const QUIET: Duration = Duration::from_millis(1500);

struct Setup {
    _ferry: Ferry,
    proxy: FerryProxy,
    backend: RawBackend,
}

fn catalog(port: u16, extra: &str) -> String {
    format!(
        "services:\n  - name: web\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    hosts: [shop.web]\n    backends:\n      old: {{endpoints: [\"127.0.0.1:{port}\"]}}\n    outlier_detection: {{consecutive_5xx: 3, base_ejection_time: 30s, max_ejection_percent: 100}}\n{extra}"
    )
}

async fn setup(proxy_flags: &[&str]) -> Setup {
    let backend = RawBackend::start().await;
    let ferry = Ferry::start(&catalog(backend.port, "")).await;
    let proxy = FerryProxy::start_with(ferry.xds_port, proxy_flags).await;
    let s = Setup {
        _ferry: ferry,
        proxy,
        backend,
    };
    s.assert_serves().await;
    s
}

impl Setup {
    /// A normal request still gets the backend's own answer.
    async fn assert_serves(&self) {
        let answer = raw_send(
            self.proxy.listen_port,
            b"GET /ok HTTP/1.1\r\nHost: shop.web\r\nConnection: close\r\n\r\n",
            QUIET,
        )
        .await;
        assert_eq!(
            raw_status(&answer),
            200,
            "{}",
            String::from_utf8_lossy(&answer)
        );
        assert!(
            answer.ends_with(b"ok"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }

    async fn metrics(&self) -> String {
        self.proxy.admin("/metrics").await
    }

    /// No endpoint ejected, no 5xx counted: what a client's own fault
    /// must leave.
    async fn assert_nothing_blamed_on_the_endpoint(&self) {
        let m = self.metrics().await;
        assert_eq!(
            metric_sum(&m, "ferry_proxy_ejections_total", ""),
            0.0,
            "{m}"
        );
        assert_eq!(
            metric_sum(&m, "ferry_proxy_requests_total", "class=\"5xx\""),
            0.0,
            "{m}"
        );
        assert_eq!(
            metric_sum(&m, "ferry_proxy_upstream_errors_total", ""),
            0.0,
            "{m}"
        );
        let dump = self.proxy.admin("/config_dump").await;
        assert!(!dump.contains("\"ejected\":true"), "{dump}");
    }

    /// The requests the backend received whose head contains `needle`.
    fn seen_with(&self, needle: &str) -> Vec<String> {
        self.backend
            .seen()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .filter(|r| r.contains(needle))
            .collect()
    }
}

fn text(answer: &[u8]) -> String {
    String::from_utf8_lossy(answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_broken_body_is_a_400_and_never_the_endpoints_failure() {
    let s = setup(&[]).await;
    // More than the three consecutive failures that would eject it.
    for _ in 0..4 {
        let answer = raw_send(
            s.proxy.listen_port,
            b"POST /x HTTP/1.1\r\nHost: shop.web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            QUIET,
        )
        .await;
        assert_eq!(raw_status(&answer), 400, "{}", text(&answer));
        assert!(
            !text(&answer).contains("chunk") && !text(&answer).contains("SendRequest"),
            "no internals: {}",
            text(&answer)
        );
        // A client that hangs up mid-upload: 10 of 100 bytes, then close.
        let answer = raw_send(
            s.proxy.listen_port,
            b"POST /y HTTP/1.1\r\nHost: shop.web\r\nContent-Length: 100\r\n\r\n0123456789",
            Duration::from_millis(200),
        )
        .await;
        assert_ne!(raw_status(&answer), 200, "{}", text(&answer));
    }
    let m = s.metrics().await;
    eventually(Duration::from_secs(5), "the hang-ups counted", || async {
        metric_sum(
            &s.metrics().await,
            "ferry_proxy_requests_total",
            "class=\"downstream_error\"",
        ) >= 8.0
    })
    .await;
    assert_eq!(
        metric_sum(&m, "ferry_proxy_requests_total", "class=\"4xx\""),
        0.0,
        "its own class, not 4xx: {m}"
    );
    s.assert_nothing_blamed_on_the_endpoint().await;
    // The backend never got a whole request from these clients.
    assert!(
        s.seen_with("POST")
            .iter()
            .all(|r| !r.ends_with("0\r\n\r\n")),
        "{:?}",
        s.seen_with("POST")
    );
    s.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_headers_follow_rfc_9112() {
    let s = setup(&[]).await;
    let before = s.backend.count();
    for (request, why) in [
        (
            &b"GET /two HTTP/1.1\r\nHost: shop.web\r\nHost: evil.web\r\n\r\n"[..],
            "more than one Host",
        ),
        (&b"GET /none HTTP/1.1\r\n\r\n"[..], "needs a Host"),
        (
            &b"GET http://shop.web/abs HTTP/1.1\r\n\r\n"[..],
            "needs a Host",
        ),
    ] {
        let answer = raw_send(s.proxy.listen_port, request, QUIET).await;
        assert_eq!(raw_status(&answer), 400, "{}", text(&answer));
        assert!(text(&answer).contains(why), "{}", text(&answer));
    }
    assert_eq!(s.backend.count(), before, "the backend saw none of them");
    // `Connection` cannot strip the Host the request was routed by.
    let answer = raw_send(
        s.proxy.listen_port,
        b"GET /conn HTTP/1.1\r\nHost: shop.web\r\nConnection: close, Host\r\n\r\n",
        QUIET,
    )
    .await;
    assert_eq!(raw_status(&answer), 200, "{}", text(&answer));
    let seen = s.seen_with("GET /conn");
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].to_ascii_lowercase().contains("host: shop.web\r\n"),
        "{}",
        seen[0]
    );
    s.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_and_unlisted_upgrades_are_never_tunnelled() {
    let s = setup(&[]).await;
    // The backend switches protocols whenever it is asked (or not).
    s.backend.set_reply(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        Duration::ZERO,
    );
    for upgrade in ["h2c", "tls/1.3"] {
        let request = format!(
            "GET /up HTTP/1.1\r\nHost: shop.web\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        );
        let answer = raw_send(s.proxy.listen_port, request.as_bytes(), QUIET).await;
        // Not asked for on the upstream side: a 101 is refused.
        assert_eq!(raw_status(&answer), 502, "{}", text(&answer));
    }
    for seen in s.seen_with("GET /up") {
        let lower = seen.to_ascii_lowercase();
        assert!(
            !lower.contains("upgrade:") && !lower.contains("http2-settings"),
            "{seen}"
        );
    }
    let m = s.metrics().await;
    assert_eq!(
        metric_sum(&m, "ferry_proxy_upgrades_refused_total", ""),
        2.0,
        "{m}"
    );
    s.backend.set_reply(RAW_OK, Duration::ZERO);
    s.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_heads_up_to_60_kib_and_conflicting_framing_are_handled() {
    let s = setup(&[]).await;
    // A 40 KiB response head (hyper's old 4 KiB buffer refused it).
    let big = "x".repeat(40 * 1024);
    let reply = format!("HTTP/1.1 200 OK\r\nx-big: {big}\r\ncontent-length: 2\r\n\r\nok");
    s.backend.set_reply(reply.as_bytes(), Duration::ZERO);
    let answer = raw_send(
        s.proxy.listen_port,
        b"GET /big HTTP/1.1\r\nHost: shop.web\r\nConnection: close\r\n\r\n",
        QUIET,
    )
    .await;
    assert_eq!(
        raw_status(&answer),
        200,
        "{}",
        &text(&answer)[..200.min(answer.len())]
    );
    assert!(text(&answer).contains(&big));
    // Content-Length and chunked: the chunked body reaches the client
    // whole, with no Content-Length (RFC 9112 §6.3).
    s.backend.set_reply(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Duration::ZERO,
    );
    let answer = raw_send(
        s.proxy.listen_port,
        b"GET /both HTTP/1.1\r\nHost: shop.web\r\nConnection: close\r\n\r\n",
        QUIET,
    )
    .await;
    let t = text(&answer);
    assert_eq!(raw_status(&answer), 200, "{t}");
    assert!(!t.to_ascii_lowercase().contains("content-length"), "{t}");
    assert!(t.contains("hello"), "{t}");
    s.backend.set_reply(RAW_OK, Duration::ZERO);
    s.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_are_bounded_in_size_and_time() {
    let s = setup(&["--request-head-timeout", "1s", "--idle-timeout", "30s"]).await;
    let before = s.backend.count();
    // One 300 KiB header: 431.
    let request = format!(
        "GET /h HTTP/1.1\r\nHost: shop.web\r\nx-big: {}\r\n\r\n",
        "a".repeat(300 * 1024)
    );
    let answer = raw_send(s.proxy.listen_port, request.as_bytes(), QUIET).await;
    assert_eq!(
        raw_status(&answer),
        431,
        "{}",
        &text(&answer)[..answer.len().min(200)]
    );
    // A 1 MiB URL: 414.
    let request = format!(
        "GET /{} HTTP/1.1\r\nHost: shop.web\r\n\r\n",
        "u".repeat(1024 * 1024)
    );
    let answer = raw_send(s.proxy.listen_port, request.as_bytes(), QUIET).await;
    assert_eq!(
        raw_status(&answer),
        414,
        "{}",
        &text(&answer)[..answer.len().min(200)]
    );
    assert_eq!(s.backend.count(), before, "neither reached the backend");

    // 100 clients each hold an unfinished 50 KiB head: memory stays
    // bounded and every one is dropped after the head timeout.
    let pid = s.proxy.pid().expect("proxy pid");
    let rss_before = vm_rss_kib(pid).unwrap_or(0);
    let mut held = Vec::new();
    for _ in 0..100 {
        use tokio::io::AsyncWriteExt;
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", s.proxy.listen_port))
            .await
            .expect("connect");
        let partial = format!(
            "GET /slow HTTP/1.1\r\nHost: shop.web\r\nx-pad: {}",
            "p".repeat(50 * 1024)
        );
        c.write_all(partial.as_bytes()).await.expect("write");
        held.push(c);
    }
    let rss_held = vm_rss_kib(pid).unwrap_or(0);
    // Normal traffic is served meanwhile.
    s.assert_serves().await;
    eventually(Duration::from_secs(10), "slow heads dropped", || async {
        metric_sum(
            &s.metrics().await,
            "ferry_proxy_request_head_timeouts_total",
            "",
        ) >= 100.0
    })
    .await;
    for mut c in held {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b))
            .await
            .expect("closed by the proxy")
            .unwrap_or(0);
        assert_eq!(n, 0, "the connection was closed");
    }
    println!("RSS: {rss_before} KiB before, {rss_held} KiB with 100 held heads");
    assert!(
        rss_held < rss_before + 16 * 1024,
        "100 held 50 KiB heads grew RSS from {rss_before} to {rss_held} KiB"
    );
    s.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_do_not_echo_the_host_raw() {
    let s = setup(&[]).await;
    let answer = raw_send(
        s.proxy.listen_port,
        b"GET / HTTP/1.1\r\nHost: <script>alert(1)</script>\r\nConnection: close\r\n\r\n",
        QUIET,
    )
    .await;
    let t = text(&answer);
    // Not a valid host at all: refused before any reply repeats it.
    assert_eq!(raw_status(&answer), 400, "{t}");
    assert!(!t.contains("<script>"), "{t}");
    let answer = raw_send(
        s.proxy.listen_port,
        b"GET / HTTP/1.1\r\nHost: unknown.web\r\nConnection: close\r\n\r\n",
        QUIET,
    )
    .await;
    let t = text(&answer).to_ascii_lowercase();
    assert_eq!(raw_status(&answer), 404, "{t}");
    assert!(t.contains("x-content-type-options: nosniff"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_reset_after_a_delay_close_the_connection() {
    let s = setup(&[]).await;
    // The backend is slow, so every stream is still open when reset.
    s.backend.set_reply(RAW_OK, Duration::from_millis(200));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.proxy.listen_port))
        .await
        .expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(connection);
    let mut opened = 0;
    for i in 0..1000 {
        let request = hyper::Request::get(format!("http://shop.web/r{i}"))
            .body(())
            .expect("request");
        let Ok(ready) = client.clone().ready().await else {
            break;
        };
        client = ready;
        let Ok((response, _)) = client.send_request(request, true) else {
            break;
        };
        opened += 1;
        // Reset after a short delay, past any "rapid" reset check.
        tokio::time::sleep(Duration::from_millis(2)).await;
        drop(response);
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    assert!(ended.is_ok(), "the proxy closed the connection");
    let reached = s.seen_with("GET /r").len();
    assert!(
        reached < 300,
        "{reached} of {opened} reset streams reached the backend"
    );
    let m = s.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "ferry_proxy_premature_reset_connections_closed_total",
            ""
        ),
        1.0,
        "{m}"
    );
    s.backend.set_reply(RAW_OK, Duration::ZERO);
    s.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_outlier_detection_lifts_its_ejections() {
    let backend = RawBackend::start().await;
    let ferry = Ferry::start(&catalog(backend.port, "")).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    backend.set_reply(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
        Duration::ZERO,
    );
    for _ in 0..3 {
        raw_send(
            proxy.listen_port,
            b"GET / HTTP/1.1\r\nHost: shop.web\r\nConnection: close\r\n\r\n",
            QUIET,
        )
        .await;
    }
    assert!(
        proxy
            .admin("/config_dump")
            .await
            .contains("\"ejected\":true")
    );
    let without = catalog(backend.port, "").replace(
        "    outlier_detection: {consecutive_5xx: 3, base_ejection_time: 30s, max_ejection_percent: 100}\n",
        "",
    );
    ferry.write_catalog(&without);
    eventually(Duration::from_secs(10), "ejection lifted", || async {
        !proxy
            .admin("/config_dump")
            .await
            .contains("\"ejected\":true")
    })
    .await;
}

/// What a generated request looks like on the wire.
fn wire(
    method: &str,
    path: &str,
    headers: &[(String, String)],
    chunks: &[Vec<u8>],
    bad_chunk: bool,
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: shop.web\r\n").into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    for c in chunks {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(if bad_chunk { b"XX" } else { b"\r\n" });
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

static CASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_never_desync_the_proxy() {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let s = setup(&[]).await;
    let strategy = (
        prop::sample::select(vec![
            "GET", "POST", "PUT", "DELETE", "PATCH", "G\u{0}T", "GET\t",
        ]),
        "/[a-z0-9/%?=&._-]{0,40}",
        prop::collection::vec(("[a-zA-Z][a-zA-Z0-9-]{0,12}", "[ -~]{0,30}"), 0..6),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..4),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let handle = tokio::runtime::Handle::current();
    let outcome = tokio::task::block_in_place(|| {
        runner.run(&strategy, |(method, path, headers, chunks, bad_chunk)| {
            handle.block_on(async {
                let case = CASE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut headers = headers;
                headers.push(("x-case".to_owned(), format!("c{case}c")));
                let bytes = wire(method, &path, &headers, &chunks, bad_chunk);
                let answer =
                    raw_send(s.proxy.listen_port, &bytes, Duration::from_millis(300)).await;
                let marker = format!("x-case: c{case}c\r\n");
                let seen = s.seen_with(&marker);
                prop_assert!(
                    seen.len() <= 1,
                    "one request became {}: {seen:?}",
                    seen.len()
                );
                if let Some(r) = seen.first() {
                    prop_assert!(
                        r.starts_with(&format!("{method} {path} HTTP/1.1\r\n")),
                        "the backend saw {r:?} for {:?}",
                        text(&bytes)
                    );
                }
                // Nothing reached the backend that no case sent.
                let stray: Vec<String> = s
                    .backend
                    .seen()
                    .iter()
                    .map(|r| String::from_utf8_lossy(r).into_owned())
                    .filter(|r| !r.contains("x-case: c") && !r.starts_with("GET /ok "))
                    .collect();
                prop_assert!(stray.is_empty(), "{stray:?}");
                prop_assert!(
                    answer.is_empty() || raw_status(&answer) != 0,
                    "{}",
                    text(&answer)
                );
                Ok::<(), TestCaseError>(())
            })
        })
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    s.assert_serves().await;
}
