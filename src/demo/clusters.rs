//! The demo's two Kubernetes clusters, `old` and `new`: each an
//! in-process API server speaking the real list/watch protocol
//! (`ferry-testkube`), which `ferry control` watches with kube-rs exactly
//! as it watches real clusters. Each Service is exported (`ferry.io/
//! export: "true"`) and its EndpointSlice lists its pods once they serve.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use ferry_testkube::TestKube;
use tokio_util::sync::CancellationToken;

use super::pods::{self, PodSpec};
use super::scenario::{NAMESPACE, ServicePlan};

/// The clusters, in order: `old`, then `new`.
pub const CLUSTERS: [&str; 2] = ["old", "new"];

/// Pods per service per cluster.
const PODS: u8 = 2;

/// The running clusters and their pods.
pub struct Clusters {
    pub kubes: Vec<TestKube>,
    /// Each service's port, the same on every pod.
    pub ports: std::collections::BTreeMap<String, u16>,
    stop: CancellationToken,
}

impl Clusters {
    /// Starts both API servers and every pod of `services`, publishes
    /// them, and writes a kubeconfig per cluster into `dir`.
    pub async fn start(services: &[ServicePlan], dir: &Path) -> anyhow::Result<Self> {
        ferry_testkube::install_crypto_provider();
        let stop = CancellationToken::new();
        let mut kubes = Vec::new();
        for name in CLUSTERS {
            let kube = TestKube::try_start_with(
                format!("demo-token-{name}"),
                ferry_testkube::Options::default(),
            )
            .await
            .with_context(|| format!("starting cluster {name}'s API server"))?;
            kube.kubeconfig(dir.join(format!("{name}.yaml")), name, None)
                .with_context(|| format!("writing cluster {name}'s kubeconfig"))?;
            kubes.push(kube);
        }
        let mut ports = std::collections::BTreeMap::new();
        for (si, service) in services.iter().enumerate() {
            // One port per service, the same on every pod (each pod has an
            // address of its own), as behind a Kubernetes Service.
            let mut port = 0;
            for (ci, (cluster, kube)) in CLUSTERS.iter().zip(&kubes).enumerate() {
                let mut ips = Vec::new();
                for p in 0..PODS {
                    let spec = PodSpec {
                        service: service.name.to_owned(),
                        cluster: (*cluster).to_owned(),
                        name: format!("{}-{}-{}", service.name, cluster, p),
                        latency: service.latency(cluster),
                        fault_share: service.fault_share(cluster),
                    };
                    let ip = pods::pod_ip(ci as u8, (si as u8) * PODS + p);
                    let addr = bind_pod(spec, ip, &mut port, &stop).await?;
                    ips.push(addr.ip().to_string());
                }
                ports.insert(service.name.to_owned(), port);
                let port = i32::from(port);
                kube.apply_service(
                    NAMESPACE,
                    service.name,
                    &[("ferry.io/export", "true")],
                    &[("http", port)],
                );
                let endpoints: Vec<_> = ips
                    .iter()
                    .map(|ip| (ip.as_str(), true, true, false, Some("zone-a")))
                    .collect();
                kube.apply_endpoint_slice(
                    NAMESPACE,
                    &format!("{}-{cluster}", service.name),
                    service.name,
                    &endpoints,
                    &[("http", port)],
                );
            }
        }
        Ok(Self { kubes, ports, stop })
    }

    pub async fn stop(&self) {
        self.stop.cancel();
        for kube in &self.kubes {
            kube.stop().await;
        }
    }
}

/// Binds a pod on `ip`, at `port` once one is chosen (the first pod of a
/// service chooses it; the others, each on an address of its own, take
/// the same).
async fn bind_pod(
    spec: PodSpec,
    ip: std::net::IpAddr,
    port: &mut u16,
    stop: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let addr = pods::start(spec.clone(), ip, *port, stop.clone())
        .await
        .with_context(|| format!("binding pod {} at {ip}:{port}", spec.name))?;
    *port = addr.port();
    Ok(addr)
}
