//! gRPC on loopback: in-test tonic servers that answer with their label
//! and count their calls, and the real Python gRPC client (PyPI's
//! `grpcio`, `tests/grpc_client/client.py`), proxyless through Ferry's xDS
//! or through a proxy.

use super::*;

use ferry_proto::google::protobuf::StringValue;
use tokio::io::AsyncBufReadExt;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};

/// The method every backend answers, and the client calls.
pub const WHO_SERVICE: &str = "ferry.test.Who";

/// gRPC backends: each answers `/ferry.test.Who/*` with its
/// `cluster/name` label (a `StringValue`), counting its calls.
pub struct GrpcBackends {
    pub addrs: BTreeMap<String, SocketAddr>,
    hits: BTreeMap<String, Arc<AtomicU64>>,
    /// The status each backend answers with (OK unless set).
    codes: BTreeMap<String, Arc<std::sync::atomic::AtomicI32>>,
    stops: BTreeMap<String, tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
struct Who {
    label: Arc<str>,
    hits: Arc<AtomicU64>,
    code: Arc<std::sync::atomic::AtomicI32>,
}

impl tonic::server::NamedService for Who {
    const NAME: &'static str = WHO_SERVICE;
}

impl Service<http::Request<tonic::body::Body>> for Who {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let who = self.clone();
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<StringValue, StringValue>::default();
            Ok(tonic::server::Grpc::new(codec).unary(who, request).await)
        })
    }
}

impl tonic::server::UnaryService<StringValue> for Who {
    type Response = StringValue;
    type Future = std::future::Ready<Result<tonic::Response<StringValue>, tonic::Status>>;

    fn call(&mut self, _: tonic::Request<StringValue>) -> Self::Future {
        self.hits.fetch_add(1, Ordering::Relaxed);
        let code = tonic::Code::from_i32(self.code.load(Ordering::Relaxed));
        std::future::ready(if code == tonic::Code::Ok {
            Ok(tonic::Response::new(StringValue {
                value: self.label.to_string(),
            }))
        } else {
            Err(tonic::Status::new(code, format!("{} fails", self.label)))
        })
    }
}

impl GrpcBackends {
    /// Starts one tonic server per `cluster/name` label, on 127.0.0.1.
    pub async fn start(labels: &[&str]) -> Self {
        let mut backends = Self {
            addrs: BTreeMap::new(),
            hits: BTreeMap::new(),
            codes: BTreeMap::new(),
            stops: BTreeMap::new(),
            tasks: Vec::new(),
        };
        for label in labels {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .expect("bind gRPC backend");
            let addr = listener.local_addr().expect("addr");
            let who = Who {
                label: Arc::from(*label),
                hits: Arc::new(AtomicU64::new(0)),
                code: Arc::new(std::sync::atomic::AtomicI32::new(tonic::Code::Ok as i32)),
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            backends.addrs.insert(label.to_string(), addr);
            backends.hits.insert(label.to_string(), who.hits.clone());
            backends.codes.insert(label.to_string(), who.code.clone());
            backends.stops.insert(label.to_string(), stop);
            backends.tasks.push(tokio::spawn(async move {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let _ = tonic::transport::Server::builder()
                    .add_service(who)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await;
            }));
        }
        backends
    }

    pub fn addr(&self, label: &str) -> String {
        self.addrs[label].to_string()
    }

    /// Calls `label` has answered since it started (or was last reset).
    pub fn hits(&self, label: &str) -> u64 {
        self.hits[label].load(Ordering::Relaxed)
    }

    /// Every backend's calls, by label.
    pub fn all_hits(&self) -> BTreeMap<String, u64> {
        self.hits
            .iter()
            .map(|(l, h)| (l.clone(), h.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn reset_hits(&self) {
        for h in self.hits.values() {
            h.store(0, Ordering::Relaxed);
        }
    }

    /// Makes a backend answer every call with `code` from now on.
    pub fn set_code(&self, label: &str, code: tonic::Code) {
        self.codes[label].store(code as i32, Ordering::Relaxed);
    }
}

impl Drop for GrpcBackends {
    fn drop(&mut self) {
        for (_, stop) in std::mem::take(&mut self.stops) {
            let _ = stop.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The Python with `grpcio`: `FERRY_PYTHON`, or the `.venv` that
/// `scripts/test.sh` makes.
pub fn grpc_python() -> PathBuf {
    let python = std::env::var("FERRY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import grpc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import grpc: run `bash scripts/test.sh` (installs grpcio into .venv) or set FERRY_PYTHON",
        python.display()
    );
    python
}

/// One call's outcome, as the client reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// The label of the backend that answered.
    Ok(String),
    /// A failed call: its status code and details.
    Failed(String),
}

impl CallOutcome {
    pub fn label(&self) -> Option<&str> {
        match self {
            Self::Ok(l) => Some(l),
            Self::Failed(_) => None,
        }
    }
}

/// How long a client calls.
#[derive(Debug, Clone, Copy)]
pub enum Calls {
    /// This many calls, back to back.
    Count(usize),
    /// Calls for this long, one per `interval`.
    For {
        duration: Duration,
        interval: Duration,
    },
}

/// The real Python gRPC client, running in the background; every call's
/// outcome is recorded with the time it was reported.
pub struct GrpcClient {
    pub node_id: String,
    child: tokio::process::Child,
    calls: Arc<std::sync::Mutex<Vec<(Instant, CallOutcome)>>>,
    reader: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl GrpcClient {
    /// A client resolving `xds:///target` through Ferry, with the bootstrap
    /// `ferry grpc-bootstrap` prints.
    pub fn proxyless(ferry: &Ferry, node_id: &str, target: &str, calls: Calls) -> Self {
        Self::proxyless_with_headers(ferry, node_id, target, calls, &[])
    }

    /// Like [`proxyless`](Self::proxyless), sending `headers` with every call.
    pub fn proxyless_with_headers(
        ferry: &Ferry,
        node_id: &str,
        target: &str,
        calls: Calls,
        headers: &[(&str, &str)],
    ) -> Self {
        Self::proxyless_with(ferry, node_id, target, calls, headers, &[])
    }

    /// Like [`proxyless_with_headers`](Self::proxyless_with_headers), with
    /// `bootstrap` flags for `ferry grpc-bootstrap` (TLS to the xDS port).
    pub fn proxyless_with(
        ferry: &Ferry,
        node_id: &str,
        target: &str,
        calls: Calls,
        headers: &[(&str, &str)],
        bootstrap: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("grpc-bootstrap")
            .args(["--xds-addr", &format!("127.0.0.1:{}", ferry.xds_port)])
            .args(["--node-id", node_id])
            .args(["--node-cluster", "ferry-test"])
            .args(bootstrap)
            .output()
            .expect("run ferry grpc-bootstrap");
        assert!(
            out.status.success(),
            "ferry grpc-bootstrap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bootstrap = dir.path().join("bootstrap.json");
        std::fs::write(&bootstrap, &out.stdout).expect("write bootstrap");
        let target = format!("xds:///{target}");
        Self::spawn(
            dir,
            node_id,
            &target,
            None,
            calls,
            headers,
            Some(&bootstrap),
        )
    }

    /// A client calling through a proxy listening on `port`, with
    /// `authority` naming the service.
    pub fn through_proxy(port: u16, authority: &str, calls: Calls) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = format!("127.0.0.1:{port}");
        Self::spawn(dir, "", &target, Some(authority), calls, &[], None)
    }

    fn spawn(
        dir: tempfile::TempDir,
        node_id: &str,
        target: &str,
        authority: Option<&str>,
        calls: Calls,
        headers: &[(&str, &str)],
        bootstrap: Option<&Path>,
    ) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_client/client.py");
        let mut cmd = tokio::process::Command::new(grpc_python());
        cmd.arg(script).args(["--target", target]);
        if let Some(a) = authority {
            cmd.args(["--authority", a]);
        }
        match calls {
            Calls::Count(n) => {
                cmd.args(["--calls", &n.to_string()]);
            }
            Calls::For { duration, interval } => {
                cmd.args(["--duration", &duration.as_secs_f64().to_string()])
                    .args(["--interval", &interval.as_secs_f64().to_string()]);
            }
        }
        for (name, value) in headers {
            cmd.args(["--header", &format!("{name}={value}")]);
        }
        match bootstrap {
            Some(b) => cmd.env("GRPC_XDS_BOOTSTRAP", b),
            None => cmd.env_remove("GRPC_XDS_BOOTSTRAP"),
        };
        let log = std::fs::File::create(dir.path().join("client.log")).expect("log");
        let mut child = cmd
            .env("GRPC_VERBOSITY", "ERROR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start the Python gRPC client");
        let stdout = child.stdout.take().expect("client stdout");
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = calls.clone();
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut parts = line.splitn(3, ' ');
                let (_, kind, rest) = (parts.next(), parts.next(), parts.next());
                let outcome = match kind {
                    Some("ok") => CallOutcome::Ok(rest.unwrap_or_default().to_owned()),
                    Some("err") => CallOutcome::Failed(rest.unwrap_or_default().to_owned()),
                    _ => continue,
                };
                if let Ok(mut calls) = record.lock() {
                    calls.push((Instant::now(), outcome));
                }
            }
        });
        Self {
            node_id: node_id.to_owned(),
            child,
            calls,
            reader,
            dir,
        }
    }

    /// Every call reported so far.
    pub fn calls(&self) -> Vec<(Instant, CallOutcome)> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Waits up to `limit` for the client to end; every call it made.
    pub async fn finish(mut self, limit: Duration) -> Vec<(Instant, CallOutcome)> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => assert!(status.success(), "client exited {status}:\n{}", self.log()),
            Ok(Err(e)) => panic!("waiting for the client: {e}"),
            Err(_) => panic!("the client did not end within {limit:?}:\n{}", self.log()),
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.reader).await;
        self.calls()
    }

    /// Ends the client now; every call it reported (one in flight is
    /// neither a success nor a failure).
    pub async fn stop(mut self) -> Vec<(Instant, CallOutcome)> {
        let _ = self.child.kill().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.reader).await;
        self.calls()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("client.log")).unwrap_or_default()
    }
}

/// Calls by outcome: each backend's label, or `failed: CODE details`.
pub fn tally(calls: &[(Instant, CallOutcome)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, c) in calls {
        let key = match c {
            CallOutcome::Ok(label) => label.clone(),
            CallOutcome::Failed(e) => format!("failed: {e}"),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}
