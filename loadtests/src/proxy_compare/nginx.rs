//! Running an nginx of the comparison's own, for the backend and for the
//! nginx peer alike: one process (`master_process off`, `daemon off`, one
//! worker), its config, pid file, temporary files and log in a directory
//! of its own, so it never touches the system's nginx.

use std::path::Path;

use anyhow::Context;

use super::machine::pinned;
use super::process::Process;

/// The Debian package holding nginx.
pub const PACKAGE: &str = "nginx";

/// A whole nginx config: the main context for one foreground process
/// writing everything under `dir`, and `http` as the `http` block's body.
pub fn config(dir: &Path, http: &str) -> String {
    let d = dir.display();
    format!(
        "master_process off;
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    # nginx closes a keep-alive connection after 1,000 requests by default:
    # that would show as connections the peers did not choose to open.
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
{http}}}
"
    )
}

/// Writes `config` to `dir/nginx.conf` and starts nginx on `cores`.
pub fn spawn(
    name: &'static str,
    binary: &Path,
    cores: &str,
    dir: &Path,
    config: &str,
) -> anyhow::Result<Process> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("nginx.conf");
    std::fs::write(&file, config).with_context(|| format!("writing {}", file.display()))?;
    let mut command = pinned(cores, binary);
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&file)
        .args(["-e", "stderr"]);
    Process::spawn(name, command, dir.join("nginx.log"))
}

/// An nginx string literal holding `text`.
pub fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_stays_in_its_directory() {
        let text = config(Path::new("/tmp/x"), "    server {}\n");
        assert!(text.contains("master_process off;"), "{text}");
        assert!(text.contains("daemon off;"), "{text}");
        assert!(text.contains("pid /tmp/x/nginx.pid;"), "{text}");
        assert!(text.contains("proxy_temp_path /tmp/x/proxy;"), "{text}");
        assert!(text.ends_with("    server {}\n}\n"), "{text}");
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(quoted("a \"b\"\n"), "\"a \\\"b\\\"\\n\"");
    }
}
