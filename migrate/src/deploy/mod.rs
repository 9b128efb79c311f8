//! Deploy work for migrations with a deploy mode: the control plane's
//! deploy hook, for shops with their own deploy tooling.
//!
//! The hook is configured on `ferry control` (`--deploy-hook CMD` or
//! `--deploy-webhook URL`), never in a request: whoever may start a
//! migration must not choose what the control plane runs. It is called
//! with the stage (`double_deploy`, `cleanup`, `rollback`), the migration,
//! the service, its sources and its targets, and must succeed within
//! `--deploy-timeout`:
//!
//! - a command runs under `sh -c` with `FERRY_STAGE`, `FERRY_MIGRATION`,
//!   `FERRY_SERVICE` (`name.namespace`), `FERRY_SERVICE_NAME`,
//!   `FERRY_NAMESPACE`, `FERRY_SOURCES` (comma separated) and
//!   `FERRY_TARGETS` (`new-a=60,new-b=40`) in its environment; exit 0 is
//!   success;
//! - a webhook gets the same as a JSON `POST`; a 2xx answer is success.
//!
//! A call may be repeated (after a control plane restart, say): hooks must
//! be idempotent.
//!
//! `--deploy kube` is Ferry's own deployer ([`kube`]).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::migration::{Deploy, DeployStep, Migration, Plan};
use crate::policy::PolicyError;

pub mod kube;

pub use self::kube::{KubeDeployer, MIGRATION_LABEL};

/// The most of a hook's output an error quotes.
const QUOTED_OUTPUT: usize = 512;

/// Where the deploy hook is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeployHook {
    #[default]
    None,
    /// A shell command.
    Command(String),
    /// An `http://` URL to POST to.
    Webhook(String),
}

/// The control plane's deploy configuration.
#[derive(Debug, Clone)]
pub struct DeployConfig {
    pub hook: DeployHook,
    /// The longest one hook call (or one `kube` step) may take.
    pub timeout: Duration,
    /// The catalog's clusters, whose `deploy_kubeconfig`s `--deploy kube`
    /// writes with (`None`: no Kubernetes clusters).
    pub clusters:
        Option<tokio::sync::watch::Receiver<ferry_discovery::kubernetes::KubernetesConfig>>,
}

impl Default for DeployConfig {
    fn default() -> Self {
        Self {
            hook: DeployHook::None,
            timeout: Duration::from_secs(600),
            clusters: None,
        }
    }
}

/// Why deploy work failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("this control plane has no deploy hook (--deploy-hook or --deploy-webhook)")]
    NotConfigured,
    #[error("the deploy hook could not start: {0}")]
    Spawn(std::io::Error),
    #[error("the deploy hook exited with {status}: {output}")]
    Exit { status: String, output: String },
    #[error("the deploy hook did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the deploy webhook {url}: {reason}")]
    Webhook { url: String, reason: String },
    #[error("{0}")]
    Kube(String),
}

/// The last `QUOTED_OUTPUT` bytes of a hook's output, as one line.
fn quoted(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let text = text.trim();
    let start = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|i| text.len() - i <= QUOTED_OUTPUT)
        .unwrap_or(text.len());
    ferry_discovery::untrusted::escape(&text[start..]).into_owned()
}

/// What a hook is told about a call.
fn call(m: &Migration, step: DeployStep) -> Vec<(&'static str, String)> {
    let targets = m
        .plan
        .target_shares()
        .iter()
        .map(|(c, bp)| format!("{c}={}", f64::from(*bp) / 100.0))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        ("FERRY_STAGE", step.as_str().to_owned()),
        ("FERRY_MIGRATION", m.id.clone()),
        ("FERRY_SERVICE", m.plan.service.to_string()),
        ("FERRY_SERVICE_NAME", m.plan.service.name().to_owned()),
        ("FERRY_NAMESPACE", m.plan.service.namespace().to_owned()),
        (
            "FERRY_SOURCES",
            m.plan
                .from
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("FERRY_TARGETS", targets),
    ]
}

/// Runs deploy work.
#[derive(Debug, Clone)]
pub struct Deployer {
    config: DeployConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    kube: Option<KubeDeployer>,
}

impl Deployer {
    pub fn new(config: DeployConfig) -> Self {
        Self {
            kube: config.clusters.clone().map(KubeDeployer::new),
            config,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Refuses a plan whose deploy mode this control plane cannot do.
    pub fn check(&self, plan: &Plan) -> Result<(), PolicyError> {
        match plan.deploy {
            Deploy::None => Ok(()),
            Deploy::Hook if self.config.hook == DeployHook::None => {
                Err(PolicyError::InvalidArgument {
                    field: "deploy".into(),
                    reason: DeployError::NotConfigured.to_string(),
                })
            }
            Deploy::Hook => Ok(()),
            Deploy::Kube { .. } => {
                let mut clusters = plan.from.clone();
                clusters.extend(plan.target_shares().into_iter().map(|(c, _)| c));
                let missing = match &self.kube {
                    Some(kube) => kube.missing(&clusters),
                    None => clusters,
                };
                if missing.is_empty() {
                    return Ok(());
                }
                Err(PolicyError::InvalidArgument {
                    field: "deploy".into(),
                    reason: format!(
                        "--deploy kube writes with a credential of its own per cluster, and {} \
                         has no deploy_kubeconfig in the catalog (Ferry's own identity stays read-only)",
                        missing
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })
            }
        }
    }

    /// Does `step` of `m`'s deploy.
    pub async fn run(&self, m: &Migration, step: DeployStep) -> Result<(), DeployError> {
        let timeout = self.config.timeout;
        let work = async {
            match (m.plan.deploy, &self.kube) {
                (Deploy::Kube { copy_secrets, .. }, Some(kube)) => match step {
                    DeployStep::Deploy => kube.deploy(m, copy_secrets).await,
                    DeployStep::Undo => kube.undo(m).await,
                    DeployStep::Retire => kube.retire(m).await,
                    DeployStep::DeleteSource => kube.delete_source(m, copy_secrets).await,
                },
                (Deploy::Kube { .. }, None) => Err(DeployError::Kube(
                    "this control plane has no Kubernetes clusters to deploy to".into(),
                )),
                _ => match &self.config.hook {
                    DeployHook::None => Err(DeployError::NotConfigured),
                    DeployHook::Command(command) => self.command(command, m, step).await,
                    DeployHook::Webhook(url) => self.webhook(url, m, step).await,
                },
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or(Err(DeployError::Timeout(timeout)))
    }

    async fn command(
        &self,
        command: &str,
        m: &Migration,
        step: DeployStep,
    ) -> Result<(), DeployError> {
        let output = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .envs(call(m, step))
            .stdin(std::process::Stdio::null())
            // A timed-out hook is killed with the future that waits on it.
            .kill_on_drop(true)
            .output()
            .await
            .map_err(DeployError::Spawn)?;
        if output.status.success() {
            return Ok(());
        }
        let mut text = output.stderr;
        if text.iter().all(u8::is_ascii_whitespace) {
            text = output.stdout;
        }
        Err(DeployError::Exit {
            status: output.status.to_string(),
            output: quoted(&text),
        })
    }

    async fn webhook(&self, url: &str, m: &Migration, step: DeployStep) -> Result<(), DeployError> {
        let fail = |reason: String| DeployError::Webhook {
            url: url.to_owned(),
            reason,
        };
        let body: serde_json::Map<String, serde_json::Value> = call(m, step)
            .into_iter()
            .map(|(k, v)| {
                let key = k.trim_start_matches("FERRY_").to_ascii_lowercase();
                (key, serde_json::Value::String(v))
            })
            .collect();
        let request = hyper::Request::post(url)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                serde_json::Value::Object(body).to_string(),
            )))
            .map_err(|e| fail(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(fail(format!("answered {status}: {}", quoted(&body))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_output_keeps_the_end_on_one_line() {
        let long = format!("{}\nerror: the end", "x".repeat(2000));
        let q = quoted(long.as_bytes());
        assert!(q.len() <= QUOTED_OUTPUT + 16, "{}", q.len());
        assert!(q.ends_with("error: the end"), "{q}");
        assert!(!q.contains('\n'));
    }
}
