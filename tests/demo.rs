//! `ferry demo` as a newcomer runs it: the real binary, to its end, as
//! JSON, in a pipe, and on a terminal (under `script`, which gives it a
//! pseudo-terminal).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One demo at a time: each runs a control plane, proxies and load.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Flags that keep the demo off fixed ports (tests run side by side).
const ANY_PORTS: [&str; 10] = [
    "--admin-addr",
    "127.0.0.1:0",
    "--xds-addr",
    "127.0.0.1:0",
    "--api-addr",
    "127.0.0.1:0",
    "--proxy-addrs",
    "127.0.0.1:0,127.0.0.1:0",
    "--envoy-addr",
    "127.0.0.1:0",
];

fn demo(extra: &[&str]) -> (bool, String, String, Duration) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("demo")
        .args(["--fast"])
        .args(ANY_PORTS)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run ferry demo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn the_demo_moves_three_services_rolls_one_back_and_loses_no_request() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // With FERRY_ENVOY set (scripts/test.sh sets it), Envoy is a third
    // proxy carrying a share of the users.
    let envoy = std::env::var_os("FERRY_ENVOY").is_some();
    let (ok, out, err, took) = demo(&["-o", "json"]);
    assert!(ok, "{err}");
    assert!(took < Duration::from_secs(90), "took {took:?}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect(&out);
    let outcome = |service: &str| {
        summary["migrations"]
            .as_array()
            .expect("migrations")
            .iter()
            .find(|m| m["service"] == service)
            .map(|m| m["outcome"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(outcome("checkout.shop"), "DONE", "{summary:#}");
    assert_eq!(outcome("cart.shop"), "DONE", "{summary:#}");
    assert_eq!(outcome("search.shop"), "ROLLED_BACK", "{summary:#}");
    assert_eq!(outcome("payments.shop"), "PINNED", "{summary:#}");
    for m in summary["migrations"].as_array().expect("migrations") {
        assert!(m["duration_s"].as_f64().is_some(), "{m}");
    }
    let requests = &summary["requests"];
    assert_eq!(requests["failed"], 0, "{summary:#}");
    assert!(
        requests["total"].as_u64().unwrap_or(0) > 1_000,
        "{summary:#}"
    );
    assert!(
        requests["injected_errors"].as_u64().unwrap_or(0) > 0,
        "{summary:#}"
    );
    // The moved services ended on new; the pinned one never left old.
    let by = &requests["by_service"];
    assert!(
        by["checkout"]["new"].as_u64().unwrap_or(0) > 0,
        "{summary:#}"
    );
    assert!(by["payments"].get("new").is_none(), "{summary:#}");
    assert_eq!(summary["sticky"]["moved_back"], 0, "{summary:#}");
    assert!(
        summary["sticky"]["users"].as_u64().unwrap_or(0) > 100,
        "{summary:#}"
    );
    // Progress went to stderr, as lines.
    assert!(err.contains("search.shop     ROLLED_BACK"), "{err}");
    if envoy {
        assert!(err.contains("starting Envoy"), "{err}");
    }
}

#[test]
fn in_a_pipe_the_demo_prints_progress_lines_and_a_summary_table() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (ok, out, err, _) = demo(&[]);
    assert!(ok, "{err}");
    assert!(
        !out.contains('\u{1b}'),
        "no terminal control codes in a pipe"
    );
    assert!(out.contains("checkout.shop   SHIFT step 1/3"), "{out}");
    assert!(out.contains("web console: http://127.0.0.1:"), "{out}");
    assert!(out.contains("Ferry demo: summary"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("search.shop") && l.contains("ROLLED_BACK")),
        "{out}"
    );
}

#[test]
fn on_a_terminal_the_demo_shows_a_live_view() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let command = format!(
        "stty rows 40 cols 140; {} demo --fast {}",
        env!("CARGO_BIN_EXE_ferry"),
        ANY_PORTS.join(" ")
    );
    let out = Command::new("script")
        .args(["-qefc", &command, "/dev/null"])
        .env("TERM", "xterm-256color")
        .env("COLUMNS", "140")
        .env("LINES", "40")
        .stdin(Stdio::null())
        .output()
        .expect("run ferry demo under script(1) (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // The alternate screen, drawn and left, then the summary.
    assert!(
        text.contains("\u{1b}[?1049h"),
        "entered the alternate screen"
    );
    assert!(text.contains("\u{1b}[?1049l"), "left it");
    assert!(text.contains("STAGE"), "the table's header");
    assert!(text.contains("web console: http://127.0.0.1:"));
    assert!(text.contains("Ferry demo: summary"));
}

#[test]
fn a_port_in_use_is_one_line_naming_the_flag_that_moves_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "demo",
            "--fast",
            "--admin-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .expect("run ferry demo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--admin-addr") && err.contains("in use"),
        "{err}"
    );
}
