//! Criterion benchmark of the proxy's whole request path, in process.
//!
//! A real Ferry proxy ([`server::serve`]: client connection handling,
//! routing, header rewriting and the upstream layer stack of
//! `ferry_proxy::stack` down to pooled HTTP/1.1 forwarding) listens on
//! loopback, with the routing a control plane would send for a catalog of
//! one service, translated by [`Translator`]. Its one endpoint is a hyper
//! HTTP/1.1 server on loopback. An HTTP/1.1 client with keep-alive sends
//! one request at a time and reads the whole answer.
//!
//! Everything runs on one thread (a current-thread runtime, as
//! `ferry proxy --workers 1`), so a request's time is the CPU the client,
//! the proxy and the backend spend on it, system calls included, with no
//! cross-thread wake-ups. The Prometheus recorder is installed as
//! `ferry proxy` installs it, so per-request metrics are counted in.
//!
//! - `proxy_request/proxied/{37,65536}`: through the proxy, for an answer
//!   of 37 bytes and of 64 KiB;
//! - `proxy_request/direct/{37,65536}`: the same client straight to the
//!   backend. The difference is what the proxy adds per request.
//!
//! Run with `cargo bench --bench proxy_request`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ferry_discovery::Catalog;
use ferry_discovery::file::parse_catalog;
use ferry_proxy::config::{self, Routing};
use ferry_proxy::connection::ClientLimits;
use ferry_proxy::forward::PoolConfig;
use ferry_proxy::server::{self, Listener, Proxy};
use ferry_xds::client::Resources;
use ferry_xds::{TranslateOptions, Translator};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// The service's host, as the client sends it.
const HOST: &str = "echo.bench";
/// Answer sizes: a small API response, and 64 KiB.
const BODY_SIZES: [usize; 2] = [37, 65_536];

/// The backend's answer for `size`: the bytes, of that length.
fn body(size: usize) -> Bytes {
    Bytes::from(vec![b'x'; size])
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding a loopback port");
    let addr = listener.local_addr().expect("a bound listener's address");
    (listener, addr)
}

/// A hyper HTTP/1.1 server answering `/<size>` with a body of that size.
async fn backend() -> SocketAddr {
    let (listener, addr) = bind().await;
    let bodies: Arc<Vec<(usize, Bytes)>> =
        Arc::new(BODY_SIZES.iter().map(|&n| (n, body(n))).collect());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let size: Option<usize> = req.uri().path()[1..].parse().ok();
                    let found = bodies.iter().find(|(n, _)| Some(*n) == size);
                    let response = match found {
                        Some((_, bytes)) => Response::new(Full::new(bytes.clone())),
                        None => Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::new()))
                            .expect("a valid response"),
                    };
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The routing a control plane sends for one service on `backend`.
fn routing(backend: SocketAddr) -> Routing {
    let (name, namespace) = HOST.split_once('.').expect("HOST is name.namespace");
    let yaml = format!(
        "services:\n  - name: {name}\n    namespace: {namespace}\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      local: {{endpoints: [\"{backend}\"]}}\n"
    );
    let services = parse_catalog(Path::new("bench.yaml"), &yaml).expect("a valid catalog");
    let catalog = Catalog::new();
    catalog.replace(services);
    let maps = Translator::new(TranslateOptions::default()).translate(&catalog.current());
    let resources: Resources = maps.map(|by_name| {
        by_name
            .into_iter()
            .map(|(name, r)| (name, (r.version.clone(), r.body.clone())))
            .collect()
    });
    let routing = config::build(&resources, &Routing::default()).expect("valid resources");
    assert!(routing.warm(), "routes and their clusters are in");
    routing
}

/// A Ferry proxy on loopback, routing to `backend`, until `shutdown`.
async fn proxy(backend: SocketAddr, shutdown: CancellationToken) -> SocketAddr {
    let proxy = Proxy::new(
        Duration::from_secs(15),
        ClientLimits::default(),
        PoolConfig::default(),
    );
    proxy.routing.store(Arc::new(routing(backend)));
    proxy.configured.store(true, Ordering::SeqCst);
    let (tcp, addr) = bind().await;
    tokio::spawn(server::serve(
        vec![Listener { tcp, tls: None }],
        proxy,
        shutdown,
        Duration::from_secs(1),
    ));
    addr
}

/// An HTTP/1.1 client connection to `addr`, kept alive.
async fn client(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connecting");
    stream.set_nodelay(true).expect("setting TCP_NODELAY");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("an HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

/// One request for a body of `size`; the answer's body length.
async fn get(sender: &mut SendRequest<Empty<Bytes>>, size: usize) -> usize {
    sender
        .ready()
        .await
        .expect("the connection takes a request");
    let request = Request::get(format!("/{size}"))
        .header(hyper::header::HOST, HOST)
        .body(Empty::new())
        .expect("a valid request");
    let response = sender.send_request(request).await.expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.expect("a body");
    body.to_bytes().len()
}

fn install_metrics(rt: &Runtime) {
    // As `ferry proxy`: buckets for histograms, upkeep every 5 s.
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .expect("valid buckets")
        .install_recorder()
        .expect("the only metrics recorder");
    rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

fn request_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    install_metrics(&rt);
    let shutdown = CancellationToken::new();
    let (mut proxied, mut direct) = rt.block_on(async {
        let backend = backend().await;
        let proxy = proxy(backend, shutdown.clone()).await;
        (client(proxy).await, client(backend).await)
    });
    // Warm: the proxy's upstream connection is made and pooled.
    rt.block_on(async {
        for size in BODY_SIZES {
            assert_eq!(get(&mut proxied, size).await, size);
            assert_eq!(get(&mut direct, size).await, size);
        }
    });

    let mut group = c.benchmark_group("proxy_request");
    for size in BODY_SIZES {
        for (name, sender) in [("proxied", &mut proxied), ("direct", &mut direct)] {
            group.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            assert_eq!(get(sender, size).await, size);
                        }
                        start.elapsed()
                    })
                });
            });
        }
    }
    group.finish();
    shutdown.cancel();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = request_path
}
criterion_main!(benches);
