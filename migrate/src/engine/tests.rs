//! The engine against a world and a clock of the test's own: a real store
//! (redb in a temporary directory), a real policy and catalog, and a fake
//! [`World`] whose proxies acknowledge at once and whose sides serve
//! healthy load. Each pass is one `tick_at(world, now)`.

use std::cell::RefCell;
use std::path::Path;

use ferry_discovery::file::parse_catalog;

use super::*;
use crate::campaign::{CampaignPlan, CampaignState, Order};
use crate::migration::{Deploy, Gates, Resume};
use crate::store::Store;

/// Proxies that hold every version, and every side serving `requests`
/// healthy requests since any time; `broken` clusters fail them all.
struct FakeWorld<'a> {
    policy: &'a Policy,
    catalog: CatalogSnapshot,
    requests: u64,
    broken: Vec<ClusterName>,
    asked: RefCell<Vec<DeployStep>>,
}

impl World for FakeWorld<'_> {
    fn service(&self, name: &ServiceName) -> Option<&Service> {
        self.catalog.services.get(name).map(|s| &**s)
    }
    fn weights(&self, name: &ServiceName) -> Option<Weights> {
        self.policy
            .weights(&name.to_string())
            .ok()
            .map(|(_, w, _, _)| w)
    }
    fn acks(&self, _: u64) -> Acks {
        Acks {
            acked: 1,
            connected: 1,
            returning: 0,
        }
    }
    fn load(&self, service: &ServiceName, cluster: &ClusterName, _: i64) -> Load {
        // What a proxy following the weights would report.
        let share = self
            .weights(service)
            .map(|w| w.get(cluster).basis_points())
            .unwrap_or(0);
        let requests = self.requests * u64::from(share) / 10_000;
        let errors = if self.broken.contains(cluster) {
            requests
        } else {
            0
        };
        Load { requests, errors }
    }
    fn deploy(&self, _: &Migration, step: DeployStep) -> DeployProgress {
        self.asked.borrow_mut().push(step);
        DeployProgress::Done
    }
    fn latency(&self, _: &Migration) -> Latency {
        Latency::default()
    }
}

fn catalog_yaml(count: usize) -> String {
    let mut yaml = String::from("services:\n");
    for i in 0..count {
        yaml.push_str(&format!(
            "  - name: s{i}\n    namespace: shop\n    ports: [{{name: http, port: 80}}]\n    backends:\n      old: {{endpoints: [\"10.0.0.{i}:80\"]}}\n      new: {{endpoints: [\"10.1.0.{i}:80\"]}}\n    weights: {{old: 10000, new: 0}}\n"
        ));
    }
    yaml
}

struct Harness {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    catalog: Arc<Catalog>,
}

impl Harness {
    fn new(services: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.redb");
        let catalog = Arc::new(Catalog::new());
        let parsed = parse_catalog(Path::new("c.yaml"), &catalog_yaml(services)).expect("catalog");
        catalog.replace(parsed);
        Self {
            _dir: dir,
            path,
            catalog,
        }
    }

    /// An engine on the store, as a fresh start (or a restart) loads it.
    async fn engine(&self, concurrency: usize) -> (Arc<Engine>, Arc<Policy>) {
        let store = Store::open(&self.path).expect("store");
        let policy = Arc::new(
            Policy::load(Box::new(store), self.catalog.clone())
                .await
                .expect("policy"),
        );
        let engine = Engine::load(
            policy.clone(),
            self.catalog.clone(),
            Arc::new(SnapshotCache::default()),
            Arc::new(ClientRegistry::default()),
            Arc::new(LoadReports::default()),
            Arc::new(Fleet::default()),
            EngineConfig {
                concurrency,
                ..EngineConfig::default()
            },
        )
        .await
        .expect("engine");
        (engine, policy)
    }
}

fn template() -> Plan {
    Plan {
        service: ServiceName::parse("template.campaign").expect("name"),
        from: vec![ClusterName::new("old").expect("c")],
        to: ClusterName::new("new").expect("c"),
        steps: vec![5000, 10000],
        bake_ms: 1000,
        gates: Gates {
            min_requests: 10,
            data_timeout_ms: 5000,
            ..Gates::default()
        },
        ack_share: 1.0,
        ack_timeout_ms: 60_000,
        double_deploy_timeout_ms: 60_000,
        min_capacity: 0.5,
        drain_ms: 0,
        min_proxies: 1,
        targets: Vec::new(),
        deploy: Deploy::None,
    }
}

fn campaign_plan(concurrency: u32, max_failures: u32) -> CampaignPlan {
    CampaignPlan {
        from: ClusterName::new("old").expect("c"),
        to: ClusterName::new("new").expect("c"),
        services: Vec::new(),
        namespaces: Vec::new(),
        concurrency,
        max_failures,
        order: Order::Name,
        template: template(),
    }
}

fn world<'a>(policy: &'a Policy, harness: &Harness, broken: &[&str]) -> FakeWorld<'a> {
    FakeWorld {
        policy,
        catalog: (*harness.catalog.current()).clone(),
        requests: 1000,
        broken: broken
            .iter()
            .map(|c| ClusterName::new(c).expect("c"))
            .collect(),
        asked: RefCell::new(Vec::new()),
    }
}

/// Ticks every 500 ms of the fake clock, `passes` times, from `start`;
/// returns the clock after.
async fn run(engine: &Engine, world: &FakeWorld<'_>, start: i64, passes: usize) -> i64 {
    let mut now = start;
    for _ in 0..passes {
        engine.tick_at(world, now).await;
        now += 500;
    }
    now
}

#[tokio::test]
async fn a_campaign_runs_to_done_within_its_concurrency_on_a_fake_clock() {
    let h = Harness::new(5);
    let (engine, policy) = h.engine(10).await;
    let c = engine
        .create_campaign(campaign_plan(2, 3), "alice", "retire old")
        .await
        .expect("create");
    let w = world(&policy, &h, &[]);
    let mut now = now_ms();
    let mut most_in_flight = 0;
    for _ in 0..200 {
        now = run(&engine, &w, now, 1).await;
        let c = engine.get_campaign(&c.id).expect("get");
        most_in_flight = most_in_flight.max(c.counts().in_flight);
        if c.state.is_terminal() {
            break;
        }
    }
    let c = engine.get_campaign(&c.id).expect("get");
    assert_eq!(c.state, CampaignState::Done, "{c:#?}");
    assert_eq!(c.counts().done, 5);
    assert_eq!(most_in_flight, 2, "never above the campaign's concurrency");
    for i in 0..5 {
        let (_, weights, _, _) = policy.weights(&format!("s{i}.shop")).expect("weights");
        assert_eq!(
            weights
                .get(&ClusterName::new("new").expect("c"))
                .basis_points(),
            10_000
        );
    }
    // One migration per service, each DONE.
    let all = engine.list(None, false);
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|m| m.stage
        == Stage::Done {
            source_deleted: false
        }));
}

#[tokio::test]
async fn a_failing_target_rolls_back_and_max_failures_halts_the_campaign() {
    let h = Harness::new(4);
    let (engine, policy) = h.engine(10).await;
    let c = engine
        .create_campaign(campaign_plan(2, 1), "alice", "retire old")
        .await
        .expect("create");
    let w = world(&policy, &h, &["new"]);
    run(&engine, &w, now_ms(), 60).await;
    let c = engine.get_campaign(&c.id).expect("get");
    assert_eq!(c.state, CampaignState::Halted, "{c:#?}");
    let counts = c.counts();
    assert_eq!((counts.rolled_back, counts.queued, counts.done), (2, 2, 0));
    // Every service is back on old.
    for i in 0..4 {
        let (_, weights, _, _) = policy.weights(&format!("s{i}.shop")).expect("weights");
        assert_eq!(
            weights
                .get(&ClusterName::new("new").expect("c"))
                .basis_points(),
            0
        );
    }
}

#[tokio::test]
async fn a_restart_mid_campaign_resumes_from_the_store_without_launching_twice() {
    let h = Harness::new(4);
    let id = {
        let (engine, policy) = h.engine(10).await;
        let c = engine
            .create_campaign(campaign_plan(2, 3), "alice", "retire old")
            .await
            .expect("create");
        let w = world(&policy, &h, &[]);
        // Two launched, mid-step.
        run(&engine, &w, now_ms(), 3).await;
        let c = engine.get_campaign(&c.id).expect("get");
        assert_eq!(c.counts().in_flight, 2, "{c:#?}");
        c.id
        // The engine and its store handle drop here: a crash.
    };
    let (engine, policy) = h.engine(10).await;
    let c = engine.get_campaign(&id).expect("loaded");
    assert_eq!(c.counts().in_flight, 2);
    assert_eq!(
        engine.list(None, false).len(),
        2,
        "only the launched migrations"
    );
    let w = world(&policy, &h, &[]);
    run(&engine, &w, now_ms(), 120).await;
    let c = engine.get_campaign(&id).expect("get");
    assert_eq!(c.state, CampaignState::Done, "{c:#?}");
    let all = engine.list(None, false);
    assert_eq!(all.len(), 4, "one migration per service");
    let services: std::collections::BTreeSet<String> =
        all.iter().map(|m| m.plan.service.to_string()).collect();
    assert_eq!(services.len(), 4);
}

#[tokio::test]
async fn pausing_holds_migrations_at_a_step_boundary_and_resuming_finishes_them() {
    let h = Harness::new(2);
    let (engine, policy) = h.engine(10).await;
    let c = engine
        .create_campaign(campaign_plan(2, 3), "alice", "retire old")
        .await
        .expect("create");
    let w = world(&policy, &h, &[]);
    let now = run(&engine, &w, now_ms(), 3).await;
    engine
        .pause_campaign(&c.id, "bob", "freeze")
        .await
        .expect("pause");
    let now = run(&engine, &w, now, 20).await;
    let held = engine.list(None, true);
    assert_eq!(held.len(), 2);
    assert!(
        held.iter().all(|m| m.stage
            == Stage::Paused {
                resume: Resume::Shift {
                    step: 0,
                    phase: StepPhase::Baking
                }
            }),
        "held at the end of step 1: {held:#?}"
    );
    // Held at 50 %: the first step's weights.
    let (_, weights, _, _) = policy.weights("s0.shop").expect("weights");
    assert_eq!(
        weights
            .get(&ClusterName::new("new").expect("c"))
            .basis_points(),
        5000
    );
    engine
        .resume_campaign(&c.id, "bob", "go")
        .await
        .expect("resume");
    run(&engine, &w, now, 60).await;
    assert_eq!(
        engine.get_campaign(&c.id).expect("get").state,
        CampaignState::Done
    );
}
