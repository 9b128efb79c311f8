//! xDS resources as Ferry serves them: encoded once, versioned by content.

use std::fmt;

use ferry_proto::{Any, pack, type_url};
use prost::{Message, Name};
use xxhash_rust::xxh3::xxh3_64;

/// The resource types Ferry serves, in make-before-break push order:
/// clusters before their endpoints, listeners before their routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum ResourceType {
    Cluster,
    Endpoint,
    Listener,
    Route,
}

impl ResourceType {
    /// Every type, in push order.
    pub const ALL: [ResourceType; 4] = [Self::Cluster, Self::Endpoint, Self::Listener, Self::Route];

    pub fn type_url(self) -> &'static str {
        match self {
            Self::Cluster => type_url::CLUSTER,
            Self::Endpoint => type_url::ENDPOINT,
            Self::Listener => type_url::LISTENER,
            Self::Route => type_url::ROUTE,
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Listeners and clusters are sent whole in state-of-the-world: one
    /// missing from a response means deleted.
    pub fn is_full_state(self) -> bool {
        matches!(self, Self::Cluster | Self::Listener)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The short name SREs know: cds, eds, lds, rds.
    pub fn short(self) -> &'static str {
        match self {
            Self::Cluster => "cds",
            Self::Endpoint => "eds",
            Self::Listener => "lds",
            Self::Route => "rds",
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// One encoded resource. Its version is a hash of its encoding, so equal
/// content always has equal versions, across pushes and restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    pub version: String,
    pub body: Any,
}

impl Resource {
    pub fn new<M: Message + Name>(name: String, message: &M) -> Self {
        let body = pack(message);
        Self::from_body(name, body)
    }

    /// A resource from a message already encoded: `value` is the protobuf
    /// encoding of a message of type `type_url`.
    pub fn from_encoded(name: String, type_url: &str, value: Vec<u8>) -> Self {
        let body = Any {
            type_url: type_url.to_owned(),
            value,
        };
        Self::from_body(name, body)
    }

    fn from_body(name: String, body: Any) -> Self {
        let version = format!("{:016x}", xxh3_64(&body.value));
        Self {
            name,
            version,
            body,
        }
    }
}
