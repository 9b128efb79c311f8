//! `ferry proxy` beyond plain HTTP/1.1: HTTP/2 clients, gRPC (tonic client
//! and server, unary and streaming, trailers) to an HTTP/2 service,
//! WebSocket upgrades, and TLS termination with certificates by SNI.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use support::{Backends, Ferry, FerryProxy, eventually, free_port, h2c, http_get, metric_sum};
use tokio_tungstenite::tungstenite::Message;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const HOST: &str = "checkout.shop";

fn catalog(endpoint: &str, extra: &str) -> String {
    format!(
        "services:\n  - name: checkout\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{endpoint}\"]}}\n{extra}"
    )
}

async fn routed(proxy: &FerryProxy) {
    let port = proxy.listen_port;
    eventually(
        Duration::from_secs(10),
        "routes in the proxy",
        || async move { matches!(http_get(port, HOST, "/").await, Ok((code, _)) if code != 404) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_reaches_an_http1_service() {
    let backends = Backends::start(&["old/a"]).await;
    let ferry = Ferry::start(&catalog(&backends.addr("old/a"), "")).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    routed(&proxy).await;
    // Prior-knowledge HTTP/2 (h2c); the authority names the service.
    let (mut sender, _conn) = h2c(proxy.listen_port).await;
    for _ in 0..20 {
        let req = hyper::Request::get(format!("http://{HOST}/"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.expect("h2 request");
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"old/a");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_pass_through_with_trailers() {
    // A real gRPC server: tonic's health service.
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("checkout", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let ferry = Ferry::start(&catalog(&addr.to_string(), "    protocol: grpc\n")).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    routed(&proxy).await;

    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", proxy.listen_port))
            .unwrap()
            .origin(format!("http://{HOST}").parse().unwrap())
            .connect()
            .await
            .expect("channel to the proxy");
    let mut health = HealthClient::new(channel);
    // Unary: the status arrives in trailers, which tonic requires.
    for _ in 0..10 {
        let reply = health
            .check(HealthCheckRequest {
                service: "checkout".into(),
            })
            .await
            .expect("check through the proxy");
        assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
    }
    // An error status from the server comes through as that status.
    let missing = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    // Server streaming: updates arrive one by one while the call lasts.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "checkout".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    reporter
        .set_service_status("checkout", tonic_health::ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the streamed update")
        .unwrap()
        .unwrap();
    assert_eq!(second.status, ServingStatus::NotServing as i32);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_passes_through_both_ways() {
    // A WebSocket echo server.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() || message.is_binary() {
                        let _ = ws.send(message).await;
                    }
                }
            });
        }
    });
    let ferry = Ferry::start(&catalog(&addr.to_string(), "")).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    routed(&proxy).await;

    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.listen_port))
        .await
        .unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(format!("ws://{HOST}/chat"), tcp)
        .await
        .expect("WebSocket handshake through the proxy");
    assert_eq!(response.status(), 101);
    for i in 0..20 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo")
            .unwrap()
            .unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), text);
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(echo.into_data().as_ref(), &[0u8, 1, 2, 255]);
    ws.close(None).await.unwrap();
    let metrics = proxy.admin("/metrics").await;
    assert!(
        metrics.contains("ferry_proxy_upgraded_connections"),
        "{metrics}"
    );
    server.abort();
}

struct Ca {
    der: rustls::pki_types::CertificateDer<'static>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A certificate for `name` written to `dir`: (CERT,KEY argument, DER).
fn leaf(ca: &Ca, dir: &Path, name: &str) -> (String, rustls::pki_types::CertificateDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap();
    let write = |file: &str, text: String| -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        path
    };
    let c = write(&format!("{name}.crt"), cert.pem());
    let k = write(&format!("{name}.key"), key.serialize_pem());
    (
        format!("{},{}", c.display(), k.display()),
        cert.der().clone(),
    )
}

/// A TLS connection to `port` asking for `sni`, offering `alpn`; the
/// stream and the certificate the server sent.
async fn tls_connect(
    ca: &Ca,
    port: u16,
    sni: &str,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    rustls::pki_types::CertificateDer<'static>,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let stream = connector.connect(name, tcp).await.expect("TLS handshake");
    let cert = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    (stream, cert)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_terminated_with_the_certificate_the_client_names() {
    let backends = Backends::start(&["old/a"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let (shop, shop_der) = leaf(&ca, dir.path(), "shop.example.com");
    let (api, api_der) = leaf(&ca, dir.path(), "api.example.com");
    let ferry = Ferry::start(&catalog(
        &backends.addr("old/a"),
        "    hosts: [shop.example.com, api.example.com]\n",
    ))
    .await;
    let tls_port = free_port();
    let listen = format!("127.0.0.1:{tls_port}");
    let proxy = FerryProxy::start_with(
        ferry.xds_port,
        &[
            "--tls-listen",
            &listen,
            "--tls-cert",
            &shop,
            "--tls-cert",
            &api,
            "--tls-reload-interval",
            "200ms",
        ],
    )
    .await;
    routed(&proxy).await;

    // Each name gets its own certificate; HTTP/1.1 over TLS is routed.
    for (name, der) in [
        ("shop.example.com", &shop_der),
        ("api.example.com", &api_der),
    ] {
        let (stream, cert) = tls_connect(&ca, tls_port, name, &[b"http/1.1"]).await;
        assert_eq!(&cert, der, "{name} got another certificate");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender
            .send_request(
                hyper::Request::get("/")
                    .header("host", name)
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"old/a");
    }

    // ALPN h2: HTTP/2 over TLS.
    let (stream, _) = tls_connect(&ca, tls_port, "api.example.com", &[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            hyper::Request::get("https://api.example.com/")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // A new certificate for a name is picked up without a restart.
    let (_, renewed) = leaf(&ca, dir.path(), "shop.example.com");
    assert_ne!(renewed, shop_der);
    eventually(
        Duration::from_secs(5),
        "the renewed certificate",
        || async { tls_connect(&ca, tls_port, "shop.example.com", &[]).await.1 == renewed },
    )
    .await;
}

/// The host a request named: its URI's authority (HTTP/2) or Host header.
fn named_host<B>(req: &hyper::Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// An HTTPS backend for `name`, its certificate signed by `ca`, speaking
/// HTTP/1.1 or HTTP/2 as ALPN says; it answers `tls-backend HOST` with the
/// host the request named (and ` h2` after it over HTTP/2). With `clients`, it requires a client
/// certificate signed by that CA.
async fn tls_backend(
    ca: &Ca,
    name: &str,
    clients: Option<&Ca>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(clients) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(clients.der.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|req| async move {
                    let text = match req.version() {
                        hyper::Version::HTTP_2 => format!("tls-backend {} h2", named_host(&req)),
                        _ => format!("tls-backend {}", named_host(&req)),
                    };
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from(text)),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_service_checks_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (addr, _backend) = tls_backend(&ca, "checkout.internal", None).await;
    let policy = |name: &str, file: &Path| {
        format!(
            "    tls: {{server_name: {name}, ca_file: {}}}\n",
            file.display()
        )
    };
    // The proxy reads the files itself (`--upstream-tls files`); the SDS
    // form is tested in tests/sds.rs.
    let ferry = Ferry::start_with(
        &catalog(&addr.to_string(), &policy("checkout.internal", &ca_file)),
        &["--upstream-tls", "files"],
    )
    .await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    routed(&proxy).await;
    for _ in 0..10 {
        assert_eq!(
            http_get(proxy.listen_port, HOST, "/").await,
            Ok((200, format!("tls-backend {HOST}")))
        );
    }

    // A certificate that does not name the server: refused, 503.
    ferry.write_catalog(&catalog(
        &addr.to_string(),
        &policy("other.internal", &ca_file),
    ));
    let port = proxy.listen_port;
    eventually(
        Duration::from_secs(10),
        "a refused certificate",
        || async move { matches!(http_get(port, HOST, "/").await, Ok((503, _))) },
    )
    .await;

    // A CA file the proxy cannot read: the config is refused and the last
    // good one (here: the wrong name) keeps serving.
    ferry.write_catalog(&catalog(
        &addr.to_string(),
        &policy("checkout.internal", &dir.path().join("missing.pem")),
    ));
    eventually(
        Duration::from_secs(10),
        "the refusal in the log",
        || async { proxy.log().contains("missing.pem") },
    )
    .await;
    assert!(matches!(http_get(port, HOST, "/").await, Ok((503, _))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_http2_to_the_service_keep_the_clients_host() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, clients, strangers) = (ca(), ca(), ca());
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    // The backend takes only clients with a certificate from `clients`.
    let (addr, _backend) = tls_backend(&ca, "checkout.internal", Some(&clients)).await;
    let (pair, _) = leaf(&clients, dir.path(), "proxy.ferry");
    let (cert_file, key_file) = pair.split_once(',').unwrap();
    let policy = |mutual: bool| {
        let files = if mutual {
            format!(", cert_file: {cert_file}, key_file: {key_file}")
        } else {
            String::new()
        };
        format!(
            "    protocol: http2\n    tls: {{server_name: checkout.internal, ca_file: {}{files}}}\n    health_check: {{path: /healthz, interval: 300ms, timeout: 250ms}}\n",
            ca_file.display()
        )
    };
    let ferry = Ferry::start_with(
        &catalog(&addr.to_string(), &policy(true)),
        &["--upstream-tls", "files"],
    )
    .await;
    let proxy = FerryProxy::start_with(ferry.xds_port, &["--tls-reload-interval", "200ms"]).await;
    routed(&proxy).await;
    // HTTP/2 over TLS with the proxy's certificate; the backend sees the
    // client's host as :authority, not its own address.
    for _ in 0..10 {
        assert_eq!(
            http_get(proxy.listen_port, HOST, "/").await,
            Ok((200, format!("tls-backend {HOST} h2")))
        );
    }
    let port = proxy.listen_port;
    // Health checks go the same way, over HTTP/2 with the certificate.
    // (Plain HTTP/1.1 probes would all fail against this backend.)
    let checks = "ferry_proxy_health_checks_total{";
    eventually(Duration::from_secs(10), "passed health checks", || async {
        metric_sum(&proxy.admin("/metrics").await, checks, "result=\"pass\"") >= 2.0
    })
    .await;

    // The certificate files are replaced (as cert-manager renews them):
    // the proxy uses the new ones without a config change. One from a CA
    // the backend does not trust is refused...
    let rotate = |issuer: &Ca| {
        let other = tempfile::tempdir().unwrap();
        let (pair, _) = leaf(issuer, other.path(), "proxy.ferry");
        let (new_cert, new_key) = pair.split_once(',').unwrap();
        std::fs::copy(new_key, key_file).unwrap();
        std::fs::copy(new_cert, cert_file).unwrap();
    };
    rotate(&strangers);
    eventually(
        Duration::from_secs(10),
        "a certificate from another CA refused",
        || async move { matches!(http_get(port, HOST, "/").await, Ok((503, _))) },
    )
    .await;
    // ... and a renewed one from the right CA is taken.
    rotate(&clients);
    eventually(
        Duration::from_secs(10),
        "the renewed certificate taken",
        || async move { matches!(http_get(port, HOST, "/").await, Ok((200, _))) },
    )
    .await;
    let metrics = proxy.admin("/metrics").await;
    let reloads: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("ferry_proxy_upstream_tls_reloads_total{") && l.contains("result=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(reloads >= 2.0, "{metrics}");
    let expiry: f64 = metrics
        .lines()
        .find(|l| l.starts_with("ferry_proxy_upstream_tls_client_certificate_expiry_seconds{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no expiry gauge: {metrics}"));
    assert!(expiry > 86_400.0, "{expiry}");

    // While a key file is missing (mid-rotation, say), other changes still
    // apply: the cluster keeps its last good TLS client.
    std::fs::remove_file(key_file).unwrap();
    let (second, _backend2) = tls_backend(&ca, "checkout.internal", Some(&clients)).await;
    ferry.write_catalog(&catalog(&format!("{addr}\", \"{second}"), &policy(true)));
    eventually(Duration::from_secs(10), "the second endpoint", || async {
        let dump: serde_json::Value =
            serde_json::from_str(&proxy.admin("/config_dump").await).unwrap();
        dump["upstreams"]["checkout.shop:8080@old"]
            .as_array()
            .is_some_and(|e| e.len() == 2)
    })
    .await;
    for _ in 0..4 {
        assert_eq!(
            http_get(port, HOST, "/").await,
            Ok((200, format!("tls-backend {HOST} h2")))
        );
    }

    // Without the certificate the backend refuses the proxy: 503.
    ferry.write_catalog(&catalog(&addr.to_string(), &policy(false)));
    eventually(
        Duration::from_secs(10),
        "refused without a client certificate",
        || async move { matches!(http_get(port, HOST, "/").await, Ok((503, _))) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_services_see_the_clients_authority() {
    // An h2c backend that answers with the :authority it was sent.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from(named_host(&req))),
                    ))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let ferry = Ferry::start(&catalog(&addr.to_string(), "    protocol: http2\n")).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    routed(&proxy).await;
    // From an HTTP/1.1 client's Host header.
    for _ in 0..5 {
        assert_eq!(
            http_get(proxy.listen_port, HOST, "/").await,
            Ok((200, HOST.to_owned()))
        );
    }
    // From an HTTP/2 client's :authority.
    let (mut sender, _conn) = h2c(proxy.listen_port).await;
    let req = hyper::Request::get(format!("http://{HOST}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], HOST.as_bytes());
    // All of it over one upstream connection, shown in the metrics.
    let metrics = proxy.admin("/metrics").await;
    assert_eq!(
        metric_sum(
            &metrics,
            "ferry_proxy_upstream_http2_connects_total{",
            "result=\"ok\""
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "ferry_proxy_upstream_http2_connections", ""),
        1.0,
        "{metrics}"
    );
}
