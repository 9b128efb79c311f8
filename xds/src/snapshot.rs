//! Immutable, versioned snapshots of every xDS resource, and the loop that
//! builds them from catalog changes.
//!
//! Each snapshot records which names changed since the one before it, so a
//! client that is one version behind diffs only those names instead of the
//! whole world. Bursts of catalog changes are coalesced: a quiet period
//! (`debounce`) bounded by `max_delay` from the first change.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_discovery::CatalogSnapshot;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client_kind::ClientKind;
use crate::resources::{Resource, ResourceType};
use crate::secrets::SecretStore;
use crate::translate::{PolicyOverrides, ResourceMaps, Translator};

/// Every resource Ferry serves, at one version.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// 0 until the first catalog has been translated; xDS waits for 1.
    pub version: u64,
    pub catalog_version: u64,
    pub resources: ResourceMaps,
    /// Names added, updated or removed since `version - 1`, per type.
    pub changed: [BTreeSet<String>; ResourceType::COUNT],
    /// When the catalog change that led here was published.
    pub catalog_published_at: Option<Instant>,
    /// The traffic policy version translated into this snapshot.
    pub policy_version: u64,
    /// Per type, the snapshot version at which any resource of that type
    /// last changed: a client that has acknowledged that version (or a
    /// later one) of the type holds what this snapshot serves.
    pub last_changed: [u64; ResourceType::COUNT],
    /// What proxyless gRPC clients are served instead of the above.
    pub grpc: View,
}

/// The resources one kind of client is served, with what changed.
#[derive(Debug, Default)]
pub struct View {
    pub resources: ResourceMaps,
    /// Names added, updated or removed since the snapshot before, per type.
    pub changed: [BTreeSet<String>; ResourceType::COUNT],
    /// Per type, the snapshot version at which it last changed.
    pub last_changed: [u64; ResourceType::COUNT],
}

impl Snapshot {
    pub fn is_ready(&self) -> bool {
        self.version > 0
    }

    /// What proxies (Envoy, Ferry's proxy) are served of `kind`.
    pub fn of(
        &self,
        kind: ResourceType,
    ) -> &std::collections::BTreeMap<String, Arc<crate::Resource>> {
        &self.resources[kind.index()]
    }

    /// What `client` is served of `kind`.
    pub fn served(
        &self,
        client: ClientKind,
        kind: ResourceType,
    ) -> &BTreeMap<String, Arc<Resource>> {
        match client {
            ClientKind::Proxy => self.of(kind),
            ClientKind::Grpc => &self.grpc.resources[kind.index()],
        }
    }

    /// The names of `kind` that changed for `client` since the snapshot
    /// before.
    pub fn changed_for(&self, client: ClientKind, kind: ResourceType) -> &BTreeSet<String> {
        match client {
            ClientKind::Proxy => &self.changed[kind.index()],
            ClientKind::Grpc => &self.grpc.changed[kind.index()],
        }
    }

    /// The snapshot version at which what `client` is served of `kind`
    /// last changed.
    pub fn last_changed_for(&self, client: ClientKind, kind: ResourceType) -> u64 {
        match client {
            ClientKind::Proxy => self.last_changed[kind.index()],
            ClientKind::Grpc => self.grpc.last_changed[kind.index()],
        }
    }
}

/// Holds the current snapshot; the ADS streams watch it.
#[derive(Debug)]
pub struct SnapshotCache {
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Default for SnapshotCache {
    fn default() -> Self {
        Self::new()
    }
}

impl SnapshotCache {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Self { tx }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Publishes translated resources as a new version when anything
    /// differs from the current snapshot; returns whether it did.
    pub fn publish(&self, resources: ResourceMaps, catalog: &CatalogSnapshot) -> bool {
        self.publish_at(resources, catalog, self.current().policy_version)
    }

    /// Like [`publish`](Self::publish), recording the policy version the
    /// resources were translated with. A new policy version alone (with no
    /// resource changed) still makes a new snapshot, so a caller waiting
    /// for its change to be served sees it.
    pub fn publish_at(
        &self,
        resources: ResourceMaps,
        catalog: &CatalogSnapshot,
        policy_version: u64,
    ) -> bool {
        self.publish_all(resources, ResourceMaps::default(), catalog, policy_version)
    }

    /// Like [`publish_at`](Self::publish_at), with what gRPC clients are
    /// served (`grpc`) beside what proxies are (`resources`).
    pub fn publish_all(
        &self,
        resources: ResourceMaps,
        grpc: ResourceMaps,
        catalog: &CatalogSnapshot,
        policy_version: u64,
    ) -> bool {
        let current = self.current();
        let changed: [BTreeSet<String>; ResourceType::COUNT] =
            ResourceType::ALL.map(|kind| changed_names(current.of(kind), &resources[kind.index()]));
        let grpc_changed: [BTreeSet<String>; ResourceType::COUNT] = ResourceType::ALL
            .map(|kind| changed_names(&current.grpc.resources[kind.index()], &grpc[kind.index()]));
        if current.is_ready()
            && changed.iter().chain(&grpc_changed).all(BTreeSet::is_empty)
            && current.policy_version == policy_version
        {
            return false;
        }
        let version = current.version + 1;
        let last_changed =
            |before: [u64; ResourceType::COUNT],
             changed: &[BTreeSet<String>; ResourceType::COUNT]| {
                let mut last = before;
                for kind in ResourceType::ALL {
                    if !changed[kind.index()].is_empty() || !current.is_ready() {
                        last[kind.index()] = version;
                    }
                }
                last
            };
        let snapshot = Snapshot {
            version,
            policy_version,
            last_changed: last_changed(current.last_changed, &changed),
            catalog_version: catalog.version,
            resources,
            changed,
            catalog_published_at: Some(catalog.published_at),
            grpc: View {
                last_changed: last_changed(current.grpc.last_changed, &grpc_changed),
                resources: grpc,
                changed: grpc_changed,
            },
        };
        metrics::gauge!("ferry_xds_snapshot_version").set(snapshot.version as f64);
        for kind in ResourceType::ALL {
            metrics::gauge!("ferry_xds_resources", "type" => kind.short())
                .set(snapshot.of(kind).len() as f64);
            metrics::gauge!("ferry_xds_grpc_resources", "type" => kind.short())
                .set(snapshot.served(ClientKind::Grpc, kind).len() as f64);
        }
        tracing::info!(
            version = snapshot.version,
            catalog_version = catalog.version,
            changed_clusters = snapshot.changed[ResourceType::Cluster.index()].len(),
            changed_endpoints = snapshot.changed[ResourceType::Endpoint.index()].len(),
            "xds snapshot published"
        );
        self.tx.send_replace(Arc::new(snapshot));
        true
    }
}

/// Names added, updated (another version) or removed from `old` to `new`.
///
/// Both maps are walked once, side by side in name order; a resource
/// shared by both (the same `Arc`, as the translator hands out for what it
/// did not translate again) is passed over without comparing versions.
fn changed_names(
    old: &BTreeMap<String, Arc<Resource>>,
    new: &BTreeMap<String, Arc<Resource>>,
) -> BTreeSet<String> {
    let mut changed = BTreeSet::new();
    let mut old = old.iter().peekable();
    let mut new = new.iter().peekable();
    loop {
        let step = match (old.peek(), new.peek()) {
            (None, None) => return changed,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((o, _)), Some((n, _))) => o.cmp(n),
        };
        match step {
            Ordering::Less => changed.extend(old.next().map(|(name, _)| name.clone())),
            Ordering::Greater => changed.extend(new.next().map(|(name, _)| name.clone())),
            Ordering::Equal => {
                if let (Some((name, before)), Some((_, after))) = (old.next(), new.next())
                    && !Arc::ptr_eq(before, after)
                    && before.version != after.version
                {
                    changed.insert(name.clone());
                }
            }
        }
    }
}

/// How bursts of catalog changes are coalesced.
#[derive(Debug, Clone, Copy)]
pub struct Debounce {
    /// Quiet time after the last change before translating.
    pub quiet: Duration,
    /// Upper bound from the first change of a burst.
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Self {
            quiet: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        }
    }
}

/// Translates each (coalesced) catalog change into a new snapshot until
/// `cancel`. The first loaded catalog is translated without delay.
pub async fn run_translation(
    mut catalog: watch::Receiver<Arc<CatalogSnapshot>>,
    mut policy: watch::Receiver<Arc<PolicyOverrides>>,
    cache: Arc<SnapshotCache>,
    mut translator: Translator,
    debounce: Debounce,
    secrets: Option<Arc<SecretStore>>,
    cancel: CancellationToken,
) {
    let mut first = true;
    let mut secret_changes = secrets.as_ref().map(|s| s.subscribe());
    loop {
        let current = catalog.borrow_and_update().clone();
        let overrides = policy.borrow_and_update().clone();
        if let Some(changes) = &mut secret_changes {
            changes.borrow_and_update();
        }
        if current.is_loaded() {
            let started = Instant::now();
            let mut maps = translator.translate_with(&current, &overrides.weights);
            if let Some(store) = &secrets {
                maps[ResourceType::Secret.index()] = store.sync(&crate::secrets::wanted(&current));
            }
            let grpc = translator.grpc_resources();
            metrics::histogram!("ferry_xds_translate_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("ferry_xds_services_translated_total")
                .increment(translator.last_translated() as u64);
            cache.publish_all(maps, grpc, &current, overrides.version);
            first = false;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = catalog.changed() => if changed.is_err() { return },
            changed = policy.changed() => if changed.is_err() { return },
            changed = secret_change(&mut secret_changes) => if changed.is_err() { return },
        }
        if !first {
            coalesce(&mut catalog, debounce, &cancel).await;
        }
    }
}

/// A served secret changed; never, without a store.
async fn secret_change(
    changes: &mut Option<watch::Receiver<u64>>,
) -> Result<(), watch::error::RecvError> {
    match changes {
        Some(changes) => changes.changed().await,
        None => std::future::pending().await,
    }
}

async fn coalesce(
    catalog: &mut watch::Receiver<Arc<CatalogSnapshot>>,
    debounce: Debounce,
    cancel: &CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + debounce.max_delay;
    loop {
        let quiet_end = (tokio::time::Instant::now() + debounce.quiet).min(deadline);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(quiet_end) => return,
            changed = catalog.changed() => {
                if changed.is_err() || tokio::time::Instant::now() >= deadline {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::TranslateOptions;
    use ferry_discovery::Catalog;
    use ferry_discovery::file::parse_catalog;
    use std::path::Path;

    fn services(port: u16) -> Vec<ferry_discovery::Service> {
        let text = format!(
            "services:\n  - name: a\n    namespace: b\n    ports: [{{name: http, port: 80}}]\n    backends: {{old: {{endpoints: [\"127.0.0.1:{port}\"]}}}}\n"
        );
        parse_catalog(Path::new("t.yaml"), &text).unwrap()
    }

    #[test]
    fn snapshots_record_what_changed() {
        let catalog = Catalog::new();
        let cache = SnapshotCache::new();
        let mut t = Translator::new(TranslateOptions::default());
        catalog.replace(services(1));
        assert!(cache.publish(t.translate(&catalog.current()), &catalog.current()));
        assert_eq!(cache.current().version, 1);
        assert!(!cache.publish(t.translate(&catalog.current()), &catalog.current()));

        catalog.replace(services(2));
        assert!(cache.publish(t.translate(&catalog.current()), &catalog.current()));
        let s = cache.current();
        assert_eq!(s.version, 2);
        assert_eq!(s.changed[ResourceType::Endpoint.index()].len(), 1);
        assert!(s.changed[ResourceType::Cluster.index()].is_empty());
        assert!(s.changed[ResourceType::Route.index()].is_empty());
    }

    #[test]
    fn changed_names_cover_added_updated_and_removed() {
        let resource = |name: &str, port: u16| {
            let body = ferry_proto::envoy::config::core::v3::SocketAddress {
                port_specifier: Some(
                    ferry_proto::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                        u32::from(port),
                    ),
                ),
                ..Default::default()
            };
            (
                name.to_owned(),
                Arc::new(Resource::new(name.to_owned(), &body)),
            )
        };
        let shared = resource("b", 1);
        let old = BTreeMap::from([
            resource("a", 1),
            shared.clone(),
            resource("c", 1),
            resource("d", 1),
        ]);
        // "a" is re-made with the same content, "c" with another, "d" is
        // gone and "e" is new; "b" is the very same resource.
        let new = BTreeMap::from([resource("a", 1), shared, resource("c", 2), resource("e", 1)]);
        let changed: Vec<_> = changed_names(&old, &new).into_iter().collect();
        assert_eq!(changed, ["c", "d", "e"]);
        assert!(changed_names(&new, &new).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_are_coalesced_into_one_snapshot() {
        let catalog = Arc::new(Catalog::new());
        let cache = Arc::new(SnapshotCache::new());
        let cancel = CancellationToken::new();
        catalog.replace(services(1));
        let (_policy, policy_rx) = watch::channel(Arc::new(PolicyOverrides::default()));
        let task = tokio::spawn(run_translation(
            catalog.subscribe(),
            policy_rx,
            cache.clone(),
            Translator::new(TranslateOptions::default()),
            Debounce::default(),
            None,
            cancel.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(cache.current().version, 1);
        for port in 2..12 {
            catalog.replace(services(port));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            cache.current().version,
            2,
            "ten changes in a burst, one push"
        );
        assert_eq!(cache.current().catalog_version, 11);
        cancel.cancel();
        task.await.unwrap();
    }
}
