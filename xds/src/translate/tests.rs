use super::*;
use ferry_discovery::Catalog;
use ferry_discovery::file::parse_catalog;
use ferry_proto::envoy::config::cluster::v3::Cluster;
use ferry_proto::envoy::config::core::v3::{HealthStatus, health_check};
use ferry_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use ferry_proto::envoy::config::route::v3::{RouteConfiguration, VirtualHost, route, route_action};
use ferry_proto::envoy::r#type::v3::CodecClientType;
use prost::Message;
use std::path::Path;

const CATALOG: &str = r#"
services:
  - name: checkout
    namespace: shop
    ports: [{name: http, port: 8080}]
    hosts: [checkout.example.com]
    backends:
      old: {endpoints: ["127.0.0.1:9001", {address: "127.0.0.1:9002", ready: false, zone: a}]}
      new: {endpoints: ["127.0.0.1:9101"]}
    weights: {old: 9000, new: 1000}
  - name: cart
    namespace: shop
    ports: [{name: http, port: 80}]
    backends:
      old: {endpoints: ["127.0.0.1:9201", "127.0.0.1:9202"]}
      new: {endpoints: ["127.0.0.1:9301"]}
"#;

fn catalog(text: &str) -> Catalog {
    let catalog = Catalog::new();
    catalog.replace(parse_catalog(Path::new("t.yaml"), text).unwrap());
    catalog
}

fn decode<M: Message + Default>(r: &Resource) -> M {
    M::decode(r.body.value.as_slice()).unwrap()
}

fn vhost(maps: &ResourceMaps, name: &str) -> VirtualHost {
    let rc: RouteConfiguration = decode(&maps[ResourceType::Route.index()]["ferry_http"]);
    rc.virtual_hosts
        .into_iter()
        .find(|v| v.name == name)
        .unwrap()
}

fn route_weights(maps: &ResourceMaps, vhost: &str) -> Vec<(String, u32)> {
    let rc: RouteConfiguration = decode(&maps[ResourceType::Route.index()]["ferry_http"]);
    let vh = rc.virtual_hosts.iter().find(|v| v.name == vhost).unwrap();
    let Some(route::Action::Route(action)) = &vh.routes[0].action else {
        panic!("no route action")
    };
    let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) = &action.cluster_specifier
    else {
        panic!("no weighted clusters")
    };
    wc.clusters
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                c.weight.as_ref().map(|w| w.value).unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn names_follow_the_design() {
    let c = catalog(CATALOG);
    let maps = Translator::new(TranslateOptions::default()).translate(&c.current());
    let clusters: Vec<_> = maps[ResourceType::Cluster.index()]
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        clusters,
        [
            "cart.shop:80@new",
            "cart.shop:80@old",
            "checkout.shop:8080@new",
            "checkout.shop:8080@old"
        ]
    );
    assert_eq!(maps[ResourceType::Endpoint.index()].len(), 4);
    assert!(maps[ResourceType::Listener.index()].contains_key("ferry_http"));
}

#[test]
fn request_policies_become_envoy_fields() {
    let text = CATALOG.replacen(
        "    weights: {old: 9000, new: 1000}\n",
        "    weights: {old: 9000, new: 1000}\n    protocol: grpc\n    timeout: 3s\n    retries: {attempts: 2, on: [5xx, connect-failure], per_try_timeout: 1s}\n    outlier_detection: {consecutive_5xx: 4}\n    health_check: {path: /healthz}\n",
        1,
    );
    let maps = Translator::new(TranslateOptions::default()).translate(&catalog(&text).current());
    let cluster: Cluster = decode(&maps[ResourceType::Cluster.index()]["checkout.shop:8080@old"]);
    assert!(
        cluster
            .typed_extension_protocol_options
            .contains_key(HTTP_PROTOCOL_OPTIONS)
    );
    let outlier = cluster.outlier_detection.unwrap();
    assert_eq!(outlier.consecutive_5xx.map(|v| v.value), Some(4));
    assert_eq!(outlier.max_ejection_percent.map(|v| v.value), Some(50));
    let Some(health_check::HealthChecker::HttpHealthCheck(h)) =
        &cluster.health_checks[0].health_checker
    else {
        panic!("no HTTP health check")
    };
    assert_eq!(h.path, "/healthz");
    assert_eq!(h.codec_client_type, CodecClientType::Http2 as i32);
    let vh = vhost(&maps, "checkout.shop:8080");
    let Some(route::Action::Route(action)) = &vh.routes[0].action else {
        panic!("no route action")
    };
    assert_eq!(action.timeout.as_ref().map(|d| d.seconds), Some(3));
    let retry = action.retry_policy.as_ref().unwrap();
    assert_eq!(retry.retry_on, "connect-failure,5xx");
    assert_eq!(retry.num_retries.as_ref().map(|n| n.value), Some(2));
    assert_eq!(retry.retriable_request_headers[0].name, ":method");
    // A service without them gets none.
    let plain: Cluster = decode(&maps[ResourceType::Cluster.index()]["cart.shop:80@old"]);
    assert!(plain.outlier_detection.is_none() && plain.health_checks.is_empty());
    assert!(plain.typed_extension_protocol_options.is_empty());
}

#[test]
fn declared_weights_become_weighted_clusters() {
    let maps = Translator::new(TranslateOptions::default()).translate(&catalog(CATALOG).current());
    assert_eq!(
        route_weights(&maps, "checkout.shop:8080"),
        [
            ("checkout.shop:8080@new".into(), 1000),
            ("checkout.shop:8080@old".into(), 9000)
        ]
    );
    // No declared weights: by ready endpoints, 2 to 1.
    assert_eq!(
        route_weights(&maps, "cart.shop:80"),
        [
            ("cart.shop:80@new".into(), 3333),
            ("cart.shop:80@old".into(), 6667)
        ]
    );
}

#[test]
fn virtual_host_domains_cover_every_cluster_local_name() {
    let maps = Translator::new(TranslateOptions::default()).translate(&catalog(CATALOG).current());
    let vh = vhost(&maps, "checkout.shop:8080");
    for d in [
        "checkout",
        "checkout:8080",
        "checkout.shop",
        "checkout.shop.svc:8080",
        "checkout.shop.svc.cluster.local",
        "checkout.shop.svc.cluster.local:8080",
        "checkout.example.com",
    ] {
        assert!(
            vh.domains.iter().any(|x| x == d),
            "missing {d} in {:?}",
            vh.domains
        );
    }
}

#[test]
fn endpoint_health_follows_readiness_and_zone() {
    let maps = Translator::new(TranslateOptions::default()).translate(&catalog(CATALOG).current());
    let cla: ClusterLoadAssignment =
        decode(&maps[ResourceType::Endpoint.index()]["checkout.shop:8080@old"]);
    let zones: Vec<_> = cla
        .endpoints
        .iter()
        .map(|l| l.locality.clone().unwrap_or_default().zone)
        .collect();
    assert_eq!(zones, ["", "a"]);
    assert_eq!(
        cla.endpoints[0].lb_endpoints[0].health_status,
        HealthStatus::Healthy as i32
    );
    assert_eq!(
        cla.endpoints[1].lb_endpoints[0].health_status,
        HealthStatus::Unhealthy as i32
    );
}

#[test]
fn one_changed_service_is_the_only_one_translated() {
    let c = catalog(CATALOG);
    let mut t = Translator::new(TranslateOptions::default());
    let before = t.translate(&c.current());
    assert_eq!(t.last_translated(), 2);
    c.replace(parse_catalog(Path::new("t.yaml"), &CATALOG.replace("9202", "9203")).unwrap());
    let after = t.translate(&c.current());
    assert_eq!(t.last_translated(), 1);
    let eds = ResourceType::Endpoint.index();
    assert_eq!(
        before[eds]["checkout.shop:8080@old"].version,
        after[eds]["checkout.shop:8080@old"].version
    );
    assert_ne!(
        before[eds]["cart.shop:80@old"].version,
        after[eds]["cart.shop:80@old"].version
    );
    let cds = ResourceType::Cluster.index();
    assert_eq!(
        before[cds]["cart.shop:80@old"].version,
        after[cds]["cart.shop:80@old"].version
    );
}

#[test]
fn same_short_name_in_two_namespaces_gets_no_bare_domain() {
    let text = format!(
        "{CATALOG}{}",
        r#"
  - name: cart
    namespace: prod
    ports: [{name: http, port: 80}]
    backends: {old: {endpoints: ["127.0.0.1:1"]}}
"#
    );
    let maps = Translator::new(TranslateOptions::default()).translate(&catalog(&text).current());
    let rc: RouteConfiguration = decode(&maps[ResourceType::Route.index()]["ferry_http"]);
    let mut all: Vec<&String> = rc.virtual_hosts.iter().flat_map(|v| &v.domains).collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "duplicate domains");
    assert!(!all.iter().any(|d| d.as_str() == "cart"));
}

fn replace(c: &Catalog, text: &str) {
    c.replace(parse_catalog(Path::new("t.yaml"), text).unwrap());
}

fn route(maps: &ResourceMaps) -> Arc<Resource> {
    maps[ResourceType::Route.index()]["ferry_http"].clone()
}

#[test]
fn an_endpoint_change_that_moves_no_weight_keeps_the_route() {
    let c = catalog(CATALOG);
    let mut t = Translator::new(TranslateOptions::default());
    let before = t.translate(&c.current());
    // checkout declares its weights: a new address changes EDS only.
    replace(&c, &CATALOG.replace("9001", "9005"));
    let after = t.translate(&c.current());
    assert_eq!(t.last_translated(), 1);
    assert!(Arc::ptr_eq(&route(&before), &route(&after)));
    let eds = ResourceType::Endpoint.index();
    assert_ne!(
        before[eds]["checkout.shop:8080@old"].version,
        after[eds]["checkout.shop:8080@old"].version
    );
}

#[test]
fn a_readiness_flip_moves_weights_taken_from_ready_endpoints() {
    let c = catalog(CATALOG);
    let mut t = Translator::new(TranslateOptions::default());
    let before = t.translate(&c.current());
    // cart has no declared weights: one fewer ready endpoint in old makes
    // the split 1 to 1.
    replace(
        &c,
        &CATALOG.replace(
            r#""127.0.0.1:9202""#,
            r#"{address: "127.0.0.1:9202", ready: false}"#,
        ),
    );
    let after = t.translate(&c.current());
    assert_ne!(route(&before).version, route(&after).version);
    assert_eq!(
        route_weights(&after, "cart.shop:80"),
        [
            ("cart.shop:80@new".into(), 5000),
            ("cart.shop:80@old".into(), 5000)
        ]
    );
    // The other service's virtual host is carried over as it was.
    assert_eq!(
        vhost(&before, "checkout.shop:8080"),
        vhost(&after, "checkout.shop:8080")
    );
}

#[test]
fn a_removed_service_takes_its_resources_and_virtual_host_along() {
    let c = catalog(CATALOG);
    let mut t = Translator::new(TranslateOptions::default());
    t.translate(&c.current());
    let checkout_only = &CATALOG[..CATALOG.find("  - name: cart").unwrap()];
    replace(&c, checkout_only);
    let after = t.translate(&c.current());
    for kind in [ResourceType::Cluster, ResourceType::Endpoint] {
        let names: Vec<_> = after[kind.index()].keys().cloned().collect();
        assert_eq!(names, ["checkout.shop:8080@new", "checkout.shop:8080@old"]);
    }
    let rc: RouteConfiguration = decode(&route(&after));
    let hosts: Vec<_> = rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(hosts, ["checkout.shop:8080"]);
}

#[test]
fn a_cluster_a_service_loses_leaves_cds_and_eds() {
    let c = catalog(CATALOG);
    let mut t = Translator::new(TranslateOptions::default());
    t.translate(&c.current());
    replace(
        &c,
        &CATALOG.replace("      new: {endpoints: [\"127.0.0.1:9301\"]}\n", ""),
    );
    let after = t.translate(&c.current());
    for kind in [ResourceType::Cluster, ResourceType::Endpoint] {
        assert!(!after[kind.index()].contains_key("cart.shop:80@new"));
        assert!(after[kind.index()].contains_key("cart.shop:80@old"));
        assert!(after[kind.index()].contains_key("checkout.shop:8080@new"));
    }
    assert_eq!(
        route_weights(&after, "cart.shop:80"),
        [("cart.shop:80@old".into(), 10000)]
    );
}

#[test]
fn a_namesake_in_another_namespace_changes_a_cached_virtual_host() {
    let c = catalog(CATALOG);
    let mut t = Translator::new(TranslateOptions::default());
    let before = t.translate(&c.current());
    assert!(
        vhost(&before, "cart.shop:80")
            .domains
            .iter()
            .any(|d| d == "cart")
    );
    let namesake = "  - name: cart\n    namespace: prod\n    ports: [{name: http, port: 80}]\n    backends: {old: {endpoints: [\"127.0.0.1:1\"]}}\n";
    replace(&c, &format!("{CATALOG}{namesake}"));
    let after = t.translate(&c.current());
    assert!(
        !vhost(&after, "cart.shop:80")
            .domains
            .iter()
            .any(|d| d == "cart")
    );
}

#[test]
fn policy_weights_reach_a_cached_route() {
    let c = catalog(CATALOG);
    let mut t = Translator::new(TranslateOptions::default());
    t.translate(&c.current());
    let cart = ServiceName::new("cart", "shop").unwrap();
    let old = ferry_discovery::ClusterName::new("old").unwrap();
    let overrides = WeightOverrides::from([(cart, Weights::all_to(old))]);
    let after = t.translate_with(&c.current(), &overrides);
    assert_eq!(t.last_translated(), 1);
    assert_eq!(
        route_weights(&after, "cart.shop:80"),
        [("cart.shop:80@old".into(), 10000)]
    );
    // Dropping the override goes back to the catalog's split.
    let back = t.translate(&c.current());
    assert_eq!(route_weights(&back, "cart.shop:80").len(), 2);
}

#[test]
fn the_assembled_route_configuration_is_the_whole_message_encoded() {
    let text = format!(
        "{CATALOG}{}",
        "  - name: web\n    namespace: shop\n    ports: [{name: http, port: 80}, {name: admin, port: 9000}]\n    backends: {old: {endpoints: [{address: \"127.0.0.1\", ports: {http: 80, admin: 9000}}]}}\n"
    );
    let maps = Translator::new(TranslateOptions::default()).translate(&catalog(&text).current());
    let assembled = route(&maps);
    let decoded: RouteConfiguration = decode(&assembled);
    assert_eq!(decoded.virtual_hosts.len(), 4);
    let whole = Resource::new("ferry_http".to_owned(), &decoded);
    assert_eq!(assembled.body, whole.body);
    assert_eq!(assembled.version, whole.version);
}

/// The address of a service's encoded virtual hosts in the translator's
/// cache: the same address means the same encoding, not a new one.
fn encoded_hosts_at(t: &Translator, name: &str) -> *const u8 {
    let name = ServiceName::parse(name).unwrap();
    t.cache[&name].output.virtual_hosts.as_bytes().as_ptr()
}

#[test]
fn the_route_configuration_is_encoded_once_per_version_and_shared() {
    let c = catalog(CATALOG);
    let mut t = Translator::new(TranslateOptions::default());
    let before = t.translate(&c.current());
    let routes = route(&before);
    let (sotw, delta) = (routes.sotw_entry().as_ptr(), routes.delta_entry().as_ptr());
    let cart_hosts = encoded_hosts_at(&t, "cart.shop");

    // An EDS-only change (checkout declares its weights): the route
    // configuration, and its entries as every stream sends them, are the
    // bytes encoded for the first version; cart's virtual host was not
    // encoded again.
    replace(&c, &CATALOG.replace("9001", "9005"));
    let after = t.translate(&c.current());
    assert_eq!(t.last_translated(), 1);
    let same = route(&after);
    assert!(Arc::ptr_eq(&routes, &same));
    assert_eq!(same.sotw_entry().as_ptr(), sotw);
    assert_eq!(same.delta_entry().as_ptr(), delta);
    assert_eq!(encoded_hosts_at(&t, "cart.shop"), cart_hosts);

    // A change that moves cart's weights makes a new route configuration,
    // assembled from checkout's virtual host as encoded before.
    let checkout_hosts = encoded_hosts_at(&t, "checkout.shop");
    replace(
        &c,
        &CATALOG.replace("9001", "9005").replace(
            r#""127.0.0.1:9202""#,
            r#"{address: "127.0.0.1:9202", ready: false}"#,
        ),
    );
    let moved = t.translate(&c.current());
    assert_eq!(t.last_translated(), 1);
    let new = route(&moved);
    assert_ne!(new.version, routes.version);
    assert_eq!(encoded_hosts_at(&t, "checkout.shop"), checkout_hosts);
}
