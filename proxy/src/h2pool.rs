//! HTTP/2 connections to endpoints: one multiplexed connection per
//! endpoint, made once however many requests wait for it, and dropped once
//! it has been idle for the pool's idle timeout.
//!
//! A pool keyed by the request's URI (as hyper-util's) would send the
//! endpoint's address as `:authority`; this one is keyed by the endpoint
//! the balancer chose, so each request keeps the `:authority` the client
//! sent, as Envoy does, and a gateway or virtual-hosting server behind the
//! endpoint sees the name it routes on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::{Service, ServiceExt};

use crate::call::{Body, BoxError, Failure};
use crate::forward::{PoolConfig, chain};

/// Pings on a connection this often, to find dead peers between requests.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// One endpoint's connection, or none yet.
#[derive(Default)]
struct Slot {
    conn: tokio::sync::Mutex<Conn>,
    /// Last use, in milliseconds since the pool's epoch.
    used_ms: AtomicU64,
}

#[derive(Default)]
struct Conn {
    sender: Option<SendRequest<Body>>,
    /// The last failed attempt to connect: when it ended, and why.
    failed: Option<(Instant, String)>,
}

struct Slots {
    by_endpoint: HashMap<SocketAddr, Arc<Slot>>,
    swept: Instant,
}

/// HTTP/2 connections made with the connector `C` (plain TCP, or TLS).
pub struct H2Pool<C> {
    connector: C,
    builder: Builder<TokioExecutor>,
    config: PoolConfig,
    epoch: Instant,
    slots: Mutex<Slots>,
}

impl<C> std::fmt::Debug for H2Pool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints = self.slots.lock().map(|s| s.by_endpoint.len()).unwrap_or(0);
        f.debug_struct("H2Pool")
            .field("endpoints", &endpoints)
            .finish_non_exhaustive()
    }
}

impl<C> H2Pool<C>
where
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    pub fn new(connector: C, config: PoolConfig) -> Self {
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE)
            .keep_alive_while_idle(true);
        let now = Instant::now();
        Self {
            connector,
            builder,
            config,
            epoch: now,
            slots: Mutex::new(Slots {
                by_endpoint: HashMap::new(),
                swept: now,
            }),
        }
    }

    /// Sends `request` (whose URI carries the client's authority) to the
    /// endpoint at `endpoint`, reached through `connect` (its address as
    /// a URI). A request refused unsent by a connection that closed since
    /// its last use goes once more, on a new connection.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        connect: &Uri,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, Failure> {
        let slot = self.slot(endpoint);
        let (mut sender, reused) = self.sender(&slot, connect).await?;
        let unsent = match sender.try_send_request(request).await {
            Ok(response) => return Ok(response),
            Err(mut e) => match e.take_message() {
                Some(request) if reused => request,
                // Nothing was sent.
                Some(_) => return Err(Failure::Connect(chain(e.error()))),
                None => return Err(Failure::Reset(chain(e.error()))),
            },
        };
        tracing::debug!(%endpoint, "pooled HTTP/2 connection closed; reconnecting");
        Self::forget_closed(&slot).await;
        let (mut sender, _) = self.sender(&slot, connect).await?;
        sender
            .send_request(unsent)
            .await
            .map_err(|e| Failure::Reset(chain(&e)))
    }

    /// Connections held open now (made, not known closed).
    pub fn open(&self) -> usize {
        let Ok(slots) = self.slots.lock() else {
            return 0;
        };
        slots
            .by_endpoint
            .values()
            .filter(|s| {
                s.conn
                    .try_lock()
                    .map(|c| c.sender.as_ref().is_some_and(|c| !c.is_closed()))
                    .unwrap_or(true)
            })
            .count()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The endpoint's slot, marked used now. Now and then drops the slots
    /// of endpoints idle for longer than the idle timeout: their
    /// connections close once their last streams end.
    fn slot(&self, endpoint: SocketAddr) -> Arc<Slot> {
        let now = Instant::now();
        let now_ms = self.now_ms();
        let idle_ms = u64::try_from(self.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let Ok(mut slots) = self.slots.lock() else {
            return Arc::default();
        };
        if now.duration_since(slots.swept) >= self.config.idle_timeout / 2 {
            slots.swept = now;
            slots
                .by_endpoint
                .retain(|_, s| now_ms.saturating_sub(s.used_ms.load(Ordering::Relaxed)) < idle_ms);
        }
        let slot = slots.by_endpoint.entry(endpoint).or_default().clone();
        slot.used_ms.store(now_ms, Ordering::Relaxed);
        slot
    }

    /// The slot's open connection, or a new one; and whether it was open
    /// already. Callers for the same endpoint wait for one connection, and
    /// share its failure: those that waited for a connect that failed fail
    /// with it rather than each trying again in turn.
    async fn sender(
        &self,
        slot: &Slot,
        connect: &Uri,
    ) -> Result<(SendRequest<Body>, bool), Failure> {
        let asked = Instant::now();
        let mut held = slot.conn.lock().await;
        if let Some(sender) = held.sender.as_ref()
            && !sender.is_closed()
        {
            return Ok((sender.clone(), true));
        }
        held.sender = None;
        if let Some((at, why)) = &held.failed
            && *at >= asked
        {
            return Err(Failure::Connect(why.clone()));
        }
        let made = tokio::time::timeout(self.config.connect_timeout, async {
            let io = self
                .connector
                .clone()
                .oneshot(connect.clone())
                .await
                .map_err(|e| {
                    let e: BoxError = e.into();
                    chain(e.as_ref())
                })?;
            self.builder
                .handshake(io)
                .await
                .map_err(|e| format!("HTTP/2 handshake: {}", chain(&e)))
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no connection within {:?}",
                self.config.connect_timeout
            ))
        });
        let (sender, connection) = match made {
            Ok(made) => made,
            Err(e) => {
                let why = format!("{connect}: {e}");
                held.failed = Some((Instant::now(), why.clone()));
                return Err(Failure::Connect(why));
            }
        };
        let target = connect.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(endpoint = %target, error = %chain(&e), "upstream HTTP/2 connection ended");
            }
        });
        held.sender = Some(sender.clone());
        held.failed = None;
        Ok((sender, false))
    }

    /// Drops the slot's connection if it has closed (another caller may
    /// have made a new one meanwhile).
    async fn forget_closed(slot: &Slot) {
        let mut held = slot.conn.lock().await;
        if held.sender.as_ref().is_some_and(|h| h.is_closed()) {
            held.sender = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::AtomicUsize;

    /// An h2c server that answers with the `:authority` it got; counts
    /// connections.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_default();
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from(authority),
                        )))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, connections)
    }

    fn request(authority: &str) -> Request<Body> {
        Request::builder()
            .version(http::Version::HTTP_2)
            .uri(format!("http://{authority}/"))
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap()
    }

    #[tokio::test]
    async fn requests_share_one_connection_and_keep_their_authority() {
        let (addr, connections) = server().await;
        let pool = Arc::new(H2Pool::new(HttpConnector::new(), PoolConfig::default()));
        let connect: Uri = format!("http://{addr}").parse().unwrap();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (pool, connect) = (pool.clone(), connect.clone());
            tasks.push(tokio::spawn(async move {
                let authority = format!("svc-{i}.shop");
                let response = pool
                    .send(addr, &connect, request(&authority))
                    .await
                    .unwrap();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, authority.as_bytes());
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        assert_eq!(pool.open(), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = H2Pool::new(HttpConnector::new(), PoolConfig::default());
        let connect: Uri = format!("http://{addr}").parse().unwrap();
        let failure = pool.send(addr, &connect, request("a.shop")).await;
        assert!(matches!(failure, Err(Failure::Connect(_))), "{failure:?}");
    }

    #[tokio::test]
    async fn idle_connections_are_dropped_and_made_again() {
        let (addr, connections) = server().await;
        let config = PoolConfig {
            idle_timeout: Duration::from_millis(100),
            ..PoolConfig::default()
        };
        let pool = H2Pool::new(HttpConnector::new(), config);
        let connect: Uri = format!("http://{addr}").parse().unwrap();
        let (other, _) = server().await;
        let other_connect: Uri = format!("http://{other}").parse().unwrap();
        pool.send(addr, &connect, request("a.shop")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Any use sweeps: the idle endpoint's connection goes.
        pool.send(other, &other_connect, request("b.shop"))
            .await
            .unwrap();
        assert_eq!(pool.open(), 1);
        pool.send(addr, &connect, request("a.shop")).await.unwrap();
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn callers_waiting_for_a_failed_connect_share_its_failure() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = attempts.clone();
        // A connector that fails after a while, as a dead endpoint does.
        let connector = tower::service_fn(move |_: Uri| {
            counted.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err::<TokioIo<tokio::net::TcpStream>, BoxError>("refused".into())
            }
        });
        let pool = Arc::new(H2Pool::new(connector, PoolConfig::default()));
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let connect: Uri = format!("http://{addr}").parse().unwrap();
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let (pool, connect) = (pool.clone(), connect.clone());
            tasks.push(tokio::spawn(async move {
                pool.send(addr, &connect, request("a.shop")).await
            }));
        }
        for t in tasks {
            let failure = t.await.unwrap();
            assert!(
                matches!(&failure, Err(Failure::Connect(why)) if why.contains("refused")),
                "{failure:?}"
            );
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        // A later caller tries again.
        let _ = pool.send(addr, &connect, request("a.shop")).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }
}
