//! The HA policy store on etcd, with leader election and fencing.
//!
//! Every control plane serves xDS from the same state: it loads the policy
//! from etcd and follows every change by watch. One of them, elected on an
//! etcd lease, is the leader: only it writes and only it runs migrations.
//!
//! Fencing: each write is one etcd transaction that holds only if the
//! writer's election key still exists with the creation revision it won
//! with, and the policy version is still the one it read. A leader whose
//! lease expired (paused, partitioned) has lost that key, so its late
//! writes are refused by etcd itself, not by its own belief.
//!
//! Keys under the prefix (default `/ferry`): `meta/version`,
//! `weights/<service>`, `pins/<service>`, `migrations/<id>`, `campaigns/<id>`,
//! `audit/<version, 20 digits>`, the election `election`, and outside the
//! policy `observations/<node>` and `proxies/<node>` (the proxies each
//! control plane waits for after a restart).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::policy::Policy;
use crate::store::{AuditRecord, Backend, Commit, Loaded, StoreError, newest_of, parse};

/// How to reach etcd and take part in the election.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Key prefix of this Ferry deployment's state.
    pub prefix: String,
    /// This control plane's name in the election (shown as the leader).
    pub node: String,
    /// TTL of the leadership lease: a leader that stops renewing it is
    /// replaced within this time.
    pub lease_ttl: Duration,
}

/// This control plane's part in the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not (or no longer) the leader.
    Follower,
    /// Won the election: `key` exists with creation revision `rev` for as
    /// long as lease `lease` lives.
    Leader { key: Vec<u8>, rev: i64, lease: i64 },
}

fn etcd_err(e: etcd_client::Error) -> StoreError {
    StoreError::Db(format!("etcd: {e}"))
}

/// The policy store on etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    role: watch::Receiver<Role>,
}

/// The election of one control plane: owns the lease and its renewal.
pub struct Election {
    client: Client,
    config: EtcdConfig,
    role: watch::Sender<Role>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
            .field("role", &*self.role.borrow())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Connects to etcd; the store follows `Election::run`'s outcome.
pub async fn connect(config: EtcdConfig) -> Result<(EtcdStore, Election), StoreError> {
    let client = tokio::time::timeout(
        Duration::from_secs(10),
        Client::connect(&config.endpoints, None),
    )
    .await
    .map_err(|_| {
        StoreError::Db(format!(
            "etcd: no answer from {} within 10s",
            config.endpoints.join(",")
        ))
    })?
    .map_err(etcd_err)?;
    let (role_tx, role_rx) = watch::channel(Role::Follower);
    let prefix = config.prefix.trim_end_matches('/').to_owned();
    Ok((
        EtcdStore {
            client: client.clone(),
            prefix,
            role: role_rx,
        },
        Election {
            client,
            config,
            role: role_tx,
        },
    ))
}

impl EtcdStore {
    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    fn election_name(&self) -> String {
        self.key("election")
    }

    /// The role this store writes with.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// The current leader's name, if any.
    pub async fn leader_name(&self) -> Option<String> {
        let mut client = self.client.clone();
        let response = client.leader(self.election_name()).await.ok()?;
        response
            .kv()
            .and_then(|kv| kv.value_str().ok())
            .map(str::to_owned)
    }

    async fn load_async(&self) -> Result<Loaded, StoreError> {
        let mut client = self.client.clone();
        let version_key = self.key("meta/version");
        let head = client
            .get(version_key.clone(), None)
            .await
            .map_err(etcd_err)?;
        let revision = head.header().map(|h| h.revision()).unwrap_or(0);
        let mut loaded = Loaded::default();
        if let Some(kv) = head.kvs().first() {
            let text = kv.value_str().map_err(etcd_err)?;
            loaded.version = text.parse().map_err(|e| StoreError::Corrupt {
                key: version_key.clone(),
                reason: format!("{text:?}: {e}"),
            })?;
        }
        // Every table at the same revision: one consistent state.
        for table in ["weights", "pins", "migrations", "campaigns"] {
            let prefix = self.key(&format!("{table}/"));
            let response = client
                .get(
                    prefix.clone(),
                    Some(GetOptions::new().with_prefix().with_revision(revision)),
                )
                .await
                .map_err(etcd_err)?;
            for kv in response.kvs() {
                let key = kv.key_str().map_err(etcd_err)?;
                let name = key.trim_start_matches(&prefix).to_owned();
                let json = kv.value_str().map_err(etcd_err)?;
                match table {
                    "weights" => {
                        loaded.weights.insert(name, parse(key, json)?);
                    }
                    "pins" => {
                        loaded.pins.insert(name, parse(key, json)?);
                    }
                    "campaigns" => {
                        loaded.campaigns.insert(name, json.to_owned());
                    }
                    _ => {
                        loaded.migrations.insert(name, json.to_owned());
                    }
                }
            }
        }
        Ok(loaded)
    }

    async fn commit_async(&self, change: &Commit) -> Result<(), StoreError> {
        let role = self.role.borrow().clone();
        let Role::Leader { key, rev, .. } = role else {
            let leader = self
                .leader_name()
                .await
                .unwrap_or_else(|| "no leader elected yet".to_owned());
            return Err(StoreError::NotLeader { leader });
        };
        let version_key = self.key("meta/version");
        let previous = change.version.saturating_sub(1);
        let version_holds = if previous == 0 {
            Compare::version(version_key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(version_key.clone(), CompareOp::Equal, previous.to_string())
        };
        let mut ops = Vec::new();
        let record_key = |table: &str| self.key(&format!("{table}/{}", change.service));
        if let Some(weights) = &change.weights {
            ops.push(match weights {
                Some(w) => TxnOp::put(record_key("weights"), to_json(w)?, None),
                None => TxnOp::delete(record_key("weights"), None),
            });
        }
        if let Some(pin) = &change.pin {
            ops.push(match pin {
                Some(p) => TxnOp::put(record_key("pins"), to_json(p)?, None),
                None => TxnOp::delete(record_key("pins"), None),
            });
        }
        for (table, record) in [
            ("migrations", &change.migration),
            ("campaigns", &change.campaign),
        ] {
            if let Some((id, record)) = record {
                ops.push(TxnOp::put(
                    self.key(&format!("{table}/{id}")),
                    record.clone(),
                    None,
                ));
            }
        }
        ops.push(TxnOp::put(
            self.key(&format!("audit/{:020}", change.version)),
            to_json(&change.audit)?,
            None,
        ));
        ops.push(TxnOp::put(version_key, change.version.to_string(), None));
        let txn = Txn::new()
            .when([
                Compare::create_revision(key, CompareOp::Equal, rev),
                version_holds,
            ])
            .and_then(ops);
        let mut client = self.client.clone();
        let response = client.txn(txn).await.map_err(etcd_err)?;
        if !response.succeeded() {
            metrics::counter!("ferry_migrate_fenced_writes_total").increment(1);
            tracing::error!(
                version = change.version, action = %change.audit.action,
                "write refused by etcd: this control plane's leadership or policy version is stale"
            );
            return Err(StoreError::Fenced(format!(
                "the election key with revision {rev} or policy version {previous} no longer holds"
            )));
        }
        Ok(())
    }

    async fn audit_async(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut client = self.client.clone();
        let mut options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend);
        if service.is_none() {
            options = options.with_limit(limit as i64);
        }
        let response = client
            .get(self.key("audit/"), Some(options))
            .await
            .map_err(etcd_err)?;
        let newest_first = response.kvs().iter().map(|kv| {
            let key = kv.key_str().map_err(etcd_err)?;
            parse(key, kv.value_str().map_err(etcd_err)?)
        });
        newest_of(newest_first, service, limit)
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Db(format!("cannot encode a record: {e}")))
}

#[async_trait::async_trait]
impl Backend for EtcdStore {
    async fn load(&self) -> Result<Loaded, StoreError> {
        self.load_async().await
    }

    async fn commit(&self, change: &Commit) -> Result<(), StoreError> {
        self.commit_async(change).await
    }

    async fn audit(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.audit_async(service, limit).await
    }

    async fn save_proxies(&self, node: &str, proxies: &BTreeSet<String>) -> Result<(), StoreError> {
        let json = to_json(proxies)?;
        let key = self.key(&format!("proxies/{node}"));
        let mut client = self.client.clone();
        client
            .put(key, json, None)
            .await
            .map(|_| ())
            .map_err(etcd_err)
    }

    async fn saved_proxies(&self, node: &str) -> Result<BTreeSet<String>, StoreError> {
        let key = self.key(&format!("proxies/{node}"));
        let mut client = self.client.clone();
        let response = client.get(key.clone(), None).await.map_err(etcd_err)?;
        match response.kvs().first() {
            Some(kv) => parse(
                &key,
                kv.value_str().map_err(|e| StoreError::Db(e.to_string()))?,
            ),
            None => Ok(BTreeSet::new()),
        }
    }
}

impl Election {
    /// Campaigns until `cancel`: while elected, the role is `Leader`; as
    /// soon as the lease cannot be shown alive (expired, or no renewal
    /// acknowledged within its TTL) the role is `Follower` again and a new
    /// campaign starts. On `cancel` a leader resigns at once.
    pub async fn run(self, cancel: CancellationToken) {
        let ttl = self.config.lease_ttl.max(Duration::from_secs(2));
        let mut backoff = Duration::from_millis(200);
        while !cancel.is_cancelled() {
            match self.term(ttl, &cancel).await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %e, node = %self.config.node, "leader election interrupted; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.step_down("shutting down");
    }

    fn step_down(&self, why: &str) {
        if matches!(*self.role.borrow(), Role::Leader { .. }) {
            tracing::warn!(node = %self.config.node, why, "leadership lost");
            metrics::gauge!("ferry_migrate_leader").set(0.0);
        }
        self.role.send_replace(Role::Follower);
    }

    /// One lease: campaign with it, lead while it lives.
    async fn term(&self, ttl: Duration, cancel: &CancellationToken) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let lease = client
            .lease_grant(ttl.as_secs() as i64, None)
            .await
            .map_err(etcd_err)?
            .id();
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.map_err(etcd_err)?;
        let lost = CancellationToken::new();
        let renewal = {
            let lost = lost.clone();
            let cancel = cancel.clone();
            async move {
                let mut last_ok = Instant::now();
                let mut tick = tokio::time::interval(ttl / 4);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let renewed = tokio::time::timeout(ttl / 4, async {
                        keeper.keep_alive().await.ok()?;
                        responses.message().await.ok()?
                    })
                    .await;
                    match renewed {
                        Ok(Some(r)) if r.ttl() > 0 => last_ok = Instant::now(),
                        Ok(Some(_)) => {
                            tracing::warn!("leadership lease expired");
                            lost.cancel();
                            return;
                        }
                        _ => {}
                    }
                    // Unconfirmed for a whole TTL: the lease may be gone.
                    if last_ok.elapsed() >= ttl {
                        tracing::warn!(?ttl, "leadership lease not renewed within its TTL");
                        lost.cancel();
                        return;
                    }
                }
            }
        };
        // Renewal stops with this term, however it ends (even dropped).
        let renewal = AbortOnDrop(tokio::spawn(renewal));
        let name = format!("{}/election", self.config.prefix.trim_end_matches('/'));
        let campaign = client.campaign(name, self.config.node.clone(), lease);
        let won = tokio::select! {
            _ = cancel.cancelled() => None,
            _ = lost.cancelled() => None,
            won = campaign => Some(won.map_err(etcd_err)?),
        };
        if let Some(leader) = won.as_ref().and_then(|w| w.leader()) {
            tracing::info!(node = %self.config.node, rev = leader.rev(), "elected leader");
            metrics::gauge!("ferry_migrate_leader").set(1.0);
            metrics::counter!("ferry_migrate_leader_elections_total").increment(1);
            self.role.send_replace(Role::Leader {
                key: leader.key().to_vec(),
                rev: leader.rev(),
                lease,
            });
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = lost.cancelled() => {}
            }
        }
        self.step_down(if cancel.is_cancelled() {
            "shutting down"
        } else {
            "lease lost"
        });
        drop(renewal);
        // Revoking hands leadership over at once (best effort: an expired
        // lease is already gone).
        let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
        Ok(())
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps this control plane's policy and migrations equal to etcd's:
/// follows every committed change by watch, and hands the engine over on
/// leadership changes (reload first, then run; stop at once when deposed).
pub async fn follow(
    store: EtcdStore,
    policy: Arc<Policy>,
    engine: Arc<Engine>,
    cancel: CancellationToken,
) {
    let mut role = store.role();
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut client = store.client.clone();
        let watch = client
            .watch(store.key("meta/version"), Some(WatchOptions::new()))
            .await;
        let mut stream = match watch {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch etcd; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        // Whatever changed before the watch started. (The role is read
        // first: a borrow must not outlive the statement, or the election
        // could not publish a new role meanwhile.)
        let leading = matches!(*role.borrow(), Role::Leader { .. });
        sync(&policy, &engine, leading).await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = role.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let leading = matches!(*role.borrow_and_update(), Role::Leader { .. });
                    if !leading {
                        engine.set_leading(false);
                    }
                    sync(&policy, &engine, leading).await;
                }
                message = stream.message() => match message {
                    Ok(Some(_)) => sync(&policy, &engine, engine.is_leading()).await,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}

/// Reloads policy and migrations from etcd; a new leader starts its engine
/// only after that.
async fn sync(policy: &Policy, engine: &Engine, leading: bool) {
    if let Err(e) = policy.reload().await {
        tracing::error!(error = %e, "cannot follow the policy in etcd");
        return;
    }
    // A leader's engine holds what it wrote itself; anyone else takes
    // etcd's word (a new leader before its first tick).
    if !(engine.is_leading() && leading)
        && let Err(e) = engine.reload().await
    {
        tracing::error!(error = %e, "cannot follow the migrations in etcd");
        return;
    }
    if leading && !engine.is_leading() {
        tracing::info!("leading: migrations run here now");
    }
    engine.set_leading(leading);
}

/// How often an unchanged observation is written again: peers hold one
/// for 3 s ([`crate::fleet::Fleet`]'s default freshness).
const OBSERVATION_HEARTBEAT: Duration = Duration::from_secs(2);

/// Shares what this control plane observes with its peers (looked at once
/// a second, written when it changed or as a heartbeat), and takes theirs
/// into `fleet`: the leader's gates and acknowledgement waits then count
/// every proxy, wherever it connects.
pub async fn share_observations(
    store: EtcdStore,
    node: String,
    cache: Arc<ferry_xds::SnapshotCache>,
    clients: Arc<ferry_xds::status::ClientRegistry>,
    loads: Arc<ferry_xds::lrs::LoadReports>,
    fleet: Arc<crate::fleet::Fleet>,
    cancel: CancellationToken,
) {
    let prefix = store.key("observations/");
    let publisher = {
        let (store, node, loads, cancel) =
            (store.clone(), node.clone(), loads.clone(), cancel.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            // Written when it changes, and otherwise as a heartbeat well
            // within the time peers keep an observation fresh.
            let mut last: Option<(String, tokio::time::Instant)> = None;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let observation = crate::fleet::observe(&node, &cache.current(), &clients, &loads);
                let Ok(json) = to_json(&observation) else {
                    continue;
                };
                let unchanged = last.as_ref().is_some_and(|(seen, at)| {
                    *seen == json && at.elapsed() < OBSERVATION_HEARTBEAT
                });
                if unchanged {
                    continue;
                }
                let mut client = store.client.clone();
                let key = store.key(&format!("observations/{node}"));
                match client.put(key, json.clone(), None).await {
                    Ok(_) => {
                        metrics::counter!("ferry_migrate_observations_written_total").increment(1);
                        last = Some((json, tokio::time::Instant::now()));
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot share observations"),
                }
            }
        }
    };
    let publisher = AbortOnDrop(tokio::spawn(publisher));
    let mut backoff = Duration::from_millis(200);
    while !cancel.is_cancelled() {
        let mut client = store.client.clone();
        let mut stream = match client
            .watch(prefix.clone(), Some(WatchOptions::new().with_prefix()))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch peers' observations; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        loop {
            let message = tokio::select! {
                _ = cancel.cancelled() => break,
                m = stream.message() => m,
            };
            let Ok(Some(response)) = message else {
                break;
            };
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let Ok(observation) =
                    serde_json::from_slice::<crate::fleet::Observation>(kv.value())
                else {
                    continue;
                };
                if observation.node != node {
                    fleet.update(observation, &loads);
                }
            }
        }
    }
    drop(publisher);
}

/// The etcd store with this control plane's election: one leader among
/// peers.
pub struct EtcdLeadership {
    pub store: EtcdStore,
    pub election: Election,
    pub node: String,
}

impl crate::leadership::Leadership for EtcdLeadership {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn node(&self) -> &str {
        &self.node
    }

    fn backend(&self) -> Box<dyn Backend> {
        Box::new(self.store.clone())
    }

    fn start(self: Box<Self>, shared: crate::leadership::Shared, shutdown: CancellationToken) {
        let EtcdLeadership {
            store,
            election,
            node,
        } = *self;
        shared.engine.set_leading(false);
        tokio::spawn(election.run(shutdown.clone()));
        tokio::spawn(share_observations(
            store.clone(),
            node,
            shared.cache,
            shared.clients,
            shared.loads,
            shared.fleet,
            shutdown.clone(),
        ));
        tokio::spawn(follow(store, shared.policy, shared.engine, shutdown));
    }
}
