//! Drives `ferry-testkube` with the real kube-rs client, `watcher` and
//! reflector: token and client-certificate auth, kubeconfig loading, paging,
//! selectors, raw watch events, in-stream 410s, the watcher's recovery from
//! history expiry, dropped watches and a server stop/restart, and MCS
//! ServiceExports with and without their CRD.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_testkube::{ClientCert, Credentials, ResourceKind, TestKube};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchEvent, WatchParams,
};
use kube::discovery::Discovery;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::mpsc;

const TOKEN: &str = "test-token-1234";

/// Polls `check` every 20 ms until it holds, panicking after `secs`.
async fn eventually(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ready(ip: &str) -> (&str, bool, bool, bool, Option<&'static str>) {
    (ip, true, true, false, Some("zone-a"))
}

fn slice_ips(s: &EndpointSlice) -> Vec<String> {
    s.endpoints
        .iter()
        .flatten()
        .flat_map(|e| e.addresses.iter().cloned())
        .collect()
}

#[tokio::test]
async fn wrong_token_gets_401_from_kube() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_service("default", "web", &[], &[("http", 80)]);

    // Through a kubeconfig file with the wrong token.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    kube.kubeconfig(&path, "bad", Some("not-the-token"))
        .unwrap();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let err = Api::<Service>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 401, "{status:?}");
            assert_eq!(status.reason, "Unauthorized");
        }
        other => panic!("expected a 401 Status, got {other:?}"),
    }

    // Watches are refused the same way, and nothing is counted.
    let client = kube.client_with_token("also-wrong").await;
    let err = Api::<EndpointSlice>::all(client)
        .watch(&WatchParams::default(), "1")
        .await
        .err()
        .expect("watch must fail");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 401),
        "{err:?}"
    );
    assert_eq!(kube.list_requests(), 0);
    assert_eq!(kube.watch_requests(), 0);
}

#[tokio::test]
async fn kubeconfig_file_loads_and_objects_carry_server_metadata() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_service(
        "shop",
        "web",
        &[("app", "web")],
        &[("http", 80), ("grpc", 9090)],
    );
    kube.apply_endpoint_slice(
        "shop",
        "web-1",
        "web",
        &[ready("10.0.0.1"), ("10.0.0.2", false, true, true, None)],
        &[("http", 8080)],
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    kube.kubeconfig(&path, "east", None).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    assert_eq!(kc.current_context.as_deref(), Some("east"));
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("{}/", kube.url()));
    let client = kube::Client::try_from(config).unwrap();

    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");

    let svcs = Api::<Service>::namespaced(client.clone(), "shop")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(svcs.items.len(), 1);
    let svc = &svcs.items[0];
    assert_eq!(svc.metadata.name.as_deref(), Some("web"));
    assert_eq!(svc.metadata.namespace.as_deref(), Some("shop"));
    assert!(svc.metadata.uid.is_some());
    assert!(svc.metadata.creation_timestamp.is_some());
    let ports = svc.spec.as_ref().unwrap().ports.as_ref().unwrap();
    assert_eq!(ports.len(), 2);
    assert_eq!(
        svcs.metadata.resource_version,
        Some(kube.resource_version().to_string())
    );

    let slice = Api::<EndpointSlice>::namespaced(client.clone(), "shop")
        .get("web-1")
        .await
        .unwrap();
    assert_eq!(slice.address_type, "IPv4");
    assert_eq!(
        slice.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"],
        "web"
    );
    let endpoints = slice.endpoints.as_ref().unwrap();
    let second = &endpoints[1];
    let cond = second.conditions.as_ref().unwrap();
    assert_eq!(
        (cond.ready, cond.serving, cond.terminating),
        (Some(false), Some(true), Some(true))
    );
    assert_eq!(endpoints[0].zone.as_deref(), Some("zone-a"));

    let err = Api::<EndpointSlice>::namespaced(client, "shop")
        .get("nope")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );
}

#[tokio::test]
async fn paging_2500_slices_with_limit_500() {
    let kube = TestKube::start(TOKEN).await;
    for i in 0..2_500 {
        let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
        kube.apply_endpoint_slice(
            &format!("ns{}", i % 5),
            &format!("svc{}-{i:04}", i % 50),
            &format!("svc{}", i % 50),
            &[ready(&ip)],
            &[("http", 8080)],
        );
    }
    let client = kube.client().await;
    let api = Api::<EndpointSlice>::all(client.clone());
    let before = kube.list_requests();
    let mut names = BTreeSet::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    let mut list_rvs = BTreeSet::new();
    let mut first_token = None;
    loop {
        let mut lp = ListParams::default().limit(500);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 500);
        for s in &page.items {
            assert!(s.metadata.resource_version.is_some());
            names.insert((
                s.metadata.namespace.clone().unwrap(),
                s.metadata.name.clone().unwrap(),
            ));
        }
        list_rvs.insert(page.metadata.resource_version.clone().unwrap());
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => {
                first_token.get_or_insert_with(|| c.clone());
                token = Some(c);
            }
            None => break,
        }
    }
    assert_eq!(pages, 5);
    assert_eq!(names.len(), 2_500);
    assert_eq!(
        list_rvs.len(),
        1,
        "every page reports the list's resourceVersion"
    );
    assert_eq!(kube.list_requests() - before, 5);

    // A garbage token and a token from before a compaction are 410 Expired.
    for bad in ["garbage", "eyJrIjoiZXBzIn0"] {
        let err = api
            .list(&ListParams::default().limit(500).continue_token(bad))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 410 && s.reason == "Expired"),
            "{err:?}"
        );
    }
    kube.expire_history();
    let err = api
        .list(
            &ListParams::default()
                .limit(500)
                .continue_token(&first_token.unwrap()),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 410),
        "{err:?}"
    );

    // The runtime watcher pages the same way (page_size 500 by default).
    let before = kube.list_requests();
    let (reader, writer) = reflector::store::<EndpointSlice>();
    let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    reader.wait_until_ready().await.unwrap();
    assert_eq!(reader.len(), 2_500);
    assert_eq!(kube.list_requests() - before, 5);
    task.abort();
}

#[tokio::test]
async fn selectors_and_namespaces() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_endpoint_slice("a", "web-1", "web", &[ready("10.0.0.1")], &[("http", 80)]);
    kube.apply_endpoint_slice("a", "db-1", "db", &[ready("10.0.0.2")], &[("pg", 5432)]);
    kube.apply_endpoint_slice("b", "web-1", "web", &[ready("10.0.1.1")], &[("http", 80)]);
    kube.apply_service("a", "web", &[("tier", "front")], &[("http", 80)]);
    kube.apply_service("b", "web", &[("tier", "back")], &[("http", 80)]);
    let client = kube.client().await;

    let all = Api::<EndpointSlice>::all(client.clone());
    let web = all
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap();
    assert_eq!(web.items.len(), 2);
    let in_a = Api::<EndpointSlice>::namespaced(client.clone(), "a")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(in_a.items.len(), 2);
    let web_in_a = Api::<EndpointSlice>::namespaced(client.clone(), "a")
        .list(
            &ListParams::default()
                .labels("kubernetes.io/service-name=web,endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io"),
        )
        .await
        .unwrap();
    assert_eq!(web_in_a.items.len(), 1);
    // Field selectors on other fields are ignored, metadata.name is applied.
    let by_field = all
        .list(&ListParams::default().fields("metadata.name=db-1,spec.whatever=x"))
        .await
        .unwrap();
    assert_eq!(by_field.items.len(), 1);

    let front = Api::<Service>::all(client)
        .list(&ListParams::default().labels("tier=front"))
        .await
        .unwrap();
    assert_eq!(front.items.len(), 1);
    assert_eq!(front.items[0].metadata.namespace.as_deref(), Some("a"));
}

#[tokio::test]
async fn raw_watch_streams_event_types_and_bookmarks() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_endpoint_slice(
        "default",
        "old",
        "web",
        &[ready("10.0.0.9")],
        &[("http", 80)],
    );
    let client = kube.client().await;
    let api = Api::<EndpointSlice>::namespaced(client, "default");
    let list = api.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();

    let mut stream = api
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap()
        .boxed();
    eventually("the watch is open", 10, || kube.open_watches() == 1).await;
    kube.apply_endpoint_slice(
        "default",
        "web-1",
        "web",
        &[ready("10.0.0.1")],
        &[("http", 80)],
    );
    kube.apply_endpoint_slice(
        "default",
        "web-1",
        "web",
        &[ready("10.0.0.1"), ready("10.0.0.2")],
        &[("http", 80)],
    );
    kube.delete_endpoint_slice("default", "web-1");
    kube.apply_endpoint_slice(
        "other",
        "elsewhere",
        "web",
        &[ready("10.9.0.1")],
        &[("http", 80)],
    );

    let mut seen = Vec::new();
    let mut bookmark_rv = None;
    while bookmark_rv.is_none() {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .expect("events and a bookmark within 5 s")
            .unwrap()
            .expect("stream open");
        match ev {
            WatchEvent::Added(s) => seen.push(("ADDED", slice_ips(&s))),
            WatchEvent::Modified(s) => seen.push(("MODIFIED", slice_ips(&s))),
            WatchEvent::Deleted(s) => seen.push(("DELETED", slice_ips(&s))),
            WatchEvent::Bookmark(b) => bookmark_rv = Some(b.metadata.resource_version),
            WatchEvent::Error(e) => panic!("unexpected error event {e:?}"),
        }
    }
    let both = vec!["10.0.0.1".to_string(), "10.0.0.2".to_string()];
    assert_eq!(
        seen,
        vec![
            ("ADDED", vec!["10.0.0.1".to_string()]),
            ("MODIFIED", both.clone()),
            ("DELETED", both),
        ]
    );
    assert_eq!(bookmark_rv, Some(kube.resource_version().to_string()));

    // A new watch from the old resourceVersion replays the same history.
    let replay: Vec<_> = api
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), &rv)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(replay.len(), 3);
    assert!(matches!(replay[2], WatchEvent::Deleted(_)));

    // drop_watches kills the open stream mid-body. kube-rs treats the
    // resulting unexpected EOF as the end of the watch (so its watcher
    // resumes); tests/raw_http.rs checks the missing final chunk itself.
    kube.drop_watches();
    loop {
        // Bookmarks sent before the drop may still be buffered.
        match tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the dropped watch ends promptly")
        {
            Some(Ok(WatchEvent::Bookmark(_))) => continue,
            None | Some(Err(_)) => break,
            Some(other) => panic!("unexpected event after drop: {other:?}"),
        }
    }
    eventually("no open watches", 5, || kube.open_watches() == 0).await;
}

#[tokio::test]
async fn watch_from_expired_rv_gets_in_stream_410() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_service("default", "web", &[], &[("http", 80)]);
    let client = kube.client().await;
    let api = Api::<Service>::all(client);
    let old_rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    kube.expire_history();

    // HTTP 200 with one ERROR event, then the stream ends.
    let events: Vec<_> = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .expect("an expired watch is still HTTP 200")
        .try_collect()
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0] {
        WatchEvent::Error(status) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }

    // A re-list gives a resourceVersion that can be watched again.
    let new_rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), &new_rv)
        .await
        .unwrap()
        .boxed();
    kube.apply_service("default", "web", &[("v", "2")], &[("http", 80)]);
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(ev, WatchEvent::Modified(_)), "{ev:?}");

    // A history smaller than the change count expires old watches by itself.
    let small = TestKube::start_with(
        TOKEN,
        ferry_testkube::Options {
            history_limit: 3,
            ..Default::default()
        },
    )
    .await;
    for i in 0..10 {
        small.apply_service("default", &format!("s{i}"), &[], &[("http", 80)]);
    }
    let api = Api::<Service>::all(small.client().await);
    let events: Vec<_> = api
        .watch(&WatchParams::default(), "2")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(matches!(&events[..], [WatchEvent::Error(s)] if s.code == 410));
}

/// What a runtime watcher reported, simplified.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String, Vec<String>),
    Delete(String),
    Error(String),
}

fn spawn_watcher(
    api: Api<EndpointSlice>,
    config: watcher::Config,
) -> mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = watcher(api, config).default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
            let seen = match ev {
                Ok(watcher::Event::Init) => Seen::Init,
                Ok(watcher::Event::InitApply(s)) => Seen::InitApply(name(&s)),
                Ok(watcher::Event::InitDone) => Seen::InitDone,
                Ok(watcher::Event::Apply(s)) => Seen::Apply(name(&s), slice_ips(&s)),
                Ok(watcher::Event::Delete(s)) => Seen::Delete(name(&s)),
                Err(e) => Seen::Error(e.to_string()),
            };
            if tx.send(seen).is_err() {
                break;
            }
        }
    });
    rx
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>, skip_errors: bool) -> Seen {
    loop {
        let seen = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("watcher event within 20 s")
            .expect("watcher running");
        if skip_errors && matches!(seen, Seen::Error(_)) {
            continue;
        }
        return seen;
    }
}

#[tokio::test]
async fn runtime_watcher_sees_apply_and_delete_and_relists_after_expiry() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_endpoint_slice("default", "a", "web", &[ready("10.0.0.1")], &[("http", 80)]);
    let api = Api::<EndpointSlice>::all(kube.client().await);
    let mut rx = spawn_watcher(api, watcher::Config::default());

    assert_eq!(next_seen(&mut rx, false).await, Seen::Init);
    assert_eq!(next_seen(&mut rx, false).await, Seen::InitApply("a".into()));
    assert_eq!(next_seen(&mut rx, false).await, Seen::InitDone);
    eventually("the watch is open", 10, || kube.open_watches() == 1).await;

    kube.apply_endpoint_slice("default", "b", "web", &[ready("10.0.0.2")], &[("http", 80)]);
    assert_eq!(
        next_seen(&mut rx, false).await,
        Seen::Apply("b".into(), vec!["10.0.0.2".into()])
    );
    kube.apply_endpoint_slice("default", "b", "web", &[ready("10.0.0.3")], &[("http", 80)]);
    assert_eq!(
        next_seen(&mut rx, false).await,
        Seen::Apply("b".into(), vec!["10.0.0.3".into()])
    );
    kube.delete_endpoint_slice("default", "a");
    assert_eq!(next_seen(&mut rx, false).await, Seen::Delete("a".into()));

    // Forced expiry: the open watch ends with an in-stream 410, the watcher
    // reports it and re-lists from scratch.
    let lists = kube.list_requests();
    kube.expire_history();
    match next_seen(&mut rx, false).await {
        Seen::Error(e) => assert!(e.contains("410") || e.contains("Expired"), "{e}"),
        other => panic!("expected the 410 error, got {other:?}"),
    }
    assert_eq!(next_seen(&mut rx, true).await, Seen::Init);
    assert_eq!(next_seen(&mut rx, true).await, Seen::InitApply("b".into()));
    assert_eq!(next_seen(&mut rx, true).await, Seen::InitDone);
    assert_eq!(kube.list_requests(), lists + 1);

    // And keeps watching afterwards.
    kube.apply_endpoint_slice("default", "c", "web", &[ready("10.0.0.4")], &[("http", 80)]);
    assert_eq!(
        next_seen(&mut rx, true).await,
        Seen::Apply("c".into(), vec!["10.0.0.4".into()])
    );
}

/// Starts a reflector over all EndpointSlices; returns its reader.
async fn reflect(kube: &TestKube, config: watcher::Config) -> reflector::Store<EndpointSlice> {
    let api = Api::<EndpointSlice>::all(kube.client().await);
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(Duration::from_secs(20), reader.wait_until_ready())
        .await
        .expect("reflector ready")
        .unwrap();
    reader
}

fn snapshot(reader: &reflector::Store<EndpointSlice>) -> BTreeSet<(String, Vec<String>)> {
    reader
        .state()
        .iter()
        .map(|s| (s.metadata.name.clone().unwrap(), slice_ips(s)))
        .collect()
}

fn expect(items: &[(&str, &str)]) -> BTreeSet<(String, Vec<String>)> {
    items
        .iter()
        .map(|(n, ip)| (n.to_string(), vec![ip.to_string()]))
        .collect()
}

#[tokio::test]
async fn reflector_converges_after_expiry_dropped_watches_and_restart() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_endpoint_slice("default", "a", "web", &[ready("10.0.0.1")], &[("http", 80)]);
    kube.apply_endpoint_slice("default", "b", "web", &[ready("10.0.0.2")], &[("http", 80)]);
    let reader = reflect(&kube, watcher::Config::default()).await;
    assert_eq!(
        snapshot(&reader),
        expect(&[("a", "10.0.0.1"), ("b", "10.0.0.2")])
    );
    eventually("the watch is open", 10, || kube.open_watches() == 1).await;

    // 1. Expiry with a change right after it: re-list and converge.
    let lists = kube.list_requests();
    kube.expire_history();
    kube.apply_endpoint_slice("default", "a", "web", &[ready("10.0.1.1")], &[("http", 80)]);
    let want = expect(&[("a", "10.0.1.1"), ("b", "10.0.0.2")]);
    eventually("converged after expiry", 20, || snapshot(&reader) == want).await;
    eventually("re-listed", 20, || kube.list_requests() > lists).await;
    eventually("watching again", 20, || kube.open_watches() == 1).await;

    // 2. Dropped watch connections: changes made meanwhile still arrive.
    let watches = kube.watch_requests();
    kube.drop_watches();
    kube.delete_endpoint_slice("default", "b");
    kube.apply_endpoint_slice("default", "c", "web", &[ready("10.0.0.3")], &[("http", 80)]);
    let want = expect(&[("a", "10.0.1.1"), ("c", "10.0.0.3")]);
    eventually("converged after dropped watches", 20, || {
        snapshot(&reader) == want
    })
    .await;
    eventually("re-watched", 20, || kube.watch_requests() > watches).await;

    // 3. Server down, changes while down, server back on the same port.
    kube.stop().await;
    assert!(!kube.is_running());
    assert_eq!(kube.open_watches(), 0);
    let client = kube.client().await;
    assert!(
        Api::<EndpointSlice>::all(client.clone())
            .list(&ListParams::default())
            .await
            .is_err(),
        "a stopped server refuses connections"
    );
    kube.apply_endpoint_slice("default", "d", "web", &[ready("10.0.0.4")], &[("http", 80)]);
    kube.delete_endpoint_slice("default", "a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    kube.restart().await;
    let want = expect(&[("c", "10.0.0.3"), ("d", "10.0.0.4")]);
    eventually("converged after restart", 30, || snapshot(&reader) == want).await;
    // The old client (same CA, same token) works again.
    let list = Api::<EndpointSlice>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(list.items.len(), 2);

    // 4. And live events still flow.
    kube.apply_endpoint_slice("default", "e", "web", &[ready("10.0.0.5")], &[("http", 80)]);
    eventually("live event after restart", 20, || {
        snapshot(&reader).len() == 3
    })
    .await;
}

#[tokio::test]
async fn restart_without_stop_and_expiry_while_down() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_endpoint_slice("default", "a", "web", &[ready("10.0.0.1")], &[("http", 80)]);
    let reader = reflect(&kube, watcher::Config::default()).await;
    eventually("the watch is open", 10, || kube.open_watches() == 1).await;
    kube.stop().await;
    kube.apply_endpoint_slice("default", "a", "web", &[ready("10.0.0.9")], &[("http", 80)]);
    // History expired while the watcher was away: its resume gets a 410 and
    // it re-lists.
    kube.expire_history();
    let lists = kube.list_requests();
    kube.restart().await;
    kube.restart().await; // restarting a running server is fine too
    let want = expect(&[("a", "10.0.0.9")]);
    eventually("converged", 30, || snapshot(&reader) == want).await;
    assert!(kube.list_requests() > lists);
}

#[tokio::test]
async fn streaming_list_watcher_converges() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_endpoint_slice("default", "a", "web", &[ready("10.0.0.1")], &[("http", 80)]);
    kube.apply_endpoint_slice("default", "b", "web", &[ready("10.0.0.2")], &[("http", 80)]);
    let lists = kube.list_requests();
    let reader = reflect(&kube, watcher::Config::default().streaming_lists()).await;
    assert_eq!(
        snapshot(&reader),
        expect(&[("a", "10.0.0.1"), ("b", "10.0.0.2")])
    );
    assert_eq!(kube.list_requests(), lists, "streaming lists do not list");
    kube.delete_endpoint_slice("default", "a");
    let want = expect(&[("b", "10.0.0.2")]);
    eventually("delete seen", 20, || snapshot(&reader) == want).await;
}

#[tokio::test]
async fn service_watcher_with_label_selector() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_service("default", "web", &[("team", "x")], &[("http", 80)]);
    kube.apply_service("default", "db", &[("team", "y")], &[("pg", 5432)]);
    let api = Api::<Service>::namespaced(kube.client().await, "default");
    let (reader, writer) = reflector::store::<Service>();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default().labels("team=x")),
    )
    .default_backoff();
    tokio::spawn(stream.for_each(|_| async {}));
    reader.wait_until_ready().await.unwrap();
    let names = |r: &reflector::Store<Service>| {
        r.state()
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(names(&reader), BTreeSet::from(["web".to_string()]));
    // Relabelling moves objects in and out of the selection.
    kube.apply_service("default", "db", &[("team", "x")], &[("pg", 5432)]);
    kube.apply_service("default", "web", &[("team", "z")], &[("http", 80)]);
    eventually("selection follows labels", 20, || {
        names(&reader) == BTreeSet::from(["db".to_string()])
    })
    .await;
    // The generic apply path works for Services too.
    kube.apply(
        ResourceKind::Service,
        serde_json::json!({
            "metadata": {"name": "raw", "namespace": "default", "labels": {"team": "x"}},
            "spec": {"ports": [{"port": 1}]},
        }),
    )
    .unwrap();
    eventually("generic apply seen", 20, || names(&reader).len() == 2).await;
}

fn service_exports(client: kube::Client, ns: Option<&str>) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", "ServiceExport");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "serviceexports");
    match ns {
        Some(ns) => Api::namespaced_with(client, ns, &resource),
        None => Api::all_with(client, &resource),
    }
}

fn export_names(list: &[DynamicObject]) -> BTreeSet<String> {
    list.iter()
        .map(|o| format!("{}/{}", o.namespace().unwrap(), o.name_any()))
        .collect()
}

#[tokio::test]
async fn service_exports_list_watch_and_vanish_with_their_crd() {
    let kube = TestKube::start(TOKEN).await;
    assert!(kube.service_export_crd_installed());
    kube.apply_service_export("shop", "checkout");
    kube.apply_service_export("pay", "ledger");
    let client = kube.client().await;

    // API discovery knows the kind.
    let gvk = GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", "ServiceExport");
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let (resource, caps) = discovery
        .resolve_gvk(&gvk)
        .expect("ServiceExport discovered");
    assert_eq!(resource.plural, "serviceexports");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);

    // Lists, cluster-wide and per namespace, with server metadata.
    let all = service_exports(client.clone(), None)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(
        export_names(&all.items),
        BTreeSet::from(["pay/ledger".to_string(), "shop/checkout".to_string()])
    );
    assert!(all.items[0].metadata.resource_version.is_some());
    let shop = service_exports(client.clone(), Some("shop"));
    let got = shop.get("checkout").await.unwrap();
    assert_eq!(
        got.types.as_ref().map(|t| t.kind.as_str()),
        Some("ServiceExport")
    );

    // A runtime watcher follows applies and deletes.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut stream = watcher(shop.clone(), watcher::Config::default()).boxed();
    tokio::spawn(async move {
        while let Some(ev) = stream.next().await {
            let seen = match ev {
                Ok(watcher::Event::InitApply(o)) => format!("init {}", o.name_any()),
                Ok(watcher::Event::InitDone) => "init done".to_string(),
                Ok(watcher::Event::Apply(o)) => format!("apply {}", o.name_any()),
                Ok(watcher::Event::Delete(o)) => format!("delete {}", o.name_any()),
                Ok(watcher::Event::Init) => continue,
                Err(e) => format!("error {e}"),
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
        let _ = tx.send("ended".to_string());
    });
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a watcher event within 10 s")
            .expect("watcher running")
    };
    assert_eq!(next().await, "init checkout");
    assert_eq!(next().await, "init done");
    eventually("the watch is open", 10, || kube.open_watches() == 1).await;
    kube.apply_service_export("shop", "cart");
    assert_eq!(next().await, "apply cart");
    assert!(kube.delete_service_export("shop", "cart"));
    assert_eq!(next().await, "delete cart");

    // Without the CRD: its objects are deleted, the watch ends, and the
    // kind answers 404 (the watcher's re-watch included) and leaves
    // discovery.
    kube.set_service_export_crd(false);
    assert_eq!(next().await, "delete checkout");
    let error = next().await;
    assert!(
        error.starts_with("error") && error.contains("404"),
        "{error}"
    );
    eventually("the watch is closed", 10, || kube.open_watches() == 0).await;
    let err = service_exports(client.clone(), None)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    assert!(discovery.resolve_gvk(&gvk).is_none());
    assert!(!discovery.has_group("multicluster.x-k8s.io"));
    assert!(discovery.has_group("discovery.k8s.io"));
    let refused = kube.apply(
        ResourceKind::ServiceExport,
        serde_json::json!({"metadata": {"name": "x", "namespace": "shop"}}),
    );
    assert!(refused.is_err(), "no ServiceExport without its CRD");

    // Installed again: empty, and served.
    kube.set_service_export_crd(true);
    kube.apply_service_export("shop", "again");
    let list = service_exports(client, Some("shop"))
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(
        export_names(&list.items),
        BTreeSet::from(["shop/again".to_string()])
    );
}

/// Every error in `error`'s source chain, as text.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(" <- ");
        text.push_str(&e.to_string());
        next = e.source();
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            text.push_str(" <- ");
            text.push_str(&inner.to_string());
        }
    }
    text
}

#[tokio::test]
async fn client_certificates_authenticate_and_a_foreign_one_fails_the_handshake() {
    let kube = TestKube::start(TOKEN).await;
    kube.apply_service("default", "web", &[], &[("http", 80)]);

    // A kubeconfig file with client-certificate-data / client-key-data and
    // no token.
    let cert = kube.client_cert("ferry-east");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cert.yaml");
    kube.kubeconfig_with(&path, "east", Credentials::ClientCert(&cert))
        .unwrap();
    let yaml = std::fs::read_to_string(&path).unwrap();
    assert!(yaml.contains("client-certificate-data:") && yaml.contains("client-key-data:"));
    assert!(!yaml.contains("token:"), "{yaml}");
    assert!(
        !format!("{cert:?}").contains("PRIVATE"),
        "Debug shows no key"
    );
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let list = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    // Watches authenticate the same way.
    let api = Api::<Service>::all(client);
    let reader = {
        let (reader, writer) = reflector::store::<Service>();
        let stream = reflector(writer, watcher(api, watcher::Config::default()));
        tokio::spawn(stream.for_each(|_| async {}));
        reader.wait_until_ready().await.unwrap();
        reader
    };
    kube.apply_service("default", "db", &[], &[("pg", 5432)]);
    eventually("the watch sees db", 10, || reader.len() == 2).await;
    let by_user = kube.client_cert_requests();
    assert_eq!(by_user.keys().collect::<Vec<_>>(), ["ferry-east"]);
    assert!(by_user["ferry-east"] >= 2, "{by_user:?}");

    // A certificate from another CA: the handshake fails, nothing is served.
    let lists = kube.list_requests();
    let foreign = ClientCert::foreign("ferry-east");
    let client = kube.client_with(Credentials::ClientCert(&foreign)).await;
    let err = Api::<Service>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    let text = chain(&err);
    assert!(
        text.contains("UnknownCA") || text.contains("BadCertificate"),
        "expected a TLS alert about the client certificate: {text}"
    );
    assert_eq!(kube.list_requests(), lists);

    // Bearer tokens keep working next to client certificates.
    let list = Api::<Service>::all(kube.client().await)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(list.items.len(), 2);
    assert_eq!(kube.client_cert_requests().len(), 1);
}
