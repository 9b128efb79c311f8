//! Connected xDS clients as SREs see them on `/status`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::client_kind::ClientKind;
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
    /// The latest snapshot whose resources of this type (those the client
    /// subscribes to) it is known to hold: that of the last update it
    /// acknowledged, or a later one that changed none of them.
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
    /// Who the stream authenticated as (a client certificate's name or a
    /// token's identity); `None` on a port without TLS or auth.
    pub identity: Option<String>,
    pub node_id: String,
    pub node_cluster: String,
    /// A proxy, or a proxyless gRPC client.
    pub client: ClientKind,
    pub connected_at: SystemTime,
    pub last_update: Option<SystemTime>,
    pub types: BTreeMap<&'static str, TypeStatus>,
}

/// A stream refused because its peer address holds too many already.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{ip} already holds {streams} xDS streams, the most one address may (--xds-max-streams-per-peer)"
)]
pub struct TooManyStreams {
    pub ip: IpAddr,
    pub streams: usize,
}

/// One registered stream.
#[derive(Debug)]
struct Entry {
    status: Arc<Mutex<ClientStatus>>,
    ip: Option<IpAddr>,
}

#[derive(Debug, Default)]
struct Clients {
    streams: BTreeMap<u64, Entry>,
    per_ip: HashMap<IpAddr, usize>,
}

/// Every connected client, for the status endpoint.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    clients: Mutex<Clients>,
}

impl ClientRegistry {
    /// Registers a stream unless its peer's address already holds
    /// `max_per_ip` streams.
    pub fn register(
        &self,
        stream: u64,
        variant: Variant,
        peer: Option<std::net::SocketAddr>,
        max_per_ip: usize,
    ) -> Result<Arc<Mutex<ClientStatus>>, TooManyStreams> {
        let ip = peer.map(|p| p.ip());
        let mut clients = self.lock();
        if let Some(ip) = ip {
            let streams = clients.per_ip.get(&ip).copied().unwrap_or(0);
            if streams >= max_per_ip {
                return Err(TooManyStreams { ip, streams });
            }
            *clients.per_ip.entry(ip).or_default() += 1;
        }
        let status = Arc::new(Mutex::new(ClientStatus {
            stream,
            variant,
            peer: peer.map(|p| p.to_string()),
            identity: None,
            node_id: String::new(),
            node_cluster: String::new(),
            client: ClientKind::default(),
            connected_at: SystemTime::now(),
            last_update: None,
            types: BTreeMap::new(),
        }));
        clients.streams.insert(
            stream,
            Entry {
                status: status.clone(),
                ip,
            },
        );
        Ok(status)
    }

    pub fn unregister(&self, stream: u64) {
        let mut clients = self.lock();
        let Some(entry) = clients.streams.remove(&stream) else {
            return;
        };
        if let Some(ip) = entry.ip
            && let Some(n) = clients.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                clients.per_ip.remove(&ip);
            }
        }
    }

    /// Whether `node_id` has a live ADS stream from address `ip`.
    pub fn has_stream(&self, node_id: &str, ip: IpAddr) -> bool {
        if node_id.is_empty() {
            return false;
        }
        self.handles_where(|e| e.ip == Some(ip))
            .iter()
            .any(|h| h.lock().unwrap_or_else(|p| p.into_inner()).node_id == node_id)
    }

    pub fn len(&self) -> usize {
        self.lock().streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many connected clients subscribed to `kind` have acknowledged
    /// snapshot `version(client kind)` (or a later one) of it, out of how
    /// many: proxies and gRPC clients are served resources that change
    /// at different versions.
    pub fn ack_share(&self, kind: &str, version: impl Fn(ClientKind) -> u64) -> (usize, usize) {
        let handles = self.handles_where(|_| true);
        let (mut acked, mut total) = (0, 0);
        for h in handles {
            let status = h.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = status.types.get(kind) {
                total += 1;
                if t.acked_snapshot >= version(status.client) {
                    acked += 1;
                }
            }
        }
        (acked, total)
    }

    /// The node ids of the connected clients subscribed to `kind`.
    pub fn nodes_subscribed(&self, kind: &str) -> std::collections::BTreeSet<String> {
        let handles = self.handles_where(|_| true);
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
        let handles = self.handles_where(|_| true);
        handles
            .iter()
            .map(|h| h.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// The status handles of the streams `keep` selects, copied out so
    /// no client's lock is taken under the registry's.
    fn handles_where(&self, keep: impl Fn(&Entry) -> bool) -> Vec<Arc<Mutex<ClientStatus>>> {
        self.lock()
            .streams
            .values()
            .filter(|e| keep(e))
            .map(|e| e.status.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }
}
