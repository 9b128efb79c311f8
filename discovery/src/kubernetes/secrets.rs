//! Member clusters from Secrets (`kubernetes.cluster_secrets`).
//!
//! Each Secret labelled `ferry.io/cluster: NAME` in the watched namespace
//! names one member cluster and holds its kubeconfig under the data key
//! `kubeconfig` (`ferry cluster join` writes them). The set of clusters is
//! published only once the Secrets are listed, and a failing watch keeps the
//! last published set: an unreachable home API server never withdraws a
//! cluster; only a deleted (or relabelled) Secret does.
//!
//! A Secret's kubeconfig must carry its credentials inline: one that points
//! at files or runs commands (`exec`, `auth-provider`, `tokenFile`, file
//! paths) is refused, so whoever may write Secrets in Ferry's namespace
//! cannot make the control plane read its own files or run programs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::cluster::{WatchError, classify, kube_config};
use super::state::Mirror;
use super::{Access, ClusterConfig, ClusterHealth, ClusterSecrets, InlineKubeconfig};
use crate::names::ClusterName;

/// The label naming the member cluster a Secret connects to.
pub const CLUSTER_LABEL: &str = "ferry.io/cluster";
/// The Secret data key holding the kubeconfig.
pub const KUBECONFIG_KEY: &str = "kubeconfig";

/// What is wrong with one cluster Secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("label {CLUSTER_LABEL}: {0}")]
    Name(String),
    #[error("no `{KUBECONFIG_KEY}` key in its data")]
    Missing,
    #[error("`{KUBECONFIG_KEY}` is not UTF-8 text")]
    NotText,
    #[error("`{KUBECONFIG_KEY}` is not a kubeconfig: {0}")]
    Parse(String),
    #[error(
        "`{KUBECONFIG_KEY}` {0}; a cluster Secret must carry its server, CA and credentials inline"
    )]
    NotInline(String),
    #[error("cluster {cluster} is already named by Secret {by}")]
    Duplicate { cluster: String, by: String },
}

/// One cluster Secret, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretStatus {
    /// The Secret's name.
    pub secret: String,
    /// The cluster its label names.
    pub cluster: String,
    /// Why it is not used, if it is not.
    pub error: Option<String>,
}

/// The cluster Secrets watch, as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecretsStatus {
    pub namespace: Option<String>,
    pub health: ClusterHealth,
    pub last_sync: Option<SystemTime>,
    pub last_error: Option<String>,
    pub secrets: Vec<SecretStatus>,
}

/// Shared with the admin endpoint; `None` without `cluster_secrets`.
pub type SecretsStatusHandle = Arc<Mutex<Option<SecretsStatus>>>;

pub(super) fn lock(
    status: &SecretsStatusHandle,
) -> std::sync::MutexGuard<'_, Option<SecretsStatus>> {
    status.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads the cluster a Secret names and how to reach it.
pub fn parse_secret(secret: &Secret) -> Result<ClusterConfig, SecretError> {
    let label = secret
        .labels()
        .get(CLUSTER_LABEL)
        .cloned()
        .unwrap_or_default();
    let name = ClusterName::new(&label).map_err(|e| SecretError::Name(e.to_string()))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KUBECONFIG_KEY))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(KUBECONFIG_KEY))
                .map(|s| s.clone().into_bytes())
        })
        .ok_or(SecretError::Missing)?;
    let text = String::from_utf8(bytes).map_err(|_| SecretError::NotText)?;
    check_inline(&text)?;
    Ok(ClusterConfig {
        name,
        access: Access::Secret {
            secret: format!(
                "{}/{}",
                secret.namespace().unwrap_or_default(),
                secret.name_any()
            ),
            kubeconfig: InlineKubeconfig::new(text),
        },
    })
}

/// Refuses a kubeconfig that reads files or runs commands, or that does not
/// say which context to use.
fn check_inline(text: &str) -> Result<(), SecretError> {
    let config =
        kube::config::Kubeconfig::from_yaml(text).map_err(|e| SecretError::Parse(e.to_string()))?;
    let not_inline = |what: String| Err(SecretError::NotInline(what));
    let context = match (&config.current_context, config.contexts.as_slice()) {
        (Some(current), _) => current.clone(),
        (None, [only]) => only.name.clone(),
        (None, _) => return Err(SecretError::Parse("it names no current-context".into())),
    };
    if !config.contexts.iter().any(|c| c.name == context) {
        return Err(SecretError::Parse(format!(
            "its current-context {context:?} is not among its contexts"
        )));
    }
    for named in &config.clusters {
        let Some(cluster) = &named.cluster else {
            continue;
        };
        if cluster.certificate_authority.is_some() {
            return not_inline(format!(
                "cluster {:?} names a CA file (certificate-authority)",
                named.name
            ));
        }
        if cluster.insecure_skip_tls_verify == Some(true) {
            return not_inline(format!(
                "cluster {:?} turns off TLS verification (insecure-skip-tls-verify)",
                named.name
            ));
        }
    }
    for named in &config.auth_infos {
        let Some(user) = &named.auth_info else {
            continue;
        };
        let refused = [
            (user.exec.is_some(), "runs a command (exec)"),
            (user.auth_provider.is_some(), "uses an auth-provider"),
            (user.token_file.is_some(), "reads a token file (tokenFile)"),
            (
                user.client_certificate.is_some() || user.client_key.is_some(),
                "reads client certificate files (client-certificate, client-key)",
            ),
        ];
        if let Some((_, what)) = refused.iter().find(|(bad, _)| *bad) {
            return not_inline(format!("user {:?} {what}", named.name));
        }
    }
    Ok(())
}

/// The usable clusters of the listed Secrets, and every Secret's status.
/// When two Secrets name one cluster, the first by Secret name wins.
fn resolve(
    secrets: &BTreeMap<String, Result<ClusterConfig, SecretError>>,
    labels: &BTreeMap<String, String>,
) -> (BTreeMap<ClusterName, ClusterConfig>, Vec<SecretStatus>) {
    let mut clusters: BTreeMap<ClusterName, ClusterConfig> = BTreeMap::new();
    let mut owner: BTreeMap<ClusterName, String> = BTreeMap::new();
    let mut statuses = Vec::new();
    for (secret, parsed) in secrets {
        let cluster = labels.get(secret).cloned().unwrap_or_default();
        let outcome = match parsed {
            Err(e) => Err(e.clone()),
            Ok(cfg) => match owner.get(&cfg.name) {
                Some(by) => Err(SecretError::Duplicate {
                    cluster: cfg.name.to_string(),
                    by: by.clone(),
                }),
                None => {
                    owner.insert(cfg.name.clone(), secret.clone());
                    clusters.insert(cfg.name.clone(), cfg.clone());
                    Ok(())
                }
            },
        };
        statuses.push(SecretStatus {
            secret: secret.clone(),
            cluster,
            error: outcome.err().map(|e| e.to_string()),
        });
    }
    (clusters, statuses)
}

/// Notes on each Secret naming a cluster the catalog file also names that
/// the file's entry is used.
pub(super) fn mark_shadowed(status: &SecretsStatusHandle, shadowed: &[ClusterName]) {
    let mut guard = lock(status);
    let Some(status) = guard.as_mut() else {
        return;
    };
    for s in &mut status.secrets {
        if s.error.is_none() && shadowed.iter().any(|c| c.as_str() == s.cluster) {
            tracing::warn!(
                secret = %s.secret, cluster = %s.cluster,
                "the catalog file also names this cluster; its entry is used, not the Secret"
            );
            s.error = Some(format!(
                "cluster {} is configured in the catalog file, which takes precedence",
                s.cluster
            ));
        }
    }
}

/// Watches the cluster Secrets until `cancel`, publishing the clusters they
/// name to `out`, and rebuilding the watch with backoff after a failure.
pub(super) async fn run(
    source: ClusterSecrets,
    out: Arc<watch::Sender<BTreeMap<ClusterName, ClusterConfig>>>,
    status: SecretsStatusHandle,
    cancel: CancellationToken,
) {
    *lock(&status) = Some(SecretsStatus {
        namespace: source.namespace.clone(),
        health: ClusterHealth::Connecting,
        last_sync: None,
        last_error: None,
        secrets: Vec::new(),
    });
    let mut delay = Duration::from_millis(250);
    loop {
        let result = watch_secrets(&source, &out, &status, &cancel, &mut delay).await;
        if cancel.is_cancelled() {
            return;
        }
        let error = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        let (health, message) = error.health();
        tracing::warn!(
            health = ?health, error = %message, retry_in = ?delay,
            "cluster Secrets watch failed; keeping the clusters they named"
        );
        metrics::counter!("ferry_discovery_cluster_secret_watch_errors_total").increment(1);
        if let Some(s) = lock(&status).as_mut() {
            s.health = health;
            s.last_error = Some(message);
        }
        let jitter = Duration::from_millis(rand::random_range(0..=delay.as_millis() as u64 / 4));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay + jitter) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// One watch generation: list the Secrets, then follow them.
async fn watch_secrets(
    source: &ClusterSecrets,
    out: &watch::Sender<BTreeMap<ClusterName, ClusterConfig>>,
    status: &SecretsStatusHandle,
    cancel: &CancellationToken,
    delay: &mut Duration,
) -> Result<(), WatchError> {
    let config = kube_config(&source.access).await?;
    let namespace = source
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    if let Some(s) = lock(status).as_mut() {
        s.namespace = Some(namespace.clone());
    }
    let client = Client::try_from(config).map_err(|e| WatchError::Config(e.to_string()))?;
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let mut events =
        watcher::watcher(api, watcher::Config::default().labels(CLUSTER_LABEL)).boxed();
    let scope = Some(namespace.as_str());
    let mut secrets: Mirror<(String, Result<ClusterConfig, SecretError>)> = Mirror::default();
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            event = events.next() => event,
        };
        let event: Event<Secret> = event.ok_or(WatchError::Ended)?.map_err(classify)?;
        secrets.apply(0, scope, event, |s| {
            let label = s.labels().get(CLUSTER_LABEL).cloned().unwrap_or_default();
            (label, parse_secret(s))
        });
        if !secrets.listed.contains(&0) {
            continue;
        }
        *delay = Duration::from_millis(250);
        let by_name: BTreeMap<String, Result<ClusterConfig, SecretError>> = secrets
            .live
            .iter()
            .map(|((_, name), (_, parsed))| (name.clone(), parsed.clone()))
            .collect();
        let labels: BTreeMap<String, String> = secrets
            .live
            .iter()
            .map(|((_, name), (label, _))| (name.clone(), label.clone()))
            .collect();
        let (clusters, statuses) = resolve(&by_name, &labels);
        publish(out, clusters);
        let invalid = statuses.iter().filter(|s| s.error.is_some()).count();
        metrics::gauge!("ferry_discovery_cluster_secrets", "state" => "valid")
            .set((statuses.len() - invalid) as f64);
        metrics::gauge!("ferry_discovery_cluster_secrets", "state" => "invalid")
            .set(invalid as f64);
        let mut guard = lock(status);
        if let Some(s) = guard.as_mut() {
            for new in &statuses {
                let known = s.secrets.iter().any(|old| old == new);
                if !known && let Some(error) = &new.error {
                    tracing::warn!(
                        secret = %new.secret, cluster = %new.cluster, %error,
                        "cluster Secret not used"
                    );
                }
            }
            s.health = ClusterHealth::Connected;
            s.last_sync = Some(SystemTime::now());
            s.last_error = None;
            s.secrets = statuses;
        }
    }
}

/// Publishes the clusters, logging what changed.
fn publish(
    out: &watch::Sender<BTreeMap<ClusterName, ClusterConfig>>,
    clusters: BTreeMap<ClusterName, ClusterConfig>,
) {
    out.send_if_modified(|current| {
        if *current == clusters {
            return false;
        }
        let before: BTreeSet<&ClusterName> = current.keys().collect();
        let after: BTreeSet<&ClusterName> = clusters.keys().collect();
        for added in after.difference(&before) {
            tracing::info!(cluster = %added, "cluster Secret found; watching the cluster");
        }
        for removed in before.difference(&after) {
            tracing::info!(cluster = %removed, "cluster Secret deleted; withdrawing the cluster");
        }
        *current = clusters;
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    const KUBECONFIG: &str = "apiVersion: v1\nkind: Config\nclusters:\n- name: east\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority-data: Q0E=\nusers:\n- name: ferry\n  user:\n    token: abc\ncontexts:\n- name: east\n  context:\n    cluster: east\n    user: ferry\ncurrent-context: east\n";

    fn secret(name: &str, cluster: &str, kubeconfig: Option<&str>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ferry-system".into()),
                labels: Some(BTreeMap::from([(CLUSTER_LABEL.into(), cluster.into())])),
                ..Default::default()
            },
            data: kubeconfig.map(|k| {
                BTreeMap::from([(KUBECONFIG_KEY.into(), ByteString(k.as_bytes().to_vec()))])
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_secret_names_its_cluster_and_carries_its_kubeconfig() {
        let cfg =
            parse_secret(&secret("ferry-cluster-east", "east", Some(KUBECONFIG))).expect("valid");
        assert_eq!(cfg.name.as_str(), "east");
        match cfg.access {
            Access::Secret { secret, kubeconfig } => {
                assert_eq!(secret, "ferry-system/ferry-cluster-east");
                assert_eq!(kubeconfig.text(), KUBECONFIG);
                assert!(
                    !format!("{kubeconfig:?}").contains("abc"),
                    "Debug hides the token"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_secret_that_would_read_files_or_run_commands_is_refused() {
        let cases = [
            (
                KUBECONFIG.replace("    token: abc\n", "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh\n"),
                "runs a command (exec)",
            ),
            (
                KUBECONFIG.replace("token: abc", "tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token"),
                "reads a token file",
            ),
            (
                KUBECONFIG.replace("certificate-authority-data: Q0E=", "certificate-authority: /etc/ssl/ca.pem"),
                "names a CA file",
            ),
            (
                KUBECONFIG.replace("certificate-authority-data: Q0E=", "insecure-skip-tls-verify: true"),
                "turns off TLS verification",
            ),
        ];
        for (text, expected) in cases {
            let err = parse_secret(&secret("s", "east", Some(&text))).expect_err(expected);
            assert!(err.to_string().contains(expected), "{err} ∌ {expected}");
        }
    }

    #[test]
    fn a_bad_secret_says_what_is_wrong() {
        let err = |s: Secret| parse_secret(&s).expect_err("invalid").to_string();
        assert!(err(secret("s", "East_1", Some(KUBECONFIG))).starts_with("label ferry.io/cluster"));
        assert_eq!(
            err(secret("s", "east", None)),
            "no `kubeconfig` key in its data"
        );
        assert!(
            err(secret("s", "east", Some("clusters: 7")))
                .starts_with("`kubeconfig` is not a kubeconfig")
        );
        let no_context = KUBECONFIG.replace("current-context: east\n", "").replace(
            "contexts:\n- name: east\n  context:\n    cluster: east\n    user: ferry\n",
            "",
        );
        assert!(err(secret("s", "east", Some(&no_context))).contains("no current-context"));
    }

    #[test]
    fn two_secrets_for_one_cluster_the_first_by_name_wins() {
        let mut secrets = BTreeMap::new();
        let mut labels = BTreeMap::new();
        for name in ["b-east", "a-east"] {
            secrets.insert(
                name.to_owned(),
                parse_secret(&secret(name, "east", Some(KUBECONFIG))),
            );
            labels.insert(name.to_owned(), "east".to_owned());
        }
        secrets.insert(
            "c-west".to_owned(),
            parse_secret(&secret("c-west", "west", None)),
        );
        labels.insert("c-west".to_owned(), "west".to_owned());
        let (clusters, statuses) = resolve(&secrets, &labels);
        assert_eq!(
            clusters.keys().map(|c| c.as_str()).collect::<Vec<_>>(),
            ["east"]
        );
        match &clusters[&ClusterName::new("east").expect("name")].access {
            Access::Secret { secret, .. } => assert_eq!(secret, "ferry-system/a-east"),
            other => panic!("{other:?}"),
        }
        let errors: Vec<_> = statuses
            .iter()
            .map(|s| (s.secret.as_str(), s.error.clone()))
            .collect();
        assert_eq!(
            errors,
            [
                ("a-east", None),
                (
                    "b-east",
                    Some("cluster east is already named by Secret a-east".to_owned())
                ),
                ("c-west", Some("no `kubeconfig` key in its data".to_owned())),
            ]
        );
    }
}
