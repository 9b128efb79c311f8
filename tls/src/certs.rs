//! Downstream TLS termination: the listener's certificates, chosen per
//! handshake by SNI, and reloaded from disk without a restart.
//!
//! Each [`CertPair`] is a PEM chain and its PEM private key. A handshake
//! gets the pair whose DNS subjectAltNames match the client's server name
//! (exactly, or by a `*.example.com` wildcard covering one label); no SNI
//! or no match gets the first pair. The loaded set is one snapshot swapped
//! whole, so handshakes read it without locks and a reload never mixes old
//! and new pairs.
//!
//! ```no_run
//! # async fn listen(listener: tokio::net::TcpListener) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use ferry_tls::{self as tls, Certificates};
//! use tokio_util::sync::CancellationToken;
//!
//! let certs = Certificates::load(vec!["tls.crt,tls.key".parse()?])?;
//! tokio::spawn(certs.clone().watch(Duration::from_secs(10), CancellationToken::new()));
//! let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(certs));
//! let (tcp, _) = listener.accept().await?;
//! let stream = acceptor.accept(tcp).await?;
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;
use x509_parser::extensions::GeneralName;

use crate::files::{Stamp, read_chain, read_key};

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    /// The leaf certificate first, then any intermediates.
    pub cert: PathBuf,
    /// A PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key.
    pub key: PathBuf,
}

impl FromStr for CertPair {
    type Err = TlsError;

    /// Parses `CERT_PATH,KEY_PATH` (paths cannot contain commas).
    fn from_str(text: &str) -> Result<Self, TlsError> {
        let syntax = || TlsError::PairSyntax(text.to_owned());
        let (cert, key) = text.split_once(',').ok_or_else(syntax)?;
        let (cert, key) = (cert.trim(), key.trim());
        if cert.is_empty() || key.is_empty() || key.contains(',') {
            return Err(syntax());
        }
        Ok(Self {
            cert: cert.into(),
            key: key.into(),
        })
    }
}

/// Why certificates could not be loaded; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("`{0}`: expected CERT_PATH,KEY_PATH")]
    PairSyntax(String),
    #[error("no certificate given: at least one CERT_PATH,KEY_PATH is needed")]
    NoPairs,
    #[error("{}: cannot read: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}: malformed PEM: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{}: no PEM certificate found", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: not a usable X.509 certificate: {reason}", path.display())]
    Certificate { path: PathBuf, reason: String },
    #[error("{}: no PEM private key found (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: unsupported private key: {reason}", path.display())]
    UnsupportedKey { path: PathBuf, reason: String },
    #[error("{}: the private key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
}

impl TlsError {
    /// The file at fault, if the error is about one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::PairSyntax(_) | Self::NoPairs => None,
            Self::Read { path, .. }
            | Self::Pem { path, .. }
            | Self::NoCertificate { path }
            | Self::Certificate { path, .. }
            | Self::NoKey { path }
            | Self::UnsupportedKey { path, .. } => Some(path),
            Self::KeyMismatch { key, .. } => Some(key),
        }
    }
}

/// The listener's certificates: resolves each handshake's certificate by
/// SNI from the current snapshot, and reloads the snapshot from disk.
#[derive(Debug)]
pub struct Certificates {
    pairs: Vec<CertPair>,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Loaded>,
    /// The files' stamps when last read, so `watch` reloads only on change
    /// (and retries a broken set only once it changes again).
    seen: Mutex<Vec<Option<Stamp>>>,
    /// The metrics' name prefix: which port these certificates serve.
    metrics: Scope,
}

/// Which port a set of certificates serves, as its metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The proxy's TLS listener: `ferry_proxy_tls_*`.
    Proxy,
    /// The control plane's xDS and LRS port: `ferry_xds_tls_*`.
    Xds,
}

impl Scope {
    fn reloads(self) -> &'static str {
        match self {
            Self::Proxy => "ferry_proxy_tls_reloads_total",
            Self::Xds => "ferry_xds_tls_reloads_total",
        }
    }

    fn expiry(self) -> &'static str {
        match self {
            Self::Proxy => "ferry_proxy_tls_certificate_expiry_seconds",
            Self::Xds => "ferry_xds_tls_certificate_expiry_seconds",
        }
    }
}

/// One snapshot of loaded pairs, in the order given; never empty.
#[derive(Debug)]
struct Loaded {
    leaves: Vec<Leaf>,
    /// Lowercase DNS name → index into `leaves`.
    exact: HashMap<String, usize>,
    /// `example.com` for a `*.example.com` SAN → index into `leaves`.
    wildcard: HashMap<String, usize>,
}

#[derive(Debug)]
struct Leaf {
    key: Arc<CertifiedKey>,
    /// The first DNS SAN (or the file, without one): the expiry gauge's label.
    name: String,
    /// notAfter, in seconds since the Unix epoch.
    not_after: i64,
}

impl Certificates {
    /// Loads every pair; the first is the default for handshakes without
    /// SNI or whose name no pair covers.
    pub fn load(pairs: Vec<CertPair>) -> Result<Arc<Self>, TlsError> {
        Self::load_for(Scope::Proxy, pairs)
    }

    /// As [`Certificates::load`], for the port `scope` names in metrics.
    pub fn load_for(scope: Scope, pairs: Vec<CertPair>) -> Result<Arc<Self>, TlsError> {
        if pairs.is_empty() {
            return Err(TlsError::NoPairs);
        }
        // Chosen here, not taken from the process default, so the listener
        // never depends on which provider some other crate installed.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = stamps(&pairs);
        let loaded = Loaded::read(&pairs, &provider)?;
        loaded.record_expiry(scope);
        tracing::info!(certificates = loaded.leaves.len(), default = %loaded.leaves[0].name, "TLS certificates loaded");
        Ok(Arc::new(Self {
            pairs,
            provider,
            current: ArcSwap::from_pointee(loaded),
            seen: Mutex::new(seen),
            metrics: scope,
        }))
    }

    /// Reads all pairs again and, if every one loads, swaps them in for new
    /// handshakes; otherwise keeps the current set. Logs and counts the
    /// outcome either way.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = stamps(&self.pairs);
        match Loaded::read(&self.pairs, &self.provider) {
            Ok(loaded) => {
                loaded.record_expiry(self.metrics);
                tracing::info!(
                    certificates = loaded.leaves.len(),
                    "TLS certificates reloaded"
                );
                self.current.store(Arc::new(loaded));
                metrics::counter!(self.metrics.reloads(), "result" => "ok").increment(1);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificates not reloaded: still serving the previous ones");
                metrics::counter!(self.metrics.reloads(), "result" => "error").increment(1);
                Err(e)
            }
        }
    }

    /// Polls the files every `every` (at least 100ms) until `shutdown`,
    /// reloading when any file's modification time or size changed. Also
    /// keeps the expiry gauge counting down between reloads.
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        crate::files::watch(self, every, shutdown, Self::poll).await;
    }

    fn poll(&self) {
        let changed =
            *self.seen.lock().unwrap_or_else(PoisonError::into_inner) != stamps(&self.pairs);
        if changed {
            // `reload` logs and counts a failure itself.
            let _ = self.reload();
        }
        self.current.load().record_expiry(self.metrics);
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().pick(hello.server_name()).clone())
    }
}

/// The listener's rustls configuration: certificates by SNI from `certs`,
/// ALPN `h2` then `http/1.1`, no client certificates.
pub fn server_config(certs: Arc<Certificates>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(certs.provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A gRPC server's rustls configuration: certificates from `certs`, ALPN
/// `h2` only, and client certificates checked against `client_ca` when
/// given (mutual TLS).
pub fn grpc_server_config(
    certs: Arc<Certificates>,
    client_ca: Option<Arc<crate::ClientCa>>,
) -> Arc<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(certs.provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3");
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(ca),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

impl Loaded {
    fn read(pairs: &[CertPair], provider: &CryptoProvider) -> Result<Self, TlsError> {
        let mut loaded = Self {
            leaves: Vec::with_capacity(pairs.len()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for pair in pairs {
            let (leaf, names) = read_pair(pair, provider)?;
            let index = loaded.leaves.len();
            loaded.leaves.push(leaf);
            // The first pair listed for a name keeps it.
            for name in names {
                match name.strip_prefix("*.") {
                    Some(parent) => loaded.wildcard.entry(parent.to_owned()),
                    None => loaded.exact.entry(name),
                }
                .or_insert(index);
            }
        }
        if loaded.leaves.is_empty() {
            return Err(TlsError::NoPairs);
        }
        Ok(loaded)
    }

    /// The pair for a server name: an exact SAN, else a wildcard one label
    /// up, else the default.
    fn pick(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let index = server_name.and_then(|name| self.find(name)).unwrap_or(0);
        &self.leaves[index].key
    }

    fn find(&self, name: &str) -> Option<usize> {
        // rustls already lowercases SNI; this only guards other callers.
        let name = name.strip_suffix('.').unwrap_or(name);
        let name = match name.bytes().any(|b| b.is_ascii_uppercase()) {
            true => Cow::Owned(name.to_ascii_lowercase()),
            false => Cow::Borrowed(name),
        };
        if let Some(&index) = self.exact.get(name.as_ref()) {
            return Some(index);
        }
        let (label, parent) = name.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.wildcard.get(parent).copied()
    }

    /// Sets `ferry_{proxy,xds}_tls_certificate_expiry_seconds{name}` for
    /// each leaf.
    fn record_expiry(&self, scope: Scope) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for leaf in &self.leaves {
            metrics::gauge!(scope.expiry(), "name" => leaf.name.clone())
                .set((leaf.not_after - now) as f64);
        }
    }
}

/// Loads one pair: its signing key, and its leaf's DNS names (lowercase)
/// and expiry.
fn read_pair(pair: &CertPair, provider: &CryptoProvider) -> Result<(Leaf, Vec<String>), TlsError> {
    let chain = read_chain(&pair.cert)?;
    let (names, not_after) = leaf_facts(&pair.cert, &chain[0])?;
    let key = read_key(&pair.key)?;
    let signing =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::UnsupportedKey {
                path: pair.key.clone(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        // Unknown: the key type cannot tell its public key; rustls would
        // fail the handshake instead.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch {
                key: pair.key.clone(),
                cert: pair.cert.clone(),
            });
        }
        Err(e) => {
            return Err(TlsError::Certificate {
                path: pair.cert.clone(),
                reason: e.to_string(),
            });
        }
    }
    let name = names
        .first()
        .cloned()
        .unwrap_or_else(|| pair.cert.display().to_string());
    let leaf = Leaf {
        key: Arc::new(certified),
        name,
        not_after,
    };
    Ok((leaf, names))
}

/// A leaf's DNS subjectAltNames (lowercase, in order) and its notAfter.
fn leaf_facts(path: &Path, der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), TlsError> {
    let invalid = |reason: String| TlsError::Certificate {
        path: path.to_owned(),
        reason,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| invalid(e.to_string()))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| invalid(e.to_string()))?;
    let names = sans
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((names, cert.validity().not_after.timestamp()))
}

/// Each pair's certificate and key stamps, in order.
fn stamps(pairs: &[CertPair]) -> Vec<Option<Stamp>> {
    pairs
        .iter()
        .flat_map(|pair| [&pair.cert, &pair.key])
        .map(|path| Stamp::of(path))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
    use tempfile::TempDir;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        der: CertificateDer<'static>,
        pem: String,
        dir: TempDir,
    }

    impl Ca {
        fn new() -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key).unwrap();
            Self {
                issuer: Issuer::new(params, key),
                der: cert.der().clone(),
                pem: cert.pem(),
                dir: tempfile::tempdir().unwrap(),
            }
        }

        /// Writes a new leaf for `names` (chain: leaf then CA) to
        /// `<file>.crt` / `<file>.key`; returns the pair and the leaf DER.
        fn issue(&self, file: &str, names: &[&str]) -> (CertPair, CertificateDer<'static>) {
            self.issue_until(file, names, 2098)
        }

        /// As `issue`, valid until the start of `year`.
        fn issue_until(
            &self,
            file: &str,
            names: &[&str],
            year: i32,
        ) -> (CertPair, CertificateDer<'static>) {
            let key = KeyPair::generate().unwrap();
            let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
            let mut params = CertificateParams::new(names).unwrap();
            params.is_ca = IsCa::ExplicitNoCa;
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.not_after = rcgen::date_time_ymd(year, 1, 1);
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let pair = self.pair(file);
            let chain = format!("{}{}", cert.pem(), self.pem);
            std::fs::write(&pair.cert, chain).unwrap();
            std::fs::write(&pair.key, key.serialize_pem()).unwrap();
            (pair, cert.der().clone())
        }

        fn pair(&self, file: &str) -> CertPair {
            CertPair {
                cert: self.dir.path().join(format!("{file}.crt")),
                key: self.dir.path().join(format!("{file}.key")),
            }
        }

        /// A client trusting this CA, offering `alpn`.
        fn client(&self, alpn: &[&[u8]]) -> ClientConfig {
            let mut config = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(self.verifier(false))
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            config
        }

        /// A client trusting this CA but not checking the name, to see the
        /// default certificate served to a name no pair covers.
        fn client_any_name(&self, sni: bool) -> ClientConfig {
            let mut config = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(self.verifier(true))
                .with_no_client_auth();
            config.enable_sni = sni;
            config
        }

        fn verifier(&self, any_name: bool) -> Arc<dyn ServerCertVerifier> {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.der.clone()).unwrap();
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap();
            Arc::new(TrustCa { inner, any_name })
        }
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Chains to the CA; with `any_name`, accepts a certificate for another
    /// name.
    #[derive(Debug)]
    struct TrustCa {
        inner: Arc<WebPkiServerVerifier>,
        any_name: bool,
    }

    impl ServerCertVerifier for TrustCa {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let verified = self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
            match verified {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) if self.any_name => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    /// What a client saw in one handshake over loopback TCP.
    struct Seen {
        leaf: CertificateDer<'static>,
        alpn: Option<Vec<u8>>,
    }

    async fn handshake(certs: &Arc<Certificates>, client: ClientConfig, sni: &str) -> Seen {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server_config(certs.clone()));
        let connector = TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await
        };
        let connect = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector.connect(name, tcp).await
        };
        let both = async { tokio::join!(accept, connect) };
        let (server, client) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("handshake timed out");
        server.expect("server side of the handshake");
        let client = client.expect("client side of the handshake");
        let (_, connection) = client.get_ref();
        Seen {
            leaf: connection.peer_certificates().unwrap()[0].clone(),
            alpn: connection.alpn_protocol().map(<[u8]>::to_vec),
        }
    }

    #[tokio::test]
    async fn each_name_gets_its_own_certificate_by_sni() {
        let ca = Ca::new();
        let (a, a_der) = ca.issue("a", &["a.test"]);
        let (b, b_der) = ca.issue("b", &["b.test"]);
        assert_ne!(a_der, b_der);
        let certs = Certificates::load(vec![a, b]).unwrap();
        assert_eq!(
            handshake(&certs, ca.client(&[]), "a.test").await.leaf,
            a_der
        );
        assert_eq!(
            handshake(&certs, ca.client(&[]), "b.test").await.leaf,
            b_der
        );
        assert_eq!(
            handshake(&certs, ca.client(&[]), "B.Test").await.leaf,
            b_der
        );
    }

    #[tokio::test]
    async fn a_wildcard_covers_exactly_one_label_and_an_exact_name_wins() {
        let ca = Ca::new();
        let (default, default_der) = ca.issue("default", &["default.test"]);
        let (wild, wild_der) = ca.issue("wild", &["*.wild.test"]);
        let (exact, exact_der) = ca.issue("exact", &["exact.wild.test"]);
        let certs = Certificates::load(vec![default, wild, exact]).unwrap();
        for name in ["x.wild.test", "X.Wild.TEST"] {
            let seen = handshake(&certs, ca.client(&[]), name).await;
            assert_eq!(seen.leaf, wild_der, "{name}");
        }
        let seen = handshake(&certs, ca.client(&[]), "exact.wild.test").await;
        assert_eq!(seen.leaf, exact_der);
        for name in ["a.b.wild.test", "wild.test"] {
            let seen = handshake(&certs, ca.client_any_name(true), name).await;
            assert_eq!(seen.leaf, default_der, "{name}");
        }
    }

    #[tokio::test]
    async fn unknown_names_and_no_sni_get_the_first_pair() {
        let ca = Ca::new();
        let (a, a_der) = ca.issue("a", &["a.test"]);
        let (b, _) = ca.issue("b", &["b.test"]);
        let certs = Certificates::load(vec![a, b]).unwrap();
        let seen = handshake(&certs, ca.client_any_name(true), "other.test").await;
        assert_eq!(seen.leaf, a_der);
        let seen = handshake(&certs, ca.client_any_name(false), "b.test").await;
        assert_eq!(seen.leaf, a_der);
    }

    #[tokio::test]
    async fn alpn_prefers_h2_then_http1() {
        let ca = Ca::new();
        let (a, _) = ca.issue("a", &["a.test"]);
        let certs = Certificates::load(vec![a]).unwrap();
        let seen = handshake(&certs, ca.client(&[b"http/1.1", b"h2"]), "a.test").await;
        assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]));
        let seen = handshake(&certs, ca.client(&[b"http/1.1"]), "a.test").await;
        assert_eq!(seen.alpn.as_deref(), Some(&b"http/1.1"[..]));
        let seen = handshake(&certs, ca.client(&[]), "a.test").await;
        assert_eq!(seen.alpn, None);
    }

    #[tokio::test]
    async fn reload_serves_the_new_certificate_to_new_handshakes() {
        let ca = Ca::new();
        let (a, old) = ca.issue("a", &["a.test"]);
        let (b, b_der) = ca.issue("b", &["b.test"]);
        let certs = Certificates::load(vec![a, b]).unwrap();
        let (_, new) = ca.issue("a", &["a.test"]);
        assert_ne!(old, new);
        assert_eq!(handshake(&certs, ca.client(&[]), "a.test").await.leaf, old);
        certs.reload().unwrap();
        assert_eq!(handshake(&certs, ca.client(&[]), "a.test").await.leaf, new);
        assert_eq!(
            handshake(&certs, ca.client(&[]), "b.test").await.leaf,
            b_der
        );
    }

    #[tokio::test]
    async fn watch_reloads_changed_files() {
        let ca = Ca::new();
        let (a, old) = ca.issue("a", &["a.test"]);
        let certs = Certificates::load(vec![a]).unwrap();
        let shutdown = CancellationToken::new();
        let watching = tokio::spawn(
            certs
                .clone()
                .watch(Duration::from_millis(100), shutdown.clone()),
        );
        // Past the file clock's granularity, so the rewrite gets a new mtime.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, new) = ca.issue("a", &["a.test"]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let seen = handshake(&certs, ca.client(&[]), "a.test").await.leaf;
            if seen == new {
                break;
            }
            assert_eq!(seen, old);
            assert!(
                tokio::time::Instant::now() < deadline,
                "not reloaded within 3s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), watching)
            .await
            .expect("watch stops on shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn a_broken_file_keeps_the_previous_certificates() {
        let ca = Ca::new();
        let (a, old) = ca.issue("a", &["a.test"]);
        let certs = Certificates::load(vec![a.clone()]).unwrap();
        std::fs::write(&a.cert, "not a certificate\n").unwrap();
        let err = certs.reload().unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert_eq!(err.path(), Some(a.cert.as_path()));
        assert!(err.to_string().contains(&a.cert.display().to_string()));
        assert_eq!(handshake(&certs, ca.client(&[]), "a.test").await.leaf, old);
    }

    #[test]
    fn load_errors_name_the_file_and_the_fault() {
        let ca = Ca::new();
        let (a, _) = ca.issue("a", &["a.test"]);
        let (b, _) = ca.issue("b", &["b.test"]);
        let missing = ca.pair("missing");
        let pair = |cert: &PathBuf, key: &PathBuf| CertPair {
            cert: cert.clone(),
            key: key.clone(),
        };
        let cases = [
            (pair(&missing.cert, &a.key), &missing.cert, "cannot read"),
            (pair(&a.cert, &missing.key), &missing.key, "cannot read"),
            (pair(&a.key, &a.key), &a.key, "no PEM certificate"),
            (pair(&a.cert, &a.cert), &a.cert, "no PEM private key"),
            (pair(&a.cert, &b.key), &b.key, "does not match"),
        ];
        for (bad, file, fault) in cases {
            // A bad pair anywhere fails the whole set.
            let err = Certificates::load(vec![b.clone(), bad]).unwrap_err();
            let text = err.to_string();
            assert_eq!(err.path(), Some(file.as_path()), "{text}");
            assert!(text.contains(&file.display().to_string()), "{text}");
            assert!(text.contains(fault), "{text}");
        }
        let err = Certificates::load(Vec::new()).unwrap_err();
        assert!(matches!(err, TlsError::NoPairs), "{err}");
    }

    #[test]
    fn cert_pairs_parse_from_cert_comma_key() {
        let pair: CertPair = "/etc/tls/a.crt, /etc/tls/a.key".parse().unwrap();
        let expected = CertPair {
            cert: "/etc/tls/a.crt".into(),
            key: "/etc/tls/a.key".into(),
        };
        assert_eq!(pair, expected);
        for bad in ["", "a.crt", "a.crt,", ",a.key", "a.crt,a.key,b.key"] {
            let err = bad.parse::<CertPair>().unwrap_err();
            assert!(err.to_string().contains("CERT_PATH,KEY_PATH"), "{err}");
        }
    }

    #[test]
    fn loads_and_reloads_are_measured() {
        let ca = Ca::new();
        let (a, _) = ca.issue_until("a", &["a.test", "www.a.test"], 2099);
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let certs = Certificates::load(vec![a.clone()]).unwrap();
            certs.reload().unwrap();
            std::fs::write(&a.key, "").unwrap();
            certs.reload().unwrap_err();
        });
        let text = handle.render();
        let value = |prefix: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(prefix));
            let line = line.unwrap_or_else(|| panic!("no {prefix} in:\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(value(r#"ferry_proxy_tls_reloads_total{result="ok"}"#), 1.0);
        assert_eq!(
            value(r#"ferry_proxy_tls_reloads_total{result="error"}"#),
            1.0
        );
        // 2099-01-01T00:00:00Z.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let expected = 4_070_908_800.0 - now.as_secs_f64();
        let expiry = value(r#"ferry_proxy_tls_certificate_expiry_seconds{name="a.test"}"#);
        assert!((expiry - expected).abs() < 60.0, "{expiry} vs {expected}");
    }
}
