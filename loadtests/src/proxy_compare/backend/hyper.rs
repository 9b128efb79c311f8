//! The hyper backend (`--backend hyper`): a minimal HTTP/1.1 and HTTP/2
//! (h2c) server in this process answering every request with 200 and the
//! run's body, on threads of its own (one, or as many as the peers' workers)
//! pinned to the load cores so it never competes with the proxy under test.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::oneshot;

use crate::proxy_compare::machine::pin_current_thread;

/// A running backend; dropping it stops the server thread.
#[derive(Debug)]
pub struct HyperBackend {
    pub addr: SocketAddr,
    pub body: Bytes,
    served: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HyperBackend {
    /// Binds a free loopback port and serves on one thread pinned to
    /// `cores` (a `taskset` list).
    pub fn start(cores: &str, body: Bytes) -> anyhow::Result<Self> {
        Self::start_with(cores, body, 1)
    }

    /// [`HyperBackend::start`] with `workers` threads (a multi-threaded
    /// runtime beyond one).
    pub fn start_with(cores: &str, body: Bytes, workers: usize) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the backend")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = oneshot::channel();
        let (started_tx, started) = std::sync::mpsc::channel();
        let counts = Counts {
            served: served.clone(),
            accepted: accepted.clone(),
        };
        let (cores, answer) = (cores.to_owned(), body.clone());
        let thread = std::thread::Builder::new()
            .name("backend".to_owned())
            .spawn(move || {
                // Pinned first: the runtime's threads inherit the cores.
                let runtime = pin_current_thread(&cores).and_then(|()| {
                    let mut builder = if workers > 1 {
                        let mut b = tokio::runtime::Builder::new_multi_thread();
                        b.worker_threads(workers);
                        b
                    } else {
                        tokio::runtime::Builder::new_current_thread()
                    };
                    builder
                        .enable_all()
                        .build()
                        .context("building the backend runtime")
                });
                let runtime = match runtime {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = started_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let _ = started_tx.send(Ok(()));
                    serve(listener, answer, counts, stopped).await;
                });
            })
            .context("starting the backend thread")?;
        started
            .recv()
            .context("the backend thread ended before it started")??;
        Ok(Self {
            addr,
            body,
            served,
            accepted,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for HyperBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the server counts as it goes.
struct Counts {
    served: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
}

async fn serve(
    listener: tokio::net::TcpListener,
    body: Bytes,
    counts: Counts,
    mut stop: oneshot::Receiver<()>,
) {
    // Open keep-alive connections end with the runtime.
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = &mut stop => break,
        };
        counts.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let (body, served) = (body.clone(), counts.served.clone());
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                served.fetch_add(1, Ordering::Relaxed);
                let response = hyper::Response::new(Full::new(body.clone()));
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_its_body() {
        let backend = HyperBackend::start("0", Bytes::from_static(b"ok\n")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (status, body) = runtime
            .block_on(crate::proxy_compare::fixed_rate::get_once(
                backend.addr,
                "anything",
                std::time::Duration::from_secs(5),
            ))
            .unwrap();
        assert_eq!((status, body.as_ref()), (200, &b"ok\n"[..]));
        assert_eq!((backend.served(), backend.accepted()), (1, 1));
    }
}
