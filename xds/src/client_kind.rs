//! Which kind of xDS client a stream serves, told apart by what the client
//! says it is and what it asks for; never by configuration.
//!
//! - [`ClientKind::Proxy`]: Envoy and Ferry's proxy. They take the one HTTP
//!   listener, its route configuration and every cluster.
//! - [`ClientKind::Grpc`]: a proxyless gRPC client (grpc-go, grpc-java,
//!   C-core and the languages on it). It asks for a Listener named after
//!   its target (`xds:///checkout.shop:8080` → `checkout.shop:8080`) and
//!   gets resources made for what gRPC accepts ([`crate::translate`]).
//!
//! A node whose `user_agent_name` starts with `gRPC` is a gRPC client
//! (gRPC sets `gRPC C-core …`, `gRPC Go`, `gRPC Java`); `envoy` and
//! `ferry-proxy` are proxies. A client that names neither is told by its
//! first request: a *named* Listener subscription is how gRPC resolves a
//! target, while proxies subscribe to listeners by wildcard (or start with
//! clusters).

use ferry_proto::envoy::config::core::v3::Node;

use crate::resources::ResourceType;

/// The kind of client a stream serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    /// Envoy and Ferry's proxy.
    #[default]
    Proxy,
    /// A proxyless gRPC client.
    Grpc,
}

impl ClientKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proxy => "proxy",
            Self::Grpc => "grpc",
        }
    }

    /// What a node's `user_agent_name` says, if it says anything known.
    pub fn from_node(node: &Node) -> Option<Self> {
        let agent = node.user_agent_name.trim();
        let lower = agent.to_ascii_lowercase();
        if lower.starts_with("grpc") {
            Some(Self::Grpc)
        } else if lower.starts_with("envoy") || lower.starts_with("ferry-proxy") {
            Some(Self::Proxy)
        } else {
            None
        }
    }

    /// What a client that named no known user agent is, from its first
    /// request: `names` subscribed to resources of `kind` (`*` is the
    /// wildcard).
    pub fn from_first_request<S: AsRef<str>>(kind: ResourceType, names: &[S]) -> Self {
        let named = !names.is_empty() && names.iter().all(|n| n.as_ref() != "*");
        if kind == ResourceType::Listener && named {
            Self::Grpc
        } else {
            Self::Proxy
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(agent: &str) -> Node {
        Node {
            id: "n".into(),
            user_agent_name: agent.into(),
            ..Default::default()
        }
    }

    #[test]
    fn user_agents_tell_grpc_from_proxies() {
        for agent in ["gRPC C-core linux", "gRPC Go", "gRPC Java", "grpc-python"] {
            assert_eq!(
                ClientKind::from_node(&node(agent)),
                Some(ClientKind::Grpc),
                "{agent}"
            );
        }
        for agent in ["envoy", "ferry-proxy"] {
            assert_eq!(
                ClientKind::from_node(&node(agent)),
                Some(ClientKind::Proxy),
                "{agent}"
            );
        }
        for agent in ["", "curl", "istio-agent"] {
            assert_eq!(ClientKind::from_node(&node(agent)), None, "{agent:?}");
        }
    }

    #[test]
    fn an_unnamed_client_is_told_by_its_first_subscription() {
        let lds = ResourceType::Listener;
        assert_eq!(
            ClientKind::from_first_request(lds, &["checkout.shop:8080"]),
            ClientKind::Grpc
        );
        let none: [&str; 0] = [];
        assert_eq!(
            ClientKind::from_first_request(lds, &none),
            ClientKind::Proxy
        );
        assert_eq!(
            ClientKind::from_first_request(lds, &["*"]),
            ClientKind::Proxy
        );
        assert_eq!(
            ClientKind::from_first_request(lds, &["*", "checkout.shop:8080"]),
            ClientKind::Proxy
        );
        assert_eq!(
            ClientKind::from_first_request(ResourceType::Cluster, &["a"]),
            ClientKind::Proxy
        );
    }
}
