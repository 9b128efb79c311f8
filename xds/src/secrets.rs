//! Upstream TLS material served as SDS `Secret` resources over ADS.
//!
//! A service's `tls` in the catalog names files: the CA bundle its
//! endpoints' certificates chain to, and the proxies' client certificate
//! and key for endpoints that require mutual TLS. Ferry reads those files
//! where the control plane runs and serves their content as secrets; each
//! cluster's `UpstreamTlsContext` refers to them by name. So the files
//! live only with the control plane, and a renewed certificate reaches
//! every proxy as a secret update, with no cluster change.
//!
//! The files are checked for changes every reload interval. A secret whose
//! files cannot be read or parsed keeps serving its last good content, and
//! `/status` says why (`ferry_xds_secret_reloads_total{secret,result}`,
//! `ferry_xds_secret_stale{secret}` is 1 meanwhile).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use ferry_discovery::CatalogSnapshot;
use ferry_discovery::model::UpstreamTls;
use ferry_proto::envoy::config::core::v3::{DataSource, data_source};
use ferry_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use crate::resources::Resource;

/// What a secret is made of: which files, read how.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SecretFiles {
    /// A CA bundle: a validation context.
    Ca { ca_file: PathBuf },
    /// A certificate chain and its key: a TLS certificate.
    Certificate {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

impl SecretFiles {
    /// The secret's name: its kind and a hash of its paths, so services
    /// naming the same files share one secret.
    pub fn name(&self) -> String {
        let (kind, paths) = match self {
            Self::Ca { ca_file } => ("ca", ca_file.display().to_string()),
            Self::Certificate {
                cert_file,
                key_file,
            } => (
                "cert",
                format!("{}\n{}", cert_file.display(), key_file.display()),
            ),
        };
        format!("ferry-{kind}-{:016x}", xxh3_64(paths.as_bytes()))
    }

    fn paths(&self) -> Vec<&Path> {
        match self {
            Self::Ca { ca_file } => vec![ca_file],
            Self::Certificate {
                cert_file,
                key_file,
            } => vec![cert_file, key_file],
        }
    }

    /// Reads and checks the files, and makes the secret.
    fn load(&self, name: &str) -> Result<Secret, String> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
        };
        let inline = |bytes: Vec<u8>| DataSource {
            specifier: Some(data_source::Specifier::InlineBytes(bytes)),
            ..Default::default()
        };
        let kind = match self {
            Self::Ca { ca_file } => {
                let pem = read(ca_file)?;
                certificates(ca_file, &pem)?;
                secret::Type::ValidationContext(CertificateValidationContext {
                    trusted_ca: Some(inline(pem)),
                    ..Default::default()
                })
            }
            Self::Certificate {
                cert_file,
                key_file,
            } => {
                let chain = read(cert_file)?;
                certificates(cert_file, &chain)?;
                let key = read(key_file)?;
                PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
                    format!("{}: no usable PEM private key: {e}", key_file.display())
                })?;
                secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: Some(inline(chain)),
                    private_key: Some(inline(key)),
                    ..Default::default()
                })
            }
        };
        Ok(Secret {
            name: name.to_owned(),
            r#type: Some(kind),
        })
    }
}

/// The PEM certificates of a file; at least one.
fn certificates(path: &Path, pem: &[u8]) -> Result<(), String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: malformed PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(())
}

/// The secrets a service's TLS uses: (validation context, client
/// certificate).
pub fn secrets_of(tls: &UpstreamTls) -> (SecretFiles, Option<SecretFiles>) {
    (
        SecretFiles::Ca {
            ca_file: tls.ca_file.clone(),
        },
        tls.client_cert.as_ref().map(|c| SecretFiles::Certificate {
            cert_file: c.cert_file.clone(),
            key_file: c.key_file.clone(),
        }),
    )
}

/// Every secret the catalog's services use.
pub fn wanted(catalog: &CatalogSnapshot) -> BTreeSet<SecretFiles> {
    let mut wanted = BTreeSet::new();
    for service in catalog.services.values() {
        if let Some(tls) = &service.requests.tls {
            let (ca, cert) = secrets_of(tls);
            wanted.insert(ca);
            wanted.extend(cert);
        }
    }
    wanted
}

/// One secret as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecretStatus {
    pub name: String,
    pub files: SecretFiles,
    /// The version served (a hash of the content), if it ever loaded.
    pub version: Option<String>,
    pub loaded_at: Option<SystemTime>,
    /// Why the files are not served as they are now: the last good
    /// content (if any) is.
    pub error: Option<String>,
}

#[derive(Debug)]
struct Entry {
    files: SecretFiles,
    served: Option<Arc<Resource>>,
    loaded_at: Option<SystemTime>,
    error: Option<String>,
    /// The files' (modified, length) when last read.
    stamps: Vec<Option<(Option<SystemTime>, u64)>>,
}

impl Entry {
    fn new(files: SecretFiles) -> Self {
        Self {
            files,
            served: None,
            loaded_at: None,
            error: None,
            stamps: Vec::new(),
        }
    }

    fn stamps(&self) -> Vec<Option<(Option<SystemTime>, u64)>> {
        self.files
            .paths()
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(p).ok()?;
                Some((meta.modified().ok(), meta.len()))
            })
            .collect()
    }

    /// Reads the files; whether what is served changed.
    fn load(&mut self, name: &str) -> bool {
        self.stamps = self.stamps();
        match self.files.load(name) {
            Ok(secret) => {
                let resource = Resource::new(name.to_owned(), &secret);
                let changed = self
                    .served
                    .as_ref()
                    .is_none_or(|r| r.version != resource.version);
                if changed {
                    tracing::info!(secret = name, version = %resource.version, "secret loaded");
                    metrics::counter!("ferry_xds_secret_reloads_total", "secret" => name.to_owned(), "result" => "ok")
                        .increment(1);
                    self.served = Some(Arc::new(resource));
                    self.loaded_at = Some(SystemTime::now());
                }
                self.error = None;
                metrics::gauge!("ferry_xds_secret_stale", "secret" => name.to_owned()).set(0.0);
                changed
            }
            Err(e) => {
                if self.error.as_ref() != Some(&e) {
                    tracing::warn!(secret = name, error = %e, "secret files unusable; serving the last good content");
                    metrics::counter!("ferry_xds_secret_reloads_total", "secret" => name.to_owned(), "result" => "error")
                        .increment(1);
                }
                self.error = Some(e);
                metrics::gauge!("ferry_xds_secret_stale", "secret" => name.to_owned()).set(1.0);
                false
            }
        }
    }
}

/// The secrets the catalog uses, read from their files and kept current.
#[derive(Debug)]
pub struct SecretStore {
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Bumped whenever a served secret changes, so translation publishes.
    changed: watch::Sender<u64>,
}

impl Default for SecretStore {
    fn default() -> Self {
        Self {
            entries: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl SecretStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves exactly the secrets `wanted` names: new ones are read now,
    /// ones no longer used are dropped. The secret resources to serve.
    pub fn sync(&self, wanted: &BTreeSet<SecretFiles>) -> BTreeMap<String, Arc<Resource>> {
        let mut entries = self.lock();
        let names: BTreeMap<String, &SecretFiles> = wanted.iter().map(|f| (f.name(), f)).collect();
        entries.retain(|name, _| {
            let keep = names.contains_key(name);
            if !keep {
                metrics::gauge!("ferry_xds_secret_stale", "secret" => name.clone()).set(0.0);
            }
            keep
        });
        for (name, files) in names {
            entries.entry(name.clone()).or_insert_with(|| {
                let mut entry = Entry::new(files.clone());
                entry.load(&name);
                entry
            });
        }
        entries
            .iter()
            .filter_map(|(name, e)| Some((name.clone(), e.served.clone()?)))
            .collect()
    }

    /// Notified whenever a served secret's content changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Reads every secret whose files changed since last read.
    pub fn poll(&self) {
        let mut any = false;
        for (name, entry) in self.lock().iter_mut() {
            if entry.stamps() != entry.stamps || entry.error.is_some() {
                any |= entry.load(name);
            }
        }
        if any {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Polls the files every `every` until `cancel`.
    pub async fn watch(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        let mut ticks = tokio::time::interval(every.max(Duration::from_millis(100)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let this = self.clone();
            // Reading files blocks: off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || this.poll()).await;
        }
    }

    /// Every secret, for `/status`.
    pub fn status(&self) -> Vec<SecretStatus> {
        self.lock()
            .iter()
            .map(|(name, e)| SecretStatus {
                name: name.clone(),
                files: e.files.clone(),
                version: e.served.as_ref().map(|r| r.version.clone()),
                loaded_at: e.loaded_at,
                error: e.error.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBeTCCAR+gAwIBAgIUZmVycnktdGVzdC1jYS0wMDAwMDEwCgYIKoZIzj0EAwIw\n-----END CERTIFICATE-----\n";

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    fn trusted_ca(resource: &Resource) -> Vec<u8> {
        let secret = Secret::decode(resource.body.value.as_slice()).unwrap();
        let Some(secret::Type::ValidationContext(v)) = secret.r#type else {
            panic!("not a validation context: {secret:?}");
        };
        match v.trusted_ca.and_then(|d| d.specifier) {
            Some(data_source::Specifier::InlineBytes(b)) => b,
            other => panic!("not inline: {other:?}"),
        }
    }

    #[test]
    fn secrets_follow_their_files_and_keep_the_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        let first = ca_pem();
        std::fs::write(&path, &first).unwrap();
        let files = SecretFiles::Ca {
            ca_file: path.clone(),
        };
        let name = files.name();
        assert!(name.starts_with("ferry-ca-"), "{name}");
        let store = SecretStore::new();
        let mut changes = store.subscribe();
        let wanted = BTreeSet::from([files.clone()]);
        let served = store.sync(&wanted);
        assert_eq!(trusted_ca(&served[&name]), first.as_bytes());

        // A renewed bundle: served, and translation is told.
        let second = ca_pem();
        std::fs::write(&path, format!("{second}\n")).unwrap();
        store.poll();
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        let served = store.sync(&wanted);
        assert_eq!(trusted_ca(&served[&name]), format!("{second}\n").as_bytes());

        // Broken: the last good content stays, and the status says why.
        std::fs::write(&path, CA.replace("MII", "!!!")).unwrap();
        store.poll();
        assert!(!changes.has_changed().unwrap());
        let served = store.sync(&wanted);
        assert_eq!(trusted_ca(&served[&name]), format!("{second}\n").as_bytes());
        let status = store.status();
        assert!(
            status[0]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("ca.pem")),
            "{status:?}"
        );

        // No longer used: dropped.
        assert!(store.sync(&BTreeSet::new()).is_empty());
        assert!(store.status().is_empty());
    }

    #[test]
    fn a_secret_that_never_loaded_is_not_served_and_says_why() {
        let files = SecretFiles::Certificate {
            cert_file: "/nonexistent/client.pem".into(),
            key_file: "/nonexistent/client.key".into(),
        };
        let store = SecretStore::new();
        assert!(store.sync(&BTreeSet::from([files])).is_empty());
        let status = store.status();
        assert!(status[0].version.is_none());
        assert!(
            status[0]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("/nonexistent/client.pem")),
            "{status:?}"
        );
    }
}
