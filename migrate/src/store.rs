//! Where the policy lives. Every [`Backend`] writes one accepted change
//! (weights or pin, migration record, audit entry and policy version) in
//! one transaction, so a crash never leaves half a change and nothing
//! accepted is lost.
//!
//! [`Store`] is the embedded default: one `redb` file under `--data-dir`.
//! The etcd backend (feature `etcd`) is in [`crate::etcd`].
//!
//! Every call is async: etcd's are network round trips, and redb's file
//! transactions run on tokio's blocking pool, so no store I/O ever holds
//! up a runtime worker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const WEIGHTS: TableDefinition<&str, &str> = TableDefinition::new("weights");
const PINS: TableDefinition<&str, &str> = TableDefinition::new("pins");
const AUDIT: TableDefinition<u64, &str> = TableDefinition::new("audit");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const MIGRATIONS: TableDefinition<&str, &str> = TableDefinition::new("migrations");
const CAMPAIGNS: TableDefinition<&str, &str> = TableDefinition::new("campaigns");
/// Control plane name → the node ids of its connected proxies (JSON).
const PROXIES: TableDefinition<&str, &str> = TableDefinition::new("proxies");
const VERSION_KEY: &str = "policy_version";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("policy store: {0}")]
    Db(String),
    #[error("policy store: corrupt record {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    /// This instance does not lead; only the leader writes.
    #[error("this control plane is not the leader ({leader}); send changes to the leader")]
    NotLeader { leader: String },
    /// The write carried a leadership that is no longer current: a deposed
    /// leader's late write, refused by the store.
    #[error("write refused: this control plane's leadership ended ({0})")]
    Fenced(String),
    /// The write was made on top of a version that is no longer the
    /// store's: another writer got there first.
    #[error(
        "write refused: the policy version is {actual}, not the {expected} this change was made on"
    )]
    Conflict { expected: u64, actual: u64 },
}

/// A policy store.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Everything stored, as of now.
    async fn load(&self) -> Result<Loaded, StoreError>;
    /// Writes one change made on top of version `change.version - 1`;
    /// returns once it is durable. Refused when the store has moved past
    /// that version.
    async fn commit(&self, change: &Commit) -> Result<(), StoreError>;
    /// The newest `limit` audit entries (about `service`, if given), oldest first.
    async fn audit(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError>;
    /// Records the node ids of the proxies connected to control plane
    /// `node` (what it waits for after a restart). Not part of the policy:
    /// no version, no audit entry.
    async fn save_proxies(&self, node: &str, proxies: &BTreeSet<String>) -> Result<(), StoreError>;
    /// What [`save_proxies`](Self::save_proxies) last recorded for `node`.
    async fn saved_proxies(&self, node: &str) -> Result<BTreeSet<String>, StoreError>;
}

fn db_err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// A pin as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPin {
    pub owner: String,
    pub reason: String,
    pub pinned_at_ms: i64,
    /// 0 = never.
    pub expires_at_ms: i64,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub version: u64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub service: String,
    pub reason: String,
    pub detail: String,
}

/// Everything the store holds, as loaded at start.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    pub version: u64,
    /// Service → cluster → basis points.
    pub weights: BTreeMap<String, BTreeMap<String, u32>>,
    pub pins: BTreeMap<String, StoredPin>,
    /// Migration id → its record (JSON, owned by the migration engine).
    pub migrations: BTreeMap<String, String>,
    /// Campaign id → its record (JSON, owned by the migration engine).
    pub campaigns: BTreeMap<String, String>,
}

/// One accepted change, written atomically.
#[derive(Debug, Clone)]
pub struct Commit {
    pub version: u64,
    pub service: String,
    /// `Some(Some(w))` sets weights, `Some(None)` clears them.
    pub weights: Option<Option<BTreeMap<String, u32>>>,
    /// `Some(Some(p))` sets a pin, `Some(None)` removes it.
    pub pin: Option<Option<StoredPin>>,
    /// `(id, JSON)` of a migration record to write with the change.
    pub migration: Option<(String, String)>,
    /// `(id, JSON)` of a campaign record to write with the change.
    pub campaign: Option<(String, String)>,
    pub audit: AuditRecord,
}

/// The embedded policy store (cheap to clone: one shared file handle).
#[derive(Debug, Clone)]
pub struct Store {
    db: std::sync::Arc<Database>,
}

impl Store {
    /// Opens (or creates) the store file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(WEIGHTS).map_err(db_err)?;
            txn.open_table(PINS).map_err(db_err)?;
            txn.open_table(AUDIT).map_err(db_err)?;
            txn.open_table(META).map_err(db_err)?;
            txn.open_table(MIGRATIONS).map_err(db_err)?;
            txn.open_table(CAMPAIGNS).map_err(db_err)?;
            txn.open_table(PROXIES).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(Self {
            db: std::sync::Arc::new(db),
        })
    }
}

#[async_trait::async_trait]
impl Backend for Store {
    async fn load(&self) -> Result<Loaded, StoreError> {
        self.off_runtime(|s| s.load_now()).await
    }

    async fn commit(&self, change: &Commit) -> Result<(), StoreError> {
        let change = change.clone();
        self.off_runtime(move |s| s.commit_now(&change)).await
    }

    async fn audit(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let service = service.map(str::to_owned);
        self.off_runtime(move |s| s.audit_now(service.as_deref(), limit))
            .await
    }

    async fn save_proxies(&self, node: &str, proxies: &BTreeSet<String>) -> Result<(), StoreError> {
        let (node, proxies) = (node.to_owned(), proxies.clone());
        self.off_runtime(move |s| s.save_proxies_now(&node, &proxies))
            .await
    }

    async fn saved_proxies(&self, node: &str) -> Result<BTreeSet<String>, StoreError> {
        let node = node.to_owned();
        self.off_runtime(move |s| s.saved_proxies_now(&node)).await
    }
}

impl Store {
    /// Runs one of the file's transactions on tokio's blocking pool (or
    /// here, outside a runtime).
    async fn off_runtime<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        if tokio::runtime::Handle::try_current().is_err() {
            return f(&store);
        }
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Db(format!("store task ended: {e}")))?
    }

    fn load_now(&self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let mut loaded = Loaded {
            version: txn
                .open_table(META)
                .map_err(db_err)?
                .get(VERSION_KEY)
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(0),
            ..Loaded::default()
        };
        for row in txn
            .open_table(WEIGHTS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let weights = parse(k.value(), v.value())?;
            loaded.weights.insert(k.value().to_owned(), weights);
        }
        for row in txn
            .open_table(PINS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let pin = parse(k.value(), v.value())?;
            loaded.pins.insert(k.value().to_owned(), pin);
        }
        for (table, records) in [
            (MIGRATIONS, &mut loaded.migrations),
            (CAMPAIGNS, &mut loaded.campaigns),
        ] {
            for row in txn
                .open_table(table)
                .map_err(db_err)?
                .iter()
                .map_err(db_err)?
            {
                let (k, v) = row.map_err(db_err)?;
                records.insert(k.value().to_owned(), v.value().to_owned());
            }
        }
        Ok(loaded)
    }

    fn commit_now(&self, change: &Commit) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let actual = txn
                .open_table(META)
                .map_err(db_err)?
                .get(VERSION_KEY)
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(0);
            let expected = change.version.saturating_sub(1);
            if actual != expected {
                return Err(StoreError::Conflict { expected, actual });
            }
            if let Some(weights) = &change.weights {
                put_or_remove(&txn, WEIGHTS, &change.service, weights.as_ref())?;
            }
            if let Some(pin) = &change.pin {
                put_or_remove(&txn, PINS, &change.service, pin.as_ref())?;
            }
            for (table, record) in [
                (MIGRATIONS, &change.migration),
                (CAMPAIGNS, &change.campaign),
            ] {
                if let Some((id, json)) = record {
                    txn.open_table(table)
                        .map_err(db_err)?
                        .insert(id.as_str(), json.as_str())
                        .map_err(db_err)?;
                }
            }
            let json = serde_json::to_string(&change.audit).map_err(db_err)?;
            txn.open_table(AUDIT)
                .map_err(db_err)?
                .insert(change.version, json.as_str())
                .map_err(db_err)?;
            txn.open_table(META)
                .map_err(db_err)?
                .insert(VERSION_KEY, change.version)
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    fn audit_now(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(AUDIT).map_err(db_err)?;
        let newest_first = table.iter().map_err(db_err)?.rev().map(|row| {
            let (k, v) = row.map_err(db_err)?;
            parse(&k.value().to_string(), v.value())
        });
        newest_of(newest_first, service, limit)
    }

    fn save_proxies_now(&self, node: &str, proxies: &BTreeSet<String>) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        put_or_remove(&txn, PROXIES, node, Some(proxies))?;
        txn.commit().map_err(db_err)
    }

    fn saved_proxies_now(&self, node: &str) -> Result<BTreeSet<String>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(PROXIES).map_err(db_err)?;
        match table.get(node).map_err(db_err)? {
            Some(json) => parse(node, json.value()),
            None => Ok(BTreeSet::new()),
        }
    }
}

/// The first `limit` records about `service` (all, without one) from
/// records newest first; returned oldest first.
pub(crate) fn newest_of(
    newest_first: impl Iterator<Item = Result<AuditRecord, StoreError>>,
    service: Option<&str>,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut out = Vec::new();
    for record in newest_first {
        let record = record?;
        if service.is_none_or(|s| s == record.service) {
            out.push(record);
            if out.len() >= limit {
                break;
            }
        }
    }
    out.reverse();
    Ok(out)
}

/// Stores `value` as JSON under `key`, or removes `key` for `None`.
fn put_or_remove<T: Serialize>(
    txn: &redb::WriteTransaction,
    table: TableDefinition<&str, &str>,
    key: &str,
    value: Option<&T>,
) -> Result<(), StoreError> {
    let mut table = txn.open_table(table).map_err(db_err)?;
    match value {
        Some(v) => {
            let json = serde_json::to_string(v).map_err(db_err)?;
            table.insert(key, json.as_str()).map_err(db_err)?;
        }
        None => {
            table.remove(key).map_err(db_err)?;
        }
    }
    Ok(())
}

pub(crate) fn parse<T: for<'de> Deserialize<'de>>(key: &str, json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}
