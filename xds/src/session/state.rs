//! What one stream knows per resource type: the subscription, what the
//! client holds (a base snapshot plus exceptions), nonces and ACK state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::client_kind::ClientKind;
use crate::resources::{Resource, ResourceType};
use crate::snapshot::Snapshot;
use crate::status::NackRecord;

#[derive(Debug, Default, Clone)]
pub(super) struct Subscription {
    pub(super) wildcard: bool,
    pub(super) names: BTreeSet<String>,
}

impl Subscription {
    pub(super) fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// What the client holds of one resource, where it differs from the base.
#[derive(Debug, Clone)]
pub(super) enum Known {
    /// The client holds this version (from `initial_resource_versions`).
    Version(String),
    /// Held back on purpose: a removed cluster kept until routes settle.
    Held(Arc<Resource>),
    /// The client does not hold it (newly subscribed).
    Missing,
    /// The client was told it does not exist.
    Absent,
}

#[derive(Debug, Default)]
pub(super) struct TypeState {
    pub(super) started: bool,
    pub(super) sub: Subscription,
    /// The client holds every subscribed resource as in `base`, except
    /// for `exceptions`.
    pub(super) base: Option<Arc<Snapshot>>,
    pub(super) exceptions: BTreeMap<String, Known>,
    pub(super) nonce: Option<String>,
    pub(super) awaiting_ack: bool,
    pub(super) force_response: bool,
    pub(super) sent_version: Option<String>,
    pub(super) acked_version: Option<String>,
    /// The snapshot version of the last response sent, and of the last
    /// one the client acknowledged.
    pub(super) sent_snapshot: u64,
    pub(super) acked_snapshot: u64,
    pub(super) last_nack: Option<NackRecord>,
    /// The nonce of the first response of the latest update, when it went
    /// as several responses.
    pub(super) batch_start: u64,
    pub(super) nacks: u64,
}

impl TypeState {
    /// Whether `nonce` is an earlier response of the latest update.
    pub(super) fn in_batch(&self, nonce: &str) -> bool {
        let latest = self.nonce.as_deref().and_then(|n| n.parse::<u64>().ok());
        match (nonce.parse::<u64>(), latest) {
            (Ok(n), Some(latest)) => self.batch_start <= n && n < latest,
            _ => false,
        }
    }

    pub(super) fn names_held(&self) -> usize {
        self.sub.names.len().max(self.exceptions.len())
    }

    /// The version of `name` the client holds, if any.
    pub(super) fn known(&self, kind: ResourceType, client: ClientKind, name: &str) -> Option<&str> {
        match self.exceptions.get(name) {
            Some(Known::Version(v)) => Some(v),
            Some(Known::Held(r)) => Some(&r.version),
            Some(Known::Missing | Known::Absent) => None,
            None if self.sub.wants(name) => self
                .base
                .as_ref()
                .and_then(|b| b.served(client, kind).get(name))
                .map(|r| r.version.as_str()),
            None => None,
        }
    }

    /// Names that may differ between what the client holds and `snapshot`.
    pub(super) fn candidates(
        &self,
        kind: ResourceType,
        client: ClientKind,
        snapshot: &Snapshot,
    ) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.exceptions.keys().cloned().collect();
        let current = snapshot.served(client, kind);
        match &self.base {
            Some(base) if base.version == snapshot.version => {}
            Some(base) if base.version + 1 == snapshot.version => {
                names.extend(snapshot.changed_for(client, kind).iter().cloned());
            }
            Some(base) => {
                let old = base.served(client, kind);
                for (name, r) in current {
                    if old.get(name).is_none_or(|o| o.version != r.version) {
                        names.insert(name.clone());
                    }
                }
                names.extend(old.keys().filter(|n| !current.contains_key(*n)).cloned());
            }
            None => {
                names.extend(current.keys().cloned());
                names.extend(self.sub.names.iter().cloned());
            }
        }
        names.retain(|n| self.sub.wants(n) || self.exceptions.contains_key(n));
        names
    }
}

/// One pending update of one type, before it is put on the wire.
#[derive(Debug, Default)]
pub(super) struct Update {
    pub(super) upserts: Vec<Arc<Resource>>,
    pub(super) removals: Vec<String>,
}
