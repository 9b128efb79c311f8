//! The HTTPS side of the fake API server: TLS accept loop, client-certificate,
//! bearer-token and service-account-token authentication, authorization
//! (RBAC for service accounts, injected refusals), routing of the Kubernetes
//! REST paths and API discovery, lists with paging and the chunked
//! newline-delimited JSON watch stream (replay, live events, bookmarks,
//! in-stream 410s, timeouts and test-forced aborts). Requests on one object
//! (and its `scale` subresource) and creates are served by `writes`.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Options;
use crate::rbac::{self, Attributes, User, Verb};
use crate::store::{
    Bus, FieldSelector, Filter, LabelSelector, ResourceKind, Store, WatchStart, event_line,
};

pub(crate) type Body = BoxBody<Bytes, io::Error>;

/// One access as RBAC names it: (verb, API group, resource).
pub(crate) type Access = (String, String, String);

/// State shared by the test-control API and every connection.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    pub token: String,
    pub acceptor: TlsAcceptor,
    pub addr: SocketAddr,
    pub opts: Options,
    pub list_requests: AtomicU64,
    pub watch_requests: AtomicU64,
    pub open_watches: AtomicU64,
    /// Cancelled (and replaced) by `drop_watches`.
    pub watch_kill: Mutex<CancellationToken>,
    /// Requests authenticated by a client certificate, by user (CN).
    pub cert_requests: Mutex<BTreeMap<String, u64>>,
    /// What clients did, by user: authorized resource requests only.
    pub access: Mutex<BTreeMap<String, BTreeSet<Access>>>,
    /// (verb, kind) pairs refused to everyone (`TestKube::deny`).
    pub denied: Mutex<BTreeSet<(String, ResourceKind)>>,
}

impl Shared {
    pub fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn access(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<Access>>> {
        self.access.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn denied(&self) -> std::sync::MutexGuard<'_, BTreeSet<(String, ResourceKind)>> {
        self.denied.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, user: &User, attrs: &Attributes<'_>) {
        self.access().entry(user.name()).or_default().insert((
            attrs.verb.as_str().to_owned(),
            attrs.kind.group().to_owned(),
            attrs.resource(),
        ));
    }

    /// Whether `user` may do `attrs`: refused when the verb is denied on the
    /// kind (for everyone), otherwise service accounts by RBAC and everyone
    /// else unrestricted. `Err` is the 403 answer.
    fn authorize(&self, user: &User, attrs: &Attributes<'_>) -> Result<(), Refusal> {
        let denied = self
            .denied()
            .contains(&(attrs.verb.as_str().to_owned(), attrs.kind));
        let allowed = !denied
            && match user {
                User::ServiceAccount { namespace, name } => {
                    rbac::allows(&self.store(), namespace, name, attrs)
                }
                User::Admin | User::Certificate(_) => true,
            };
        if allowed {
            return Ok(());
        }
        let message = attrs.forbidden_message(&user.name());
        Err(Refusal::new(403, "Forbidden", &message).with_details(details(attrs.kind, attrs.name)))
    }
}

/// Accepts connections until `shutdown` is cancelled. Every connection task
/// (and every watch task) is tracked by `tracker` and ends when `shutdown`
/// is cancelled.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let conn = shutdown.child_token();
                    tracker.spawn(serve_connection(shared.clone(), tcp, conn, tracker.clone()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    conn: CancellationToken,
    tracker: TaskTracker,
) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::time::timeout(Duration::from_secs(10), shared.acceptor.accept(tcp));
    let tls = tokio::select! {
        _ = conn.cancelled() => return,
        r = handshake => match r {
            Ok(Ok(tls)) => tls,
            _ => return,
        },
    };
    // The handshake verified any certificate against the CA; its CN is the
    // user, as for the real API server.
    let cert_user: Option<Arc<str>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::tls::common_name(leaf))
        .filter(|cn| !cn.is_empty())
        .map(Arc::from);
    let conn2 = conn.clone();
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn2.clone();
        let tracker = tracker.clone();
        let cert_user = cert_user.clone();
        async move { Ok::<_, Infallible>(handle(shared, conn, tracker, cert_user, req).await) }
    });
    let served = http1::Builder::new().serve_connection(TokioIo::new(tls), svc);
    // Dropping the connection future closes the socket without a TLS
    // close_notify or a final chunk: an abrupt end, as when a server dies.
    tokio::select! {
        _ = served => {}
        _ = conn.cancelled() => {}
    }
}

fn full(code: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub(crate) fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    full(code, "application/json", value.to_string())
}

/// A `Status` object as the API server returns it for failures.
pub(crate) fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// A refused request: the failure `Status` the server answers with.
#[derive(Debug)]
pub(crate) struct Refusal(Box<Value>);

impl Refusal {
    pub fn new(code: u16, reason: &str, message: &str) -> Self {
        Refusal(Box::new(status_object(code, reason, message)))
    }

    /// The same refusal with `details` about the resource.
    pub fn with_details(mut self, details: Value) -> Self {
        self.0["details"] = details;
        self
    }

    pub fn into_response(self) -> Response<Body> {
        let code = self.0["code"].as_u64().and_then(|c| u16::try_from(c).ok());
        let code = code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.0)
    }
}

pub(crate) fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &status_object(code, reason, message),
    )
}

/// The `details` of a Status about one resource (and object).
pub(crate) fn details(kind: ResourceKind, name: Option<&str>) -> Value {
    let mut details = json!({"kind": kind.plural()});
    if let Some(name) = name {
        details["name"] = name.into();
    }
    if !kind.group().is_empty() {
        details["group"] = kind.group().into();
    }
    details
}

/// Who the request is from: a verified client certificate (counted per
/// user), the server's bearer token, or a minted service-account token.
/// `None` when unauthenticated.
fn authenticate(shared: &Shared, cert_user: Option<&str>, headers: &HeaderMap) -> Option<User> {
    if let Some(user) = cert_user {
        *shared
            .cert_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user.to_owned())
            .or_default() += 1;
        return Some(User::Certificate(user.to_owned()));
    }
    let token = bearer_token(headers)?;
    if token == shared.token {
        return Some(User::Admin);
    }
    let (namespace, name) = shared.store().token_user(token)?;
    Some(User::ServiceAccount { namespace, name })
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?
        .trim();
    (!token.is_empty()).then_some(token)
}

/// Percent-decodes a query component (`+` is a space).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Default)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (decode(k), decode(v)),
                    None => (decode(p), String::new()),
                })
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

/// `(kind, namespace, name)` for a resource path.
fn resource_route<'a>(
    segs: &[&'a str],
) -> Option<(ResourceKind, Option<&'a str>, Option<&'a str>)> {
    ResourceKind::ALL.into_iter().find_map(|kind| {
        let rest = match (kind.group(), segs) {
            ("", ["api", version, rest @ ..]) if *version == kind.version() => rest,
            (group, ["apis", g, version, rest @ ..])
                if !group.is_empty() && *g == group && *version == kind.version() =>
            {
                rest
            }
            _ => return None,
        };
        let plural = kind.plural();
        match rest {
            [p] if *p == plural => Some((kind, None, None)),
            [p, name] if *p == plural && !kind.namespaced() => Some((kind, None, Some(*name))),
            ["namespaces", ns, p] if *p == plural && kind.namespaced() => {
                Some((kind, Some(*ns), None))
            }
            ["namespaces", ns, p, name] if *p == plural && kind.namespaced() => {
                Some((kind, Some(*ns), Some(*name)))
            }
            _ => None,
        }
    })
}

/// `(kind, namespace, name, subresource)` for a resource path or, for a
/// Deployment or StatefulSet, the path of its `scale` subresource.
type Route<'a> = (
    ResourceKind,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

fn route<'a>(segs: &[&'a str]) -> Option<Route<'a>> {
    if let Some((kind, namespace, name)) = resource_route(segs) {
        return Some((kind, namespace, name, None));
    }
    let (sub, parent) = segs.split_last()?;
    match resource_route(parent)? {
        (kind, namespace, Some(name)) if *sub == "scale" && kind.is_workload() => {
            Some((kind, namespace, Some(name), Some(*sub)))
        }
        _ => None,
    }
}

/// The discovery entries of a kind: the kind itself and, for workloads,
/// its `scale` subresource.
fn api_resources(kind: ResourceKind) -> Vec<Value> {
    let mut resource = json!({
        "name": kind.plural(),
        "singularName": kind.singular(),
        "namespaced": kind.namespaced(),
        "kind": kind.kind(),
        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
    });
    let short = kind.short_names();
    if !short.is_empty() {
        resource["shortNames"] = json!(short);
    }
    let mut resources = vec![resource];
    if kind.is_workload() {
        resources.push(json!({
            "name": format!("{}/scale", kind.plural()),
            "singularName": "",
            "namespaced": true,
            "group": "autoscaling",
            "version": "v1",
            "kind": "Scale",
            "verbs": ["get", "patch", "update"],
        }));
    }
    resources
}

fn group_version(group: &str, version: &str) -> Value {
    json!({"groupVersion": format!("{group}/{version}"), "version": version})
}

fn api_group(group: &str, version: &str) -> Value {
    json!({
        "name": group,
        "versions": [group_version(group, version)],
        "preferredVersion": group_version(group, version),
    })
}

/// API discovery (`/api`, `/apis`, a group, a group version) over the
/// kinds served right now: a removed CRD's group is gone, as on a real
/// server. `None` when the path is not a discovery path.
fn discovery(shared: &Shared, segs: &[&str]) -> Option<Response<Body>> {
    let served: Vec<ResourceKind> = {
        let store = shared.store();
        ResourceKind::ALL
            .into_iter()
            .filter(|k| store.is_installed(*k))
            .collect()
    };
    let in_group = |group: &str, version: Option<&str>| -> Vec<ResourceKind> {
        served
            .iter()
            .copied()
            .filter(|k| k.group() == group && version.is_none_or(|v| v == k.version()))
            .collect()
    };
    let ok = StatusCode::OK;
    let value = match segs {
        ["api"] => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}
            ],
        }),
        ["api", "v1"] => json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": in_group("", Some("v1")).into_iter().flat_map(api_resources).collect::<Vec<_>>(),
        }),
        ["apis"] => {
            let mut groups: Vec<Value> = Vec::new();
            for kind in served.iter().filter(|k| !k.group().is_empty()) {
                let group = api_group(kind.group(), kind.version());
                if !groups.contains(&group) {
                    groups.push(group);
                }
            }
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
        ["apis", group] => {
            let kind = *in_group(group, None).first()?;
            let mut value = api_group(group, kind.version());
            value["kind"] = "APIGroup".into();
            value["apiVersion"] = "v1".into();
            value
        }
        ["apis", group, version] => {
            let kinds = in_group(group, Some(version));
            if kinds.is_empty() {
                return None;
            }
            json!({
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": format!("{group}/{version}"),
                "resources": kinds.into_iter().flat_map(api_resources).collect::<Vec<_>>(),
            })
        }
        _ => return None,
    };
    Some(json_response(ok, &value))
}

fn not_found() -> Response<Body> {
    status_response(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

async fn handle(
    shared: Arc<Shared>,
    conn: CancellationToken,
    tracker: TaskTracker,
    cert_user: Option<Arc<str>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let Some(user) = authenticate(&shared, cert_user.as_deref(), req.headers()) else {
        return status_response(401, "Unauthorized", "Unauthorized");
    };
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let Some((kind, namespace, name, subresource)) = route(&segs) else {
        // Discovery, version and health: open to every authenticated user.
        if req.method() != Method::GET {
            return method_not_allowed();
        }
        return non_resource(&shared, &segs);
    };
    // A kind whose CRD is not installed does not exist.
    if !shared.store().is_installed(kind) {
        return not_found();
    }
    let Some(verb) = Verb::of(req.method(), name.is_some(), query.flag("watch")) else {
        return method_not_allowed();
    };
    if verb == Verb::Create && kind.namespaced() && namespace.is_none() {
        return method_not_allowed();
    }
    if subresource.is_some() && !matches!(verb, Verb::Get | Verb::Update | Verb::Patch) {
        return method_not_allowed();
    }
    let attrs = Attributes {
        verb,
        kind,
        namespace,
        name,
        subresource,
    };
    if let Err(refused) = shared.authorize(&user, &attrs) {
        return refused.into_response();
    }
    shared.record(&user, &attrs);
    match verb {
        Verb::List | Verb::Watch => collection(&shared, conn, &tracker, kind, namespace, &query),
        _ => crate::writes::object(&shared, &attrs, &query, req).await,
    }
}

fn method_not_allowed() -> Response<Body> {
    status_response(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
    )
}

/// `/version`, health checks and API discovery.
fn non_resource(shared: &Shared, segs: &[&str]) -> Response<Body> {
    let ok = StatusCode::OK;
    match segs {
        ["version"] => json_response(
            ok,
            &json!({
                "major": "1",
                "minor": "37",
                "gitVersion": "v1.37.0-ferry-testkube",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.25.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            }),
        ),
        ["healthz" | "livez" | "readyz"] => full(ok, "text/plain", "ok".into()),
        ["api" | "apis", ..] if segs.len() <= 3 => {
            discovery(shared, segs).unwrap_or_else(not_found)
        }
        _ => not_found(),
    }
}

fn collection(
    shared: &Arc<Shared>,
    conn: CancellationToken,
    tracker: &TaskTracker,
    kind: ResourceKind,
    namespace: Option<&str>,
    query: &Query,
) -> Response<Body> {
    let labels = match LabelSelector::parse(query.get("labelSelector").unwrap_or("")) {
        Ok(l) => l,
        Err(e) => return status_response(400, "BadRequest", &e),
    };
    let filter = Filter {
        kind,
        namespace: namespace.map(str::to_string),
        labels,
        fields: FieldSelector::parse(query.get("fieldSelector").unwrap_or("")),
    };
    if query.flag("watch") {
        return watch(shared, conn, tracker, filter, query);
    }
    shared.list_requests.fetch_add(1, Ordering::SeqCst);
    let limit = match query
        .get("limit")
        .filter(|s| !s.is_empty())
        .map(str::parse::<usize>)
    {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return status_response(400, "BadRequest", "limit must be a number"),
    };
    let cont = query.get("continue").filter(|s| !s.is_empty());
    match shared.store().list(&filter, limit, cont) {
        Ok(list) => json_response(StatusCode::OK, &list),
        Err(e) => status_response(410, "Expired", &e.0),
    }
}

fn watch(
    shared: &Arc<Shared>,
    conn: CancellationToken,
    tracker: &TaskTracker,
    filter: Filter,
    query: &Query,
) -> Response<Body> {
    shared.watch_requests.fetch_add(1, Ordering::SeqCst);
    let from = match query
        .get("resourceVersion")
        .filter(|s| !s.is_empty() && *s != "0")
    {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return status_response(
                    400,
                    "BadRequest",
                    &format!("invalid resourceVersion {s:?}"),
                );
            }
        },
    };
    let timeout = match query.get("timeoutSeconds").map(str::parse::<u64>) {
        Some(Ok(secs)) if secs > 0 => Duration::from_secs(secs),
        _ => shared.opts.default_watch_timeout,
    };
    let bookmarks = query.flag("allowWatchBookmarks");
    let send_initial = query.flag("sendInitialEvents");
    let kill = shared
        .watch_kill
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    // Subscribing and snapshotting under one lock: nothing falls in between.
    let (rx, start) = shared
        .store()
        .start_watch(&filter, if send_initial { None } else { from });
    let (tx, mut body_rx) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(64);
    let task = WatchTask {
        shared: shared.clone(),
        filter,
        tx,
        conn,
        kill,
        deadline: Instant::now() + timeout,
        bookmarks,
        progress: 0,
    };
    tracker.spawn(task.run(rx, start, send_initial && bookmarks));
    let stream = futures::stream::poll_fn(move |cx| body_rx.poll_recv(cx));
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

struct Stop;

struct WatchTask {
    shared: Arc<Shared>,
    filter: Filter,
    tx: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
    conn: CancellationToken,
    kill: CancellationToken,
    deadline: Instant,
    bookmarks: bool,
    /// Every change up to this resourceVersion has been handled.
    progress: u64,
}

struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WatchTask {
    async fn run(
        mut self,
        mut rx: broadcast::Receiver<Bus>,
        start: WatchStart,
        end_bookmark: bool,
    ) {
        self.shared.open_watches.fetch_add(1, Ordering::SeqCst);
        let _open = OpenWatch(self.shared.clone());
        let _ = self.stream(&mut rx, start, end_bookmark).await;
    }

    async fn stream(
        &mut self,
        rx: &mut broadcast::Receiver<Bus>,
        start: WatchStart,
        end_bookmark: bool,
    ) -> Result<(), Stop> {
        match start {
            WatchStart::Expired { requested, oldest } => {
                return self
                    .expired(&format!("too old resource version: {requested} ({oldest})"))
                    .await;
            }
            WatchStart::Replay { lines, rv } => {
                for line in lines {
                    self.emit(line).await?;
                }
                self.progress = rv;
                if end_bookmark {
                    self.emit(self.bookmark(rv, true)).await?;
                }
            }
        }
        let period = self.shared.opts.bookmark_interval;
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.kill.cancelled() => return Err(self.abort()),
                _ = self.conn.cancelled() => return Err(Stop),
                _ = tokio::time::sleep_until(self.deadline) => return Ok(()),
                _ = tick.tick(), if self.bookmarks => {
                    // Every change up to `current` is already on the bus.
                    let current = self.shared.store().resource_version();
                    loop {
                        match rx.try_recv() {
                            Ok(msg) => self.on_bus(msg).await?,
                            Err(broadcast::error::TryRecvError::Empty) => break,
                            Err(broadcast::error::TryRecvError::Lagged(_)) => {
                                return self.expired("watch fell behind").await;
                            }
                            Err(broadcast::error::TryRecvError::Closed) => return Ok(()),
                        }
                    }
                    self.emit(self.bookmark(current.max(self.progress), false)).await?;
                }
                msg = rx.recv() => match msg {
                    Ok(msg) => self.on_bus(msg).await?,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return self.expired("watch fell behind").await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
            }
        }
    }

    async fn on_bus(&mut self, msg: Bus) -> Result<(), Stop> {
        match msg {
            Bus::Change(change) => {
                if change.rv <= self.progress {
                    return Ok(());
                }
                self.progress = change.rv;
                if let Some(t) = self.filter.event_type(&change) {
                    self.emit(event_line(t, &change.json)).await?;
                }
                Ok(())
            }
            // The CRD is gone: the watch ends (cleanly, as on a real server).
            Bus::Removed(kind) if kind == self.filter.kind => Err(Stop),
            Bus::Removed(_) => Ok(()),
            Bus::Expired => {
                self.expired(&format!(
                    "too old resource version: {} (history expired)",
                    self.progress
                ))
                .await
            }
        }
    }

    /// Sends the in-stream 410 and ends the watch.
    async fn expired(&mut self, message: &str) -> Result<(), Stop> {
        let status = status_object(410, "Expired", message);
        self.emit(event_line("ERROR", &status.to_string())).await?;
        Err(Stop)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> String {
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if initial_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        let object = json!({
            "kind": self.filter.kind.kind(),
            "apiVersion": self.filter.kind.api_version(),
            "metadata": metadata,
        });
        event_line("BOOKMARK", &object.to_string())
    }

    /// Kills the connection mid-stream (no final chunk).
    fn abort(&self) -> Stop {
        let _ = self.tx.try_send(Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "watch dropped by the test",
        )));
        self.conn.cancel();
        Stop
    }

    async fn emit(&self, line: String) -> Result<(), Stop> {
        let frame = Ok(Frame::data(Bytes::from(line)));
        tokio::select! {
            sent = self.tx.send(frame) => sent.map_err(|_| Stop),
            _ = self.kill.cancelled() => Err(self.abort()),
            _ = self.conn.cancelled() => Err(Stop),
            // A client that stopped reading still loses its watch on time.
            _ = tokio::time::sleep_until(self.deadline) => Err(Stop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = Query::parse(Some(
            "labelSelector=kubernetes.io%2Fservice-name%3Dweb%2Capp%21%3Dx&watch=1&limit=500&x=a+b&bad=%zz&end=%4",
        ));
        assert_eq!(
            q.get("labelSelector"),
            Some("kubernetes.io/service-name=web,app!=x")
        );
        assert!(q.flag("watch"));
        assert_eq!(q.get("limit"), Some("500"));
        assert_eq!(q.get("x"), Some("a b"));
        assert_eq!(q.get("bad"), Some("%zz"));
        assert_eq!(q.get("end"), Some("%4"));
        assert_eq!(q.get("missing"), None);
    }

    #[test]
    fn routes() {
        assert_eq!(
            resource_route(&["api", "v1", "services"]),
            Some((ResourceKind::Service, None, None))
        );
        assert_eq!(
            resource_route(&[
                "apis",
                "discovery.k8s.io",
                "v1",
                "namespaces",
                "a",
                "endpointslices",
                "b"
            ]),
            Some((ResourceKind::EndpointSlice, Some("a"), Some("b")))
        );
        assert_eq!(
            resource_route(&[
                "apis",
                "multicluster.x-k8s.io",
                "v1alpha1",
                "namespaces",
                "shop",
                "serviceexports"
            ]),
            Some((ResourceKind::ServiceExport, Some("shop"), None))
        );
        assert_eq!(
            resource_route(&[
                "apis",
                "multicluster.x-k8s.io",
                "v1alpha1",
                "serviceexports"
            ]),
            Some((ResourceKind::ServiceExport, None, None))
        );
        assert_eq!(
            resource_route(&["apis", "multicluster.x-k8s.io", "v1", "serviceexports"]),
            None
        );
        assert_eq!(resource_route(&["api", "v1", "endpointslices"]), None);
        assert_eq!(resource_route(&["api", "v1", "pods"]), None);
        assert_eq!(
            resource_route(&["api", "v1", "namespaces"]),
            Some((ResourceKind::Namespace, None, None))
        );
        assert_eq!(
            resource_route(&["api", "v1", "namespaces", "a"]),
            Some((ResourceKind::Namespace, None, Some("a")))
        );
        assert_eq!(
            resource_route(&["api", "v1", "namespaces", "a", "secrets", "b"]),
            Some((ResourceKind::Secret, Some("a"), Some("b")))
        );
        assert_eq!(
            resource_route(&[
                "apis",
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
                "x"
            ]),
            Some((ResourceKind::ClusterRole, None, Some("x")))
        );
        assert_eq!(
            resource_route(&[
                "apis",
                "rbac.authorization.k8s.io",
                "v1",
                "namespaces",
                "a",
                "clusterroles"
            ]),
            None
        );
        assert_eq!(
            resource_route(&[
                "apis",
                "rbac.authorization.k8s.io",
                "v1",
                "namespaces",
                "a",
                "rolebindings",
                "b"
            ]),
            Some((ResourceKind::RoleBinding, Some("a"), Some("b")))
        );
        assert_eq!(
            resource_route(&["apis", "rbac.authorization.k8s.io", "v1", "roles"]),
            Some((ResourceKind::Role, None, None))
        );
        assert_eq!(
            resource_route(&["apis", "rbac.authorization.k8s.io", "v1", "roles", "x"]),
            None
        );
        assert_eq!(resource_route(&["api", "v1", "services", "x"]), None);
        assert_eq!(
            resource_route(&["api", "v1", "namespaces", "a", "status"]),
            None
        );
        let apps = |rest: &[&'static str]| {
            let mut segs = vec!["apis", "apps", "v1", "namespaces", "shop"];
            segs.extend_from_slice(rest);
            route(&segs)
        };
        assert_eq!(
            apps(&["deployments", "web", "scale"]),
            Some((
                ResourceKind::Deployment,
                Some("shop"),
                Some("web"),
                Some("scale")
            ))
        );
        assert_eq!(
            apps(&["statefulsets", "db"]),
            Some((ResourceKind::StatefulSet, Some("shop"), Some("db"), None))
        );
        assert_eq!(apps(&["deployments", "web", "status"]), None);
        assert_eq!(
            apps(&["deployments", "scale"]),
            Some((ResourceKind::Deployment, Some("shop"), Some("scale"), None))
        );
        assert_eq!(
            route(&["api", "v1", "namespaces", "a", "secrets", "b", "scale"]),
            None
        );
        assert_eq!(
            route(&[
                "apis",
                "autoscaling",
                "v2",
                "namespaces",
                "a",
                "horizontalpodautoscalers"
            ]),
            Some((ResourceKind::HorizontalPodAutoscaler, Some("a"), None, None))
        );
        assert_eq!(
            route(&[
                "apis",
                "policy",
                "v1",
                "namespaces",
                "a",
                "poddisruptionbudgets",
                "p"
            ]),
            Some((
                ResourceKind::PodDisruptionBudget,
                Some("a"),
                Some("p"),
                None
            ))
        );
        assert_eq!(
            route(&["api", "v1", "namespaces", "a", "configmaps", "c"]),
            Some((ResourceKind::ConfigMap, Some("a"), Some("c"), None))
        );
    }
}
