//! `--deploy hook`: a real control plane calling its deploy hook (a shell
//! command, or a webhook served by the test) at DOUBLE_DEPLOY, CLEANUP and
//! on a rollback: success, failure and timeout.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
use ferry_proto::ferry::v1::{
    CreateMigrationRequest, GetMigrationRequest, Migration, MigrationActionRequest,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use support::{Backends, Ferry, FerryProxy, Steady};
use tonic::transport::Channel;

fn catalog(backends: &Backends, services: &[&str]) -> String {
    let mut yaml = String::from("services:\n");
    for n in services {
        yaml.push_str(&format!(
            "  - name: {n}\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n      new: {{endpoints: [\"{}\"]}}\n    weights: {{old: 10000, new: 0}}\n",
            backends.addr(&format!("old/{n}")),
            backends.addr(&format!("new/{n}")),
        ));
    }
    yaml
}

fn plan(service: &str) -> CreateMigrationRequest {
    CreateMigrationRequest {
        deploy: "hook".into(),
        service: format!("{service}.shop"),
        ..support::migration_plan(&[50.0, 100.0], "2s")
    }
}

async fn until_ended(api: &MigrationsClient<Channel>, id: &str, limit: Duration) -> Migration {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let m = api
            .clone()
            .get_migration(GetMigrationRequest { id: id.to_owned() })
            .await
            .expect("get")
            .into_inner();
        if matches!(m.stage.as_str(), "DONE" | "ROLLED_BACK" | "FAILED") {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "migration {id} did not end within {limit:?}: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deploy_command_is_called_at_each_stage_and_its_failure_or_timeout_fails_cleanly() {
    let backends = Backends::start(&[
        "old/ok",
        "new/ok",
        "old/broken",
        "new/broken",
        "old/slow",
        "new/slow",
    ])
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let calls = dir.path().join("calls");
    let hook = format!(
        "echo \"$FERRY_STAGE $FERRY_MIGRATION $FERRY_SERVICE $FERRY_SOURCES $FERRY_TARGETS\" >> {calls}; \
         case \"$FERRY_SERVICE_NAME\" in broken) echo 'kubectl: quota exceeded' >&2; exit 3;; \
         slow) sleep 30;; esac",
        calls = calls.display()
    );
    let ferry = Ferry::start_with(
        &catalog(&backends, &["ok", "broken", "slow"]),
        &["--deploy-hook", &hook, "--deploy-timeout", "2s"],
    )
    .await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    let steady = Steady::start_paced(
        proxy.listen_port,
        "ok.shop",
        Duration::from_millis(5),
        Duration::from_secs(90),
    );
    let api = MigrationsClient::new(support::api_channel(&ferry).await);
    let mut ids = Vec::new();
    for service in ["ok", "broken", "slow"] {
        let m = api
            .clone()
            .create_migration(plan(service))
            .await
            .expect("create")
            .into_inner();
        assert_eq!(m.deploy, "hook");
        ids.push(m.id);
    }
    let ok = until_ended(&api, &ids[0], Duration::from_secs(60)).await;
    let broken = until_ended(&api, &ids[1], Duration::from_secs(30)).await;
    let slow = until_ended(&api, &ids[2], Duration::from_secs(30)).await;
    let answers = steady.stop().await;
    assert_eq!(ok.stage, "DONE", "{ok:?}\n{}", ferry.log());
    assert_eq!(broken.stage, "FAILED");
    assert!(
        broken.reason.contains("the hook deploy failed")
            && broken.reason.contains("exit status: 3")
            && broken.reason.contains("kubectl: quota exceeded"),
        "{}",
        broken.reason
    );
    assert_eq!(slow.stage, "FAILED");
    assert!(
        slow.reason.contains("did not finish within 2s"),
        "{}",
        slow.reason
    );
    // Neither changed any weight, and both released their pins.
    assert!(broken.weights.is_empty() && slow.weights.is_empty());
    let (pins_ok, pins, _) = support::ferry_cli(&ferry, &["pins"]);
    assert!(pins_ok);
    assert!(!pins.contains("broken") && !pins.contains("slow"), "{pins}");
    // The hook saw each stage, with the migration's facts.
    let log = std::fs::read_to_string(&calls).expect("calls");
    let id = &ids[0];
    assert!(
        log.contains(&format!("double_deploy {id} ok.shop old new=100")),
        "{log}"
    );
    assert!(
        log.contains(&format!("cleanup {id} ok.shop old new=100")),
        "{log}"
    );
    // Cleanup came after the double deploy.
    let double = log.find(&format!("double_deploy {id}")).expect("double");
    let cleanup = log.find(&format!("cleanup {id}")).expect("cleanup");
    assert!(double < cleanup);
    assert!(
        answers
            .iter()
            .all(|(_, k)| k.starts_with("old/ok") || k.starts_with("new/ok"))
    );
}

/// A webhook served by the test: records each JSON call, answers 200.
async fn webhook() -> (u16, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            if let Ok(v) = serde_json::from_slice(&body) {
                                seen.lock().unwrap_or_else(|p| p.into_inner()).push(v);
                            }
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from("ok"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deploy_webhook_is_called_and_an_abort_undoes_the_deploy() {
    let backends = Backends::start(&["old/web", "new/web"]).await;
    let (port, calls) = webhook().await;
    let url = format!("http://127.0.0.1:{port}/deploy");
    let ferry = Ferry::start_with(&catalog(&backends, &["web"]), &["--deploy-webhook", &url]).await;
    let _proxy = FerryProxy::start(ferry.xds_port).await;
    let mut api = MigrationsClient::new(support::api_channel(&ferry).await);
    let m = api
        .create_migration(CreateMigrationRequest {
            bake: "60s".into(),
            ..plan("web")
        })
        .await
        .expect("create")
        .into_inner();
    // Deployed, then shifting: abort it.
    support::eventually(Duration::from_secs(30), "shifting", || {
        let mut api = api.clone();
        let id = m.id.clone();
        async move {
            api.get_migration(GetMigrationRequest { id })
                .await
                .is_ok_and(|m| m.into_inner().stage == "SHIFT")
        }
    })
    .await;
    api.abort_migration(MigrationActionRequest {
        id: m.id.clone(),
        reason: "changed our mind".into(),
    })
    .await
    .expect("abort");
    let ended = until_ended(&api, &m.id, Duration::from_secs(30)).await;
    assert_eq!(ended.stage, "ROLLED_BACK", "{ended:?}");
    let calls = calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let stages: Vec<&str> = calls.iter().filter_map(|c| c["stage"].as_str()).collect();
    assert_eq!(stages, ["double_deploy", "rollback"], "{calls:?}");
    assert_eq!(calls[0]["service"], "web.shop");
    assert_eq!(calls[0]["migration"], m.id.as_str());
    assert_eq!(calls[0]["targets"], "new=100");
    let audit = support::ferry_cli(&ferry, &["audit", "--service", "web.shop"]).1;
    assert!(audit.contains("the deploy was undone"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_migration_is_refused_where_no_hook_is_configured() {
    let backends = Backends::start(&["old/web", "new/web"]).await;
    let ferry = Ferry::start(&catalog(&backends, &["web"])).await;
    let mut api = MigrationsClient::new(support::api_channel(&ferry).await);
    let err = api
        .create_migration(plan("web"))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("deploy"), "{}", err.message());
    assert!(err.message().contains("--deploy-hook"), "{}", err.message());
    let (ok, out, _) = support::ferry_cli(&ferry, &["migrate", "list"]);
    assert!(ok);
    assert!(!out.contains("mig-"), "nothing was created: {out}");
}
