//! The API behind TLS, client certificates and bearer tokens: callers are
//! identified, roles decide who may write, the identity is the audit
//! actor, and a refused call changes nothing.

mod support;

use ferry_proto::ferry::v1::traffic_client::TrafficClient;
use ferry_proto::ferry::v1::{
    ClusterWeight, ListAuditRequest, ListServicesRequest, PinRequest, SetWeightsRequest,
};
use support::{Backends, Ca, Ferry, ca, leaf, write};
use tonic::Code;
use tonic::transport::Channel;

fn catalog(backends: &Backends) -> String {
    format!(
        "services:\n  - name: checkout\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n      new: {{endpoints: [\"{}\"]}}\n",
        backends.addr("old/a"),
        backends.addr("new/a")
    )
}

async fn connect(port: u16, ca: &Ca, client: Option<(String, String)>) -> Result<Channel, String> {
    support::tls_channel(port, ca, client).await
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    // Claims to be someone else: ignored once the caller is authenticated.
    r.metadata_mut()
        .insert("x-ferry-actor", "mallory".parse().expect("header"));
    r
}

fn set(bp_new: u32) -> SetWeightsRequest {
    SetWeightsRequest {
        service: "checkout.shop".into(),
        weights: vec![
            ClusterWeight {
                cluster: "old".into(),
                basis_points: 10_000 - bp_new,
            },
            ClusterWeight {
                cluster: "new".into(),
                basis_points: bp_new,
            },
        ],
        reason: "auth test".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_identified_and_roles_decide_who_may_write() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server_ca = ca("ferry-api-ca");
    let (server_cert, server_key) = leaf(&server_ca, "ferry-api");
    let client_ca = ca("ferry-clients-ca");
    let auth = "tokens:\n  - {identity: deploy-bot, role: read, token: read-token}\n  - {identity: tooling, role: write, token: write-token}\nclients:\n  - {identity: sre-alice, role: write}\n  - {identity: viewer, role: read}\n";
    let flags = [
        "--api-tls-cert".to_owned(),
        write(dir.path(), "server.pem", &server_cert)
            .display()
            .to_string(),
        "--api-tls-key".to_owned(),
        write(dir.path(), "server.key", &server_key)
            .display()
            .to_string(),
        "--api-client-ca".to_owned(),
        write(dir.path(), "clients-ca.pem", &client_ca.pem)
            .display()
            .to_string(),
        "--api-auth".to_owned(),
        write(dir.path(), "auth.yaml", auth).display().to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ferry = Ferry::start_with(&catalog(&backends), &flags).await;
    let port = ferry.api_port;

    // Plain text is not served.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("url")
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert!(
            TrafficClient::new(channel)
                .list_services(ListServicesRequest {})
                .await
                .is_err()
        );
    }

    let anonymous = connect(port, &server_ca, None).await.expect("tls");
    let mut api = TrafficClient::new(anonymous);
    let err = api
        .list_services(ListServicesRequest {})
        .await
        .expect_err("no credentials");
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    let err = api
        .list_services(with_token(ListServicesRequest {}, "guess"))
        .await
        .expect_err("unknown token");
    assert_eq!(err.code(), Code::Unauthenticated);

    // A read token reads but may not write; the refusal changes nothing.
    let before = api
        .list_services(with_token(ListServicesRequest {}, "read-token"))
        .await
        .expect("read")
        .into_inner();
    let err = api
        .set_weights(with_token(set(1000), "read-token"))
        .await
        .expect_err("read role");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("deploy-bot") && err.message().contains("SetWeights"),
        "{}",
        err.message()
    );
    let after = api
        .list_services(with_token(ListServicesRequest {}, "read-token"))
        .await
        .expect("read")
        .into_inner();
    assert_eq!(before, after);

    // A write token writes, and is the actor whatever the client claims.
    api.set_weights(with_token(set(1000), "write-token"))
        .await
        .expect("write");

    // Client certificates: the CN is the identity.
    let alice = connect(port, &server_ca, Some(leaf(&client_ca, "sre-alice")))
        .await
        .expect("mTLS");
    TrafficClient::new(alice)
        .pin(PinRequest {
            service: "checkout.shop".into(),
            owner: "sre-alice".into(),
            reason: "freeze".into(),
            ttl_seconds: 60,
        })
        .await
        .expect("alice writes");
    let viewer = connect(port, &server_ca, Some(leaf(&client_ca, "viewer")))
        .await
        .expect("mTLS");
    let err = TrafficClient::new(viewer)
        .set_weights(set(2000))
        .await
        .expect_err("viewer");
    assert_eq!(err.code(), Code::PermissionDenied);
    let stranger = connect(port, &server_ca, Some(leaf(&client_ca, "stranger")))
        .await
        .expect("mTLS");
    let err = TrafficClient::new(stranger)
        .list_services(ListServicesRequest {})
        .await
        .expect_err("stranger");
    assert_eq!(err.code(), Code::PermissionDenied);
    // A certificate from another CA does not get through the handshake.
    let rogue_ca = ca("rogue");
    let rogue = match connect(port, &server_ca, Some(leaf(&rogue_ca, "sre-alice"))).await {
        Ok(channel) => TrafficClient::new(channel)
            .list_services(ListServicesRequest {})
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(rogue, "a foreign client certificate was accepted");

    let audit = api
        .list_audit(with_token(
            ListAuditRequest {
                service: String::new(),
                limit: 10,
            },
            "read-token",
        ))
        .await
        .expect("audit")
        .into_inner()
        .entries;
    let actors: Vec<(&str, &str)> = audit
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str()))
        .collect();
    assert_eq!(actors, [("set_weights", "tooling"), ("pin", "sre-alice")]);

    // The CLI speaks TLS and tokens too.
    let ca_file = write(dir.path(), "api-ca.pem", &server_ca.pem);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["weights", "get", "checkout.shop", "-o", "json"])
        .args(["--server", &format!("https://127.0.0.1:{port}")])
        .arg("--ca")
        .arg(&ca_file)
        .env("FERRY_TOKEN", "read-token")
        .output()
        .expect("cli");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"new\":1000"), "{stdout}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["weights", "set", "checkout.shop", "old=50", "new=50"])
        .args(["--server", &format!("https://127.0.0.1:{port}")])
        .arg("--ca")
        .arg(&ca_file)
        .env("FERRY_TOKEN", "read-token")
        .output()
        .expect("cli");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"));
}
