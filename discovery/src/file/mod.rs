//! The static catalog file source: a YAML file of services, parsed and
//! validated as a whole, watched for edits.
//!
//! An edit is applied without a restart. A file that fails to parse or
//! validate is refused whole with an error naming the file, the service and
//! the field; the last good catalog keeps being served and the error is
//! kept in [`FileStatus`] and counted in `ferry_discovery_catalog_errors_total`.
//! Hostile or broken input is refused before it costs much: files over
//! [`MAX_FILE_BYTES`], YAML anchors and aliases, nesting deeper than
//! [`MAX_DEPTH`] ([`bounds`]), and loads that would withdraw most services
//! at once ([`removal`]).
//!
//! ```yaml
//! services:
//!   - name: checkout
//!     namespace: shop
//!     ports: [{name: http, port: 8080}]
//!     hosts: [checkout.example.com]
//!     backends:
//!       old: {endpoints: ["127.0.0.1:9001", {address: "127.0.0.1:9002", ready: false, zone: a}]}
//!       new: {endpoints: ["127.0.0.1:9101"]}
//!     weights: {old: 9000, new: 1000}
//! ```

pub mod bounds;
pub mod removal;
mod schema;
mod validate;
mod watch;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use bounds::{BoundsError, MAX_DEPTH, MAX_FILE_BYTES};
pub use removal::{RemovalError, RemovalLimit};
pub use watch::{FileSource, FileStatus};

use crate::kubernetes::KubernetesConfig;
use crate::model::Service;
use crate::untrusted;
use schema::RawCatalog;
use validate::Validator;

/// How much of an offending value an error message quotes.
pub const QUOTE_BYTES: usize = 200;

/// Why a catalog file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the file is larger than {MAX_FILE_BYTES} bytes; refused unread")]
    TooLarge { path: PathBuf },
    #[error("{path}: {source}")]
    Bounds {
        path: PathBuf,
        #[source]
        source: BoundsError,
    },
    #[error("{path}: invalid YAML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: service {service}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        service: String,
        field: String,
        reason: String,
    },
    #[error("{path}: {source}")]
    Removal {
        path: PathBuf,
        #[source]
        source: RemovalError,
    },
}

/// Everything a catalog file describes.
#[derive(Debug, Clone, Default)]
pub struct CatalogFile {
    pub services: Vec<Service>,
    pub kubernetes: KubernetesConfig,
}

impl CatalogFile {
    /// Whether the file describes nothing to serve: no service and no
    /// Kubernetes cluster (or cluster Secrets) to discover any from.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.kubernetes.discovers()
    }
}

/// Parses and validates catalog YAML. `path` only names the source in
/// errors and anchors relative kubeconfig paths.
pub fn parse_catalog_file(path: &Path, text: &str) -> Result<CatalogFile, CatalogError> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(CatalogError::TooLarge {
            path: path.to_owned(),
        });
    }
    bounds::check(text).map_err(|source| CatalogError::Bounds {
        path: path.to_owned(),
        source,
    })?;
    let raw: RawCatalog = serde_yaml_ng::from_str(text).map_err(|e| CatalogError::Parse {
        path: path.to_owned(),
        message: untrusted::quote(&e.to_string(), QUOTE_BYTES),
    })?;
    let kubernetes = raw.kubernetes;
    let mut validator = Validator::new(path);
    let services = validator.catalog(raw.services)?;
    let kubernetes = kubernetes
        .map(|k| validator.kubernetes(k))
        .transpose()?
        .unwrap_or_default();
    Ok(CatalogFile {
        services,
        kubernetes,
    })
}

/// Parses and validates catalog YAML, returning its static services.
pub fn parse_catalog(path: &Path, text: &str) -> Result<Vec<Service>, CatalogError> {
    parse_catalog_file(path, text).map(|f| f.services)
}

/// Reads a catalog file's text, refusing one over [`MAX_FILE_BYTES`]
/// without reading it all.
pub fn read_catalog_text(path: &Path) -> Result<String, CatalogError> {
    let read = |source| CatalogError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(CatalogError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(text)
}

/// Reads, parses and validates a catalog file.
pub fn load_catalog_file(path: &Path) -> Result<CatalogFile, CatalogError> {
    parse_catalog_file(path, &read_catalog_text(path)?)
}

/// Reads, parses and validates a catalog file, returning its services.
pub fn load_catalog(path: &Path) -> Result<Vec<Service>, CatalogError> {
    load_catalog_file(path).map(|f| f.services)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    const GOOD: &str = "services:\n  - name: checkout\n    namespace: shop\n    ports: [{name: http, port: 8080}]\n    backends:\n      old: {endpoints: [\"127.0.0.1:9001\", {address: \"10.0.0.2\", ready: false}]}\n    weights: {old: 10000}\n";

    /// Fragments of catalog syntax, so generated text reaches the
    /// validator as often as the YAML parser.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("services:\n".to_owned()),
            Just("  - name: a\n".to_owned()),
            Just("    ports: [{name: http, port: 80}]\n".to_owned()),
            Just("    backends: {old: {endpoints: [\"127.0.0.1:1\"]}}\n".to_owned()),
            Just("    weights: {old: 10000}\n".to_owned()),
            Just("kubernetes: {clusters: [{name: x, in_cluster: true}]}\n".to_owned()),
            Just("&a ".to_owned()),
            Just("*a".to_owned()),
            Just("[".to_owned()),
            Just("{".to_owned()),
            "[ -~\n]{0,24}",
            any::<String>().prop_map(|s| s.chars().take(16).collect()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn no_catalog_text_panics_or_stalls(parts in proptest::collection::vec(fragment(), 0..24)) {
            let text: String = parts.concat();
            let started = Instant::now();
            let _ = parse_catalog_file(Path::new("fuzz.yaml"), &text);
            prop_assert!(started.elapsed() < Duration::from_secs(1), "{:?} took {:?}", text, started.elapsed());
        }

        #[test]
        fn mutated_good_catalogs_never_panic(at in 0usize..GOOD.len(), insert in "[ -~\n]{0,8}", cut in 0usize..8) {
            let mut text = GOOD.as_bytes().to_vec();
            let end = (at + cut).min(text.len());
            text.splice(at..end, insert.bytes());
            let text = String::from_utf8_lossy(&text);
            let started = Instant::now();
            let _ = parse_catalog_file(Path::new("fuzz.yaml"), &text);
            prop_assert!(started.elapsed() < Duration::from_secs(1));
        }
    }

    #[test]
    fn hostile_shapes_are_refused_before_parsing() {
        let path = Path::new("c.yaml");
        let mut bomb = String::from("a0: &a0 [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n");
        for i in 1..30 {
            bomb.push_str(&format!("a{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1));
        }
        let started = Instant::now();
        let e = parse_catalog_file(path, &bomb).unwrap_err();
        assert!(e.to_string().contains("anchors and aliases"), "{e}");
        let e =
            parse_catalog_file(path, &format!("services: {}", "[".repeat(100_000))).unwrap_err();
        assert!(e.to_string().contains("nested deeper than 64"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let huge = " ".repeat(MAX_FILE_BYTES as usize + 1);
        assert!(matches!(
            parse_catalog_file(path, &huge),
            Err(CatalogError::TooLarge { .. })
        ));
        for empty in ["", "# nothing\n", "services:\n", "services: []\n"] {
            assert!(
                parse_catalog_file(path, empty).unwrap().is_empty(),
                "{empty:?}"
            );
        }
        assert!(!parse_catalog_file(path, GOOD).unwrap().is_empty());
    }
}
