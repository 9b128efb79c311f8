//! The CA bundle a TLS server checks client certificates against, reloaded
//! when its file changes: mutual TLS whose trust rotates without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_util::sync::CancellationToken;

use crate::TlsError;
use crate::files::{Stamp, read_chain};

/// Verifies client certificates against the CAs of one PEM file. With
/// `optional`, a client may present none (it then needs another
/// credential, such as a bearer token, which the server checks itself).
#[derive(Debug)]
pub struct ClientCa {
    path: PathBuf,
    optional: bool,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Verifier>,
    seen: Mutex<Option<Stamp>>,
}

#[derive(Debug)]
struct Verifier(Arc<dyn ClientCertVerifier>);

impl ClientCa {
    pub fn load(path: &Path, optional: bool) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = Stamp::of(path);
        let verifier = build(path, optional, &provider)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            optional,
            provider,
            current: ArcSwap::from_pointee(verifier),
            seen: Mutex::new(seen),
        }))
    }

    /// Reads the bundle again; keeps the current one if it does not load.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Stamp::of(&self.path);
        match build(&self.path, self.optional, &self.provider) {
            Ok(verifier) => {
                self.current.store(Arc::new(verifier));
                tracing::info!(path = %self.path.display(), "client CA reloaded");
                metrics::counter!("ferry_xds_tls_reloads_total", "result" => "ok").increment(1);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "client CA not reloaded: still trusting the previous one");
                metrics::counter!("ferry_xds_tls_reloads_total", "result" => "error").increment(1);
                Err(e)
            }
        }
    }

    /// Polls the file every `every` until `shutdown`, reloading on change.
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        crate::files::watch(self, every, shutdown, Self::poll).await;
    }

    fn poll(&self) {
        let changed =
            *self.seen.lock().unwrap_or_else(PoisonError::into_inner) != Stamp::of(&self.path);
        if changed {
            let _ = self.reload();
        }
    }
}

fn build(
    path: &Path,
    optional: bool,
    provider: &Arc<CryptoProvider>,
) -> Result<Verifier, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for der in read_chain(path)? {
        roots.add(der).map_err(|e| TlsError::Certificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    let verifier = builder.build().map_err(|e| TlsError::Certificate {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Verifier(verifier))
}

impl ClientCertVerifier for ClientCa {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    /// No hints: the bundle can change under a handshake, and a client
    /// with one certificate presents it anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .0
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertPair, Certificates, Scope, grpc_server_config};
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    impl Ca {
        fn new() -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let cert = params.self_signed(&key).unwrap();
            Self {
                issuer: Issuer::new(params, key),
                pem: cert.pem(),
            }
        }

        /// A leaf for `name` (a DNS SAN and the CN), PEM chain and key.
        fn leaf(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    struct Server {
        dir: tempfile::TempDir,
        ca_file: PathBuf,
        client_ca: Arc<ClientCa>,
        acceptor: TlsAcceptor,
        server_ca: Ca,
    }

    fn server(client_ca: &Ca, optional: bool) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = Ca::new();
        let (cert, key) = server_ca.leaf("xds.test", ExtendedKeyUsagePurpose::ServerAuth);
        let pair = CertPair {
            cert: dir.path().join("server.crt"),
            key: dir.path().join("server.key"),
        };
        std::fs::write(&pair.cert, cert).unwrap();
        std::fs::write(&pair.key, key).unwrap();
        let ca_file = dir.path().join("clients-ca.pem");
        std::fs::write(&ca_file, &client_ca.pem).unwrap();
        let certs = Certificates::load_for(Scope::Xds, vec![pair]).unwrap();
        let verifier = ClientCa::load(&ca_file, optional).unwrap();
        let acceptor = TlsAcceptor::from(grpc_server_config(certs, Some(verifier.clone())));
        Server {
            dir,
            ca_file,
            client_ca: verifier,
            acceptor,
            server_ca,
        }
    }

    /// Whether a handshake with `identity` (a client certificate from
    /// `Ca::leaf`) completes and the server sees that certificate.
    async fn handshake(server: &Server, identity: Option<&(String, String)>) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(server.server_ca.pem.as_bytes()) {
            roots.add(der.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = server.acceptor.accept(tcp).await.ok()?;
            Some(tls.get_ref().1.peer_certificates().map(<[_]>::len))
        };
        let connect = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("xds.test").unwrap();
            // TLS 1.3: the client learns of a refused certificate only
            // when it reads, so the server's side decides.
            TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
        };
        let both = async { tokio::join!(accept, connect) };
        let (seen, _) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("handshake timed out");
        match seen {
            Some(certs) => certs.unwrap_or(0) == identity.map_or(0, |_| 1),
            None => false,
        }
    }

    #[tokio::test]
    async fn only_certificates_of_the_ca_get_in_and_a_reload_changes_the_ca() {
        let (ours, theirs) = (Ca::new(), Ca::new());
        let server = server(&ours, false);
        let our_client = ours.leaf("edge-1", ExtendedKeyUsagePurpose::ClientAuth);
        let their_client = theirs.leaf("edge-1", ExtendedKeyUsagePurpose::ClientAuth);
        assert!(handshake(&server, Some(&our_client)).await);
        assert!(!handshake(&server, Some(&their_client)).await);
        assert!(!handshake(&server, None).await, "a certificate is required");

        std::fs::write(&server.ca_file, &theirs.pem).unwrap();
        server.client_ca.reload().unwrap();
        assert!(handshake(&server, Some(&their_client)).await);
        assert!(!handshake(&server, Some(&our_client)).await);

        // A broken bundle keeps the last good one.
        std::fs::write(&server.ca_file, "not PEM").unwrap();
        let err = server.client_ca.reload().unwrap_err();
        assert!(err.to_string().contains("clients-ca.pem"), "{err}");
        assert!(handshake(&server, Some(&their_client)).await);
        drop(server.dir);
    }

    #[tokio::test]
    async fn optional_lets_a_client_without_a_certificate_in_but_checks_one_given() {
        let (ours, theirs) = (Ca::new(), Ca::new());
        let server = server(&ours, true);
        assert!(handshake(&server, None).await);
        assert!(
            handshake(
                &server,
                Some(&ours.leaf("edge-1", ExtendedKeyUsagePurpose::ClientAuth))
            )
            .await
        );
        assert!(
            !handshake(
                &server,
                Some(&theirs.leaf("edge-1", ExtendedKeyUsagePurpose::ClientAuth))
            )
            .await
        );
    }

    #[tokio::test]
    async fn watch_reloads_a_changed_bundle() {
        let (ours, theirs) = (Ca::new(), Ca::new());
        let server = server(&ours, false);
        let shutdown = CancellationToken::new();
        tokio::spawn(
            server
                .client_ca
                .clone()
                .watch(Duration::from_millis(100), shutdown.clone()),
        );
        let their_client = theirs.leaf("edge-1", ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(&server.ca_file, format!("{}\n{}", theirs.pem, "")).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !handshake(&server, Some(&their_client)).await {
            assert!(tokio::time::Instant::now() < deadline, "never reloaded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
    }
}
