//! The catalog file's YAML shape, as serde reads it. Nothing here is
//! checked beyond types; `validate` turns it into the catalog model.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCatalog {
    #[serde(default)]
    pub(super) services: Vec<RawService>,
    pub(super) kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    #[serde(default)]
    pub(super) namespaces: Vec<String>,
    #[serde(default)]
    pub(super) clusters: Vec<RawCluster>,
    /// `cluster_secrets: true`, or `{namespace, kubeconfig, context,
    /// in_cluster}` to read them elsewhere.
    pub(super) cluster_secrets: Option<RawClusterSecrets>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawClusterSecrets {
    Enabled(bool),
    Detailed(RawClusterSecretsDetail),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClusterSecretsDetail {
    pub(super) namespace: Option<String>,
    pub(super) kubeconfig: Option<PathBuf>,
    pub(super) context: Option<String>,
    #[serde(default)]
    pub(super) in_cluster: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) name: String,
    pub(super) kubeconfig: Option<PathBuf>,
    pub(super) context: Option<String>,
    #[serde(default)]
    pub(super) in_cluster: bool,
    /// A write credential for `--deploy kube` (Ferry's own identity stays
    /// read-only).
    pub(super) deploy_kubeconfig: Option<PathBuf>,
    pub(super) deploy_context: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: String,
    #[serde(default = "default_namespace")]
    pub(super) namespace: String,
    pub(super) ports: Vec<RawPort>,
    #[serde(default)]
    pub(super) hosts: Vec<String>,
    pub(super) backends: BTreeMap<String, RawBackend>,
    pub(super) weights: Option<BTreeMap<String, u32>>,
    /// `sticky: {header: x-user-id}`
    #[serde(default)]
    pub(super) sticky: Option<RawSticky>,
    /// `http1` (default) or `http2` (h2c: gRPC).
    pub(super) protocol: Option<String>,
    /// Whole-request timeout, e.g. `5s`.
    pub(super) timeout: Option<String>,
    pub(super) retries: Option<RawRetries>,
    pub(super) outlier_detection: Option<RawOutlierDetection>,
    pub(super) health_check: Option<RawHealthCheck>,
    /// `tls: {server_name: checkout.internal, ca_file: /etc/ferry/ca.pem}`,
    /// with `cert_file` and `key_file` for mutual TLS.
    pub(super) tls: Option<RawUpstreamTls>,
    /// `upgrades: [websocket]` (the default); `[]` allows none.
    pub(super) upgrades: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    pub(super) server_name: String,
    pub(super) ca_file: PathBuf,
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    pub(super) path: String,
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) unhealthy_threshold: Option<u32>,
    pub(super) healthy_threshold: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetries {
    pub(super) attempts: u32,
    #[serde(default = "default_retry_on")]
    pub(super) on: Vec<String>,
    pub(super) per_try_timeout: Option<String>,
}

fn default_retry_on() -> Vec<String> {
    vec!["connect-failure".to_owned()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutlierDetection {
    pub(super) consecutive_5xx: Option<u32>,
    pub(super) base_ejection_time: Option<String>,
    pub(super) max_ejection_percent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSticky {
    pub(super) header: Option<String>,
    pub(super) cookie: Option<String>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPort {
    pub(super) name: String,
    pub(super) port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    #[serde(default)]
    pub(super) endpoints: Vec<RawEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawEndpoint {
    Address(String),
    Detailed(RawEndpointDetail),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpointDetail {
    pub(super) address: String,
    #[serde(default)]
    pub(super) ports: BTreeMap<String, u16>,
    #[serde(default = "yes")]
    pub(super) ready: bool,
    #[serde(default)]
    pub(super) terminating: bool,
    pub(super) zone: Option<String>,
}

fn yes() -> bool {
    true
}
