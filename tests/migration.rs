//! Migrations end to end: a real Ferry control plane, a real Envoy routing
//! a steady stream of requests to in-test backends and reporting load over
//! LRS, and the migration API over real gRPC.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
use ferry_proto::ferry::v1::traffic_client::TrafficClient;
use ferry_proto::ferry::v1::{
    CreateMigrationRequest, Gates, GetMigrationRequest, GetWeightsRequest, ListAuditRequest,
    ListMigrationsRequest, ListPinsRequest, Migration, MigrationActionRequest, PinRequest,
};
use futures::StreamExt;
use support::{
    Ads, Backends, Envoy, Ferry, FerryProxy, Gate, Prometheus, Steady, ferry_cli, share, split,
};
use tonic::Code;
use tonic::transport::Channel;

const HOST: &str = "checkout.shop";

fn catalog(backends: &Backends) -> String {
    support::checkout_catalog(backends)
}

use support::migration_plan as plan;

/// Follows a migration until it ends (or `limit`), recording each update
/// with the time it arrived.
async fn follow(
    api: &mut MigrationsClient<Channel>,
    id: &str,
    limit: Duration,
) -> Vec<(Instant, Migration)> {
    let mut stream = api
        .watch_migration(GetMigrationRequest { id: id.into() })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, stream.next()).await {
        let ended = matches!(m.stage.as_str(), "DONE" | "ROLLED_BACK" | "FAILED");
        seen.push((Instant::now(), m));
        if ended {
            break;
        }
    }
    seen
}

/// The share of answers from `prefix` among those between `from` and `to`.
fn share_between(
    answers: &[(Instant, String)],
    from: Instant,
    to: Instant,
    prefix: &str,
) -> (f64, usize) {
    let window: Vec<&String> = answers
        .iter()
        .filter(|(at, _)| *at >= from && *at <= to)
        .map(|(_, k)| k)
        .collect();
    let hits = window.iter().filter(|k| k.starts_with(prefix)).count();
    (hits as f64 / window.len().max(1) as f64, window.len())
}

/// The time windows in which each step baked: step index → (start, end).
fn bake_windows(updates: &[(Instant, Migration)]) -> BTreeMap<u32, (Instant, Instant)> {
    let mut windows = BTreeMap::new();
    for (i, (at, m)) in updates.iter().enumerate() {
        if m.stage == "SHIFT" && m.phase == "BAKING" && !windows.contains_key(&m.step) {
            let end = updates[i + 1..]
                .iter()
                .find(|(_, n)| n.step != m.step || n.phase != "BAKING" || n.stage != "SHIFT")
                .map(|(t, _)| *t)
                .unwrap_or(*at);
            windows.insert(m.step, (*at, end));
        }
    }
    windows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_moves_envoy_step_by_step_and_ends_unpinned() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends)).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    support::eventually(Duration::from_secs(10), "envoy routes to old", || async {
        share(&split(envoy.listener_port, HOST, 20).await, "old/") == 1.0
    })
    .await;
    let channel = support::api_channel(&ferry).await;
    let mut api = MigrationsClient::new(channel.clone());
    let mut traffic = TrafficClient::new(channel);

    let steady = Steady::start_for(envoy.listener_port, HOST, Duration::from_secs(90));
    let created = api
        .create_migration(plan(&[10.0, 50.0, 100.0], "3s"))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.stage, "VALIDATE");
    let updates = follow(&mut api, &created.id, Duration::from_secs(75)).await;
    let answers = steady.stop().await;
    let last = &updates.last().expect("updates").1;
    assert_eq!(
        last.stage,
        "DONE",
        "migration ended {last:?}\n{}",
        ferry.log()
    );

    // The stages in order, as creation and the watch stream showed them:
    // the watch may join after the first quick ones (the audit log below
    // has every transition), and from then on misses none.
    let mut stages: Vec<&str> = std::iter::once(created.stage.as_str())
        .chain(updates.iter().map(|(_, m)| m.stage.as_str()))
        .collect();
    stages.dedup();
    let all = [
        "VALIDATE",
        "DOUBLE_DEPLOY",
        "SHIFT",
        "CLEANUP",
        "UNPIN",
        "DONE",
    ];
    let joined = all
        .iter()
        .position(|s| *s == stages[1])
        .expect("a known stage");
    assert!(joined <= 2, "the watch joined late: {stages:?}");
    assert_eq!(stages[1..], all[joined..], "{stages:?}");
    // Each step's weights show in Envoy's measured split while it bakes.
    let windows = bake_windows(&updates);
    assert_eq!(windows.len(), 3, "three steps baked: {windows:?}");
    for (step, expected) in [(0u32, 0.10), (1, 0.50), (2, 1.0)] {
        let (from, to) = windows[&step];
        let (measured, n) = share_between(&answers, from, to, "new/");
        assert!(
            n >= 200,
            "step {step}: only {n} requests in its bake window"
        );
        assert!(
            (measured - expected).abs() <= 0.04,
            "step {step}: new got {measured:.3} of {n} requests, expected {expected}"
        );
    }
    // Every gate judged real reported load and passed.
    assert!(last.gates.len() >= 3);
    for g in &last.gates {
        assert_eq!(g.outcome, "pass", "{g:?}");
        assert!(g.target_requests >= 20, "{g:?}");
    }
    // Not one request lost along the way.
    let failed: Vec<&String> = answers
        .iter()
        .map(|(_, k)| k)
        .filter(|k| !k.starts_with("old/") && !k.starts_with("new/"))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(5)]
    );

    // All traffic on the target, held by policy, and the service unpinned.
    let weights = traffic
        .get_weights(GetWeightsRequest {
            service: "checkout.shop".into(),
        })
        .await
        .expect("weights")
        .into_inner();
    assert_eq!(weights.source, "policy");
    let new = weights
        .weights
        .iter()
        .find(|w| w.cluster == "new")
        .expect("new");
    assert_eq!(new.basis_points, 10_000);
    let pins = traffic
        .list_pins(ListPinsRequest {})
        .await
        .expect("pins")
        .into_inner();
    assert!(pins.pins.is_empty(), "{pins:?}");
    assert_eq!(
        share(&split(envoy.listener_port, HOST, 100).await, "new/"),
        1.0
    );
    // Every transition is in the audit log, in order.
    let audit = traffic
        .list_audit(ListAuditRequest {
            service: "checkout.shop".into(),
            limit: 100,
        })
        .await
        .expect("audit")
        .into_inner();
    let mut actions: Vec<&str> = audit.entries.iter().map(|e| e.action.as_str()).collect();
    actions.dedup();
    let mut expected = vec!["migration_created", "migration_pin"];
    for _ in 0..3 {
        expected.extend(["migration_shift", "migration_acked"]);
    }
    expected.extend([
        "migration_cleanup_started",
        "migration_cleanup",
        "migration_done",
    ]);
    assert_eq!(actions, expected);
    let metrics = ferry.metrics().await;
    assert!(
        metrics.contains("ferry_migrate_migrations{stage=\"DONE\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_gate_rolls_back_to_the_source_at_once() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    // The new side answers every request with 503.
    backends.set_status("new/a", 503);
    let ferry = Ferry::start(&catalog(&backends)).await;
    let envoy = Envoy::start(&ferry, Ads::Sotw).await;
    support::eventually(Duration::from_secs(10), "envoy routes to old", || async {
        share(&split(envoy.listener_port, HOST, 20).await, "old/") == 1.0
    })
    .await;
    let mut api = MigrationsClient::new(support::api_channel(&ferry).await);
    let steady = Steady::start_for(envoy.listener_port, HOST, Duration::from_secs(60));
    let created = api
        .create_migration(plan(&[20.0, 100.0], "20s"))
        .await
        .expect("create")
        .into_inner();
    let updates = follow(&mut api, &created.id, Duration::from_secs(45)).await;
    let rolled_back_at = updates.last().expect("updates").0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = split(envoy.listener_port, HOST, 200).await;
    let answers = steady.stop().await;
    let last = &updates.last().expect("updates").1;
    assert_eq!(last.stage, "ROLLED_BACK", "{last:?}\n{}", ferry.log());
    assert!(
        last.reason.contains("gate failed at step 1") && last.reason.contains("error rate"),
        "reason names the gate: {}",
        last.reason
    );
    // It never went past the first step, and did not wait out the bake.
    assert!(updates.iter().all(|(_, m)| m.step == 0));
    let baking = updates
        .iter()
        .find(|(_, m)| m.phase == "BAKING")
        .expect("baked")
        .0;
    assert!(rolled_back_at - baking < Duration::from_secs(20));
    let g = last.gates.last().expect("gate result");
    assert_eq!(g.outcome, "fail");
    assert!(g.target_errors >= 20 && g.source_errors == 0, "{g:?}");
    // Weights are back on the source: two seconds on, no traffic on the target.
    assert_eq!(last.weights.get("new"), Some(&0));
    assert_eq!(after.get("old/a"), Some(&200), "{after:?}");
    let (late, n) = share_between(
        &answers,
        rolled_back_at + Duration::from_secs(2),
        Instant::now(),
        "status:503",
    );
    assert!(
        n > 0 && late == 0.0,
        "{late} of {n} answers were 503 after the rollback"
    );
}

/// The scenario of a control plane killed mid-shift whose proxies come
/// back at different times: Envoy's load reports reconnect at once, its
/// ADS stream only when the test opens the gate in front of it (as when
/// Envoy's ADS backoff happens to be long). The step after the crash must
/// wait for Envoy to hold its weights, and DONE must mean the source gets
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_control_plane_killed_mid_shift_resumes_and_waits_for_envoy_before_the_next_step() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    // Envoy's reports must count while its ADS stream is cut off.
    let mut ferry = Ferry::start_with(&catalog(&backends), &["--lrs-any-node"]).await;
    let gate = Gate::start(ferry.xds_port).await;
    let envoy = Envoy::start_with_ads_at(&ferry, Ads::Delta, gate.port).await;
    support::eventually(Duration::from_secs(10), "envoy routes to old", || async {
        share(&split(envoy.listener_port, HOST, 20).await, "old/") == 1.0
    })
    .await;
    let mut api = MigrationsClient::new(support::api_channel(&ferry).await);
    let steady = Steady::start_for(envoy.listener_port, HOST, Duration::from_secs(150));
    let mut request = plan(&[20.0, 60.0, 100.0], "6s");
    request.ack_timeout = "90s".into();
    let created = api
        .create_migration(request)
        .await
        .expect("create")
        .into_inner();
    let get = |api: &mut MigrationsClient<Channel>| {
        let mut api = api.clone();
        let id = created.id.clone();
        async move {
            api.get_migration(GetMigrationRequest { id })
                .await
                .map(|m| m.into_inner())
        }
    };
    // Wait until the second step (60 %) bakes, then crash the control
    // plane with Envoy's ADS stream cut off.
    let mut before = None;
    for _ in 0..300 {
        let m = get(&mut api).await.expect("get");
        if m.step == 1 && m.phase == "BAKING" {
            before = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = before.unwrap_or_else(|| panic!("never reached step 2\n{}", ferry.log()));
    gate.shut();
    let killed_at = Instant::now();
    ferry.restart().await;
    let mut api = MigrationsClient::new(support::api_channel(&ferry).await);
    let after = get(&mut api).await.expect("get after restart");
    assert_eq!(
        (after.stage.as_str(), after.step),
        ("SHIFT", 1),
        "{after:?}"
    );
    // The bake timer runs from the persisted time, not from the restart.
    assert_eq!(
        after.phase_started_at_unix_ms,
        before.phase_started_at_unix_ms
    );
    // Step 2 passes on the load reports alone and step 3's weights are
    // set, but no proxy holds them: the step is not acknowledged.
    support::eventually(Duration::from_secs(40), "step 3 awaiting ack", || {
        let mut api = api.clone();
        async move {
            get(&mut api)
                .await
                .is_ok_and(|m| m.step == 2 && m.phase == "AWAITING_ACK")
        }
    })
    .await;
    let waiting = get(&mut api).await.expect("get");
    assert!(waiting.waiting.contains("proxies"), "{waiting:?}");
    let status = ferry.status().await;
    assert_eq!(
        status["policy"]["migrations"][0]["waiting"], waiting.waiting,
        "{status}"
    );
    // Ferry recorded Envoy before the crash and awaits it by name.
    assert_eq!(status["policy"]["returning_proxies"], 1, "{status}");
    // And stays so while Envoy is away (its ACK timeout is far off).
    let away_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < away_until {
        let m = get(&mut api).await.expect("get");
        assert_eq!((m.step, m.phase.as_str()), (2, "AWAITING_ACK"), "{m:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let opened_at = Instant::now();
    gate.open();
    let updates = follow(&mut api, &created.id, Duration::from_secs(90)).await;
    let answers = steady.stop().await;
    let (done_at, last) = updates.last().expect("updates");
    assert_eq!(ferry.status().await["policy"]["returning_proxies"], 0);
    assert_eq!(last.stage, "DONE", "{last:?}\n{}", ferry.log());
    // Step 3 was acknowledged only once Envoy was back.
    let acked_at = updates
        .iter()
        .find(|(_, m)| m.step == 2 && m.phase == "BAKING")
        .expect("step 3 baked")
        .0;
    assert!(acked_at > opened_at);
    // Envoy kept the 60 % step from the crash until its ADS stream was back:
    // never default weights, never a step it had not received.
    let (during, n) = share_between(&answers, killed_at, opened_at, "new/");
    assert!(n >= 100, "{n}");
    assert!(
        (during - 0.60).abs() <= 0.05,
        "new got {during:.3} of {n} requests while Envoy was away"
    );
    // DONE means the source gets nothing.
    let after_done: Vec<&String> = answers
        .iter()
        .filter(|(at, _)| at > done_at)
        .map(|(_, k)| k)
        .collect();
    assert!(
        after_done.iter().all(|k| k.starts_with("new/")),
        "after DONE: {:?}",
        after_done
            .iter()
            .filter(|k| !k.starts_with("new/"))
            .take(5)
            .collect::<Vec<_>>()
    );
    let lost = answers
        .iter()
        .filter(|(_, k)| !k.starts_with("old/") && !k.starts_with("new/"))
        .count();
    assert_eq!(lost, 0, "requests failed around the crash");
}

/// Runs the CLI as a child process; (success, stdout, stderr, when it
/// exited).
async fn cli_until_exit(ferry: &Ferry, args: &[&str]) -> (bool, String, String, SystemTime) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .args(["--server", &format!("http://127.0.0.1:{}", ferry.api_port)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run ferry CLI");
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the CLI never exited")
        .expect("CLI output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        SystemTime::now(),
    )
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_watch_exits_as_the_migration_ends_with_its_outcome() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends)).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    support::eventually(Duration::from_secs(10), "envoy routes to old", || async {
        share(&split(envoy.listener_port, HOST, 20).await, "old/") == 1.0
    })
    .await;
    let steady = Steady::start_for(envoy.listener_port, HOST, Duration::from_secs(120));
    let start = |from: &'static str, to: &'static str, watch: bool| {
        let mut args = vec![
            "migrate",
            "start",
            "checkout.shop",
            "--from",
            from,
            "--to",
            to,
            "--steps",
            "50,100",
            "--bake",
            "2s",
            "--min-requests",
            "20",
            "--data-timeout",
            "10s",
            "--ack-timeout",
            "30s",
            "--drain",
            "1s",
            "--reason",
            "cli watch",
        ];
        if watch {
            args.push("--watch");
        }
        args
    };

    // Live to DONE: `migrate start --watch` exits 0 right after it.
    let (ok, out, err, exited) = cli_until_exit(&ferry, &start("old", "new", true)).await;
    assert!(ok, "{out}\n{err}\n{}", ferry.log());
    assert!(out.contains("DONE"), "{out}");
    let (_, json, _) = ferry_cli(&ferry, &["migrate", "list", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&json).expect("json");
    let done = &list[0];
    assert_eq!(done["stage"], "DONE", "{list}");
    let late = unix_ms(exited) - done["updated_at_unix_ms"].as_i64().expect("updated");
    assert!(late <= 1000, "exited {late} ms after DONE");

    // Back again into a target that fails: `migrate watch ID` follows it
    // live and exits non-zero with the reason right after ROLLED_BACK.
    backends.set_status("old/a", 503);
    let (ok, out, err) = ferry_cli(&ferry, &start("new", "old", false));
    assert!(ok, "{out}{err}");
    let id = out
        .split_whitespace()
        .next()
        .expect("the migration's id")
        .to_owned();
    let (ok, out, err, exited) = cli_until_exit(&ferry, &["migrate", "watch", &id]).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("ROLLED_BACK") && err.contains("gate failed"),
        "{err}"
    );
    let (_, json, _) = ferry_cli(&ferry, &["migrate", "get", &id, "-o", "json"]);
    let rolled: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(rolled["stage"], "ROLLED_BACK", "{rolled}");
    assert!(
        out.contains("SHIFT"),
        "it watched the migration live: {out}"
    );
    let late = unix_ms(exited) - rolled["updated_at_unix_ms"].as_i64().expect("updated");
    assert!(late <= 1000, "exited {late} ms after ROLLED_BACK");
    drop(steady.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_migration_requests_are_refused_naming_the_field_and_change_nothing() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends)).await;
    let channel = support::api_channel(&ferry).await;
    let mut api = MigrationsClient::new(channel.clone());
    let mut traffic = TrafficClient::new(channel);

    async fn state(
        api: &mut MigrationsClient<Channel>,
        traffic: &mut TrafficClient<Channel>,
    ) -> String {
        let migrations = api
            .list_migrations(ListMigrationsRequest::default())
            .await
            .expect("list")
            .into_inner();
        let audit = traffic
            .list_audit(ListAuditRequest::default())
            .await
            .expect("audit")
            .into_inner();
        let weights = traffic
            .get_weights(GetWeightsRequest {
                service: "checkout.shop".into(),
            })
            .await
            .expect("weights")
            .into_inner();
        let pins = traffic
            .list_pins(ListPinsRequest {})
            .await
            .expect("pins")
            .into_inner();
        format!("{migrations:?}\n{audit:?}\n{weights:?}\n{pins:?}")
    }

    let ok = plan(&[10.0, 100.0], "1m");
    let cases: Vec<(&str, CreateMigrationRequest, Code, &str)> = vec![
        (
            "bad service",
            CreateMigrationRequest {
                service: "checkout".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "service",
        ),
        (
            "unknown service",
            CreateMigrationRequest {
                service: "nope.shop".into(),
                ..ok.clone()
            },
            Code::NotFound,
            "nope.shop",
        ),
        (
            "no source",
            CreateMigrationRequest {
                from: vec![],
                ..ok.clone()
            },
            Code::InvalidArgument,
            "from",
        ),
        (
            "unknown source",
            CreateMigrationRequest {
                from: vec!["mars".into()],
                ..ok.clone()
            },
            Code::InvalidArgument,
            "from[0]",
        ),
        (
            "unknown target",
            CreateMigrationRequest {
                to: "mars".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "to",
        ),
        (
            "target is a source",
            CreateMigrationRequest {
                to: "old".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "to",
        ),
        (
            "no steps",
            CreateMigrationRequest {
                steps: vec![],
                ..ok.clone()
            },
            Code::InvalidArgument,
            "steps",
        ),
        (
            "steps not increasing",
            CreateMigrationRequest {
                steps: vec![50.0, 10.0, 100.0],
                ..ok.clone()
            },
            Code::InvalidArgument,
            "steps[1]",
        ),
        (
            "last step not 100",
            CreateMigrationRequest {
                steps: vec![10.0, 50.0],
                ..ok.clone()
            },
            Code::InvalidArgument,
            "steps[1]",
        ),
        (
            "negative step",
            CreateMigrationRequest {
                steps: vec![-5.0, 100.0],
                ..ok.clone()
            },
            Code::InvalidArgument,
            "steps[0]",
        ),
        (
            "three decimals",
            CreateMigrationRequest {
                steps: vec![0.125, 100.0],
                ..ok.clone()
            },
            Code::InvalidArgument,
            "steps[0]",
        ),
        (
            "bad bake",
            CreateMigrationRequest {
                bake: "soon".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "bake",
        ),
        (
            "bake too long",
            CreateMigrationRequest {
                bake: "3d".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "bake",
        ),
        (
            "ack share above one",
            CreateMigrationRequest {
                ack_share: 1.5,
                ..ok.clone()
            },
            Code::InvalidArgument,
            "ack_share",
        ),
        (
            "latency gate without Prometheus",
            CreateMigrationRequest {
                gates: Some(Gates {
                    max_p99_ratio: 2.0,
                    ..Default::default()
                }),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "gates.prometheus_url",
        ),
        (
            "no reason",
            CreateMigrationRequest {
                reason: String::new(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "reason",
        ),
    ];
    let before = state(&mut api, &mut traffic).await;
    for (what, request, code, field) in cases {
        let err = api.create_migration(request).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(
            err.message().contains(field),
            "{what}: {:?} does not name {field}",
            err.message()
        );
        assert_eq!(
            state(&mut api, &mut traffic).await,
            before,
            "{what} changed state"
        );
    }

    // Pinned by someone else: refused, nothing changes.
    traffic
        .pin(PinRequest {
            service: "checkout.shop".into(),
            owner: "deploy-bot".into(),
            reason: "release".into(),
            ttl_seconds: 0,
        })
        .await
        .expect("pin");
    let pinned = state(&mut api, &mut traffic).await;
    let err = api.create_migration(ok.clone()).await.expect_err("pinned");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("deploy-bot"), "{}", err.message());
    assert_eq!(state(&mut api, &mut traffic).await, pinned);
    traffic
        .unpin(ferry_proto::ferry::v1::UnpinRequest {
            service: "checkout.shop".into(),
            owner: "deploy-bot".into(),
            reason: "done".into(),
        })
        .await
        .expect("unpin");

    // One migration per service; unknown ids; actions that do not apply.
    let first = api
        .create_migration(ok.clone())
        .await
        .expect("create")
        .into_inner();
    let err = api.create_migration(ok.clone()).await.expect_err("second");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&first.id), "{}", err.message());
    let action = |id: &str, reason: &str| MigrationActionRequest {
        id: id.into(),
        reason: reason.into(),
    };
    assert_eq!(
        api.get_migration(GetMigrationRequest {
            id: "mig-999".into()
        })
        .await
        .expect_err("unknown")
        .code(),
        Code::NotFound
    );
    assert_eq!(
        api.resume_migration(action(&first.id, "go"))
            .await
            .expect_err("not paused")
            .code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        api.abort_migration(action(&first.id, ""))
            .await
            .expect_err("no reason")
            .code(),
        Code::InvalidArgument
    );
    // Abort works, and sends everything back to the source.
    let aborted = api
        .abort_migration(action(&first.id, "changed our minds"))
        .await
        .expect("abort")
        .into_inner();
    assert!(
        matches!(aborted.stage.as_str(), "ROLLING_BACK" | "ROLLED_BACK"),
        "{aborted:?}"
    );
    assert!(aborted.reason.contains("changed our minds"));
    let err = api
        .pause_migration(action(&first.id, "hold"))
        .await
        .expect_err("ended");
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_starts_steers_and_watches_migrations() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends)).await;
    let cli = |args: &[&str]| ferry_cli(&ferry, args);

    let (ok, out, err) = cli(&[
        "migrate",
        "start",
        "checkout.shop",
        "--from",
        "old",
        "--to",
        "new",
        "--steps",
        "5,50,100",
        "--bake",
        "10m",
        "--reason",
        "cluster rebuild",
        "-o",
        "json",
    ]);
    assert!(ok, "{err}");
    let started: serde_json::Value = serde_json::from_str(&out).expect("json");
    let id = started["id"].as_str().expect("id").to_owned();
    assert_eq!(started["steps_bp"], serde_json::json!([500, 5000, 10000]));
    assert_eq!(started["created_by"], "alice");

    // No proxy is connected: the first step's weights are set, but no
    // proxy is no acknowledgement, and `migrate get` says so.
    support::eventually(Duration::from_secs(10), "first step set", || async {
        let (_, out, _) = cli(&["migrate", "get", &id, "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|m| m["phase"] == "AWAITING_ACK")
    })
    .await;
    support::eventually(Duration::from_secs(10), "the wait explained", || async {
        let (ok, out, _) = cli(&["migrate", "get", &id]);
        ok && out.contains("waiting   0 of at least 1 proxies connected")
    })
    .await;
    // A proxy connects and takes the step's weights: the step bakes.
    let _proxy = FerryProxy::start(ferry.xds_port).await;
    support::eventually(Duration::from_secs(10), "first step baking", || async {
        let (_, out, _) = cli(&["migrate", "get", &id, "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|m| m["phase"] == "BAKING")
    })
    .await;
    let (ok, out, _) = cli(&["migrate", "list", "--active"]);
    assert!(ok);
    assert!(
        out.contains(&id) && out.contains("SHIFT") && out.contains("new=5.00%"),
        "{out}"
    );

    // A bad plan is refused with the field named, and a non-zero exit.
    let (ok, _, err) = cli(&[
        "migrate",
        "start",
        "checkout.shop",
        "--from",
        "old",
        "--to",
        "new",
        "--steps",
        "50,10",
        "--reason",
        "x",
    ]);
    assert!(!ok && err.contains("steps[1]"), "{err}");

    let (ok, out, err) = cli(&["migrate", "pause", &id, "--reason", "incident elsewhere"]);
    assert!(ok && out.contains("PAUSED"), "{out}{err}");
    let (ok, out, err) = cli(&["migrate", "resume", &id, "--reason", "incident over"]);
    assert!(ok && out.contains("SHIFT"), "{out}{err}");
    let (ok, out, err) = cli(&["migrate", "abort", &id, "--reason", "not today"]);
    assert!(
        ok && out.contains("ROLLING_BACK") || out.contains("ROLLED_BACK"),
        "{out}{err}"
    );

    // Watching a migration that rolled back exits non-zero with its reason.
    support::eventually(Duration::from_secs(10), "rolled back", || async {
        let (_, out, _) = cli(&["migrate", "get", &id, "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|m| m["stage"] == "ROLLED_BACK")
    })
    .await;
    let (ok, out, err) = cli(&["migrate", "watch", &id]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("ROLLED_BACK") && err.contains("not today"),
        "{err}"
    );
    let (ok, out, _) = cli(&["audit", "--service", "checkout.shop"]);
    assert!(ok);
    for action in [
        "migration_created",
        "migration_paused",
        "migration_resumed",
        "migration_rollback",
    ] {
        assert!(out.contains(action), "{action} not in\n{out}");
    }
    let (_, out, _) = cli(&["weights", "get", "checkout.shop", "-o", "json"]);
    let w: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(w["weights_bp"]["old"], 10000, "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slower_target_fails_the_latency_gate_read_from_prometheus() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    // The new side answers correctly, but slowly.
    backends.set_delay("new/a", 80);
    let ferry = Ferry::start(&catalog(&backends)).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    let prometheus = Prometheus::start(&envoy).await;
    support::eventually(Duration::from_secs(10), "envoy routes to old", || async {
        share(&split(envoy.listener_port, HOST, 20).await, "old/") == 1.0
    })
    .await;
    let mut api = MigrationsClient::new(support::api_channel(&ferry).await);
    let steady = Steady::start_for(envoy.listener_port, HOST, Duration::from_secs(60));
    let mut request = plan(&[50.0, 100.0], "8s");
    request.gates = Some(Gates {
        min_requests: 20,
        data_timeout: "20s".into(),
        prometheus_url: prometheus.url.clone(),
        max_p99_ratio: 3.0,
        ..Default::default()
    });
    let created = api
        .create_migration(request)
        .await
        .expect("create")
        .into_inner();
    let updates = follow(&mut api, &created.id, Duration::from_secs(45)).await;
    let answers = steady.stop().await;
    let last = &updates.last().expect("updates").1;
    assert_eq!(last.stage, "ROLLED_BACK", "{last:?}\n{}", ferry.log());
    assert!(
        last.reason.contains("gate failed at step 1") && last.reason.contains("p99"),
        "reason names the latency gate: {}",
        last.reason
    );
    let g = last.gates.last().expect("gate result");
    assert_eq!(g.outcome, "fail");
    assert!(g.target_p99_ms >= 60.0, "target p99 {} ms", g.target_p99_ms);
    assert!(g.source_p99_ms < 25.0, "source p99 {} ms", g.source_p99_ms);
    // No error anywhere: only latency told the sides apart.
    assert_eq!(g.target_errors, 0);
    assert!(
        answers
            .iter()
            .all(|(_, k)| k.starts_with("old/") || k.starts_with("new/"))
    );
    assert_eq!(last.weights.get("new"), Some(&0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_beyond_the_concurrency_limit_wait_their_turn() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let two = format!(
        "{}  - name: cart\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n      new: {{endpoints: [\"{}\"]}}\n    weights: {{old: 10000, new: 0}}\n",
        catalog(&backends),
        backends.addr("old/a"),
        backends.addr("new/a")
    );
    let ferry = Ferry::start_with(&two, &["--max-concurrent-migrations", "1"]).await;
    // A proxy acknowledges each step (and the abort's rollback).
    let _proxy = FerryProxy::start(ferry.xds_port).await;
    let mut api = MigrationsClient::new(support::api_channel(&ferry).await);
    let first = api
        .create_migration(plan(&[10.0, 100.0], "10m"))
        .await
        .expect("first")
        .into_inner();
    let second = api
        .create_migration(CreateMigrationRequest {
            service: "cart.shop".into(),
            ..plan(&[10.0, 100.0], "10m")
        })
        .await
        .expect("second")
        .into_inner();
    let get = |id: String| GetMigrationRequest { id };
    support::eventually(Duration::from_secs(10), "first shifting", || {
        let mut api = api.clone();
        let id = first.id.clone();
        async move {
            api.get_migration(get(id))
                .await
                .is_ok_and(|m| m.into_inner().stage == "SHIFT")
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiting = api
        .get_migration(get(second.id.clone()))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(waiting.stage, "VALIDATE", "the second must wait for a slot");
    assert!(waiting.weights.is_empty());
    api.abort_migration(MigrationActionRequest {
        id: first.id.clone(),
        reason: "make room".into(),
    })
    .await
    .expect("abort");
    support::eventually(Duration::from_secs(10), "second starts", || {
        let mut api = api.clone();
        let id = second.id.clone();
        async move {
            api.get_migration(get(id))
                .await
                .is_ok_and(|m| m.into_inner().stage == "SHIFT")
        }
    })
    .await;
    let status = ferry.status().await;
    let stages: Vec<String> = status["policy"]["migrations"]
        .as_array()
        .expect("migrations")
        .iter()
        .map(|m| m["stage"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(stages, ["ROLLED_BACK", "SHIFT"]);
}
