//! Campaigns end to end: a real control plane moving many services from
//! `old` to `new` with real Envoy and `ferry proxy` carrying steady load,
//! over the real gRPC API and CLI.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_proto::ferry::v1::campaigns_client::CampaignsClient;
use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
use ferry_proto::ferry::v1::traffic_client::TrafficClient;
use ferry_proto::ferry::v1::{
    Campaign, CampaignActionRequest, CreateCampaignRequest, CreateMigrationRequest,
    GetCampaignRequest, ListMigrationsRequest, ListServicesRequest,
};
use futures::StreamExt;
use support::{Ads, Backends, Envoy, Ferry, FerryProxy, Steady};
use tonic::transport::Channel;

fn name(i: usize) -> String {
    format!("s{i:02}")
}

/// `count` services `sNN.shop`, each with one backend in `old` and one in
/// `new`, all traffic on `old`.
fn catalog(backends: &Backends, count: usize) -> String {
    let mut yaml = String::from("services:\n");
    for i in 0..count {
        let n = name(i);
        yaml.push_str(&format!(
            "  - name: {n}\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n      new: {{endpoints: [\"{}\"]}}\n    weights: {{old: 10000, new: 0}}\n",
            backends.addr(&format!("old/{n}")),
            backends.addr(&format!("new/{n}")),
        ));
    }
    yaml
}

async fn backends(count: usize) -> Backends {
    let labels: Vec<String> = (0..count)
        .flat_map(|i| [format!("old/{}", name(i)), format!("new/{}", name(i))])
        .collect();
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    Backends::start(&labels).await
}

fn request(concurrency: u32, max_failures: u32, order: &str) -> CreateCampaignRequest {
    CreateCampaignRequest {
        from: "old".into(),
        to: "new".into(),
        concurrency,
        max_failures,
        order: order.into(),
        migration: Some(CreateMigrationRequest {
            steps: vec![50.0, 100.0],
            bake: "2s".into(),
            gates: Some(ferry_proto::ferry::v1::Gates {
                min_requests: 20,
                data_timeout: "30s".into(),
                ..Default::default()
            }),
            ack_timeout: "60s".into(),
            drain: "1s".into(),
            ..Default::default()
        }),
        reason: "retire cluster old".into(),
        ..Default::default()
    }
}

/// Follows a campaign until it ends (or `limit`), keeping every update.
async fn follow(api: &mut CampaignsClient<Channel>, id: &str, limit: Duration) -> Vec<Campaign> {
    let mut stream = api
        .watch_campaign(GetCampaignRequest { id: id.into() })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Some(Ok(c))) = tokio::time::timeout_at(deadline, stream.next()).await {
        let ended = matches!(c.state.as_str(), "DONE" | "HALTED" | "ABORTED");
        seen.push(c);
        if ended {
            break;
        }
    }
    seen
}

/// Steady load on every service through both proxies.
fn load(envoy: &Envoy, proxy: &FerryProxy, count: usize, limit: Duration) -> Vec<(String, Steady)> {
    let mut all = Vec::new();
    for i in 0..count {
        let host = format!("{}.shop", name(i));
        for port in [envoy.listener_port, proxy.listen_port] {
            all.push((
                name(i),
                Steady::start_paced(port, &host, Duration::from_millis(10), limit),
            ));
        }
    }
    all
}

/// Each service's answers that were neither its old nor its new backend.
async fn failures(load: Vec<(String, Steady)>) -> BTreeMap<String, (usize, usize)> {
    let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (service, steady) in load {
        let answers = steady.stop().await;
        let failed = answers
            .iter()
            .filter(|(_, k)| *k != format!("old/{service}") && *k != format!("new/{service}"))
            .count();
        let entry = out.entry(service).or_default();
        entry.0 += failed;
        entry.1 += answers.len();
    }
    out
}

/// Each service's share of traffic on `new`, in basis points.
async fn new_weights(channel: &Channel) -> BTreeMap<String, u32> {
    let reply = TrafficClient::new(channel.clone())
        .list_services(ListServicesRequest {})
        .await
        .expect("services")
        .into_inner();
    reply
        .services
        .iter()
        .map(|s| {
            let bp = s
                .backends
                .iter()
                .find(|b| b.cluster == "new")
                .map(|b| b.basis_points)
                .unwrap_or(0);
            (s.service.clone(), bp)
        })
        .collect()
}

/// How many migrations each service has had.
async fn migrations_per_service(channel: &Channel) -> BTreeMap<String, usize> {
    let list = MigrationsClient::new(channel.clone())
        .list_migrations(ListMigrationsRequest::default())
        .await
        .expect("migrations")
        .into_inner()
        .migrations;
    let mut out = BTreeMap::new();
    for m in list {
        *out.entry(m.service).or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_campaign_moves_twelve_services_through_envoy_and_ferry_proxy() {
    const COUNT: usize = 12;
    let backends = backends(COUNT).await;
    // One target is broken: its service must roll back, and the campaign
    // go on without it.
    backends.set_status("new/s05", 503);
    let ferry = Ferry::start(&catalog(&backends, COUNT)).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    for port in [envoy.listener_port, proxy.listen_port] {
        support::eventually(
            Duration::from_secs(20),
            "both proxies route every service",
            || async move {
                let mut all = true;
                for i in 0..COUNT {
                    let host = format!("{}.shop", name(i));
                    all &= support::share(&support::split(port, &host, 2).await, "old/") == 1.0;
                }
                all
            },
        )
        .await;
    }
    let channel = support::api_channel(&ferry).await;
    let mut api = CampaignsClient::new(channel.clone());
    let load = load(&envoy, &proxy, COUNT, Duration::from_secs(240));

    let created = api
        .create_campaign(request(3, 3, "name"))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.state, "RUNNING");
    assert_eq!(created.services.len(), COUNT);
    let updates = follow(&mut api, &created.id, Duration::from_secs(200)).await;
    let failed = failures(load).await;
    let last = updates.last().expect("updates");
    assert_eq!(last.state, "DONE", "{last:#?}\n{}", ferry.log());
    let counts = last.counts.expect("counts");
    assert_eq!(
        (counts.done, counts.rolled_back, counts.skipped),
        (11, 1, 0),
        "{last:#?}"
    );
    let s05 = last
        .services
        .iter()
        .find(|s| s.service == "s05.shop")
        .expect("s05");
    assert_eq!(s05.state, "rolled_back");
    assert!(s05.reason.contains("gate failed"), "{s05:?}");
    // Never more than three at once.
    let most = updates
        .iter()
        .map(|c| c.counts.unwrap_or_default().in_flight)
        .max()
        .unwrap_or(0);
    assert!((1..=3).contains(&most), "{most} in flight at once");
    // Every other service is on `new`, s05 on `old`; each migrated once.
    let weights = new_weights(&channel).await;
    for i in 0..COUNT {
        let service = format!("{}.shop", name(i));
        let expected = if i == 5 { 0 } else { 10_000 };
        assert_eq!(weights[&service], expected, "{service}: {weights:?}");
    }
    assert!(
        migrations_per_service(&channel)
            .await
            .values()
            .all(|n| *n == 1),
        "a service migrated twice"
    );
    // Not one request failed, but on the broken target itself.
    for (service, (bad, total)) in &failed {
        assert!(*total > 100, "{service}: only {total} requests");
        if service != "s05" {
            assert_eq!(*bad, 0, "{service}: {bad} of {total} requests failed");
        }
    }
    // What still takes traffic in `old`: only s05.
    let (ok, out, err) = support::ferry_cli(&ferry, &["status", "--cluster", "old"]);
    assert!(ok, "{err}");
    assert!(out.contains("still takes traffic for 1 services"), "{out}");
    assert!(out.contains("s05.shop"), "{out}");
    let metrics = ferry.metrics().await;
    assert!(
        metrics.contains("ferry_migrate_campaigns{state=\"DONE\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_failures_halts_the_campaign_and_lists_its_failures() {
    const COUNT: usize = 4;
    let backends = backends(COUNT).await;
    backends.set_status("new/s00", 503);
    backends.set_status("new/s01", 503);
    let ferry = Ferry::start(&catalog(&backends, COUNT)).await;
    let envoy = Envoy::start(&ferry, Ads::Sotw).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    let channel = support::api_channel(&ferry).await;
    let mut api = CampaignsClient::new(channel.clone());
    let load = load(&envoy, &proxy, COUNT, Duration::from_secs(120));
    let created = api
        .create_campaign(request(2, 1, "name"))
        .await
        .expect("create")
        .into_inner();
    let updates = follow(&mut api, &created.id, Duration::from_secs(100)).await;
    failures(load).await;
    let last = updates.last().expect("updates");
    assert_eq!(last.state, "HALTED", "{last:#?}\n{}", ferry.log());
    let counts = last.counts.expect("counts");
    assert_eq!(
        (counts.rolled_back, counts.queued, counts.done),
        (2, 2, 0),
        "{last:#?}"
    );
    assert!(last.reason.contains("--max-failures 1"), "{}", last.reason);
    for s in ["s00.shop", "s01.shop"] {
        assert!(last.reason.contains(s), "{} lists {s}", last.reason);
    }
    // The two never launched are untouched.
    let weights = new_weights(&channel).await;
    assert!(weights.values().all(|bp| *bp == 0), "{weights:?}");
    // The CLI watch of a halted campaign fails, naming why.
    let (ok, _, err) = support::ferry_cli(&ferry, &["campaign", "watch", &created.id]);
    assert!(!ok);
    assert!(err.contains("HALTED"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_control_plane_resumes_its_campaign_and_migrates_no_service_twice() {
    const COUNT: usize = 6;
    let backends = backends(COUNT).await;
    let mut ferry = Ferry::start(&catalog(&backends, COUNT)).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    let load = load(&envoy, &proxy, COUNT, Duration::from_secs(200));
    let mut api = CampaignsClient::new(support::api_channel(&ferry).await);
    let created = api
        .create_campaign(request(2, 3, "name"))
        .await
        .expect("create")
        .into_inner();
    let get = |api: &CampaignsClient<Channel>| {
        let mut api = api.clone();
        let id = created.id.clone();
        async move {
            api.get_campaign(GetCampaignRequest { id })
                .await
                .map(|c| c.into_inner())
        }
    };
    // Pause with one service done, others in flight and more queued:
    // in-flight migrations stop at the end of their step, nothing new
    // starts.
    let mut ready = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline && !ready {
        let n = get(&api).await.expect("get").counts.unwrap_or_default();
        ready = n.done >= 1 && n.in_flight >= 1 && n.queued >= 2;
        if !ready {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        ready,
        "never had one done, one in flight and two queued\n{}",
        ferry.log()
    );
    let channel = support::api_channel(&ferry).await;
    let paused = api
        .pause_campaign(CampaignActionRequest {
            id: created.id.clone(),
            reason: "change freeze".into(),
        })
        .await
        .expect("pause")
        .into_inner();
    assert_eq!(paused.state, "PAUSED");
    let held = |channel: &Channel| {
        let channel = channel.clone();
        async move {
            MigrationsClient::new(channel)
                .list_migrations(ListMigrationsRequest {
                    active_only: true,
                    ..Default::default()
                })
                .await
                .expect("migrations")
                .into_inner()
                .migrations
        }
    };
    support::eventually(Duration::from_secs(30), "in-flight migrations held", || {
        let channel = channel.clone();
        async move {
            // Each stops at the end of its step (one on its last step
            // finishes).
            held(&channel)
                .await
                .iter()
                .all(|m| m.stage == "PAUSED" && m.reason.contains("paused with its campaign"))
        }
    })
    .await;
    let launched = migrations_per_service(&channel).await;
    let counts = get(&api).await.expect("get").counts.unwrap_or_default();
    // SIGKILL while paused: it comes back paused, holding the same.
    ferry.restart().await;
    let channel = support::api_channel(&ferry).await;
    let mut api = CampaignsClient::new(channel.clone());
    let after = get(&api).await.expect("get after restart");
    assert_eq!(after.state, "PAUSED");
    assert_eq!(after.counts.unwrap_or_default(), counts);
    assert_eq!(migrations_per_service(&channel).await, launched);
    assert!(held(&channel).await.iter().all(|m| m.stage == "PAUSED"));
    // Resume, and SIGKILL again as soon as it launches the next service:
    // mid-campaign, with migrations mid-step.
    api.resume_campaign(CampaignActionRequest {
        id: created.id.clone(),
        reason: "freeze over".into(),
    })
    .await
    .expect("resume");
    support::eventually(Duration::from_secs(60), "the next service launched", || {
        let channel = channel.clone();
        let before = launched.len();
        async move { migrations_per_service(&channel).await.len() > before }
    })
    .await;
    ferry.restart().await;
    let channel = support::api_channel(&ferry).await;
    let mut api = CampaignsClient::new(channel.clone());
    let updates = follow(&mut api, &created.id, Duration::from_secs(150)).await;
    let failed = failures(load).await;
    let last = updates.last().expect("updates");
    assert_eq!(last.state, "DONE", "{last:#?}\n{}", ferry.log());
    assert_eq!(
        last.counts.unwrap_or_default().done,
        COUNT as u32,
        "{last:#?}"
    );
    let per_service = migrations_per_service(&channel).await;
    assert_eq!(per_service.len(), COUNT);
    assert!(per_service.values().all(|n| *n == 1), "{per_service:?}");
    assert!(new_weights(&channel).await.values().all(|bp| *bp == 10_000));
    for (service, (bad, total)) in &failed {
        assert_eq!(*bad, 0, "{service}: {bad} of {total} requests failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_campaign_requests_name_the_field_and_change_nothing() {
    let backends = backends(2).await;
    let ferry = Ferry::start(&catalog(&backends, 2)).await;
    let channel = support::api_channel(&ferry).await;
    let mut api = CampaignsClient::new(channel.clone());
    let cases: Vec<(CreateCampaignRequest, &str)> = vec![
        (
            CreateCampaignRequest {
                to: "old".into(),
                ..request(2, 1, "")
            },
            "to",
        ),
        (
            CreateCampaignRequest {
                order: "random".into(),
                ..request(2, 1, "")
            },
            "order",
        ),
        (
            CreateCampaignRequest {
                services: vec!["[".into()],
                ..request(2, 1, "")
            },
            "services[0]",
        ),
        (
            CreateCampaignRequest {
                migration: Some(CreateMigrationRequest {
                    steps: vec![50.0],
                    ..Default::default()
                }),
                ..request(2, 1, "")
            },
            "migration.steps[0]",
        ),
        (
            CreateCampaignRequest {
                migration: Some(CreateMigrationRequest {
                    service: "x.shop".into(),
                    steps: vec![100.0],
                    ..Default::default()
                }),
                ..request(2, 1, "")
            },
            "migration.service",
        ),
        (
            CreateCampaignRequest {
                reason: String::new(),
                ..request(2, 1, "")
            },
            "reason",
        ),
    ];
    for (bad, field) in cases {
        let status = api.create_campaign(bad).await.expect_err(field);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{field}: {status:?}"
        );
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    // Nothing matches: refused, naming why.
    let none = api
        .create_campaign(CreateCampaignRequest {
            services: vec!["nothing-*".into()],
            ..request(2, 1, "")
        })
        .await
        .expect_err("no match");
    assert_eq!(none.code(), tonic::Code::FailedPrecondition);
    assert!(
        none.message()
            .contains("no service has a backend in cluster old"),
        "{}",
        none.message()
    );
    let listed = api
        .list_campaigns(ferry_proto::ferry::v1::ListCampaignsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.campaigns.is_empty());
    assert!(migrations_per_service(&channel).await.is_empty());
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_resumes_the_campaign_and_migrates_no_service_twice() {
    const COUNT: usize = 6;
    let etcd = support::Etcd::start().await;
    let backends = backends(COUNT).await;
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
    let leading = |ferry: &Ferry| {
        let port = ferry.admin_port;
        async move {
            matches!(support::http_get(port, "localhost", "/status").await,
                Ok((200, body)) if serde_json::from_str::<serde_json::Value>(&body)
                    .is_ok_and(|s| s["policy"]["leading"] == true))
        }
    };
    let mut a = Ferry::start_with(&catalog(&backends, COUNT), &flags("a")).await;
    support::eventually(Duration::from_secs(10), "a leads", || leading(&a)).await;
    let b = Ferry::start_with(&catalog(&backends, COUNT), &flags("b")).await;
    // The fleet takes its config from the follower.
    let envoy = Envoy::start(&b, Ads::Delta).await;
    let proxy = FerryProxy::start(b.xds_port).await;
    let load = load(&envoy, &proxy, COUNT, Duration::from_secs(200));
    let created = CampaignsClient::new(support::api_channel(&a).await)
        .create_campaign(request(2, 3, "name"))
        .await
        .expect("create on the leader")
        .into_inner();
    // The follower follows the campaign; the leader dies mid-way.
    let b_channel = support::api_channel(&b).await;
    let b_api = CampaignsClient::new(b_channel.clone());
    support::eventually(
        Duration::from_secs(90),
        "b sees one done, one in flight",
        || {
            let mut api = b_api.clone();
            let id = created.id.clone();
            async move {
                api.get_campaign(GetCampaignRequest { id })
                    .await
                    .is_ok_and(|c| {
                        let n = c.into_inner().counts.unwrap_or_default();
                        n.done >= 1 && n.in_flight >= 1
                    })
            }
        },
    )
    .await;
    a.kill();
    support::eventually(Duration::from_secs(10), "b leads", || leading(&b)).await;
    let mut b_api = b_api.clone();
    let updates = follow(&mut b_api, &created.id, Duration::from_secs(150)).await;
    let failed = failures(load).await;
    let last = updates.last().expect("updates");
    assert_eq!(last.state, "DONE", "{last:#?}\n{}", b.log());
    assert_eq!(
        last.counts.unwrap_or_default().done,
        COUNT as u32,
        "{last:#?}"
    );
    let per_service = migrations_per_service(&b_channel).await;
    assert_eq!(per_service.len(), COUNT);
    assert!(per_service.values().all(|n| *n == 1), "{per_service:?}");
    for (service, (bad, total)) in &failed {
        assert_eq!(*bad, 0, "{service}: {bad} of {total} requests failed");
    }
}

/// The CLI as a person meets it: `campaign start --watch` in a pipe
/// prints a line per change and exits 0 on DONE; `campaign watch` on a
/// terminal redraws one block in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_campaign_cli_watches_in_a_pipe_and_on_a_terminal() {
    const COUNT: usize = 4;
    let backends = backends(COUNT).await;
    let ferry = Ferry::start(&catalog(&backends, COUNT)).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    let load = load(&envoy, &proxy, COUNT, Duration::from_secs(120));
    let server = format!("http://127.0.0.1:{}", ferry.api_port);
    let start = |services: &str, watch: bool| {
        let mut args = vec![
            "campaign",
            "start",
            "--from",
            "old",
            "--to",
            "new",
            "--services",
            services,
            "--concurrency",
            "1",
            "--steps",
            "50,100",
            "--bake",
            "2s",
            "--min-requests",
            "20",
            "--ack-timeout",
            "20s",
            "--drain",
            "1s",
            "--reason",
            "rebuild old",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        if watch {
            args.push("--watch".into());
        }
        args
    };
    // In a pipe.
    let args = start("s00.*,s01.*", true);
    let api = server.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(&args)
            .args(["--server", &api])
            .output()
            .expect("run ferry");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("cli");
    assert!(ok, "{out}\n{err}");
    assert!(!out.contains('\u{1b}'), "no escapes in a pipe: {out:?}");
    let first = out.lines().next().unwrap_or_default();
    assert!(first.starts_with("camp-1 old → new RUNNING"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("s00.shop") && l.contains("in_flight")),
        "{out}"
    );
    let last_summary = out
        .lines()
        .rfind(|l| l.starts_with("camp-1"))
        .unwrap_or_default();
    assert!(
        last_summary.contains("DONE: 2 done, 0 in flight, 0 queued"),
        "{out}"
    );

    // On a terminal: started without --watch, then watched under script(1).
    let (ok, created, err) = support::ferry_cli(
        &ferry,
        &start("s02.*,s03.*", false)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(ok, "{err}");
    assert!(created.starts_with("camp-2 old → new RUNNING"), "{created}");
    let command = format!(
        "stty rows 40 cols 140; {} campaign watch camp-2 --server {server}",
        env!("CARGO_BIN_EXE_ferry")
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("script")
            .args(["-qefc", &command, "/dev/null"])
            .env("TERM", "xterm-256color")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run ferry under script(1) (util-linux)")
    })
    .await
    .expect("script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // Redrawn in place: cursor up and clear below, between blocks.
    assert!(text.contains("A\r\u{1b}[J"), "{text:?}");
    assert!(text.contains("camp-2 old → new DONE: 2 done"), "{text:?}");
    let failed = failures(load).await;
    for (service, (bad, total)) in &failed {
        assert_eq!(*bad, 0, "{service}: {bad} of {total} requests failed");
    }
}

/// `--to new-a=60,new-b=40`: the target side splits 60/40, measured in
/// the traffic of both proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_targets_take_sixty_and_forty_percent_of_the_traffic() {
    let backends = Backends::start(&["old/s00", "new-a/s00", "new-b/s00"]).await;
    let yaml = format!(
        "services:\n  - name: s00\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n      new-a: {{endpoints: [\"{}\"]}}\n      new-b: {{endpoints: [\"{}\"]}}\n    weights: {{old: 10000, new-a: 0, new-b: 0}}\n",
        backends.addr("old/s00"),
        backends.addr("new-a/s00"),
        backends.addr("new-b/s00"),
    );
    let ferry = Ferry::start(&yaml).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    let load: Vec<Steady> = [envoy.listener_port, proxy.listen_port]
        .into_iter()
        .map(|port| {
            Steady::start_paced(
                port,
                "s00.shop",
                Duration::from_millis(2),
                Duration::from_secs(120),
            )
        })
        .collect();
    let (ok, out, err) = support::ferry_cli(
        &ferry,
        &[
            "campaign",
            "start",
            "--from",
            "old",
            "--to",
            "new-a=60,new-b=40",
            "--steps",
            "50,100",
            "--bake",
            "2s",
            "--min-requests",
            "20",
            "--ack-timeout",
            "20s",
            "--drain",
            "1s",
            "--reason",
            "split old",
            "--watch",
        ],
    );
    assert!(ok, "{out}\n{err}\n{}", ferry.log());
    let done_at = Instant::now();
    // After DONE: every request on a target, 60/40 within ±4 %.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut answers = Vec::new();
    for steady in load {
        answers.extend(steady.stop().await);
    }
    let after: Vec<&String> = answers
        .iter()
        .filter(|(at, _)| *at > done_at)
        .map(|(_, k)| k)
        .collect();
    assert!(
        after.len() >= 500,
        "only {} requests after DONE",
        after.len()
    );
    let a = after.iter().filter(|k| k.starts_with("new-a/")).count() as f64 / after.len() as f64;
    let b = after.iter().filter(|k| k.starts_with("new-b/")).count() as f64 / after.len() as f64;
    assert!(
        (a - 0.60).abs() <= 0.04,
        "new-a got {a:.3} of {}",
        after.len()
    );
    assert!(
        (b - 0.40).abs() <= 0.04,
        "new-b got {b:.3} of {}",
        after.len()
    );
    let lost = answers
        .iter()
        .filter(|(_, k)| !k.starts_with("old/") && !k.starts_with("new-"))
        .count();
    assert_eq!(lost, 0, "failed requests");
    // The migration shows both targets with their shares.
    let m = MigrationsClient::new(support::api_channel(&ferry).await)
        .list_migrations(ListMigrationsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .migrations
        .remove(0);
    let shares: Vec<(String, f64)> = m
        .targets
        .iter()
        .map(|t| (t.cluster.clone(), t.percent))
        .collect();
    assert_eq!(
        shares,
        [("new-a".to_owned(), 60.0), ("new-b".to_owned(), 40.0)]
    );
    assert_eq!(m.stage, "DONE");
}
