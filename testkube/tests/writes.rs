//! Drives the write side of `ferry-testkube` with the real kube-rs client:
//! create/get/apply/merge-patch/replace/delete of Namespaces,
//! ServiceAccounts, Secrets, ClusterRoles, ClusterRoleBindings, Roles and
//! RoleBindings with the API server's error codes, the service-account
//! token controller and RBAC for its tokens (cluster-wide and per
//! namespace), watches of labelled Secrets, injected refusals, namespace
//! deletion and API discovery of the new kinds.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::time::Duration;

mod common;

use common::{api_error, eventually};
use ferry_testkube::{ResourceKind, TestKube};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::serde::Serialize;
use k8s_openapi::serde::de::DeserializeOwned;
use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::discovery::{Discovery, Scope};
use kube::runtime::watcher;
use serde_json::{Value, json};

const TOKEN: &str = "writes-token";
const SA_USER: &str = "system:serviceaccount:ferry-system:ferry-reader";

fn apply() -> PatchParams {
    PatchParams::apply("ferry")
}

/// The objects of deploy/member/member.yaml.
fn member_objects() -> [(ResourceKind, Value); 5] {
    [
        (
            ResourceKind::Namespace,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ferry-system"}}),
        ),
        (
            ResourceKind::ServiceAccount,
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "ferry-reader", "namespace": "ferry-system"}}),
        ),
        (ResourceKind::ClusterRole, cluster_role()),
        (ResourceKind::ClusterRoleBinding, cluster_role_binding()),
        (ResourceKind::Secret, token_secret()),
    ]
}

fn cluster_role() -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "ferry-discovery"},
        "rules": [
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
             "verbs": ["get", "list", "watch"]},
        ],
    })
}

fn cluster_role_binding() -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "ferry-discovery"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "ferry-discovery"},
        "subjects": [{"kind": "ServiceAccount", "name": "ferry-reader",
                      "namespace": "ferry-system"}],
    })
}

fn token_secret() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "ferry-reader-token",
            "namespace": "ferry-system",
            "annotations": {"kubernetes.io/service-account.name": "ferry-reader"},
        },
        "type": "kubernetes.io/service-account-token",
    })
}

/// Server-side applies one of [`member_objects`] with the admin client.
async fn apply_object(client: &kube::Client, kind: ResourceKind, object: &Value) {
    let name = object["metadata"]["name"].as_str().unwrap().to_owned();
    let ns = object["metadata"]["namespace"].as_str();
    let pp = apply();
    let patch = Patch::Apply(object);
    match kind {
        ResourceKind::Namespace => drop(
            Api::<Namespace>::all(client.clone())
                .patch(&name, &pp, &patch)
                .await
                .unwrap(),
        ),
        ResourceKind::ServiceAccount => drop(
            Api::<ServiceAccount>::namespaced(client.clone(), ns.unwrap())
                .patch(&name, &pp, &patch)
                .await
                .unwrap(),
        ),
        ResourceKind::Secret => drop(
            Api::<Secret>::namespaced(client.clone(), ns.unwrap())
                .patch(&name, &pp, &patch)
                .await
                .unwrap(),
        ),
        ResourceKind::ClusterRole => drop(
            Api::<ClusterRole>::all(client.clone())
                .patch(&name, &pp, &patch)
                .await
                .unwrap(),
        ),
        ResourceKind::ClusterRoleBinding => drop(
            Api::<ClusterRoleBinding>::all(client.clone())
                .patch(&name, &pp, &patch)
                .await
                .unwrap(),
        ),
        ResourceKind::Role => drop(
            Api::<Role>::namespaced(client.clone(), ns.unwrap())
                .patch(&name, &pp, &patch)
                .await
                .unwrap(),
        ),
        ResourceKind::RoleBinding => drop(
            Api::<RoleBinding>::namespaced(client.clone(), ns.unwrap())
                .patch(&name, &pp, &patch)
                .await
                .unwrap(),
        ),
        other => panic!("not a member object: {other:?}"),
    }
}

fn decoded(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    Some(String::from_utf8(bytes.0.clone()).unwrap())
}

/// Create, get, 409, apply twice (the second a no-op), merge patch,
/// replace (stale: 409), delete and the 404s, through one typed `Api`.
async fn round_trip<K>(kube: &TestKube, kind: ResourceKind, api: Api<K>, object: Value)
where
    K: kube::Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
{
    let typed: K = serde_json::from_value(object.clone()).unwrap();
    let name = typed.name_any();
    let ns = object["metadata"]["namespace"].as_str().unwrap_or("");
    let created = api.create(&PostParams::default(), &typed).await.unwrap();
    assert!(created.meta().uid.is_some(), "{created:?}");
    assert_eq!(
        created.meta().namespace.as_deref(),
        object["metadata"]["namespace"].as_str()
    );
    let rv = created.resource_version().unwrap();
    assert_eq!(
        api.get(&name).await.unwrap().resource_version(),
        Some(rv.clone())
    );
    assert!(kube.get(kind, ns, &name).is_some());
    let listed = api.list(&ListParams::default()).await.unwrap();
    assert!(listed.items.iter().any(|o| o.name_any() == name));
    let err = api
        .create(&PostParams::default(), &typed)
        .await
        .unwrap_err();
    let status = api_error(err, 409, "AlreadyExists");
    assert_eq!(status.details.as_ref().unwrap().name, name);

    let mut labelled = object.clone();
    labelled["metadata"]["labels"] = json!({"ferry.io/step": "apply"});
    let applied = api
        .patch(&name, &apply(), &Patch::Apply(&labelled))
        .await
        .unwrap();
    assert_ne!(applied.resource_version(), Some(rv));
    assert_eq!(applied.labels()["ferry.io/step"], "apply");
    let before = kube.resource_version();
    let again = api
        .patch(&name, &apply(), &Patch::Apply(&labelled))
        .await
        .unwrap();
    assert_eq!(
        again.resource_version(),
        applied.resource_version(),
        "a no-op apply"
    );
    assert_eq!(kube.resource_version(), before);

    let merge = json!({"metadata": {"labels": {"ferry.io/merged": "yes"}}});
    let merged = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .unwrap();
    assert_eq!(merged.labels()["ferry.io/merged"], "yes");
    assert_eq!(merged.labels()["ferry.io/step"], "apply");

    // A replace from a stale copy conflicts; from the current one it works.
    let err = api
        .replace(&name, &PostParams::default(), &applied)
        .await
        .unwrap_err();
    api_error(err, 409, "Conflict");
    let replaced = api
        .replace(&name, &PostParams::default(), &merged)
        .await
        .unwrap();
    assert_eq!(replaced.labels()["ferry.io/merged"], "yes");

    api.delete(&name, &DeleteParams::default()).await.unwrap();
    assert!(kube.get(kind, ns, &name).is_none());
    let status = api_error(api.get(&name).await.unwrap_err(), 404, "NotFound");
    assert_eq!(
        status.message,
        format!("{} \"{name}\" not found", kind.qualified())
    );
    let details = status.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        (name.as_str(), kind.plural())
    );
    api_error(
        api.delete(&name, &DeleteParams::default())
            .await
            .unwrap_err(),
        404,
        "NotFound",
    );
    let err = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .unwrap_err();
    api_error(err, 404, "NotFound");
    let err = api
        .replace(&name, &PostParams::default(), &typed)
        .await
        .unwrap_err();
    api_error(err, 404, "NotFound");
    // Server-side apply creates.
    api.patch(&name, &apply(), &Patch::Apply(&object))
        .await
        .unwrap();
    assert!(kube.get(kind, ns, &name).is_some());
}

#[tokio::test]
async fn every_new_kind_round_trips_through_kube() {
    let kube = TestKube::start(TOKEN).await;
    let client = kube.client().await;
    round_trip(
        &kube,
        ResourceKind::Namespace,
        Api::<Namespace>::all(client.clone()),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "crud"}}),
    )
    .await;
    round_trip(
        &kube,
        ResourceKind::ServiceAccount,
        Api::<ServiceAccount>::namespaced(client.clone(), "crud"),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "reader", "namespace": "crud"}}),
    )
    .await;
    round_trip(
        &kube,
        ResourceKind::Secret,
        Api::<Secret>::namespaced(client.clone(), "crud"),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kc", "namespace": "crud"},
               "type": "Opaque", "stringData": {"config": "apiVersion: v1"}}),
    )
    .await;
    round_trip(
        &kube,
        ResourceKind::ClusterRole,
        Api::<ClusterRole>::all(client.clone()),
        cluster_role(),
    )
    .await;
    round_trip(
        &kube,
        ResourceKind::ClusterRoleBinding,
        Api::<ClusterRoleBinding>::all(client.clone()),
        cluster_role_binding(),
    )
    .await;

    // Server defaults: a Namespace is Active and labelled with its name;
    // a Secret's stringData lands in data.
    let ns = Api::<Namespace>::all(client.clone())
        .get("crud")
        .await
        .unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Active"));
    assert_eq!(
        ns.metadata.labels.unwrap()["kubernetes.io/metadata.name"],
        "crud"
    );
    assert!(ns.metadata.namespace.is_none());
    let secret = Api::<Secret>::namespaced(client.clone(), "crud")
        .get("kc")
        .await
        .unwrap();
    assert_eq!(
        decoded(&secret, "config").as_deref(),
        Some("apiVersion: v1")
    );
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));

    // Lists, cluster-wide and per namespace, and the Rust-side view.
    let roles = Api::<ClusterRole>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(roles.items.len(), 1);
    assert_eq!(kube.count(ResourceKind::ClusterRole), 1);
    assert!(
        kube.get(ResourceKind::ClusterRole, "", "ferry-discovery")
            .is_some()
    );
    let all_secrets = Api::<Secret>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let in_crud = Api::<Secret>::namespaced(client.clone(), "crud")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!((all_secrets.items.len(), in_crud.items.len()), (1, 1));

    let access = kube.access();
    for verb in ["get", "list", "create", "update", "patch", "delete"] {
        for resource in ["namespaces", "serviceaccounts", "secrets"] {
            assert!(
                access.contains(&(verb.into(), "".into(), resource.into())),
                "{verb} {resource}"
            );
        }
        assert!(access.contains(&(
            verb.into(),
            "rbac.authorization.k8s.io".into(),
            "clusterrolebindings".into()
        )));
    }
    assert_eq!(kube.users_seen(), BTreeSet::from(["admin".to_owned()]));
}

#[tokio::test]
async fn malformed_writes_get_the_api_servers_errors() {
    let kube = TestKube::start(TOKEN).await;
    let client = kube.client().await;
    let secrets = Api::<Secret>::namespaced(client.clone(), "a");
    let pp = PostParams::default();

    // The body's namespace must be the path's.
    let other: Secret =
        serde_json::from_value(json!({"metadata": {"name": "x", "namespace": "b"}})).unwrap();
    api_error(
        secrets.create(&pp, &other).await.unwrap_err(),
        400,
        "BadRequest",
    );
    // A name (or generateName) is required.
    let nameless: Secret = serde_json::from_value(json!({"metadata": {}})).unwrap();
    let status = api_error(
        secrets.create(&pp, &nameless).await.unwrap_err(),
        422,
        "Invalid",
    );
    assert!(
        status.message.contains("name or generateName is required"),
        "{status:?}"
    );
    let generated: Secret =
        serde_json::from_value(json!({"metadata": {"generateName": "kc-"}})).unwrap();
    let created = secrets.create(&pp, &generated).await.unwrap();
    assert!(
        created.name_any().starts_with("kc-") && created.name_any().len() == 8,
        "{created:?}"
    );
    // The kind must be the path's.
    let wrong_kind = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
    let err = secrets
        .patch("x", &apply(), &Patch::Apply(&wrong_kind))
        .await
        .unwrap_err();
    api_error(err, 400, "BadRequest");
    // Server-side apply needs a field manager.
    let ok = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}});
    let err = secrets
        .patch("x", &PatchParams::default(), &Patch::Apply(&ok))
        .await
        .unwrap_err();
    let status = api_error(err, 400, "BadRequest");
    assert!(status.message.contains("fieldManager"), "{status:?}");
    // The name in the body must be the URL's.
    let err = secrets
        .patch("y", &apply(), &Patch::Apply(&ok))
        .await
        .unwrap_err();
    api_error(err, 400, "BadRequest");
    // An apply patch in YAML, as kubectl may send it.
    let yaml = hyper::Request::patch("/api/v1/namespaces/a/secrets/yaml?fieldManager=kubectl")
        .header("Content-Type", "application/apply-patch+yaml")
        .body(
            b"apiVersion: v1\nkind: Secret\nmetadata:\n  name: yaml\nstringData:\n  k: v\n"
                .to_vec(),
        )
        .unwrap();
    let created: Secret = client.request(yaml).await.unwrap();
    assert_eq!(decoded(&created, "k").as_deref(), Some("v"));
    // Strategic merge patches are not served.
    let err = secrets
        .patch("x", &PatchParams::default(), &Patch::Strategic(json!({})))
        .await
        .unwrap_err();
    api_error(err, 415, "UnsupportedMediaType");
    assert_eq!(kube.count(ResourceKind::Secret), 2);
}

#[tokio::test]
async fn the_token_controller_mints_tokens_that_rbac_authorizes() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_service("shop", "web", &[], &[("http", 80)]);
    let admin = kube.client().await;
    let [ns, sa, role, binding, secret] = member_objects();
    // Without the ClusterRole and its binding first.
    for (kind, object) in [&ns, &sa, &secret] {
        apply_object(&admin, *kind, object).await;
    }
    let secrets = Api::<Secret>::namespaced(admin.clone(), "ferry-system");
    let filled = eventually("the token controller fills the Secret", 10, || {
        let secrets = secrets.clone();
        async move {
            let s = secrets.get("ferry-reader-token").await.ok()?;
            decoded(&s, "token").is_some().then_some(s)
        }
    })
    .await;
    let token = decoded(&filled, "token").unwrap();
    assert_eq!(token.len(), 64, "{token}");
    assert_eq!(decoded(&filled, "ca.crt").as_deref(), Some(kube.ca_pem()));
    assert_eq!(
        decoded(&filled, "namespace").as_deref(),
        Some("ferry-system")
    );
    assert_eq!(
        kube.token_for("ferry-system", "ferry-reader"),
        Some(token.clone())
    );
    assert_eq!(kube.token_for("ferry-system", "other"), None);

    // Authenticated, but not yet authorized.
    let member = kube.client_with_token(&token).await;
    let services = Api::<Service>::all(member.clone());
    let status = api_error(
        services.list(&ListParams::default()).await.unwrap_err(),
        403,
        "Forbidden",
    );
    assert_eq!(
        status.message,
        format!(
            "services is forbidden: User \"{SA_USER}\" cannot list resource \"services\" in API group \"\" at the cluster scope"
        )
    );
    let err = Api::<Service>::namespaced(member.clone(), "shop")
        .get("web")
        .await
        .unwrap_err();
    let status = api_error(err, 403, "Forbidden");
    assert!(
        status.message.ends_with("in the namespace \"shop\""),
        "{status:?}"
    );
    assert!(
        kube.access_by(SA_USER).is_empty(),
        "refusals are not recorded"
    );
    // Discovery is open to every authenticated user.
    assert_eq!(member.apiserver_version().await.unwrap().major, "1");

    for (kind, object) in [&role, &binding] {
        apply_object(&admin, *kind, object).await;
    }
    assert_eq!(
        services
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    Api::<Service>::namespaced(member.clone(), "shop")
        .get("web")
        .await
        .unwrap();
    // …but only what the ClusterRole grants.
    let err = Api::<Secret>::all(member.clone())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    api_error(err, 403, "Forbidden");
    assert_eq!(
        kube.access_by(SA_USER),
        BTreeSet::from([
            ("get".to_owned(), "".to_owned(), "services".to_owned()),
            ("list".to_owned(), "".to_owned(), "services".to_owned()),
        ])
    );
    assert_eq!(
        kube.users_seen(),
        BTreeSet::from(["admin".to_owned(), SA_USER.to_owned()])
    );

    // Applying the Secret again keeps the token (and changes nothing).
    let rv = kube.resource_version();
    apply_object(&admin, ResourceKind::Secret, &secret.1).await;
    assert_eq!(kube.resource_version(), rv);
    assert_eq!(
        kube.token_for("ferry-system", "ferry-reader"),
        Some(token.clone())
    );

    // Deleting the Secret revokes the token.
    secrets
        .delete("ferry-reader-token", &DeleteParams::default())
        .await
        .unwrap();
    api_error(
        services.list(&ListParams::default()).await.unwrap_err(),
        401,
        "Unauthorized",
    );
    assert_eq!(kube.token_for("ferry-system", "ferry-reader"), None);

    // Re-creating it mints a new one.
    apply_object(&admin, ResourceKind::Secret, &secret.1).await;
    let rotated = kube.token_for("ferry-system", "ferry-reader").unwrap();
    assert_ne!(rotated, token);
    let member = kube.client_with_token(&rotated).await;
    Api::<Service>::all(member)
        .list(&ListParams::default())
        .await
        .unwrap();
    api_error(
        services.list(&ListParams::default()).await.unwrap_err(),
        401,
        "Unauthorized",
    );

    // A token Secret created before its ServiceAccount is filled when the
    // account appears; deleting the account deletes its token Secrets.
    let early = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "late-token", "namespace": "ferry-system",
                     "annotations": {"kubernetes.io/service-account.name": "late"}},
        "type": "kubernetes.io/service-account-token"});
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(early).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(kube.token_for("ferry-system", "late"), None);
    let late = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "late", "namespace": "ferry-system"}});
    apply_object(&admin, ResourceKind::ServiceAccount, &late).await;
    let late_token = kube.token_for("ferry-system", "late").unwrap();
    let stored = secrets.get("late-token").await.unwrap();
    assert_eq!(decoded(&stored, "token"), Some(late_token.clone()));
    Api::<ServiceAccount>::namespaced(admin.clone(), "ferry-system")
        .delete("late", &DeleteParams::default())
        .await
        .unwrap();
    api_error(
        secrets.get("late-token").await.unwrap_err(),
        404,
        "NotFound",
    );
    assert_eq!(kube.token_for("ferry-system", "late"), None);
}

#[tokio::test]
async fn watches_of_labelled_secrets_see_added_modified_deleted() {
    let kube = TestKube::start(TOKEN).await;
    let client = kube.client().await;
    let secrets = Api::<Secret>::namespaced(client.clone(), "ferry-system");

    // The runtime watcher, as `ferry control` runs it.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let config = watcher::Config::default().labels("ferry.io/cluster");
    let watch_task = tokio::spawn(watcher(secrets.clone(), config).for_each(move |event| {
        let seen = match event {
            Ok(watcher::Event::Apply(s)) => Some(format!(
                "apply {} {:?}",
                s.name_any(),
                decoded(&s, "kubeconfig")
            )),
            Ok(watcher::Event::Delete(s)) => Some(format!("delete {}", s.name_any())),
            Ok(watcher::Event::InitDone) => Some("init done".to_owned()),
            _ => None,
        };
        if let Some(seen) = seen {
            let _ = tx.send(seen);
        }
        futures::future::ready(())
    }));
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a watcher event within 10 s")
            .expect("the watcher runs")
    };
    assert_eq!(next().await, "init done");
    // And a raw watch, for the event types.
    let params = WatchParams::default().labels("ferry.io/cluster");
    let mut raw = secrets.watch(&params, "0").await.unwrap().boxed();

    let kubeconfig = |text: &str| {
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "member-east", "labels": {"ferry.io/cluster": "east"}},
               "stringData": {"kubeconfig": text}})
    };
    secrets
        .patch("member-east", &apply(), &Patch::Apply(kubeconfig("v1")))
        .await
        .unwrap();
    // Unlabelled Secrets are not seen.
    let plain = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "plain"}});
    secrets
        .patch("plain", &apply(), &Patch::Apply(plain))
        .await
        .unwrap();
    secrets
        .patch("member-east", &apply(), &Patch::Apply(kubeconfig("v2")))
        .await
        .unwrap();
    secrets
        .delete("member-east", &DeleteParams::default())
        .await
        .unwrap();

    assert_eq!(next().await, "apply member-east Some(\"v1\")");
    assert_eq!(next().await, "apply member-east Some(\"v2\")");
    assert_eq!(next().await, "delete member-east");
    let mut types = Vec::new();
    while types.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), raw.next())
            .await
            .expect("a raw watch event within 10 s")
            .expect("the watch runs")
            .unwrap();
        match event {
            WatchEvent::Added(s) => types.push(format!("ADDED {}", s.name_any())),
            WatchEvent::Modified(s) => types.push(format!("MODIFIED {}", s.name_any())),
            WatchEvent::Deleted(s) => types.push(format!("DELETED {}", s.name_any())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    assert_eq!(
        types,
        [
            "ADDED member-east",
            "MODIFIED member-east",
            "DELETED member-east"
        ]
    );
    watch_task.abort();
}

#[tokio::test]
async fn deny_refuses_a_verb_on_a_kind_until_allow() {
    let kube = TestKube::start(TOKEN).await;
    let client = kube.client().await;
    let bindings = Api::<ClusterRoleBinding>::all(client.clone());
    let binding: ClusterRoleBinding = serde_json::from_value(cluster_role_binding()).unwrap();

    kube.deny("create", ResourceKind::ClusterRoleBinding);
    let status = api_error(
        bindings
            .create(&PostParams::default(), &binding)
            .await
            .unwrap_err(),
        403,
        "Forbidden",
    );
    assert_eq!(
        status.message,
        "clusterrolebindings.rbac.authorization.k8s.io is forbidden: User \"admin\" cannot create resource \"clusterrolebindings\" in API group \"rbac.authorization.k8s.io\" at the cluster scope"
    );
    // Other verbs and kinds are unaffected; `patch` is its own verb.
    bindings.list(&ListParams::default()).await.unwrap();
    apply_object(&client, ResourceKind::ClusterRole, &cluster_role()).await;
    assert_eq!(kube.count(ResourceKind::ClusterRoleBinding), 0);
    kube.deny("patch", ResourceKind::ClusterRoleBinding);
    let err = bindings
        .patch(
            "ferry-discovery",
            &apply(),
            &Patch::Apply(cluster_role_binding()),
        )
        .await
        .unwrap_err();
    api_error(err, 403, "Forbidden");
    assert_eq!(kube.count(ResourceKind::ClusterRoleBinding), 0);
    assert!(
        !kube
            .access()
            .iter()
            .any(|(verb, _, r)| verb == "create" && r == "clusterrolebindings")
    );

    kube.allow("create", ResourceKind::ClusterRoleBinding);
    kube.allow("patch", ResourceKind::ClusterRoleBinding);
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    assert_eq!(kube.count(ResourceKind::ClusterRoleBinding), 1);
}

#[tokio::test]
async fn deleting_a_namespace_deletes_what_is_in_it() {
    let kube = TestKube::start(TOKEN).await;
    let client = kube.client().await;
    for (kind, object) in member_objects() {
        apply_object(&client, kind, &object).await;
    }
    kube.apply_service("ferry-system", "web", &[], &[("http", 80)]);
    kube.apply_service("shop", "web", &[], &[("http", 80)]);
    let token = kube.token_for("ferry-system", "ferry-reader").unwrap();
    let member = kube.client_with_token(&token).await;
    Api::<Service>::all(member.clone())
        .list(&ListParams::default())
        .await
        .unwrap();

    let all_secrets = Api::<Secret>::all(client.clone());
    let mut raw = all_secrets
        .watch(
            &WatchParams::default(),
            &kube.resource_version().to_string(),
        )
        .await
        .unwrap()
        .boxed();
    Api::<Namespace>::all(client.clone())
        .delete("ferry-system", &DeleteParams::default())
        .await
        .unwrap();
    for kind in [ResourceKind::ServiceAccount, ResourceKind::Secret] {
        assert_eq!(kube.count(kind), 0, "{kind:?}");
    }
    assert!(
        kube.get(ResourceKind::Service, "ferry-system", "web")
            .is_none()
    );
    assert!(kube.get(ResourceKind::Service, "shop", "web").is_some());
    // Cluster-scoped objects stay.
    assert_eq!(kube.count(ResourceKind::ClusterRoleBinding), 1);
    let event = tokio::time::timeout(Duration::from_secs(10), raw.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch runs")
        .unwrap();
    assert!(
        matches!(&event, WatchEvent::Deleted(s) if s.name_any() == "ferry-reader-token"),
        "{event:?}"
    );
    assert_eq!(kube.token_for("ferry-system", "ferry-reader"), None);
    let err = Api::<Service>::all(member)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    api_error(err, 401, "Unauthorized");
}

#[tokio::test]
async fn discovery_lists_the_new_kinds_with_their_scope() {
    let kube = TestKube::start(TOKEN).await;
    let discovery = Discovery::new(kube.client().await).run().await.unwrap();
    let scope = |group: &str, version: &str, kind: &str| {
        let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = discovery
            .resolve_gvk(&gvk)
            .unwrap_or_else(|| panic!("{kind} not discovered"));
        assert!(
            caps.supports_operation(kube::discovery::verbs::CREATE),
            "{kind}"
        );
        assert!(
            caps.supports_operation(kube::discovery::verbs::PATCH),
            "{kind}"
        );
        (resource.plural, caps.scope)
    };
    assert_eq!(
        scope("", "v1", "Namespace"),
        ("namespaces".to_owned(), Scope::Cluster)
    );
    assert_eq!(
        scope("", "v1", "ServiceAccount"),
        ("serviceaccounts".to_owned(), Scope::Namespaced)
    );
    assert_eq!(
        scope("", "v1", "Secret"),
        ("secrets".to_owned(), Scope::Namespaced)
    );
    assert_eq!(
        scope("", "v1", "Service"),
        ("services".to_owned(), Scope::Namespaced)
    );
    let rbac = "rbac.authorization.k8s.io";
    assert_eq!(
        scope(rbac, "v1", "ClusterRole"),
        ("clusterroles".to_owned(), Scope::Cluster)
    );
    assert_eq!(
        scope(rbac, "v1", "ClusterRoleBinding"),
        ("clusterrolebindings".to_owned(), Scope::Cluster)
    );
    assert_eq!(
        scope(rbac, "v1", "Role"),
        ("roles".to_owned(), Scope::Namespaced)
    );
    assert_eq!(
        scope(rbac, "v1", "RoleBinding"),
        ("rolebindings".to_owned(), Scope::Namespaced)
    );
}

/// deploy/base's Role on Secrets in ferry-system, for `ferry-reader`.
fn secrets_role() -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "ferry-cluster-secrets", "namespace": "ferry-system"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}],
    })
}

/// A RoleBinding of `ferry-reader` in `namespace` to `role_kind` `role`.
fn role_binding(namespace: &str, role_kind: &str, role: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": format!("ferry-{role}"), "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "ferry-reader",
                      "namespace": "ferry-system"}],
    })
}

/// The token of `ferry-reader` (deploy/member's Namespace, ServiceAccount
/// and token Secret, without any RBAC object) and a Secret in `default`
/// and in `shop`.
async fn reader_token(kube: &TestKube, admin: &kube::Client) -> String {
    let [ns, sa, _, _, secret] = member_objects();
    for (kind, object) in [&ns, &sa, &secret] {
        apply_object(admin, *kind, object).await;
    }
    for namespace in ["default", "shop"] {
        let plain = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "plain", "namespace": namespace}});
        apply_object(admin, ResourceKind::Secret, &plain).await;
    }
    eventually("the token controller mints a token", 10, || async {
        kube.token_for("ferry-system", "ferry-reader")
    })
    .await
}

/// Lists Secrets in `namespace` (all namespaces for `None`), expecting a
/// 403 whose message ends with `scope`.
async fn assert_cannot_list_secrets(client: &kube::Client, namespace: Option<&str>, scope: &str) {
    let api = match namespace {
        Some(ns) => Api::<Secret>::namespaced(client.clone(), ns),
        None => Api::<Secret>::all(client.clone()),
    };
    let err = api.list(&ListParams::default()).await.unwrap_err();
    let status = api_error(err, 403, "Forbidden");
    assert_eq!(
        status.message,
        format!(
            "secrets is forbidden: User \"{SA_USER}\" cannot list resource \"secrets\" in API group \"\" {scope}"
        )
    );
}

#[tokio::test]
async fn roles_and_role_bindings_round_trip_through_kube() {
    let kube = TestKube::start(TOKEN).await;
    let client = kube.client().await;
    let [ns, ..] = member_objects();
    apply_object(&client, ns.0, &ns.1).await;
    round_trip(
        &kube,
        ResourceKind::Role,
        Api::<Role>::namespaced(client.clone(), "ferry-system"),
        secrets_role(),
    )
    .await;
    round_trip(
        &kube,
        ResourceKind::RoleBinding,
        Api::<RoleBinding>::namespaced(client.clone(), "ferry-system"),
        role_binding("ferry-system", "Role", "ferry-cluster-secrets"),
    )
    .await;
    // Listed per namespace and across all, watched like the other kinds.
    let elsewhere = role_binding("shop", "ClusterRole", "ferry-discovery");
    apply_object(&client, ResourceKind::RoleBinding, &elsewhere).await;
    let all = Api::<RoleBinding>::all(client.clone());
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );
    let in_shop = Api::<RoleBinding>::namespaced(client.clone(), "shop");
    let listed = in_shop.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].role_ref.kind, "ClusterRole");
    let mut events = in_shop
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch runs")
        .unwrap();
    match event {
        WatchEvent::Added(binding) => assert_eq!(binding.name_any(), "ferry-ferry-discovery"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    // Deleting the namespace deletes its Roles and RoleBindings.
    Api::<Namespace>::all(client.clone())
        .delete("ferry-system", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(kube.count(ResourceKind::Role), 0);
    assert_eq!(kube.count(ResourceKind::RoleBinding), 1);
}

#[tokio::test]
async fn a_role_binding_grants_its_role_only_in_its_namespace() {
    let kube = TestKube::start(TOKEN).await;
    let admin = kube.client().await;
    let token = reader_token(&kube, &admin).await;
    let member = kube.client_with_token(&token).await;
    let in_home = Api::<Secret>::namespaced(member.clone(), "ferry-system");
    assert_cannot_list_secrets(
        &member,
        Some("ferry-system"),
        "in the namespace \"ferry-system\"",
    )
    .await;

    apply_object(&admin, ResourceKind::Role, &secrets_role()).await;
    // A Role alone grants nothing.
    assert_cannot_list_secrets(
        &member,
        Some("ferry-system"),
        "in the namespace \"ferry-system\"",
    )
    .await;
    let binding = role_binding("ferry-system", "Role", "ferry-cluster-secrets");
    apply_object(&admin, ResourceKind::RoleBinding, &binding).await;

    // Listed, read and watched in ferry-system…
    let listed = in_home.list(&ListParams::default()).await.unwrap();
    assert!(
        listed
            .items
            .iter()
            .any(|s| s.name_any() == "ferry-reader-token")
    );
    in_home.get("ferry-reader-token").await.unwrap();
    let mut events = in_home
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    let first = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch runs")
        .unwrap();
    assert!(matches!(first, WatchEvent::Added(_)), "{first:?}");
    // …with only the Role's verbs…
    let err = in_home
        .delete("ferry-reader-token", &DeleteParams::default())
        .await
        .unwrap_err();
    let status = api_error(err, 403, "Forbidden");
    assert!(
        status.message.ends_with(
            "cannot delete resource \"secrets\" in API group \"\" in the namespace \"ferry-system\""
        ),
        "{status:?}"
    );
    // …and neither in another namespace nor across all of them.
    assert_cannot_list_secrets(&member, Some("default"), "in the namespace \"default\"").await;
    let err = Api::<Secret>::namespaced(member.clone(), "default")
        .get("plain")
        .await
        .unwrap_err();
    api_error(err, 403, "Forbidden");
    assert_cannot_list_secrets(&member, None, "at the cluster scope").await;
    assert_eq!(
        kube.access_by(SA_USER),
        BTreeSet::from([
            ("get".to_owned(), "".to_owned(), "secrets".to_owned()),
            ("list".to_owned(), "".to_owned(), "secrets".to_owned()),
            ("watch".to_owned(), "".to_owned(), "secrets".to_owned()),
        ])
    );

    // The same RoleBinding in another namespace does not reach a Role of
    // ferry-system.
    let astray = role_binding("default", "Role", "ferry-cluster-secrets");
    apply_object(&admin, ResourceKind::RoleBinding, &astray).await;
    assert_cannot_list_secrets(&member, Some("default"), "in the namespace \"default\"").await;

    // Deleting the binding takes the grant away.
    Api::<RoleBinding>::namespaced(admin.clone(), "ferry-system")
        .delete("ferry-ferry-cluster-secrets", &DeleteParams::default())
        .await
        .unwrap();
    assert_cannot_list_secrets(
        &member,
        Some("ferry-system"),
        "in the namespace \"ferry-system\"",
    )
    .await;
}

#[tokio::test]
async fn a_role_binding_to_a_cluster_role_grants_it_only_in_its_namespace() {
    let kube = TestKube::start(TOKEN).await;
    let admin = kube.client().await;
    let token = reader_token(&kube, &admin).await;
    let member = kube.client_with_token(&token).await;
    let reader = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "secret-reader"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}],
    });
    apply_object(&admin, ResourceKind::ClusterRole, &reader).await;
    let binding = role_binding("shop", "ClusterRole", "secret-reader");
    apply_object(&admin, ResourceKind::RoleBinding, &binding).await;

    let listed = Api::<Secret>::namespaced(member.clone(), "shop")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].name_any(), "plain");
    for ns in ["ferry-system", "default"] {
        assert_cannot_list_secrets(&member, Some(ns), &format!("in the namespace \"{ns}\"")).await;
    }
    assert_cannot_list_secrets(&member, None, "at the cluster scope").await;

    // A ClusterRoleBinding to the same ClusterRole grants it everywhere.
    let cluster_wide = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "secret-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "secret-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "ferry-reader",
                      "namespace": "ferry-system"}],
    });
    apply_object(&admin, ResourceKind::ClusterRoleBinding, &cluster_wide).await;
    let all = Api::<Secret>::all(member.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(all.items.len(), 3);
    Api::<Secret>::namespaced(member, "default")
        .list(&ListParams::default())
        .await
        .unwrap();
}
