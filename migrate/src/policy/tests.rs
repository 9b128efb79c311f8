use super::*;
use crate::store::Store;
use ferry_discovery::file::parse_catalog;
use std::path::Path;

fn catalog() -> Arc<Catalog> {
    let c = Catalog::new();
    c.replace(
        parse_catalog(
            Path::new("t.yaml"),
            "services:\n  - name: a\n    namespace: ns\n    ports: [{name: http, port: 80}]\n    backends: {old: {endpoints: [\"127.0.0.1:1\"]}, new: {endpoints: [\"127.0.0.1:2\"]}}\n",
        )
        .unwrap(),
    );
    Arc::new(c)
}

fn change(weights: &[(&str, u32)]) -> WeightsChange {
    WeightsChange {
        service: "a.ns".into(),
        weights: weights.iter().map(|(c, w)| ((*c).to_owned(), *w)).collect(),
        reason: "test".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn accepted_changes_survive_a_reload_and_rejected_ones_leave_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.redb");
    {
        let policy = Policy::load(Box::new(Store::open(&path).unwrap()), catalog())
            .await
            .unwrap();
        assert_eq!(
            policy
                .set_weights(&change(&[("old", 2500), ("new", 7500)]), "t")
                .await
                .unwrap()
                .version,
            1
        );
        policy.pin("a.ns", "me", "freeze", 0).await.unwrap();
        assert!(
            policy
                .set_weights(&change(&[("old", 1)]), "t")
                .await
                .is_err()
        );
        assert_eq!(policy.version(), 2);
    }
    let policy = Policy::load(Box::new(Store::open(&path).unwrap()), catalog())
        .await
        .unwrap();
    assert_eq!(policy.version(), 2);
    let (_, w, source, _) = policy.weights("a.ns").unwrap();
    assert_eq!(source, WeightsSource::Policy);
    assert_eq!(
        w.get(&ClusterName::new("new").unwrap()).basis_points(),
        7500
    );
    assert_eq!(policy.pins().len(), 1);
    let audit = policy.audit(None, 10).await.unwrap();
    assert_eq!(audit.len(), 2);
    assert_eq!(policy.overrides().borrow().weights.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_each_get_their_own_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("policy.redb")).unwrap();
    let policy = Arc::new(Policy::load(Box::new(store), catalog()).await.unwrap());
    let writers: Vec<_> = (0..8u32)
        .map(|t| {
            let policy = policy.clone();
            tokio::spawn(async move {
                let mut versions = Vec::new();
                for i in 0..10u32 {
                    let old = t * 100 + i;
                    let c = policy
                        .set_weights(&change(&[("old", old), ("new", 10000 - old)]), "t")
                        .await
                        .unwrap();
                    // The answer is this writer's own weights.
                    assert_eq!(
                        c.weights
                            .get(&ClusterName::new("old").unwrap())
                            .basis_points(),
                        old
                    );
                    versions.push(c.version);
                }
                versions
            })
        })
        .collect();
    let mut versions = Vec::new();
    for w in writers {
        versions.extend(w.await.unwrap());
    }
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), 80, "every commit its own version");
}

#[tokio::test]
async fn the_store_refuses_a_change_made_on_a_version_it_has_moved_past() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("policy.redb")).unwrap();
    let commit = |version: u64| Commit {
        version,
        service: "a.ns".into(),
        weights: None,
        pin: None,
        migration: None,
        campaign: None,
        audit: AuditRecord {
            version,
            at_ms: 0,
            actor: "t".into(),
            action: "test".into(),
            service: "a.ns".into(),
            reason: "test".into(),
            detail: String::new(),
        },
    };
    store.commit(&commit(1)).await.unwrap();
    // A second writer that read version 0 as well.
    match store.commit(&commit(1)).await {
        Err(StoreError::Conflict {
            expected: 0,
            actual: 1,
        }) => {}
        other => panic!("a stale write: {other:?}"),
    }
    assert_eq!(store.load().await.unwrap().version, 1);
    assert_eq!(store.audit(None, 10).await.unwrap().len(), 1);
}
