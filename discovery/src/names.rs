//! Validated names: a service is `name.namespace`, a backend lives in a
//! named Kubernetes cluster. Both are parsed once at the edge.

use std::fmt;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("{0:?} is longer than 63 characters")]
    TooLong(String),
    #[error(
        "{0:?} is not a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit)"
    )]
    NotDnsLabel(String),
    #[error("{0:?} is not of the form name.namespace")]
    NotQualified(String),
}

/// Checks a Kubernetes DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, ≤ 63).
pub fn check_dns_label(label: &str) -> Result<(), NameError> {
    if label.is_empty() {
        return Err(NameError::Empty);
    }
    if label.len() > 63 {
        return Err(NameError::TooLong(label.to_owned()));
    }
    let bytes = label.as_bytes();
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let inner_ok = |b: &u8| edge_ok(*b) || *b == b'-';
    if !edge_ok(bytes[0]) || !edge_ok(bytes[bytes.len() - 1]) || !bytes.iter().all(inner_ok) {
        return Err(NameError::NotDnsLabel(label.to_owned()));
    }
    Ok(())
}

/// A service, `name.namespace`, as Kubernetes names it.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName {
    name: String,
    namespace: String,
}

impl ServiceName {
    pub fn new(name: &str, namespace: &str) -> Result<Self, NameError> {
        check_dns_label(name)?;
        check_dns_label(namespace)?;
        Ok(Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        })
    }

    /// Parses `name.namespace`.
    pub fn parse(qualified: &str) -> Result<Self, NameError> {
        let (name, namespace) = qualified
            .split_once('.')
            .ok_or_else(|| NameError::NotQualified(qualified.to_owned()))?;
        Self::new(name, namespace)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// The name of a Kubernetes cluster that hosts backends.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

impl ClusterName {
    pub fn new(name: &str) -> Result<Self, NameError> {
        check_dns_label(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for ServiceName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

impl From<ServiceName> for String {
    fn from(n: ServiceName) -> String {
        n.to_string()
    }
}

impl TryFrom<String> for ClusterName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(&s)
    }
}

impl From<ClusterName> for String {
    fn from(n: ClusterName) -> String {
        n.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_dns_labels() {
        let s = ServiceName::parse("checkout.shop").unwrap();
        assert_eq!(s.to_string(), "checkout.shop");
        assert_eq!(
            ServiceName::new("Checkout", "shop"),
            Err(NameError::NotDnsLabel("Checkout".into()))
        );
        assert_eq!(ServiceName::new("", "shop"), Err(NameError::Empty));
        assert!(ServiceName::new("a-", "shop").is_err());
        assert!(ServiceName::parse("checkout").is_err());
        assert!(ServiceName::new(&"a".repeat(64), "shop").is_err());
    }

    #[test]
    fn cluster_names_are_dns_labels() {
        assert!(ClusterName::new("eu-west-1").is_ok());
        assert!(ClusterName::new("eu_west").is_err());
        assert!(ClusterName::new("-old").is_err());
    }
}
