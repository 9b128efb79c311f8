//! How a data-plane client reaches the control plane's xDS and LRS port:
//! plaintext, TLS against a CA, mutual TLS with a client certificate, and
//! a bearer token for clients without one.
//!
//! The files are read again for every connection, so a renewed
//! certificate, CA or token is used from the next reconnect on; the open
//! stream keeps the connection it authenticated.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// TLS and credentials for the control plane's port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XdsSecurity {
    /// The CA (PEM) the server's certificate must chain to; needed for
    /// an `https://` server.
    pub ca: Option<PathBuf>,
    /// This client's certificate chain and key (PEM): mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// A file holding a bearer token, sent as `authorization: Bearer …`.
    pub token_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when not the URL's
    /// host.
    pub server_name: Option<String>,
}

/// Why the control plane could not be reached; each names its cause.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{}: cannot read: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}: the token is empty or not a valid header value", path.display())]
    Token { path: PathBuf },
    #[error("connecting to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("connecting to {url}: timed out")]
    Timeout { url: String },
}

impl XdsSecurity {
    /// Whether the flags fit the URL: `https://` needs a CA, and TLS
    /// files make no sense for `http://`.
    pub fn check(&self, url: &str) -> Result<(), ConnectError> {
        let error = |reason: &str| ConnectError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let tls = url.starts_with("https://");
        if !tls && !url.starts_with("http://") {
            return Err(error("expected http:// or https://"));
        }
        if tls && self.ca.is_none() {
            return Err(error("an https:// control plane needs a CA (--xds-ca)"));
        }
        if !tls && (self.ca.is_some() || self.identity.is_some()) {
            return Err(error(
                "TLS files were given for an http:// control plane; use https://",
            ));
        }
        Ok(())
    }

    /// A channel to `url`, through TLS as configured, and the token to
    /// send with each call; the files are read now.
    pub async fn connect(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<(Channel, Option<AsciiMetadataValue>), ConnectError> {
        self.check(url)?;
        let bad_url = |reason: String| ConnectError::Url {
            url: url.to_owned(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| bad_url(e.to_string()))?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        if let Some(ca) = &self.ca {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(name) = &self.server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| bad_url(e.to_string()))?;
        }
        let token = match &self.token_file {
            Some(path) => Some(token(path)?),
            None => None,
        };
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| ConnectError::Timeout {
                url: url.to_owned(),
            })?
            .map_err(|e| ConnectError::Connect {
                url: url.to_owned(),
                reason: error_chain(&e),
            })?;
        Ok((channel, token))
    }
}

/// `request` with the token, when there is one.
pub fn with_token<T>(message: T, token: &Option<AsciiMetadataValue>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", token.clone());
    }
    request
}

fn read(path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|e| ConnectError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn token(path: &Path) -> Result<AsciiMetadataValue, ConnectError> {
    let text = String::from_utf8(read(path)?).map_err(|_| ConnectError::Token {
        path: path.to_owned(),
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ConnectError::Token {
            path: path.to_owned(),
        });
    }
    format!("Bearer {token}")
        .parse()
        .map_err(|_| ConnectError::Token {
            path: path.to_owned(),
        })
}

/// An error and its sources, as one line (tonic's own says only
/// "transport error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_must_fit_the_url() {
        let none = XdsSecurity::default();
        none.check("http://127.0.0.1:18000").unwrap();
        let err = none.check("https://127.0.0.1:18000").unwrap_err();
        assert!(err.to_string().contains("--xds-ca"), "{err}");
        let err = none.check("127.0.0.1:18000").unwrap_err();
        assert!(err.to_string().contains("http:// or https://"), "{err}");
        let tls = XdsSecurity {
            ca: Some("ca.pem".into()),
            ..XdsSecurity::default()
        };
        tls.check("https://ferry:18000").unwrap();
        let err = tls.check("http://ferry:18000").unwrap_err();
        assert!(err.to_string().contains("use https://"), "{err}");
    }

    #[test]
    fn tokens_are_read_trimmed_and_refused_when_empty() {
        let dir = std::env::temp_dir().join(format!("ferry-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(token(&file).unwrap(), "Bearer s3cret");
        std::fs::write(&file, "  \n").unwrap();
        assert!(matches!(token(&file), Err(ConnectError::Token { .. })));
        let missing = dir.join("missing");
        let err = token(&missing).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
