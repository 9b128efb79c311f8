//! The xDS protocol state of one ADS stream, for both variants.
//!
//! Per resource type a [`TypeState`] holds the client's subscription, what
//! the client is known to hold, the latest nonce sent and the ACK/NACK
//! record. What the client holds is kept compactly as a *base* snapshot
//! (the client has every subscribed resource as it was there) plus a few
//! exceptions, so ten thousand clients do not each keep a map of every
//! resource.
//!
//! What a stream is served depends on its client's kind
//! ([`ClientKind`]): proxies get the one HTTP listener and its routes,
//! proxyless gRPC clients a listener per target (the snapshot's gRPC view),
//! under the same protocol rules. The kind is settled by the node's user
//! agent or, failing that, by the first request.
//!
//! Protocol rules kept here:
//! - a request whose `response_nonce` is not the latest sent for its type
//!   is stale and is not an ACK or NACK;
//! - a client that holds every resource it subscribes to, as a snapshot
//!   serves them, has that snapshot's version of the type acknowledged, even
//!   when the snapshot changed only resources it does not subscribe to;
//! - a NACK (`error_detail` set) is recorded and counted, and the rejected
//!   content is not sent again: the client stays on its last good config
//!   until resources change again;
//! - updates go out in make-before-break order (CDS, EDS, LDS, RDS), and a
//!   removed cluster is withdrawn only once the client has ACKed routes
//!   that no longer use it;
//! - SotW sends full state for listeners and clusters, requested names for
//!   routes and endpoints; delta sends only changes, `removed_resources`
//!   for deletions and for subscribed names that do not exist, and honours
//!   `initial_resource_versions`.
//!
//! Limits kept here, each refusing the request with a [`Refusal`] that
//! ends the stream: a node id of at most [`MAX_NODE_ID_BYTES`], and at most
//! [`Limits::max_names`] resource names held by one stream over all types
//! (subscriptions plus the versions a delta client says it has). NACK
//! messages are kept to [`MAX_NACK_MESSAGE_BYTES`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ferry_discovery::untrusted::{Escaped, clip};
use ferry_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use xxhash_rust::xxh3::Xxh3;

use crate::client_kind::ClientKind;
use crate::resources::{Resource, ResourceType};
use crate::snapshot::Snapshot;
use crate::status::{ClientStatus, NackRecord, TypeStatus};
use crate::wire::{DeltaReply, SotwReply};

/// The longest node id accepted.
pub const MAX_NODE_ID_BYTES: usize = 256;

/// How much of a NACK's message is kept and logged.
pub const MAX_NACK_MESSAGE_BYTES: usize = 1024;

/// Per-stream limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Resource names one stream may hold over all types.
    pub max_names: usize,
    /// The most resource bytes one delta response carries: a larger update
    /// (a client's initial config at fleet scale) goes as several responses
    /// of one type, so no client or server buffer grows to the whole config.
    pub max_response_bytes: usize,
}

/// [`Limits::max_response_bytes`] by default.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_names: 100_000,
            max_response_bytes: MAX_RESPONSE_BYTES,
        }
    }
}

/// A request that ends its stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("node.id is {len} bytes, more than the {MAX_NODE_ID_BYTES} accepted")]
    NodeIdTooLong { len: usize },
    #[error(
        "the stream would hold {names} resource names, more than the {limit} one stream may (--xds-max-names)"
    )]
    TooManyNames { names: usize, limit: usize },
}

impl Refusal {
    /// The metric label of the refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NodeIdTooLong { .. } => "node_id_too_long",
            Self::TooManyNames { .. } => "too_many_names",
        }
    }

    /// The gRPC status that ends the stream.
    pub fn status(&self) -> tonic::Status {
        match self {
            Self::NodeIdTooLong { .. } => tonic::Status::invalid_argument(self.to_string()),
            Self::TooManyNames { .. } => tonic::Status::resource_exhausted(self.to_string()),
        }
    }
}

/// Which ADS RPC a stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    Sotw,
    Delta,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sotw => "sotw",
            Self::Delta => "delta",
        }
    }
}

/// Protocol state of one ADS stream.
#[derive(Debug)]
pub struct Session {
    id: u64,
    variant: Variant,
    types: [TypeState; ResourceType::COUNT],
    next_nonce: u64,
    node_id: String,
    node_cluster: String,
    /// What the client is, once its node or first request has said.
    client: Option<ClientKind>,
    last_pushed_snapshot: u64,
    limits: Limits,
    status: Arc<Mutex<ClientStatus>>,
}

/// Records a NACK of `kind`'s latest update.
fn record_nack(
    st: &mut TypeState,
    node: &str,
    kind: ResourceType,
    version_info: &str,
    err: &ferry_proto::google::rpc::Status,
) {
    st.nacks += 1;
    let record = NackRecord {
        rejected_version: st.sent_version.clone().unwrap_or_default(),
        kept_version: clip(version_info, MAX_NACK_MESSAGE_BYTES).into_owned(),
        message: clip(&err.message, MAX_NACK_MESSAGE_BYTES).into_owned(),
        at: SystemTime::now(),
    };
    tracing::warn!(
        node = %Escaped(node), r#type = kind.short(), rejected = %record.rejected_version,
        message = %Escaped(&record.message), "xds client rejected (NACK) an update; it keeps its last good config"
    );
    metrics::counter!("ferry_xds_nacks_total", "type" => kind.short()).increment(1);
    st.last_nack = Some(record);
}

/// `resources` in runs whose encoded entries add up to at most `limit`
/// bytes (a larger one alone); always at least one run, maybe empty.
fn split_by_size(resources: Vec<Arc<Resource>>, limit: usize) -> Vec<Vec<Arc<Resource>>> {
    let mut parts = vec![Vec::new()];
    let mut size = 0;
    for r in resources {
        let len = r.delta_entry().len();
        if size + len > limit && parts.last().is_some_and(|p| !p.is_empty()) {
            parts.push(Vec::new());
            size = 0;
        }
        size += len;
        if let Some(part) = parts.last_mut() {
            part.push(r);
        }
    }
    parts
}

fn type_of(url: &str) -> Option<ResourceType> {
    let kind = ResourceType::from_type_url(url);
    if kind.is_none() {
        tracing::debug!(
            type_url = url,
            "request for a type Ferry does not serve; ignored"
        );
    }
    kind
}

impl Session {
    pub fn new(id: u64, variant: Variant, status: Arc<Mutex<ClientStatus>>) -> Self {
        Self {
            id,
            variant,
            types: Default::default(),
            next_nonce: 0,
            node_id: String::new(),
            node_cluster: String::new(),
            client: None,
            last_pushed_snapshot: 0,
            limits: Limits::default(),
            status,
        }
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Names this stream holds over all types: per type, its subscribed
    /// names or its exceptions (mostly the same names), whichever are more.
    fn names_held(&self) -> usize {
        self.types.iter().map(TypeState::names_held).sum()
    }

    fn check_names(&self, names: usize) -> Result<(), Refusal> {
        if names > self.limits.max_names {
            return Err(Refusal::TooManyNames {
                names,
                limit: self.limits.max_names,
            });
        }
        Ok(())
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn node_cluster(&self) -> &str {
        &self.node_cluster
    }

    /// What this stream's client is served: proxy resources until it has
    /// said otherwise.
    pub fn client_kind(&self) -> ClientKind {
        self.client.unwrap_or_default()
    }

    /// Settles what the client is on its first typed request, if its node
    /// did not say.
    fn note_first_request<S: AsRef<str>>(&mut self, kind: ResourceType, names: &[S]) {
        if self.client.is_none() {
            let client = ClientKind::from_first_request(kind, names);
            tracing::info!(stream = self.id, node = %Escaped(&self.node_id), client = client.as_str(), "xds client kind told by its first subscription");
            self.client = Some(client);
        }
    }

    fn note_node(
        &mut self,
        node: Option<&ferry_proto::envoy::config::core::v3::Node>,
    ) -> Result<(), Refusal> {
        if let Some(node) = node
            && self.node_id.is_empty()
        {
            if node.id.len() > MAX_NODE_ID_BYTES || node.cluster.len() > MAX_NODE_ID_BYTES {
                return Err(Refusal::NodeIdTooLong {
                    len: node.id.len().max(node.cluster.len()),
                });
            }
            self.node_id = node.id.clone();
            self.node_cluster = node.cluster.clone();
            if self.client.is_none() {
                self.client = ClientKind::from_node(node);
            }
            tracing::info!(
                stream = self.id, node = %Escaped(&node.id), variant = self.variant.as_str(),
                user_agent = %Escaped(clip(&node.user_agent_name, MAX_NODE_ID_BYTES).as_ref()),
                client = self.client.map_or("undecided", ClientKind::as_str),
                "xds client identified"
            );
        }
        Ok(())
    }

    /// Handles the ACK/NACK part of a request. Returns false for a stale
    /// request (not answering the latest nonce of its type).
    fn acknowledge(
        &mut self,
        kind: ResourceType,
        nonce: &str,
        version_info: &str,
        error: Option<&ferry_proto::google::rpc::Status>,
    ) -> bool {
        let node = self.node_id.clone();
        let st = &mut self.types[kind.index()];
        if nonce.is_empty() {
            return true;
        }
        if st.nonce.as_deref() != Some(nonce) {
            if st.in_batch(nonce) {
                // An earlier part of an update sent in several responses:
                // its ACK is the last part's, but a NACK counts.
                if let Some(err) = error {
                    record_nack(st, &node, kind, version_info, err);
                }
                return false;
            }
            if st.nonce.is_some() {
                metrics::counter!("ferry_xds_stale_requests_total", "type" => kind.short())
                    .increment(1);
                return false;
            }
            // A nonce from an earlier stream: treat as a fresh request.
            return true;
        }
        st.awaiting_ack = false;
        match error {
            Some(err) => record_nack(st, &node, kind, version_info, err),
            None => {
                st.acked_version = st.sent_version.clone();
                st.acked_snapshot = st.sent_snapshot;
                if self.variant == Variant::Sotw && !version_info.is_empty() {
                    st.acked_version = Some(version_info.to_owned());
                }
            }
        }
        true
    }

    /// Applies a state-of-the-world request.
    pub fn on_sotw_request(&mut self, req: &DiscoveryRequest) -> Result<(), Refusal> {
        self.note_node(req.node.as_ref())?;
        let Some(kind) = type_of(&req.type_url) else {
            return Ok(());
        };
        self.note_first_request(kind, &req.resource_names);
        let held = self.names_held() - self.types[kind.index()].names_held();
        self.check_names(held + req.resource_names.len())?;
        if !self.acknowledge(
            kind,
            &req.response_nonce,
            &req.version_info,
            req.error_detail.as_ref(),
        ) {
            return Ok(());
        }
        let st = &mut self.types[kind.index()];
        let wildcard = req.resource_names.iter().any(|n| n == "*")
            || (kind.is_full_state()
                && req.resource_names.is_empty()
                && (!st.started || st.sub.wildcard));
        let names: BTreeSet<String> = req
            .resource_names
            .iter()
            .filter(|n| *n != "*")
            .cloned()
            .collect();
        let gained =
            (wildcard && !st.sub.wildcard) || names.iter().any(|n| !st.sub.names.contains(n));
        for lost in st.sub.names.difference(&names) {
            st.exceptions.remove(lost);
        }
        for new in names.iter().filter(|n| !st.sub.wants(n)) {
            st.exceptions.insert(new.clone(), Known::Missing);
        }
        if wildcard && !st.sub.wildcard {
            // Everything not explicitly known is new to the client.
            st.base = None;
        }
        st.sub = Subscription { wildcard, names };
        if !st.started || gained {
            st.force_response = true;
        }
        st.started = true;
        Ok(())
    }

    /// Applies a delta request.
    pub fn on_delta_request(&mut self, req: &DeltaDiscoveryRequest) -> Result<(), Refusal> {
        self.note_node(req.node.as_ref())?;
        let Some(kind) = type_of(&req.type_url) else {
            return Ok(());
        };
        self.note_first_request(kind, &req.resource_names_subscribe);
        let initial = if self.types[kind.index()].started {
            0
        } else {
            req.initial_resource_versions.len()
        };
        self.check_names(self.names_held() + req.resource_names_subscribe.len() + initial)?;
        // Subscription changes apply even on a stale nonce: delta
        // subscriptions are incremental and would otherwise be lost.
        self.acknowledge(kind, &req.response_nonce, "", req.error_detail.as_ref());
        let st = &mut self.types[kind.index()];
        if !st.started {
            st.started = true;
            st.force_response = true;
            if req.resource_names_subscribe.is_empty() {
                st.sub.wildcard = true;
            }
            for (name, version) in &req.initial_resource_versions {
                st.exceptions
                    .insert(name.clone(), Known::Version(version.clone()));
            }
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                if !st.sub.wildcard {
                    st.sub.wildcard = true;
                    st.base = None;
                }
                continue;
            }
            if st.sub.names.insert(name.clone())
                && !st.exceptions.contains_key(name)
                && !st.sub.wildcard
            {
                st.exceptions.insert(name.clone(), Known::Missing);
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                st.sub.wildcard = false;
                continue;
            }
            st.sub.names.remove(name);
            st.exceptions.remove(name);
        }
        Ok(())
    }

    /// Whether the client might still route to a cluster that is gone:
    /// routes are unsent or unacknowledged.
    fn routes_unsettled(&self, snapshot: &Snapshot) -> bool {
        let kind = ResourceType::Route;
        let client = self.client_kind();
        let routes = &self.types[kind.index()];
        if !routes.started {
            return false;
        }
        let current = snapshot.served(client, kind);
        routes.awaiting_ack
            || routes.candidates(kind, client, snapshot).iter().any(|n| {
                routes.known(kind, client, n) != current.get(n).map(|r| r.version.as_str())
            })
    }

    fn update_for(&mut self, kind: ResourceType, snapshot: &Arc<Snapshot>) -> Option<Update> {
        // Make before break: a cluster (and its endpoints) stays until the
        // client has ACKed routes that no longer send traffic to it.
        let hold_removals = matches!(kind, ResourceType::Cluster | ResourceType::Endpoint)
            && self.routes_unsettled(snapshot);
        let variant = self.variant;
        let client = self.client_kind();
        let st = &mut self.types[kind.index()];
        if !st.started {
            return None;
        }
        let current = snapshot.served(client, kind);
        let mut update = Update::default();
        let mut exceptions = BTreeMap::new();
        for name in st.candidates(kind, client, snapshot) {
            let known = st.known(kind, client, &name).map(str::to_owned);
            match current.get(&name) {
                Some(r) if st.sub.wants(&name) => {
                    if known.as_deref() != Some(r.version.as_str()) {
                        update.upserts.push(r.clone());
                    }
                }
                Some(_) => {}
                None if known.is_some() && hold_removals => {
                    let held = match st.exceptions.get(&name) {
                        Some(Known::Held(r)) => Some(r.clone()),
                        _ => st
                            .base
                            .as_ref()
                            .and_then(|b| b.served(client, kind).get(&name).cloned()),
                    };
                    if let Some(r) = held {
                        exceptions.insert(name, Known::Held(r));
                    }
                }
                None if known.is_some() => update.removals.push(name),
                None => {
                    let named = st.sub.names.contains(&name);
                    let told = matches!(st.exceptions.get(&name), Some(Known::Absent));
                    if variant == Variant::Delta && named && !told {
                        update.removals.push(name.clone());
                    }
                    if named {
                        exceptions.insert(name, Known::Absent);
                    }
                }
            }
        }
        st.base = Some(snapshot.clone());
        st.exceptions = exceptions;
        let changed = !update.upserts.is_empty() || !update.removals.is_empty();
        if !changed && !st.force_response {
            // Nothing it subscribes to differs from what it acknowledged:
            // the client holds this snapshot's resources of the type.
            if !st.awaiting_ack && st.acked_snapshot >= st.sent_snapshot && st.sent_snapshot > 0 {
                st.acked_snapshot = st.acked_snapshot.max(snapshot.version);
            }
            return None;
        }
        st.force_response = false;
        Some(update)
    }

    /// Records a response of `kind` at `version` as sent, awaiting its
    /// ACK; returns its nonce.
    fn mark_sent(&mut self, kind: ResourceType, version: &str, snapshot: u64) -> String {
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        let st = &mut self.types[kind.index()];
        st.sent_snapshot = snapshot;
        st.nonce = Some(nonce.clone());
        st.awaiting_ack = true;
        st.sent_version = Some(version.to_owned());
        metrics::counter!("ferry_xds_pushes_total", "type" => kind.short(), "variant" => self.variant.as_str())
            .increment(1);
        nonce
    }

    /// The SotW responses due for `snapshot`, in push order.
    pub fn sotw_replies(&mut self, snapshot: &Arc<Snapshot>) -> Vec<SotwReply> {
        if !snapshot.is_ready() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for kind in ResourceType::ALL {
            if self.update_for(kind, snapshot).is_none() {
                continue;
            }
            let st = &self.types[kind.index()];
            let mut view: BTreeMap<&str, &Arc<Resource>> = snapshot
                .served(self.client_kind(), kind)
                .iter()
                .filter(|(n, _)| st.sub.wants(n))
                .map(|(n, r)| (n.as_str(), r))
                .collect();
            for (name, known) in &st.exceptions {
                if let Known::Held(r) = known {
                    view.insert(name.as_str(), r);
                }
            }
            let mut hasher = Xxh3::new();
            for r in view.values() {
                hasher.update(r.name.as_bytes());
                hasher.update(r.version.as_bytes());
            }
            let version = format!("{:016x}", hasher.digest());
            let resources = view.into_values().cloned().collect();
            let nonce = self.mark_sent(kind, &version, snapshot.version);
            out.push(SotwReply {
                version_info: version,
                resources,
                type_url: kind.type_url(),
                nonce,
            });
        }
        self.note_push(snapshot, !out.is_empty());
        out
    }

    /// The delta responses due for `snapshot`, in push order.
    pub fn delta_replies(&mut self, snapshot: &Arc<Snapshot>) -> Vec<DeltaReply> {
        if !snapshot.is_ready() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for kind in ResourceType::ALL {
            let Some(update) = self.update_for(kind, snapshot) else {
                continue;
            };
            let version = snapshot.version.to_string();
            let parts = split_by_size(update.upserts, self.limits.max_response_bytes);
            let last = parts.len() - 1;
            let mut removals = Some(update.removals);
            for (i, upserts) in parts.into_iter().enumerate() {
                let nonce = self.mark_sent(kind, &version, snapshot.version);
                if i == 0 {
                    self.types[kind.index()].batch_start = self.next_nonce;
                }
                out.push(DeltaReply {
                    system_version_info: version.clone(),
                    resources: upserts,
                    // Removals go last: what replaces a resource is sent first.
                    removed_resources: if i == last {
                        removals.take().unwrap_or_default()
                    } else {
                        Vec::new()
                    },
                    type_url: kind.type_url(),
                    nonce,
                });
            }
        }
        self.note_push(snapshot, !out.is_empty());
        out
    }

    fn note_push(&mut self, snapshot: &Snapshot, sent: bool) {
        if sent
            && self.last_pushed_snapshot != 0
            && snapshot.version > self.last_pushed_snapshot
            && let Some(at) = snapshot.catalog_published_at
        {
            metrics::histogram!("ferry_xds_push_latency_seconds")
                .record(at.elapsed().as_secs_f64());
        }
        if sent {
            self.last_pushed_snapshot = snapshot.version;
        }
        self.publish_status();
    }

    /// Copies this session's state into its status record.
    pub fn publish_status(&self) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.node_id.clone_from(&self.node_id);
        status.node_cluster.clone_from(&self.node_cluster);
        status.client = self.client_kind();
        status.last_update = Some(SystemTime::now());
        status.types.clear();
        for kind in ResourceType::ALL {
            let st = &self.types[kind.index()];
            if !st.started {
                continue;
            }
            status.types.insert(
                kind.short(),
                TypeStatus {
                    wildcard: st.sub.wildcard,
                    subscribed: st.sub.names.len(),
                    names: st.sub.names.iter().take(20).cloned().collect(),
                    sent_version: st.sent_version.clone(),
                    acked_version: st.acked_version.clone(),
                    acked_snapshot: st.acked_snapshot,
                    awaiting_ack: st.awaiting_ack,
                    nacks: st.nacks,
                    last_nack: st.last_nack.clone(),
                },
            );
        }
    }
}

#[cfg(test)]
impl Session {
    /// The SotW responses due, as a client decodes them.
    pub fn sotw_responses(
        &mut self,
        snapshot: &Arc<Snapshot>,
    ) -> Vec<ferry_proto::envoy::service::discovery::v3::DiscoveryResponse> {
        let replies = self.sotw_replies(snapshot);
        replies.iter().map(SotwReply::to_message).collect()
    }

    /// The delta responses due, as a client decodes them.
    pub fn delta_responses(
        &mut self,
        snapshot: &Arc<Snapshot>,
    ) -> Vec<ferry_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse> {
        let replies = self.delta_replies(snapshot);
        replies.iter().map(DeltaReply::to_message).collect()
    }
}

mod state;
#[cfg(test)]
mod tests;

use self::state::{Known, Subscription, TypeState, Update};
