//! `ferry demo`: the whole system on this machine, on loopback only, with
//! nothing to install or write. Two simulated Kubernetes clusters (`old`
//! and `new`, real list/watch API servers) run real HTTP pods; a real
//! `ferry control` watches them with kube-rs and configures two real
//! `ferry proxy` instances (and Envoy, when given) over delta xDS; a
//! steady load of sticky users goes through the proxies while three
//! services migrate from `old` to `new` (one of them, with an injected
//! fault, rolls back) and a fourth stays pinned by its deploy tool. A live
//! view shows every stage, step, weight and per-cluster figure; the web
//! console shows the same from the control plane.

mod clusters;
mod drive;
mod load;
mod pods;
mod procs;
mod scenario;
mod view;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use scenario::{Pace, SERVICES};

/// How the demo reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A live view, then a summary table.
    Table,
    /// Progress on stderr, then one JSON object on stdout.
    Json,
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Short bakes: the whole demo ends within a minute.
    #[arg(long)]
    fast: bool,
    /// Keep everything running after the migrations end, until Ctrl-C.
    #[arg(long)]
    hold: bool,
    /// Requests per second the users send, over all services.
    #[arg(long, default_value_t = 200.0, value_name = "N")]
    rate: f64,
    /// Also run this Envoy binary as a third proxy.
    #[arg(long, env = "FERRY_ENVOY", value_name = "PATH")]
    envoy: Option<PathBuf>,
    /// Output: a live view and a table, or JSON.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// The control plane's admin address: the web console (port 0: any).
    #[arg(long, default_value = "127.0.0.1:19000", value_name = "ADDR")]
    admin_addr: SocketAddr,
    /// The control plane's xDS address.
    #[arg(long, default_value = "127.0.0.1:18000", value_name = "ADDR")]
    xds_addr: SocketAddr,
    /// The control plane's traffic and migrations API.
    #[arg(long, default_value = "127.0.0.1:18001", value_name = "ADDR")]
    api_addr: SocketAddr,
    /// Where the two Ferry proxies take user traffic.
    #[arg(
        long,
        default_values = ["127.0.0.1:10080", "127.0.0.1:10081"],
        value_delimiter = ',',
        value_name = "ADDR,ADDR"
    )]
    proxy_addrs: Vec<SocketAddr>,
    /// Where Envoy takes user traffic (with --envoy).
    #[arg(long, default_value = "127.0.0.1:10090", value_name = "ADDR")]
    envoy_addr: SocketAddr,
}

/// Any free loopback address, for the demo's inner servers.
fn any_port() -> anyhow::Result<SocketAddr> {
    procs::reserve(SocketAddr::from(([127, 0, 0, 1], 0)), "(none)")
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rate.is_finite() && (1.0..=20_000.0).contains(&args.rate),
        "--rate must be within 1..=20000 requests per second"
    );
    anyhow::ensure!(
        args.proxy_addrs.len() == 2,
        "--proxy-addrs takes two addresses, one per proxy"
    );
    let pace = Pace::new(args.fast);
    let addrs = procs::ControlAddrs {
        admin: procs::reserve(args.admin_addr, "--admin-addr")?,
        xds: procs::reserve(args.xds_addr, "--xds-addr")?,
        api: procs::reserve(args.api_addr, "--api-addr")?,
        envoy_listener: match &args.envoy {
            Some(_) => procs::reserve(args.envoy_addr, "--envoy-addr")?,
            None => any_port()?,
        },
    };
    let proxy_addrs = args
        .proxy_addrs
        .iter()
        .map(|a| procs::reserve(*a, "--proxy-addrs"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let console = format!("http://{}/", addrs.admin);
    let json = args.output == Output::Json;
    // The live view needs a terminal big enough to hold it; otherwise
    // progress lines.
    let live = !json
        && std::io::stdout().is_terminal()
        && ratatui::crossterm::terminal::size().is_ok_and(|(cols, rows)| cols >= 80 && rows >= 20);
    let say = |text: &str| {
        if json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    };

    let dir = tempfile::tempdir().context("making the demo's directory")?;
    say("starting clusters old and new (simulated Kubernetes API servers) and their pods…");
    let clusters = clusters::Clusters::start(&SERVICES, dir.path()).await?;
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(
        &catalog,
        scenario::catalog(|s| clusters.ports.get(s).copied().unwrap_or(0)),
    )
    .context("writing the demo's catalog")?;

    say("starting ferry control…");
    let mut procs_all = Vec::new();
    let mut control = procs::control(dir.path(), &catalog, addrs)?;
    procs::wait_ready(
        &mut control,
        addrs.admin,
        "/readyz",
        Duration::from_secs(30),
    )
    .await?;
    let mut operator = drive::Operator::connect(addrs.api).await?;
    wait_discovered(&mut operator, &mut control).await?;
    procs_all.push(control);

    say("starting two ferry proxies…");
    let mut entries = Vec::new();
    for (i, listen) in proxy_addrs.iter().enumerate() {
        let name = format!("ferry-proxy-{}", i + 1);
        let admin = any_port()?;
        let mut p = procs::proxy(dir.path(), &name, addrs.xds, *listen, admin)?;
        procs::wait_ready(&mut p, admin, "/ready", Duration::from_secs(30)).await?;
        procs_all.push(p);
        entries.push(load::Entry {
            name,
            addr: *listen,
            sticky: true,
        });
    }
    if let Some(binary) = &args.envoy {
        say("starting Envoy…");
        let admin = any_port()?;
        let mut e = procs::envoy(dir.path(), binary, addrs.xds, admin)?;
        procs::wait_ready(&mut e, admin, "/ready", Duration::from_secs(30)).await?;
        procs_all.push(e);
        entries.push(load::Entry {
            name: "envoy".into(),
            addr: addrs.envoy_listener,
            sticky: false,
        });
    }
    let names: Vec<String> = entries
        .iter()
        .map(|e| format!("{} {}", e.name, e.addr))
        .collect();

    let stats: load::Shared = Arc::new(Mutex::new(load::Stats::default()));
    let stop_load = CancellationToken::new();
    let hosts: Vec<(String, String)> = SERVICES
        .iter()
        .map(|s| (s.name.to_owned(), s.host()))
        .collect();
    let load_task = tokio::spawn(load::run(
        entries,
        hosts,
        args.rate,
        stats.clone(),
        stop_load.clone(),
    ));
    say(&format!(
        "users send {} requests/s; web console: {console}",
        args.rate
    ));
    let started = Instant::now();
    // A moment of steady traffic before anything moves.
    tokio::time::sleep(if args.fast {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(5)
    })
    .await;
    operator.start(pace).await?;
    operator.refresh().await?;

    let shown = follow(
        &mut operator,
        &mut procs_all,
        &stats,
        &console,
        &names,
        started,
        live,
        json,
        args.hold,
    )
    .await;

    stop_load.cancel();
    let _ = load_task.await;
    // Let the requests in flight finish.
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        let done = {
            let s = stats.lock().unwrap_or_else(|p| p.into_inner());
            s.answered >= s.sent
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = operator.refresh().await;
    let summary = {
        let s = stats.lock().unwrap_or_else(|p| p.into_inner());
        view::Summary::new(&operator.views, &s, &console)
    };
    for p in &mut procs_all {
        p.stop().await;
    }
    clusters.stop().await;
    shown?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        summary.print_table(&mut std::io::stdout());
    }
    Ok(())
}

/// Waits until the control plane has discovered every service in both
/// clusters, with ready endpoints.
async fn wait_discovered(
    operator: &mut drive::Operator,
    control: &mut procs::Proc,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        control.check()?;
        if operator.discovered().await {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "ferry control did not discover every service in both clusters within 30s; see {}",
            control.log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Shows the migrations until they all end (then, with `hold`, until
/// Ctrl-C), or a process dies, or Ctrl-C.
#[allow(clippy::too_many_arguments)]
async fn follow(
    operator: &mut drive::Operator,
    procs_all: &mut [procs::Proc],
    stats: &load::Shared,
    console: &str,
    proxies: &[String],
    started: Instant,
    live: bool,
    json: bool,
    hold: bool,
) -> anyhow::Result<()> {
    let mut terminal = if live {
        Some(view::Screen::enter()?)
    } else {
        None
    };
    let mut plain = view::Plain::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut n: u64 = 0;
    let result = loop {
        tokio::select! {
            _ = &mut ctrl_c => break Ok(()),
            _ = tick.tick() => {}
        }
        n += 1;
        if let Some(e) = procs_all.iter_mut().find_map(|p| p.check().err()) {
            break Err(e);
        }
        if n.is_multiple_of(2)
            && let Err(e) = operator.refresh().await
        {
            break Err(e.context("reading the migrations"));
        }
        let finished = operator.finished();
        {
            let s = stats.lock().unwrap_or_else(|p| p.into_inner());
            let frame = view::Frame {
                views: &operator.views,
                stats: &s,
                console,
                elapsed: started.elapsed(),
                proxies,
                finished,
            };
            match &mut terminal {
                Some(screen) => screen.draw(&frame)?,
                None if json => plain.print(&mut std::io::stderr(), &frame),
                None => plain.print(&mut std::io::stdout(), &frame),
            }
        }
        if finished && !hold {
            break Ok(());
        }
    };
    if let Some(screen) = terminal {
        screen.leave();
    }
    result
}
