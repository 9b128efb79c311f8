//! TLS material for one fake cluster: a throwaway CA, a server certificate
//! for `127.0.0.1` / `localhost`, client certificates signed by the CA
//! (the user is the subject CN, as for a real API server), and the rustls
//! server configuration (always the ring provider, chosen explicitly so the
//! process-wide default never matters to the server). Client certificates
//! are requested but optional, so bearer tokens keep working; one that does
//! not chain to the CA fails the handshake.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The generated CA and the rustls server configuration using its leaf.
pub(crate) struct TlsMaterial {
    pub ca_pem: String,
    pub ca: Issuer<'static, KeyPair>,
    pub server_config: Arc<rustls::ServerConfig>,
}

/// A PEM certificate and its PEM (PKCS#8) private key.
pub(crate) struct Pem {
    pub cert: String,
    pub key: String,
}

fn name(cn: &str, organization: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, organization);
    dn
}

/// A new self-signed CA: its certificate and the issuer that signs with it.
fn new_ca(cn: &str) -> Result<(rcgen::Certificate, Issuer<'static, KeyPair>), BoxError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = name(cn, "ferry-testkube");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    Ok((ca_cert, Issuer::new(ca_params, ca_key)))
}

pub(crate) fn generate() -> Result<TlsMaterial, BoxError> {
    let (ca_cert, issuer) = new_ca("ferry-testkube-ca")?;

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()])?;
    leaf_params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    leaf_params.distinguished_name = name("ferry-testkube-apiserver", "ferry-testkube");
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params.use_authority_key_identifier_extension = true;
    let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone())?;
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()?;
    let chain: Vec<CertificateDer<'static>> = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)?;
    Ok(TlsMaterial {
        ca_pem: ca_cert.pem(),
        ca: issuer,
        server_config: Arc::new(server_config),
    })
}

/// A client certificate for `user` (subject CN), signed by `ca`.
pub(crate) fn client_cert(ca: &Issuer<'_, KeyPair>, user: &str) -> Result<Pem, BoxError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name(user, "ferry-testkube");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, ca)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A client certificate for `user` signed by a fresh CA nobody trusts.
pub(crate) fn foreign_client_cert(user: &str) -> Result<Pem, BoxError> {
    let (_, ca) = new_ca("ferry-testkube-foreign-ca")?;
    client_cert(&ca, user)
}

/// The subject common name of a DER certificate (the Kubernetes user of a
/// client certificate). `None` when it has none or the DER is malformed.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let (tag, certificate, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, tbs, _) = tlv(certificate)?;
    // TBSCertificate: [0] version (optional), serial, signature algorithm,
    // issuer, validity, subject.
    let mut rest = tbs;
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (tag, mut subject, _) = tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    while !subject.is_empty() {
        let (tag, mut rdn, after) = tlv(subject)?;
        subject = after;
        if tag != SET {
            return None;
        }
        while !rdn.is_empty() {
            let (_, attribute, after) = tlv(rdn)?;
            rdn = after;
            let (tag, oid, value) = tlv(attribute)?;
            if tag == OID && oid == CN_OID {
                let (_, text, _) = tlv(value)?;
                return std::str::from_utf8(text).ok().map(str::to_owned);
            }
        }
    }
    None
}

/// Splits one DER tag-length-value off `input`: (tag, value, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (value, rest) = rest.split_at(len);
    Some((tag, value, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn client_certificates_name_their_user() {
        let material = generate().unwrap();
        let pem = client_cert(&material.ca, "ferry-east").unwrap();
        let der = CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap();
        assert_eq!(common_name(&der).as_deref(), Some("ferry-east"));
        assert!(pem.key.contains("PRIVATE KEY"));
        let ca = CertificateDer::from_pem_slice(material.ca_pem.as_bytes()).unwrap();
        assert_eq!(common_name(&ca).as_deref(), Some("ferry-testkube-ca"));
    }

    #[test]
    fn malformed_der_has_no_common_name() {
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(&[0x30, 0x03, 0x30, 0x01, 0x02]), None);
        let pem = foreign_client_cert("x").unwrap();
        let der = CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap();
        let truncated = &der[..der.len() / 2];
        assert_eq!(common_name(truncated), None);
    }
}
