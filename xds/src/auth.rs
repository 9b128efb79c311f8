//! Who may talk to the xDS and LRS port, and as which nodes.
//!
//! With an auth file, every ADS and LRS stream must carry an identity: a
//! client certificate (when the port serves mutual TLS) or a bearer token
//! (`authorization: Bearer …`, for clients without certificates). Each
//! identity names the node ids it may claim, exactly or by prefix, and
//! optionally the node clusters. A stream without an identity ends with
//! UNAUTHENTICATED; one that claims a node its identity does not cover
//! ends with PERMISSION_DENIED before anything is sent to it, and its load
//! reports never count.
//!
//! ```yaml
//! clients:                           # client certificates
//!   - identity: spiffe://prod/ns/edge/sa/ferry-proxy  # URI SAN, DNS SAN or CN
//!     node_prefixes: [edge-]
//!     clusters: [edge]               # node.cluster values (omit: any)
//!   - identity: edge-1.prod.example.com
//!     nodes: [edge-1]
//! tokens:                            # bearer tokens
//!   - identity: checkout-grpc
//!     token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//!     nodes: [checkout-grpc]
//! ```
//!
//! A certificate's names are tried most specific first (URI SANs, DNS
//! SANs, then the subject CN); the first one the file lists is the caller.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use ferry_tls::PeerNames;
use serde::Deserialize;
use tonic::Status;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantEntry {
    identity: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    nodes: Vec<String>,
    #[serde(default)]
    node_prefixes: Vec<String>,
    #[serde(default)]
    clusters: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    clients: Vec<GrantEntry>,
    #[serde(default)]
    tokens: Vec<GrantEntry>,
}

/// The nodes one identity may claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    nodes: BTreeSet<String>,
    prefixes: Vec<String>,
    /// `None`: any node cluster.
    clusters: Option<BTreeSet<String>>,
}

impl Grant {
    fn allows_node(&self, node: &str) -> bool {
        !node.is_empty()
            && (self.nodes.contains(node) || self.prefixes.iter().any(|p| node.starts_with(p)))
    }
}

/// The identities of `--xds-auth`.
#[derive(Debug, Default)]
pub struct XdsAuth {
    /// Client certificate name → grant.
    clients: BTreeMap<String, Arc<Grant>>,
    /// SHA-256 (hex) of each token → identity and grant.
    tokens: BTreeMap<String, (String, Arc<Grant>)>,
}

/// Why an auth file was refused: the file, and the entry and field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct AuthFileError {
    path: String,
    reason: String,
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Credential {
    Certificate,
    Token,
}

/// An authenticated stream's identity, and what it may claim (`None`
/// when no auth file is given: a verified certificate then only names
/// the peer).
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: String,
    pub credential: Credential,
    grant: Option<Arc<Grant>>,
}

/// Why a stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("this xDS server needs a client certificate or a bearer token")]
    NoCredentials,
    #[error("authorization: expected `Bearer <token>`")]
    MalformedToken,
    #[error("unknown bearer token")]
    UnknownToken,
    #[error("client certificate {0:?} is not allowed to use this xDS server")]
    UnknownCertificate(String),
    #[error("{identity:?} may not claim node id {node:?}")]
    Node { identity: String, node: String },
    #[error("{identity:?} may not claim node cluster {cluster:?}")]
    Cluster { identity: String, cluster: String },
}

impl Denied {
    /// The `reason` label of `ferry_xds_auth_denied_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCredentials => "no_credentials",
            Self::MalformedToken => "malformed_token",
            Self::UnknownToken => "unknown_token",
            Self::UnknownCertificate(_) => "unknown_certificate",
            Self::Node { .. } => "node_not_allowed",
            Self::Cluster { .. } => "cluster_not_allowed",
        }
    }

    pub fn status(&self) -> Status {
        match self {
            Self::NoCredentials | Self::MalformedToken | Self::UnknownToken => {
                Status::unauthenticated(self.to_string())
            }
            Self::UnknownCertificate(_) | Self::Node { .. } | Self::Cluster { .. } => {
                Status::permission_denied(self.to_string())
            }
        }
    }

    /// Counts the refusal in `ferry_xds_auth_denied_total{reason}`.
    pub fn count(&self) {
        metrics::counter!("ferry_xds_auth_denied_total", "reason" => self.reason()).increment(1);
    }
}

fn grant(list: &str, i: usize, entry: &GrantEntry) -> Result<Grant, String> {
    if entry.identity.trim().is_empty() {
        return Err(format!("{list}[{i}].identity: must not be empty"));
    }
    if entry.nodes.is_empty() && entry.node_prefixes.is_empty() {
        return Err(format!(
            "{list}[{i}]: give `nodes` or `node_prefixes`, the node ids {:?} may claim",
            entry.identity
        ));
    }
    if let Some(j) = entry.nodes.iter().position(|n| n.is_empty()) {
        return Err(format!("{list}[{i}].nodes[{j}]: must not be empty"));
    }
    if let Some(j) = entry.node_prefixes.iter().position(|p| p.is_empty()) {
        return Err(format!(
            "{list}[{i}].node_prefixes[{j}]: must not be empty (it would allow every node)"
        ));
    }
    Ok(Grant {
        nodes: entry.nodes.iter().cloned().collect(),
        prefixes: entry.node_prefixes.clone(),
        clusters: entry.clusters.as_ref().map(|c| c.iter().cloned().collect()),
    })
}

impl XdsAuth {
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let error = |reason: String| AuthFileError {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Self::parse(&text).map_err(error)
    }

    /// Parses an auth file; the error names the entry and field.
    fn parse(text: &str) -> Result<Self, String> {
        let file: AuthFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let mut auth = Self::default();
        for (i, entry) in file.clients.iter().enumerate() {
            let grant = grant("clients", i, entry)?;
            if entry.token.is_some() || entry.token_sha256.is_some() {
                return Err(format!(
                    "clients[{i}]: a client certificate entry takes no token (list it under `tokens`)"
                ));
            }
            if auth
                .clients
                .insert(entry.identity.clone(), Arc::new(grant))
                .is_some()
            {
                return Err(format!("clients[{i}].identity: listed twice"));
            }
        }
        for (i, entry) in file.tokens.iter().enumerate() {
            let grant = grant("tokens", i, entry)?;
            let hash = ferry_tls::entry_hash(entry.token.as_deref(), entry.token_sha256.as_deref())
                .map_err(|e| format!("tokens[{i}]: {e}"))?;
            if auth
                .tokens
                .insert(hash, (entry.identity.clone(), Arc::new(grant)))
                .is_some()
            {
                return Err(format!("tokens[{i}]: the same token is listed twice"));
            }
        }
        Ok(auth)
    }

    /// The caller of a stream, from its bearer token or, when it has none,
    /// its verified client certificate.
    pub fn authenticate(
        &self,
        certificate: Option<&PeerNames>,
        authorization: Option<&http::HeaderValue>,
    ) -> Result<Caller, Denied> {
        if let Some(value) = authorization {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or(Denied::MalformedToken)?;
            let (identity, grant) = self
                .tokens
                .get(&ferry_tls::token_hash(token.trim()))
                .ok_or(Denied::UnknownToken)?;
            return Ok(Caller {
                identity: identity.clone(),
                credential: Credential::Token,
                grant: Some(grant.clone()),
            });
        }
        let names = certificate.ok_or(Denied::NoCredentials)?;
        names
            .iter()
            .find_map(|name| {
                self.clients.get(name).map(|grant| Caller {
                    identity: name.to_owned(),
                    credential: Credential::Certificate,
                    grant: Some(grant.clone()),
                })
            })
            .ok_or_else(|| Denied::UnknownCertificate(names.to_string()))
    }
}

/// The auth file, read again when it changes: identities are added,
/// removed and their tokens rotated without a restart (which would drop
/// every proxy's stream). A change that does not parse keeps the last good
/// file, and says so in the log and `ferry_xds_auth_reloads_total{result}`.
#[derive(Debug)]
pub struct AuthSource {
    path: PathBuf,
    current: RwLock<Arc<XdsAuth>>,
    /// The file's (modified, length) when last read.
    seen: Mutex<Option<(Option<SystemTime>, u64)>>,
}

fn stamp(path: &Path) -> Option<(Option<SystemTime>, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok(), meta.len()))
}

impl AuthSource {
    pub fn load(path: &Path) -> Result<Arc<Self>, AuthFileError> {
        let seen = stamp(path);
        let auth = XdsAuth::load(path)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(auth)),
            seen: Mutex::new(seen),
        }))
    }

    /// The identities in force now.
    pub fn current(&self) -> Arc<XdsAuth> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the file again if it changed since last read.
    pub fn poll(&self) {
        let now = stamp(&self.path);
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == now {
                return;
            }
            *seen = now;
        }
        match XdsAuth::load(&self.path) {
            Ok(auth) => {
                tracing::info!(path = %self.path.display(), clients = auth.clients.len(), tokens = auth.tokens.len(), "xDS auth file reloaded");
                metrics::counter!("ferry_xds_auth_reloads_total", "result" => "ok").increment(1);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(auth);
            }
            Err(e) => {
                tracing::warn!(error = %e, "xDS auth file not reloaded: the previous identities stay in force");
                metrics::counter!("ferry_xds_auth_reloads_total", "result" => "error").increment(1);
            }
        }
    }

    /// Polls the file every `every` until `cancel`.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(every.max(Duration::from_millis(100)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.poll()).await;
        }
    }
}

impl Caller {
    /// A peer with a verified certificate, when no auth file restricts it.
    pub fn unrestricted(names: &PeerNames) -> Self {
        Self {
            identity: names.to_string(),
            credential: Credential::Certificate,
            grant: None,
        }
    }

    /// Whether this caller may claim node `id` in node cluster `cluster`.
    pub fn authorize(&self, id: &str, cluster: &str) -> Result<(), Denied> {
        let Some(grant) = &self.grant else {
            return Ok(());
        };
        if !grant.allows_node(id) {
            return Err(Denied::Node {
                identity: self.identity.clone(),
                node: id.to_owned(),
            });
        }
        if let Some(clusters) = &grant.clusters
            && !clusters.contains(cluster)
        {
            return Err(Denied::Cluster {
                identity: self.identity.clone(),
                cluster: cluster.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
clients:
  - identity: spiffe://prod/ns/edge/sa/proxy
    node_prefixes: [edge-]
    clusters: [edge]
  - identity: edge-9.example.com
    nodes: [edge-9]
tokens:
  - identity: checkout-grpc
    token: s3cret
    nodes: [checkout-1, checkout-2]
"#;

    fn names(uris: &[&str], dns: &[&str], cn: Option<&str>) -> PeerNames {
        PeerNames {
            uris: uris.iter().map(|s| s.to_string()).collect(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
            common_name: cn.map(str::to_owned),
        }
    }

    fn bearer(token: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    #[test]
    fn certificates_are_matched_by_their_most_specific_listed_name() {
        let auth = XdsAuth::parse(FILE).unwrap();
        let spiffe = names(
            &["spiffe://prod/ns/edge/sa/proxy"],
            &["edge-9.example.com"],
            None,
        );
        let caller = auth.authenticate(Some(&spiffe), None).unwrap();
        assert_eq!(caller.identity, "spiffe://prod/ns/edge/sa/proxy");
        assert_eq!(caller.credential, Credential::Certificate);
        caller.authorize("edge-1", "edge").unwrap();
        assert_eq!(
            caller.authorize("edge-1", "core").unwrap_err().reason(),
            "cluster_not_allowed"
        );
        assert_eq!(
            caller.authorize("core-1", "edge").unwrap_err(),
            Denied::Node {
                identity: "spiffe://prod/ns/edge/sa/proxy".into(),
                node: "core-1".into()
            }
        );

        let dns = names(&[], &["edge-9.example.com"], Some("whatever"));
        let caller = auth.authenticate(Some(&dns), None).unwrap();
        caller.authorize("edge-9", "any-cluster").unwrap();
        let err = caller.authorize("edge-1", "edge").unwrap_err();
        assert_eq!(err.status().code(), tonic::Code::PermissionDenied);
        assert!(err.to_string().contains("edge-1"), "{err}");
        assert!(
            caller.authorize("", "edge").is_err(),
            "no node id is no claim"
        );

        let stranger = names(&[], &[], Some("edge-1"));
        let err = auth.authenticate(Some(&stranger), None).unwrap_err();
        assert_eq!(err.reason(), "unknown_certificate");
        assert_eq!(err.status().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn tokens_take_precedence_and_no_credential_is_unauthenticated() {
        let auth = XdsAuth::parse(FILE).unwrap();
        let caller = auth.authenticate(None, Some(&bearer("s3cret"))).unwrap();
        assert_eq!(caller.identity, "checkout-grpc");
        assert_eq!(caller.credential, Credential::Token);
        caller.authorize("checkout-2", "").unwrap();
        assert!(caller.authorize("checkout-3", "").is_err());

        for (header, reason) in [
            (Some(bearer("wrong")), "unknown_token"),
            (
                Some(http::HeaderValue::from_static("Basic abc")),
                "malformed_token",
            ),
            (None, "no_credentials"),
        ] {
            let err = auth.authenticate(None, header.as_ref()).unwrap_err();
            assert_eq!(err.reason(), reason);
            assert_eq!(err.status().code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn bad_files_name_the_entry_at_fault() {
        for (text, expected) in [
            (
                "clients: [{identity: a}]",
                "clients[0]: give `nodes` or `node_prefixes`",
            ),
            (
                "clients: [{identity: '', nodes: [a]}]",
                "clients[0].identity",
            ),
            (
                "clients: [{identity: a, node_prefixes: ['']}]",
                "clients[0].node_prefixes[0]",
            ),
            (
                "clients: [{identity: a, nodes: [a]}, {identity: a, nodes: [b]}]",
                "clients[1].identity: listed twice",
            ),
            (
                "clients: [{identity: a, nodes: [a], token: x}]",
                "clients[0]: a client certificate entry takes no token",
            ),
            (
                "tokens: [{identity: a, nodes: [a]}]",
                "tokens[0]: give exactly one of",
            ),
            (
                "tokens: [{identity: a, nodes: [a], token_sha256: abc}]",
                "tokens[0]: token_sha256",
            ),
            (
                "tokens: [{identity: a, nodes: [a], token: x}, {identity: b, nodes: [b], token: x}]",
                "tokens[1]: the same token",
            ),
            (
                "clients: [{identity: a, nodes: [a], role: write}]",
                "unknown field `role`",
            ),
        ] {
            let err = XdsAuth::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
        let err = XdsAuth::load(Path::new("/nonexistent/xds-auth.yaml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/xds-auth.yaml"),
            "{err}"
        );
    }

    #[test]
    fn without_an_auth_file_a_verified_certificate_may_claim_any_node() {
        let caller = Caller::unrestricted(&names(&[], &["edge-1.example.com"], Some("edge-1")));
        assert_eq!(caller.identity, "edge-1.example.com");
        caller.authorize("anything", "anywhere").unwrap();
    }
}
