//! Connected xDS clients as SREs see them on `/status`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::session::Variant;

/// A rejected update, as the client reported it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NackRecord {
    /// The version the client refused.
    pub rejected_version: String,
    /// The version it keeps (its last accepted one).
    pub kept_version: String,
    pub message: String,
    pub at: SystemTime,
}

/// One resource type of one client.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TypeStatus {
    pub wildcard: bool,
    /// Explicitly subscribed names (count; `names` lists the first 20).
    pub subscribed: usize,
    pub names: Vec<String>,
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    /// The snapshot version of the last update the client acknowledged.
    pub acked_snapshot: u64,
    pub awaiting_ack: bool,
    pub nacks: u64,
    pub last_nack: Option<NackRecord>,
}

/// One connected client.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientStatus {
    pub stream: u64,
    pub variant: Variant,
    pub peer: Option<String>,
    pub node_id: String,
    pub node_cluster: String,
    pub connected_at: SystemTime,
    pub last_update: Option<SystemTime>,
    pub types: BTreeMap<&'static str, TypeStatus>,
}

/// Every connected client, for the status endpoint.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    clients: Mutex<BTreeMap<u64, Arc<Mutex<ClientStatus>>>>,
}

impl ClientRegistry {
    pub fn register(
        &self,
        stream: u64,
        variant: Variant,
        peer: Option<String>,
    ) -> Arc<Mutex<ClientStatus>> {
        let status = Arc::new(Mutex::new(ClientStatus {
            stream,
            variant,
            peer,
            node_id: String::new(),
            node_cluster: String::new(),
            connected_at: SystemTime::now(),
            last_update: None,
            types: BTreeMap::new(),
        }));
        self.lock().insert(stream, status.clone());
        status
    }

    pub fn unregister(&self, stream: u64) {
        self.lock().remove(&stream);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many connected clients subscribed to `kind` have acknowledged
    /// snapshot `version` (or a later one) of it, out of how many.
    pub fn ack_share(&self, kind: &str, version: u64) -> (usize, usize) {
        let handles: Vec<_> = self.lock().values().cloned().collect();
        let (mut acked, mut total) = (0, 0);
        for h in handles {
            let status = h.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = status.types.get(kind) {
                total += 1;
                if t.acked_snapshot >= version {
                    acked += 1;
                }
            }
        }
        (acked, total)
    }

    /// The node ids of the connected clients subscribed to `kind`.
    pub fn nodes_subscribed(&self, kind: &str) -> std::collections::BTreeSet<String> {
        let handles: Vec<_> = self.lock().values().cloned().collect();
        handles
            .iter()
            .filter_map(|h| {
                let status = h.lock().unwrap_or_else(|p| p.into_inner());
                (status.types.contains_key(kind) && !status.node_id.is_empty())
                    .then(|| status.node_id.clone())
            })
            .collect()
    }

    /// A copy of every client's status.
    pub fn snapshot(&self) -> Vec<ClientStatus> {
        let handles: Vec<_> = self.lock().values().cloned().collect();
        handles
            .iter()
            .map(|h| h.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Mutex<ClientStatus>>>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }
}
