//! One client connection, HTTP/1.1 or HTTP/2 (told apart by the
//! preface), and the limits that keep a hostile client from holding the
//! proxy's memory or time:
//!
//! - a request head may be at most `max_head_bytes` (431 beyond; 414 when
//!   the request line alone is that long), and must arrive within
//!   `head_timeout` of its first byte, however long the connection was
//!   idle before;
//! - a connection with no request in flight for `idle_timeout` is closed
//!   gracefully (HTTP/2 peers are pinged, and get a GOAWAY);
//! - a connection whose streams are mostly reset by the client before
//!   they finish (HTTP/2 "rapid reset", also with a short delay) is
//!   closed, as Envoy's premature-reset check does.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::call::{Body, BoxError};
use crate::server::{Peer, Proxy, handle};

/// What a client connection may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// No request in flight for this long: the connection is closed.
    pub idle_timeout: Duration,
    /// A request head must arrive within this long of its first byte.
    pub head_timeout: Duration,
    /// The largest request head (request line and headers), in bytes.
    pub max_head_bytes: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            head_timeout: Duration::from_secs(10),
            max_head_bytes: 60 * 1024,
        }
    }
}

/// Streams a connection must have opened before its reset share counts.
const RESET_MIN_STREAMS: u64 = 100;
/// A stream the client abandons sooner than this after it began is reset
/// prematurely (Envoy's `premature_reset_min_stream_lifetime_seconds`).
const PREMATURE: Duration = Duration::from_secs(1);

/// What one client connection is doing: requests whose responses are not
/// finished, when the last one finished, a request head under way, and
/// how its streams ended.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since `since`.
    quiet_from_ms: AtomicU64,
    /// When the first byte of a request head not yet dispatched arrived,
    /// in milliseconds since `since`, plus one; 0 when none is under way.
    head_from_ms: AtomicU64,
    since: Instant,
    streams: AtomicU64,
    premature_resets: AtomicU64,
    /// Set when the connection must be closed at once (abusive resets).
    abort: AtomicBool,
    wake: Notify,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            quiet_from_ms: AtomicU64::new(0),
            head_from_ms: AtomicU64::new(0),
            since: Instant::now(),
            streams: AtomicU64::new(0),
            premature_resets: AtomicU64::new(0),
            abort: AtomicBool::new(false),
            wake: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long the connection has had no request in flight (zero while
    /// one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let quiet_from = self.quiet_from_ms.load(Ordering::SeqCst);
        Duration::from_millis(self.now_ms().saturating_sub(quiet_from))
    }

    /// How long the request head under way has been arriving.
    fn head_for(&self) -> Option<Duration> {
        let from = self.head_from_ms.load(Ordering::SeqCst);
        (from > 0).then(|| Duration::from_millis(self.now_ms().saturating_sub(from - 1)))
    }
}

/// Counts one request in flight on its connection until dropped, which
/// is when its response body ends (or the request is abandoned).
struct Busy {
    activity: Arc<Activity>,
    started: Instant,
    finished: AtomicBool,
}

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        activity.head_from_ms.store(0, Ordering::SeqCst);
        activity.streams.fetch_add(1, Ordering::Relaxed);
        Self {
            activity: activity.clone(),
            started: Instant::now(),
            finished: AtomicBool::new(false),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.activity;
        a.quiet_from_ms.store(a.now_ms(), Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.finished.load(Ordering::Relaxed) || self.started.elapsed() >= PREMATURE {
            return;
        }
        let resets = a.premature_resets.fetch_add(1, Ordering::Relaxed) + 1;
        let streams = a.streams.load(Ordering::Relaxed);
        if streams >= RESET_MIN_STREAMS
            && resets * 2 >= streams
            && !a.abort.swap(true, Ordering::SeqCst)
        {
            a.wake.notify_one();
        }
    }
}

/// A response body that tells its [`Busy`] when it has been sent whole.
struct Tracked {
    body: Body,
    busy: Busy,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.busy.finished.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.body.is_end_stream();
        if end {
            self.busy.finished.store(true, Ordering::Relaxed);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's byte stream, watched for request heads: when one begins
/// (bytes arrive with no request in flight) and whether its request line
/// ends within the head limit. HTTP/2 connections are not watched (their
/// heads are bounded by the HTTP/2 settings).
struct HeadWatch<S> {
    io: S,
    activity: Arc<Activity>,
    limit: usize,
    /// None until the connection's first bytes tell HTTP/2 from HTTP/1.
    http2: Option<bool>,
    head_bytes: usize,
    line_done: bool,
}

/// The reply to a request line longer than the head limit, written before
/// the connection is closed.
const URI_TOO_LONG: &[u8] =
    b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\nconnection: close\r\nx-ferry-proxy: local-reply\r\n\r\n";

impl<S: AsyncRead + AsyncWrite + Unpin> HeadWatch<S> {
    /// Takes in bytes just read; an error refuses the request.
    fn watch(&mut self, bytes: &[u8], cx: &mut Context<'_>) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let http2 = *self
            .http2
            .get_or_insert_with(|| bytes.starts_with(b"PRI * HTTP/2.0"));
        if http2 || self.activity.in_flight.load(Ordering::SeqCst) > 0 {
            return Ok(());
        }
        if self.activity.head_from_ms.load(Ordering::SeqCst) == 0 {
            let now = self.activity.now_ms();
            self.activity.head_from_ms.store(now + 1, Ordering::SeqCst);
            self.head_bytes = 0;
            self.line_done = false;
        }
        self.head_bytes += bytes.len();
        if !self.line_done {
            self.line_done = bytes.contains(&b'\n');
            if !self.line_done && self.head_bytes >= self.limit {
                metrics::counter!("ferry_proxy_local_replies_total", "reason" => "uri_too_long")
                    .increment(1);
                // Best effort: the reply fits a socket's empty send buffer.
                let _ = Pin::new(&mut self.io).poll_write(cx, URI_TOO_LONG);
                return Err(std::io::Error::other(
                    "request line longer than the head limit",
                ));
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadWatch<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => Poll::Ready(this.watch(&buf.filled()[before..], cx)),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadWatch<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves one connection until it ends, it has been idle for the idle
/// timeout, or the drain closes it (those two gracefully, after the
/// requests in flight), or a limit is broken (at once).
pub async fn serve<S>(io: S, proxy: Arc<Proxy>, peer: Peer, drain: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = proxy.limits;
    let idle = limits.idle_timeout;
    let activity = Activity::new();
    let io = TokioIo::new(HeadWatch {
        io,
        activity: activity.clone(),
        limit: limits.max_head_bytes,
        http2: None,
        head_bytes: 0,
        line_done: false,
    });
    let busy = activity.clone();
    let client = Arc::new(peer.clone());
    let service = hyper::service::service_fn(move |request| {
        let proxy = proxy.clone();
        let client = client.clone();
        let busy = Busy::new(&busy);
        async move {
            let response = handle(proxy, request, &client).await;
            Ok::<_, Infallible>(response.map(move |body| Tracked { body, busy }.boxed()))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // HTTP/1.1: the wait for a request's head (on a kept-alive connection,
    // the idle time between requests) is bounded, and so is its size.
    // HTTP/2: peers are pinged and dropped when they stop answering; a
    // header list is bounded like an HTTP/1.1 head.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .max_buf_size(limits.max_head_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(idle / 2)
        .keep_alive_timeout(idle / 2);
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    // Limits are checked a few times per timeout, so an idle connection
    // closes between 1 and 1.25 timeouts after its last response.
    let period = (idle.min(limits.head_timeout) / 4).max(Duration::from_millis(1));
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = drain.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = activity.wake.notified() => {
                if activity.abort.load(Ordering::SeqCst) {
                    metrics::counter!("ferry_proxy_premature_reset_connections_closed_total").increment(1);
                    tracing::warn!(
                        peer = %peer.addr,
                        streams = activity.streams.load(Ordering::Relaxed),
                        resets = activity.premature_resets.load(Ordering::Relaxed),
                        "closing a connection whose streams are mostly reset early"
                    );
                    return;
                }
            }
            _ = check.tick() => {
                if activity.head_for().is_some_and(|t| t >= limits.head_timeout) {
                    metrics::counter!("ferry_proxy_request_head_timeouts_total").increment(1);
                    tracing::debug!(peer = %peer.addr, timeout = ?limits.head_timeout, "request head too slow: closing");
                    return;
                }
                if !closing && activity.idle_for() >= idle {
                    metrics::counter!("ferry_proxy_idle_connections_closed_total").increment(1);
                    tracing::debug!(peer = %peer.addr, ?idle, "closing an idle client connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}
