//! `ferry-testkube`: an in-process Kubernetes API server for code that uses
//! the real kube-rs client, `kube::runtime::watcher` and reflectors against
//! one or more simulated clusters: the tests' clusters, and the `old` and
//! `new` clusters of `ferry demo`.
//!
//! It speaks the real HTTP protocol over HTTPS: client-certificate auth
//! (certificates signed by the server's CA, the user being the subject CN;
//! [`TestKube::client_cert`]) or bearer-token auth (401 `Status` otherwise;
//! a client certificate from another CA fails the TLS handshake).
//!
//! ## Kinds
//!
//! core/v1 Services, Namespaces, ServiceAccounts, Secrets and ConfigMaps,
//! discovery.k8s.io/v1 EndpointSlices, multicluster.x-k8s.io/v1alpha1
//! ServiceExports (the CRD can be removed per server, its paths then answer
//! 404 and API discovery drops its group), rbac.authorization.k8s.io/v1
//! ClusterRoles, ClusterRoleBindings, Roles and RoleBindings, apps/v1
//! Deployments and StatefulSets, autoscaling/v2 HorizontalPodAutoscalers and
//! policy/v1 PodDisruptionBudgets ([`ResourceKind`]). Namespaces,
//! ClusterRoles and ClusterRoleBindings are cluster-scoped: no
//! `metadata.namespace`, namespace `""` in the Rust API. API discovery
//! (`/api`, `/api/v1`, `/apis`, each group and group version) lists every
//! served kind with its scope and verbs, and the `scale` subresources;
//! `/version` answers a version object.
//!
//! ## Reads
//!
//! `GET` of one object; lists and watches of every kind, cluster-wide and,
//! for namespaced kinds, per namespace, with `labelSelector` (`k=v`, `k!=v`,
//! `k`, `!k`), `fieldSelector` on `metadata.name` / `metadata.namespace`
//! (other terms ignored), paging with `limit` and opaque `continue` tokens
//! (HTTP 410 `Expired` when stale or invalid), and watches (`watch=true`)
//! that replay from a bounded history, then stream live
//! ADDED/MODIFIED/DELETED events, BOOKMARKs and, for a too-old
//! resourceVersion, an **in-stream** `ERROR` event carrying a 410 `Status`.
//! Streaming lists (`sendInitialEvents=true`) end their initial events with a
//! bookmark annotated `k8s.io/initial-events-end`.
//!
//! ## Writes
//!
//! `POST` (create; 409 `AlreadyExists`; `generateName` honoured), `PUT`
//! (replace; 404 when absent, 409 `Conflict` for a stale
//! `metadata.resourceVersion`), `PATCH` as server-side apply
//! (`application/apply-patch+yaml`, YAML or JSON; `fieldManager` required,
//! else 400; creates when absent; a simplified merge: labels and
//! annotations key by key, every other top-level field given replaces the
//! stored one, no field ownership or conflicts; a `metadata.resourceVersion`
//! in the patch is a precondition, 409 when stale) or as an RFC 7386 JSON merge
//! patch (`application/merge-patch+json`; other patch types get 415), and
//! `DELETE` (200 with the deleted object). Bodies whose kind, apiVersion,
//! name or namespace disagree with the path get 400, a missing name 422
//! `Invalid`; `dryRun` is refused (400). Every change bumps the
//! resourceVersion and is a watch event; a write that changes nothing is a
//! no-op. The server defaults a Namespace's `kubernetes.io/metadata.name`
//! label, finalizer and `Active` phase, a Secret's `type` (`Opaque`), and
//! folds `stringData` into `data`, and a Deployment's or StatefulSet's
//! `spec.replicas` (1).
//!
//! As a real server, it keeps the metadata a copy to another cluster must
//! not carry: `uid`, `resourceVersion`, `creationTimestamp`, `generation`
//! (Deployments, StatefulSets, HorizontalPodAutoscalers,
//! PodDisruptionBudgets and ServiceExports: 1 at creation, one more for
//! each change outside `metadata` and `status`) and `managedFields` (one
//! entry per field manager, operation and subresource: `manager`,
//! `operation` `Apply` or `Update`, `apiVersion`, `time`, `fieldsType:
//! FieldsV1` and a simplified `fieldsV1` of what that write sent; the
//! manager is the `fieldManager` parameter, else the start of the
//! User-Agent, else `unknown`; the server's controllers write as
//! `kube-controller-manager`, [`TestKube::apply`] as `testkube`). What a
//! client sends of these is ignored. A Service without `spec.clusterIP`
//! gets one, kept across later writes that leave it out: a free address of
//! 10.96.0.0/12 from a cursor that starts at random, so two servers hand
//! out different addresses (headless and `ExternalName` Services get none),
//! with `clusterIPs`, `ipFamilies`, `ipFamilyPolicy`, `sessionAffinity` and
//! `internalTrafficPolicy` defaulted.
//!
//! ## Workloads
//!
//! A simulated workload controller keeps the `status` of Deployments and
//! StatefulSets as a real cluster's would look once its pods run: after
//! every write of one (a create, an update, a scale, or a change of the
//! test's limit) it sets `observedGeneration` and `replicas`,
//! `updatedReplicas`, `readyReplicas` and `availableReplicas` (and a
//! StatefulSet's `currentReplicas`, a Deployment's `unavailableReplicas`)
//! from `spec.replicas`, in a write of its own right after the client's (a
//! MODIFIED event). As the real controllers do, a Deployment's status
//! leaves out zero counts; a StatefulSet's always has `replicas` and
//! `availableReplicas`. Clients cannot write a workload's status.
//! [`TestKube::set_available_limit`] caps the ready and available replicas
//! of a workload (pods that do not come up) until lifted.
//!
//! The `scale` subresource of both (`.../deployments/NAME/scale`): `GET`
//! answers an `autoscaling/v1` `Scale` (`spec.replicas`, left out at 0 as
//! the API server does; `status.replicas`; `status.selector` as a string);
//! `PUT` of a `Scale`, a JSON merge patch or a server-side apply of one sets
//! `spec.replicas` (a new generation; the controller follows; a negative
//! count is 422, a stale `resourceVersion` 409), so kube-rs's
//! `Api::get_scale`, `replace_scale` and `patch_scale` work. RBAC names it
//! `deployments/scale` (`statefulsets/scale`) in the workload's group, with
//! verbs `get`, `update` and `patch`.
//!
//! Deleting a Namespace deletes every namespaced object in it at once (each
//! a DELETED event; a real server does it later, through the namespace
//! finalizer, while the Namespace is `Terminating`).
//!
//! ## Service-account tokens and RBAC
//!
//! A token controller, as the real one: a Secret of type
//! `kubernetes.io/service-account-token` annotated
//! `kubernetes.io/service-account.name: SA` whose ServiceAccount exists in
//! its namespace gets `data.token` (a fresh random token), `data.ca.crt`
//! (the server's CA) and `data.namespace`, in a write right after the one
//! that created it (or that created the ServiceAccount). The token
//! authenticates as `system:serviceaccount:NS:SA` for as long as that
//! Secret exists ([`TestKube::token_for`]); deleting the Secret, the
//! ServiceAccount (which deletes its token Secrets) or the Namespace revokes
//! it (401), and re-creating the Secret mints a different token. Applying
//! the Secret again keeps its token.
//!
//! Requests with a minted token are authorized by RBAC as on the real
//! server: a request in namespace NS is allowed when a ClusterRoleBinding
//! grants it (through its ClusterRole) or a RoleBinding in NS does (through
//! a Role in NS or a ClusterRole, whose rules then apply in NS only); a
//! rule grants a subresource only by naming it (`deployments/scale`,
//! `*/scale` or `*`);
//! requests at the cluster scope (lists across all namespaces, cluster-scoped
//! kinds) only by ClusterRoleBindings. Otherwise 403 `Forbidden` with the
//! real server's message (`... in the namespace "NS"` or `... at the
//! cluster scope`). The server's own token (user `admin`) and
//! client certificates are unrestricted. Discovery, `/version` and health
//! checks are open to every authenticated user. [`TestKube::deny`] refuses a
//! verb on a kind to everyone until [`TestKube::allow`]. What each user did
//! is recorded as RBAC names it ([`TestKube::access`],
//! [`TestKube::access_by`], [`TestKube::users_seen`]).
//!
//! Tests drive the cluster through [`TestKube`]: mutate objects, force history
//! expiry, drop watch connections, stop and restart the server, and read
//! request counters. One `TestKube` is one fake cluster.
//!
//! ```no_run
//! # async fn demo() {
//! use ferry_testkube::{Credentials, TestKube};
//! let cluster = TestKube::start("secret-token").await;
//! cluster.apply_service("default", "web", &[("app", "web")], &[("http", 80)]);
//! cluster.apply_endpoint_slice(
//!     "default", "web-abc", "web",
//!     &[("10.0.0.1", true, true, false, Some("zone-a"))],
//!     &[("http", 8080)],
//! );
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("kubeconfig");
//! cluster.kubeconfig(&path, "east", None).unwrap();
//! let client = cluster.client().await; // or load `path` with kube::config
//! # let _ = client;
//!
//! // MCS: export a Service by a ServiceExport instead of a label.
//! cluster.apply_service_export("default", "web");
//! // A kubeconfig authenticating with a client certificate.
//! let cert = cluster.client_cert("ferry");
//! cluster
//!     .kubeconfig_with(&path, "east", Credentials::ClientCert(&cert))
//!     .unwrap();
//!
//! // A service account and its token Secret: the token controller fills it.
//! use ferry_testkube::ResourceKind;
//! use serde_json::json;
//! cluster
//!     .apply(
//!         ResourceKind::ServiceAccount,
//!         json!({"metadata": {"name": "reader", "namespace": "ferry-system"}}),
//!     )
//!     .unwrap();
//! cluster
//!     .apply(
//!         ResourceKind::Secret,
//!         json!({
//!             "metadata": {
//!                 "name": "reader-token",
//!                 "namespace": "ferry-system",
//!                 "annotations": {"kubernetes.io/service-account.name": "reader"},
//!             },
//!             "type": "kubernetes.io/service-account-token",
//!         }),
//!     )
//!     .unwrap();
//! let token = cluster.token_for("ferry-system", "reader").unwrap();
//! // Authenticated as system:serviceaccount:ferry-system:reader; 403 until
//! // a ClusterRoleBinding (or, in one namespace, a RoleBinding) grants it
//! // something.
//! let as_reader = cluster.client_with_token(&token).await;
//! # let _ = as_reader;
//!
//! // A Deployment whose pods never all come up: the controller reports 3
//! // replicas, 1 of them available, until the limit is lifted.
//! cluster.set_available_limit("default", "web", Some(1));
//! cluster.apply_deployment("default", "web", &[("app", "web")], 3);
//! cluster.set_available_limit("default", "web", None);
//! # }
//! ```
//!
//! ## rustls crypto provider
//!
//! The server always uses rustls' **ring** provider explicitly. The kube
//! client builds its TLS config from the process-wide default provider, which
//! rustls can only pick by itself when exactly one of `ring` / `aws-lc-rs` is
//! compiled in. [`TestKube::start`] therefore calls
//! [`install_crypto_provider`] (installs ring as the process default unless
//! one is already installed); call it yourself before building a kube client
//! when you build one without starting a `TestKube` first.

mod http;
mod kind;
mod rbac;
mod store;
mod tls;
mod writes;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::Shared;
pub use crate::kind::ResourceKind;
pub use crate::store::InvalidObject;
use crate::store::Store;

/// One endpoint of an EndpointSlice: `(ip, ready, serving, terminating, zone)`.
pub type EndpointSpec<'a> = (&'a str, bool, bool, bool, Option<&'a str>);

/// A client certificate and its private key (PEM), for kubeconfigs'
/// `client-certificate-data` / `client-key-data`. `Debug` never shows the
/// key.
#[derive(Clone)]
pub struct ClientCert {
    user: String,
    cert_pem: String,
    key_pem: String,
}

impl ClientCert {
    /// A certificate for `user` signed by a throwaway CA that no
    /// [`TestKube`] trusts: presenting it fails the TLS handshake. Panics if
    /// the certificate cannot be generated.
    pub fn foreign(user: &str) -> ClientCert {
        let pem = tls::foreign_client_cert(user)
            .expect("ferry-testkube: failed to generate a client certificate");
        ClientCert {
            user: user.to_owned(),
            cert_pem: pem.cert,
            key_pem: pem.key,
        }
    }

    /// The user the certificate names (its subject CN).
    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// How a kubeconfig's user authenticates.
#[derive(Clone, Copy, Debug)]
pub enum Credentials<'a> {
    /// `token:` (a bearer token).
    Token(&'a str),
    /// `client-certificate-data:` and `client-key-data:`.
    ClientCert(&'a ClientCert),
}

/// Installs rustls' ring `CryptoProvider` as the process default, unless a
/// default is already installed (then that one stays). Safe to call any
/// number of times.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Tunables for a [`TestKube`].
#[derive(Clone, Debug)]
pub struct Options {
    /// How many changes the watch history keeps; watches from an older
    /// resourceVersion get the in-stream 410. Default 10,000.
    pub history_limit: usize,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
    /// Default 1 s.
    pub bookmark_interval: Duration,
    /// Watch length when the request has no `timeoutSeconds`. Default 30 min.
    pub default_watch_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(1),
            default_watch_timeout: Duration::from_secs(1800),
        }
    }
}

struct Running {
    shutdown: CancellationToken,
    tracker: TaskTracker,
    accept: JoinHandle<()>,
}

/// One fake cluster: an HTTPS Kubernetes API server on `127.0.0.1` plus the
/// Rust-side controls tests use to change what it serves.
///
/// Dropping it shuts the server down (without waiting).
pub struct TestKube {
    shared: Arc<Shared>,
    ca_pem: String,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for TestKube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKube")
            .field("addr", &self.shared.addr)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl TestKube {
    /// Starts a server on `127.0.0.1` (a free port) that accepts `token` as
    /// its bearer token, with default [`Options`]. Panics if it cannot start.
    pub async fn start(token: impl Into<String>) -> TestKube {
        Self::start_with(token, Options::default()).await
    }

    /// [`TestKube::start`] with explicit [`Options`]. Panics if it cannot start.
    pub async fn start_with(token: impl Into<String>, opts: Options) -> TestKube {
        Self::try_start_with(token, opts)
            .await
            .expect("ferry-testkube: failed to start the test API server")
    }

    /// Fallible form of [`TestKube::start_with`].
    pub async fn try_start_with(token: impl Into<String>, opts: Options) -> io::Result<TestKube> {
        install_crypto_provider();
        let material = tls::generate().map_err(io::Error::other)?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (bus, _) = broadcast::channel(65_536);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(opts.history_limit, bus, material.ca_pem.clone())),
            token: token.into(),
            acceptor: tokio_rustls::TlsAcceptor::from(material.server_config),
            addr,
            opts,
            access: Mutex::new(BTreeMap::new()),
            denied: Mutex::new(BTreeSet::new()),
            list_requests: AtomicU64::new(0),
            watch_requests: AtomicU64::new(0),
            open_watches: AtomicU64::new(0),
            watch_kill: Mutex::new(CancellationToken::new()),
            cert_requests: Mutex::new(BTreeMap::new()),
        });
        let kube = TestKube {
            shared,
            ca_pem: material.ca_pem,
            ca: material.ca,
            running: Mutex::new(None),
        };
        kube.serve(listener);
        Ok(kube)
    }

    fn serve(&self, listener: TcpListener) {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let accept = tokio::spawn(http::accept_loop(
            self.shared.clone(),
            listener,
            shutdown.clone(),
            tracker.clone(),
        ));
        *self.running_lock() = Some(Running {
            shutdown,
            tracker,
            accept,
        });
    }

    fn running_lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server's address (`127.0.0.1:PORT`); stays the same across
    /// [`TestKube::restart`].
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.shared.addr)
    }

    /// The PEM of the CA that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The bearer token the server accepts.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// Whether the server is accepting connections (not [`TestKube::stop`]ped).
    pub fn is_running(&self) -> bool {
        self.running_lock().is_some()
    }

    /// A client certificate for `user` signed by this server's CA: requests
    /// presenting it are authenticated as `user` (the subject CN). Panics if
    /// the certificate cannot be generated.
    pub fn client_cert(&self, user: &str) -> ClientCert {
        let pem = tls::client_cert(&self.ca, user)
            .expect("ferry-testkube: failed to generate a client certificate");
        ClientCert {
            user: user.to_owned(),
            cert_pem: pem.cert,
            key_pem: pem.key,
        }
    }

    /// A kubeconfig YAML for this server: one cluster `cluster_name` (server
    /// URL and `certificate-authority-data`), one user with the server's token
    /// (or `token_override`), one context, set as current-context.
    pub fn kubeconfig_yaml(&self, cluster_name: &str, token_override: Option<&str>) -> String {
        let token = token_override.unwrap_or(&self.shared.token);
        self.kubeconfig_yaml_with(cluster_name, Credentials::Token(token))
    }

    /// [`TestKube::kubeconfig_yaml`] with the user's `credentials`: a token,
    /// or a client certificate and key (`client-certificate-data`,
    /// `client-key-data`).
    pub fn kubeconfig_yaml_with(&self, cluster_name: &str, credentials: Credentials<'_>) -> String {
        let q = |s: &str| Value::String(s.to_string()).to_string();
        let b64 = |s: &str| q(&base64::engine::general_purpose::STANDARD.encode(s.as_bytes()));
        let user_fields = match credentials {
            Credentials::Token(token) => format!("    token: {}\n", q(token)),
            Credentials::ClientCert(cert) => format!(
                "    client-certificate-data: {}\n    client-key-data: {}\n",
                b64(&cert.cert_pem),
                b64(&cert.key_pem),
            ),
        };
        let user = format!("{cluster_name}-user");
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: {name}\n  \
               cluster:\n    \
                 server: {server}\n    \
                 certificate-authority-data: {ca}\n\
             users:\n\
             - name: {user}\n  \
               user:\n\
             {user_fields}\
             contexts:\n\
             - name: {name}\n  \
               context:\n    \
                 cluster: {name}\n    \
                 user: {user}\n\
             current-context: {name}\n\
             preferences: {{}}\n",
            name = q(cluster_name),
            server = q(&self.url()),
            ca = b64(&self.ca_pem),
            user = q(&user),
        )
    }

    /// Writes [`TestKube::kubeconfig_yaml`] to `path`; load it with
    /// `kube::config::Kubeconfig::read_from(path)` and
    /// `kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())`.
    pub fn kubeconfig(
        &self,
        path: impl AsRef<Path>,
        cluster_name: &str,
        token_override: Option<&str>,
    ) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml(cluster_name, token_override))
    }

    /// Writes [`TestKube::kubeconfig_yaml_with`] to `path`.
    pub fn kubeconfig_with(
        &self,
        path: impl AsRef<Path>,
        cluster_name: &str,
        credentials: Credentials<'_>,
    ) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml_with(cluster_name, credentials))
    }

    /// A kube client for this server (built from the kubeconfig, so it goes
    /// through the same TLS and auth path). Panics on failure.
    pub async fn client(&self) -> kube::Client {
        self.client_with_token(&self.shared.token.clone()).await
    }

    /// A kube client that presents `token` instead of the server's token.
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        self.client_with(Credentials::Token(token)).await
    }

    /// A kube client authenticating with `credentials`. Panics on failure.
    pub async fn client_with(&self, credentials: Credentials<'_>) -> kube::Client {
        install_crypto_provider();
        let kc = kube::config::Kubeconfig::from_yaml(
            &self.kubeconfig_yaml_with("testkube", credentials),
        )
        .expect("ferry-testkube: kubeconfig must parse");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("ferry-testkube: kubeconfig must load");
        kube::Client::try_from(config).expect("ferry-testkube: kube client must build")
    }

    // ---- objects -------------------------------------------------------

    /// Creates or replaces any served object (`metadata.name` required,
    /// `metadata.namespace` defaults to `default` for namespaced kinds and
    /// is dropped for cluster-scoped ones). uid, creationTimestamp,
    /// resourceVersion, generation and managedFields (manager `testkube`)
    /// are set by the server; applying an unchanged object is a no-op. The
    /// token and workload controllers run as for a write over HTTP.
    /// Returns the object's resourceVersion (after the controller's write,
    /// if any).
    pub fn apply(&self, kind: ResourceKind, object: Value) -> Result<u64, InvalidObject> {
        self.shared.store().apply(kind, object)
    }

    /// Deletes an object (namespace `""` for cluster-scoped kinds); returns
    /// whether it existed. Deleting a Namespace deletes what is in it, a
    /// ServiceAccount its token Secrets, as a `DELETE` request does.
    pub fn delete(&self, kind: ResourceKind, namespace: &str, name: &str) -> bool {
        self.shared.store().delete(kind, namespace, name)
    }

    /// The stored object (with kind, apiVersion and server metadata);
    /// namespace `""` for cluster-scoped kinds.
    pub fn get(&self, kind: ResourceKind, namespace: &str, name: &str) -> Option<Value> {
        self.shared.store().get(kind, namespace, name)
    }

    /// How many objects of `kind` exist.
    pub fn count(&self, kind: ResourceKind) -> usize {
        self.shared.store().count(kind)
    }

    /// The global resourceVersion counter.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Creates or replaces a ClusterIP Service with these labels and TCP
    /// ports `(name, port)` (an empty name leaves the port unnamed; the
    /// targetPort equals the port). Returns its resourceVersion.
    pub fn apply_service(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[(&str, i32)],
    ) -> u64 {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(pname, port)| {
                let mut p = json!({"port": port, "protocol": "TCP", "targetPort": port});
                if !pname.is_empty() {
                    p["name"] = (*pname).into();
                }
                p
            })
            .collect();
        let ip = cluster_ip(namespace, name);
        let object = json!({
            "metadata": {"name": name, "namespace": namespace, "labels": label_map(labels)},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": ip,
                "clusterIPs": [ip],
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "ports": ports,
                "sessionAffinity": "None",
                "internalTrafficPolicy": "Cluster",
            },
            "status": {"loadBalancer": {}},
        });
        self.apply(ResourceKind::Service, object)
            .expect("a generated Service is valid")
    }

    /// Creates or replaces a Deployment with `replicas` replicas whose
    /// selector (`matchLabels`) and pod template labels are `labels`, one
    /// container `app` (image `registry.example/NAME:1`). The workload
    /// controller then reports its status. Returns its resourceVersion
    /// (after the controller's write).
    pub fn apply_deployment(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        replicas: i32,
    ) -> u64 {
        let labels = label_map(labels);
        let object = json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [
                        {"name": "app", "image": format!("registry.example/{name}:1")}
                    ]},
                },
            },
        });
        self.apply(ResourceKind::Deployment, object)
            .expect("a generated Deployment is valid")
    }

    /// Caps the ready and available replicas the workload controller
    /// reports for the Deployment and the StatefulSet `namespace/name` at
    /// `limit` (pods that do not come up), or with `None` lifts the cap.
    /// The cap holds for objects created later too, so a test can hold a
    /// rollout back before it starts. The controller runs at once: a
    /// changed status is a MODIFIED event.
    pub fn set_available_limit(&self, namespace: &str, name: &str, limit: Option<i32>) {
        self.shared
            .store()
            .set_available_limit(namespace, name, limit);
    }

    /// Deletes a Service; returns whether it existed.
    pub fn delete_service(&self, namespace: &str, name: &str) -> bool {
        self.delete(ResourceKind::Service, namespace, name)
    }

    /// Creates or replaces an EndpointSlice for `service_name` (label
    /// `kubernetes.io/service-name`), with `endpoints` as
    /// `(ip, ready, serving, terminating, zone)` and TCP `ports` as
    /// `(name, port)`. The addressType is IPv6 when the first IP contains a
    /// colon, IPv4 otherwise. Returns its resourceVersion.
    pub fn apply_endpoint_slice(
        &self,
        namespace: &str,
        name: &str,
        service_name: &str,
        endpoints: &[EndpointSpec<'_>],
        ports: &[(&str, i32)],
    ) -> u64 {
        let address_type = match endpoints.first() {
            Some((ip, ..)) if ip.contains(':') => "IPv6",
            _ => "IPv4",
        };
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(ip, ready, serving, terminating, zone)| {
                let mut e = json!({
                    "addresses": [ip],
                    "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                });
                if let Some(z) = zone {
                    e["zone"] = (*z).into();
                }
                e
            })
            .collect();
        let ports: Vec<Value> = ports
            .iter()
            .map(|(pname, port)| json!({"name": pname, "port": port, "protocol": "TCP"}))
            .collect();
        let object = json!({
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {
                    "kubernetes.io/service-name": service_name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": address_type,
            "endpoints": endpoints,
            "ports": ports,
        });
        self.apply(ResourceKind::EndpointSlice, object)
            .expect("a generated EndpointSlice is valid")
    }

    /// Deletes an EndpointSlice; returns whether it existed.
    pub fn delete_endpoint_slice(&self, namespace: &str, name: &str) -> bool {
        self.delete(ResourceKind::EndpointSlice, namespace, name)
    }

    /// Creates (or keeps) the MCS ServiceExport `namespace/name`, exporting
    /// the Service of the same name. Returns its resourceVersion. Panics if
    /// the ServiceExport CRD is not installed.
    pub fn apply_service_export(&self, namespace: &str, name: &str) -> u64 {
        let object = json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {},
        });
        self.apply(ResourceKind::ServiceExport, object)
            .expect("a generated ServiceExport is valid and its CRD installed")
    }

    /// Deletes a ServiceExport; returns whether it existed.
    pub fn delete_service_export(&self, namespace: &str, name: &str) -> bool {
        self.delete(ResourceKind::ServiceExport, namespace, name)
    }

    /// Installs or removes the ServiceExport CRD (installed at start).
    /// Removed: every ServiceExport is deleted (watchers see the DELETED
    /// events), open ServiceExport watches end, and the kind's paths answer
    /// 404 `NotFound` with its group gone from API discovery, as on a
    /// cluster without the CRD.
    pub fn set_service_export_crd(&self, installed: bool) {
        self.shared
            .store()
            .set_installed(ResourceKind::ServiceExport, installed);
    }

    /// Whether the ServiceExport CRD is installed.
    pub fn service_export_crd_installed(&self) -> bool {
        self.shared
            .store()
            .is_installed(ResourceKind::ServiceExport)
    }

    /// The token the token controller minted for ServiceAccount
    /// `namespace/service_account` (the data of its
    /// `kubernetes.io/service-account-token` Secret, decoded), while that
    /// Secret exists. With several such Secrets, the first by name.
    pub fn token_for(&self, namespace: &str, service_account: &str) -> Option<String> {
        self.shared.store().token_for(namespace, service_account)
    }

    // ---- faults --------------------------------------------------------

    /// Refuses every request with RBAC verb `verb` (`get`, `list`, `watch`,
    /// `create`, `update`, `patch`, `delete`) on `kind` (its `scale`
    /// subresource included) with 403 `Forbidden`, whoever asks (the
    /// server's token included, reported as user `admin`), until
    /// [`TestKube::allow`].
    pub fn deny(&self, verb: &str, kind: ResourceKind) {
        self.shared.denied().insert((verb.to_owned(), kind));
    }

    /// Lifts a [`TestKube::deny`].
    pub fn allow(&self, verb: &str, kind: ResourceKind) {
        self.shared.denied().remove(&(verb.to_owned(), kind));
    }

    /// Compacts the history by force: the counter moves on by one, every
    /// open watch gets an in-stream `ERROR` 410 `Expired` and ends, and any
    /// later watch (or continue token) from an earlier resourceVersion gets
    /// the same 410. A re-list then gets the new resourceVersion, from which
    /// watching works again.
    pub fn expire_history(&self) {
        self.shared.store().expire_history();
    }

    /// Abruptly closes every open watch connection mid-stream (the socket is
    /// closed without a final chunk). Lists and new watches are unaffected.
    pub fn drop_watches(&self) {
        let mut kill = self
            .shared
            .watch_kill
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        kill.cancel();
        *kill = CancellationToken::new();
    }

    /// Takes the server down: closes the listener and drops every
    /// connection; returns once all of them are gone. Objects, history,
    /// counters, CA and token are kept. Mutations keep working while down.
    pub async fn stop(&self) {
        let running = self.running_lock().take();
        if let Some(r) = running {
            r.shutdown.cancel();
            r.tracker.close();
            let _ = r.accept.await;
            r.tracker.wait().await;
        }
    }

    /// Brings the server back on the same port with the same CA, certificate,
    /// token and state (stops it first if it is running). Panics if the port
    /// cannot be bound again within 10 s.
    pub async fn restart(&self) {
        self.stop().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.shared.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("ferry-testkube: cannot rebind {}: {e}", self.shared.addr),
            }
        };
        self.serve(listener);
    }

    // ---- counters ------------------------------------------------------

    /// Every (verb, API group, resource) a client has used, as RBAC rules
    /// name them (`""` for the core group; verbs `get`, `list`, `watch`,
    /// `create`, `update`, `patch`, `delete`; a subresource as
    /// `deployments/scale`), whoever the user. Refused (401, 403) requests
    /// are not recorded.
    pub fn access(&self) -> BTreeSet<(String, String, String)> {
        self.shared.access().values().flatten().cloned().collect()
    }

    /// [`TestKube::access`] of one authenticated user: `admin` for the
    /// server's token, a client certificate's CN, or
    /// `system:serviceaccount:NS:NAME` for a minted token.
    pub fn access_by(&self, user: &str) -> BTreeSet<(String, String, String)> {
        self.shared.access().get(user).cloned().unwrap_or_default()
    }

    /// Every user with an authorized request so far (names as in
    /// [`TestKube::access_by`]).
    pub fn users_seen(&self) -> BTreeSet<String> {
        self.shared.access().keys().cloned().collect()
    }

    /// Authenticated list requests so far (each page counts).
    pub fn list_requests(&self) -> u64 {
        self.shared.list_requests.load(Ordering::SeqCst)
    }

    /// Authenticated watch requests so far (including ones answered with an
    /// in-stream 410).
    pub fn watch_requests(&self) -> u64 {
        self.shared.watch_requests.load(Ordering::SeqCst)
    }

    /// Watch streams open right now.
    pub fn open_watches(&self) -> u64 {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Requests authenticated by a client certificate so far, by user (the
    /// certificate's CN).
    pub fn client_cert_requests(&self) -> BTreeMap<String, u64> {
        self.shared
            .cert_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for TestKube {
    fn drop(&mut self) {
        if let Some(r) = self.running_lock().take() {
            r.shutdown.cancel();
            r.tracker.close();
        }
    }
}

fn label_map(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string())))
            .collect::<Map<String, Value>>(),
    )
}

/// A stable fake ClusterIP in 10.96.0.0/16 derived from the Service's name.
fn cluster_ip(namespace: &str, name: &str) -> String {
    let h = format!("{namespace}/{name}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("10.96.{}.{}", (h >> 8) & 0xff, (h & 0xfe).max(2))
}
