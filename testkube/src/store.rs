//! The fake cluster's state: objects, the global resourceVersion counter, the
//! bounded event history that watches replay from, label/field selectors,
//! list paging with continue tokens, the write verbs (create, replace,
//! server-side apply, merge patch, the `scale` subresource, delete with its
//! cascades), the server-side bookkeeping of writes (generation, managed
//! fields, Service cluster IPs), the service-account token controller and
//! the simulated workload controller of Deployments and StatefulSets.
//!
//! Everything here is synchronous and lives behind one mutex in the server;
//! changes are published on a broadcast bus *while the lock is held*, so a
//! watch that subscribes under the lock sees every later change exactly once
//! and in resourceVersion order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

pub use crate::kind::ResourceKind;

/// Why [`crate::TestKube::apply`] rejected an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidObject(pub String);

impl std::fmt::Display for InvalidObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid object: {}", self.0)
    }
}

impl std::error::Error for InvalidObject {}

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeOp {
    Added,
    Modified,
    Deleted,
}

/// One recorded change, shared by the history and every open watch.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub kind: ResourceKind,
    pub op: ChangeOp,
    /// The object after the change (for deletions: the last state, stamped
    /// with the deletion's resourceVersion).
    pub object: Value,
    /// The object's JSON, serialised once for all watchers.
    pub json: String,
    /// The object before the change (modifications only), for selector
    /// transitions.
    pub previous: Option<Value>,
}

/// Messages on the watch bus, in resourceVersion order.
#[derive(Clone, Debug)]
pub(crate) enum Bus {
    Change(Arc<Change>),
    /// The history was compacted by force: open watches end with an
    /// in-stream 410.
    Expired,
    /// The kind's CRD was removed: its open watches end.
    Removed(ResourceKind),
}

/// A parsed `labelSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
}

impl LabelSelector {
    /// Parses `k=v`, `k==v`, `k!=v`, `k` and `!k` terms separated by commas.
    /// Set-based terms (`in`, `notin`) are rejected.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let req = if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==") {
                Requirement::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once('=') {
                Requirement::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some(k) = term.strip_prefix('!') {
                Requirement::NotExists(k.trim().to_string())
            } else if term.contains(' ') || term.contains('(') {
                return Err(format!("unsupported label selector term {term:?}"));
            } else {
                Requirement::Exists(term.to_string())
            };
            let key = match &req {
                Requirement::Eq(k, _)
                | Requirement::NotEq(k, _)
                | Requirement::Exists(k)
                | Requirement::NotExists(k) => k,
            };
            if key.is_empty() || key.contains(' ') {
                return Err(format!("invalid label selector term {term:?}"));
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => get(k) != Some(v.as_str()),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed `fieldSelector`: only `metadata.name` and `metadata.namespace`
/// (in)equalities are applied; every other term is ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<(String, String, bool)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Self {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, v, eq) = if let Some((k, v)) = term.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, v, true)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, v, true)
            } else {
                continue;
            };
            let k = k.trim();
            if k == "metadata.name" || k == "metadata.namespace" {
                terms.push((k.to_string(), v.trim().to_string(), eq));
            }
        }
        FieldSelector(terms)
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(k, v, eq)| {
            let ptr = if k == "metadata.name" {
                "/metadata/name"
            } else {
                "/metadata/namespace"
            };
            let actual = object.pointer(ptr).and_then(Value::as_str).unwrap_or("");
            (actual == v) == *eq
        })
    }
}

/// Which objects a list or watch is about.
#[derive(Clone, Debug)]
pub(crate) struct Filter {
    pub kind: ResourceKind,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                != Some(ns.as_str())
        {
            return false;
        }
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// The watch event type a change shows up as for this filter, if any.
    pub fn event_type(&self, change: &Change) -> Option<&'static str> {
        if change.kind != self.kind {
            return None;
        }
        let now = self.matches(&change.object);
        match change.op {
            ChangeOp::Added => now.then_some("ADDED"),
            ChangeOp::Deleted => now.then_some("DELETED"),
            ChangeOp::Modified => {
                let before = change.previous.as_ref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => Some("MODIFIED"),
                    (false, true) => Some("ADDED"),
                    (true, false) => Some("DELETED"),
                    (false, false) => None,
                }
            }
        }
    }
}

/// An expired or unreadable continue token.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ContinueExpired(pub String);

/// What a watch starts from, decided atomically with its bus subscription.
pub(crate) enum WatchStart {
    /// The requested resourceVersion is older than the retained history.
    Expired { requested: u64, oldest: u64 },
    /// Replay these (already filtered) lines, then go live; `rv` is the
    /// counter at subscription time.
    Replay { lines: Vec<String>, rv: u64 },
}

pub(crate) type Key = (String, String);

/// The Secret type the token controller fills.
pub(crate) const SA_TOKEN_TYPE: &str = "kubernetes.io/service-account-token";
/// The annotation naming a token Secret's ServiceAccount.
pub(crate) const SA_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
/// The annotation the token controller sets to the ServiceAccount's uid.
const SA_UID_ANNOTATION: &str = "kubernetes.io/service-account.uid";

/// Metadata only the server sets: ignored in what clients send.
const SERVER_METADATA: [&str; 5] = [
    "uid",
    "creationTimestamp",
    "resourceVersion",
    "managedFields",
    "generation",
];

/// Why the server refused a write, as the API server says it (the HTTP layer
/// adds the resource and name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WriteError {
    /// 404 `NotFound`: the object does not exist.
    NotFound,
    /// 409 `AlreadyExists`: create of an existing object.
    AlreadyExists,
    /// 409 `Conflict`: a stale `metadata.resourceVersion` precondition.
    Conflict,
    /// 400 `BadRequest` with this message.
    BadRequest(String),
    /// 422 `Invalid` with this field error.
    Invalid(String),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::NotFound => f.write_str("not found"),
            WriteError::AlreadyExists => f.write_str("already exists"),
            WriteError::Conflict => f.write_str("the object has been modified"),
            WriteError::BadRequest(m) | WriteError::Invalid(m) => f.write_str(m),
        }
    }
}

/// The field manager of the server's own controllers.
const CONTROLLER_MANAGER: &str = "kube-controller-manager";
/// The field manager of writes made through [`crate::TestKube::apply`].
const TESTKUBE_MANAGER: &str = "testkube";

/// The `operation` of a `metadata.managedFields` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    /// A server-side apply.
    Apply,
    /// Any other write (create, replace, merge patch, a controller's write).
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// Who makes a write, as `metadata.managedFields` records it.
#[derive(Clone, Copy, Debug)]
struct Writer<'a> {
    manager: &'a str,
    operation: Operation,
    subresource: Option<&'static str>,
}

impl<'a> Writer<'a> {
    fn update(manager: &'a str) -> Self {
        Writer {
            manager,
            operation: Operation::Update,
            subresource: None,
        }
    }
}

/// A token the token controller minted for a Secret.
#[derive(Clone, Debug)]
struct Minted {
    service_account: String,
    token: String,
}

/// The fake cluster's state.
pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<ResourceKind, BTreeMap<Key, Value>>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    /// Watches from a resourceVersion below this are expired: every change
    /// with a larger resourceVersion is still in `history`.
    compacted: u64,
    uid_prefix: u32,
    uid_seq: u64,
    bus: broadcast::Sender<Bus>,
    /// Custom kinds whose CRD is not installed: not served, not stored.
    uninstalled: BTreeSet<ResourceKind>,
    /// The CA PEM token Secrets get as `ca.crt`.
    ca_pem: String,
    /// Tokens minted for service-account token Secrets, by Secret.
    minted: BTreeMap<Key, Minted>,
    /// Caps on the ready and available replicas of the workloads (a
    /// Deployment or StatefulSet) of that namespace and name.
    available_limits: BTreeMap<Key, i32>,
    /// Service cluster IPs handed out so far (the allocator's cursor).
    ip_seq: u32,
}

/// The store key of an object: cluster-scoped kinds ignore `ns`.
pub(crate) fn key(kind: ResourceKind, ns: &str, name: &str) -> Key {
    let ns = if kind.namespaced() { ns } else { "" };
    (ns.to_owned(), name.to_owned())
}

impl Store {
    pub fn new(history_limit: usize, bus: broadcast::Sender<Bus>, ca_pem: String) -> Self {
        let uid_prefix = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
            );
            h.finish() as u32
        };
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 1,
            uid_prefix,
            uid_seq: 0,
            bus,
            uninstalled: BTreeSet::new(),
            ca_pem,
            minted: BTreeMap::new(),
            available_limits: BTreeMap::new(),
            ip_seq: 0,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, kind: ResourceKind, ns: &str, name: &str) -> Option<Value> {
        self.get_key(kind, &key(kind, ns, name)).cloned()
    }

    fn get_key(&self, kind: ResourceKind, key: &Key) -> Option<&Value> {
        self.objects.get(&kind)?.get(key)
    }

    /// Every stored object of `kind`, in key order.
    pub fn objects(&self, kind: ResourceKind) -> impl Iterator<Item = &Value> {
        self.objects.get(&kind).into_iter().flat_map(|m| m.values())
    }

    fn keys_where(&self, kind: ResourceKind, keep: impl Fn(&Key, &Value) -> bool) -> Vec<Key> {
        self.objects
            .get(&kind)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(k, v)| keep(k, v))
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn count(&self, kind: ResourceKind) -> usize {
        self.objects.get(&kind).map_or(0, BTreeMap::len)
    }

    /// Creates or replaces an object (the Rust-side apply). Server-owned
    /// metadata (uid, creationTimestamp, resourceVersion) is filled in;
    /// applying an object identical to the stored one is a no-op. Returns
    /// the object's resourceVersion once the controllers have run.
    pub fn apply(&mut self, kind: ResourceKind, mut object: Value) -> Result<u64, InvalidObject> {
        if !self.is_installed(kind) {
            return Err(InvalidObject(format!(
                "the {} CRD ({}) is not installed",
                kind.kind(),
                kind.api_version()
            )));
        }
        let ns = match object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
        {
            Some(ns) if !ns.is_empty() => ns.to_owned(),
            _ => "default".to_owned(),
        };
        let key =
            prepare(kind, &mut object, &ns, None).map_err(|e| InvalidObject(e.to_string()))?;
        let owned = object.clone();
        self.commit(
            kind,
            key.clone(),
            object,
            Writer::update(TESTKUBE_MANAGER),
            &owned,
        );
        Ok(self.get_key(kind, &key).map_or(self.rv, |o| self.rv_of(o)))
    }

    /// Creates an object in namespace `ns` (ignored for cluster-scoped
    /// kinds), as `POST` does: `metadata.generateName` is honoured, an
    /// existing object is a 409. Returns the object as stored. `manager`
    /// is the write's field manager.
    pub fn create(
        &mut self,
        kind: ResourceKind,
        ns: &str,
        mut object: Value,
        manager: &str,
    ) -> Result<Value, WriteError> {
        generate_name(&mut object);
        let key = prepare(kind, &mut object, ns, None)?;
        if self.get_key(kind, &key).is_some() {
            return Err(WriteError::AlreadyExists);
        }
        let owned = object.clone();
        Ok(self.commit(kind, key, object, Writer::update(manager), &owned))
    }

    /// Replaces an existing object, as `PUT` does (404 when absent; a
    /// `metadata.resourceVersion` in the body must be the stored one).
    pub fn replace(
        &mut self,
        kind: ResourceKind,
        ns: &str,
        name: &str,
        mut object: Value,
        manager: &str,
    ) -> Result<Value, WriteError> {
        let key = prepare(kind, &mut object, ns, Some(name))?;
        let stored = self.get_key(kind, &key).ok_or(WriteError::NotFound)?;
        check_precondition(stored, &object)?;
        let owned = object.clone();
        Ok(self.commit(kind, key, object, Writer::update(manager), &owned))
    }

    /// Server-side apply of `patch` (creating the object when absent).
    /// The merge is simplified: `metadata.labels` and
    /// `metadata.annotations` merge key by key (a `null` value removes the
    /// key), other metadata and every other top-level field in the patch
    /// replace the stored ones, and fields the patch leaves out are kept (no
    /// field ownership is tracked, so no conflicts either; a
    /// `metadata.resourceVersion` in the patch must be the stored one).
    /// Returns the object and whether it was created. `manager` is the
    /// apply's `fieldManager`.
    pub fn server_side_apply(
        &mut self,
        kind: ResourceKind,
        ns: &str,
        name: &str,
        mut patch: Value,
        manager: &str,
    ) -> Result<(Value, bool), WriteError> {
        for field in ["apiVersion", "kind"] {
            if patch
                .get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(WriteError::BadRequest(format!(
                    "{field} must be set in a server-side apply patch"
                )));
            }
        }
        let key = prepare(kind, &mut patch, ns, Some(name))?;
        let writer = Writer {
            manager,
            operation: Operation::Apply,
            subresource: None,
        };
        match self.get_key(kind, &key) {
            None => {
                let owned = patch.clone();
                Ok((self.commit(kind, key, patch, writer, &owned), true))
            }
            Some(stored) => {
                check_precondition(stored, &patch)?;
                let merged = apply_merge(stored, &patch);
                Ok((self.commit(kind, key, merged, writer, &patch), false))
            }
        }
    }

    /// An RFC 7386 JSON merge patch of an existing object (404 when
    /// absent). The patch may not rename or move the object.
    pub fn merge_patch(
        &mut self,
        kind: ResourceKind,
        ns: &str,
        name: &str,
        patch: &Value,
        manager: &str,
    ) -> Result<Value, WriteError> {
        let key = key(kind, ns, name);
        let stored = self.get_key(kind, &key).ok_or(WriteError::NotFound)?;
        check_precondition(stored, patch)?;
        let mut merged = stored.clone();
        json_merge_patch(&mut merged, patch);
        if let Some(meta) = merged.get_mut("metadata").and_then(Value::as_object_mut) {
            for field in SERVER_METADATA {
                meta.remove(field);
            }
        }
        let key = prepare(kind, &mut merged, ns, Some(name))?;
        Ok(self.commit(kind, key, merged, Writer::update(manager), patch))
    }

    /// The `autoscaling/v1` `Scale` of a Deployment or StatefulSet (`None`
    /// when absent or not a workload).
    pub fn get_scale(&self, kind: ResourceKind, ns: &str, name: &str) -> Option<Value> {
        if !kind.is_workload() {
            return None;
        }
        self.get_key(kind, &key(kind, ns, name)).map(scale_of)
    }

    /// A write of the `scale` subresource: sets the workload's
    /// `spec.replicas` to the `Scale`'s (absent: 0; 404 when the workload
    /// is absent, 409 for a stale `metadata.resourceVersion` in `scale`,
    /// 422 for a negative count), then runs the workload controller.
    /// Returns the `Scale` as the write stored it.
    pub fn set_scale(
        &mut self,
        kind: ResourceKind,
        ns: &str,
        name: &str,
        scale: &Value,
        manager: &str,
        operation: Operation,
    ) -> Result<Value, WriteError> {
        let key = key(kind, ns, name);
        let stored = match self.get_key(kind, &key) {
            Some(stored) if kind.is_workload() => stored,
            _ => return Err(WriteError::NotFound),
        };
        check_precondition(stored, scale)?;
        let replicas = match scale.pointer("/spec/replicas") {
            None | Some(Value::Null) => 0,
            Some(n) => n.as_i64().ok_or_else(|| {
                WriteError::BadRequest(format!("spec.replicas must be an integer, not {n}"))
            })?,
        };
        let replicas = match i32::try_from(replicas) {
            Ok(n) if n >= 0 => n,
            _ => {
                return Err(WriteError::Invalid(format!(
                    "spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
                )));
            }
        };
        let mut scaled = stored.clone();
        if let Some(obj) = scaled.as_object_mut() {
            object_entry(obj, "spec").insert("replicas".into(), replicas.into());
        }
        let writer = Writer {
            manager,
            operation,
            subresource: Some("scale"),
        };
        let owned = json!({"spec": {"replicas": replicas}});
        let written = self.commit(kind, key, scaled, writer, &owned);
        Ok(scale_of(&written))
    }

    /// Caps (or, with `None`, stops capping) the ready and available
    /// replicas of the Deployment and the StatefulSet `ns/name`, present or
    /// future, and runs the workload controller on them.
    pub fn set_available_limit(&mut self, ns: &str, name: &str, limit: Option<i32>) {
        let key = (ns.to_owned(), name.to_owned());
        match limit {
            Some(n) => self.available_limits.insert(key.clone(), n.max(0)),
            None => self.available_limits.remove(&key),
        };
        for kind in ResourceKind::ALL.into_iter().filter(|k| k.is_workload()) {
            self.reconcile_workload(kind, &key);
        }
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&mut self, kind: ResourceKind, ns: &str, name: &str) -> bool {
        self.remove(kind, ns, name).is_some()
    }

    /// Deletes an object and returns its last state. Deleting a Namespace
    /// first deletes every namespaced object in it (the real server does so
    /// through the namespace finalizer, later); deleting a ServiceAccount
    /// deletes its token Secrets (as the token controller does); deleting a
    /// token Secret revokes its token.
    pub fn remove(&mut self, kind: ResourceKind, ns: &str, name: &str) -> Option<Value> {
        let key = key(kind, ns, name);
        self.get_key(kind, &key)?;
        if kind == ResourceKind::Namespace {
            for inner in ResourceKind::ALL.into_iter().filter(|k| k.namespaced()) {
                for (ns, name) in self.keys_where(inner, |k, _| k.0 == key.1) {
                    self.remove(inner, &ns, &name);
                }
            }
        }
        let mut object = self.objects.get_mut(&kind)?.remove(&key)?;
        self.rv += 1;
        set_rv(&mut object, self.rv);
        self.record(kind, ChangeOp::Deleted, object.clone(), None);
        match kind {
            ResourceKind::Secret => {
                self.minted.remove(&key);
            }
            ResourceKind::ServiceAccount => {
                let tokens = self.keys_where(ResourceKind::Secret, |k, secret| {
                    k.0 == key.0 && token_service_account(secret) == Some(key.1.as_str())
                });
                for (ns, name) in tokens {
                    self.remove(ResourceKind::Secret, &ns, &name);
                }
            }
            _ => {}
        }
        Some(object)
    }

    /// Writes a prepared object from a client, then runs the controllers
    /// on it. A workload's `status` is its controller's: what the client
    /// sent is replaced by the stored one. Returns the object as this write
    /// stored it.
    fn commit(
        &mut self,
        kind: ResourceKind,
        key: Key,
        mut object: Value,
        writer: Writer<'_>,
        owned: &Value,
    ) -> Value {
        if kind.is_workload()
            && let Some(obj) = object.as_object_mut()
        {
            match self
                .get_key(kind, &key)
                .and_then(|old| old.get("status"))
                .cloned()
            {
                Some(status) => obj.insert("status".into(), status),
                None => obj.remove("status"),
            };
        }
        let stored = self.write(kind, key.clone(), object, writer, owned);
        self.reconcile(kind, &key);
        stored
    }

    /// Stores a prepared object: server defaults and server-owned metadata
    /// (uid, creationTimestamp, resourceVersion, generation, the writer's
    /// `managedFields` entry owning the fields of `owned`) filled in, a
    /// no-op when nothing changed. Returns the stored object.
    fn write(
        &mut self,
        kind: ResourceKind,
        key: Key,
        mut object: Value,
        writer: Writer<'_>,
        owned: &Value,
    ) -> Value {
        apply_defaults(kind, &key, &mut object);
        let existing = self.get_key(kind, &key).cloned();
        if kind == ResourceKind::Service {
            self.allocate_cluster_ip(&mut object, existing.as_ref());
        }
        let generation = kind.has_generation().then(|| match &existing {
            None => 1,
            Some(old) => {
                let before = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                if desired_state(old) == desired_state(&object) {
                    before
                } else {
                    before + 1
                }
            }
        });
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            for field in SERVER_METADATA {
                meta.remove(field);
            }
            if let Some(generation) = generation {
                meta.insert("generation".into(), generation.into());
            }
            match &existing {
                Some(old) => {
                    for field in [
                        "uid",
                        "creationTimestamp",
                        "resourceVersion",
                        "managedFields",
                    ] {
                        if let Some(v) = old.pointer(&format!("/metadata/{field}")) {
                            meta.insert(field.into(), v.clone());
                        }
                    }
                }
                None => {
                    self.uid_seq += 1;
                    let uid = format!(
                        "{:08x}-0000-4000-8000-{:012x}",
                        self.uid_prefix, self.uid_seq
                    );
                    meta.insert("uid".into(), uid.into());
                    meta.insert("creationTimestamp".into(), rfc3339_now().into());
                }
            }
        }
        if let Some(old) = &existing
            && *old == object
        {
            return object;
        }
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            record_manager(meta, kind, writer, owned);
        }
        self.rv += 1;
        set_rv(&mut object, self.rv);
        self.objects
            .entry(kind)
            .or_default()
            .insert(key, object.clone());
        let op = if existing.is_some() {
            ChangeOp::Modified
        } else {
            ChangeOp::Added
        };
        self.record(kind, op, object.clone(), existing);
        object
    }

    /// The controllers: after a write of a Secret or a ServiceAccount, the
    /// token controller fills (or revokes) the tokens concerned; after a
    /// write of a workload, the workload controller updates its status.
    fn reconcile(&mut self, kind: ResourceKind, key: &Key) {
        match kind {
            ResourceKind::Deployment | ResourceKind::StatefulSet => {
                self.reconcile_workload(kind, key);
            }
            ResourceKind::Secret => self.reconcile_token(key),
            ResourceKind::ServiceAccount => {
                let secrets = self.keys_where(ResourceKind::Secret, |k, secret| {
                    k.0 == key.0 && token_service_account(secret) == Some(key.1.as_str())
                });
                for secret in secrets {
                    self.reconcile_token(&secret);
                }
            }
            _ => {}
        }
    }

    /// The token controller for one Secret: a service-account token Secret
    /// whose ServiceAccount exists gets a token (kept while the Secret
    /// exists), the CA and its namespace in `data`; any other Secret has no
    /// token.
    fn reconcile_token(&mut self, key: &Key) {
        let Some(secret) = self.get_key(ResourceKind::Secret, key) else {
            self.minted.remove(key);
            return;
        };
        let Some(sa_name) = token_service_account(secret).map(str::to_owned) else {
            self.minted.remove(key);
            return;
        };
        let sa_key = (key.0.clone(), sa_name.clone());
        let Some(sa_uid) = self
            .get_key(ResourceKind::ServiceAccount, &sa_key)
            .map(|sa| sa.pointer("/metadata/uid").cloned().unwrap_or(Value::Null))
        else {
            self.minted.remove(key);
            return;
        };
        let mut filled = secret.clone();
        let token = match self.minted.get(key) {
            Some(m) if m.service_account == sa_name => m.token.clone(),
            _ => {
                let token = random_hex(32);
                self.minted.insert(
                    key.clone(),
                    Minted {
                        service_account: sa_name,
                        token: token.clone(),
                    },
                );
                token
            }
        };
        let b64 = |s: &str| Value::String(STANDARD.encode(s.as_bytes()));
        if let Some(obj) = filled.as_object_mut() {
            let data = object_entry(obj, "data");
            data.insert("token".into(), b64(&token));
            data.insert("ca.crt".into(), b64(&self.ca_pem));
            data.insert("namespace".into(), b64(&key.0));
        }
        if let Some(meta) = filled.get_mut("metadata").and_then(Value::as_object_mut) {
            object_entry(meta, "annotations").insert(SA_UID_ANNOTATION.into(), sa_uid);
        }
        if Some(&filled) != self.get_key(ResourceKind::Secret, key) {
            let owned = json!({
                "data": {"token": "", "ca.crt": "", "namespace": ""},
                "metadata": {"annotations": {SA_UID_ANNOTATION: ""}},
            });
            let writer = Writer::update(CONTROLLER_MANAGER);
            self.write(ResourceKind::Secret, key.clone(), filled, writer, &owned);
        }
    }

    /// The workload controller for one Deployment or StatefulSet: its
    /// status reports `spec.replicas` (default 1) replicas, all of them
    /// updated, and as many ready and available as the test's limit allows
    /// ([`Store::set_available_limit`]), observed at the current
    /// generation. Writes only when the status changes.
    fn reconcile_workload(&mut self, kind: ResourceKind, key: &Key) {
        let Some(workload) = self.get_key(kind, key) else {
            return;
        };
        let status = workload_status(kind, workload, self.available_limits.get(key).copied());
        if workload.get("status") == Some(&status) {
            return;
        }
        let mut updated = workload.clone();
        if let Some(obj) = updated.as_object_mut() {
            obj.insert("status".into(), status.clone());
        }
        let writer = Writer {
            manager: CONTROLLER_MANAGER,
            operation: Operation::Update,
            subresource: Some("status"),
        };
        let owned = json!({ "status": status });
        self.write(kind, key.clone(), updated, writer, &owned);
    }

    /// Fills in a Service's cluster IP as the API server's allocator does:
    /// kept from the request or, when the request has none, from the stored
    /// Service; otherwise a free address of 10.96.0.0/12 (from a cursor
    /// that starts at a random place, so two servers hand out different
    /// addresses). Headless (`None`) and `ExternalName` Services get none.
    fn allocate_cluster_ip(&mut self, object: &mut Value, existing: Option<&Value>) {
        let Some(obj) = object.as_object_mut() else {
            return;
        };
        let spec = object_entry(obj, "spec");
        let service_type = spec
            .entry("type")
            .or_insert_with(|| "ClusterIP".into())
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if service_type == "ExternalName" {
            return;
        }
        let given = |s: &Map<String, Value>| {
            s.get("clusterIP")
                .and_then(Value::as_str)
                .filter(|ip| !ip.is_empty())
                .map(str::to_owned)
        };
        let kept = existing
            .and_then(|old| old.get("spec"))
            .and_then(Value::as_object)
            .and_then(|old| given(old).map(|ip| (ip, old.get("clusterIPs").cloned())));
        let (ip, ips) = match (given(spec), kept) {
            (Some(ip), Some((old_ip, old_ips))) if ip == old_ip => (ip, old_ips),
            (Some(ip), _) => (ip, None),
            (None, Some((old_ip, old_ips))) => (old_ip, old_ips),
            (None, None) => (self.free_cluster_ip(), None),
        };
        if spec
            .get("clusterIPs")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            spec.insert(
                "clusterIPs".into(),
                ips.unwrap_or_else(|| json!([ip.clone()])),
            );
        }
        spec.insert("clusterIP".into(), ip.into());
        spec.entry("ipFamilies").or_insert_with(|| json!(["IPv4"]));
        spec.entry("ipFamilyPolicy")
            .or_insert_with(|| "SingleStack".into());
        spec.entry("sessionAffinity")
            .or_insert_with(|| "None".into());
        spec.entry("internalTrafficPolicy")
            .or_insert_with(|| "Cluster".into());
    }

    /// The next cluster IP no Service uses.
    fn free_cluster_ip(&mut self) -> String {
        let used: BTreeSet<String> = self
            .objects(ResourceKind::Service)
            .filter_map(|s| s.pointer("/spec/clusterIP").and_then(Value::as_str))
            .map(str::to_owned)
            .collect();
        loop {
            self.ip_seq = self.ip_seq.wrapping_add(1);
            let offset = (self.uid_prefix.wrapping_add(self.ip_seq.wrapping_mul(7919))) & 0xf_ffff;
            let addr = (10u32 << 24) | (96 << 16) | offset;
            let [a, b, c, d] = addr.to_be_bytes();
            if d == 0 || d == 255 {
                continue;
            }
            let ip = format!("{a}.{b}.{c}.{d}");
            if !used.contains(&ip) {
                return ip;
            }
        }
    }

    /// The ServiceAccount `(namespace, name)` a minted token authenticates,
    /// while its Secret and ServiceAccount exist.
    pub fn token_user(&self, token: &str) -> Option<(String, String)> {
        let (key, minted) = self.minted.iter().find(|(_, m)| m.token == token)?;
        self.get_key(ResourceKind::Secret, key)?;
        let sa_key = (key.0.clone(), minted.service_account.clone());
        self.get_key(ResourceKind::ServiceAccount, &sa_key)?;
        Some(sa_key)
    }

    /// The token minted for a Secret of ServiceAccount `ns/sa`, if any (the
    /// first Secret by name when it has several).
    pub fn token_for(&self, ns: &str, sa: &str) -> Option<String> {
        self.minted
            .iter()
            .find(|(k, m)| k.0 == ns && m.service_account == sa)
            .map(|(_, m)| m.token.clone())
    }

    fn rv_of(&self, object: &Value) -> u64 {
        object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .unwrap_or(self.rv)
    }

    fn record(&mut self, kind: ResourceKind, op: ChangeOp, object: Value, previous: Option<Value>) {
        let json = object.to_string();
        let change = Arc::new(Change {
            rv: self.rv,
            kind,
            op,
            object,
            json,
            previous,
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        // No receivers is fine.
        let _ = self.bus.send(Bus::Change(change));
    }

    /// Whether `kind` is served (built-in kinds always are).
    pub fn is_installed(&self, kind: ResourceKind) -> bool {
        !self.uninstalled.contains(&kind)
    }

    /// Installs or removes a custom kind's CRD. Removing it deletes every
    /// object of the kind (watchers see the DELETED events) and then ends
    /// the kind's open watches, as the real API server does; afterwards the
    /// kind's paths answer 404. Built-in kinds cannot be removed. Returns
    /// whether anything changed.
    pub fn set_installed(&mut self, kind: ResourceKind, installed: bool) -> bool {
        if !kind.is_custom() || installed == self.is_installed(kind) {
            return false;
        }
        if installed {
            self.uninstalled.remove(&kind);
            return true;
        }
        let keys: Vec<Key> = self
            .objects
            .get(&kind)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for (ns, name) in keys {
            self.delete(kind, &ns, &name);
        }
        self.uninstalled.insert(kind);
        let _ = self.bus.send(Bus::Removed(kind));
        true
    }

    /// Forgets the whole history: the counter moves on by one, watches and
    /// continue tokens from any earlier resourceVersion are expired, and open
    /// watches are told so (in-stream 410).
    pub fn expire_history(&mut self) {
        self.rv += 1;
        self.history.clear();
        self.compacted = self.rv;
        let _ = self.bus.send(Bus::Expired);
    }

    /// Subscribes to the bus and computes what a watch from `from` replays
    /// first. `from == None` (resourceVersion unset or "0") means "start now,
    /// with synthetic ADDED events for the current state".
    pub fn start_watch(
        &self,
        filter: &Filter,
        from: Option<u64>,
    ) -> (broadcast::Receiver<Bus>, WatchStart) {
        let rx = self.bus.subscribe();
        let start = match from {
            None => {
                let lines = self
                    .objects
                    .get(&filter.kind)
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter(|o| filter.matches(o))
                    .map(|o| event_line("ADDED", &o.to_string()))
                    .collect();
                WatchStart::Replay { lines, rv: self.rv }
            }
            Some(r) if r < self.compacted => WatchStart::Expired {
                requested: r,
                oldest: self.compacted,
            },
            Some(r) => {
                let lines = self
                    .history
                    .iter()
                    .filter(|c| c.rv > r)
                    .filter_map(|c| filter.event_type(c).map(|t| event_line(t, &c.json)))
                    .collect();
                WatchStart::Replay { lines, rv: self.rv }
            }
        };
        (rx, start)
    }

    /// Lists objects matching `filter`, at most `limit` of them (0 = all),
    /// resuming after a continue token.
    pub fn list(
        &self,
        filter: &Filter,
        limit: usize,
        continue_token: Option<&str>,
    ) -> Result<Value, ContinueExpired> {
        let (list_rv, after) = match continue_token {
            Some(tok) => {
                let t = ContinueToken::decode(tok)
                    .ok_or_else(|| ContinueExpired("the continue token is not valid".into()))?;
                if t.kind != filter.kind || t.namespace != filter.namespace {
                    return Err(ContinueExpired(
                        "the continue token belongs to another list".into(),
                    ));
                }
                if t.rv < self.compacted || t.rv > self.rv {
                    return Err(ContinueExpired(format!(
                        "the provided continue parameter is too old to display a consistent list result (resourceVersion {} is older than {})",
                        t.rv, self.compacted
                    )));
                }
                (t.rv, Some(t.after))
            }
            None => (self.rv, None),
        };
        let empty = BTreeMap::new();
        let objects = self.objects.get(&filter.kind).unwrap_or(&empty);
        let range = match &after {
            Some(k) => objects.range::<Key, _>((
                std::ops::Bound::Excluded(k.clone()),
                std::ops::Bound::Unbounded,
            )),
            None => objects.range::<Key, _>(..),
        };
        let mut items = Vec::new();
        let mut last_key = None;
        let mut remaining = 0u64;
        for (key, obj) in range {
            if !filter.matches(obj) {
                continue;
            }
            if limit > 0 && items.len() == limit {
                remaining += 1;
                continue;
            }
            let mut item = obj.clone();
            if let Some(m) = item.as_object_mut() {
                // The real API server leaves kind/apiVersion off list items.
                m.remove("kind");
                m.remove("apiVersion");
            }
            items.push(item);
            last_key = Some(key.clone());
        }
        let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
        if remaining > 0
            && let Some(after) = last_key
        {
            let token = ContinueToken {
                kind: filter.kind,
                namespace: filter.namespace.clone(),
                rv: list_rv,
                after,
            };
            metadata["continue"] = token.encode().into();
            metadata["remainingItemCount"] = remaining.into();
        }
        Ok(json!({
            "kind": filter.kind.list_kind(),
            "apiVersion": filter.kind.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    }
}

/// Checks and completes an object written to `ns`/`name`: a JSON object of
/// `kind` (`kind` and `apiVersion` filled in when absent), named (a `name`
/// from the URL must match the body's, or fills it in), in namespace `ns`
/// for namespaced kinds and in none otherwise. Returns its key.
fn prepare(
    kind: ResourceKind,
    object: &mut Value,
    ns: &str,
    name: Option<&str>,
) -> Result<Key, WriteError> {
    let bad = |m: String| Err(WriteError::BadRequest(m));
    let Some(obj) = object.as_object_mut() else {
        return bad("the body is not a JSON object".into());
    };
    for (field, expected, what) in [
        ("kind", kind.kind(), "kind"),
        ("apiVersion", kind.api_version(), "API version"),
    ] {
        match obj.get(field).and_then(Value::as_str) {
            Some(given) if !given.is_empty() && given != expected => {
                return bad(format!(
                    "the {what} in the data ({given}) does not match the expected {what} ({expected})"
                ));
            }
            _ => {
                obj.insert(field.into(), expected.into());
            }
        }
    }
    let Some(meta) = object_entry_checked(obj, "metadata") else {
        return bad("metadata is not an object".into());
    };
    let body_name = meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    let name = match (body_name, name) {
        (Some(body), Some(url)) if body != url => {
            return bad(format!(
                "the name of the object ({body}) does not match the name on the URL ({url})"
            ));
        }
        (Some(body), _) => body,
        (None, Some(url)) => url.to_owned(),
        (None, None) => {
            return Err(WriteError::Invalid(
                "metadata.name: Required value: name or generateName is required".into(),
            ));
        }
    };
    meta.insert("name".into(), name.clone().into());
    if kind.namespaced() {
        if let Some(given) = meta.get("namespace").and_then(Value::as_str)
            && !given.is_empty()
            && given != ns
        {
            return bad(
                "the namespace of the provided object does not match the namespace sent on the request"
                    .into(),
            );
        }
        if ns.is_empty() {
            return Err(WriteError::Invalid(
                "metadata.namespace: Required value".into(),
            ));
        }
        meta.insert("namespace".into(), ns.into());
    } else {
        meta.remove("namespace");
    }
    Ok(key(kind, ns, &name))
}

/// Names an object that has only `metadata.generateName`: the prefix and
/// five random characters, as the API server does.
fn generate_name(object: &mut Value) {
    let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if meta
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty())
    {
        return;
    }
    if let Some(prefix) = meta
        .get("generateName")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
    {
        let name = format!("{prefix}{}", &random_hex(3)[..5]);
        meta.insert("name".into(), name.into());
    }
}

/// A `metadata.resourceVersion` in a write must be the stored one.
fn check_precondition(stored: &Value, incoming: &Value) -> Result<(), WriteError> {
    let wanted = incoming
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|rv| !rv.is_empty());
    match wanted {
        Some(rv)
            if stored
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                != Some(rv) =>
        {
            Err(WriteError::Conflict)
        }
        _ => Ok(()),
    }
}

/// The simplified server-side apply merge of `patch` into `stored` (see
/// [`Store::server_side_apply`]).
fn apply_merge(stored: &Value, patch: &Value) -> Value {
    let mut merged = stored.clone();
    let (Some(out), Some(patch)) = (merged.as_object_mut(), patch.as_object()) else {
        return patch.clone();
    };
    for (field, value) in patch {
        match (field.as_str(), value.as_object()) {
            ("metadata", Some(meta)) => merge_metadata(object_entry(out, "metadata"), meta),
            _ => {
                out.insert(field.clone(), value.clone());
            }
        }
    }
    merged
}

fn merge_metadata(out: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (field, value) in patch {
        match (field.as_str(), value.as_object()) {
            ("labels" | "annotations", Some(entries)) => {
                let target = object_entry(out, field);
                for (k, v) in entries {
                    if v.is_null() {
                        target.remove(k);
                    } else {
                        target.insert(k.clone(), v.clone());
                    }
                }
            }
            (f, _) if SERVER_METADATA.contains(&f) => {}
            _ => {
                out.insert(field.clone(), value.clone());
            }
        }
    }
}

/// RFC 7386 JSON merge patch.
pub(crate) fn json_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(out) = target.as_object_mut() {
        for (k, v) in fields {
            if v.is_null() {
                out.remove(k);
            } else {
                json_merge_patch(out.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// An object without its metadata and status: what `metadata.generation`
/// counts the changes of.
fn desired_state(object: &Value) -> Value {
    match object.as_object() {
        Some(obj) => Value::Object(
            obj.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        None => object.clone(),
    }
}

/// Records `writer`'s write in `metadata.managedFields`: one entry per
/// manager, operation and subresource (a later write of the same replaces
/// it), owning the fields of `owned` in the `FieldsV1` format (simplified:
/// lists are owned whole).
fn record_manager(
    meta: &mut Map<String, Value>,
    kind: ResourceKind,
    writer: Writer<'_>,
    owned: &Value,
) {
    let mut entry = json!({
        "manager": writer.manager,
        "operation": writer.operation.as_str(),
        "apiVersion": kind.api_version(),
        "time": rfc3339_now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": owned_fields(owned),
    });
    if let Some(sub) = writer.subresource {
        entry["subresource"] = sub.into();
    }
    let same = |e: &Value| {
        e.get("manager").and_then(Value::as_str) == Some(writer.manager)
            && e.get("operation").and_then(Value::as_str) == Some(writer.operation.as_str())
            && e.get("subresource").and_then(Value::as_str) == writer.subresource
    };
    let entries = meta
        .entry("managedFields")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !entries.is_array() {
        *entries = Value::Array(Vec::new());
    }
    if let Value::Array(entries) = entries {
        match entries.iter_mut().find(|e| same(e)) {
            Some(e) => *e = entry,
            None => entries.push(entry),
        }
    }
}

/// The `fieldsV1` of what a write sent: every field but `apiVersion`,
/// `kind` and the metadata the server or the URL sets.
fn owned_fields(owned: &Value) -> Value {
    let Some(obj) = owned.as_object() else {
        return json!({});
    };
    let mut fields = Map::new();
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("apiVersion" | "kind", _) => {}
            ("metadata", Value::Object(meta)) => {
                let kept: Map<String, Value> = meta
                    .iter()
                    .filter(|(f, _)| {
                        matches!(
                            f.as_str(),
                            "labels" | "annotations" | "finalizers" | "ownerReferences"
                        )
                    })
                    .map(|(f, v)| (format!("f:{f}"), fields_v1(v)))
                    .collect();
                if !kept.is_empty() {
                    fields.insert("f:metadata".into(), Value::Object(kept));
                }
            }
            _ => {
                fields.insert(format!("f:{k}"), fields_v1(v));
            }
        }
    }
    Value::Object(fields)
}

fn fields_v1(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (format!("f:{k}"), fields_v1(v)))
                .collect(),
        ),
        _ => json!({}),
    }
}

/// The status the workload controller reports for a Deployment or a
/// StatefulSet with `available_limit`: as the real controllers do, a
/// Deployment's zero counts are left out.
fn workload_status(kind: ResourceKind, workload: &Value, available_limit: Option<i32>) -> Value {
    let desired = workload
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or(1)
        .max(0);
    let available = available_limit.map_or(desired, |l| l.clamp(0, desired));
    let generation = workload
        .pointer("/metadata/generation")
        .cloned()
        .unwrap_or_else(|| 1.into());
    let mut status = Map::new();
    status.insert("observedGeneration".into(), generation);
    if kind == ResourceKind::StatefulSet {
        status.insert("replicas".into(), desired.into());
        status.insert("availableReplicas".into(), available.into());
    }
    let counts = [
        ("replicas", desired),
        ("updatedReplicas", desired),
        ("readyReplicas", available),
        ("availableReplicas", available),
        ("currentReplicas", desired),
        ("unavailableReplicas", desired - available),
    ];
    for (field, n) in counts {
        let applies = match field {
            "currentReplicas" => kind == ResourceKind::StatefulSet,
            "unavailableReplicas" => kind == ResourceKind::Deployment,
            _ => true,
        };
        if applies && n > 0 {
            status.insert(field.into(), n.into());
        }
    }
    Value::Object(status)
}

/// The `autoscaling/v1` `Scale` of a workload: its desired replicas (left
/// out when zero, as the API server does), the replicas its status reports
/// and its selector as a label selector string.
fn scale_of(workload: &Value) -> Value {
    let mut metadata = Map::new();
    for field in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = workload.pointer(&format!("/metadata/{field}")) {
            metadata.insert(field.into(), v.clone());
        }
    }
    let mut spec = Map::new();
    if let Some(n) = workload
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .filter(|n| *n != 0)
    {
        spec.insert("replicas".into(), n.into());
    }
    let replicas = workload
        .pointer("/status/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let mut status = json!({ "replicas": replicas });
    if let Some(selector) = workload.pointer("/spec/selector") {
        status["selector"] = selector_string(selector).into();
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": metadata,
        "spec": spec,
        "status": status,
    })
}

/// A `LabelSelector` object as the string form (`app=web,tier in (a,b)`),
/// terms sorted by key.
fn selector_string(selector: &Value) -> String {
    let mut terms: Vec<(String, String)> = Vec::new();
    if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in labels {
            terms.push((k.clone(), format!("{k}={}", v.as_str().unwrap_or_default())));
        }
    }
    for expr in selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = expr.get("key").and_then(Value::as_str).unwrap_or_default();
        let values: Vec<&str> = expr
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let term = match expr.get("operator").and_then(Value::as_str) {
            Some("In") => format!("{key} in ({})", values.join(",")),
            Some("NotIn") => format!("{key} notin ({})", values.join(",")),
            Some("DoesNotExist") => format!("!{key}"),
            _ => key.to_owned(),
        };
        terms.push((key.to_owned(), term));
    }
    terms.sort();
    terms
        .into_iter()
        .map(|(_, t)| t)
        .collect::<Vec<_>>()
        .join(",")
}

/// What the API server defaults: a Namespace's name label, finalizer and
/// phase; a Secret's type, and its `stringData` folded into `data`; a
/// workload's `spec.replicas` (1).
fn apply_defaults(kind: ResourceKind, key: &Key, object: &mut Value) {
    let Some(obj) = object.as_object_mut() else {
        return;
    };
    match kind {
        ResourceKind::Namespace => {
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                object_entry(meta, "labels")
                    .insert("kubernetes.io/metadata.name".into(), key.1.clone().into());
            }
            obj.entry("spec")
                .or_insert_with(|| json!({"finalizers": ["kubernetes"]}));
            obj.entry("status")
                .or_insert_with(|| json!({"phase": "Active"}));
        }
        ResourceKind::Secret => {
            obj.entry("type").or_insert_with(|| "Opaque".into());
            if let Some(Value::Object(plain)) = obj.remove("stringData") {
                let data = object_entry(obj, "data");
                for (k, v) in plain {
                    let text = v.as_str().unwrap_or_default();
                    data.insert(k, STANDARD.encode(text.as_bytes()).into());
                }
            }
        }
        ResourceKind::Deployment | ResourceKind::StatefulSet => {
            object_entry(obj, "spec")
                .entry("replicas")
                .or_insert_with(|| 1.into());
        }
        _ => {}
    }
}

/// The ServiceAccount a Secret is a token for: its type is
/// `kubernetes.io/service-account-token` and it names the account.
pub(crate) fn token_service_account(secret: &Value) -> Option<&str> {
    if secret.get("type").and_then(Value::as_str) != Some(SA_TOKEN_TYPE) {
        return None;
    }
    secret
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(SA_NAME_ANNOTATION))
        .and_then(Value::as_str)
        .filter(|sa| !sa.is_empty())
}

/// `map[field]` as an object, replacing whatever non-object was there.
fn object_entry<'a>(map: &'a mut Map<String, Value>, field: &str) -> &'a mut Map<String, Value> {
    let entry = map
        .entry(field.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    match entry {
        Value::Object(inner) => inner,
        // Just made an object.
        _ => unreachable!(),
    }
}

/// `map[field]` as an object (created when absent); `None` when it holds
/// something else.
fn object_entry_checked<'a>(
    map: &'a mut Map<String, Value>,
    field: &str,
) -> Option<&'a mut Map<String, Value>> {
    map.entry(field.to_owned())
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
}

/// `bytes` random bytes (from the ring provider's system RNG) as hex.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut buf)
        .is_err()
    {
        // The system RNG failed: hash-seeded bytes still differ per call.
        use std::hash::{BuildHasher, Hasher};
        for chunk in buf.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
            );
            let n = chunk.len();
            chunk.copy_from_slice(&h.finish().to_le_bytes()[..n]);
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn set_rv(object: &mut Value, rv: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), rv.to_string().into());
    }
}

/// One newline-terminated watch event.
pub(crate) fn event_line(event_type: &str, object_json: &str) -> String {
    format!("{{\"type\":\"{event_type}\",\"object\":{object_json}}}\n")
}

/// The opaque continue token: where the previous page ended and the list's
/// resourceVersion.
#[derive(Debug, PartialEq, Eq)]
struct ContinueToken {
    kind: ResourceKind,
    namespace: Option<String>,
    rv: u64,
    after: Key,
}

impl ContinueToken {
    fn encode(&self) -> String {
        let v = json!({
            "k": self.kind.short(),
            "ns": self.namespace,
            "rv": self.rv,
            "a": [self.after.0, self.after.1],
        });
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn decode(s: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()?;
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        let kind = ResourceKind::from_short(v.get("k")?.as_str()?)?;
        let namespace = match v.get("ns")? {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            _ => return None,
        };
        let rv = v.get("rv")?.as_u64()?;
        let a = v.get("a")?.as_array()?;
        let after = (
            a.first()?.as_str()?.to_string(),
            a.get(1)?.as_str()?.to_string(),
        );
        Some(ContinueToken {
            kind,
            namespace,
            rv,
            after,
        })
    }
}

/// The current time as an RFC 3339 UTC timestamp with second precision.
pub(crate) fn rfc3339_now() -> String {
    rfc3339(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    )
}

fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::new(100, broadcast::channel(16).0, String::new())
    }

    fn svc(name: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns", "labels": labels}, "spec": {}})
    }

    fn filter(labels: &str) -> Filter {
        Filter {
            kind: ResourceKind::Service,
            namespace: None,
            labels: LabelSelector::parse(labels).unwrap(),
            fields: FieldSelector::default(),
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn label_selectors() {
        let o = svc("a", json!({"app": "web", "tier": "front"}));
        assert!(LabelSelector::parse("app=web").unwrap().matches(&o));
        assert!(
            LabelSelector::parse("app==web,tier=front")
                .unwrap()
                .matches(&o)
        );
        assert!(
            !LabelSelector::parse("app=web,tier=back")
                .unwrap()
                .matches(&o)
        );
        assert!(LabelSelector::parse("app!=db,tier").unwrap().matches(&o));
        assert!(!LabelSelector::parse("!tier").unwrap().matches(&o));
        assert!(LabelSelector::parse("").unwrap().matches(&o));
        assert!(LabelSelector::parse("app in (web)").is_err());
    }

    #[test]
    fn field_selectors_apply_name_and_ignore_the_rest() {
        let o = svc("a", json!({}));
        assert!(FieldSelector::parse("metadata.name=a").matches(&o));
        assert!(!FieldSelector::parse("metadata.name=b").matches(&o));
        assert!(FieldSelector::parse("spec.type=ClusterIP").matches(&o));
    }

    #[test]
    fn apply_is_idempotent_and_keeps_uid() {
        let mut s = store();
        let rv1 = s.apply(ResourceKind::Service, svc("a", json!({}))).unwrap();
        let uid = s.get(ResourceKind::Service, "ns", "a").unwrap()["metadata"]["uid"].clone();
        assert_eq!(
            s.apply(ResourceKind::Service, svc("a", json!({}))).unwrap(),
            rv1
        );
        let rv2 = s
            .apply(ResourceKind::Service, svc("a", json!({"x": "y"})))
            .unwrap();
        assert!(rv2 > rv1);
        let obj = s.get(ResourceKind::Service, "ns", "a").unwrap();
        assert_eq!(obj["metadata"]["uid"], uid);
        assert_eq!(obj["metadata"]["resourceVersion"], rv2.to_string());
        assert!(
            s.apply(ResourceKind::Service, json!({"metadata": {}}))
                .is_err()
        );
    }

    #[test]
    fn paging_and_tokens() {
        let mut s = store();
        for i in 0..7 {
            s.apply(ResourceKind::Service, svc(&format!("s{i}"), json!({})))
                .unwrap();
        }
        let f = filter("");
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = s.list(&f, 3, token.as_deref()).unwrap();
            pages += 1;
            for item in page["items"].as_array().unwrap() {
                assert!(item.get("kind").is_none());
                names.push(item["metadata"]["name"].as_str().unwrap().to_string());
            }
            assert_eq!(page["metadata"]["resourceVersion"], "8");
            match page["metadata"]["continue"].as_str() {
                Some(t) => token = Some(t.to_string()),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(names.len(), 7);
        assert!(s.list(&f, 3, Some("garbage")).is_err());
        let first = s.list(&f, 3, None).unwrap();
        let tok = first["metadata"]["continue"].as_str().unwrap().to_string();
        s.expire_history();
        assert!(s.list(&f, 3, Some(&tok)).is_err());
    }

    #[test]
    fn selector_transitions_in_watch_events() {
        let mut s = store();
        s.apply(ResourceKind::Service, svc("a", json!({"app": "x"})))
            .unwrap();
        s.apply(ResourceKind::Service, svc("a", json!({"app": "y"})))
            .unwrap();
        s.apply(ResourceKind::Service, svc("a", json!({"app": "x"})))
            .unwrap();
        let (_rx, start) = s.start_watch(&filter("app=x"), Some(1));
        let WatchStart::Replay { lines, .. } = start else {
            panic!("expired")
        };
        let types: Vec<String> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(types, ["ADDED", "DELETED", "ADDED"]);
    }

    #[test]
    fn history_bound_expires_old_watches() {
        let mut s = Store::new(2, broadcast::channel(16).0, String::new());
        for i in 0..4 {
            s.apply(ResourceKind::Service, svc(&format!("s{i}"), json!({})))
                .unwrap();
        }
        // rv is now 5; history holds rv 4 and 5.
        assert!(matches!(
            s.start_watch(&filter(""), Some(2)).1,
            WatchStart::Expired { .. }
        ));
        assert!(
            matches!(s.start_watch(&filter(""), Some(3)).1, WatchStart::Replay { ref lines, .. } if lines.len() == 2)
        );
    }

    #[test]
    fn removing_a_crd_deletes_its_objects_and_ends_its_watches() {
        let (bus, mut rx) = broadcast::channel(16);
        let mut s = Store::new(100, bus, String::new());
        let export = json!({"metadata": {"name": "web", "namespace": "ns"}});
        s.apply(ResourceKind::ServiceExport, export.clone())
            .unwrap();
        s.apply(ResourceKind::Service, svc("web", json!({})))
            .unwrap();
        assert!(!s.set_installed(ResourceKind::Service, false), "built-in");
        assert!(s.set_installed(ResourceKind::ServiceExport, false));
        assert!(!s.is_installed(ResourceKind::ServiceExport));
        assert_eq!(s.count(ResourceKind::ServiceExport), 0);
        assert_eq!(s.count(ResourceKind::Service), 1);
        let mut seen = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            seen.push(match msg {
                Bus::Change(c) => format!("{:?} {}", c.op, c.kind.kind()),
                Bus::Removed(k) => format!("removed {}", k.kind()),
                Bus::Expired => "expired".into(),
            });
        }
        assert_eq!(
            seen,
            [
                "Added ServiceExport",
                "Added Service",
                "Deleted ServiceExport",
                "removed ServiceExport"
            ]
        );
        assert!(
            s.apply(ResourceKind::ServiceExport, export.clone())
                .is_err()
        );
        assert!(s.set_installed(ResourceKind::ServiceExport, true));
        s.apply(ResourceKind::ServiceExport, export).unwrap();
        assert_eq!(s.count(ResourceKind::ServiceExport), 1);
    }

    fn drain(rx: &mut broadcast::Receiver<Bus>) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            if let Bus::Change(c) = msg {
                let name = c.object["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                seen.push(format!("{:?} {} {name}", c.op, c.kind.kind()));
            }
        }
        seen
    }

    fn token_secret(name: &str, sa: &str) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "ns",
                         "annotations": {SA_NAME_ANNOTATION: sa}},
            "type": SA_TOKEN_TYPE,
        })
    }

    fn account(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns"}})
    }

    #[test]
    fn json_merge_patch_follows_rfc_7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1]});
        json_merge_patch(
            &mut target,
            &json!({"a": "z", "c": {"f": null}, "l": [2], "n": {"x": 1}}),
        );
        assert_eq!(
            target,
            json!({"a": "z", "c": {"d": "e"}, "l": [2], "n": {"x": 1}})
        );
        json_merge_patch(&mut target, &json!(["whole"]));
        assert_eq!(target, json!(["whole"]));
    }

    #[test]
    fn server_side_apply_merges_metadata_and_replaces_fields() {
        let mut s = store();
        let patch = |labels: Value, data: Value| {
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "a", "labels": labels}, "data": data})
        };
        let (_, created) = s
            .server_side_apply(
                ResourceKind::Secret,
                "ns",
                "a",
                patch(json!({"x": "1"}), json!({"k": "dg=="})),
                "ferry",
            )
            .unwrap();
        assert!(created);
        let (obj, created) = s
            .server_side_apply(
                ResourceKind::Secret,
                "ns",
                "a",
                patch(json!({"y": "2"}), json!({"j": "dg=="})),
                "ferry",
            )
            .unwrap();
        assert!(!created);
        assert_eq!(obj["metadata"]["labels"], json!({"x": "1", "y": "2"}));
        assert_eq!(obj["data"], json!({"j": "dg=="}));
        assert_eq!(obj["type"], "Opaque");
        let rv = s.resource_version();
        let (again, _) = s
            .server_side_apply(
                ResourceKind::Secret,
                "ns",
                "a",
                patch(json!({"y": "2"}), json!({"j": "dg=="})),
                "ferry",
            )
            .unwrap();
        assert_eq!((s.resource_version(), again), (rv, obj));
        // A stale resourceVersion in the patch conflicts.
        let mut stale = patch(json!({"y": "3"}), json!({}));
        stale["metadata"]["resourceVersion"] = "1".into();
        assert_eq!(
            s.server_side_apply(ResourceKind::Secret, "ns", "a", stale, "ferry"),
            Err(WriteError::Conflict)
        );
        // No kind: refused; another name than the URL's: refused.
        let bare = json!({"metadata": {"name": "a"}});
        assert!(
            s.server_side_apply(ResourceKind::Secret, "ns", "a", bare, "ferry")
                .is_err()
        );
        assert!(
            s.server_side_apply(
                ResourceKind::Secret,
                "ns",
                "b",
                patch(json!({}), json!({})),
                "ferry"
            )
            .is_err()
        );
    }

    #[test]
    fn cluster_scoped_objects_have_no_namespace() {
        let mut s = store();
        let role = json!({"metadata": {"name": "r", "namespace": "ignored"}, "rules": []});
        s.apply(ResourceKind::ClusterRole, role).unwrap();
        let stored = s.get(ResourceKind::ClusterRole, "", "r").unwrap();
        assert!(stored["metadata"].get("namespace").is_none());
        assert_eq!(stored["apiVersion"], "rbac.authorization.k8s.io/v1");
        assert!(s.delete(ResourceKind::ClusterRole, "", "r"));
    }

    #[test]
    fn the_token_controller_mints_keeps_and_revokes() {
        let (bus, mut rx) = broadcast::channel(64);
        let mut s = Store::new(100, bus, "CA".into());
        // The Secret first: nothing to fill until its account exists.
        s.apply(ResourceKind::Secret, token_secret("t", "sa"))
            .unwrap();
        assert_eq!(s.token_for("ns", "sa"), None);
        s.apply(ResourceKind::ServiceAccount, account("sa"))
            .unwrap();
        let token = s.token_for("ns", "sa").unwrap();
        assert_eq!(s.token_user(&token), Some(("ns".into(), "sa".into())));
        let secret = s.get(ResourceKind::Secret, "ns", "t").unwrap();
        assert_eq!(secret["data"]["token"], STANDARD.encode(&token));
        assert_eq!(secret["data"]["ca.crt"], STANDARD.encode("CA"));
        assert_eq!(secret["data"]["namespace"], STANDARD.encode("ns"));
        assert_eq!(
            drain(&mut rx),
            [
                "Added Secret t",
                "Added ServiceAccount sa",
                "Modified Secret t"
            ]
        );
        // A full replace that drops the data gets it back, same token.
        s.apply(ResourceKind::Secret, token_secret("t", "sa"))
            .unwrap();
        assert_eq!(s.token_for("ns", "sa"), Some(token.clone()));
        assert_eq!(
            s.get(ResourceKind::Secret, "ns", "t").unwrap()["data"]["token"],
            STANDARD.encode(&token)
        );
        // Deleting the account deletes its token Secrets and the token.
        drain(&mut rx);
        assert!(s.delete(ResourceKind::ServiceAccount, "ns", "sa"));
        assert_eq!(
            drain(&mut rx),
            ["Deleted ServiceAccount sa", "Deleted Secret t"]
        );
        assert_eq!(s.token_user(&token), None);
        // A new Secret for a new account: a new token.
        s.apply(ResourceKind::ServiceAccount, account("sa"))
            .unwrap();
        s.apply(ResourceKind::Secret, token_secret("t", "sa"))
            .unwrap();
        let rotated = s.token_for("ns", "sa").unwrap();
        assert_ne!(rotated, token);
        // An Opaque Secret is never filled.
        s.apply(
            ResourceKind::Secret,
            json!({"metadata": {"name": "o", "namespace": "ns"}}),
        )
        .unwrap();
        assert!(
            s.get(ResourceKind::Secret, "ns", "o")
                .unwrap()
                .get("data")
                .is_none()
        );
    }

    #[test]
    fn deleting_a_namespace_deletes_its_objects_first() {
        let (bus, mut rx) = broadcast::channel(64);
        let mut s = Store::new(100, bus, String::new());
        s.apply(ResourceKind::Namespace, json!({"metadata": {"name": "ns"}}))
            .unwrap();
        s.apply(ResourceKind::Service, svc("web", json!({})))
            .unwrap();
        s.apply(ResourceKind::ServiceAccount, account("sa"))
            .unwrap();
        s.apply(ResourceKind::Secret, token_secret("t", "sa"))
            .unwrap();
        let other = json!({"metadata": {"name": "web", "namespace": "other"}});
        s.apply(ResourceKind::Service, other).unwrap();
        drain(&mut rx);
        let gone = s.remove(ResourceKind::Namespace, "", "ns").unwrap();
        assert_eq!(
            gone["metadata"]["resourceVersion"],
            s.resource_version().to_string()
        );
        assert_eq!(
            drain(&mut rx),
            [
                "Deleted Service web",
                "Deleted ServiceAccount sa",
                "Deleted Secret t",
                "Deleted Namespace ns"
            ]
        );
        assert_eq!(s.count(ResourceKind::Service), 1);
        assert_eq!(s.token_for("ns", "sa"), None);
        assert!(s.remove(ResourceKind::Namespace, "", "ns").is_none());
    }

    #[test]
    fn creates_and_replaces_check_the_request() {
        let mut s = store();
        let secret = json!({"metadata": {"name": "a"}});
        s.create(ResourceKind::Secret, "ns", secret.clone(), "t")
            .unwrap();
        assert_eq!(
            s.create(ResourceKind::Secret, "ns", secret.clone(), "t"),
            Err(WriteError::AlreadyExists)
        );
        let elsewhere = json!({"metadata": {"name": "b", "namespace": "x"}});
        assert!(matches!(
            s.create(ResourceKind::Secret, "ns", elsewhere, "t"),
            Err(WriteError::BadRequest(_))
        ));
        assert!(matches!(
            s.create(ResourceKind::Secret, "ns", json!({"metadata": {}}), "t"),
            Err(WriteError::Invalid(_))
        ));
        let wrong = json!({"apiVersion": "v2", "metadata": {"name": "c"}});
        assert!(matches!(
            s.create(ResourceKind::Secret, "ns", wrong, "t"),
            Err(WriteError::BadRequest(_))
        ));
        assert_eq!(
            s.replace(ResourceKind::Secret, "ns", "zz", secret.clone(), "t"),
            Err(WriteError::BadRequest(
                "the name of the object (a) does not match the name on the URL (zz)".into()
            ))
        );
        assert_eq!(
            s.replace(ResourceKind::Secret, "ns", "b", json!({}), "t"),
            Err(WriteError::NotFound)
        );
        let stale = json!({"metadata": {"name": "a", "resourceVersion": "1"}});
        assert_eq!(
            s.replace(ResourceKind::Secret, "ns", "a", stale, "t"),
            Err(WriteError::Conflict)
        );
        assert_eq!(
            s.merge_patch(ResourceKind::Secret, "ns", "b", &json!({}), "t"),
            Err(WriteError::NotFound)
        );
        let moved = json!({"metadata": {"namespace": "x"}});
        assert!(
            s.merge_patch(ResourceKind::Secret, "ns", "a", &moved, "t")
                .is_err()
        );
    }

    fn deployment(name: &str, replicas: Option<i32>) -> Value {
        let mut spec = json!({"selector": {"matchLabels": {"app": name}}});
        if let Some(n) = replicas {
            spec["replicas"] = n.into();
        }
        json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec})
    }

    #[test]
    fn the_workload_controller_reports_replicas_up_to_the_limit() {
        let (bus, mut rx) = broadcast::channel(64);
        let mut s = Store::new(100, bus, String::new());
        s.apply(ResourceKind::Deployment, deployment("web", None))
            .unwrap();
        assert_eq!(
            drain(&mut rx),
            ["Added Deployment web", "Modified Deployment web"]
        );
        let web = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
        assert_eq!(web["spec"]["replicas"], 1);
        assert_eq!(web["metadata"]["generation"], 1);
        assert_eq!(
            web["status"],
            json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
                   "readyReplicas": 1, "availableReplicas": 1})
        );
        // A limit set first holds back a later scale-up.
        s.set_available_limit("ns", "web", Some(2));
        assert!(drain(&mut rx).is_empty(), "one replica is within the limit");
        s.apply(ResourceKind::Deployment, deployment("web", Some(5)))
            .unwrap();
        let web = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
        assert_eq!(web["metadata"]["generation"], 2);
        assert_eq!(
            web["status"],
            json!({"observedGeneration": 2, "replicas": 5, "updatedReplicas": 5,
                   "readyReplicas": 2, "availableReplicas": 2, "unavailableReplicas": 3})
        );
        // A client cannot write the status.
        let mut forged = deployment("web", Some(5));
        forged["status"] = json!({"availableReplicas": 5});
        drain(&mut rx);
        s.apply(ResourceKind::Deployment, forged).unwrap();
        assert!(drain(&mut rx).is_empty(), "a no-op");
        s.set_available_limit("ns", "web", None);
        assert_eq!(drain(&mut rx), ["Modified Deployment web"]);
        let web = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
        assert_eq!(web["status"]["availableReplicas"], 5);
        // Scale to zero: the Scale, the generation and a status of zeros
        // left out.
        let scale = s
            .set_scale(
                ResourceKind::Deployment,
                "ns",
                "web",
                &json!({"spec": {"replicas": 0}}),
                "ferry",
                Operation::Update,
            )
            .unwrap();
        assert_eq!(scale["spec"], json!({}));
        assert_eq!(scale["status"]["selector"], "app=web");
        let web = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
        assert_eq!(web["metadata"]["generation"], 3);
        assert_eq!(web["status"], json!({"observedGeneration": 3}));
        assert_eq!(
            s.set_scale(
                ResourceKind::Deployment,
                "ns",
                "web",
                &json!({"spec": {"replicas": -1}}),
                "ferry",
                Operation::Update
            ),
            Err(WriteError::Invalid(
                "spec.replicas: Invalid value: -1: must be greater than or equal to 0".into()
            ))
        );
        let stale = json!({"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 1}});
        assert_eq!(
            s.set_scale(
                ResourceKind::Deployment,
                "ns",
                "web",
                &stale,
                "ferry",
                Operation::Update
            ),
            Err(WriteError::Conflict)
        );
        // A StatefulSet reports its zeros.
        s.set_available_limit("ns", "db", Some(0));
        s.apply(ResourceKind::StatefulSet, deployment("db", Some(2)))
            .unwrap();
        let db = s.get(ResourceKind::StatefulSet, "ns", "db").unwrap();
        assert_eq!(
            db["status"],
            json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                   "currentReplicas": 2, "availableReplicas": 0})
        );
        assert_eq!(
            s.get_scale(ResourceKind::StatefulSet, "ns", "db").unwrap()["status"],
            json!({"replicas": 2, "selector": "app=db"})
        );
        assert!(s.get_scale(ResourceKind::Service, "ns", "db").is_none());
    }

    #[test]
    fn writes_record_their_field_managers() {
        let mut s = store();
        let patch = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                           "metadata": {"name": "web", "labels": {"a": "b"}},
                           "spec": {"replicas": 2}});
        s.server_side_apply(ResourceKind::Deployment, "ns", "web", patch, "ferry")
            .unwrap();
        let merge = json!({"metadata": {"annotations": {"x": "y"}}});
        s.merge_patch(ResourceKind::Deployment, "ns", "web", &merge, "kubectl")
            .unwrap();
        let web = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
        let entries = web["metadata"]["managedFields"].as_array().unwrap();
        let summary: Vec<(&str, &str, Option<&str>)> = entries
            .iter()
            .map(|e| {
                assert_eq!(e["fieldsType"], "FieldsV1");
                assert_eq!(e["apiVersion"], "apps/v1");
                assert!(e["time"].as_str().unwrap().ends_with('Z'));
                (
                    e["manager"].as_str().unwrap(),
                    e["operation"].as_str().unwrap(),
                    e["subresource"].as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("ferry", "Apply", None),
                ("kube-controller-manager", "Update", Some("status")),
                ("kubectl", "Update", None),
            ]
        );
        assert_eq!(
            entries[0]["fieldsV1"],
            json!({"f:metadata": {"f:labels": {"f:a": {}}}, "f:spec": {"f:replicas": {}}})
        );
        assert_eq!(
            entries[2]["fieldsV1"],
            json!({"f:metadata": {"f:annotations": {"f:x": {}}}})
        );
        assert_eq!(web["metadata"]["generation"], 1, "metadata only");
        // A client's managedFields are ignored.
        let mut forged = web.clone();
        forged["metadata"]["managedFields"] = json!([]);
        s.replace(ResourceKind::Deployment, "ns", "web", forged, "kubectl")
            .unwrap();
        let again = s.get(ResourceKind::Deployment, "ns", "web").unwrap();
        assert_eq!(
            again["metadata"]["managedFields"].as_array().unwrap().len(),
            3
        );
    }

    #[test]
    fn services_get_a_cluster_ip_that_stays() {
        let mut a = store();
        let mut b = store();
        let bare = json!({"metadata": {"name": "web", "namespace": "ns"},
                          "spec": {"ports": [{"port": 80}]}});
        a.apply(ResourceKind::Service, bare.clone()).unwrap();
        b.apply(ResourceKind::Service, bare.clone()).unwrap();
        let ip_of = |s: &Store| {
            let svc = s.get(ResourceKind::Service, "ns", "web").unwrap();
            assert_eq!(svc["spec"]["clusterIPs"], json!([svc["spec"]["clusterIP"]]));
            assert_eq!(svc["spec"]["type"], "ClusterIP");
            svc["spec"]["clusterIP"].as_str().unwrap().to_owned()
        };
        let ip = ip_of(&a);
        let [first, second, ..] = ip.split('.').collect::<Vec<_>>()[..] else {
            panic!("{ip}")
        };
        assert_eq!(first, "10");
        assert!((96..112).contains(&second.parse::<u8>().unwrap()), "{ip}");
        assert_ne!(ip, ip_of(&b), "two clusters allocate apart");
        // Applying again without an IP keeps it; a second Service gets
        // another one.
        let rv = a.resource_version();
        a.apply(ResourceKind::Service, bare.clone()).unwrap();
        assert_eq!((a.resource_version(), ip_of(&a)), (rv, ip.clone()));
        let mut other = bare.clone();
        other["metadata"]["name"] = "api".into();
        a.apply(ResourceKind::Service, other).unwrap();
        let api = a.get(ResourceKind::Service, "ns", "api").unwrap();
        assert_ne!(api["spec"]["clusterIP"], ip.as_str());
        // Headless and ExternalName Services keep what they are.
        let headless = json!({"metadata": {"name": "h", "namespace": "ns"},
                              "spec": {"clusterIP": "None"}});
        a.apply(ResourceKind::Service, headless).unwrap();
        let h = a.get(ResourceKind::Service, "ns", "h").unwrap();
        assert_eq!(h["spec"]["clusterIPs"], json!(["None"]));
        let external = json!({"metadata": {"name": "e", "namespace": "ns"},
                              "spec": {"type": "ExternalName", "externalName": "example.com"}});
        a.apply(ResourceKind::Service, external).unwrap();
        let e = a.get(ResourceKind::Service, "ns", "e").unwrap();
        assert!(e["spec"].get("clusterIP").is_none());
    }

    #[test]
    fn continue_tokens_name_their_kind() {
        for kind in ResourceKind::ALL {
            let t = ContinueToken {
                kind,
                namespace: Some("ns".into()),
                rv: 3,
                after: ("ns".into(), "a".into()),
            };
            assert_eq!(ContinueToken::decode(&t.encode()), Some(t));
            assert_eq!(ResourceKind::from_kind(kind.kind()), Some(kind));
        }
    }
}
