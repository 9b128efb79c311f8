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

mod controllers;
mod merge;
mod selectors;

use self::controllers::*;
pub(crate) use self::merge::json_merge_patch;
use self::merge::*;
pub(crate) use self::selectors::{FieldSelector, Filter, LabelSelector};

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
mod tests;
