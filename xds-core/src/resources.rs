//! xDS resources as Ferry serves them: encoded once, versioned by content.

use std::fmt;
use std::sync::OnceLock;

use bytes::Bytes;
use ferry_proto::envoy::service::discovery::v3::Resource as DeltaResource;
use ferry_proto::{Any, pack, type_url};
use prost::{Message, Name};
use xxhash_rust::xxh3::xxh3_64;

/// The resource types Ferry serves, in make-before-break push order:
/// secrets before the clusters that use them, clusters before their
/// endpoints, listeners before their routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum ResourceType {
    Secret,
    Cluster,
    Endpoint,
    Listener,
    Route,
}

impl ResourceType {
    /// How many types there are.
    pub const COUNT: usize = 5;

    /// Every type, in push order.
    pub const ALL: [ResourceType; Self::COUNT] = [
        Self::Secret,
        Self::Cluster,
        Self::Endpoint,
        Self::Listener,
        Self::Route,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            Self::Cluster => type_url::CLUSTER,
            Self::Endpoint => type_url::ENDPOINT,
            Self::Listener => type_url::LISTENER,
            Self::Route => type_url::ROUTE,
            Self::Secret => type_url::SECRET,
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

    /// The short name SREs know: sds, cds, eds, lds, rds.
    pub fn short(self) -> &'static str {
        match self {
            Self::Secret => "sds",
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
///
/// The resource's place in a response is encoded once, the first time a
/// stream sends it, and shared by every stream after: a push to ten
/// thousand clients encodes each resource once, not ten thousand times.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    pub version: String,
    pub body: Any,
    sotw_entry: OnceLock<Bytes>,
    delta_entry: OnceLock<Bytes>,
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        (&self.name, &self.version, &self.body) == (&other.name, &other.version, &other.body)
    }
}

/// The field both `DiscoveryResponse` and `DeltaDiscoveryResponse` carry
/// their resources in.
const RESOURCES_FIELD: u32 = 2;

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
            sotw_entry: OnceLock::new(),
            delta_entry: OnceLock::new(),
        }
    }

    /// This resource as one entry of a `DiscoveryResponse`'s `resources`
    /// (field tag, length and the `Any`), ready to append to a response.
    pub fn sotw_entry(&self) -> &Bytes {
        self.sotw_entry.get_or_init(|| {
            let mut buf = Vec::with_capacity(self.body.encoded_len() + 8);
            prost::encoding::message::encode(RESOURCES_FIELD, &self.body, &mut buf);
            Bytes::from(buf)
        })
    }

    /// This resource as one entry of a `DeltaDiscoveryResponse`'s
    /// `resources` (a `Resource` with name, version and body).
    pub fn delta_entry(&self) -> &Bytes {
        self.delta_entry.get_or_init(|| {
            let entry = DeltaResource {
                name: self.name.clone(),
                version: self.version.clone(),
                resource: Some(self.body.clone()),
                ..Default::default()
            };
            let mut buf = Vec::with_capacity(entry.encoded_len() + 8);
            prost::encoding::message::encode(RESOURCES_FIELD, &entry, &mut buf);
            Bytes::from(buf)
        })
    }
}
