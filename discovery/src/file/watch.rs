//! Watching the catalog file and applying each valid version of it.
//!
//! The file's directory is watched, not the file: editors replace files
//! by rename, and Kubernetes mounts a ConfigMap as `catalog.yaml ->
//! ..data/catalog.yaml` with `..data` a symlink it swaps atomically to a
//! new timestamped directory, an event that never names `catalog.yaml`.
//! When the file resolves to another directory (a symlink to a file kept
//! elsewhere), that directory is watched too. Each event re-reads the
//! resolved file and compares a hash of its content with the last one
//! read, so only a real change is parsed and applied.
//!
//! Reading and parsing run on a blocking thread: a large or hostile file
//! never stalls the async tasks serving xDS and the admin endpoint.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{CatalogError, CatalogFile, RemovalLimit, parse_catalog_file, read_catalog_text};
use crate::catalog::Catalog;
use crate::kubernetes::KubernetesConfig;
use crate::names::ServiceName;

/// The file source's health, for status pages.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FileStatus {
    pub path: PathBuf,
    pub loads: u64,
    pub errors: u64,
    pub last_loaded_at: Option<SystemTime>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    /// Static services in the catalog as last loaded.
    pub services: usize,
}

/// What one read of the file found.
enum Read {
    /// The same content as the last read: nothing to do.
    Unchanged,
    /// New content (its hash), parsed or refused.
    Parsed(u64, Result<CatalogFile, CatalogError>),
    /// The file could not be read.
    Failed(CatalogError),
}

/// Reads and parses the file at `path` unless its content hashes to
/// `last`. Blocking: runs on a blocking thread.
fn read(path: &Path, last: Option<u64>) -> Read {
    let text = match read_catalog_text(path) {
        Ok(text) => text,
        Err(e) => return Read::Failed(e),
    };
    let hash = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
    if last == Some(hash) {
        return Read::Unchanged;
    }
    Read::Parsed(hash, parse_catalog_file(path, &text))
}

/// The metric label of a refusal.
fn reason(e: &CatalogError) -> &'static str {
    match e {
        CatalogError::Read { .. } => "read",
        CatalogError::TooLarge { .. } => "too_large",
        CatalogError::Bounds { .. } => "bounds",
        CatalogError::Parse { .. } => "parse",
        CatalogError::Invalid { .. } => "invalid",
        CatalogError::Removal { .. } => "mass_removal",
    }
}

/// Watches a catalog file and replaces the catalog on every valid edit.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    limit: RemovalLimit,
    status: Arc<Mutex<FileStatus>>,
    kubernetes: tokio::sync::watch::Sender<KubernetesConfig>,
    /// The static services of the last good load, for the removal limit.
    last_good: Mutex<Option<BTreeSet<ServiceName>>>,
    /// The hash of the content last read, good or not.
    last_read: Mutex<Option<u64>>,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let status = FileStatus {
            path: path.clone(),
            ..FileStatus::default()
        };
        Self {
            path,
            limit: RemovalLimit::default(),
            status: Arc::new(Mutex::new(status)),
            kubernetes: tokio::sync::watch::channel(KubernetesConfig::default()).0,
            last_good: Mutex::new(None),
            last_read: Mutex::new(None),
        }
    }

    /// How much of the catalog one load may remove.
    pub fn with_removal_limit(mut self, limit: RemovalLimit) -> Self {
        self.limit = limit;
        self
    }

    /// The file's `kubernetes:` section, as of its last valid version.
    pub fn kubernetes(&self) -> tokio::sync::watch::Receiver<KubernetesConfig> {
        self.kubernetes.subscribe()
    }

    /// A handle on the source's status, updated as it runs.
    pub fn status(&self) -> Arc<Mutex<FileStatus>> {
        self.status.clone()
    }

    /// Loads the file once into `catalog`, recording the outcome.
    pub fn reload(&self, catalog: &Catalog) -> Result<(), CatalogError> {
        match read(&self.path, None) {
            Read::Unchanged => Ok(()),
            Read::Parsed(hash, result) => self.apply(hash, result, catalog),
            Read::Failed(e) => Err(self.refuse(e)),
        }
    }

    /// Reads the file on a blocking thread and applies it when it changed.
    async fn reload_if_changed(&self, catalog: &Catalog) {
        let path = self.path.clone();
        let last = *lock(&self.last_read);
        let outcome = tokio::task::spawn_blocking(move || read(&path, last)).await;
        match outcome {
            Ok(Read::Unchanged) => {}
            Ok(Read::Parsed(hash, result)) => {
                let _ = self.apply(hash, result, catalog);
            }
            Ok(Read::Failed(e)) => {
                let _ = self.refuse(e);
            }
            Err(e) => tracing::error!(error = %e, "catalog file reader panicked"),
        }
    }

    /// Applies a parsed file, unless the removal limit refuses it.
    fn apply(
        &self,
        hash: u64,
        result: Result<CatalogFile, CatalogError>,
        catalog: &Catalog,
    ) -> Result<(), CatalogError> {
        *lock(&self.last_read) = Some(hash);
        let file = result.map_err(|e| self.refuse(e))?;
        let names: BTreeSet<ServiceName> = file.services.iter().map(|s| s.name.clone()).collect();
        let sources = file.kubernetes.discovers();
        let checked = self
            .limit
            .check(lock(&self.last_good).as_ref(), &names, sources);
        if let Err(source) = checked {
            return Err(self.refuse(CatalogError::Removal {
                path: self.path.clone(),
                source,
            }));
        }
        let count = file.services.len();
        let changed = catalog.replace(file.services);
        self.kubernetes.send_if_modified(|k| {
            let differs = *k != file.kubernetes;
            if differs {
                *k = file.kubernetes;
            }
            differs
        });
        *lock(&self.last_good) = Some(names);
        tracing::info!(path = %self.path.display(), services = count, changed, "catalog file loaded");
        let mut status = lock(&self.status);
        status.loads += 1;
        status.services = count;
        status.last_loaded_at = Some(SystemTime::now());
        status.last_error = None;
        metrics::gauge!("ferry_discovery_catalog_file_valid").set(1.0);
        metrics::gauge!("ferry_discovery_catalog_file_services").set(count as f64);
        Ok(())
    }

    /// Records a refused file; the last good catalog keeps serving.
    fn refuse(&self, e: CatalogError) -> CatalogError {
        if matches!(e, CatalogError::Read { .. }) {
            // Whatever comes back next is read afresh.
            *lock(&self.last_read) = None;
        }
        let mut status = lock(&self.status);
        status.errors += 1;
        status.last_error = Some(e.to_string());
        status.last_error_at = Some(SystemTime::now());
        let reason = reason(&e);
        metrics::counter!("ferry_discovery_catalog_errors_total").increment(1);
        metrics::counter!("ferry_discovery_catalog_refused_total", "reason" => reason).increment(1);
        metrics::gauge!("ferry_discovery_catalog_file_valid").set(0.0);
        if reason == "mass_removal" {
            tracing::warn!(error = %e, "catalog file refused: it would withdraw most services; still serving the last good catalog");
        } else {
            tracing::error!(error = %e, reason, "catalog file refused; still serving the last good catalog");
        }
        e
    }

    /// Loads the file, then reloads it on every change until `cancel`.
    pub async fn run(
        self,
        catalog: Arc<Catalog>,
        cancel: CancellationToken,
    ) -> Result<(), notify::Error> {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let interest = Arc::new(Mutex::new(Interest::new(&self.path)));
        let mut watcher = notify::recommended_watcher({
            let interest = interest.clone();
            move |event: notify::Result<notify::Event>| {
                if lock(&interest).relevant(&event) {
                    // A full channel already holds a pending reload.
                    let _ = tx.try_send(());
                }
            }
        })?;
        // Never hold `interest` across a watcher call: the watcher's thread
        // may be waiting for it in the callback.
        let dir = lock(&interest).dir.clone();
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        self.reload_if_changed(&catalog).await;
        follow_target(&mut watcher, &interest, &self.path);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                event = rx.recv() => {
                    if event.is_none() {
                        return Ok(());
                    }
                    // Let a burst of writes settle before reading.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    while rx.try_recv().is_ok() {}
                    self.reload_if_changed(&catalog).await;
                    follow_target(&mut watcher, &interest, &self.path);
                }
            }
        }
    }
}

/// Which events may change what the catalog path resolves to.
struct Interest {
    /// The directory holding the catalog path.
    dir: PathBuf,
    file_name: Option<OsString>,
    /// The directory the path resolves to, when another one.
    target_dir: Option<PathBuf>,
}

impl Interest {
    fn new(path: &Path) -> Self {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        Self {
            dir,
            file_name: path.file_name().map(|n| n.to_owned()),
            target_dir: None,
        }
    }

    fn relevant(&self, event: &notify::Result<notify::Event>) -> bool {
        let Ok(event) = event else {
            return true;
        };
        // Reading the file raises access events: only content and name
        // changes matter, or every reload would trigger another.
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return false;
        }
        event.paths.iter().any(|p| {
            let name = p.file_name();
            name == self.file_name.as_deref()
                // Kubernetes' atomic writer: `..data`, `..2026_…`.
                || name.is_some_and(|n| n.as_encoded_bytes().starts_with(b".."))
                || (self.target_dir.is_some() && p.parent() == self.target_dir.as_deref())
        })
    }
}

/// Watches the directory `path` now resolves to, when that is not the
/// directory already watched, and stops watching the one it left.
fn follow_target(watcher: &mut impl Watcher, interest: &Mutex<Interest>, path: &Path) {
    let resolved = std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned));
    // The lock is not held across watcher calls (see `FileSource::run`).
    let (dir, current) = {
        let interest = lock(interest);
        (interest.dir.clone(), interest.target_dir.clone())
    };
    let own = std::fs::canonicalize(&dir).ok();
    let target = resolved.filter(|t| Some(t) != own.as_ref());
    if target == current {
        return;
    }
    if let Some(old) = &current {
        let _ = watcher.unwatch(old);
    }
    if let Some(dir) = &target {
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                tracing::debug!(dir = %dir.display(), "watching the catalog's target directory")
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the catalog's target directory; edits there are seen only with other changes")
            }
        }
    }
    lock(interest).target_dir = target;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - name: checkout
    namespace: shop
    ports: [{name: http, port: 8080}]
    backends:
      old: {endpoints: ["127.0.0.1:9001"]}
      new: {endpoints: ["127.0.0.1:9101"]}
    weights: {old: 9000, new: 1000}
"#;

    #[test]
    fn a_refused_edit_keeps_the_last_good_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let catalog = Catalog::new();
        let source = FileSource::new(&path);
        source.reload(&catalog).unwrap();
        let good = catalog.current();

        std::fs::write(&path, GOOD.replace("9000", "9001")).unwrap();
        assert!(source.reload(&catalog).is_err());
        assert_eq!(catalog.current().version, good.version);
        let status = source.status();
        let status = status.lock().unwrap();
        assert!(
            status
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("weights")
        );
        assert_eq!(status.errors, 1);
    }

    #[test]
    fn an_emptied_file_keeps_the_last_good_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let catalog = Catalog::new();
        let source = FileSource::new(&path);
        source.reload(&catalog).unwrap();
        for text in ["", "# only a comment\n", "services:\n", "services: []\n"] {
            std::fs::write(&path, text).unwrap();
            let e = source.reload(&catalog).unwrap_err();
            assert!(matches!(e, CatalogError::Removal { .. }), "{text:?}: {e}");
            assert_eq!(catalog.current().services.len(), 1, "{text:?}");
        }
        let allowed = FileSource::new(&path).with_removal_limit(RemovalLimit {
            allow: true,
            ..RemovalLimit::default()
        });
        allowed.reload(&catalog).unwrap();
        assert!(catalog.current().services.is_empty());
    }
}
