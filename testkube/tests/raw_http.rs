//! Wire-level checks of `ferry-testkube` with a hand-written TLS + HTTP/1.1
//! client: the certificate's names, the 401 `Status` body, chunked watch
//! bodies that end cleanly at `timeoutSeconds`, and `drop_watches` closing the
//! connection without the final chunk.

use std::sync::Arc;
use std::time::Duration;

use ferry_testkube::TestKube;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const TOKEN: &str = "raw-token";

async fn connect(kube: &TestKube, server_name: &str) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(kube.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(kube.addr()).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(server_name.to_string()).unwrap(), tcp)
        .await
        .unwrap()
}

/// Sends a GET; with `close` the server ends the connection after the
/// response (and then does not use chunked encoding).
async fn send(tls: &mut TlsStream<TcpStream>, path: &str, token: Option<&str>, close: bool) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let close = if close { "Connection: close\r\n" } else { "" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}{close}\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
}

/// Reads until EOF, an error or `done(bytes so far)`; returns the bytes and
/// whether it ended in an error.
async fn read_until(
    tls: &mut TlsStream<TcpStream>,
    done: impl Fn(&[u8]) -> bool,
) -> (String, bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if done(&buf) {
            return (String::from_utf8_lossy(&buf).into_owned(), false);
        }
        match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut chunk))
            .await
            .expect("the server ends the response within 10 s")
        {
            Ok(0) => return (String::from_utf8_lossy(&buf).into_owned(), false),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return (String::from_utf8_lossy(&buf).into_owned(), true),
        }
    }
}

async fn read_all(tls: &mut TlsStream<TcpStream>) -> (String, bool) {
    read_until(tls, |_| false).await
}

#[tokio::test]
async fn certificate_is_valid_for_ip_and_localhost_and_401_is_a_status() {
    let kube = TestKube::start(TOKEN).await;
    for name in ["127.0.0.1", "localhost"] {
        let mut tls = connect(&kube, name).await;
        send(&mut tls, "/api/v1/services", Some("wrong"), true).await;
        let (resp, _) = read_all(&mut tls).await;
        assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
        let body: Value = serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["apiVersion"], "v1");
        assert_eq!(body["status"], "Failure");
        assert_eq!(body["reason"], "Unauthorized");
        assert_eq!(body["code"], 401);
    }
    let mut tls = connect(&kube, "localhost").await;
    send(&mut tls, "/version", None, true).await;
    assert!(read_all(&mut tls).await.0.starts_with("HTTP/1.1 401"));

    let mut tls = connect(&kube, "localhost").await;
    send(
        &mut tls,
        "/api/v1/services?limit=1&continue=bad",
        Some(TOKEN),
        true,
    )
    .await;
    let (resp, _) = read_all(&mut tls).await;
    assert!(resp.starts_with("HTTP/1.1 410"), "{resp}");
    assert!(resp.contains("\"reason\":\"Expired\""), "{resp}");
}

#[tokio::test]
async fn watch_is_chunked_ends_cleanly_on_timeout_and_abruptly_on_drop() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_service("default", "web", &[], &[("http", 80)]);
    let path =
        "/api/v1/namespaces/default/services?watch=1&resourceVersion=1&allowWatchBookmarks=true";

    // timeoutSeconds: the final chunk is sent.
    let mut tls = connect(&kube, "localhost").await;
    send(
        &mut tls,
        &format!("{path}&timeoutSeconds=2"),
        Some(TOKEN),
        false,
    )
    .await;
    let (resp, errored) = read_until(&mut tls, |b| b.ends_with(b"\r\n0\r\n\r\n")).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{resp}"
    );
    assert!(resp.contains("\"type\":\"ADDED\""), "{resp}");
    assert!(resp.contains("\"type\":\"BOOKMARK\""), "{resp}");
    assert!(resp.ends_with("\r\n0\r\n\r\n"), "clean end: {resp:?}");
    assert!(!errored);

    // drop_watches: the socket closes without the final chunk.
    let mut tls = connect(&kube, "localhost").await;
    send(&mut tls, path, Some(TOKEN), false).await;
    let mut chunk = [0u8; 4096];
    let mut got = String::new();
    while !got.contains("BOOKMARK") {
        let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream ended early: {got}");
        got.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    kube.drop_watches();
    let (rest, _) = read_all(&mut tls).await;
    let all = got + &rest;
    assert!(
        !all.ends_with("\r\n0\r\n\r\n"),
        "abrupt end expected: {all:?}"
    );
    assert_eq!(kube.watch_requests(), 2);
}
