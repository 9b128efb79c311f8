//! Certificates for tests of TLS ports: CAs and leaves made with rcgen,
//! written to files the real binaries read.

use super::*;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;

/// A CA: its PEM certificate, and what signs its leaves.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

pub fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-signed");
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf certificate with subject `cn`, valid for localhost and
/// 127.0.0.1; (cert, key) PEM.
pub fn leaf(ca: &Ca, cn: &str) -> (String, String) {
    leaf_with_uris(ca, cn, &[])
}

/// As [`leaf`], also carrying URI subjectAltNames (SPIFFE IDs).
pub fn leaf_with_uris(ca: &Ca, cn: &str, uris: &[&str]) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    for uri in uris {
        params
            .subject_alt_names
            .push(SanType::URI((*uri).try_into().expect("URI SAN")));
    }
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.signed_by(&key, &ca.issuer).expect("signed");
    (cert.pem(), key.serialize_pem())
}

/// A gRPC channel over TLS to a loopback `port`, trusting `server_ca`,
/// with a client certificate (PEM cert, key) when given.
pub async fn tls_channel(
    port: u16,
    server_ca: &Ca,
    client: Option<(String, String)>,
) -> Result<tonic::transport::Channel, String> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&server_ca.pem));
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Replaces `path` whole (write and rename), as a secret volume does.
pub fn replace(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).expect("write");
    std::fs::rename(&next, path).expect("rename");
}

/// An HTTPS backend that requires a client certificate chaining to the CA
/// bundle in a file (reloaded on `reload_clients`), and answers
/// `mtls-backend <client CN>`.
pub struct MtlsBackend {
    pub addr: SocketAddr,
    clients: Arc<ferry_tls::ClientCa>,
    task: tokio::task::JoinHandle<()>,
}

impl MtlsBackend {
    /// Serves a certificate for `name` from `ca`, trusting the client CAs
    /// in `clients_file`.
    pub async fn start(ca: &Ca, name: &str, clients_file: &Path) -> Self {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .signed_by(&key, &ca.issuer)
            .expect("signed");
        let clients = ferry_tls::ClientCa::load(clients_file, false).expect("client CA");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(clients.clone())
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let cn = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| ferry_tls::PeerNames::from_der(c))
                        .and_then(|n| n.common_name)
                        .unwrap_or_default();
                    let svc = hyper::service::service_fn(move |_req| {
                        let body = format!("mtls-backend {cn}");
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    // One request per connection: each is a handshake, so a
                    // renewed certificate shows at once.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            clients,
            task,
        }
    }

    /// Reads the client CA bundle again: only its CAs are trusted after.
    pub fn reload_clients(&self) {
        self.clients.reload().expect("client CA reload");
    }

    /// One GET straight to the backend with a client certificate (PEM);
    /// the body, or why there was none.
    pub async fn get_with(
        &self,
        ca: &Ca,
        name: &str,
        cert: &str,
        key: &str,
    ) -> Result<String, String> {
        let mut roots = rustls::RootCertStore::empty();
        for der in rustls::pki_types::CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
            roots
                .add(der.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let server =
            rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = hyper::Request::get("/")
            .header("host", name)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = send
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

impl Drop for MtlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
