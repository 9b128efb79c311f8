//! The names a client certificate carries, for authorization to match.

use x509_parser::extensions::GeneralName;

/// A verified peer certificate's names: URI subjectAltNames (SPIFFE IDs),
/// DNS subjectAltNames and the subject's common name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerNames {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub common_name: Option<String>,
}

impl PeerNames {
    /// The names of a DER certificate; `None` when it does not parse (a
    /// certificate rustls verified always does).
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut names = Self {
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            ..Self::default()
        };
        if let Ok(Some(sans)) = cert.subject_alternative_name() {
            for name in &sans.value.general_names {
                match name {
                    GeneralName::URI(uri) => names.uris.push((*uri).to_owned()),
                    GeneralName::DNSName(dns) => names.dns.push(dns.to_ascii_lowercase()),
                    _ => {}
                }
            }
        }
        Some(names)
    }

    /// Every name, most specific first: URIs, DNS names, then the CN.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.uris
            .iter()
            .chain(&self.dns)
            .map(String::as_str)
            .chain(self.common_name.as_deref())
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }
}

impl std::fmt::Display for PeerNames {
    /// The most specific name, as logs and `/status` show the peer.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.iter().next().unwrap_or("(no name)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    #[test]
    fn names_come_from_uri_and_dns_sans_and_the_cn() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["Edge-1.Example.com".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::URI(
            "spiffe://prod/ns/edge/sa/proxy".try_into().unwrap(),
        ));
        params.distinguished_name.push(DnType::CommonName, "edge-1");
        let cert = params.self_signed(&key).unwrap();
        let names = PeerNames::from_der(cert.der()).unwrap();
        assert_eq!(names.uris, ["spiffe://prod/ns/edge/sa/proxy"]);
        assert_eq!(names.dns, ["edge-1.example.com"]);
        assert_eq!(names.common_name.as_deref(), Some("edge-1"));
        assert_eq!(
            names.iter().collect::<Vec<_>>(),
            [
                "spiffe://prod/ns/edge/sa/proxy",
                "edge-1.example.com",
                "edge-1"
            ]
        );
        assert_eq!(names.to_string(), "spiffe://prod/ns/edge/sa/proxy");
        assert!(PeerNames::from_der(b"not a certificate").is_none());
    }
}
