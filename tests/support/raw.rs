//! Raw TCP: a relay that can be shut, a byte-exact backend, and raw
//! request exchanges for malformed-input tests.

use super::*;

/// A TCP relay to a loopback port that can be shut: while shut it cuts the
/// connections it relays and drops new ones at once, as an unreachable
/// peer would; open, it relays bytes both ways.
pub struct Gate {
    pub port: u16,
    open: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    pub async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gate");
        let port = listener.local_addr().expect("gate addr").port();
        let (open, _) = tokio::sync::watch::channel(true);
        let watch = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut shut = watch.subscribe();
                if !*shut.borrow_and_update() {
                    continue; // dropped: the peer sees its connection close
                }
                tokio::spawn(async move {
                    let Ok(mut upstream) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = shut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { port, open, task }
    }

    pub fn shut(&self) {
        self.open.send_replace(false);
    }

    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend on a raw socket: it records the bytes of every request it
/// receives (head and body, as they came) and answers each with the
/// reply set by the test, after its delay. A request cut short is
/// recorded as far as it came.
pub struct RawBackend {
    pub port: u16,
    seen: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    reply: Arc<std::sync::Mutex<(Vec<u8>, Duration)>>,
    task: tokio::task::JoinHandle<()>,
}

/// A plain answer: 200 with body `ok`.
pub const RAW_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

impl RawBackend {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw backend");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let reply = Arc::new(std::sync::Mutex::new((RAW_OK.to_vec(), Duration::ZERO)));
        let (s, r) = (seen.clone(), reply.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(raw_exchange(stream, s.clone(), r.clone()));
            }
        });
        Self {
            port,
            seen,
            reply,
            task,
        }
    }

    /// What every request gets from now on, after `delay`.
    pub fn set_reply(&self, bytes: &[u8], delay: Duration) {
        *self.reply.lock().unwrap_or_else(|p| p.into_inner()) = (bytes.to_vec(), delay);
    }

    /// Every request received so far, as bytes.
    pub fn seen(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Serves one connection of a [`RawBackend`]: reads a head, then a body
/// by its Content-Length or chunked framing, records it, answers.
async fn raw_exchange(
    mut stream: tokio::net::TcpStream,
    seen: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    reply: Arc<std::sync::Mutex<(Vec<u8>, Duration)>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        // One request: its head, then its body.
        let complete = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let body_start = end + 4;
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let chunked = head.contains("transfer-encoding: chunked");
                let done = if chunked {
                    find(&buf[body_start..], b"0\r\n\r\n").map(|at| body_start + at + 5)
                } else {
                    let n = length.unwrap_or(0);
                    (buf.len() >= body_start + n).then_some(body_start + n)
                };
                if let Some(done) = done {
                    break Some(done);
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let Some(done) = complete else {
            if !buf.is_empty() {
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
            }
            return;
        };
        let request: Vec<u8> = buf.drain(..done).collect();
        seen.lock().unwrap_or_else(|p| p.into_inner()).push(request);
        let (answer, delay) = reply.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// Sends `bytes` on a new connection to `port` and reads the answer until
/// the peer closes or nothing comes for `quiet`.
pub async fn raw_send(port: u16, bytes: &[u8], quiet: Duration) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return Vec::new();
    };
    if stream.write_all(bytes).await.is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(quiet, stream.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    out
}

/// The status code of a raw HTTP/1.1 answer (0 when there is none).
pub fn raw_status(answer: &[u8]) -> u16 {
    answer
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok())
        .unwrap_or(0)
}
