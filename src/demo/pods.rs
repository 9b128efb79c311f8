//! The demo's "pods": one real HTTP server per endpoint, each on a
//! loopback address of its own (127.0.1.x in `old`, 127.0.2.x in `new`),
//! answering with `service/cluster/pod` after a short, slightly uneven
//! delay. A pod may carry an injected fault: it answers that share of its
//! requests with a 503 marked `x-demo-fault: injected`.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The header that marks an injected failure.
pub const FAULT_HEADER: &str = "x-demo-fault";

/// How one pod answers.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub service: String,
    pub cluster: String,
    pub name: String,
    /// Typical latency; each answer takes between 0.5× and 1.5× of it.
    pub latency: Duration,
    /// Share of requests answered with an injected 503 (0: none).
    pub fault_share: f64,
}

/// The loopback address of pod `index` of `cluster_index`'s cluster.
pub fn pod_ip(cluster_index: u8, index: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, cluster_index + 1, index + 1))
}

/// Binds a pod at `ip` on `port` (0: any) and serves it until `stop`.
pub async fn start(
    spec: PodSpec,
    ip: IpAddr,
    port: u16,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(SocketAddr::new(ip, port)).await?;
    let addr = listener.local_addr()?;
    let spec = Arc::new(spec);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            let spec = spec.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |r: Request<hyper::body::Incoming>| {
                        answer(spec.clone(), r)
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn answer(
    spec: Arc<PodSpec>,
    _request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let jitter = 0.5 + rand::random::<f64>();
    tokio::time::sleep(spec.latency.mul_f64(jitter)).await;
    let mut response = if spec.fault_share > 0.0 && rand::random::<f64>() < spec.fault_share {
        let mut r = Response::new(Full::new(Bytes::from_static(b"injected fault\n")));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r.headers_mut().insert(
            FAULT_HEADER,
            hyper::header::HeaderValue::from_static("injected"),
        );
        r
    } else {
        Response::new(Full::new(Bytes::from(format!(
            "{}/{}/{}",
            spec.service, spec.cluster, spec.name
        ))))
    };
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}
