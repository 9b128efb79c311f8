//! HTTP/2 connections to endpoints: a multiplexed connection per
//! endpoint, made once however many requests wait for it, and another
//! only when every one holds as many streams as its peer allows
//! (SETTINGS_MAX_CONCURRENT_STREAMS), as Envoy does; an endpoint's
//! connections are let go once it has had no new request for the pool's
//! idle timeout (each closes when its last stream ends).
//!
//! A pool keyed by the request's URI (as hyper-util's) would send the
//! endpoint's address as `:authority`; this one is keyed by the endpoint
//! the balancer chose, so each request keeps the `:authority` the client
//! sent, as Envoy does, and a gateway or virtual-hosting server behind the
//! endpoint sees the name it routes on.
//!
//! A connection is made in a task of its own: a caller that gives up
//! (its per-try timeout, say) does not cancel it for the others waiting,
//! and all of them get its result, success or failure.

use std::collections::HashMap;
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, Connection, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::{Service, ServiceExt};

use http_body_util::BodyExt;

use crate::call::{Body, BoxError, Failure};
use crate::forward::{PoolConfig, chain};

/// Numbers connections, so one can be let go by its driver.
static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

/// Pings on a connection this often, to find dead peers between requests.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// A connection being made, shared by everyone waiting for it.
type Connecting = Shared<BoxFuture<'static, Result<Conn, String>>>;

/// One connection and the streams open on it.
#[derive(Clone)]
struct Conn {
    sender: SendRequest<Body>,
    streams: Arc<AtomicUsize>,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS, as last seen.
    limit: Arc<AtomicUsize>,
    id: u64,
}

impl Conn {
    /// Whether another stream fits within the peer's limit.
    fn has_room(&self) -> bool {
        !self.sender.is_closed()
            && self.streams.load(Ordering::Relaxed) < self.limit.load(Ordering::Relaxed).max(1)
    }
}

/// Counts a stream open on its connection until its response ends.
struct Stream(Arc<AtomicUsize>);

impl Stream {
    fn open(conn: &Conn) -> Self {
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Self(conn.streams.clone())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An endpoint's connections, and the one being made if any.
#[derive(Default)]
struct State {
    conns: Vec<Conn>,
    connecting: Option<Connecting>,
}

/// One endpoint's connections. The lock is never held across an await.
#[derive(Default)]
struct Slot {
    state: Mutex<State>,
    /// Last use, in milliseconds since the pool's epoch.
    used_ms: AtomicU64,
}

struct Slots {
    by_endpoint: HashMap<SocketAddr, Arc<Slot>>,
    swept: Instant,
}

/// HTTP/2 connections made with the connector `C` (plain TCP, or TLS).
pub struct H2Pool<C> {
    connector: C,
    /// `http`, or `https` through a TLS connector.
    scheme: http::uri::Scheme,
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

/// Milliseconds from `epoch` to now.
fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Whether a failed exchange is known not to have been processed by the
/// upstream: refused (REFUSED_STREAM), above the last stream of a
/// graceful GOAWAY, or dropped before it was sent.
fn unprocessed(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let mut source = e.source();
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away()
                    && h2.is_remote()
                    && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        source = cause.source();
    }
    false
}

impl<C> H2Pool<C>
where
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    pub fn new(connector: C, scheme: http::uri::Scheme, config: PoolConfig) -> Self {
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE)
            .keep_alive_while_idle(true);
        let now = Instant::now();
        Self {
            connector,
            scheme,
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
    /// endpoint at `endpoint`. A request refused unsent by a connection that closed since
    /// its last use goes once more, on a new connection.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        request: Request<Body>,
    ) -> Result<Response<Body>, Failure> {
        let slot = self.slot(endpoint);
        let (conn, reused) = self.conn(&slot, endpoint).await?;
        let stream = Stream::open(&conn);
        let unsent = match conn.sender.clone().try_send_request(request).await {
            Ok(response) => return Ok(self.answered(&slot, response, stream)),
            Err(mut e) => match e.take_message() {
                Some(request) if reused => request,
                Some(_) => return Err(Failure::Refused(chain(e.error()))),
                None if unprocessed(e.error()) => return Err(Failure::Refused(chain(e.error()))),
                None => return Err(Failure::Reset(chain(e.error()))),
            },
        };
        drop(stream);
        tracing::debug!(%endpoint, "pooled HTTP/2 connection closed; reconnecting");
        let (conn, _) = self.conn(&slot, endpoint).await?;
        let stream = Stream::open(&conn);
        match conn.sender.clone().send_request(unsent).await {
            Ok(response) => Ok(self.answered(&slot, response, stream)),
            Err(e) if unprocessed(&e) => Err(Failure::Refused(chain(&e))),
            Err(e) => Err(Failure::Reset(chain(&e))),
        }
    }

    /// The response, its stream counted open until its body ends; the slot
    /// marked used when the answer comes, too, so a slow answer does not
    /// leave its connection looking idle.
    fn answered(
        &self,
        slot: &Slot,
        response: Response<Incoming>,
        stream: Stream,
    ) -> Response<Body> {
        slot.used_ms.store(ms_since(self.epoch), Ordering::Relaxed);
        response.map(move |body| {
            body.map_frame(move |frame| {
                let _open = &stream;
                frame
            })
            .map_err(Into::into)
            .boxed()
        })
    }

    /// Connections held open now (made, not known closed).
    pub fn open(&self) -> usize {
        let Ok(slots) = self.slots.lock() else {
            return 0;
        };
        slots
            .by_endpoint
            .values()
            .filter_map(|s| s.state.lock().ok())
            .map(|st| st.conns.iter().filter(|c| !c.sender.is_closed()).count())
            .sum()
    }

    /// The endpoint's slot, marked used now. Now and then forgets the
    /// slots of endpoints idle for longer than the idle timeout.
    fn slot(&self, endpoint: SocketAddr) -> Arc<Slot> {
        let now = Instant::now();
        let now_ms = ms_since(self.epoch);
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

    /// A connection of the slot with room for a stream, waiting for one
    /// to be made when none has room; and whether it was open already.
    /// When no new one can be made, a full one takes the request (its
    /// peer queues it).
    async fn conn(&self, slot: &Arc<Slot>, endpoint: SocketAddr) -> Result<(Conn, bool), Failure> {
        let mut fresh = false;
        // A few rounds: those who waited for a new connection choose again,
        // so they spread over it and any further one rather than all
        // piling onto it.
        for _ in 0..4 {
            let connecting = {
                let Ok(mut state) = slot.state.lock() else {
                    return Err(Failure::Connect("connection slot unusable".to_owned()));
                };
                state.conns.retain(|c| !c.sender.is_closed());
                if let Some(conn) = state.conns.iter().find(|c| c.has_room()) {
                    return Ok((conn.clone(), !fresh));
                }
                match &state.connecting {
                    Some(connecting) => connecting.clone(),
                    None => {
                        // Until its SETTINGS come, a new connection is
                        // assumed to allow what its siblings do.
                        let known = state
                            .conns
                            .iter()
                            .map(|c| c.limit.load(Ordering::Relaxed))
                            .min();
                        let connecting = self.connect(slot, endpoint, known);
                        state.connecting = Some(connecting.clone());
                        connecting
                    }
                }
            };
            if let Err(e) = connecting.await {
                return self.full(slot).ok_or(Failure::Connect(e));
            }
            fresh = true;
        }
        self.full(slot)
            .ok_or_else(|| Failure::Connect("no connection with room".to_owned()))
    }

    /// Any open connection of the slot, full or not.
    fn full(&self, slot: &Slot) -> Option<(Conn, bool)> {
        let state = slot.state.lock().ok()?;
        let conn = state.conns.iter().find(|c| !c.sender.is_closed())?;
        Some((conn.clone(), true))
    }

    /// Starts making a connection in a task of its own, which leaves it in
    /// `slot` when made (or the slot empty when not) and then drives it.
    fn connect(
        &self,
        slot: &Arc<Slot>,
        endpoint: SocketAddr,
        known_limit: Option<usize>,
    ) -> Connecting {
        let connector = self.connector.clone();
        let builder = self.builder.clone();
        let config = self.config;
        let epoch = self.epoch;
        let target = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(endpoint.to_string())
            .path_and_query("/")
            .build();
        let weak = Arc::downgrade(slot);
        let task = tokio::spawn(async move {
            let target = target.map_err(|e| format!("{endpoint}: {e}"))?;
            let made = tokio::time::timeout(config.connect_timeout, async {
                let io = connector.oneshot(target.clone()).await.map_err(|e| {
                    let e: BoxError = e.into();
                    chain(e.as_ref())
                })?;
                builder
                    .handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {}", chain(&e)))
            })
            .await
            .unwrap_or_else(|_| Err(format!("no connection within {:?}", config.connect_timeout)));
            let outcome = if made.is_ok() { "ok" } else { "error" };
            metrics::counter!("ferry_proxy_upstream_http2_connects_total", "result" => outcome)
                .increment(1);
            let result = match made {
                Ok((sender, connection)) => {
                    let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
                    let assumed = connection.current_max_send_streams();
                    let limit = Arc::new(AtomicUsize::new(
                        known_limit.map_or(assumed, |known| known.min(assumed)),
                    ));
                    tokio::spawn(drive(
                        connection,
                        weak.clone(),
                        (id, limit.clone()),
                        target.clone(),
                        config,
                        epoch,
                    ));
                    Ok(Conn {
                        sender,
                        streams: Arc::default(),
                        limit,
                        id,
                    })
                }
                Err(e) => Err(format!("{target}: {e}")),
            };
            if let Some(slot) = weak.upgrade()
                && let Ok(mut state) = slot.state.lock()
            {
                state.connecting = None;
                if let Ok(conn) = &result {
                    state.conns.push(conn.clone());
                }
            }
            result
        });
        async move {
            task.await
                .unwrap_or_else(|e| Err(format!("connecting failed: {e}")))
        }
        .boxed()
        .shared()
    }
}

/// Drives one connection until it ends. Once its slot has seen no request
/// for the idle timeout, the slot lets it go: with no sender left it
/// closes after its last stream, even in a pool nobody calls any more.
async fn drive<T>(
    connection: Connection<T, Body, TokioExecutor>,
    slot: Weak<Slot>,
    conn: (u64, Arc<AtomicUsize>),
    target: Uri,
    config: PoolConfig,
    epoch: Instant,
) where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (id, limit) = conn;
    let open = metrics::gauge!("ferry_proxy_upstream_http2_connections");
    open.increment(1.0);
    tokio::pin!(connection);
    // Each time the connection is polled, the peer's stream limit is read
    // for the pool, once its SETTINGS have changed it from the default
    // (until then the pool goes by the connection's siblings).
    let default = connection.as_ref().get_ref().current_max_send_streams();
    let mut connection = std::future::poll_fn(move |cx| {
        let polled = connection.as_mut().poll(cx);
        let now = connection.as_ref().get_ref().current_max_send_streams();
        if now != default {
            limit.store(now, Ordering::Relaxed);
        }
        polled
    });
    let idle_ms = u64::try_from(config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let period = (config.idle_timeout / 2).max(Duration::from_millis(10));
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut let_go = false;
    loop {
        tokio::select! {
            ended = &mut connection => {
                if let Err(e) = ended {
                    tracing::debug!(endpoint = %target, error = %chain(&e), "upstream HTTP/2 connection ended");
                }
                break;
            }
            _ = check.tick(), if !let_go => {
                let Some(slot) = slot.upgrade() else {
                    let_go = true;
                    continue;
                };
                if ms_since(epoch).saturating_sub(slot.used_ms.load(Ordering::Relaxed)) >= idle_ms
                    && let Ok(mut state) = slot.state.lock()
                {
                    tracing::debug!(endpoint = %target, "idle upstream HTTP/2 connection let go");
                    state.conns.retain(|c| c.id != id);
                    let_go = true;
                }
            }
        }
    }
    open.decrement(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::uri::Scheme;
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::AtomicUsize;

    /// Connections a test server saw opened and closed.
    #[derive(Default)]
    struct Seen {
        opened: AtomicUsize,
        closed: AtomicUsize,
    }

    /// An h2c server that answers with the `:authority` it got.
    async fn server() -> (SocketAddr, Arc<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let counted = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.opened.fetch_add(1, Ordering::SeqCst);
                let counted = counted.clone();
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
                    counted.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, seen)
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
        let (addr, seen) = server().await;
        let pool = Arc::new(H2Pool::new(
            HttpConnector::new(),
            Scheme::HTTP,
            PoolConfig::default(),
        ));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let authority = format!("svc-{i}.shop");
                let response = pool.send(addr, request(&authority)).await.unwrap();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, authority.as_bytes());
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(seen.opened.load(Ordering::SeqCst), 1);
        assert_eq!(pool.open(), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = H2Pool::new(HttpConnector::new(), Scheme::HTTP, PoolConfig::default());
        let failure = pool.send(addr, request("a.shop")).await;
        assert!(matches!(failure, Err(Failure::Connect(_))), "{failure:?}");
    }

    #[tokio::test]
    async fn idle_connections_close_even_when_the_pool_is_not_called() {
        let (addr, seen) = server().await;
        let config = PoolConfig {
            idle_timeout: Duration::from_millis(100),
            ..PoolConfig::default()
        };
        let pool = H2Pool::new(HttpConnector::new(), Scheme::HTTP, config);
        let response = pool.send(addr, request("a.shop")).await.unwrap();
        let _ = response.into_body().collect().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            seen.closed.load(Ordering::SeqCst),
            1,
            "the idle connection closed"
        );
        assert_eq!(pool.open(), 0);
        pool.send(addr, request("a.shop")).await.unwrap();
        assert_eq!(seen.opened.load(Ordering::SeqCst), 2);
    }

    /// A connector that waits `delay` before each connection (and counts
    /// them), then fails or connects.
    fn slow_connector(
        attempts: Arc<AtomicUsize>,
        delay: Duration,
        fail: bool,
    ) -> impl Service<
        Uri,
        Response = TokioIo<tokio::net::TcpStream>,
        Error = BoxError,
        Future = BoxFuture<'static, Result<TokioIo<tokio::net::TcpStream>, BoxError>>,
    > + Clone {
        tower::service_fn(move |dst: Uri| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                if fail {
                    return Err::<_, BoxError>("refused".into());
                }
                let host = dst.authority().map(|a| a.to_string()).unwrap_or_default();
                Ok(TokioIo::new(tokio::net::TcpStream::connect(host).await?))
            }
            .boxed()
        })
    }

    #[tokio::test]
    async fn callers_waiting_for_a_failed_connect_share_its_failure() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let connector = slow_connector(attempts.clone(), Duration::from_millis(100), true);
        let pool = Arc::new(H2Pool::new(connector, Scheme::HTTP, PoolConfig::default()));
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                pool.send(addr, request("a.shop")).await
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
        let _ = pool.send(addr, request("a.shop")).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_caller_giving_up_does_not_cancel_the_connect() {
        let (addr, seen) = server().await;
        let attempts = Arc::new(AtomicUsize::new(0));
        let connector = slow_connector(attempts.clone(), Duration::from_millis(100), false);
        let pool = Arc::new(H2Pool::new(connector, Scheme::HTTP, PoolConfig::default()));
        // The first caller gives up (a per-try timeout, say) mid-connect.
        let impatient = tokio::time::timeout(
            Duration::from_millis(20),
            pool.send(addr, request("a.shop")),
        )
        .await;
        assert!(impatient.is_err());
        // The connection is made anyway, and the next caller uses it.
        let response = pool.send(addr, request("b.shop")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert_eq!(seen.opened.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_full_of_streams_gets_a_second() {
        // A server that allows 2 streams per connection and answers slowly.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let counted = opened.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"slow"),
                        )))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(2)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let pool = Arc::new(H2Pool::new(
            HttpConnector::new(),
            Scheme::HTTP,
            PoolConfig::default(),
        ));
        // One request first, so the server's SETTINGS are known (read to
        // its end: the server counts a stream until its handler is done).
        let first = pool.send(addr, request("a.shop")).await.unwrap();
        let _ = first.into_body().collect().await;
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let response = pool.send(addr, request("a.shop")).await?;
                let _ = response.into_body().collect().await;
                Ok::<_, Failure>(())
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let opened = opened.load(Ordering::SeqCst);
        assert!(opened >= 2, "every stream queued on one connection");
        assert!(opened <= 4, "{opened} connections for 6 streams of 2 each");
    }

    #[tokio::test]
    async fn a_refused_stream_is_known_unprocessed() {
        // A server that refuses every stream, as an overloaded one does.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut conn) = h2::server::handshake(stream).await else {
                return;
            };
            while let Some(Ok((_, mut respond))) = conn.accept().await {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            }
        });
        let pool = H2Pool::new(HttpConnector::new(), Scheme::HTTP, PoolConfig::default());
        let failure = pool.send(addr, request("a.shop")).await;
        assert!(matches!(&failure, Err(Failure::Refused(_))), "{failure:?}");
    }
}
