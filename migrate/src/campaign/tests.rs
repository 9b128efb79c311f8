use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ferry_discovery::{Backend, Endpoint, EndpointState, Service, ServicePort};

use super::*;
use crate::migration::Gates;

fn c(name: &str) -> ClusterName {
    ClusterName::new(name).expect("cluster name")
}

fn svc(name: &str) -> ServiceName {
    ServiceName::parse(name).expect("service name")
}

fn template() -> Plan {
    Plan {
        service: svc("template.campaign"),
        from: vec![c("old")],
        to: c("new"),
        steps: vec![5000, 10000],
        bake_ms: 1000,
        gates: Gates::default(),
        ack_share: 1.0,
        ack_timeout_ms: 2000,
        double_deploy_timeout_ms: 3000,
        min_capacity: 0.5,
        drain_ms: 500,
        min_proxies: 1,
        targets: Vec::new(),
        deploy: crate::migration::Deploy::None,
    }
}

fn plan(concurrency: u32, max_failures: u32) -> CampaignPlan {
    CampaignPlan {
        from: c("old"),
        to: c("new"),
        services: Vec::new(),
        namespaces: Vec::new(),
        concurrency,
        max_failures,
        order: Order::SmallestFirst,
        template: template(),
    }
}

fn campaign(services: &[&str], concurrency: u32, max_failures: u32) -> Campaign {
    Campaign {
        id: "camp-1".into(),
        plan: plan(concurrency, max_failures),
        state: CampaignState::Running,
        reason: String::new(),
        purpose: "retire old".into(),
        services: services
            .iter()
            .map(|s| CampaignService {
                service: svc(s),
                endpoints: 1,
                state: ServiceState::Queued,
                updated_at_ms: 0,
            })
            .collect(),
        created_by: "t".into(),
        created_at_ms: 0,
        updated_at_ms: 0,
        ended_at_ms: None,
    }
}

/// The engine as a campaign sees it: migration stages by id, and
/// services that cannot move.
#[derive(Default)]
struct FakeFleet {
    migrations: BTreeMap<String, (StageName, String)>,
    blocked: BTreeMap<String, String>,
}

impl Fleet for FakeFleet {
    fn migration(&self, id: &str) -> Option<(StageName, String)> {
        self.migrations.get(id).cloned()
    }
    fn obstacle(&self, service: &ServiceName, _: &[ClusterName]) -> Option<String> {
        self.blocked.get(&service.to_string()).cloned()
    }
}

/// Plays the engine: applies steps until the campaign waits, launching
/// migrations as `mig-<service>` in VALIDATE. Returns the services
/// launched.
fn settle(camp: &mut Campaign, fleet: &mut FakeFleet, now: i64) -> Vec<String> {
    let mut launched_now = Vec::new();
    for _ in 0..100 {
        match next(camp, fleet, now) {
            None => return launched_now,
            Some(Step::Record { to, .. }) => *camp = *to,
            Some(Step::Launch { index, plan }) => {
                let id = format!("mig-{}", plan.service);
                assert_eq!(plan.from, vec![c("old")]);
                assert_eq!(plan.to, c("new"));
                assert_eq!(plan.steps, template().steps, "the template's plan");
                fleet
                    .migrations
                    .insert(id.clone(), (StageName::Validate, String::new()));
                *camp = launched(camp, index, &id, now);
                launched_now.push(plan.service.to_string());
            }
            Some(Step::Abort { migration }) => {
                fleet
                    .migrations
                    .insert(migration, (StageName::RollingBack, "aborted".into()));
            }
        }
    }
    panic!("the campaign never settles");
}

fn end(fleet: &mut FakeFleet, service: &str, stage: StageName) {
    fleet
        .migrations
        .insert(format!("mig-{service}"), (stage, format!("{stage:?}")));
}

#[test]
fn a_campaign_keeps_its_concurrency_and_ends_done() {
    let mut camp = campaign(&["a.ns", "b.ns", "c.ns", "d.ns", "e.ns"], 2, 3);
    let mut fleet = FakeFleet::default();
    assert_eq!(settle(&mut camp, &mut fleet, 1), ["a.ns", "b.ns"]);
    assert_eq!(camp.counts().in_flight, 2);
    // Nothing more while both run.
    assert!(settle(&mut camp, &mut fleet, 2).is_empty());
    end(&mut fleet, "a.ns", StageName::Done);
    assert_eq!(settle(&mut camp, &mut fleet, 3), ["c.ns"]);
    for s in ["b.ns", "c.ns"] {
        end(&mut fleet, s, StageName::Done);
    }
    assert_eq!(settle(&mut camp, &mut fleet, 4), ["d.ns", "e.ns"]);
    for s in ["d.ns", "e.ns"] {
        end(&mut fleet, s, StageName::Done);
    }
    settle(&mut camp, &mut fleet, 5);
    assert_eq!(camp.state, CampaignState::Done);
    assert_eq!(camp.counts().done, 5);
    assert_eq!(camp.ended_at_ms, Some(5));
    assert_eq!(camp.reason, "5 done, 0 rolled back, 0 skipped");
}

#[test]
fn a_rollback_counts_as_a_failure_and_the_campaign_goes_on() {
    let mut camp = campaign(&["a.ns", "b.ns", "c.ns"], 1, 3);
    let mut fleet = FakeFleet::default();
    settle(&mut camp, &mut fleet, 1);
    end(&mut fleet, "a.ns", StageName::RolledBack);
    assert_eq!(settle(&mut camp, &mut fleet, 2), ["b.ns"]);
    assert!(matches!(
        camp.services[0].state,
        ServiceState::RolledBack { .. }
    ));
    end(&mut fleet, "b.ns", StageName::Done);
    settle(&mut camp, &mut fleet, 3);
    end(&mut fleet, "c.ns", StageName::Done);
    settle(&mut camp, &mut fleet, 4);
    assert_eq!(camp.state, CampaignState::Done);
    assert_eq!(camp.reason, "2 done, 1 rolled back, 0 skipped");
}

#[test]
fn max_failures_halts_launching_lets_in_flight_finish_and_lists_failures() {
    let mut camp = campaign(&["a.ns", "b.ns", "c.ns", "d.ns"], 2, 1);
    let mut fleet = FakeFleet::default();
    settle(&mut camp, &mut fleet, 1);
    end(&mut fleet, "a.ns", StageName::RolledBack);
    assert!(
        settle(&mut camp, &mut fleet, 2).is_empty(),
        "nothing new after the failure"
    );
    assert_eq!(camp.state, CampaignState::Halting);
    end(&mut fleet, "b.ns", StageName::Done);
    settle(&mut camp, &mut fleet, 3);
    assert_eq!(camp.state, CampaignState::Halted);
    assert_eq!(camp.counts().queued, 2, "c and d never launched");
    assert!(
        camp.reason.contains("failures: a.ns: RolledBack"),
        "{}",
        camp.reason
    );
}

#[test]
fn blocked_services_are_skipped_with_their_reason_and_can_be_retried() {
    let mut camp = campaign(&["a.ns", "b.ns"], 5, 3);
    let mut fleet = FakeFleet::default();
    fleet
        .blocked
        .insert("a.ns".into(), "pinned by deploy-bot: release".into());
    assert_eq!(settle(&mut camp, &mut fleet, 1), ["b.ns"]);
    assert_eq!(
        camp.services[0].state,
        ServiceState::Skipped {
            reason: "pinned by deploy-bot: release".into()
        }
    );
    end(&mut fleet, "b.ns", StageName::Done);
    settle(&mut camp, &mut fleet, 2);
    assert_eq!(camp.state, CampaignState::Done);
    // Retried once the pin is gone: running again, and done.
    fleet.blocked.clear();
    camp = retry(&camp, &["a.ns".into()], 3).expect("retry");
    assert_eq!(camp.state, CampaignState::Running);
    assert_eq!(settle(&mut camp, &mut fleet, 3), ["a.ns"]);
    end(&mut fleet, "a.ns", StageName::Done);
    settle(&mut camp, &mut fleet, 4);
    assert_eq!(camp.state, CampaignState::Done);
    assert_eq!(camp.counts().done, 2);
    // Nothing left to retry, and unknown services are named.
    assert!(retry(&camp, &[], 5).is_err());
    let err = retry(&camp, &["zzz.ns".into()], 5).expect_err("unknown");
    assert!(
        err.to_string().contains("zzz.ns is not in campaign camp-1"),
        "{err}"
    );
}

#[test]
fn pause_stops_launching_and_abort_rolls_back_what_is_in_flight() {
    let mut camp = campaign(&["a.ns", "b.ns", "c.ns"], 1, 3);
    let mut fleet = FakeFleet::default();
    settle(&mut camp, &mut fleet, 1);
    camp = pause(&camp, "freeze".into(), 2).expect("pause");
    assert!(pause(&camp, "again".into(), 2).is_err());
    end(&mut fleet, "a.ns", StageName::Done);
    assert!(
        settle(&mut camp, &mut fleet, 3).is_empty(),
        "paused: nothing launched"
    );
    assert_eq!(camp.counts().done, 1, "outcomes are still recorded");
    camp = resume(&camp, 4).expect("resume");
    assert_eq!(settle(&mut camp, &mut fleet, 4), ["b.ns"]);
    camp = abort(&camp, "stop".into(), 5).expect("abort");
    settle(&mut camp, &mut fleet, 5);
    assert_eq!(
        fleet.migrations["mig-b.ns"].0,
        StageName::RollingBack,
        "the in-flight migration is rolled back"
    );
    assert_eq!(camp.state, CampaignState::Aborting);
    end(&mut fleet, "b.ns", StageName::RolledBack);
    settle(&mut camp, &mut fleet, 6);
    assert_eq!(camp.state, CampaignState::Aborted);
    assert_eq!(camp.counts().queued, 1, "c never launched");
    assert!(abort(&camp, "again".into(), 7).is_err());
    assert!(retry(&camp, &[], 7).is_err());
}

#[test]
fn a_restart_resumes_from_the_record_without_launching_twice() {
    let mut camp = campaign(&["a.ns", "b.ns", "c.ns"], 2, 3);
    let mut fleet = FakeFleet::default();
    settle(&mut camp, &mut fleet, 1);
    // What the store holds, read back after a crash.
    let json = serde_json::to_string(&camp).expect("encode");
    let mut loaded: Campaign = serde_json::from_str(&json).expect("decode");
    assert_eq!(loaded, camp);
    assert!(
        settle(&mut loaded, &mut fleet, 2).is_empty(),
        "a and b are in flight"
    );
    end(&mut fleet, "a.ns", StageName::Done);
    assert_eq!(settle(&mut loaded, &mut fleet, 3), ["c.ns"]);
}

fn catalog(services: &[(&str, &[(&str, usize)])]) -> CatalogSnapshot {
    let mut map = BTreeMap::new();
    for (name, backends) in services {
        let service = Service {
            name: svc(name),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
            }],
            hosts: Vec::new(),
            backends: backends
                .iter()
                .map(|(cluster, n)| {
                    let endpoints = (0..*n)
                        .map(|i| Endpoint {
                            ip: format!("10.0.0.{}", i + 1).parse().expect("ip"),
                            ports: BTreeMap::from([("http".to_owned(), 8080)]),
                            state: EndpointState::Ready,
                            zone: None,
                        })
                        .collect::<Vec<_>>();
                    (c(cluster), Backend::from(endpoints))
                })
                .collect(),
            weights: None,
            sticky: None,
            requests: Default::default(),
        };
        map.insert(svc(name), Arc::new(service));
    }
    CatalogSnapshot {
        version: 1,
        services: map,
        published_at: std::time::Instant::now(),
    }
}

#[test]
fn selection_takes_services_in_the_source_by_glob_namespace_and_order() {
    let cat = catalog(&[
        ("big.shop", &[("old", 3), ("new", 1)]),
        ("small.shop", &[("old", 1), ("new", 1)]),
        ("mid.pay", &[("old", 2)]),
        ("elsewhere.shop", &[("other", 2)]),
    ]);
    let names = |p: &CampaignPlan| -> Vec<String> {
        select(p, &cat, 0)
            .into_iter()
            .map(|s| s.service.to_string())
            .collect()
    };
    let mut p = plan(1, 1);
    assert_eq!(names(&p), ["small.shop", "mid.pay", "big.shop"]);
    p.order = Order::LargestFirst;
    assert_eq!(names(&p), ["big.shop", "mid.pay", "small.shop"]);
    p.order = Order::Name;
    p.namespaces = vec!["shop".into()];
    assert_eq!(names(&p), ["big.shop", "small.shop"]);
    p.namespaces.clear();
    p.services = vec!["*.pay".into(), "sm?ll.*".into()];
    assert_eq!(
        names(&p).into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from(["mid.pay".to_owned(), "small.shop".to_owned()])
    );
    p.services = vec!["[".into()];
    assert!(check_patterns(&p).is_err());
}
