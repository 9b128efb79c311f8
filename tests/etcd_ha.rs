//! The HA store on a real etcd: one leader among control planes, failover
//! within the lease TTL, migrations resumed by the new leader, and a deposed
//! leader's late writes refused by etcd.
#![cfg(feature = "etcd")]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_migrate::etcd::{self, EtcdConfig, Role};
use ferry_migrate::store::{AuditRecord, Backend, Commit, StoreError};
use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
use ferry_proto::ferry::v1::traffic_client::TrafficClient;
use ferry_proto::ferry::v1::{
    ClusterWeight, CreateMigrationRequest, GetMigrationRequest, ListAuditRequest, SetWeightsRequest,
};
use support::{Ads, Backends, Envoy, Etcd, Ferry, Steady, share, split};
use tokio_util::sync::CancellationToken;
use tonic::Code;

fn config(etcd: &Etcd, node: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: "/ferry-test".into(),
        node: node.into(),
        lease_ttl: Duration::from_secs(2),
    }
}

fn change(version: u64, actor: &str) -> Commit {
    Commit {
        version,
        service: "checkout.shop".into(),
        weights: Some(Some(BTreeMap::from([("old".to_owned(), 10_000)]))),
        pin: None,
        migration: None,
        campaign: None,
        audit: AuditRecord {
            version,
            at_ms: 0,
            actor: actor.into(),
            action: "set_weights".into(),
            service: "checkout.shop".into(),
            reason: "test".into(),
            detail: String::new(),
        },
    }
}

async fn until_leader(role: &mut tokio::sync::watch::Receiver<Role>, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        loop {
            if matches!(*role.borrow_and_update(), Role::Leader { .. }) {
                return;
            }
            if role.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_late_writes_are_refused() {
    let etcd = Etcd::start().await;
    let cancel = CancellationToken::new();
    let (a, a_election) = etcd::connect(config(&etcd, "a")).await.expect("connect a");
    let (b, b_election) = etcd::connect(config(&etcd, "b")).await.expect("connect b");
    let a_task = tokio::spawn(a_election.run(cancel.clone()));
    assert!(
        until_leader(&mut a.role(), Duration::from_secs(10)).await,
        "a never led"
    );
    tokio::spawn(b_election.run(cancel.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*b.role().borrow(), Role::Follower, "two leaders at once");

    // Only the leader writes.
    a.commit(&change(1, "a")).await.expect("leader writes");
    match b.commit(&change(2, "b")).await {
        Err(StoreError::NotLeader { leader }) => assert_eq!(leader, "a"),
        other => panic!("a follower's write: {other:?}"),
    }

    // `a` freezes (its election task stops: no renewals) but still
    // believes it leads. Its lease runs out and `b` takes over.
    a_task.abort();
    let frozen_at = Instant::now();
    assert!(
        until_leader(&mut b.role(), Duration::from_secs(10)).await,
        "b never took over"
    );
    let takeover = frozen_at.elapsed();
    assert!(
        takeover <= Duration::from_secs(4),
        "took {takeover:?} with a 2s lease"
    );
    assert!(
        matches!(*a.role().borrow(), Role::Leader { .. }),
        "a still believes it leads"
    );
    b.commit(&change(2, "b")).await.expect("new leader writes");

    // a's late write is refused by etcd, and changes nothing.
    let before = b.load().await.expect("load");
    match a.commit(&change(3, "a")).await {
        Err(StoreError::Fenced(_)) => {}
        other => panic!("a deposed leader's write: {other:?}"),
    }
    let after = b.load().await.expect("load");
    assert_eq!(after.version, 2);
    assert_eq!(before.version, after.version);
    let audit = b.audit(None, 10).await.expect("audit");
    let actors: Vec<&str> = audit.iter().map(|r| r.actor.as_str()).collect();
    assert_eq!(actors, ["a", "b"]);
    cancel.cancel();
}

fn catalog(backends: &Backends) -> String {
    support::checkout_catalog(backends)
}

async fn leading(ferry: &Ferry) -> bool {
    match support::http_get(ferry.admin_port, "localhost", "/status").await {
        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .is_ok_and(|s| s["policy"]["leading"] == true),
        other => panic!("GET /status: {other:?}\n{}", ferry.log()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_takes_over_and_resumes_the_migration() {
    let etcd = Etcd::start().await;
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let flags = |node: &'static str| {
        [
            "--etcd-endpoints",
            etcd.endpoint.as_str(),
            "--etcd-lease-ttl",
            "3s",
            "--node-name",
            node,
        ]
    };
    let mut a = Ferry::start_with(&catalog(&backends), &flags("a")).await;
    support::eventually(Duration::from_secs(10), "a leads", || leading(&a)).await;
    let b = Ferry::start_with(&catalog(&backends), &flags("b")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!leading(&b).await, "b must follow while a leads");

    // Envoy takes its config from the follower.
    let envoy = Envoy::start(&b, Ads::Delta).await;
    support::eventually(Duration::from_secs(10), "envoy routes to old", || async {
        share(
            &split(envoy.listener_port, "checkout.shop", 20).await,
            "old/",
        ) == 1.0
    })
    .await;

    // A follower refuses writes, naming the leader.
    let b_channel =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", b.api_port))
            .expect("url")
            .connect()
            .await
            .expect("connect b");
    let err = TrafficClient::new(b_channel.clone())
        .set_weights(SetWeightsRequest {
            service: "checkout.shop".into(),
            weights: vec![ClusterWeight {
                cluster: "new".into(),
                basis_points: 10_000,
            }],
            reason: "sneaky".into(),
            ..Default::default()
        })
        .await
        .expect_err("follower write");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains('a'), "{}", err.message());

    let a_channel =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", a.api_port))
            .expect("url")
            .connect()
            .await
            .expect("connect a");
    let steady = Steady::start_for(
        envoy.listener_port,
        "checkout.shop",
        Duration::from_secs(90),
    );
    let created = MigrationsClient::new(a_channel)
        .create_migration(CreateMigrationRequest {
            reason: "rebuild old".into(),
            ..support::migration_plan(&[20.0, 60.0, 100.0], "4s")
        })
        .await
        .expect("create on the leader")
        .into_inner();

    // The follower follows: it shows the migration reach its second step.
    let mut b_api = MigrationsClient::new(b_channel.clone());
    let get = GetMigrationRequest {
        id: created.id.clone(),
    };
    let mut at_step_two = None;
    for _ in 0..400 {
        // The follower may not have seen the creation yet.
        let Ok(m) = b_api
            .get_migration(get.clone())
            .await
            .map(|r| r.into_inner())
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if m.step == 1 && m.phase == "BAKING" {
            at_step_two = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = at_step_two.unwrap_or_else(|| panic!("b never saw step 2\n{}", a.log()));

    // The leader dies; b takes over within the lease TTL and finishes.
    a.kill();
    let killed = Instant::now();
    support::eventually(Duration::from_secs(8), "b leads", || leading(&b)).await;
    let takeover = killed.elapsed();
    assert!(
        takeover <= Duration::from_secs(5),
        "takeover took {takeover:?} with a 3s lease"
    );
    let mut done = None;
    for _ in 0..600 {
        let m = b_api
            .get_migration(get.clone())
            .await
            .expect("get on b")
            .into_inner();
        if matches!(m.stage.as_str(), "DONE" | "ROLLED_BACK" | "FAILED") {
            done = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answers = steady.stop().await;
    let done = done.unwrap_or_else(|| panic!("never finished\n{}", b.log()));
    assert_eq!(done.stage, "DONE", "{done:?}\n{}", b.log());
    // It resumed where it was: the step-two bake was not restarted, and
    // the audit shows the rest done by b's engine.
    assert!(
        done.gates
            .iter()
            .any(|g| g.step == 1 && g.outcome == "pass")
    );
    assert!(before.phase_started_at_unix_ms > 0);
    let audit = TrafficClient::new(b_channel)
        .list_audit(ListAuditRequest {
            service: "checkout.shop".into(),
            limit: 100,
        })
        .await
        .expect("audit")
        .into_inner()
        .entries;
    let done_entry = audit
        .iter()
        .find(|e| e.action == "migration_done")
        .expect("done audited");
    assert!(done_entry.actor.starts_with("migration/"));
    // Envoy, on the follower that became leader, never lost a request.
    let lost = answers
        .iter()
        .filter(|(_, k)| !k.starts_with("old/") && !k.starts_with("new/"))
        .count();
    assert_eq!(lost, 0, "requests failed during the failover");
    assert_eq!(
        share(
            &split(envoy.listener_port, "checkout.shop", 50).await,
            "new/"
        ),
        1.0
    );
}
