use super::*;
use crate::snapshot::SnapshotCache;
use crate::translate::{TranslateOptions, Translator};
use ferry_discovery::Catalog;
use ferry_discovery::file::parse_catalog;
use ferry_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use ferry_proto::google::rpc::Status as RpcStatus;
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
        self.cache
            .publish(self.translator.translate(&current), &current);
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
