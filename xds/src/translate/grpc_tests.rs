//! What gRPC clients are served, and that proxies' resources stay as they
//! were.

use super::grpc::ROUTER_FILTER;
use super::*;
use ferry_discovery::Catalog;
use ferry_discovery::file::parse_catalog;
use ferry_proto::envoy::config::cluster::v3::{Cluster, cluster};
use ferry_proto::envoy::config::core::v3::config_source;
use ferry_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use ferry_proto::envoy::config::listener::v3::Listener;
use ferry_proto::envoy::config::route::v3::{
    RouteAction, RouteConfiguration, WeightedCluster, route, route_action,
};
use ferry_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use prost::Message;
use std::path::Path;

const CATALOG: &str = r#"
services:
  - name: checkout
    namespace: shop
    ports: [{name: grpc, port: 8080}, {name: admin, port: 9090}]
    hosts: [checkout.example.com, "*.checkout.example.com"]
    protocol: grpc
    timeout: 3s
    retries: {attempts: 2, on: [connect-failure]}
    tls: {server_name: checkout.internal, ca_file: /etc/ca.pem}
    outlier_detection: {consecutive_5xx: 5, base_ejection_time: 30s, max_ejection_percent: 50}
    backends:
      old:
        endpoints:
          - {address: "127.0.0.1", ports: {grpc: 9001, admin: 9002}, zone: a}
          - {address: "127.0.0.2", ports: {grpc: 9001, admin: 9002}, zone: a}
          - {address: "127.0.0.3", ports: {grpc: 9001, admin: 9002}, zone: b, ready: false}
      new: {endpoints: [{address: "127.0.0.4", ports: {grpc: 9001, admin: 9002}}]}
    weights: {old: 8000, new: 2000}
  - name: cart
    namespace: shop
    ports: [{name: grpc, port: 80}]
    sticky: {header: x-user}
    backends:
      old: {endpoints: ["127.0.0.1:9201"]}
  - name: cart
    namespace: web
    ports: [{name: grpc, port: 80}]
    sticky: {cookie: session}
    backends:
      old: {endpoints: ["127.0.0.1:9301"]}
"#;

fn catalog(text: &str) -> Catalog {
    let catalog = Catalog::new();
    catalog.replace(parse_catalog(Path::new("t.yaml"), text).unwrap());
    catalog
}

fn decode<M: Message + Default>(r: &Resource) -> M {
    M::decode(r.body.value.as_slice()).unwrap()
}

fn grpc_of(text: &str) -> (ResourceMaps, ResourceMaps) {
    let mut t = Translator::new(TranslateOptions::default());
    let maps = t.translate(&catalog(text).current());
    (maps, t.grpc_resources())
}

fn names(maps: &ResourceMaps, kind: ResourceType) -> Vec<&str> {
    maps[kind.index()].keys().map(String::as_str).collect()
}

fn action(rc: &RouteConfiguration) -> &RouteAction {
    assert_eq!(rc.virtual_hosts.len(), 1);
    let routes = &rc.virtual_hosts[0].routes;
    assert_eq!(routes.len(), 1);
    let Some(route::Action::Route(action)) = &routes[0].action else {
        panic!("no route action")
    };
    action
}

fn weighted(action: &RouteAction) -> &WeightedCluster {
    let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) = &action.cluster_specifier
    else {
        panic!("no weighted clusters")
    };
    wc
}

fn weights(rc: &RouteConfiguration) -> Vec<(String, u32)> {
    weighted(action(rc))
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
        .collect()
}

#[test]
fn each_target_name_is_a_listener_whose_api_listener_takes_its_routes_by_rds() {
    let (_, grpc) = grpc_of(CATALOG);
    let listeners = names(&grpc, ResourceType::Listener);
    for target in [
        "checkout.shop:8080",
        "checkout.shop.svc:8080",
        "checkout.shop.svc.cluster.local:8080",
        "checkout:8080",
        "checkout.shop",
        "checkout.shop.svc.cluster.local",
        "checkout",
        "checkout.shop:9090",
        "checkout.shop.svc.cluster.local:9090",
        "checkout.example.com",
        "checkout.example.com:8080",
        "checkout.example.com:9090",
        "cart.shop:80",
        "cart.web.svc.cluster.local:80",
    ] {
        assert!(listeners.contains(&target), "{target} in {listeners:?}");
    }
    // A wildcard host names no target; a short name two namespaces share
    // names neither.
    assert!(!listeners.iter().any(|l| l.contains('*')), "{listeners:?}");
    assert!(!listeners.contains(&"cart:80"), "{listeners:?}");
    assert!(!listeners.contains(&"cart"), "{listeners:?}");

    let expect_route = [
        ("checkout.shop:8080", "checkout.shop:8080"),
        ("checkout.shop", "checkout.shop:8080"),
        ("checkout.example.com:9090", "checkout.shop:8080"),
        ("checkout.shop:9090", "checkout.shop:9090"),
        ("cart.web:80", "cart.web:80"),
    ];
    for (target, route_name) in expect_route {
        let listener: Listener = decode(&grpc[ResourceType::Listener.index()][target]);
        assert_eq!(listener.name, target);
        assert!(listener.address.is_none() && listener.filter_chains.is_empty());
        let api = listener.api_listener.expect("api_listener").api_listener;
        let api = api.expect("api_listener config");
        assert_eq!(
            api.type_url,
            ferry_proto::pack(&HttpConnectionManager::default()).type_url
        );
        let hcm = HttpConnectionManager::decode(api.value.as_slice()).unwrap();
        let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &hcm.route_specifier else {
            panic!("{target}: routes not by RDS")
        };
        assert_eq!(rds.route_config_name, route_name);
        assert!(matches!(
            rds.config_source
                .as_ref()
                .and_then(|c| c.config_source_specifier.as_ref()),
            Some(config_source::ConfigSourceSpecifier::Ads(_))
        ));
        assert_eq!(
            hcm.http_filters.last().map(|f| f.name.as_str()),
            Some(ROUTER_FILTER)
        );
        // The route configuration's virtual host answers to the target.
        let rc: RouteConfiguration = decode(&grpc[ResourceType::Route.index()][route_name]);
        assert!(
            rc.virtual_hosts[0].domains.iter().any(|d| d == target),
            "{target}"
        );
    }
}

#[test]
fn routes_split_by_the_same_weights_as_proxies_get_without_total_weight() {
    let (envoy, grpc) = grpc_of(CATALOG);
    let rc: RouteConfiguration = decode(&grpc[ResourceType::Route.index()]["checkout.shop:8080"]);
    assert_eq!(
        weights(&rc),
        [
            ("checkout.shop:8080@new".to_owned(), 2000),
            ("checkout.shop:8080@old".to_owned(), 8000)
        ]
    );
    let wc = weighted(action(&rc));
    // Unset: gRPC sums the weights (the field is deprecated).
    #[allow(deprecated)]
    let total = wc.total_weight;
    assert!(total.is_none());
    // The proxies' route splits alike.
    let proxy: RouteConfiguration = decode(&envoy[ResourceType::Route.index()]["ferry_http"]);
    let vh = proxy
        .virtual_hosts
        .iter()
        .find(|v| v.name == "checkout.shop:8080")
        .unwrap();
    let Some(route::Action::Route(proxy_action)) = &vh.routes[0].action else {
        panic!()
    };
    assert_eq!(weighted(proxy_action).clusters, wc.clusters);
    // What gRPC does not take is left out; the timeout is a stream duration.
    let a = action(&rc);
    assert!(a.retry_policy.is_none() && a.upgrade_configs.is_empty() && a.timeout.is_none());
    let msd = a.max_stream_duration.as_ref().unwrap();
    assert_eq!(msd.max_stream_duration.as_ref().map(|d| d.seconds), Some(3));
    assert!(a.hash_policy.is_empty());
}

#[test]
fn weights_set_through_the_api_reach_grpc_routes() {
    let c = catalog(CATALOG);
    let mut t = Translator::new(TranslateOptions::default());
    t.translate(&c.current());
    let name = ServiceName::new("checkout", "shop").unwrap();
    let w = Weights::new(
        [("old", 1000), ("new", 9000)]
            .into_iter()
            .map(|(c, bp)| (ferry_discovery::ClusterName::new(c).unwrap(), bp))
            .collect(),
    )
    .unwrap();
    let overrides = WeightOverrides::from([(name, w)]);
    t.translate_with(&c.current(), &overrides);
    let grpc = t.grpc_resources();
    let rc: RouteConfiguration = decode(&grpc[ResourceType::Route.index()]["checkout.shop:9090"]);
    assert_eq!(
        weights(&rc),
        [
            ("checkout.shop:9090@new".to_owned(), 9000),
            ("checkout.shop:9090@old".to_owned(), 1000)
        ]
    );
}

#[test]
fn clusters_use_lb_policies_grpc_accepts_and_report_load_to_ferry() {
    let (envoy, grpc) = grpc_of(CATALOG);
    let cluster: Cluster = decode(&grpc[ResourceType::Cluster.index()]["checkout.shop:8080@old"]);
    assert_eq!(cluster.lb_policy, cluster::LbPolicy::RoundRobin as i32);
    let policies: Vec<&str> = cluster
        .load_balancing_policy
        .as_ref()
        .unwrap()
        .policies
        .iter()
        .map(|p| {
            p.typed_extension_config
                .as_ref()
                .and_then(|c| c.typed_config.as_ref())
                .map(|a| a.type_url.as_str())
                .unwrap()
        })
        .collect();
    assert_eq!(
        policies,
        [
            "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
            "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin",
        ]
    );
    assert!(matches!(
        cluster
            .lrs_server
            .as_ref()
            .and_then(|c| c.config_source_specifier.as_ref()),
        Some(config_source::ConfigSourceSpecifier::Self_(_))
    ));
    assert!(matches!(
        cluster.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32
    ));
    // TLS, HTTP/2 options, health checks and outlier detection are the
    // proxies' alone.
    assert!(cluster.transport_socket.is_none());
    assert!(cluster.typed_extension_protocol_options.is_empty());
    assert!(cluster.outlier_detection.is_none() && cluster.health_checks.is_empty());
    let proxy: Cluster = decode(&envoy[ResourceType::Cluster.index()]["checkout.shop:8080@old"]);
    assert_eq!(proxy.lb_policy, cluster::LbPolicy::LeastRequest as i32);
    assert!(proxy.transport_socket.is_some() && proxy.load_balancing_policy.is_none());
}

#[test]
fn a_sticky_header_hashes_to_a_ring_and_a_sticky_cookie_does_not() {
    let (_, grpc) = grpc_of(CATALOG);
    let cluster: Cluster = decode(&grpc[ResourceType::Cluster.index()]["cart.shop:80@old"]);
    let first = &cluster.load_balancing_policy.as_ref().unwrap().policies[0];
    let config = first.typed_extension_config.as_ref().unwrap();
    assert_eq!(
        config.typed_config.as_ref().unwrap().type_url,
        "type.googleapis.com/envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash"
    );
    // Clients that do not read the list round-robin.
    assert_eq!(cluster.lb_policy, cluster::LbPolicy::RoundRobin as i32);
    let rc: RouteConfiguration = decode(&grpc[ResourceType::Route.index()]["cart.shop:80"]);
    let hash = &action(&rc).hash_policy;
    assert_eq!(hash.len(), 1);
    let Some(route_action::hash_policy::PolicySpecifier::Header(h)) = &hash[0].policy_specifier
    else {
        panic!("{hash:?}")
    };
    assert_eq!(h.header_name, "x-user");

    let cookie: Cluster = decode(&grpc[ResourceType::Cluster.index()]["cart.web:80@old"]);
    let first = &cookie.load_balancing_policy.as_ref().unwrap().policies[0];
    assert!(
        first
            .typed_extension_config
            .as_ref()
            .unwrap()
            .name
            .ends_with("least_request")
    );
    let rc: RouteConfiguration = decode(&grpc[ResourceType::Route.index()]["cart.web:80"]);
    assert!(action(&rc).hash_policy.is_empty());
}

#[test]
fn localities_carry_a_weight_of_their_healthy_endpoints() {
    let (envoy, grpc) = grpc_of(CATALOG);
    let cla: ClusterLoadAssignment =
        decode(&grpc[ResourceType::Endpoint.index()]["checkout.shop:9090@old"]);
    let zones: Vec<(&str, usize, u32)> = cla
        .endpoints
        .iter()
        .map(|l| {
            (
                l.locality.as_ref().unwrap().zone.as_str(),
                l.lb_endpoints.len(),
                l.load_balancing_weight.as_ref().unwrap().value,
            )
        })
        .collect();
    // Zone b's one endpoint is not ready: weight 1 keeps the locality, and
    // gRPC picks none of its endpoints.
    assert_eq!(zones, [("a", 2, 2), ("b", 1, 1)]);
    let port = |l: &ferry_proto::envoy::config::endpoint::v3::LocalityLbEndpoints| {
        let Some(ferry_proto::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(
            e,
        )) = &l.lb_endpoints[0].host_identifier
        else {
            panic!()
        };
        format!("{:?}", e.address)
    };
    assert!(
        port(&cla.endpoints[0]).contains("9002"),
        "the admin port's targets"
    );
    // The proxies' load assignment has no locality weights.
    let proxy: ClusterLoadAssignment =
        decode(&envoy[ResourceType::Endpoint.index()]["checkout.shop:9090@old"]);
    assert!(
        proxy
            .endpoints
            .iter()
            .all(|l| l.load_balancing_weight.is_none())
    );
}

#[test]
fn proxies_get_only_their_own_resources() {
    let c = catalog(CATALOG);
    let mut t = Translator::new(TranslateOptions::default());
    let envoy = t.translate(&c.current());
    assert_eq!(names(&envoy, ResourceType::Listener), ["ferry_http"]);
    assert_eq!(names(&envoy, ResourceType::Route), ["ferry_http"]);
    let grpc = t.grpc_resources();
    assert!(!grpc[ResourceType::Listener.index()].contains_key("ferry_http"));
    // Same cluster names on both sides, so load reports match either.
    assert_eq!(
        names(&envoy, ResourceType::Cluster),
        names(&grpc, ResourceType::Cluster)
    );
    assert_eq!(
        names(&envoy, ResourceType::Endpoint),
        names(&grpc, ResourceType::Endpoint)
    );
    // The proxies' resources are those of a translator built before gRPC
    // resources existed: the same Listener, and no gRPC Listener among them.
    let listener: Listener = decode(&envoy[ResourceType::Listener.index()]["ferry_http"]);
    assert!(listener.api_listener.is_none());
    assert_eq!(listener.name, "ferry_http");
}

#[test]
fn a_removed_service_port_or_host_takes_its_grpc_resources_along() {
    let c = catalog(CATALOG);
    let mut t = Translator::new(TranslateOptions::default());
    t.translate(&c.current());
    let before = t.grpc_resources();
    assert!(before[ResourceType::Listener.index()].contains_key("checkout.example.com"));
    let fewer = CATALOG
        .replace(", {name: admin, port: 9090}", "")
        .replace(", admin: 9002", "")
        .replace("checkout.example.com, ", "");
    let fewer = &fewer[..fewer.find("  - name: cart\n    namespace: web").unwrap()];
    c.replace(parse_catalog(Path::new("t.yaml"), fewer).unwrap());
    t.translate(&c.current());
    let after = t.grpc_resources();
    let listeners = names(&after, ResourceType::Listener);
    assert!(
        !listeners.contains(&"checkout.example.com"),
        "{listeners:?}"
    );
    assert!(!listeners.contains(&"checkout.shop:9090"), "{listeners:?}");
    assert!(
        !listeners.iter().any(|l| l.starts_with("cart.web")),
        "{listeners:?}"
    );
    // The short name is no longer shared: `cart` now names cart.shop.
    assert!(listeners.contains(&"cart:80"), "{listeners:?}");
    assert_eq!(
        names(&after, ResourceType::Route),
        ["cart.shop:80", "checkout.shop:8080"]
    );
    assert_eq!(
        names(&after, ResourceType::Cluster),
        [
            "cart.shop:80@old",
            "checkout.shop:8080@new",
            "checkout.shop:8080@old"
        ]
    );
    assert_eq!(
        names(&after, ResourceType::Endpoint),
        names(&after, ResourceType::Cluster)
    );
}
