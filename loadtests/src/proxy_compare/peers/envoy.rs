//! Envoy `--concurrency N`, twice: configured by `ferry control` over
//! delta ADS (the bootstrap the tests use), and with a static config of
//! one listener, one route and one cluster, the control that shows what
//! Envoy costs without Ferry's config.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

use super::super::fixed_rate::admin_get;
use super::super::machine::pinned;
use super::super::process::{Process, free_addrs};
use super::super::upstream;
use super::{Peer, PeerKind, Setting};

/// The bootstrap's clusters that reach the control plane, not the backend.
const CONTROL_CLUSTERS: [&str; 2] = ["ferry_xds", "ferry_lrs"];

/// Envoy taking everything over ADS from `ferry control`; it listens where
/// the control plane's Listener says.
pub fn start_configured(setting: &Setting<'_>, core: &str, dir: &Path) -> anyhow::Result<Peer> {
    let [admin] = free_addrs()?;
    let bootstrap = crate::envoy_bootstrap(
        "proxy-compare-envoy",
        "proxy-compare",
        "DELTA_GRPC",
        setting.xds,
        admin,
    );
    let process = spawn(setting, core, dir, &bootstrap, admin)?;
    Ok(Peer {
        kind: PeerKind::Envoy,
        h1: setting.envoy_listen,
        h2: setting.envoy_listen,
        admin: Some(admin),
        process: Some(process),
    })
}

/// Envoy with [`static_bootstrap`].
pub fn start_static(setting: &Setting<'_>, core: &str, dir: &Path) -> anyhow::Result<Peer> {
    let [listen, admin] = free_addrs()?;
    let bootstrap = static_bootstrap(listen, setting.backend_h1, admin);
    let process = spawn(setting, core, dir, &bootstrap, admin)?;
    Ok(Peer {
        kind: PeerKind::EnvoyStatic,
        h1: listen,
        h2: listen,
        admin: Some(admin),
        process: Some(process),
    })
}

fn spawn(
    setting: &Setting<'_>,
    core: &str,
    dir: &Path,
    bootstrap: &str,
    admin: SocketAddr,
) -> anyhow::Result<Process> {
    let file = dir.join("envoy-bootstrap.yaml");
    std::fs::write(&file, bootstrap).with_context(|| format!("writing {}", file.display()))?;
    let mut command = pinned(core, &setting.binaries.envoy);
    command
        .arg("-c")
        .arg(&file)
        .args(["--concurrency", &setting.workers.to_string()])
        .args(["-l", "info"])
        // Its own shared-memory id, so it never meets another test's Envoy.
        .args(["--base-id", &admin.port().to_string()]);
    Process::spawn("envoy", command, dir.join("envoy.log"))
}

/// One HTTP listener (HTTP/1.1 and h2c, `codec_type: AUTO`) routing every
/// request to one static cluster: Envoy's defaults otherwise.
pub fn static_bootstrap(listen: SocketAddr, backend: SocketAddr, admin: SocketAddr) -> String {
    format!(
        r#"node: {{id: proxy-compare-envoy-static, cluster: proxy-compare}}
static_resources:
  listeners:
    - name: http
      address: {{socket_address: {{address: {listen_ip}, port_value: {listen_port}}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: http
                codec_type: AUTO
                route_config:
                  name: local
                  virtual_hosts:
                    - name: backend
                      domains: ["*"]
                      routes: [{{match: {{prefix: "/"}}, route: {{cluster: backend}}}}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: backend
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: backend
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {backend_ip}, port_value: {backend_port}}}}}}}}}]}}]
admin:
  address: {{socket_address: {{address: {admin_ip}, port_value: {admin_port}}}}}
"#,
        listen_ip = listen.ip(),
        listen_port = listen.port(),
        backend_ip = backend.ip(),
        backend_port = backend.port(),
        admin_ip = admin.ip(),
        admin_port = admin.port(),
    )
}

/// `cluster.*.upstream_cx_total` over the backend's clusters, from the
/// admin `/stats`.
pub async fn upstream_connections(admin: SocketAddr) -> anyhow::Result<u64> {
    let (status, stats) = admin_get(admin, "/stats?filter=upstream_cx_total").await?;
    anyhow::ensure!(status == 200, "envoy /stats: {status} {stats}");
    Ok(upstream::envoy_upstream_cx_total(
        &stats,
        &CONTROL_CLUSTERS,
    )?)
}

/// `envoy --version`'s version field (`1.40.0/Clean/RELEASE/BoringSSL`).
pub fn version(binary: &Path) -> anyhow::Result<String> {
    let output = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "running {} --version (set FERRY_ENVOY or pass --envoy)",
                binary.display()
            )
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split("version:")
        .nth(1)
        .map(str::trim)
        .and_then(|v| v.split_once('/').map(|(_, rest)| rest.to_owned()))
        .with_context(|| format!("unexpected `envoy --version` output: {text}"))?;
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_static_config_routes_everything_to_the_backend() {
        let text = static_bootstrap(
            "127.0.0.1:1001".parse().unwrap(),
            "127.0.0.1:1002".parse().unwrap(),
            "127.0.0.1:1003".parse().unwrap(),
        );
        assert!(text.contains("port_value: 1001"), "{text}");
        assert!(
            text.contains("address: 127.0.0.1, port_value: 1002"),
            "{text}"
        );
        assert!(text.contains("route: {cluster: backend}"), "{text}");
        assert!(text.contains("codec_type: AUTO"), "{text}");
    }
}
