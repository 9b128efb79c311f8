//! `ferry cluster join` and `ferry cluster leave`: link a member cluster to
//! the control plane, as `istioctl create-remote-secret` or `linkerd
//! multicluster link` do, and unlink it.
//!
//! `join` uses the admin's kubeconfig for the member to create (idempotently,
//! by server-side apply as field manager `ferry`) the objects of
//! `deploy/member`: a read-only ServiceAccount, the `ferry-discovery`
//! ClusterRole and its binding, and a token Secret. It waits for the
//! cluster's token controller to fill the token in, checks that the token
//! can list what discovery watches, and makes a kubeconfig Secret labelled
//! `ferry.io/cluster: NAME` for the home cluster: printed, or applied with
//! `--apply`. `ferry control` with `kubernetes: {cluster_secrets: true}`
//! starts watching the member as soon as the Secret exists.
//!
//! Nothing is half-created: every object is read first (a member that
//! refuses the admin's credentials stops the join before anything is
//! written), and when a later step fails, the objects this join created are
//! deleted again.

mod member;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use self::member::{MemberObject, MemberYamlError, member_objects};
use ferry_discovery::kubernetes::{CLUSTER_LABEL, KUBECONFIG_KEY};
use ferry_discovery::names::ClusterName;

/// The field manager of everything Ferry applies.
const FIELD_MANAGER: &str = "ferry";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Set on a member Namespace that `join` created, so `leave` deletes only
/// a namespace that was not there before.
const CREATED_BY_JOIN: &str = "ferry.io/created-by-join";

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Link a member cluster: create its read-only ServiceAccount,
    /// ClusterRole, binding and token (idempotent), and print the
    /// kubeconfig Secret by which `ferry control` watches it (or apply it
    /// to the home cluster with --apply).
    Join(JoinArgs),
    /// Unlink a member cluster: delete its Secret from the home cluster (so
    /// Ferry withdraws it on purpose), then what `join` created in the
    /// member.
    Leave(LeaveArgs),
}

#[derive(Debug, clap::Args)]
pub struct MemberArgs {
    /// The member cluster's name in Ferry (a DNS label, e.g. `east-2`).
    pub name: String,
    /// The admin's kubeconfig for the member cluster.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The context in --kubeconfig (default: its current context).
    #[arg(long)]
    pub context: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct HomeArgs {
    /// The admin's kubeconfig for the home cluster (where `ferry control`
    /// runs).
    #[arg(long, value_name = "FILE")]
    pub home_kubeconfig: Option<PathBuf>,
    /// The context in --home-kubeconfig (default: its current context).
    #[arg(long)]
    pub home_context: Option<String>,
    /// The namespace `ferry control` runs in and reads cluster Secrets from.
    #[arg(long, default_value = "ferry-system")]
    pub namespace: String,
}

#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    #[command(flatten)]
    pub member: MemberArgs,
    #[command(flatten)]
    pub home: HomeArgs,
    /// Apply the Secret to the home cluster (needs --home-kubeconfig)
    /// instead of printing it.
    #[arg(long)]
    pub apply: bool,
    /// The member API server URL as the control plane reaches it (default:
    /// the one in --kubeconfig).
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Replace the member's token first: the old one stops working, and
    /// the new one reaches `ferry control` through the updated Secret.
    #[arg(long)]
    pub rotate: bool,
    /// How long to wait for the member's token controller.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub token_timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct LeaveArgs {
    #[command(flatten)]
    pub member: MemberArgs,
    #[command(flatten)]
    pub home: HomeArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Name(String),
    #[error(transparent)]
    MemberYaml(#[from] MemberYamlError),
    #[error("{what}: cannot load the kubeconfig: {message}")]
    Kubeconfig { what: &'static str, message: String },
    #[error(
        "the {what} cluster refused the admin's credentials ({code} {reason}): {message}; \
         nothing was created"
    )]
    Refused {
        what: &'static str,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("reading {object} in the {what} cluster failed: {source}; nothing was created")]
    Read {
        what: &'static str,
        object: String,
        source: kube::Error,
    },
    #[error("creating {object} in the member cluster failed: {source}; {undone}")]
    Create {
        object: String,
        source: kube::Error,
        undone: String,
    },
    #[error("the member's token controller did not fill in {secret} within {timeout:?}; {undone}")]
    TokenTimeout {
        secret: String,
        timeout: Duration,
        undone: String,
    },
    #[error(
        "the new token cannot {verb} {resource} in the member cluster: {source} \
         (check the ferry-discovery ClusterRole and its binding)"
    )]
    TokenCannotRead {
        verb: &'static str,
        resource: &'static str,
        source: kube::Error,
    },
    #[error("--apply needs --home-kubeconfig (the home cluster, where ferry control runs)")]
    NoHome,
    #[error("leave needs --kubeconfig (the member), --home-kubeconfig (home), or both")]
    NothingToLeave,
    #[error("{what} in the {cluster} cluster: {source}")]
    Api {
        what: String,
        cluster: &'static str,
        source: kube::Error,
    },
    #[error("encoding the Secret: {0}")]
    Encode(#[from] serde_yaml_ng::Error),
}

pub async fn run(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Join(args) => join(args).await?,
        ClusterCommand::Leave(args) => leave(args).await?,
    }
    Ok(())
}

/// A kube client and the URL of the API server it talks to.
struct Connected {
    client: Client,
    server: String,
    tls_server_name: Option<String>,
}

async fn connect(
    what: &'static str,
    path: &std::path::Path,
    context: Option<&str>,
) -> Result<Connected, ClusterError> {
    let fail = |message: String| ClusterError::Kubeconfig { what, message };
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let server = config.cluster_url.to_string();
    let tls_server_name = config.tls_server_name.clone();
    let client = Client::try_from(config).map_err(|e| fail(e.to_string()))?;
    Ok(Connected {
        client,
        server: server.trim_end_matches('/').to_owned(),
        tls_server_name,
    })
}

fn api(client: &Client, object: &MemberObject) -> Api<DynamicObject> {
    match (&object.object.metadata.namespace, object.namespaced) {
        (Some(ns), true) => Api::namespaced_with(client.clone(), ns, &object.resource),
        _ => Api::all_with(client.clone(), &object.resource),
    }
}

/// A refusal of the admin's credentials (401, or 403 on reading), as the
/// error to show.
fn refused(what: &'static str, error: &kube::Error) -> Option<ClusterError> {
    match error {
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => Some(ClusterError::Refused {
            what,
            code: s.code,
            reason: s.reason.clone(),
            message: s.message.clone(),
        }),
        _ => None,
    }
}

async fn join(args: JoinArgs) -> Result<(), ClusterError> {
    let name =
        ClusterName::new(&args.member.name).map_err(|e| ClusterError::Name(e.to_string()))?;
    if args.apply && args.home.home_kubeconfig.is_none() {
        return Err(ClusterError::NoHome);
    }
    let Some(path) = &args.member.kubeconfig else {
        return Err(ClusterError::Kubeconfig {
            what: "member",
            message: "give the admin's kubeconfig for the member with --kubeconfig".into(),
        });
    };
    let member = connect("member", path, args.member.context.as_deref()).await?;
    // The home cluster is checked before the member is touched.
    let home = match &args.home.home_kubeconfig {
        Some(path) if args.apply => {
            let home = connect("home", path, args.home.home_context.as_deref()).await?;
            let secrets: Api<Secret> = Api::namespaced(home.client.clone(), &args.home.namespace);
            if let Err(e) = secrets.list(&ListParams::default().limit(1)).await {
                return Err(refused("home", &e).unwrap_or(ClusterError::Read {
                    what: "home",
                    object: format!("Secrets in {}", args.home.namespace),
                    source: e,
                }));
            }
            Some(home)
        }
        _ => None,
    };
    let objects = member_objects()?;
    let existing = read_existing(&member.client, &objects).await?;
    let token_secret = objects
        .iter()
        .find(|o| o.is_token_secret())
        .cloned()
        .ok_or_else(|| MemberYamlError::UnknownKind("token Secret (none found)".into()))?;
    let token_existed = objects
        .iter()
        .zip(&existing)
        .any(|(o, existed)| o.is_token_secret() && *existed);
    if args.rotate && token_existed {
        eprintln!("rotating: deleting {}", token_secret.describe());
        api(&member.client, &token_secret)
            .delete(token_secret.name(), &DeleteParams::default())
            .await
            .map_err(|source| ClusterError::Api {
                what: format!("deleting {}", token_secret.describe()),
                cluster: "member",
                source,
            })?;
    }
    let mut created: Vec<&MemberObject> = Vec::new();
    for (object, existed) in objects.iter().zip(&existing) {
        let mut body = object.object.clone();
        body.labels_mut()
            .insert(MANAGED_BY.to_owned(), FIELD_MANAGER.to_owned());
        if object.resource.kind == "Namespace" && !existed {
            body.annotations_mut()
                .insert(CREATED_BY_JOIN.to_owned(), name.to_string());
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api(&member.client, object)
            .patch(object.name(), &params, &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                eprintln!(
                    "{} {}",
                    if *existed { "kept" } else { "created" },
                    object.describe()
                );
                if !existed {
                    created.push(object);
                }
            }
            Err(source) => {
                let undone = undo(&member.client, &created).await;
                return Err(ClusterError::Create {
                    object: object.describe(),
                    source,
                    undone,
                });
            }
        }
    }
    let (token, ca) = match wait_for_token(&member.client, &token_secret, args.token_timeout).await
    {
        Some(found) => found,
        None => {
            let undone = undo(&member.client, &created).await;
            return Err(ClusterError::TokenTimeout {
                secret: token_secret.describe(),
                timeout: args.token_timeout,
                undone,
            });
        }
    };
    let server = args.server.clone().unwrap_or(member.server.clone());
    let kubeconfig = member_kubeconfig(
        &name,
        &server,
        &ca,
        &token,
        member.tls_server_name.as_deref(),
    );
    check_token(&kubeconfig).await?;
    let secret = home_secret(&name, &args.home.namespace, &kubeconfig);
    match home {
        Some(home) => {
            let secrets: Api<Secret> = Api::namespaced(home.client, &args.home.namespace);
            let secret_name = secret.name_any();
            secrets
                .patch(
                    &secret_name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&secret),
                )
                .await
                .map_err(|source| ClusterError::Api {
                    what: format!("applying Secret {}/{secret_name}", args.home.namespace),
                    cluster: "home",
                    source,
                })?;
            eprintln!(
                "applied Secret {}/{secret_name} to the home cluster: ferry control \
                 (kubernetes.cluster_secrets) watches {name} at {server}",
                args.home.namespace
            );
        }
        None => {
            print!("{}", serde_yaml_ng::to_string(&secret)?);
            eprintln!(
                "member {name} is ready: apply the Secret above to the home cluster \
                 (kubectl apply -f -), where ferry control reads cluster Secrets"
            );
        }
    }
    Ok(())
}

/// Whether each object exists. A refusal here stops the join before
/// anything is written.
async fn read_existing(
    client: &Client,
    objects: &[MemberObject],
) -> Result<Vec<bool>, ClusterError> {
    let mut existing = Vec::with_capacity(objects.len());
    for object in objects {
        match api(client, object).get_opt(object.name()).await {
            Ok(found) => existing.push(found.is_some()),
            Err(e) => {
                return Err(refused("member", &e).unwrap_or(ClusterError::Read {
                    what: "member",
                    object: object.describe(),
                    source: e,
                }));
            }
        }
    }
    Ok(existing)
}

/// Deletes what this join created, newest first; says what it did.
async fn undo(client: &Client, created: &[&MemberObject]) -> String {
    if created.is_empty() {
        return "nothing had been created".to_owned();
    }
    let mut removed = Vec::new();
    let mut left = Vec::new();
    for object in created.iter().rev() {
        match api(client, object)
            .delete(object.name(), &DeleteParams::default())
            .await
        {
            Ok(_) => removed.push(object.describe()),
            Err(kube::Error::Api(s)) if s.code == 404 => removed.push(object.describe()),
            Err(e) => left.push(format!("{} ({e})", object.describe())),
        }
    }
    let mut said = format!("removed what this join had created: {}", removed.join(", "));
    if !left.is_empty() {
        said.push_str(&format!("; could not remove: {}", left.join(", ")));
    }
    said
}

/// Polls the token Secret until the token controller has filled in its
/// token and CA.
async fn wait_for_token(
    client: &Client,
    secret: &MemberObject,
    timeout: Duration,
) -> Option<(String, String)> {
    let api: Api<Secret> = Api::namespaced(
        client.clone(),
        secret
            .object
            .metadata
            .namespace
            .as_deref()
            .unwrap_or("default"),
    );
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(found)) = api.get_opt(secret.name()).await {
            let field = |key: &str| {
                found
                    .data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
                    .filter(|s| !s.is_empty())
            };
            if let (Some(token), Some(ca)) = (field("token"), field("ca.crt")) {
                return Some((token, ca));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A kubeconfig that reaches the member as its read-only ServiceAccount,
/// with everything inline.
fn member_kubeconfig(
    name: &ClusterName,
    server: &str,
    ca_pem: &str,
    token: &str,
    tls_server_name: Option<&str>,
) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let mut cluster = serde_json::json!({
        "server": server,
        "certificate-authority-data": b64,
    });
    if let Some(sni) = tls_server_name {
        cluster["tls-server-name"] = sni.into();
    }
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name.as_str(), "cluster": cluster}],
        "users": [{"name": "ferry-reader", "user": {"token": token}}],
        "contexts": [{"name": name.as_str(), "context": {"cluster": name.as_str(), "user": "ferry-reader"}}],
        "current-context": name.as_str(),
    });
    serde_yaml_ng::to_string(&config).unwrap_or_default()
}

/// Proves the new kubeconfig can read what discovery watches.
async fn check_token(kubeconfig: &str) -> Result<(), ClusterError> {
    let fail = |message: String| ClusterError::Kubeconfig {
        what: "the new member",
        message,
    };
    let parsed =
        kube::config::Kubeconfig::from_yaml(kubeconfig).map_err(|e| fail(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(parsed, &Default::default())
        .await
        .map_err(|e| fail(e.to_string()))?;
    let client = Client::try_from(config).map_err(|e| fail(e.to_string()))?;
    let one = ListParams::default().limit(1);
    Api::<KubeService>::all(client.clone())
        .list_metadata(&one)
        .await
        .map_err(|source| ClusterError::TokenCannotRead {
            verb: "list",
            resource: "services",
            source,
        })?;
    Api::<EndpointSlice>::all(client)
        .list_metadata(&one)
        .await
        .map_err(|source| ClusterError::TokenCannotRead {
            verb: "list",
            resource: "endpointslices",
            source,
        })?;
    Ok(())
}

/// The home cluster's Secret for member `name`.
fn home_secret(name: &ClusterName, namespace: &str, kubeconfig: &str) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("ferry-cluster-{name}")),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (CLUSTER_LABEL.to_owned(), name.to_string()),
                (MANAGED_BY.to_owned(), FIELD_MANAGER.to_owned()),
            ])),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            KUBECONFIG_KEY.to_owned(),
            k8s_openapi::ByteString(kubeconfig.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

async fn leave(args: LeaveArgs) -> Result<(), ClusterError> {
    let name =
        ClusterName::new(&args.member.name).map_err(|e| ClusterError::Name(e.to_string()))?;
    if args.member.kubeconfig.is_none() && args.home.home_kubeconfig.is_none() {
        return Err(ClusterError::NothingToLeave);
    }
    // Home first: Ferry withdraws the member on purpose, rather than
    // serving its last endpoints once the token stops working.
    if let Some(path) = &args.home.home_kubeconfig {
        let home = connect("home", path, args.home.home_context.as_deref()).await?;
        let secrets: Api<Secret> = Api::namespaced(home.client, &args.home.namespace);
        let selector = format!("{CLUSTER_LABEL}={name}");
        let found = secrets
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| {
                refused("home", &e).unwrap_or(ClusterError::Api {
                    what: format!("listing Secrets {selector}"),
                    cluster: "home",
                    source: e,
                })
            })?;
        if found.items.is_empty() {
            eprintln!(
                "no Secret labelled {selector} in {} on the home cluster",
                args.home.namespace
            );
        }
        for secret in found.items {
            let secret_name = secret.name_any();
            delete_ok_if_gone(&secrets, &secret_name, "home").await?;
            eprintln!(
                "deleted Secret {}/{secret_name} from the home cluster: Ferry withdraws {name}",
                args.home.namespace
            );
        }
    }
    if let Some(path) = &args.member.kubeconfig {
        let member = connect("member", path, args.member.context.as_deref()).await?;
        let objects = member_objects()?;
        for object in objects.iter().rev() {
            let api = api(&member.client, object);
            let current = api.get_opt(object.name()).await.map_err(|e| {
                refused("member", &e).unwrap_or(ClusterError::Api {
                    what: format!("reading {}", object.describe()),
                    cluster: "member",
                    source: e,
                })
            })?;
            let Some(current) = current else {
                continue;
            };
            // A namespace that was there before the join stays.
            if object.resource.kind == "Namespace"
                && !current.annotations().contains_key(CREATED_BY_JOIN)
            {
                eprintln!("kept {} (it existed before the join)", object.describe());
                continue;
            }
            delete_ok_if_gone(&api, object.name(), "member").await?;
            eprintln!("deleted {}", object.describe());
        }
    }
    Ok(())
}

async fn delete_ok_if_gone<K>(
    api: &Api<K>,
    name: &str,
    cluster: &'static str,
) -> Result<(), ClusterError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ClusterError::Api {
            what: format!("deleting {name}"),
            cluster,
            source,
        }),
    }
}
