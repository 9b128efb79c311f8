//! Running an nginx of the comparison's own, for the backend and for the
//! nginx peer alike: in the foreground (`daemon off`), one process
//! (`master_process off`) for one worker, else a master and its workers;
//! its config, pid file, temporary files and log in a directory of its
//! own, so it never touches the system's nginx.

use std::path::Path;

use anyhow::Context;

use super::machine::pinned;
use super::process::Process;

/// The Debian package holding nginx.
pub const PACKAGE: &str = "nginx";

/// A whole nginx config: the main context for `workers` worker processes
/// in the foreground, writing everything under `dir`, and `http` as the
/// `http` block's body. One worker runs as the only process (nginx's
/// single-process mode ignores `worker_processes`).
pub fn config(dir: &Path, workers: usize, http: &str) -> String {
    let d = dir.display();
    let master = if workers <= 1 { "off" } else { "on" };
    let workers = workers.max(1);
    // Workers started by a master running as root would switch to
    // `nobody`, who may not enter `dir`; they stay the user the master is.
    let user = if running_as_root() {
        "user root;\n"
    } else {
        ""
    };
    format!(
        "{user}master_process {master};
daemon off;
worker_processes {workers};
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

/// Whether this process runs as root (its real user id is 0).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            == Some("0")
    })
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
        let text = config(Path::new("/tmp/x"), 1, "    server {}\n");
        assert!(text.contains("master_process off;"), "{text}");
        assert!(text.contains("worker_processes 1;"), "{text}");
        assert!(text.contains("daemon off;"), "{text}");
        assert!(text.contains("pid /tmp/x/nginx.pid;"), "{text}");
        assert!(text.contains("proxy_temp_path /tmp/x/proxy;"), "{text}");
        assert!(text.ends_with("    server {}\n}\n"), "{text}");
        let two = config(Path::new("/tmp/x"), 2, "");
        assert!(two.contains("master_process on;"), "{two}");
        assert!(two.contains("worker_processes 2;"), "{two}");
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(quoted("a \"b\"\n"), "\"a \\\"b\\\"\\n\"");
    }
}
