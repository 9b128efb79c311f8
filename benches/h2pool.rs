//! Criterion benchmarks of the proxy's HTTP/2 upstream pool against an
//! h2c server on loopback (hyper), everything on one thread (a
//! current-thread runtime, as `ferry proxy --workers 1`):
//!
//! - `h2pool/send`: one request through a warm pool: the endpoint's slot,
//!   the checkout of its connection, the exchange and the body, and the
//!   stream given back when the body ends;
//! - `h2pool/send_16`: 16 requests at once through the pool, all on its
//!   one connection; the time is for the 16;
//! - `h2pool/direct`: the same request on one hyper HTTP/2 connection
//!   with no pool: what `send` costs beyond it is the pool's checkout and
//!   return.
//!
//! Run with `cargo bench --bench h2pool`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use ferry_proxy::call::Body;
use ferry_proxy::forward::PoolConfig;
use ferry_proxy::h2pool::H2Pool;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::http::uri::Scheme;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// What the server answers: the size of a small API response.
const BODY: &[u8] = b"hello from the h2pool bench server\n";

/// An h2c server on loopback, answering every request with [`BODY`].
async fn server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding a loopback port");
    let addr = listener.local_addr().expect("a bound listener's address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn request() -> Request<Body> {
    Request::builder()
        .version(hyper::Version::HTTP_2)
        .uri("http://echo.bench/")
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .expect("a valid request")
}

/// Sends one request through `pool` and reads the whole body.
async fn through_pool(pool: &H2Pool<HttpConnector>, addr: SocketAddr) -> Bytes {
    let response = pool.send(addr, request()).await.expect("an answer");
    let body = response.into_body().collect().await.expect("a body");
    body.to_bytes()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime")
}

fn pool(c: &mut Criterion) {
    let rt = runtime();
    let addr = rt.block_on(server());
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let pool = H2Pool::new(connector, Scheme::HTTP, PoolConfig::default());
    // Warm: the connection is made and its SETTINGS are in.
    rt.block_on(async {
        for _ in 0..10 {
            assert_eq!(through_pool(&pool, addr).await, BODY);
        }
    });
    assert_eq!(pool.open(), 1);

    let mut group = c.benchmark_group("h2pool");
    group.bench_function("send", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    assert_eq!(through_pool(&pool, addr).await.len(), BODY.len());
                }
                start.elapsed()
            })
        });
    });
    group.bench_function("send_16", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let all = futures::future::join_all((0..16).map(|_| through_pool(&pool, addr)));
                    assert!(all.await.iter().all(|b| b.len() == BODY.len()));
                }
                start.elapsed()
            })
        });
    });
    assert_eq!(pool.open(), 1, "every request went on the one connection");

    // The same exchange on one connection held by hand.
    let mut sender = rt.block_on(async {
        let stream = TcpStream::connect(addr).await.expect("connecting");
        stream.set_nodelay(true).expect("setting TCP_NODELAY");
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("an HTTP/2 handshake");
        tokio::spawn(connection);
        sender
    });
    group.bench_function("direct", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let response = sender.send_request(request()).await.expect("an answer");
                    let body = response.into_body().collect().await.expect("a body");
                    assert_eq!(body.to_bytes().len(), BODY.len());
                }
                start.elapsed()
            })
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = pool
}
criterion_main!(benches);
