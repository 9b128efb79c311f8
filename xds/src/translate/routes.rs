//! Virtual hosts: one per service port, whose route splits traffic across
//! the service's clusters by weight; and the one route configuration that
//! holds them all.
//!
//! Each service's virtual hosts are encoded once, when the service is
//! translated, in the form they take inside a `RouteConfiguration`. The
//! configuration is then assembled by joining those encodings: a change to
//! one service costs one service's encoding and a copy of the others' bytes,
//! not an encoding of every virtual host.

use ferry_discovery::{RequestPolicy, RetryOn, Service, StickyKey};
use ferry_proto::envoy::config::route::v3::{
    HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    WeightedCluster, header_matcher, route, route_action, route_match, weighted_cluster,
};
use ferry_proto::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use ferry_proto::google::protobuf::{BoolValue, UInt32Value};
use ferry_proto::type_url;
use prost::Message;

use crate::resources::Resource;

use super::pb_duration;

/// Virtual hosts encoded as they appear inside a `RouteConfiguration`: each
/// one framed as an entry of its `virtual_hosts` field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedVirtualHosts(Vec<u8>);

impl EncodedVirtualHosts {
    pub fn new(virtual_hosts: Vec<VirtualHost>) -> Self {
        // A configuration with no name and nothing else encodes to exactly
        // its framed `virtual_hosts` entries.
        let only_hosts = RouteConfiguration {
            virtual_hosts,
            ..Default::default()
        };
        Self(only_hosts.encode_to_vec())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The route configuration `name` holding `parts`' virtual hosts in order:
/// the same bytes as encoding the whole `RouteConfiguration`, since protobuf
/// writes fields in number order (`name` is 1, `virtual_hosts` is 2) and a
/// repeated field's entries may be written back to back.
pub(super) fn route_configuration<'a>(
    name: &str,
    parts: impl IntoIterator<Item = &'a EncodedVirtualHosts>,
) -> Resource {
    let mut value = RouteConfiguration {
        name: name.to_owned(),
        ..Default::default()
    }
    .encode_to_vec();
    for part in parts {
        value.extend_from_slice(part.as_bytes());
    }
    Resource::from_encoded(name.to_owned(), type_url::ROUTE, value)
}

pub(super) fn domains(
    service: &Service,
    port: u16,
    default_port: bool,
    short_name_unique: bool,
) -> Vec<String> {
    let (n, ns) = (service.name.name(), service.name.namespace());
    let mut bare = Vec::with_capacity(4);
    if short_name_unique {
        bare.push(n.to_owned());
    }
    bare.push(format!("{n}.{ns}"));
    bare.push(format!("{n}.{ns}.svc"));
    bare.push(format!("{n}.{ns}.svc.cluster.local"));
    let mut domains: Vec<String> = bare.iter().map(|d| format!("{d}:{port}")).collect();
    if default_port {
        domains.extend(bare);
        for host in &service.hosts {
            domains.push(host.clone());
            domains.push(format!("{host}:*"));
        }
    }
    domains
}

pub(super) fn virtual_host(
    name: String,
    domains: Vec<String>,
    clusters: Vec<weighted_cluster::ClusterWeight>,
    sticky: Option<&StickyKey>,
    requests: &RequestPolicy,
) -> VirtualHost {
    // A header hash policy makes Ferry's proxy pick the cluster by the
    // header's value (Envoy uses it for load balancing within a cluster).
    let hash_policy = sticky
        .map(|key| {
            let specifier = match key {
                StickyKey::Header(name) => route_action::hash_policy::PolicySpecifier::Header(
                    route_action::hash_policy::Header {
                        header_name: name.clone(),
                        ..Default::default()
                    },
                ),
                StickyKey::Cookie(name) => route_action::hash_policy::PolicySpecifier::Cookie(
                    route_action::hash_policy::Cookie {
                        name: name.clone(),
                        ..Default::default()
                    },
                ),
            };
            vec![route_action::HashPolicy {
                policy_specifier: Some(specifier),
                ..Default::default()
            }]
        })
        .unwrap_or_default();
    let action = RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
            WeightedCluster {
                clusters,
                ..Default::default()
            },
        )),
        hash_policy,
        upgrade_configs: route_upgrades(requests.upgrades.as_deref()),
        timeout: requests.timeout.map(pb_duration),
        retry_policy: requests.retries.as_ref().map(|r| {
            // 5xx and reset retries are for idempotent methods only.
            let only_idempotent = r.on.iter().any(|o| *o != RetryOn::ConnectFailure);
            RetryPolicy {
                retry_on: r
                    .on
                    .iter()
                    .map(|o| o.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                num_retries: Some(UInt32Value { value: r.attempts }),
                per_try_timeout: r.per_try_timeout.map(pb_duration),
                retriable_request_headers: if only_idempotent {
                    vec![idempotent_methods()]
                } else {
                    Vec::new()
                },
                ..Default::default()
            }
        }),
        ..Default::default()
    };
    VirtualHost {
        name,
        domains,
        routes: vec![Route {
            name: "default".to_owned(),
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
                ..Default::default()
            }),
            action: Some(route::Action::Route(action)),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A route's upgrades: the listener allows WebSocket; a service that lists
/// its own enables those and turns WebSocket off when it is not listed.
fn route_upgrades(upgrades: Option<&[String]>) -> Vec<route_action::UpgradeConfig> {
    let Some(list) = upgrades else {
        return Vec::new();
    };
    let mut configs: Vec<route_action::UpgradeConfig> = list
        .iter()
        .map(|u| route_action::UpgradeConfig {
            upgrade_type: u.clone(),
            enabled: Some(BoolValue { value: true }),
            ..Default::default()
        })
        .collect();
    if !list.iter().any(|u| u == "websocket") {
        configs.push(route_action::UpgradeConfig {
            upgrade_type: "websocket".to_owned(),
            enabled: Some(BoolValue { value: false }),
            ..Default::default()
        });
    }
    configs
}

/// Methods that may be sent twice (RFC 9110 section 9.2.2).
pub const IDEMPOTENT_METHODS: &str = "GET|HEAD|OPTIONS|TRACE|PUT|DELETE";

fn idempotent_methods() -> HeaderMatcher {
    HeaderMatcher {
        name: ":method".to_owned(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                    regex: IDEMPOTENT_METHODS.to_owned(),
                    ..Default::default()
                })),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}
