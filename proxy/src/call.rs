//! What flows through the proxy's layer stack: a routed request with the
//! cluster it goes to, and the ways an upstream exchange can fail.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;

use crate::client_body::ClientFault;
use crate::config::{Endpoint, Upstream};
use crate::retry::RetryConfig;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request and response bodies, streamed.
pub type Body = BoxBody<Bytes, BoxError>;

/// A request on its way to a cluster.
#[derive(Debug)]
pub struct Call {
    pub request: Request<Body>,
    pub upstream: Arc<Upstream>,
    /// The route's whole-request timeout, when it sets one.
    pub timeout: Option<Duration>,
    pub retry: Option<Arc<RetryConfig>>,
    /// Set by the balancer for the attempt under way.
    pub endpoint: Option<Arc<Endpoint>>,
    /// Which attempt this is: 0 for the first.
    pub attempt: u32,
    /// Set when the client's request body could not be read.
    pub client_fault: ClientFault,
}

/// The endpoints a request's attempts went to, shared by its copies so a
/// retry goes elsewhere when it can (as Envoy's `previous_hosts`).
#[derive(Debug, Clone, Default)]
pub struct Tried(pub Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>);

impl Tried {
    pub fn add(&self, addr: std::net::SocketAddr) {
        if let Ok(mut tried) = self.0.lock() {
            tried.push(addr);
        }
    }

    pub fn contains(&self, addr: std::net::SocketAddr) -> bool {
        self.0.lock().map(|t| t.contains(&addr)).unwrap_or(false)
    }
}

/// Why an upstream exchange gave no response.
#[derive(Debug)]
pub enum Failure {
    /// The cluster has no endpoint that may take requests.
    NoEndpoint,
    /// No connection could be made: nothing was sent.
    Connect(String),
    /// The connection broke, or the request could not be sent.
    Reset(String),
    /// The upstream turned the request away unprocessed (HTTP/2
    /// REFUSED_STREAM, or above a graceful GOAWAY's last stream), or the
    /// connection closed before it went out: safe to send again.
    Refused(String),
    /// No answer within the time allowed (`per try` or whole request).
    Timeout { limit: Duration, per_try: bool },
    /// The client's own request body could not be read (malformed, or
    /// the client went away mid-upload): not the endpoint's failure.
    ClientBody(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoEndpoint => write!(f, "no healthy endpoint"),
            Self::Connect(e) => write!(f, "connect failed: {e}"),
            Self::Reset(e) => write!(f, "{e}"),
            Self::Refused(e) => write!(f, "refused unprocessed: {e}"),
            Self::ClientBody(e) => write!(f, "the client's request body failed: {e}"),
            Self::Timeout { limit, per_try } => {
                let what = if *per_try {
                    "the attempt"
                } else {
                    "the request"
                };
                write!(f, "no answer within {limit:?} ({what} timed out)")
            }
        }
    }
}

/// What each layer returns.
pub type Outcome = Result<Response<Body>, Failure>;
