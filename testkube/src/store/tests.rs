use super::*;

fn store() -> Store {
    Store::new(100, broadcast::channel(16).0, String::new())
}

fn svc(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": "ns", "labels": labels}, "spec": {}})
}

fn filter(labels: &str) -> Filter {
    Filter {
        kind: ResourceKind::Service,
        namespace: None,
        labels: LabelSelector::parse(labels).unwrap(),
        fields: FieldSelector::default(),
    }
}

#[test]
fn timestamps() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
}

#[test]
fn label_selectors() {
    let o = svc("a", json!({"app": "web", "tier": "front"}));
    assert!(LabelSelector::parse("app=web").unwrap().matches(&o));
    assert!(
        LabelSelector::parse("app==web,tier=front")
            .unwrap()
            .matches(&o)
    );
    assert!(
        !LabelSelector::parse("app=web,tier=back")
            .unwrap()
            .matches(&o)
    );
    assert!(LabelSelector::parse("app!=db,tier").unwrap().matches(&o));
    assert!(!LabelSelector::parse("!tier").unwrap().matches(&o));
    assert!(LabelSelector::parse("").unwrap().matches(&o));
    assert!(LabelSelector::parse("app in (web)").is_err());
}

#[test]
fn field_selectors_apply_name_and_ignore_the_rest() {
    let o = svc("a", json!({}));
    assert!(FieldSelector::parse("metadata.name=a").matches(&o));
    assert!(!FieldSelector::parse("metadata.name=b").matches(&o));
    assert!(FieldSelector::parse("spec.type=ClusterIP").matches(&o));
}

#[test]
fn apply_is_idempotent_and_keeps_uid() {
    let mut s = store();
    let rv1 = s.apply(ResourceKind::Service, svc("a", json!({}))).unwrap();
    let uid = s.get(ResourceKind::Service, "ns", "a").unwrap()["metadata"]["uid"].clone();
    assert_eq!(
        s.apply(ResourceKind::Service, svc("a", json!({}))).unwrap(),
        rv1
    );
    let rv2 = s
        .apply(ResourceKind::Service, svc("a", json!({"x": "y"})))
        .unwrap();
    assert!(rv2 > rv1);
    let obj = s.get(ResourceKind::Service, "ns", "a").unwrap();
    assert_eq!(obj["metadata"]["uid"], uid);
    assert_eq!(obj["metadata"]["resourceVersion"], rv2.to_string());
    assert!(
        s.apply(ResourceKind::Service, json!({"metadata": {}}))
            .is_err()
    );
}

#[test]
fn paging_and_tokens() {
    let mut s = store();
    for i in 0..7 {
        s.apply(ResourceKind::Service, svc(&format!("s{i}"), json!({})))
            .unwrap();
    }
    let f = filter("");
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = s.list(&f, 3, token.as_deref()).unwrap();
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            assert!(item.get("kind").is_none());
            names.push(item["metadata"]["name"].as_str().unwrap().to_string());
        }
        assert_eq!(page["metadata"]["resourceVersion"], "8");
        match page["metadata"]["continue"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names.len(), 7);
    assert!(s.list(&f, 3, Some("garbage")).is_err());
    let first = s.list(&f, 3, None).unwrap();
    let tok = first["metadata"]["continue"].as_str().unwrap().to_string();
    s.expire_history();
    assert!(s.list(&f, 3, Some(&tok)).is_err());
}

#[test]
fn selector_transitions_in_watch_events() {
    let mut s = store();
    s.apply(ResourceKind::Service, svc("a", json!({"app": "x"})))
        .unwrap();
    s.apply(ResourceKind::Service, svc("a", json!({"app": "y"})))
        .unwrap();
    s.apply(ResourceKind::Service, svc("a", json!({"app": "x"})))
        .unwrap();
    let (_rx, start) = s.start_watch(&filter("app=x"), Some(1));
    let WatchStart::Replay { lines, .. } = start else {
        panic!("expired")
    };
    let types: Vec<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(types, ["ADDED", "DELETED", "ADDED"]);
}

#[test]
fn history_bound_expires_old_watches() {
    let mut s = Store::new(2, broadcast::channel(16).0, String::new());
    for i in 0..4 {
        s.apply(ResourceKind::Service, svc(&format!("s{i}"), json!({})))
            .unwrap();
    }
    // rv is now 5; history holds rv 4 and 5.
    assert!(matches!(
        s.start_watch(&filter(""), Some(2)).1,
        WatchStart::Expired { .. }
    ));
    assert!(
        matches!(s.start_watch(&filter(""), Some(3)).1, WatchStart::Replay { ref lines, .. } if lines.len() == 2)
    );
}

#[test]
fn removing_a_crd_deletes_its_objects_and_ends_its_watches() {
    let (bus, mut rx) = broadcast::channel(16);
    let mut s = Store::new(100, bus, String::new());
    let export = json!({"metadata": {"name": "web", "namespace": "ns"}});
    s.apply(ResourceKind::ServiceExport, export.clone())
        .unwrap();
    s.apply(ResourceKind::Service, svc("web", json!({})))
        .unwrap();
    assert!(!s.set_installed(ResourceKind::Service, false), "built-in");
    assert!(s.set_installed(ResourceKind::ServiceExport, false));
    assert!(!s.is_installed(ResourceKind::ServiceExport));
    assert_eq!(s.count(ResourceKind::ServiceExport), 0);
    assert_eq!(s.count(ResourceKind::Service), 1);
    let mut seen = Vec::new();
    while let Ok(msg) = rx.try_recv() {
        seen.push(match msg {
            Bus::Change(c) => format!("{:?} {}", c.op, c.kind.kind()),
            Bus::Removed(k) => format!("removed {}", k.kind()),
            Bus::Expired => "expired".into(),
        });
    }
    assert_eq!(
        seen,
        [
            "Added ServiceExport",
            "Added Service",
            "Deleted ServiceExport",
            "removed ServiceExport"
        ]
    );
    assert!(
        s.apply(ResourceKind::ServiceExport, export.clone())
            .is_err()
    );
    assert!(s.set_installed(ResourceKind::ServiceExport, true));
    s.apply(ResourceKind::ServiceExport, export).unwrap();
    assert_eq!(s.count(ResourceKind::ServiceExport), 1);
}

fn drain(rx: &mut broadcast::Receiver<Bus>) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(msg) = rx.try_recv() {
        if let Bus::Change(c) = msg {
            let name = c.object["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            seen.push(format!("{:?} {} {name}", c.op, c.kind.kind()));
        }
    }
    seen
}

fn token_secret(name: &str, sa: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "ns",
                     "annotations": {SA_NAME_ANNOTATION: sa}},
        "type": SA_TOKEN_TYPE,
    })
}

fn account(name: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": "ns"}})
}

#[test]
fn json_merge_patch_follows_rfc_7386() {
    let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1]});
    json_merge_patch(
        &mut target,
        &json!({"a": "z", "c": {"f": null}, "l": [2], "n": {"x": 1}}),
    );
    assert_eq!(
        target,
        json!({"a": "z", "c": {"d": "e"}, "l": [2], "n": {"x": 1}})
    );
    json_merge_patch(&mut target, &json!(["whole"]));
    assert_eq!(target, json!(["whole"]));
}

#[test]
fn server_side_apply_merges_metadata_and_replaces_fields() {
    let mut s = store();
    let patch = |labels: Value, data: Value| {
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "a", "labels": labels}, "data": data})
    };
    let (_, created) = s
        .server_side_apply(
            ResourceKind::Secret,
            "ns",
            "a",
            patch(json!({"x": "1"}), json!({"k": "dg=="})),
            "ferry",
        )
        .unwrap();
    assert!(created);
    let (obj, created) = s
        .server_side_apply(
            ResourceKind::Secret,
            "ns",
            "a",
            patch(json!({"y": "2"}), json!({"j": "dg=="})),
            "ferry",
        )
        .unwrap();
    assert!(!created);
    assert_eq!(obj["metadata"]["labels"], json!({"x": "1", "y": "2"}));
    assert_eq!(obj["data"], json!({"j": "dg=="}));
    assert_eq!(obj["type"], "Opaque");
    let rv = s.resource_version();
    let (again, _) = s
        .server_side_apply(
            ResourceKind::Secret,
            "ns",
            "a",
            patch(json!({"y": "2"}), json!({"j": "dg=="})),
            "ferry",
        )
        .unwrap();
    assert_eq!((s.resource_version(), again), (rv, obj));
    // A stale resourceVersion in the patch conflicts.
    let mut stale = patch(json!({"y": "3"}), json!({}));
    stale["metadata"]["resourceVersion"] = "1".into();
    assert_eq!(
        s.server_side_apply(ResourceKind::Secret, "ns", "a", stale, "ferry"),
        Err(WriteError::Conflict)
    );
    // No kind: refused; another name than the URL's: refused.
    let bare = json!({"metadata": {"name": "a"}});
    assert!(
        s.server_side_apply(ResourceKind::Secret, "ns", "a", bare, "ferry")
            .is_err()
    );
    assert!(
        s.server_side_apply(
            ResourceKind::Secret,
            "ns",
            "b",
            patch(json!({}), json!({})),
            "ferry"
        )
        .is_err()
    );
}

#[test]
fn cluster_scoped_objects_have_no_namespace() {
    let mut s = store();
    let role = json!({"metadata": {"name": "r", "namespace": "ignored"}, "rules": []});
    s.apply(ResourceKind::ClusterRole, role).unwrap();
    let stored = s.get(ResourceKind::ClusterRole, "", "r").unwrap();
    assert!(stored["metadata"].get("namespace").is_none());
    assert_eq!(stored["apiVersion"], "rbac.authorization.k8s.io/v1");
    assert!(s.delete(ResourceKind::ClusterRole, "", "r"));
}

#[test]
fn the_token_controller_mints_keeps_and_revokes() {
    let (bus, mut rx) = broadcast::channel(64);
    let mut s = Store::new(100, bus, "CA".into());
    // The Secret first: nothing to fill until its account exists.
    s.apply(ResourceKind::Secret, token_secret("t", "sa"))
        .unwrap();
    assert_eq!(s.token_for("ns", "sa"), None);
    s.apply(ResourceKind::ServiceAccount, account("sa"))
        .unwrap();
    let token = s.token_for("ns", "sa").unwrap();
    assert_eq!(s.token_user(&token), Some(("ns".into(), "sa".into())));
    let secret = s.get(ResourceKind::Secret, "ns", "t").unwrap();
    assert_eq!(secret["data"]["token"], STANDARD.encode(&token));
    assert_eq!(secret["data"]["ca.crt"], STANDARD.encode("CA"));
    assert_eq!(secret["data"]["namespace"], STANDARD.encode("ns"));
    assert_eq!(
        drain(&mut rx),
        [
            "Added Secret t",
            "Added ServiceAccount sa",
            "Modified Secret t"
        ]
    );
    // A full replace that drops the data gets it back, same token.
    s.apply(ResourceKind::Secret, token_secret("t", "sa"))
        .unwrap();
    assert_eq!(s.token_for("ns", "sa"), Some(token.clone()));
    assert_eq!(
        s.get(ResourceKind::Secret, "ns", "t").unwrap()["data"]["token"],
        STANDARD.encode(&token)
    );
    // Deleting the account deletes its token Secrets and the token.
    drain(&mut rx);
    assert!(s.delete(ResourceKind::ServiceAccount, "ns", "sa"));
    assert_eq!(
        drain(&mut rx),
        ["Deleted ServiceAccount sa", "Deleted Secret t"]
    );
    assert_eq!(s.token_user(&token), None);
    // A new Secret for a new account: a new token.
    s.apply(ResourceKind::ServiceAccount, account("sa"))
        .unwrap();
    s.apply(ResourceKind::Secret, token_secret("t", "sa"))
        .unwrap();
    let rotated = s.token_for("ns", "sa").unwrap();
    assert_ne!(rotated, token);
    // An Opaque Secret is never filled.
    s.apply(
        ResourceKind::Secret,
        json!({"metadata": {"name": "o", "namespace": "ns"}}),
    )
    .unwrap();
    assert!(
        s.get(ResourceKind::Secret, "ns", "o")
            .unwrap()
            .get("data")
            .is_none()
    );
}

#[test]
fn deleting_a_namespace_deletes_its_objects_first() {
    let (bus, mut rx) = broadcast::channel(64);
    let mut s = Store::new(100, bus, String::new());
    s.apply(ResourceKind::Namespace, json!({"metadata": {"name": "ns"}}))
        .unwrap();
    s.apply(ResourceKind::Service, svc("web", json!({})))
        .unwrap();
    s.apply(ResourceKind::ServiceAccount, account("sa"))
        .unwrap();
    s.apply(ResourceKind::Secret, token_secret("t", "sa"))
        .unwrap();
    let other = json!({"metadata": {"name": "web", "namespace": "other"}});
    s.apply(ResourceKind::Service, other).unwrap();
    drain(&mut rx);
    let gone = s.remove(ResourceKind::Namespace, "", "ns").unwrap();
    assert_eq!(
        gone["metadata"]["resourceVersion"],
        s.resource_version().to_string()
    );
    assert_eq!(
        drain(&mut rx),
        [
            "Deleted Service web",
            "Deleted ServiceAccount sa",
            "Deleted Secret t",
            "Deleted Namespace ns"
        ]
    );
    assert_eq!(s.count(ResourceKind::Service), 1);
    assert_eq!(s.token_for("ns", "sa"), None);
    assert!(s.remove(ResourceKind::Namespace, "", "ns").is_none());
}

#[test]
fn creates_and_replaces_check_the_request() {
    let mut s = store();
    let secret = json!({"metadata": {"name": "a"}});
    s.create(ResourceKind::Secret, "ns", secret.clone(), "t")
        .unwrap();
    assert_eq!(
        s.create(ResourceKind::Secret, "ns", secret.clone(), "t"),
        Err(WriteError::AlreadyExists)
    );
    let elsewhere = json!({"metadata": {"name": "b", "namespace": "x"}});
    assert!(matches!(
        s.create(ResourceKind::Secret, "ns", elsewhere, "t"),
        Err(WriteError::BadRequest(_))
    ));
    assert!(matches!(
        s.create(ResourceKind::Secret, "ns", json!({"metadata": {}}), "t"),
        Err(WriteError::Invalid(_))
    ));
    let wrong = json!({"apiVersion": "v2", "metadata": {"name": "c"}});
    assert!(matches!(
        s.create(ResourceKind::Secret, "ns", wrong, "t"),
        Err(WriteError::BadRequest(_))
    ));
    assert_eq!(
        s.replace(ResourceKind::Secret, "ns", "zz", secret.clone(), "t"),
        Err(WriteError::BadRequest(
            "the name of the object (a) does not match the name on the URL (zz)".into()
        ))
    );
    assert_eq!(
        s.replace(ResourceKind::Secret, "ns", "b", json!({}), "t"),
        Err(WriteError::NotFound)
    );
    let stale = json!({"metadata": {"name": "a", "resourceVersion": "1"}});
    assert_eq!(
        s.replace(ResourceKind::Secret, "ns", "a", stale, "t"),
        Err(WriteError::Conflict)
    );
    assert_eq!(
        s.merge_patch(ResourceKind::Secret, "ns", "b", &json!({}), "t"),
        Err(WriteError::NotFound)
    );
    let moved = json!({"metadata": {"namespace": "x"}});
    assert!(
        s.merge_patch(ResourceKind::Secret, "ns", "a", &moved, "t")
            .is_err()
    );
}

fn deployment(name: &str, replicas: Option<i32>) -> Value {
    let mut spec = json!({"selector": {"matchLabels": {"app": name}}});
    if let Some(n) = replicas {
        spec["replicas"] = n.into();
    }
    json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec})
}

#[test]
fn the_workload_controller_reports_replicas_up_to_the_limit() {
    let (bus, mut rx) = broadcast::channel(64);
    let mut s = Store::new(100, bus, String::new());
    s.apply(ResourceKind::Deployment, deployment("web", None))
        .unwrap();
    assert_eq!(
        drain(&mut rx),
        ["Added Deployment web", "Modified Deployment web"]
    );
    let web = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
    assert_eq!(web["spec"]["replicas"], 1);
    assert_eq!(web["metadata"]["generation"], 1);
    assert_eq!(
        web["status"],
        json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
               "readyReplicas": 1, "availableReplicas": 1})
    );
    // A limit set first holds back a later scale-up.
    s.set_available_limit("ns", "web", Some(2));
    assert!(drain(&mut rx).is_empty(), "one replica is within the limit");
    s.apply(ResourceKind::Deployment, deployment("web", Some(5)))
        .unwrap();
    let web = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
    assert_eq!(web["metadata"]["generation"], 2);
    assert_eq!(
        web["status"],
        json!({"observedGeneration": 2, "replicas": 5, "updatedReplicas": 5,
               "readyReplicas": 2, "availableReplicas": 2, "unavailableReplicas": 3})
    );
    // A client cannot write the status.
    let mut forged = deployment("web", Some(5));
    forged["status"] = json!({"availableReplicas": 5});
    drain(&mut rx);
    s.apply(ResourceKind::Deployment, forged).unwrap();
    assert!(drain(&mut rx).is_empty(), "a no-op");
    s.set_available_limit("ns", "web", None);
    assert_eq!(drain(&mut rx), ["Modified Deployment web"]);
    let web = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
    assert_eq!(web["status"]["availableReplicas"], 5);
    // Scale to zero: the Scale, the generation and a status of zeros
    // left out.
    let scale = s
        .set_scale(
            ResourceKind::Deployment,
            "ns",
            "web",
            &json!({"spec": {"replicas": 0}}),
            "ferry",
            Operation::Update,
        )
        .unwrap();
    assert_eq!(scale["spec"], json!({}));
    assert_eq!(scale["status"]["selector"], "app=web");
    let web = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
    assert_eq!(web["metadata"]["generation"], 3);
    assert_eq!(web["status"], json!({"observedGeneration": 3}));
    assert_eq!(
        s.set_scale(
            ResourceKind::Deployment,
            "ns",
            "web",
            &json!({"spec": {"replicas": -1}}),
            "ferry",
            Operation::Update
        ),
        Err(WriteError::Invalid(
            "spec.replicas: Invalid value: -1: must be greater than or equal to 0".into()
        ))
    );
    let stale = json!({"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 1}});
    assert_eq!(
        s.set_scale(
            ResourceKind::Deployment,
            "ns",
            "web",
            &stale,
            "ferry",
            Operation::Update
        ),
        Err(WriteError::Conflict)
    );
    // A StatefulSet reports its zeros.
    s.set_available_limit("ns", "db", Some(0));
    s.apply(ResourceKind::StatefulSet, deployment("db", Some(2)))
        .unwrap();
    let db = s.get(ResourceKind::StatefulSet, "ns", "db").unwrap();
    assert_eq!(
        db["status"],
        json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
               "currentReplicas": 2, "availableReplicas": 0})
    );
    assert_eq!(
        s.get_scale(ResourceKind::StatefulSet, "ns", "db").unwrap()["status"],
        json!({"replicas": 2, "selector": "app=db"})
    );
    assert!(s.get_scale(ResourceKind::Service, "ns", "db").is_none());
}

#[test]
fn writes_record_their_field_managers() {
    let mut s = store();
    let patch = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                       "metadata": {"name": "web", "labels": {"a": "b"}},
                       "spec": {"replicas": 2}});
    s.server_side_apply(ResourceKind::Deployment, "ns", "web", patch, "ferry")
        .unwrap();
    let merge = json!({"metadata": {"annotations": {"x": "y"}}});
    s.merge_patch(ResourceKind::Deployment, "ns", "web", &merge, "kubectl")
        .unwrap();
    let web = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
    let entries = web["metadata"]["managedFields"].as_array().unwrap();
    let summary: Vec<(&str, &str, Option<&str>)> = entries
        .iter()
        .map(|e| {
            assert_eq!(e["fieldsType"], "FieldsV1");
            assert_eq!(e["apiVersion"], "apps/v1");
            assert!(e["time"].as_str().unwrap().ends_with('Z'));
            (
                e["manager"].as_str().unwrap(),
                e["operation"].as_str().unwrap(),
                e["subresource"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("ferry", "Apply", None),
            ("kube-controller-manager", "Update", Some("status")),
            ("kubectl", "Update", None),
        ]
    );
    assert_eq!(
        entries[0]["fieldsV1"],
        json!({"f:metadata": {"f:labels": {"f:a": {}}}, "f:spec": {"f:replicas": {}}})
    );
    assert_eq!(
        entries[2]["fieldsV1"],
        json!({"f:metadata": {"f:annotations": {"f:x": {}}}})
    );
    assert_eq!(web["metadata"]["generation"], 1, "metadata only");
    // A client's managedFields are ignored.
    let mut forged = web.clone();
    forged["metadata"]["managedFields"] = json!([]);
    s.replace(ResourceKind::Deployment, "ns", "web", forged, "kubectl")
        .unwrap();
    let again = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
    assert_eq!(
        again["metadata"]["managedFields"].as_array().unwrap().len(),
        3
    );
}

#[test]
fn services_get_a_cluster_ip_that_stays() {
    let mut a = store();
    let mut b = store();
    let bare = json!({"metadata": {"name": "web", "namespace": "ns"},
                      "spec": {"ports": [{"port": 80}]}});
    a.apply(ResourceKind::Service, bare.clone()).unwrap();
    b.apply(ResourceKind::Service, bare.clone()).unwrap();
    let ip_of = |s: &Store| {
        let svc = s.get(ResourceKind::Service, "ns", "web").unwrap();
        assert_eq!(svc["spec"]["clusterIPs"], json!([svc["spec"]["clusterIP"]]));
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        svc["spec"]["clusterIP"].as_str().unwrap().to_owned()
    };
    let ip = ip_of(&a);
    let [first, second, ..] = ip.split('.').collect::<Vec<_>>()[..] else {
        panic!("{ip}")
    };
    assert_eq!(first, "10");
    assert!((96..112).contains(&second.parse::<u8>().unwrap()), "{ip}");
    assert_ne!(ip, ip_of(&b), "two clusters allocate apart");
    // Applying again without an IP keeps it; a second Service gets
    // another one.
    let rv = a.resource_version();
    a.apply(ResourceKind::Service, bare.clone()).unwrap();
    assert_eq!((a.resource_version(), ip_of(&a)), (rv, ip.clone()));
    let mut other = bare.clone();
    other["metadata"]["name"] = "api".into();
    a.apply(ResourceKind::Service, other).unwrap();
    let api = a.get(ResourceKind::Service, "ns", "api").unwrap();
    assert_ne!(api["spec"]["clusterIP"], ip.as_str());
    // Headless and ExternalName Services keep what they are.
    let headless = json!({"metadata": {"name": "h", "namespace": "ns"},
                          "spec": {"clusterIP": "None"}});
    a.apply(ResourceKind::Service, headless).unwrap();
    let h = a.get(ResourceKind::Service, "ns", "h").unwrap();
    assert_eq!(h["spec"]["clusterIPs"], json!(["None"]));
    let external = json!({"metadata": {"name": "e", "namespace": "ns"},
                          "spec": {"type": "ExternalName", "externalName": "example.com"}});
    a.apply(ResourceKind::Service, external).unwrap();
    let e = a.get(ResourceKind::Service, "ns", "e").unwrap();
    assert!(e["spec"].get("clusterIP").is_none());
}

#[test]
fn continue_tokens_name_their_kind() {
    for kind in ResourceKind::ALL {
        let t = ContinueToken {
            kind,
            namespace: Some("ns".into()),
            rv: 3,
            after: ("ns".into(), "a".into()),
        };
        assert_eq!(ContinueToken::decode(&t.encode()), Some(t));
        assert_eq!(ResourceKind::from_kind(kind.kind()), Some(kind));
    }
}
