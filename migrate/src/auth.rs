//! Who may use the traffic and migration APIs.
//!
//! With an auth file, every call must carry an identity: a bearer token
//! (`authorization: Bearer …`) or a client certificate (its subject CN, when
//! the API serves TLS with a client CA). Each identity has a role: `read`
//! (list, get, watch) or `write` (also set weights, pin, start and steer
//! migrations). The identity becomes the actor of the audit log; a
//! client-supplied `x-ferry-actor` is ignored. gRPC health stays open for
//! probes.
//!
//! ```yaml
//! tokens:
//!   - identity: deploy-bot
//!     role: read
//!     token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//!   - identity: migration-tooling
//!     role: write
//!     token: s3cret            # plain text is accepted too
//! clients:
//!   - identity: sre-alice      # client certificate CN
//!     role: write
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use serde::Deserialize;
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// What an identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    identity: String,
    role: Role,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    identity: String,
    role: Role,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
    #[serde(default)]
    clients: Vec<ClientEntry>,
}

/// The API's identities and roles.
#[derive(Debug, Default)]
pub struct AuthConfig {
    /// SHA-256 (hex) of each token → identity and role.
    tokens: BTreeMap<String, (String, Role)>,
    /// Client certificate CN → role.
    clients: BTreeMap<String, Role>,
}

/// Why an auth file was refused.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct AuthFileError {
    path: String,
    reason: String,
}

impl AuthConfig {
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let error = |reason: String| AuthFileError {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Self::parse(&text).map_err(error)
    }

    /// Parses an auth file; the error names the entry and field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: AuthFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let mut config = Self::default();
        for (i, t) in file.tokens.into_iter().enumerate() {
            if t.identity.trim().is_empty() {
                return Err(format!("tokens[{i}].identity: must not be empty"));
            }
            let hash = ferry_tls::entry_hash(t.token.as_deref(), t.token_sha256.as_deref())
                .map_err(|e| format!("tokens[{i}]: {e}"))?;
            if config.tokens.insert(hash, (t.identity, t.role)).is_some() {
                return Err(format!("tokens[{i}]: the same token is listed twice"));
            }
        }
        for (i, c) in file.clients.into_iter().enumerate() {
            if c.identity.trim().is_empty() {
                return Err(format!("clients[{i}].identity: must not be empty"));
            }
            if config.clients.insert(c.identity, c.role).is_some() {
                return Err(format!("clients[{i}].identity: listed twice"));
            }
        }
        Ok(config)
    }

    /// The identity and role of a request, from its bearer token or, when
    /// there is none, its client certificate.
    /// The identity and role of a bearer token, if it is one of ours.
    pub fn token_identity(&self, token: &str) -> Option<(String, Role)> {
        self.tokens.get(&ferry_tls::token_hash(token)).cloned()
    }

    fn identify<B>(&self, request: &http::Request<B>) -> Result<(String, Role), Status> {
        if let Some(value) = request.headers().get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated("authorization: expected `Bearer <token>`")
                })?;
            return self
                .tokens
                .get(&ferry_tls::token_hash(token.trim()))
                .cloned()
                .ok_or_else(|| Status::unauthenticated("unknown bearer token"));
        }
        let certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs());
        if let Some(cert) = certs.as_ref().and_then(|c| c.first()) {
            let cn = common_name(cert.as_ref()).ok_or_else(|| {
                Status::unauthenticated("the client certificate has no subject common name")
            })?;
            return self
                .clients
                .get(&cn)
                .map(|role| (cn.clone(), *role))
                .ok_or_else(|| {
                    Status::permission_denied(format!(
                        "client certificate {cn:?} is not allowed to use this API"
                    ))
                });
        }
        Err(Status::unauthenticated(
            "this API needs a bearer token or a client certificate",
        ))
    }
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Methods that change state and need the `write` role.
fn needs_write(path: &str) -> bool {
    const WRITES: &[&str] = &[
        "/ferry.v1.Traffic/SetWeights",
        "/ferry.v1.Traffic/ClearWeights",
        "/ferry.v1.Traffic/Pin",
        "/ferry.v1.Traffic/Unpin",
        "/ferry.v1.Migrations/CreateMigration",
        "/ferry.v1.Migrations/PauseMigration",
        "/ferry.v1.Migrations/ResumeMigration",
        "/ferry.v1.Migrations/AbortMigration",
        "/ferry.v1.Campaigns/CreateCampaign",
        "/ferry.v1.Campaigns/PauseCampaign",
        "/ferry.v1.Campaigns/ResumeCampaign",
        "/ferry.v1.Campaigns/AbortCampaign",
        "/ferry.v1.Campaigns/RetryCampaign",
    ];
    WRITES.contains(&path)
}

/// The tower layer that enforces an [`AuthConfig`] on a gRPC server
/// (`None`: the API is open, as on a loopback-only address).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    config: Option<Arc<AuthConfig>>,
}

impl AuthLayer {
    pub fn new(config: Option<AuthConfig>) -> Self {
        Self::shared(config.map(Arc::new))
    }

    /// A layer enforcing a config shared with other servers.
    pub fn shared(config: Option<Arc<AuthConfig>>) -> Self {
        Self { config }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authorized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorized {
            inner,
            config: self.config.clone(),
        }
    }
}

/// A service behind [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Authorized<S> {
    inner: S,
    config: Option<Arc<AuthConfig>>,
}

impl<S, B> tower::Service<http::Request<B>> for Authorized<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let Some(config) = &self.config else {
            return Box::pin(self.inner.call(request));
        };
        if path.starts_with("/grpc.health.v1.Health/") {
            return Box::pin(self.inner.call(request));
        }
        let verdict = config.identify(&request).and_then(|(identity, role)| {
            if needs_write(&path) && role < Role::Write {
                metrics::counter!("ferry_api_denied_total", "reason" => "role").increment(1);
                return Err(Status::permission_denied(format!(
                    "{identity} has the read role; {path} needs write"
                )));
            }
            Ok(identity)
        });
        match verdict {
            Ok(identity) => {
                // The authenticated identity is the actor, whatever the
                // client claims.
                request.headers_mut().remove("x-ferry-actor");
                if let Ok(value) = http::HeaderValue::from_str(&identity) {
                    request.headers_mut().insert("x-ferry-actor", value);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                tracing::info!(path = %path, code = ?status.code(), message = status.message(), "API call refused");
                metrics::counter!("ferry_api_denied_total", "reason" => "identity")
                    .increment(u64::from(status.code() == tonic::Code::Unauthenticated));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_files_name_what_is_wrong() {
        let ok = AuthConfig::parse(
            "tokens:\n  - {identity: bot, role: read, token: abc}\nclients:\n  - {identity: alice, role: write}\n",
        )
        .unwrap();
        assert_eq!(
            ok.tokens.get(&ferry_tls::token_hash("abc")),
            Some(&("bot".into(), Role::Read))
        );
        for (text, needle) in [
            ("tokens:\n  - {identity: bot, role: read}\n", "tokens[0]"),
            (
                "tokens:\n  - {identity: bot, role: admin, token: x}\n",
                "role",
            ),
            (
                "tokens:\n  - {identity: bot, role: read, token_sha256: xyz}\n",
                "tokens[0]: token_sha256",
            ),
            (
                "clients:\n  - {identity: a, role: read}\n  - {identity: a, role: write}\n",
                "clients[1].identity",
            ),
            ("tokenz: []\n", "tokenz"),
        ] {
            let e = AuthConfig::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
