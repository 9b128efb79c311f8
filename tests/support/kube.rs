//! In-process Kubernetes clusters for discovery tests.

use super::*;

/// An in-process Kubernetes cluster exporting one service, `web.shop`
/// (port 80, one ready endpoint on 8080), with a kubeconfig for it in a
/// temporary directory (kept alive by the returned handle).
pub async fn web_cluster(
    token: &str,
) -> (
    ferry_testkube::TestKube,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    ferry_testkube::install_crypto_provider();
    let kube = ferry_testkube::TestKube::start(token).await;
    kube.apply_service(
        "shop",
        "web",
        &[("ferry.io/export", "true")],
        &[("http", 80)],
    );
    kube.apply_endpoint_slice(
        "shop",
        "web-a",
        "web",
        &[("10.0.0.1", true, true, false, None)],
        &[("http", 8080)],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("home.kubeconfig");
    kube.kubeconfig(&kubeconfig, "home", None)
        .expect("kubeconfig");
    (kube, dir, kubeconfig)
}
