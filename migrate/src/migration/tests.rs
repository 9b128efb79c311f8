use super::*;
use ferry_discovery::file::parse_catalog;
use std::path::Path;

/// A world whose every reading the test sets.
struct Fixed {
    service: Service,
    acks: Acks,
    load: BTreeMap<String, Load>,
    latency: Latency,
    deploys: BTreeMap<DeployStep, DeployProgress>,
    asked: std::cell::RefCell<Vec<DeployStep>>,
}

impl World for Fixed {
    fn service(&self, _: &ServiceName) -> Option<&Service> {
        Some(&self.service)
    }
    fn weights(&self, _: &ServiceName) -> Option<Weights> {
        self.service.effective_weights()
    }
    fn acks(&self, _: u64) -> Acks {
        self.acks
    }
    fn load(&self, _: &ServiceName, cluster: &ClusterName, _: i64) -> Load {
        self.load.get(cluster.as_str()).copied().unwrap_or_default()
    }
    fn latency(&self, _: &Migration) -> Latency {
        self.latency
    }
    fn deploy(&self, _: &Migration, step: DeployStep) -> DeployProgress {
        self.asked.borrow_mut().push(step);
        self.deploys
            .get(&step)
            .cloned()
            .unwrap_or(DeployProgress::Pending)
    }
}

fn acks(acked: usize, connected: usize, returning: usize) -> Acks {
    Acks {
        acked,
        connected,
        returning,
    }
}

fn c(name: &str) -> ClusterName {
    ClusterName::new(name).unwrap()
}

fn world() -> Fixed {
    let yaml = "services:\n  - name: a\n    namespace: ns\n    ports: [{name: http, port: 80}]\n    backends:\n      old1: {endpoints: [\"127.0.0.1:1\", \"127.0.0.2:1\"]}\n      old2: {endpoints: [\"127.0.0.3:1\"]}\n      new: {endpoints: [\"127.0.0.4:1\", \"127.0.0.5:1\"]}\n    weights: {old1: 7500, old2: 2500, new: 0}\n";
    let service = parse_catalog(Path::new("t.yaml"), yaml).unwrap().remove(0);
    Fixed {
        service,
        acks: acks(1, 1, 0),
        load: BTreeMap::new(),
        latency: Latency::default(),
        deploys: BTreeMap::new(),
        asked: Default::default(),
    }
}

fn migration() -> Migration {
    Migration {
        id: "mig-1".into(),
        plan: Plan {
            service: ServiceName::parse("a.ns").unwrap(),
            from: vec![c("old1"), c("old2")],
            to: c("new"),
            steps: vec![1000, 5000, 10000],
            bake_ms: 1000,
            gates: Gates {
                min_requests: 10,
                data_timeout_ms: 5000,
                ..Gates::default()
            },
            ack_share: 1.0,
            ack_timeout_ms: 2000,
            double_deploy_timeout_ms: 3000,
            min_capacity: 0.5,
            drain_ms: 500,
            min_proxies: 1,
            targets: Vec::new(),
            deploy: Deploy::None,
        },
        stage: Stage::Validate,
        source_weights: BTreeMap::new(),
        weights: BTreeMap::new(),
        reason: String::new(),
        purpose: "test".into(),
        gates: Vec::new(),
        created_by: "t".into(),
        created_at_ms: 0,
        updated_at_ms: 0,
        phase_started_ms: 0,
        applied_version: 0,
        acks: None,
        hold: false,
    }
}

fn take(next: Next) -> Transition {
    match next {
        Next::Transition(t) => *t,
        other => panic!("expected a transition, got {other:?}"),
    }
}

fn bp(w: &Weights, cluster: &str) -> u32 {
    w.get(&c(cluster)).basis_points()
}

#[test]
fn a_migration_walks_every_stage_and_splits_sources_as_they_were() {
    let mut w = world();
    let mut m = migration();
    // Validate → pinned, sources' split recorded.
    let t = take(next(&m, &w, 0));
    assert_eq!(t.to.stage, Stage::DoubleDeploy);
    assert!(matches!(&t.pin, Some(Some(p)) if p.owner == "migration/mig-1"));
    assert_eq!(
        t.to.source_weights,
        BTreeMap::from([(c("old1"), 7500), (c("old2"), 2500)])
    );
    m = t.to;
    // Double deploy → first step: 10 % to new, 90 % split 3:1.
    let t = take(next(&m, &w, 10));
    let weights = t.weights.clone().unwrap();
    assert_eq!(
        (
            bp(&weights, "new"),
            bp(&weights, "old1"),
            bp(&weights, "old2")
        ),
        (1000, 6750, 2250)
    );
    m = t.to;
    assert_eq!(
        m.stage,
        Stage::Shift {
            step: 0,
            phase: StepPhase::AwaitingAck
        }
    );
    // Waits for every proxy, then bakes.
    w.acks = acks(1, 2, 0);
    assert!(matches!(next(&m, &w, 20), Next::Observe(_)));
    w.acks = acks(2, 2, 0);
    m = take(next(&m, &w, 30)).to;
    assert_eq!(m.stage.phase_str(), "BAKING");
    // Healthy data, but the bake is not over: no step yet.
    w.load.insert(
        "old1".into(),
        Load {
            requests: 100,
            errors: 1,
        },
    );
    w.load.insert(
        "new".into(),
        Load {
            requests: 20,
            errors: 0,
        },
    );
    assert!(!matches!(next(&m, &w, 500), Next::Transition(_)));
    let t = take(next(&m, &w, 1100));
    assert_eq!(t.to.stage.step(), Some(1));
    assert_eq!(bp(t.weights.as_ref().unwrap(), "new"), 5000);
    m = t.to;
    m = take(next(&m, &w, 1200)).to; // acked
    m = take(next(&m, &w, 2300)).to; // step 3
    assert_eq!(m.stage.step(), Some(2));
    m = take(next(&m, &w, 2400)).to; // acked
    // Last step: the sources carry nothing; the reference is the
    // source's rate from the step before. It ends only once the
    // sources were seen idle for SOURCES_QUIET_MS.
    w.load.remove("old1");
    assert!(!matches!(next(&m, &w, 3500), Next::Transition(_)));
    let t = take(next(&m, &w, 2400 + SOURCES_QUIET_MS));
    assert_eq!(t.to.stage, Stage::Cleanup);
    assert_eq!(bp(t.weights.as_ref().unwrap(), "new"), 10000);
    m = t.to;
    let cleanup = m.phase_started_ms;
    assert!(
        matches!(next(&m, &w, cleanup + 100), Next::Wait),
        "drains first"
    );
    m = take(next(&m, &w, cleanup + 600)).to;
    assert_eq!(m.stage, Stage::Unpin);
    let t = take(next(&m, &w, cleanup + 700));
    assert_eq!(
        t.to.stage,
        Stage::Done {
            source_deleted: false
        }
    );
    assert_eq!(t.pin, Some(None), "the pin is released");
}

#[test]
fn a_worse_target_rolls_back_at_once_to_the_sources() {
    let mut w = world();
    let mut m = migration();
    m = take(next(&m, &w, 0)).to;
    m = take(next(&m, &w, 0)).to;
    m = take(next(&m, &w, 0)).to;
    assert_eq!(m.stage.phase_str(), "BAKING");
    w.load.insert(
        "old1".into(),
        Load {
            requests: 100,
            errors: 0,
        },
    );
    w.load.insert(
        "new".into(),
        Load {
            requests: 10,
            errors: 3,
        },
    );
    // Well before the bake ends.
    let t = take(next(&m, &w, 100));
    assert_eq!(t.to.stage, Stage::RollingBack);
    assert!(
        t.to.reason.contains("gate failed at step 1"),
        "{}",
        t.to.reason
    );
    let weights = t.weights.unwrap();
    assert_eq!(
        (
            bp(&weights, "new"),
            bp(&weights, "old1"),
            bp(&weights, "old2")
        ),
        (0, 7500, 2500)
    );
    assert_eq!(t.to.gates.last().unwrap().outcome, GateOutcome::Fail);
    // Once proxies hold the source weights: rolled back and unpinned.
    let t = take(next(&t.to, &w, 200));
    assert_eq!(t.to.stage, Stage::RolledBack);
    assert_eq!(t.pin, Some(None));
}

#[test]
fn not_enough_data_is_never_a_pass() {
    let mut w = world();
    let mut m = migration();
    m = take(next(&m, &w, 0)).to;
    m = take(next(&m, &w, 0)).to;
    m = take(next(&m, &w, 0)).to;
    w.load.insert(
        "old1".into(),
        Load {
            requests: 100,
            errors: 0,
        },
    );
    w.load.insert(
        "new".into(),
        Load {
            requests: 3,
            errors: 0,
        },
    );
    // Past the bake, within the data timeout: keeps waiting.
    match next(&m, &w, 2000) {
        Next::Observe(seen) => {
            assert_eq!(
                seen.gates.last().unwrap().outcome,
                GateOutcome::NotEnoughData
            )
        }
        other => panic!("{other:?}"),
    }
    // Past bake + data timeout: the gate fails.
    let t = take(next(&m, &w, 7000));
    assert_eq!(t.to.stage, Stage::RollingBack);
    assert!(t.to.reason.contains("not enough data"), "{}", t.to.reason);
}

#[test]
fn proxies_that_never_ack_roll_the_step_back() {
    let mut w = world();
    let mut m = migration();
    m = take(next(&m, &w, 0)).to;
    m = take(next(&m, &w, 0)).to;
    w.acks = acks(1, 3, 0);
    assert!(!matches!(next(&m, &w, 1000), Next::Transition(_)));
    let t = take(next(&m, &w, 2500));
    assert_eq!(t.to.stage, Stage::RollingBack);
    assert!(
        t.to.reason
            .contains("1/3 proxies hold the step's weights; 3 needed"),
        "{}",
        t.to.reason
    );
}

#[test]
fn no_proxy_is_never_an_acknowledgement() {
    let mut w = world();
    let mut m = migration();
    m = take(next(&m, &w, 0)).to;
    m = take(next(&m, &w, 0)).to;
    assert_eq!(m.stage.phase_str(), "AWAITING_ACK");
    w.acks = acks(0, 0, 0);
    assert!(!matches!(next(&m, &w, 100), Next::Transition(_)));
    assert_eq!(
        w.acks.waiting_for(&m.plan),
        "0 of at least 1 proxies connected; no proxy is no acknowledgement"
    );
    // More proxies may be required; fewer connected wait.
    m.plan.min_proxies = 3;
    w.acks = acks(2, 2, 0);
    assert!(!matches!(next(&m, &w, 200), Next::Transition(_)));
    // Nobody ever came: the step rolls back at the ACK timeout.
    w.acks = acks(0, 0, 0);
    let t = take(next(&m, &w, 2500));
    assert_eq!(t.to.stage, Stage::RollingBack);
    assert!(
        t.to.reason.contains("no proxy is no acknowledgement"),
        "{}",
        t.to.reason
    );
}

#[test]
fn proxies_connected_before_a_restart_are_waited_for() {
    let mut w = world();
    let mut m = migration();
    m = take(next(&m, &w, 0)).to;
    m = take(next(&m, &w, 0)).to;
    // One proxy is back and holds the weights; another one that was
    // connected before the restart is not back yet.
    w.acks = acks(1, 1, 1);
    match next(&m, &w, 100) {
        Next::Observe(seen) => assert!(
            seen.acks
                .unwrap_or_default()
                .waiting_for(&seen.plan)
                .contains("1 proxies connected before"),
            "{}",
            seen.acks.unwrap_or_default().waiting_for(&seen.plan)
        ),
        other => panic!("{other:?}"),
    }
    w.acks = acks(2, 2, 0);
    assert_eq!(take(next(&m, &w, 200)).to.stage.phase_str(), "BAKING");
}

#[test]
fn the_last_step_never_ends_while_the_sources_still_serve() {
    let mut w = world();
    let mut m = migration();
    m.plan.steps = vec![5000, 10000];
    m = take(next(&m, &w, 0)).to;
    m = take(next(&m, &w, 0)).to;
    m = take(next(&m, &w, 0)).to;
    let load = |requests| Load {
        requests,
        errors: 0,
    };
    w.load.insert("new".into(), load(100));
    w.load.insert("old2".into(), load(100));
    m = take(next(&m, &w, 1000)).to; // step 1 passed
    m = take(next(&m, &w, 1000)).to; // step 2 acknowledged
    assert_eq!(
        m.stage,
        Stage::Shift {
            step: 1,
            phase: StepPhase::Baking
        }
    );
    // Every proxy acknowledged, the target is healthy, but a source
    // still serves: some proxy routes by older weights.
    match next(&m, &w, 1000 + SOURCES_QUIET_MS + 100) {
        Next::Observe(seen) => {
            let g = seen.gates.last().unwrap();
            assert_eq!(g.outcome, GateOutcome::NotEnoughData);
            assert!(
                g.detail.contains("sources still served 100 requests"),
                "{}",
                g.detail
            );
        }
        other => panic!("{other:?}"),
    }
    // It never reaches CLEANUP; past the data timeout it rolls back.
    let t = take(next(&m, &w, 1000 + 1000 + 5000 + 1));
    assert_eq!(t.to.stage, Stage::RollingBack);
    assert!(
        t.to.reason.contains("some proxy still routes to them"),
        "{}",
        t.to.reason
    );
    // Had the sources been idle, it would have ended.
    w.load.remove("old2");
    let t = take(next(&m, &w, 1000 + SOURCES_QUIET_MS + 200));
    assert_eq!(t.to.stage, Stage::Cleanup);
}

#[test]
fn validation_names_what_is_wrong() {
    let w = world();
    let mut plan = migration().plan;
    plan.to = c("mars");
    let e = validate(&plan, Some(&w.service)).unwrap_err().to_string();
    assert!(e.starts_with("to:") && e.contains("mars"), "{e}");
    let mut plan = migration().plan;
    plan.from = vec![c("old1")];
    // old2 carries 25 % and is neither source nor target.
    let e = source_weights(&plan, &w.service.effective_weights().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("old2"), "{e}");
    let mut plan = migration().plan;
    plan.min_capacity = 2.0;
    let e = validate(&plan, Some(&w.service)).unwrap_err().to_string();
    assert!(e.contains("ready endpoints"), "{e}");
}

#[test]
fn a_held_migration_finishes_its_step_then_pauses_and_resumes_there() {
    let mut w = world();
    let mut m = migration();
    m.hold = true;
    // Held before it starts: it pauses there, having changed nothing.
    let t = take(next(&m, &w, 0));
    assert_eq!(
        t.to.stage,
        Stage::Paused {
            resume: Resume::Validate
        }
    );
    assert!(t.weights.is_none() && t.pin.is_none());
    m.hold = false;
    m = take(next(&m, &w, 0)).to; // pinned
    m = take(next(&m, &w, 10)).to; // step 1 set
    w.acks = acks(2, 2, 0);
    m = take(next(&m, &w, 30)).to; // acked: baking
    m.hold = true;
    for (cluster, requests) in [("old1", 100), ("new", 20)] {
        w.load.insert(
            cluster.into(),
            Load {
                requests,
                errors: 0,
            },
        );
    }
    // The step bakes in full and passes, then the migration pauses at
    // step 1's weights instead of moving to step 2.
    assert!(!matches!(next(&m, &w, 500), Next::Transition(_)));
    let t = take(next(&m, &w, 1100));
    assert_eq!(
        t.to.stage,
        Stage::Paused {
            resume: Resume::Shift {
                step: 0,
                phase: StepPhase::Baking
            }
        },
        "still at step 1"
    );
    assert!(t.weights.is_none(), "weights unchanged");
    assert_eq!(
        t.to.gates.last().map(|g| g.outcome),
        Some(GateOutcome::Pass)
    );
    // A paused migration waits.
    assert!(matches!(next(&t.to, &w, 5000), Next::Wait));
}

fn two_targets() -> (Fixed, Migration) {
    let yaml = "services:\n  - name: a\n    namespace: ns\n    ports: [{name: http, port: 80}]\n    backends:\n      old1: {endpoints: [\"127.0.0.1:1\"]}\n      new-a: {endpoints: [\"127.0.0.4:1\"]}\n      new-b: {endpoints: [\"127.0.0.5:1\"]}\n    weights: {old1: 10000, new-a: 0, new-b: 0}\n";
    let service = parse_catalog(Path::new("t.yaml"), yaml).unwrap().remove(0);
    let w = Fixed {
        service,
        acks: acks(1, 1, 0),
        load: BTreeMap::new(),
        latency: Latency::default(),
        deploys: BTreeMap::new(),
        asked: Default::default(),
    };
    let mut m = migration();
    m.plan.from = vec![c("old1")];
    m.plan.to = c("new-a");
    m.plan.targets = vec![(c("new-a"), 6000), (c("new-b"), 4000)];
    m.plan.steps = vec![5000, 10000];
    (w, m)
}

#[test]
fn several_targets_share_each_step_and_are_each_judged() {
    let (mut w, mut m) = two_targets();
    m = take(next(&m, &w, 0)).to; // pinned
    let t = take(next(&m, &w, 10)); // step 1: 50 % to the targets, 60/40
    let weights = t.weights.clone().unwrap();
    assert_eq!(
        (
            bp(&weights, "old1"),
            bp(&weights, "new-a"),
            bp(&weights, "new-b")
        ),
        (5000, 3000, 2000)
    );
    m = take(next(&t.to, &w, 20)).to; // acked
    assert_eq!(m.stage.phase_str(), "BAKING");
    // new-b fails while new-a is fine: the step fails, naming new-b.
    for (cluster, requests, errors) in [("old1", 100, 0), ("new-a", 60, 0), ("new-b", 40, 20)] {
        w.load.insert(cluster.into(), Load { requests, errors });
    }
    let t = take(next(&m, &w, 500));
    assert_eq!(t.to.stage, Stage::RollingBack);
    assert!(t.to.reason.contains("new-b fail"), "{}", t.to.reason);
    assert!(t.to.reason.contains("new-a pass"), "{}", t.to.reason);
    let back = t.weights.unwrap();
    assert_eq!(
        (bp(&back, "old1"), bp(&back, "new-a"), bp(&back, "new-b")),
        (10000, 0, 0)
    );
    // Both healthy: the last step gives each its share of everything.
    w.load.insert(
        "new-b".into(),
        Load {
            requests: 40,
            errors: 0,
        },
    );
    let t = take(next(&m, &w, 1100));
    assert_eq!(t.to.stage.step(), Some(1));
    let weights = t.weights.unwrap();
    assert_eq!((bp(&weights, "new-a"), bp(&weights, "new-b")), (6000, 4000));
}

#[test]
fn several_targets_must_each_exist_and_be_ready() {
    let (w, mut m) = two_targets();
    m.plan.targets[1].0 = c("mars");
    let err = validate(&m.plan, Some(&w.service)).expect_err("mars");
    assert!(err.to_string().contains("targets[1]"), "{err}");
    assert!(
        err.to_string().contains("no backend in cluster mars"),
        "{err}"
    );
}

#[test]
fn a_hook_deploy_gates_double_deploy_cleanup_and_rollback() {
    let mut w = world();
    let mut m = migration();
    m.plan.deploy = Deploy::Hook;
    m = take(next(&m, &w, 0)).to; // pinned: DOUBLE_DEPLOY
    // Waits for the deploy, which it asks for.
    assert!(matches!(next(&m, &w, 10), Next::Wait));
    assert_eq!(w.asked.borrow().last(), Some(&DeployStep::Deploy));
    // A failed deploy fails the migration and releases the pin.
    w.deploys.insert(
        DeployStep::Deploy,
        DeployProgress::Failed("exit 3: no quota".into()),
    );
    let t = take(next(&m, &w, 20));
    assert_eq!(t.to.stage, Stage::Failed);
    assert!(
        t.to.reason
            .contains("the hook deploy failed: exit 3: no quota")
    );
    assert_eq!(t.pin, Some(None));
    // So does one that takes too long.
    w.deploys.clear();
    let t = take(next(&m, &w, 3001));
    assert_eq!(t.to.stage, Stage::Failed);
    assert!(
        t.to.reason.contains("did not finish within"),
        "{}",
        t.to.reason
    );
    // Done: the first step.
    w.deploys.insert(DeployStep::Deploy, DeployProgress::Done);
    m = take(next(&m, &w, 30)).to;
    assert_eq!(
        m.stage,
        Stage::Shift {
            step: 0,
            phase: StepPhase::AwaitingAck
        }
    );
    // A rollback undoes the deploy once proxies hold the source weights.
    let Next::Transition(t) = begin_rollback(&m, "test".into(), 40) else {
        panic!("rollback");
    };
    let rolling = t.to;
    assert!(
        matches!(next(&rolling, &w, 50), Next::Wait),
        "waits for the undo"
    );
    assert_eq!(w.asked.borrow().last(), Some(&DeployStep::Undo));
    w.deploys.insert(DeployStep::Undo, DeployProgress::Done);
    let t = take(next(&rolling, &w, 60));
    assert_eq!(t.to.stage, Stage::RolledBack);
    assert!(t.detail.contains("the deploy was undone"), "{}", t.detail);
    // CLEANUP retires the source after the drain; a failure is reported,
    // and the migration still ends.
    let mut cleanup = m.clone();
    cleanup.stage = Stage::Cleanup;
    cleanup.phase_started_ms = 100;
    assert!(matches!(next(&cleanup, &w, 200), Next::Wait), "draining");
    assert!(matches!(next(&cleanup, &w, 700), Next::Wait), "retiring");
    assert_eq!(w.asked.borrow().last(), Some(&DeployStep::Retire));
    w.deploys.insert(
        DeployStep::Retire,
        DeployProgress::Failed("scale refused".into()),
    );
    let t = take(next(&cleanup, &w, 800));
    assert_eq!(t.to.stage, Stage::Unpin);
    assert!(
        t.to.reason
            .contains("the source was not retired: scale refused")
    );
}

#[test]
fn pause_resume_and_abort_are_decided_from_the_record_alone() {
    let w = world();
    let mut m = migration();
    // Aborted before it started: it ends, changing no weight and no pin.
    let t = abort(&m, "alice", "wrong service", 5).expect("abort");
    assert_eq!(t.to.stage, Stage::RolledBack);
    assert!(t.weights.is_none() && t.pin.is_none());
    assert_eq!(t.to.reason, "aborted by alice: wrong service");
    m = take(next(&m, &w, 0)).to; // pinned
    m = take(next(&m, &w, 10)).to; // step 1 set
    // Paused while shifting, then resumed where it was, its wait started
    // afresh.
    let paused = pause(&m, "bob", "freeze").expect("pause").to;
    assert_eq!(
        paused.stage,
        Stage::Paused {
            resume: Resume::Shift {
                step: 0,
                phase: StepPhase::AwaitingAck
            }
        }
    );
    assert!(pause(&paused, "bob", "again").is_err(), "not twice");
    let resumed = resume(&paused, "go on", 99).expect("resume").to;
    assert_eq!(
        (resumed.stage, resumed.phase_started_ms),
        (
            Stage::Shift {
                step: 0,
                phase: StepPhase::AwaitingAck
            },
            99
        )
    );
    assert!(resume(&resumed, "again", 100).is_err(), "not paused");
    // Aborted with weights set: all traffic back to the sources.
    let t = abort(&resumed, "carol", "stop", 120).expect("abort");
    assert_eq!(t.to.stage, Stage::RollingBack);
    assert_eq!(bp(t.weights.as_ref().expect("weights"), "new"), 0);
    let err = abort(&t.to, "carol", "again", 130).expect_err("already rolling back");
    assert!(err.to_string().contains("already rolling back"), "{err}");
}

#[test]
fn every_stage_survives_the_stored_form() {
    let shift = |step, phase| Stage::Shift { step, phase };
    for stage in [
        Stage::Validate,
        Stage::DoubleDeploy,
        shift(0, StepPhase::AwaitingAck),
        shift(2, StepPhase::Baking),
        Stage::Cleanup,
        Stage::Unpin,
        Stage::Done {
            source_deleted: false,
        },
        Stage::Done {
            source_deleted: true,
        },
        Stage::Paused {
            resume: Resume::Validate,
        },
        Stage::Paused {
            resume: Resume::DoubleDeploy,
        },
        Stage::Paused {
            resume: Resume::Shift {
                step: 1,
                phase: StepPhase::Baking,
            },
        },
        Stage::RollingBack,
        Stage::RolledBack,
        Stage::Failed,
    ] {
        let mut m = migration();
        m.stage = stage;
        let json = serde_json::to_string(&m).unwrap();
        let back: Migration = serde_json::from_str(&json).unwrap();
        assert_eq!(back.stage, stage, "{json}");
    }
}

#[test]
fn a_record_written_before_the_typed_stage_loads() {
    let mut v = serde_json::to_value(migration()).unwrap();
    v["stage"] = "PAUSED".into();
    v["phase"] = "NONE".into();
    v["step"] = 1.into();
    v["paused_from"] = serde_json::json!(["SHIFT", "AWAITING_ACK"]);
    let m: Migration = serde_json::from_value(v).unwrap();
    assert_eq!(
        m.stage,
        Stage::Paused {
            resume: Resume::Shift {
                step: 1,
                phase: StepPhase::AwaitingAck
            }
        }
    );
}

#[test]
fn a_record_naming_an_impossible_stage_is_refused_with_what_is_wrong() {
    let base = serde_json::to_value(migration()).unwrap();
    for (fields, wrong) in [
        (
            serde_json::json!({"stage": "SHIFT", "phase": "NONE"}),
            "phase",
        ),
        (
            serde_json::json!({"stage": "SHIFT", "phase": "BAKING", "step": 3}),
            "outside the plan's 3 steps",
        ),
        (
            serde_json::json!({"stage": "PAUSED", "paused_from": null}),
            "where it resumes",
        ),
        (
            serde_json::json!({"stage": "PAUSED", "paused_from": ["DONE", "NONE"]}),
            "cannot resume into DONE",
        ),
    ] {
        let mut v = base.clone();
        for (k, x) in fields.as_object().unwrap() {
            v[k] = x.clone();
        }
        let e = serde_json::from_value::<Migration>(v).unwrap_err();
        assert!(e.to_string().contains(wrong), "{fields}: {e}");
    }
}

#[test]
fn create_checks_the_plan_against_the_service_and_keeps_its_source_split() {
    let w = world();
    let current = w.service.effective_weights();
    let plan = migration().plan;
    let (m, detail) = create(
        "mig-7".into(),
        plan.clone(),
        Some(&w.service),
        current.as_ref(),
        "alice",
        "move",
        42,
    )
    .unwrap();
    assert_eq!((m.id.as_str(), m.stage), ("mig-7", Stage::Validate));
    assert_eq!((m.created_at_ms, m.phase_started_ms), (42, 42));
    assert_eq!(m.source_weights.get(&c("old1")), Some(&7500));
    assert!(detail.contains("old1+old2 → new"), "{detail}");
    // A target the service has no backend in is refused, naming it.
    let mut elsewhere = plan.clone();
    elsewhere.to = c("mars");
    let e = create(
        "mig-8".into(),
        elsewhere,
        Some(&w.service),
        current.as_ref(),
        "alice",
        "move",
        42,
    )
    .unwrap_err();
    assert!(e.to_string().contains("mars"), "{e}");
    // So is a service the catalog does not have.
    let e = create("mig-9".into(), plan, None, None, "alice", "move", 42).unwrap_err();
    assert!(e.to_string().contains("a.ns"), "{e}");
}
