//! Drives the workload side of `ferry-testkube` with the real kube-rs
//! client: Deployments and StatefulSets with the simulated controller's
//! status, the `scale` subresource (`get_scale`, `patch_scale`,
//! `replace_scale`) and its RBAC, an available-replicas limit holding a
//! rollout back, the server-side metadata a copy must strip (uid,
//! generation, managedFields, a Service's cluster IP), ConfigMaps,
//! HorizontalPodAutoscalers and PodDisruptionBudgets, and label-selected
//! lists of every kind.

use std::collections::BTreeSet;
use std::time::Duration;

mod common;

use common::{api_error, eventually};
use ferry_testkube::{ResourceKind, TestKube};
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::discovery::{Discovery, Scope};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

const TOKEN: &str = "workloads-token";
const SCALER: &str = "system:serviceaccount:ferry-system:scaler";

fn ferry() -> PatchParams {
    PatchParams::apply("ferry")
}

fn deployment(name: &str, replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"app": name, "ferry.io/migration": "mig-1"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.example/web:1"}]},
            },
        },
    })
}

/// `(replicas, updated, ready, available, observedGeneration)` of a
/// Deployment's status, absent counts as 0.
fn rollout(d: &Deployment) -> (i32, i32, i32, i32, i64) {
    let s = d.status.clone().unwrap_or_default();
    (
        s.replicas.unwrap_or(0),
        s.updated_replicas.unwrap_or(0),
        s.ready_replicas.unwrap_or(0),
        s.available_replicas.unwrap_or(0),
        s.observed_generation.unwrap_or(0),
    )
}

/// The `(manager, operation, subresource)` of each managedFields entry,
/// checking every entry is a plausible `FieldsV1` one.
fn managers<K: kube::Resource>(object: &K) -> BTreeSet<(String, String, Option<String>)> {
    let entries = object.meta().managed_fields.clone().unwrap_or_default();
    entries
        .into_iter()
        .map(|e| {
            assert_eq!(e.fields_type.as_deref(), Some("FieldsV1"), "{e:?}");
            assert!(e.time.is_some() && e.fields_v1.is_some(), "{e:?}");
            assert!(e.api_version.is_some(), "{e:?}");
            (
                e.manager.unwrap_or_default(),
                e.operation.unwrap_or_default(),
                e.subresource,
            )
        })
        .collect()
}

fn entry(manager: &str, operation: &str, sub: Option<&str>) -> (String, String, Option<String>) {
    (manager.into(), operation.into(), sub.map(str::to_owned))
}

/// The next event of a watch stream, within 10 s.
async fn next_event<K: std::fmt::Debug>(
    stream: &mut (impl Stream<Item = kube::Result<WatchEvent<K>>> + Unpin),
) -> WatchEvent<K> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch goes on")
        .expect("a watch event, not an error")
}

#[tokio::test]
async fn an_applied_deployment_becomes_available_and_scales() {
    let kube = TestKube::start(TOKEN).await;
    let api = Api::<Deployment>::namespaced(kube.client().await, "shop");
    let applied = api
        .patch("web", &ferry(), &Patch::Apply(deployment("web", 3)))
        .await
        .unwrap();
    assert!(applied.uid().is_some());
    assert!(applied.creation_timestamp().is_some());
    assert_eq!(applied.meta().generation, Some(1));
    // The controller writes the status right after the apply.
    let web = eventually("the Deployment becomes available", 10, || async {
        let web = api.get("web").await.ok()?;
        (rollout(&web) == (3, 3, 3, 3, 1)).then_some(web)
    })
    .await;
    assert_eq!(
        managers(&web),
        BTreeSet::from([
            entry("ferry", "Apply", None),
            entry("kube-controller-manager", "Update", Some("status")),
        ])
    );

    let scale = api.get_scale("web").await.unwrap();
    assert_eq!(scale.metadata.name.as_deref(), Some("web"));
    assert_eq!(scale.spec.as_ref().unwrap().replicas, Some(3));
    let status = scale.status.unwrap();
    assert_eq!(
        (status.replicas, status.selector.as_deref()),
        (3, Some("app=web"))
    );

    // Scale to zero with a merge patch of the subresource.
    let zero = json!({"spec": {"replicas": 0}});
    let scaled = api
        .patch_scale("web", &PatchParams::default(), &Patch::Merge(&zero))
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, None, "0 is left out");
    let web = eventually("the Deployment scales to zero", 10, || async {
        let web = api.get("web").await.ok()?;
        (rollout(&web) == (0, 0, 0, 0, 2)).then_some(web)
    })
    .await;
    assert_eq!(web.spec.replicas, Some(0));
    assert_eq!(web.meta().generation, Some(2));
    assert!(
        managers(&web)
            .iter()
            .any(|(_, op, sub)| op == "Update" && sub.as_deref() == Some("scale")),
        "{web:?}"
    );

    // Replace the Scale; a stale one conflicts.
    let mut two = api.get_scale("web").await.unwrap();
    two.spec.as_mut().unwrap().replicas = Some(2);
    api.replace_scale("web", &PostParams::default(), &two)
        .await
        .unwrap();
    let err = api
        .replace_scale("web", &PostParams::default(), &two)
        .await
        .unwrap_err();
    api_error(err, 409, "Conflict");
    eventually("the Deployment scales to two", 10, || async {
        let web = api.get("web").await.ok()?;
        (rollout(&web) == (2, 2, 2, 2, 3)).then_some(())
    })
    .await;

    // Server-side apply of the Scale, then a negative count.
    let four = json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                      "metadata": {"name": "web", "namespace": "shop"},
                      "spec": {"replicas": 4}});
    let scaled: Scale = api
        .patch_scale("web", &ferry(), &Patch::Apply(&four))
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(4));
    let web = api.get("web").await.unwrap();
    assert_eq!(rollout(&web), (4, 4, 4, 4, 4));
    assert!(managers(&web).contains(&entry("ferry", "Apply", Some("scale"))));
    let negative = json!({"spec": {"replicas": -1}});
    let err = api
        .patch_scale("web", &PatchParams::default(), &Patch::Merge(&negative))
        .await
        .unwrap_err();
    api_error(err, 422, "Invalid");
    let err = api.get_scale("db").await.unwrap_err();
    let status = api_error(err, 404, "NotFound");
    assert_eq!(status.message, "deployments.apps \"db\" not found");

    // A spec change bumps the generation, a label does not; a client
    // cannot write the status.
    let mut relabelled = deployment("web", 4);
    relabelled["metadata"]["labels"]["tier"] = "front".into();
    relabelled["status"] = json!({"availableReplicas": 99});
    let web = api
        .patch("web", &ferry(), &Patch::Apply(&relabelled))
        .await
        .unwrap();
    assert_eq!(web.meta().generation, Some(4));
    assert_eq!(rollout(&web).3, 4);
    assert_eq!(
        kube.get(ResourceKind::Deployment, "shop", "web").unwrap()["metadata"]["generation"],
        4
    );
    assert!(kube.access().contains(&(
        "patch".to_owned(),
        "apps".to_owned(),
        "deployments/scale".to_owned()
    )));
}

#[tokio::test]
async fn an_available_limit_holds_a_rollout_back_until_lifted() {
    let kube = TestKube::start(TOKEN).await;
    let api = Api::<Deployment>::namespaced(kube.client().await, "shop");
    // The limit is set before the Deployment exists.
    kube.set_available_limit("shop", "web", Some(1));
    let wp = WatchParams::default().fields("metadata.name=web");
    let mut events = api.watch(&wp, "0").await.unwrap().boxed();
    let typed: Deployment = serde_json::from_value(deployment("web", 3)).unwrap();
    api.create(&PostParams::default(), &typed).await.unwrap();
    match next_event(&mut events).await {
        WatchEvent::Added(d) => assert_eq!(rollout(&d), (0, 0, 0, 0, 0)),
        other => panic!("expected ADDED, got {other:?}"),
    }
    match next_event(&mut events).await {
        WatchEvent::Modified(d) => assert_eq!(rollout(&d), (3, 3, 1, 1, 1)),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    let held = api.get("web").await.unwrap();
    assert_eq!(rollout(&held), (3, 3, 1, 1, 1));
    assert_eq!(held.status.unwrap().unavailable_replicas, Some(2));

    // A scale-up is held back too; then the limit is lifted.
    let five = json!({"spec": {"replicas": 5}});
    api.patch_scale("web", &PatchParams::default(), &Patch::Merge(&five))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.last() != Some(&(5, 5, 1, 1, 2)) {
        match next_event(&mut events).await {
            WatchEvent::Modified(d) => seen.push(rollout(&d)),
            other => panic!("expected MODIFIED, got {other:?}"),
        }
    }
    assert_eq!(seen, [(3, 3, 1, 1, 1), (5, 5, 1, 1, 2)]);
    kube.set_available_limit("shop", "web", Some(4));
    match next_event(&mut events).await {
        WatchEvent::Modified(d) => assert_eq!(rollout(&d), (5, 5, 4, 4, 2)),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    kube.set_available_limit("shop", "web", None);
    match next_event(&mut events).await {
        WatchEvent::Modified(d) => {
            assert_eq!(rollout(&d), (5, 5, 5, 5, 2));
            assert_eq!(d.status.unwrap().unavailable_replicas, None);
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    // Lifting it again changes nothing.
    let rv = kube.resource_version();
    kube.set_available_limit("shop", "web", None);
    assert_eq!(kube.resource_version(), rv);
}

#[tokio::test]
async fn a_stateful_set_becomes_available_and_scales() {
    let kube = TestKube::start(TOKEN).await;
    let api = Api::<StatefulSet>::namespaced(kube.client().await, "shop");
    let mut object = deployment("db", 2);
    object["kind"] = "StatefulSet".into();
    object["spec"]["serviceName"] = "db".into();
    kube.set_available_limit("shop", "db", Some(0));
    let applied = api
        .patch("db", &ferry(), &Patch::Apply(&object))
        .await
        .unwrap();
    assert!(applied.uid().is_some());
    assert_eq!(applied.meta().generation, Some(1));
    let status = |s: &StatefulSet| {
        let st = s.status.clone().unwrap_or_default();
        (
            st.replicas,
            st.ready_replicas.unwrap_or(0),
            st.available_replicas.unwrap_or(0),
            st.observed_generation.unwrap_or(0),
        )
    };
    let db = eventually("the controller reports the StatefulSet", 10, || async {
        let db = api.get("db").await.ok()?;
        (status(&db) == (2, 0, 0, 1)).then_some(db)
    })
    .await;
    assert_eq!(
        db.status.unwrap().available_replicas,
        Some(0),
        "not left out"
    );
    kube.set_available_limit("shop", "db", None);
    eventually("the StatefulSet becomes available", 10, || async {
        let db = api.get("db").await.ok()?;
        (status(&db) == (2, 2, 2, 1)).then_some(())
    })
    .await;
    let scale = api.get_scale("db").await.unwrap();
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=db"));
    let zero = json!({"spec": {"replicas": 0}});
    api.patch_scale("db", &PatchParams::default(), &Patch::Merge(&zero))
        .await
        .unwrap();
    let db = api.get("db").await.unwrap();
    assert_eq!(status(&db), (0, 0, 0, 2));
    assert_eq!(db.spec.replicas, Some(0));
    // Deleting the Namespace deletes the workloads in it.
    kube.apply(
        ResourceKind::Namespace,
        json!({"metadata": {"name": "shop"}}),
    )
    .unwrap();
    kube.apply_deployment("shop", "web", &[("app", "web")], 1);
    Api::<Namespace>::all(kube.client().await)
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(kube.count(ResourceKind::StatefulSet), 0);
    assert_eq!(kube.count(ResourceKind::Deployment), 0);
}

#[tokio::test]
async fn copies_carry_server_metadata_and_services_get_their_own_cluster_ip() {
    let source = TestKube::start(TOKEN).await;
    let target = TestKube::start(TOKEN).await;
    let src = source.client().await;
    let dst = target.client().await;
    // A Service without a cluster IP gets one, on each cluster its own.
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
    });
    let on_source = Api::<Service>::namespaced(src.clone(), "shop")
        .patch("web", &ferry(), &Patch::Apply(&service))
        .await
        .unwrap();
    let on_target = Api::<Service>::namespaced(dst.clone(), "shop")
        .patch("web", &ferry(), &Patch::Apply(&service))
        .await
        .unwrap();
    let ip = |s: &Service| s.spec.as_ref().unwrap().cluster_ip.clone().unwrap();
    assert!(ip(&on_source).starts_with("10."), "{on_source:?}");
    assert_ne!(ip(&on_source), ip(&on_target));
    assert_eq!(
        on_source.spec.as_ref().unwrap().cluster_ips,
        Some(vec![ip(&on_source)])
    );
    assert_ne!(on_source.uid(), on_target.uid());
    // Applying again without one keeps it.
    let again = Api::<Service>::namespaced(dst.clone(), "shop")
        .patch("web", &ferry(), &Patch::Apply(&service))
        .await
        .unwrap();
    assert_eq!(ip(&again), ip(&on_target));
    assert_eq!(
        managers(&again),
        BTreeSet::from([entry("ferry", "Apply", None)])
    );

    // A Deployment read from the source carries what a copy must strip.
    source.apply_deployment("shop", "web", &[("app", "web")], 2);
    let read = Api::<Deployment>::namespaced(src, "shop")
        .get("web")
        .await
        .unwrap();
    assert!(read.uid().is_some() && read.resource_version().is_some());
    assert!(read.creation_timestamp().is_some() && read.meta().generation.is_some());
    assert!(read.status.is_some());
    assert_eq!(
        managers(&read),
        BTreeSet::from([
            entry("testkube", "Update", None),
            entry("kube-controller-manager", "Update", Some("status")),
        ])
    );
    let copies = Api::<Deployment>::namespaced(dst, "shop");
    let mut stripped = read.clone();
    stripped.metadata.uid = None;
    stripped.metadata.resource_version = None;
    stripped.metadata.creation_timestamp = None;
    stripped.metadata.generation = None;
    stripped.metadata.managed_fields = None;
    stripped.status = None;
    let copied = copies
        .patch("web", &ferry(), &Patch::Apply(&stripped))
        .await
        .unwrap();
    assert_ne!(copied.uid(), read.uid());
    let copied = copies.get("web").await.unwrap();
    assert_eq!(copied.meta().generation, Some(1));
    assert_eq!(
        managers(&copied),
        BTreeSet::from([
            entry("ferry", "Apply", None),
            entry("kube-controller-manager", "Update", Some("status")),
        ])
    );
    // An apply carrying a resourceVersion has it as a precondition.
    let mut stale = stripped.clone();
    stale.metadata.resource_version = Some("1".into());
    let err = copies
        .patch("web", &ferry(), &Patch::Apply(&stale))
        .await
        .unwrap_err();
    api_error(err, 409, "Conflict");
}

#[tokio::test]
async fn config_maps_hpas_and_pdbs_round_trip() {
    let kube = TestKube::start(TOKEN).await;
    let client = kube.client().await;
    let labels = json!({"ferry.io/migration": "mig-1"});

    let maps = Api::<ConfigMap>::namespaced(client.clone(), "shop");
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "web-config", "labels": labels},
                    "data": {"mode": "fast"}});
    let created = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(cm.clone()).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(created.meta().generation, None, "ConfigMaps have none");
    let mut changed = cm.clone();
    changed["data"]["mode"] = "safe".into();
    let applied = maps
        .patch("web-config", &ferry(), &Patch::Apply(&changed))
        .await
        .unwrap();
    assert_eq!(applied.data.unwrap()["mode"], "safe");
    let merged = maps
        .patch(
            "web-config",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"extra": "1"}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.data.as_ref().unwrap().len(), 2);
    maps.replace("web-config", &PostParams::default(), &merged)
        .await
        .unwrap();

    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), "shop");
    let hpa = json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "web", "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "minReplicas": 2, "maxReplicas": 10,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 70}}}],
        },
    });
    let applied = hpas
        .patch("web", &ferry(), &Patch::Apply(&hpa))
        .await
        .unwrap();
    assert_eq!(applied.meta().generation, Some(1));
    assert_eq!(applied.spec.max_replicas, 10);
    let bigger = hpas
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maxReplicas": 20}})),
        )
        .await
        .unwrap();
    assert_eq!(bigger.meta().generation, Some(2));
    assert_eq!(bigger.spec.max_replicas, 20);

    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), "shop");
    let pdb = json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "web", "labels": labels},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}},
    });
    let applied = pdbs
        .patch("web", &ferry(), &Patch::Apply(&pdb))
        .await
        .unwrap();
    assert_eq!(applied.meta().generation, Some(1));
    let got = pdbs.get("web").await.unwrap();
    assert_eq!(
        got.spec.unwrap().min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );

    // Label-selected lists, then deletes.
    let lp = ListParams::default().labels("ferry.io/migration=mig-1");
    assert_eq!(maps.list(&lp).await.unwrap().items.len(), 1);
    assert_eq!(hpas.list(&lp).await.unwrap().items.len(), 1);
    assert_eq!(pdbs.list(&lp).await.unwrap().items.len(), 1);
    let dp = DeleteParams::default();
    maps.delete("web-config", &dp).await.unwrap();
    hpas.delete("web", &dp).await.unwrap();
    pdbs.delete("web", &dp).await.unwrap();
    api_error(pdbs.get("web").await.unwrap_err(), 404, "NotFound");
    for kind in [
        ResourceKind::ConfigMap,
        ResourceKind::HorizontalPodAutoscaler,
        ResourceKind::PodDisruptionBudget,
    ] {
        assert_eq!(kube.count(kind), 0, "{kind:?}");
    }
}

/// The `ApiResource` of a kind, for `Api<DynamicObject>`.
fn api_resource(kind: ResourceKind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(kind.group(), kind.version(), kind.kind()),
        kind.plural(),
    )
}

#[tokio::test]
async fn every_kind_lists_by_the_migration_label() {
    let kube = TestKube::start(TOKEN).await;
    let client = kube.client().await;
    for kind in ResourceKind::ALL {
        let ns = if kind.namespaced() { "shop" } else { "" };
        for (name, labels) in [
            ("mine", json!({"ferry.io/migration": "mig-1"})),
            ("other", json!({"ferry.io/migration": "mig-2"})),
            ("theirs", json!({})),
        ] {
            let object = json!({"metadata": {"name": format!("{}-{name}", kind.short()),
                                             "namespace": ns, "labels": labels}});
            kube.apply(kind, object).unwrap();
        }
        let resource = api_resource(kind);
        let api: Api<DynamicObject> = if kind.namespaced() {
            Api::namespaced_with(client.clone(), ns, &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        };
        let lp = ListParams::default().labels("ferry.io/migration=mig-1");
        let names: Vec<String> = api
            .list(&lp)
            .await
            .unwrap()
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect();
        assert_eq!(names, [format!("{}-mine", kind.short())], "{kind:?}");
    }
}

#[tokio::test]
async fn discovery_lists_the_workload_kinds_and_their_scale() {
    let kube = TestKube::start(TOKEN).await;
    let discovery = Discovery::new(kube.client().await).run().await.unwrap();
    for (group, version, kind, plural) in [
        ("apps", "v1", "Deployment", "deployments"),
        ("apps", "v1", "StatefulSet", "statefulsets"),
        ("", "v1", "ConfigMap", "configmaps"),
        (
            "autoscaling",
            "v2",
            "HorizontalPodAutoscaler",
            "horizontalpodautoscalers",
        ),
        (
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
        ),
    ] {
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = discovery
            .resolve_gvk(&gvk)
            .unwrap_or_else(|| panic!("{kind} not discovered"));
        assert_eq!(resource.plural, plural);
        assert_eq!(caps.scope, Scope::Namespaced, "{kind}");
        assert!(caps.supports_operation(kube::discovery::verbs::PATCH));
        let scale = caps.subresources.iter().any(|(r, _)| r.plural == "scale");
        assert_eq!(
            scale,
            kind == "Deployment" || kind == "StatefulSet",
            "{kind}"
        );
    }
}

#[tokio::test]
async fn a_token_granted_deployments_scale_can_scale_but_not_update() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_deployment("shop", "web", &[("app", "web")], 3);
    for (kind, object) in [
        (
            ResourceKind::ServiceAccount,
            json!({"metadata": {"name": "scaler", "namespace": "ferry-system"}}),
        ),
        (
            ResourceKind::Secret,
            json!({"metadata": {"name": "scaler-token", "namespace": "ferry-system",
                   "annotations": {"kubernetes.io/service-account.name": "scaler"}},
                   "type": "kubernetes.io/service-account-token"}),
        ),
        (
            ResourceKind::ClusterRole,
            json!({"metadata": {"name": "scaler"}, "rules": [
                {"apiGroups": ["apps"], "resources": ["deployments/scale"],
                 "verbs": ["get", "patch"]},
            ]}),
        ),
        (
            ResourceKind::ClusterRoleBinding,
            json!({"metadata": {"name": "scaler"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                               "kind": "ClusterRole", "name": "scaler"},
                   "subjects": [{"kind": "ServiceAccount", "name": "scaler",
                                 "namespace": "ferry-system"}]}),
        ),
    ] {
        kube.apply(kind, object).unwrap();
    }
    let token = kube.token_for("ferry-system", "scaler").unwrap();
    let api = Api::<Deployment>::namespaced(kube.client_with_token(&token).await, "shop");

    assert_eq!(
        api.get_scale("web").await.unwrap().status.unwrap().replicas,
        3
    );
    let zero = json!({"spec": {"replicas": 0}});
    api.patch_scale("web", &PatchParams::default(), &Patch::Merge(&zero))
        .await
        .unwrap();
    let stored = kube.get(ResourceKind::Deployment, "shop", "web").unwrap();
    assert_eq!(stored["spec"]["replicas"], 0);
    assert_eq!(stored["status"], json!({"observedGeneration": 2}));

    // The Deployment itself is out of reach.
    let patch = json!({"spec": {"replicas": 2}});
    let err = api
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_err();
    let status = api_error(err, 403, "Forbidden");
    assert_eq!(
        status.message,
        format!(
            "deployments.apps \"web\" is forbidden: User \"{SCALER}\" cannot patch resource \"deployments\" in API group \"apps\" in the namespace \"shop\""
        )
    );
    api_error(api.get("web").await.unwrap_err(), 403, "Forbidden");
    // Replacing the Scale is `update`, which the role does not grant.
    let scale = kube.get(ResourceKind::Deployment, "shop", "web").unwrap();
    let put = Scale {
        metadata: kube::api::ObjectMeta {
            name: Some("web".into()),
            resource_version: scale["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::autoscaling::v1::ScaleSpec { replicas: Some(1) }),
        status: None,
    };
    let err = api
        .replace_scale("web", &PostParams::default(), &put)
        .await
        .unwrap_err();
    let status = api_error(err, 403, "Forbidden");
    assert!(
        status
            .message
            .contains("cannot update resource \"deployments/scale\" in API group \"apps\""),
        "{status:?}"
    );
    assert_eq!(
        kube.access_by(SCALER),
        BTreeSet::from([
            (
                "get".to_owned(),
                "apps".to_owned(),
                "deployments/scale".to_owned()
            ),
            (
                "patch".to_owned(),
                "apps".to_owned(),
                "deployments/scale".to_owned()
            ),
        ])
    );
}
