//! Ferry's wire types.
//!
//! Envoy's xDS API comes from the maintained `envoy-types` crate (prost and
//! tonic generated code); this crate re-exports it under one path, names the
//! xDS type URLs Ferry serves, and packs messages into `Any`. Ferry's own
//! API (`ferry.v1`, in `ferry/v1/*.proto`) is compiled here with protox, so
//! no `protoc` is needed.
//!
//! ```
//! use ferry_proto::{pack, type_url};
//! use ferry_proto::envoy::config::cluster::v3::Cluster;
//!
//! let any = pack(&Cluster { name: "checkout.shop:8080@old".into(), ..Default::default() });
//! assert_eq!(any.type_url, type_url::CLUSTER);
//! ```

pub use envoy_types::pb::envoy;
pub use envoy_types::pb::google;
pub use envoy_types::pb::xds;

use prost::{Message, Name};

/// Ferry's own API, package `ferry.v1`.
pub mod ferry {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("ferry.v1");

        /// The encoded descriptors, for gRPC reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            tonic::include_file_descriptor_set!("ferry_descriptor");
    }
}

/// The protobuf `Any` used in xDS responses.
pub type Any = envoy_types::pb::google::protobuf::Any;

/// Type URLs of the xDS resources Ferry serves.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
}

/// Packs a message into an `Any` with its canonical type URL.
pub fn pack<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::config::{
        cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
        route::v3::RouteConfiguration,
    };

    #[test]
    fn type_urls_match_the_generated_messages() {
        assert_eq!(Listener::type_url(), type_url::LISTENER);
        assert_eq!(RouteConfiguration::type_url(), type_url::ROUTE);
        assert_eq!(Cluster::type_url(), type_url::CLUSTER);
        assert_eq!(ClusterLoadAssignment::type_url(), type_url::ENDPOINT);
        assert_eq!(
            crate::envoy::extensions::transport_sockets::tls::v3::Secret::type_url(),
            type_url::SECRET
        );
    }
}
