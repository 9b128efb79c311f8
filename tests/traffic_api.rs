//! The traffic API over real gRPC: weights and pins set through it route
//! the real Envoy, survive a crash of the control plane, and bad requests
//! are refused with the right code, naming the field, changing nothing.

mod support;

use std::time::Duration;

use ferry_proto::ferry::v1::traffic_client::TrafficClient;
use ferry_proto::ferry::v1::{
    ClusterWeight, GetWeightsRequest, ListAuditRequest, ListPinsRequest, ListServicesRequest,
    PinRequest, SetWeightsRequest, UnpinRequest,
};
use support::{Ads, Backends, Envoy, Ferry, Steady, eventually, ferry_cli, share, split};
use tonic::Code;
use tonic::transport::Channel;

const HOST: &str = "checkout.shop";

fn catalog(backends: &Backends) -> String {
    support::checkout_catalog(backends)
}

async fn client(ferry: &Ferry) -> TrafficClient<Channel> {
    let url = format!("http://127.0.0.1:{}", ferry.api_port);
    for _ in 0..100 {
        if let Ok(c) = TrafficClient::connect(url.clone()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("traffic API not reachable at {url}");
}

fn set(service: &str, weights: &[(&str, u32)], reason: &str) -> SetWeightsRequest {
    SetWeightsRequest {
        service: service.to_owned(),
        weights: weights
            .iter()
            .map(|(c, bp)| ClusterWeight {
                cluster: (*c).to_owned(),
                basis_points: *bp,
            })
            .collect(),
        reason: reason.to_owned(),
        ..Default::default()
    }
}

/// Everything a rejected request must leave untouched.
async fn state(api: &mut TrafficClient<Channel>, ferry: &Ferry) -> String {
    let services = api
        .list_services(ListServicesRequest {})
        .await
        .expect("list")
        .into_inner();
    let pins = api
        .list_pins(ListPinsRequest {})
        .await
        .expect("pins")
        .into_inner();
    let audit = api
        .list_audit(ListAuditRequest::default())
        .await
        .expect("audit")
        .into_inner();
    let status = ferry.status().await;
    format!(
        "{services:?}\n{pins:?}\n{audit:?}\n{}\n{}",
        status["xds"]["snapshot_version"], status["catalog"]["services"]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_naming_the_field_and_change_nothing() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends)).await;
    let mut api = client(&ferry).await;
    api.pin(PinRequest {
        service: HOST.into(),
        owner: "deployer".into(),
        reason: "release freeze".into(),
        ttl_seconds: 0,
    })
    .await
    .expect("pin");
    api.set_weights(SetWeightsRequest {
        owner: "deployer".into(),
        ..set(HOST, &[("old", 9000), ("new", 1000)], "canary")
    })
    .await
    .expect("owner may set weights");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = state(&mut api, &ferry).await;
    let version = api
        .get_weights(GetWeightsRequest {
            service: HOST.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .policy_version;

    let owner = |mut r: SetWeightsRequest| {
        r.owner = "deployer".into();
        r
    };
    let cases: Vec<(SetWeightsRequest, Code, &str)> = vec![
        (
            owner(set("", &[("old", 10000)], "x")),
            Code::InvalidArgument,
            "service",
        ),
        (
            owner(set("Checkout.shop", &[("old", 10000)], "x")),
            Code::InvalidArgument,
            "service",
        ),
        (
            owner(set(HOST, &[("old", 9000), ("new", 999)], "x")),
            Code::InvalidArgument,
            "9999",
        ),
        (
            owner(set(HOST, &[("old", 10001)], "x")),
            Code::InvalidArgument,
            "weights[0].basis_points",
        ),
        (
            owner(set(HOST, &[("old", 5000), ("mars", 5000)], "x")),
            Code::InvalidArgument,
            "weights[1].cluster",
        ),
        (
            owner(set(HOST, &[("old", 5000), ("old", 5000)], "x")),
            Code::InvalidArgument,
            "twice",
        ),
        (
            owner(set(HOST, &[("Old", 10000)], "x")),
            Code::InvalidArgument,
            "weights[0].cluster",
        ),
        (owner(set(HOST, &[], "x")), Code::InvalidArgument, "weights"),
        (
            owner(set(HOST, &[("new", 10000)], " ")),
            Code::InvalidArgument,
            "reason",
        ),
        (
            owner(set("nope.shop", &[("new", 10000)], "x")),
            Code::NotFound,
            "nope.shop",
        ),
        (
            set(HOST, &[("new", 10000)], "not the owner"),
            Code::FailedPrecondition,
            "deployer",
        ),
        (
            SetWeightsRequest {
                expected_version: version + 7,
                ..owner(set(HOST, &[("new", 10000)], "x"))
            },
            Code::Aborted,
            "expected",
        ),
    ];
    for (request, code, needle) in cases {
        let what = format!("{request:?}");
        let err = api.set_weights(request).await.expect_err(&what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{what}: message {:?} lacks {needle:?}",
            err.message()
        );
    }
    let pin_err = api
        .pin(PinRequest {
            service: HOST.into(),
            owner: "".into(),
            reason: "x".into(),
            ttl_seconds: 0,
        })
        .await
        .expect_err("pin without owner");
    assert_eq!(pin_err.code(), Code::InvalidArgument);
    assert!(pin_err.message().contains("owner"));
    let pin_err = api
        .pin(PinRequest {
            service: HOST.into(),
            owner: "someone-else".into(),
            reason: "x".into(),
            ttl_seconds: 0,
        })
        .await
        .expect_err("pin held by another owner");
    assert_eq!(pin_err.code(), Code::FailedPrecondition);
    let unpin_err = api
        .unpin(UnpinRequest {
            service: HOST.into(),
            owner: "someone-else".into(),
            reason: String::new(),
        })
        .await
        .expect_err("unpin by another owner");
    assert_eq!(unpin_err.code(), Code::FailedPrecondition);
    let unpin_err = api
        .unpin(UnpinRequest {
            service: "cart.shop".into(),
            owner: "deployer".into(),
            reason: String::new(),
        })
        .await
        .expect_err("unpin of an unpinned service");
    assert_eq!(unpin_err.code(), Code::NotFound);

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        state(&mut api, &ferry).await,
        before,
        "a rejected request changed state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_weights_route_envoy_and_survive_a_crash() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let mut ferry = Ferry::start(&catalog(&backends)).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    assert_eq!(
        share(&split(envoy.listener_port, HOST, 50).await, "old/"),
        1.0
    );

    let mut api = client(&ferry).await;
    let set_reply = api
        .set_weights(set(HOST, &[("old", 0), ("new", 10000)], "move to new"))
        .await
        .expect("set weights")
        .into_inner();
    assert_eq!(set_reply.source, "policy");
    let port = envoy.listener_port;
    eventually(
        Duration::from_secs(2),
        "all traffic on new",
        || async move { share(&split(port, HOST, 20).await, "new/") == 1.0 },
    )
    .await;

    // Crash and restart while traffic flows: Envoy must never be sent the
    // catalog's weights (all old) again.
    let steady = Steady::start(envoy.listener_port, HOST);
    ferry.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ferry.restart().await;
    let node = envoy.node_id.clone();
    eventually(
        Duration::from_secs(15),
        "envoy reconnected and ACKed",
        || {
            let (ferry, node) = (&ferry, node.clone());
            async move {
                let s = ferry.status().await;
                s["xds"]["clients"].as_array().is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c["node_id"] == node.as_str()
                            && c["types"]["rds"]["acked_version"].is_string()
                    })
                })
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answers = steady.stop().await;
    assert!(answers.len() > 20, "steady stream too thin");
    let wrong: Vec<_> = answers
        .iter()
        .filter(|(_, k)| !k.starts_with("new/"))
        .collect();
    assert!(
        wrong.is_empty(),
        "traffic left new across the restart: {:?}",
        &wrong[..wrong.len().min(5)]
    );
    let status = ferry.status().await;
    let svc = status["catalog"]["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == HOST))
        .cloned()
        .unwrap_or_default();
    assert_eq!(svc["weights_from"], "policy", "{svc}");
    assert_eq!(svc["clusters"]["new"]["weight_bp"], 10000, "{svc}");

    let mut api = client(&ferry).await;
    let audit = api
        .list_audit(ListAuditRequest {
            service: HOST.into(),
            limit: 0,
        })
        .await
        .expect("audit")
        .into_inner();
    let last = audit.entries.last().expect("an audit entry");
    assert_eq!(last.action, "set_weights");
    assert_eq!(last.reason, "move to new");
    assert!(last.detail.contains("new=10000"), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_have_owners_and_expire() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends)).await;
    let mut api = client(&ferry).await;
    let pin = api
        .pin(PinRequest {
            service: HOST.into(),
            owner: "migration-7".into(),
            reason: "moving to new".into(),
            ttl_seconds: 1,
        })
        .await
        .expect("pin")
        .into_inner();
    assert!(pin.expires_at_unix_ms > pin.pinned_at_unix_ms);

    let refused = api
        .set_weights(SetWeightsRequest {
            owner: "someone".into(),
            ..set(HOST, &[("new", 10000)], "x")
        })
        .await
        .expect_err("not the owner");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("migration-7"),
        "{}",
        refused.message()
    );
    api.set_weights(SetWeightsRequest {
        owner: "migration-7".into(),
        ..set(HOST, &[("old", 5000), ("new", 5000)], "step")
    })
    .await
    .expect("the owner may");

    eventually(Duration::from_secs(5), "pin expired", || {
        let mut api = api.clone();
        async move {
            api.list_pins(ListPinsRequest {})
                .await
                .map(|r| r.into_inner().pins.is_empty())
                .unwrap_or(false)
        }
    })
    .await;
    let audit = api
        .list_audit(ListAuditRequest::default())
        .await
        .expect("audit")
        .into_inner();
    let actions: Vec<&str> = audit.entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["pin", "set_weights", "pin_expired"]);
    api.set_weights(SetWeightsRequest {
        owner: "someone".into(),
        ..set(HOST, &[("new", 10000)], "after expiry")
    })
    .await
    .expect("anyone may once the pin expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_and_reads_weights_pins_and_audit() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends)).await;
    let _ = client(&ferry).await;

    let (ok, _, err) = ferry_cli(
        &ferry,
        &[
            "weights",
            "set",
            HOST,
            "old=99.99",
            "new=0.01",
            "--reason",
            "canary",
        ],
    );
    assert!(ok, "{err}");
    let (ok, out, err) = ferry_cli(&ferry, &["weights", "get", HOST, "-o", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["weights_bp"]["new"], 1);
    assert_eq!(v["weights_bp"]["old"], 9999);
    assert_eq!(v["source"], "policy");

    // A bad sum is refused in the unit the user typed: percent, or basis
    // points with --bp (then by the API, which keeps basis points).
    let (ok, _, err) = ferry_cli(
        &ferry,
        &["weights", "set", HOST, "old=50", "new=49", "--reason", "x"],
    );
    assert!(!ok, "a bad sum must fail");
    assert!(err.contains("sum to 99.00 %, must be 100 %"), "{err}");
    let (ok, _, err) = ferry_cli(
        &ferry,
        &[
            "weights", "set", HOST, "old=5000", "new=4900", "--bp", "--reason", "x",
        ],
    );
    assert!(!ok, "a bad sum must fail");
    assert!(
        err.contains("InvalidArgument") && err.contains("9900 basis points"),
        "{err}"
    );
    // Neither changed anything.
    let (_, out, _) = ferry_cli(&ferry, &["weights", "get", HOST, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["weights_bp"]["old"], 9999);

    let (ok, _, err) = ferry_cli(
        &ferry,
        &["pin", HOST, "--owner", "deploy-bot", "--reason", "freeze"],
    );
    assert!(ok, "{err}");
    let (ok, out, _) = ferry_cli(&ferry, &["pins", "-o", "json"]);
    assert!(ok);
    assert!(out.contains("deploy-bot"), "{out}");
    let (ok, out, _) = ferry_cli(&ferry, &["status"]);
    assert!(ok);
    assert!(
        out.contains("checkout.shop") && out.contains("0.01%") && out.contains("deploy-bot"),
        "{out}"
    );
    let (ok, out, _) = ferry_cli(&ferry, &["audit", "-o", "json"]);
    assert!(ok);
    let audit: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(audit[0]["actor"], "alice", "{audit}");
    assert_eq!(audit[0]["reason"], "canary");
    assert_eq!(audit[1]["action"], "pin");
}
