//! TLS from the proxy to a cluster's endpoints, from the cluster's
//! `UpstreamTlsContext`: the CA bundle the endpoints' certificates must
//! chain to, the name they must carry (also the SNI), and optionally the
//! proxy's own certificate for endpoints that require mutual TLS.
//!
//! The material comes as SDS secrets the control plane serves over ADS
//! (the context names them; a renewed secret is a config update), or as
//! files on the proxy's host. Files are read when the settings arrive and
//! checked again every reload interval, so a renewed client certificate or CA bundle (as
//! cert-manager writes them) takes effect without a config change or a
//! restart. A file that no longer reads or parses keeps the last good
//! client in use, and says so in the log and in
//! `ferry_proxy_upstream_tls_reloads_total{cluster,result}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_proto::Any;
use ferry_proto::envoy::config::cluster::v3::Cluster;
use ferry_proto::envoy::config::core::v3::{DataSource, data_source, transport_socket};
use ferry_proto::envoy::extensions::transport_sockets::tls::v3::{
    Secret, UpstreamTlsContext, common_tls_context, secret,
};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::config::Protocol;
use crate::forward::{PoolConfig, TlsClient};
use crate::server::Proxy;

/// The PEM a cluster's TLS is made of, as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pem {
    ca: Vec<u8>,
    /// The proxy's certificate chain and key, for mutual TLS.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

/// The client made from some PEM.
pub struct TlsState {
    pem: Pem,
    pub client: TlsClient,
}

/// TLS to one cluster's endpoints. Kept across config swaps while the
/// settings stay the same, and with it the connection pool.
pub struct UpstreamTls {
    pub server_name: String,
    pub protocol: Protocol,
    context: UpstreamTlsContext,
    pool: PoolConfig,
    state: ArcSwap<TlsState>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

/// The TLS of `cluster`'s `transport_socket`, if any: `previous` (with its
/// pool) when its settings did not change.
pub fn from_cluster(
    cluster: &Cluster,
    protocol: Protocol,
    previous: Option<&Arc<UpstreamTls>>,
    pool: &PoolConfig,
    secrets: &BTreeMap<String, (String, Any)>,
) -> Result<Option<Arc<UpstreamTls>>, String> {
    let Some(socket) = &cluster.transport_socket else {
        return Ok(None);
    };
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
        return Err("only TLS (an UpstreamTlsContext) is supported".to_owned());
    };
    if any.type_url
        != "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    {
        return Err(format!("{}: only TLS is supported", any.type_url));
    }
    let context = UpstreamTlsContext::decode(any.value.as_slice())
        .map_err(|e| format!("cannot decode UpstreamTlsContext: {e}"))?;
    let context = with_secrets(context, secrets)?;
    if context.sni.is_empty() {
        return Err("sni: a server name is needed to check the endpoints' certificates".to_owned());
    }
    // Settings already in use keep their client: their files are the
    // reload loop's to check, not every config update's.
    if let Some(tls) = previous
        && tls.context == context
        && tls.protocol == protocol
        && tls.pool == *pool
    {
        return Ok(Some(tls.clone()));
    }
    let state = make(&context, read(&context)?, protocol, pool)?;
    Ok(Some(Arc::new(UpstreamTls {
        server_name: context.sni.clone(),
        protocol,
        context,
        pool: *pool,
        state: ArcSwap::from_pointee(state),
    })))
}

impl UpstreamTls {
    /// The client in use now.
    pub fn state(&self) -> arc_swap::Guard<Arc<TlsState>> {
        self.state.load()
    }

    /// Reads the files again and, when they changed, makes a new client
    /// (new connections use it; open ones finish with the old). Whether it
    /// did; an error leaves the old client in use.
    pub fn reload(&self) -> Result<bool, String> {
        let pem = read(&self.context)?;
        if self.state.load().pem == pem {
            return Ok(false);
        }
        let state = make(&self.context, pem, self.protocol, &self.pool)?;
        self.state.store(Arc::new(state));
        Ok(true)
    }

    /// Seconds until the proxy's own certificate expires, if it has one.
    pub fn client_certificate_expiry(&self) -> Option<i64> {
        let state = self.state.load();
        let (chain, _) = state.pem.client.as_ref()?;
        let leaf = CertificateDer::pem_slice_iter(chain).next()?.ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        Some(cert.validity().not_after.timestamp() - i64::try_from(now.as_secs()).ok()?)
    }
}

/// `context` with the SDS secrets it names put in their place, inline:
/// the client certificate and the validation context's CA bundle. The
/// names stay checked by the control plane's content, so a renewed secret
/// makes a different context, and a new client.
fn with_secrets(
    mut context: UpstreamTlsContext,
    secrets: &BTreeMap<String, (String, Any)>,
) -> Result<UpstreamTlsContext, String> {
    let Some(common) = context.common_tls_context.as_mut() else {
        return Ok(context);
    };
    let secret = |name: &str, field: &str| -> Result<secret::Type, String> {
        let (_, any) = secrets
            .get(name)
            .ok_or_else(|| format!("{field}: secret {name:?} has not been received"))?;
        Secret::decode(any.value.as_slice())
            .map_err(|e| format!("{field}: secret {name:?}: cannot decode: {e}"))?
            .r#type
            .ok_or_else(|| format!("{field}: secret {name:?} is empty"))
    };
    for sds in std::mem::take(&mut common.tls_certificate_sds_secret_configs) {
        match secret(&sds.name, "tls_certificate_sds_secret_configs")? {
            secret::Type::TlsCertificate(cert) => common.tls_certificates.push(cert),
            _ => {
                return Err(format!(
                    "tls_certificate_sds_secret_configs: secret {:?} is not a TLS certificate",
                    sds.name
                ));
            }
        }
    }
    if let Some(common_tls_context::ValidationContextType::CombinedValidationContext(combined)) =
        &common.validation_context_type
    {
        let name = combined
            .validation_context_sds_secret_config
            .as_ref()
            .map(|s| s.name.clone())
            .ok_or("combined_validation_context: no validation_context_sds_secret_config")?;
        let field = "validation_context_sds_secret_config";
        let secret::Type::ValidationContext(from_secret) = secret(&name, field)? else {
            return Err(format!(
                "{field}: secret {name:?} is not a validation context"
            ));
        };
        let mut merged = combined
            .default_validation_context
            .clone()
            .unwrap_or_default();
        merged.trusted_ca = from_secret.trusted_ca;
        common.validation_context_type =
            Some(common_tls_context::ValidationContextType::ValidationContext(merged));
    }
    Ok(context)
}

/// Reads the PEM the context names.
fn read(context: &UpstreamTlsContext) -> Result<Pem, String> {
    let common = context.common_tls_context.as_ref();
    let trusted_ca = common
        .and_then(|c| match &c.validation_context_type {
            Some(common_tls_context::ValidationContextType::ValidationContext(v)) => Some(v),
            _ => None,
        })
        .and_then(|v| v.trusted_ca.as_ref());
    let ca = read_source(trusted_ca, "validation_context.trusted_ca")?;
    let client = match common.map(|c| c.tls_certificates.as_slice()) {
        None | Some([]) => None,
        Some([cert]) => Some((
            read_source(
                cert.certificate_chain.as_ref(),
                "tls_certificates.certificate_chain",
            )?,
            read_source(cert.private_key.as_ref(), "tls_certificates.private_key")?,
        )),
        Some(_) => return Err("tls_certificates: at most one client certificate".to_owned()),
    };
    Ok(Pem { ca, client })
}

/// The bytes of a TLS data source: a file or inline PEM.
fn read_source(source: Option<&DataSource>, field: &str) -> Result<Vec<u8>, String> {
    use data_source::Specifier;
    match source.and_then(|s| s.specifier.as_ref()) {
        None => Err(format!("{field}: missing")),
        Some(Specifier::Filename(path)) => {
            std::fs::read(path).map_err(|e| format!("{field}: cannot read {path}: {e}"))
        }
        Some(Specifier::InlineBytes(bytes)) => Ok(bytes.clone()),
        Some(Specifier::InlineString(text)) => Ok(text.as_bytes().to_vec()),
        Some(_) => Err(format!("{field}: use a file or inline PEM")),
    }
}

/// Makes the client for `pem`.
fn make(
    context: &UpstreamTlsContext,
    pem: Pem,
    protocol: Protocol,
    pool: &PoolConfig,
) -> Result<TlsState, String> {
    let server_name = rustls::pki_types::ServerName::try_from(context.sni.clone())
        .map_err(|e| format!("sni: {:?}: {e}", context.sni))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem.ca) {
        let cert = cert.map_err(|e| format!("validation_context.trusted_ca: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("validation_context.trusted_ca: {e}"))?;
    }
    if roots.is_empty() {
        return Err("validation_context.trusted_ca: no certificate in the bundle".to_owned());
    }
    let client_auth = match &pem.client {
        None => None,
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("tls_certificates.certificate_chain: {e}"))?;
            if chain.is_empty() {
                return Err("tls_certificates.certificate_chain: no certificate".to_owned());
            }
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| format!("tls_certificates.private_key: {e}"))?;
            Some((chain, key))
        }
    };
    let client = crate::forward::tls_client(pool, roots, server_name, client_auth, protocol)?;
    Ok(TlsState { pem, client })
}

/// Checks every cluster's TLS files every `every` until `shutdown`, and
/// keeps the client certificates' expiry gauges current.
pub async fn watch(proxy: Arc<Proxy>, every: Duration, shutdown: CancellationToken) {
    proxy
        .every_upstream(every, &shutdown, |upstream| {
            let Some(tls) = &upstream.tls else {
                return;
            };
            let cluster = upstream.name.clone();
            match tls.reload() {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(%cluster, "upstream TLS files changed: new connections use them");
                    metrics::counter!("ferry_proxy_upstream_tls_reloads_total", "cluster" => cluster.clone(), "result" => "ok").increment(1);
                }
                Err(e) => {
                    tracing::warn!(%cluster, error = %e, "upstream TLS files unusable; keeping the last good ones");
                    metrics::counter!("ferry_proxy_upstream_tls_reloads_total", "cluster" => cluster.clone(), "result" => "error").increment(1);
                }
            }
            if let Some(left) = tls.client_certificate_expiry() {
                metrics::gauge!("ferry_proxy_upstream_tls_client_certificate_expiry_seconds", "cluster" => cluster)
                    .set(left as f64);
            }
        })
        .await;
}
