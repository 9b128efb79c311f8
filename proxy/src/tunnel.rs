//! Upgraded connections (WebSocket): once both sides have switched
//! protocols, the two connections are spliced byte for byte. A tunnel is
//! an active connection (`ferry_proxy_active_connections`, and
//! `ferry_proxy_upgraded_connections`) and is closed once no byte has
//! gone either way for the idle timeout, or when the proxy shuts down.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// When the tunnel last moved a byte, in milliseconds since `since`.
#[derive(Debug)]
struct Activity {
    since: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// One side of a tunnel, stamping `activity` whenever bytes move.
struct Stamped<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Stamped<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stamped<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Joins the two upgraded connections once both sides have switched (run
/// it as a task of its own); the tunnel ends when either side closes, after `idle` without a byte
/// either way, or on `shutdown`.
pub async fn splice(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    idle: Duration,
    shutdown: CancellationToken,
) {
    {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        metrics::gauge!("ferry_proxy_upgraded_connections").increment(1.0);
        metrics::gauge!("ferry_proxy_active_connections").increment(1.0);
        let activity = Arc::new(Activity {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
        });
        let mut down = Stamped {
            io: TokioIo::new(down),
            activity: activity.clone(),
        };
        let mut up = Stamped {
            io: TokioIo::new(up),
            activity: activity.clone(),
        };
        let period = (idle / 4).max(Duration::from_millis(1));
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                ended = &mut copy => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "upgraded connection ended with an error");
                    }
                    break;
                }
                _ = check.tick() => {
                    if activity.idle_for() >= idle {
                        metrics::counter!("ferry_proxy_idle_connections_closed_total").increment(1);
                        tracing::debug!(?idle, "closing an idle upgraded connection");
                        break;
                    }
                }
                _ = shutdown.cancelled() => break,
            }
        }
        metrics::gauge!("ferry_proxy_active_connections").decrement(1.0);
        metrics::gauge!("ferry_proxy_upgraded_connections").decrement(1.0);
    }
}
