//! What exactly was measured: the commit of the source tree and, for every
//! binary run, its path, version and SHA-256, so two result files can be
//! told apart without trusting their names.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use serde::Serialize;

/// The source tree the harness ran from.
#[derive(Debug, Clone, Serialize)]
pub struct Commit {
    /// `git rev-parse HEAD`.
    pub id: String,
    /// Uncommitted changes to tracked files: the binaries may not be the
    /// commit's.
    pub dirty: bool,
}

/// The commit of the git work tree holding `dir`; `None` outside one (a
/// source archive) or without git.
pub fn commit(dir: &Path) -> Option<Commit> {
    let git = |args: &[&str]| {
        let output = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let id = git(&["rev-parse", "HEAD"])?;
    // Result files are written by the runs themselves: not a change to
    // what was measured.
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ":(top,exclude)loadtests/results",
    ])
    .is_some_and(|changes| !changes.is_empty());
    Some(Commit { id, dirty })
}

/// One binary the run started.
#[derive(Debug, Clone, Serialize)]
pub struct Binary {
    pub name: &'static str,
    pub path: PathBuf,
    pub version: String,
    /// Lowercase hex.
    pub sha256: String,
}

impl Binary {
    pub fn describe(name: &'static str, path: &Path, version: String) -> anyhow::Result<Self> {
        Ok(Self {
            name,
            path: path.to_owned(),
            version,
            sha256: sha256_file(path)?,
        })
    }
}

/// The SHA-256 of a file's bytes, in lowercase hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0; 1 << 16];
    loop {
        let n = file
            .read(&mut buffer)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        context.update(&buffer[..n]);
    }
    Ok(context
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// `name` as a path: itself if it holds a `/`, else the first match on
/// `PATH` or in `/usr/sbin` (where Debian puts nginx and HAProxy, and
/// which a user's `PATH` may lack).
pub fn locate(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("abc");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(
            sha256_file(&file).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn names_the_commit_of_this_tree() {
        // The crate's own directory: a work tree in development and CI.
        let commit = commit(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert_eq!(commit.id.len(), 40, "{commit:?}");
        assert!(commit.id.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn finds_programs_on_the_path() {
        assert!(locate(Path::new("sh")).is_some());
        assert!(locate(Path::new("no-such-program-here")).is_none());
        assert!(locate(Path::new("/no/such/file")).is_none());
    }
}
