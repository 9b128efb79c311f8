use super::*;
use crate::snapshot::SnapshotCache;
use crate::translate::{TranslateOptions, Translator};
use ferry_discovery::Catalog;
use ferry_discovery::file::parse_catalog;
use ferry_proto::envoy::config::cluster::v3::{Cluster, cluster};
use ferry_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use ferry_proto::envoy::config::listener::v3::Listener;
use ferry_proto::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use ferry_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use ferry_proto::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
use ferry_proto::google::rpc::Status as RpcStatus;
use prost::Message;
use std::path::Path;

const TWO: &str = r#"
services:
  - name: a
    namespace: ns
    ports: [{name: http, port: 80}]
    backends: {old: {endpoints: ["127.0.0.1:1"]}, new: {endpoints: ["127.0.0.1:2"]}}
  - name: b
    namespace: ns
    ports: [{name: http, port: 80}]
    backends: {old: {endpoints: ["127.0.0.1:3"]}}
"#;

struct World {
    catalog: Catalog,
    cache: SnapshotCache,
    translator: Translator,
}

impl World {
    fn new(text: &str) -> Self {
        let mut w = Self {
            catalog: Catalog::new(),
            cache: SnapshotCache::new(),
            translator: Translator::new(TranslateOptions::default()),
        };
        w.set(text);
        w
    }

    fn set(&mut self, text: &str) -> Arc<Snapshot> {
        self.catalog
            .replace(parse_catalog(Path::new("t.yaml"), text).unwrap());
        let current = self.catalog.current();
        let maps = self.translator.translate(&current);
        let grpc = self.translator.grpc_resources();
        self.cache.publish_all(maps, grpc, &current, 0);
        self.cache.current()
    }
}

fn session(variant: Variant) -> Session {
    let status = crate::status::ClientRegistry::default()
        .register(1, variant, None, 1)
        .unwrap();
    Session::new(1, variant, status)
}

fn delta(kind: ResourceType, subscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: kind.type_url().to_owned(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.to_owned(),
        ..Default::default()
    }
}

fn ack_all(s: &mut Session, responses: &[DeltaDiscoveryResponse]) {
    for r in responses {
        let kind = ResourceType::from_type_url(&r.type_url).unwrap();
        s.on_delta_request(&delta(kind, &[], &r.nonce)).unwrap();
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

/// A delta client subscribed like Envoy: wildcard CDS and LDS, named
/// EDS and RDS, everything ACKed.
fn envoy_like(world: &World) -> (Session, Arc<Snapshot>) {
    let snap = world.cache.current();
    let mut s = session(Variant::Delta);
    s.on_delta_request(&delta(ResourceType::Cluster, &[], ""))
        .unwrap();
    s.on_delta_request(&delta(ResourceType::Listener, &[], ""))
        .unwrap();
    let first = s.delta_responses(&snap);
    assert_eq!(first.len(), 2);
    ack_all(&mut s, &first);
    let clusters: Vec<&str> = snap
        .of(ResourceType::Cluster)
        .keys()
        .map(String::as_str)
        .collect();
    s.on_delta_request(&delta(ResourceType::Endpoint, &clusters, ""))
        .unwrap();
    s.on_delta_request(&delta(ResourceType::Route, &["ferry_http"], ""))
        .unwrap();
    let second = s.delta_responses(&snap);
    assert_eq!(second.len(), 2);
    ack_all(&mut s, &second);
    assert!(s.delta_responses(&snap).is_empty());
    (s, snap)
}

#[test]
fn removed_clusters_are_withdrawn_only_after_routes_are_acked() {
    let mut world = World::new(TWO);
    let (mut s, _) = envoy_like(&world);
    let without_b = world.set(&TWO[..TWO.find("  - name: b").unwrap()]);

    let first = s.delta_responses(&without_b);
    let kinds: Vec<_> = first.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(
        kinds,
        [ResourceType::Route.type_url()],
        "only routes move first"
    );

    ack_all(&mut s, &first);
    let second = s.delta_responses(&without_b);
    assert_eq!(second.len(), 2);
    assert_eq!(second[0].type_url, ResourceType::Cluster.type_url());
    assert_eq!(second[0].removed_resources, ["b.ns:80@old"]);
    assert_eq!(second[1].type_url, ResourceType::Endpoint.type_url());
    assert_eq!(second[1].removed_resources, ["b.ns:80@old"]);
}

#[test]
fn a_nack_is_recorded_and_the_rejected_content_not_resent() {
    let mut world = World::new(TWO);
    let (mut s, _) = envoy_like(&world);
    let changed = world.set(&TWO.replace("127.0.0.1:3", "127.0.0.1:4"));
    let update = s.delta_responses(&changed);
    assert_eq!(update.len(), 1);
    assert_eq!(names(&update[0]), ["b.ns:80@old"]);
    let mut nack = delta(ResourceType::Endpoint, &[], &update[0].nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "bad endpoint".into(),
        details: vec![],
    });
    s.on_delta_request(&nack).unwrap();
    assert!(s.delta_responses(&changed).is_empty(), "no resend loop");
    let st = &s.types[ResourceType::Endpoint.index()];
    assert_eq!(st.nacks, 1);
    assert_eq!(st.last_nack.as_ref().unwrap().message, "bad endpoint");

    // The next change goes out again.
    let again = world.set(&TWO.replace("127.0.0.1:3", "127.0.0.1:5"));
    assert_eq!(s.delta_responses(&again).len(), 1);
}

#[test]
fn initial_resource_versions_skip_what_the_client_has() {
    let world = World::new(TWO);
    let snap = world.cache.current();
    let mut s = session(Variant::Delta);
    let mut req = delta(ResourceType::Cluster, &[], "");
    for (name, r) in snap.of(ResourceType::Cluster) {
        req.initial_resource_versions
            .insert(name.clone(), r.version.clone());
    }
    req.initial_resource_versions
        .insert("gone.ns:80@old".into(), "1".into());
    req.initial_resource_versions
        .insert("a.ns:80@old".into(), "stale".into());
    s.on_delta_request(&req).unwrap();
    let out = s.delta_responses(&snap);
    assert_eq!(out.len(), 1);
    assert_eq!(names(&out[0]), ["a.ns:80@old"]);
    assert_eq!(out[0].removed_resources, ["gone.ns:80@old"]);
}

#[test]
fn delta_names_that_do_not_exist_are_answered_as_removed_once() {
    let world = World::new(TWO);
    let snap = world.cache.current();
    let mut s = session(Variant::Delta);
    s.on_delta_request(&delta(
        ResourceType::Endpoint,
        &["a.ns:80@old", "nope.ns:80@x"],
        "",
    ))
    .unwrap();
    let out = s.delta_responses(&snap);
    assert_eq!(names(&out[0]), ["a.ns:80@old"]);
    assert_eq!(out[0].removed_resources, ["nope.ns:80@x"]);
    ack_all(&mut s, &out);
    assert!(s.delta_responses(&snap).is_empty());
}

#[test]
fn sotw_stale_nonce_is_not_an_ack_and_full_state_is_sent() {
    let mut world = World::new(TWO);
    let snap = world.cache.current();
    let mut s = session(Variant::Sotw);
    let req = |nonce: &str, version: &str| DiscoveryRequest {
        type_url: ResourceType::Cluster.type_url().to_owned(),
        response_nonce: nonce.to_owned(),
        version_info: version.to_owned(),
        ..Default::default()
    };
    s.on_sotw_request(&req("", "")).unwrap();
    let out = s.sotw_responses(&snap);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].resources.len(), 3);
    s.on_sotw_request(&req("999", &out[0].version_info))
        .unwrap();
    assert!(
        s.types[ResourceType::Cluster.index()]
            .acked_version
            .is_none(),
        "stale nonce counted as ACK"
    );
    s.on_sotw_request(&req(&out[0].nonce, &out[0].version_info))
        .unwrap();
    assert_eq!(
        s.types[ResourceType::Cluster.index()]
            .acked_version
            .as_deref(),
        Some(out[0].version_info.as_str())
    );

    // A new endpoint only: no CDS push. A new cluster: all clusters again.
    let snap = world.set(&TWO.replace("127.0.0.1:3", "127.0.0.1:9"));
    assert!(s.sotw_responses(&snap).is_empty());
    let snap = world.set(&TWO.replace(
        "{old: {endpoints: [\"127.0.0.1:3\"]}}",
        "{old: {endpoints: [\"127.0.0.1:3\"]}, new: {endpoints: [\"127.0.0.1:4\"]}}",
    ));
    let out = s.sotw_responses(&snap);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].resources.len(), 4);
}

#[test]
fn a_stream_holds_a_bounded_number_of_names() {
    let mut s = session(Variant::Delta).with_limits(Limits {
        max_names: 3,
        ..Limits::default()
    });
    s.on_delta_request(&delta(ResourceType::Endpoint, &["a", "b"], ""))
        .unwrap();
    let refused = s.on_delta_request(&delta(ResourceType::Cluster, &["c", "d"], ""));
    assert_eq!(refused, Err(Refusal::TooManyNames { names: 4, limit: 3 }));
    let mut s = session(Variant::Sotw).with_limits(Limits {
        max_names: 3,
        ..Limits::default()
    });
    let names = ["a", "b", "c"].map(str::to_owned).to_vec();
    let mut req = DiscoveryRequest {
        type_url: ResourceType::Endpoint.type_url().to_owned(),
        resource_names: names,
        ..Default::default()
    };
    // Replacing a subscription counts only the new one.
    s.on_sotw_request(&req).unwrap();
    s.on_sotw_request(&req).unwrap();
    req.resource_names.push("d".to_owned());
    assert!(s.on_sotw_request(&req).is_err());
}

#[test]
fn node_ids_are_bounded() {
    let mut s = session(Variant::Delta);
    let mut req = delta(ResourceType::Cluster, &[], "");
    req.node = Some(ferry_proto::envoy::config::core::v3::Node {
        id: "x".repeat(MAX_NODE_ID_BYTES + 1),
        ..Default::default()
    });
    assert_eq!(
        s.on_delta_request(&req),
        Err(Refusal::NodeIdTooLong {
            len: MAX_NODE_ID_BYTES + 1
        })
    );
}

#[test]
fn a_large_update_goes_as_several_responses_acked_by_the_last() {
    let world = World::new(TWO);
    let snap = world.cache.current();
    let mut s = session(Variant::Delta).with_limits(Limits {
        max_response_bytes: 1,
        ..Limits::default()
    });
    s.on_delta_request(&delta(ResourceType::Cluster, &[], ""))
        .unwrap();
    let parts = s.delta_responses(&snap);
    let clusters = snap.of(ResourceType::Cluster).len();
    assert!(clusters > 1);
    assert_eq!(parts.len(), clusters, "one cluster per response");
    let mut sent: Vec<&str> = parts.iter().flat_map(names).collect();
    sent.sort_unstable();
    let all: Vec<&str> = snap
        .of(ResourceType::Cluster)
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(sent, all, "together they carry the whole update");
    // A NACK of an earlier part counts; its ACK is not the update's.
    let mut nack = delta(ResourceType::Cluster, &[], &parts[0].nonce);
    nack.error_detail = Some(RpcStatus {
        message: "bad cluster".into(),
        ..Default::default()
    });
    s.on_delta_request(&nack).unwrap();
    s.on_delta_request(&delta(ResourceType::Cluster, &[], &parts[1].nonce))
        .unwrap();
    s.publish_status();
    let status = s.status.lock().unwrap().types["cds"].clone();
    assert_eq!(status.nacks, 1);
    assert!(
        status.awaiting_ack,
        "only the last part's ACK ends the wait"
    );
    ack_all(&mut s, &parts[parts.len() - 1..]);
    s.publish_status();
    assert!(!s.status.lock().unwrap().types["cds"].awaiting_ack);
    // Nothing more is due.
    assert!(s.delta_responses(&snap).is_empty());
}

fn grpc_node(agent: &str) -> Option<ferry_proto::envoy::config::core::v3::Node> {
    Some(ferry_proto::envoy::config::core::v3::Node {
        id: "grpc-1".into(),
        user_agent_name: agent.into(),
        ..Default::default()
    })
}

fn sotw(kind: ResourceType, names: &[&str], nonce: &str, version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: kind.type_url().to_owned(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.to_owned(),
        version_info: version.to_owned(),
        ..Default::default()
    }
}

fn sotw_names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| match a.type_url.as_str() {
            t if t == ResourceType::Listener.type_url() => {
                Listener::decode(a.value.as_slice()).unwrap().name
            }
            t if t == ResourceType::Route.type_url() => {
                RouteConfiguration::decode(a.value.as_slice()).unwrap().name
            }
            t if t == ResourceType::Cluster.type_url() => {
                Cluster::decode(a.value.as_slice()).unwrap().name
            }
            _ => {
                ClusterLoadAssignment::decode(a.value.as_slice())
                    .unwrap()
                    .cluster_name
            }
        })
        .collect()
}

/// A gRPC client's SotW stream as grpcio runs it: LDS by the target's
/// name, then RDS, CDS and EDS by the names each response gives, each
/// response ACKed. Returns every response, in order.
fn grpc_sotw_resolves(
    s: &mut Session,
    snap: &Arc<Snapshot>,
    target: &str,
) -> Vec<DiscoveryResponse> {
    let mut all = Vec::new();
    let mut req = sotw(ResourceType::Listener, &[target], "", "");
    req.node = grpc_node("gRPC C-core linux Python");
    s.on_sotw_request(&req).unwrap();
    let steps = [
        (ResourceType::Listener, ResourceType::Route),
        (ResourceType::Route, ResourceType::Cluster),
        (ResourceType::Cluster, ResourceType::Endpoint),
    ];
    for (kind, next) in steps {
        let out = s.sotw_responses(snap);
        assert_eq!(out.len(), 1, "one {kind} response");
        let r = &out[0];
        assert_eq!(r.type_url, kind.type_url());
        let names: Vec<String> = match kind {
            ResourceType::Listener => vec![route_name_of(r)],
            ResourceType::Route => clusters_of(r),
            _ => sotw_names(r),
        };
        let held: Vec<String> = s.types[kind.index()].sub.names.iter().cloned().collect();
        let held: Vec<&str> = held.iter().map(String::as_str).collect();
        s.on_sotw_request(&sotw(kind, &held, &r.nonce, &r.version_info))
            .unwrap();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        s.on_sotw_request(&sotw(next, &names, "", "")).unwrap();
        all.extend(out);
    }
    let out = s.sotw_responses(snap);
    assert_eq!(out.len(), 1);
    let r = &out[0];
    let held: Vec<String> = s.types[ResourceType::Endpoint.index()]
        .sub
        .names
        .iter()
        .cloned()
        .collect();
    let held: Vec<&str> = held.iter().map(String::as_str).collect();
    s.on_sotw_request(&sotw(
        ResourceType::Endpoint,
        &held,
        &r.nonce,
        &r.version_info,
    ))
    .unwrap();
    all.extend(out);
    assert!(s.sotw_responses(snap).is_empty(), "all acknowledged");
    all
}

fn route_name_of(r: &DiscoveryResponse) -> String {
    let l = Listener::decode(r.resources[0].value.as_slice()).unwrap();
    let api = l.api_listener.unwrap().api_listener.unwrap();
    let hcm = HttpConnectionManager::decode(api.value.as_slice()).unwrap();
    match hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => rds.route_config_name,
        other => panic!("{other:?}"),
    }
}

fn clusters_of(r: &DiscoveryResponse) -> Vec<String> {
    let rc = RouteConfiguration::decode(r.resources[0].value.as_slice()).unwrap();
    let Some(route::Action::Route(a)) = &rc.virtual_hosts[0].routes[0].action else {
        panic!()
    };
    let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) = &a.cluster_specifier else {
        panic!()
    };
    wc.clusters.iter().map(|c| c.name.clone()).collect()
}

#[test]
fn a_grpc_client_resolves_its_target_over_sotw() {
    let world = World::new(TWO);
    let snap = world.cache.current();
    let mut s = session(Variant::Sotw);
    let all = grpc_sotw_resolves(&mut s, &snap, "a.ns:80");
    assert_eq!(s.client_kind(), ClientKind::Grpc);
    let got: Vec<Vec<String>> = all.iter().map(sotw_names).collect();
    assert_eq!(
        got,
        [
            vec!["a.ns:80".to_owned()],
            vec!["a.ns:80".to_owned()],
            vec!["a.ns:80@new".to_owned(), "a.ns:80@old".to_owned()],
            vec!["a.ns:80@new".to_owned(), "a.ns:80@old".to_owned()],
        ]
    );
    // What it got is the gRPC view, not the proxies' resources.
    for r in &all {
        for (a, name) in r.resources.iter().zip(sotw_names(r)) {
            let kind = ResourceType::from_type_url(&r.type_url).unwrap();
            let served = &snap.served(ClientKind::Grpc, kind)[&name];
            assert_eq!(a, &served.body, "{kind} {name}");
        }
    }
    let c = Cluster::decode(all[2].resources[0].value.as_slice()).unwrap();
    assert_eq!(c.lb_policy, cluster::LbPolicy::RoundRobin as i32);
    s.publish_status();
    assert_eq!(s.status.lock().unwrap().client, ClientKind::Grpc);
}

#[test]
fn a_grpc_client_gets_the_same_resources_over_delta() {
    let world = World::new(TWO);
    let snap = world.cache.current();
    let mut s = session(Variant::Delta);
    let mut req = delta(
        ResourceType::Listener,
        &["a.ns:80", "a.ns.svc.cluster.local:80"],
        "",
    );
    req.node = grpc_node("gRPC Go");
    s.on_delta_request(&req).unwrap();
    s.on_delta_request(&delta(ResourceType::Route, &["a.ns:80"], ""))
        .unwrap();
    s.on_delta_request(&delta(
        ResourceType::Cluster,
        &["a.ns:80@old", "a.ns:80@new"],
        "",
    ))
    .unwrap();
    s.on_delta_request(&delta(
        ResourceType::Endpoint,
        &["a.ns:80@old", "a.ns:80@new"],
        "",
    ))
    .unwrap();
    let out = s.delta_responses(&snap);
    let kinds: Vec<&str> = out.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(
        kinds,
        [
            ResourceType::Cluster,
            ResourceType::Endpoint,
            ResourceType::Listener,
            ResourceType::Route
        ]
        .map(|k| k.type_url()),
        "make before break: CDS, EDS, LDS, RDS"
    );
    for r in &out {
        let kind = ResourceType::from_type_url(&r.type_url).unwrap();
        assert!(r.removed_resources.is_empty());
        for res in &r.resources {
            let served = &snap.served(ClientKind::Grpc, kind)[&res.name];
            assert_eq!(res.version, served.version, "{kind} {}", res.name);
            assert_eq!(res.resource.as_ref(), Some(&served.body));
        }
    }
    assert_eq!(names(&out[2]), ["a.ns.svc.cluster.local:80", "a.ns:80"]);
    // And SotW serves the very same content.
    let mut sotw_s = session(Variant::Sotw);
    let sotw_all = grpc_sotw_resolves(&mut sotw_s, &snap, "a.ns:80");
    let sotw_listener = &sotw_all[0].resources[0];
    let delta_listener = out[2]
        .resources
        .iter()
        .find(|r| r.name == "a.ns:80")
        .and_then(|r| r.resource.as_ref())
        .unwrap();
    assert_eq!(sotw_listener, delta_listener);
}

#[test]
fn a_client_naming_no_user_agent_is_told_by_what_it_subscribes_to() {
    let world = World::new(TWO);
    let snap = world.cache.current();
    // A named LDS subscription first: a gRPC client.
    let mut s = session(Variant::Sotw);
    s.on_sotw_request(&sotw(ResourceType::Listener, &["b.ns:80"], "", ""))
        .unwrap();
    let out = s.sotw_responses(&snap);
    assert_eq!(s.client_kind(), ClientKind::Grpc);
    assert_eq!(sotw_names(&out[0]), ["b.ns:80"]);
    // A wildcard one: a proxy, which gets the HTTP listener.
    let mut s = session(Variant::Sotw);
    s.on_sotw_request(&sotw(ResourceType::Listener, &[], "", ""))
        .unwrap();
    let out = s.sotw_responses(&snap);
    assert_eq!(s.client_kind(), ClientKind::Proxy);
    assert_eq!(sotw_names(&out[0]), ["ferry_http"]);
    // Envoy that names itself stays a proxy whatever it asks for: a
    // gRPC target's name is no listener of its.
    let mut s = session(Variant::Delta);
    let mut req = delta(ResourceType::Listener, &["b.ns:80"], "");
    req.node = grpc_node("envoy");
    s.on_delta_request(&req).unwrap();
    let out = s.delta_responses(&snap);
    assert_eq!(s.client_kind(), ClientKind::Proxy);
    assert!(out[0].resources.is_empty());
    assert_eq!(out[0].removed_resources, ["b.ns:80"]);
}

#[test]
fn a_proxy_is_served_what_it_was_before_grpc_resources_existed() {
    // The same client against a snapshot with and without a gRPC view
    // receives the same bytes.
    let world = World::new(TWO);
    let with = world.cache.current();
    let without = {
        let cache = SnapshotCache::new();
        let mut t = Translator::new(TranslateOptions::default());
        let current = world.catalog.current();
        cache.publish(t.translate(&current), &current);
        cache.current()
    };
    assert!(!with.grpc.resources[ResourceType::Listener.index()].is_empty());
    assert!(without.grpc.resources[ResourceType::Listener.index()].is_empty());
    for variant in [Variant::Sotw, Variant::Delta] {
        let run = |snap: &Arc<Snapshot>| {
            let mut s = session(variant);
            let mut out = Vec::new();
            for kind in ResourceType::ALL {
                match variant {
                    Variant::Sotw => {
                        let names: &[&str] = match kind {
                            ResourceType::Route => &["ferry_http"],
                            ResourceType::Endpoint => &["a.ns:80@old", "b.ns:80@old"],
                            _ => &[],
                        };
                        let mut req = sotw(kind, names, "", "");
                        req.node = grpc_node("envoy");
                        s.on_sotw_request(&req).unwrap();
                        out.extend(s.sotw_replies(snap).into_iter().map(|r| {
                            let m = r.to_message();
                            (m.resources, m.version_info)
                        }));
                    }
                    Variant::Delta => {
                        let mut req = delta(kind, &[], "");
                        req.node = grpc_node("ferry-proxy");
                        s.on_delta_request(&req).unwrap();
                        out.extend(s.delta_replies(snap).into_iter().map(|r| {
                            let m = r.to_message();
                            (
                                m.resources.into_iter().filter_map(|r| r.resource).collect(),
                                m.system_version_info,
                            )
                        }));
                    }
                }
            }
            out
        };
        assert_eq!(run(&with), run(&without), "{variant:?}");
    }
}

#[test]
fn a_grpc_client_holds_the_routes_of_changes_to_other_services() {
    let mut world = World::new(TWO);
    let registry = crate::status::ClientRegistry::default();
    let status = registry.register(1, Variant::Sotw, None, 10).unwrap();
    let mut s = Session::new(1, Variant::Sotw, status);
    let snap = world.cache.current();
    grpc_sotw_resolves(&mut s, &snap, "a.ns:80");
    // Service b gains a host: the proxies' route configuration and b's
    // gRPC routes change, a's do not.
    let b_host = TWO.replace(
        "  - name: b\n    namespace: ns\n",
        "  - name: b\n    namespace: ns\n    hosts: [b.example.com]\n",
    );
    let next = world.set(&b_host);
    let route = ResourceType::Route;
    assert_eq!(next.last_changed_for(ClientKind::Grpc, route), next.version);
    assert_eq!(
        next.last_changed_for(ClientKind::Proxy, route),
        next.version
    );
    assert!(
        s.sotw_responses(&next).is_empty(),
        "nothing for this client"
    );
    let wanted = |client| next.last_changed_for(client, route);
    assert_eq!(registry.ack_share("rds", wanted), (1, 1), "it holds them");
    // A change to a's split is one it must acknowledge first.
    let a_split = b_host.replace(
        "backends: {old: {endpoints: [\"127.0.0.1:1\"]}, new: {endpoints: [\"127.0.0.1:2\"]}}",
        "backends: {old: {endpoints: [\"127.0.0.1:1\"]}, new: {endpoints: [\"127.0.0.1:2\"]}}\n    weights: {old: 1000, new: 9000}",
    );
    let last = world.set(&a_split);
    let out = s.sotw_responses(&last);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].type_url, route.type_url());
    let wanted = |client| last.last_changed_for(client, route);
    assert_eq!(registry.ack_share("rds", wanted), (0, 1));
    s.on_sotw_request(&sotw(
        route,
        &["a.ns:80"],
        &out[0].nonce,
        &out[0].version_info,
    ))
    .unwrap();
    assert!(s.sotw_responses(&last).is_empty());
    assert_eq!(registry.ack_share("rds", wanted), (1, 1));
}
