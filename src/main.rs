//! `ferry`: one binary for Ferry's control plane and tools.

mod admin;
mod campaign_cli;
mod cli;
mod cluster_cmd;
mod console;
mod control;
mod demo;
mod grpc_bootstrap;
mod migrate_cli;
mod proxy_cmd;
mod telemetry;
mod xds_port;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Moves live traffic between Kubernetes clusters without users noticing."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch Ferry move live traffic: two simulated clusters, a control
    /// plane, proxies and steady users on this machine; three services
    /// migrate (one rolls back on an injected fault) while a live view and
    /// the web console show every step.
    Demo(demo::DemoArgs),
    /// Run the control plane: watch the catalog and serve it over xDS (ADS,
    /// state-of-the-world and delta) to Envoy and other xDS clients.
    Control(Box<control::ControlArgs>),
    /// Validate a catalog file and print what it describes; exits non-zero
    /// with the error (file, service, field) if it is invalid.
    Check {
        /// The catalog file (YAML) to validate.
        #[arg(long, value_name = "FILE")]
        catalog: PathBuf,
    },
    /// Run the proxy: take config from a control plane over delta xDS and
    /// forward user traffic to each service's cluster backends by weight.
    Proxy(proxy_cmd::ProxyArgs),
    /// Get, set or clear a service's weights through the traffic API.
    Weights {
        #[command(subcommand)]
        command: cli::WeightsCommand,
        #[command(flatten)]
        conn: cli::Conn,
    },
    /// Start, list, inspect, pause, resume, abort and watch migrations.
    Migrate {
        #[command(subcommand)]
        command: migrate_cli::MigrateCommand,
        #[command(flatten)]
        conn: cli::Conn,
    },
    /// Move every service of one cluster to another: start, list, inspect,
    /// pause, resume, abort, retry and watch campaigns.
    Campaign {
        #[command(subcommand)]
        command: campaign_cli::CampaignCommand,
        #[command(flatten)]
        conn: cli::Conn,
    },
    /// Pin a service: deploy tooling refuses changes while it is held.
    Pin {
        service: String,
        #[arg(long)]
        owner: String,
        #[arg(long)]
        reason: String,
        /// Seconds until the pin expires by itself (0: never).
        #[arg(long, default_value_t = 0)]
        ttl: u64,
        #[command(flatten)]
        conn: cli::Conn,
    },
    /// Release a pin (only its owner may).
    Unpin {
        service: String,
        #[arg(long)]
        owner: String,
        #[arg(long, default_value = "released with the ferry CLI")]
        reason: String,
        #[command(flatten)]
        conn: cli::Conn,
    },
    /// List pins.
    Pins {
        #[command(flatten)]
        conn: cli::Conn,
    },
    /// The audit log: who changed what, when and why.
    Audit {
        /// Only entries about this service.
        #[arg(long)]
        service: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        conn: cli::Conn,
    },
    /// Link member clusters to the control plane (join) and unlink them
    /// (leave).
    Cluster {
        #[command(subcommand)]
        command: cluster_cmd::ClusterCommand,
    },
    /// Print the xDS bootstrap (JSON, for GRPC_XDS_BOOTSTRAP) that points
    /// proxyless gRPC clients at Ferry: they then resolve `xds:///name.namespace:port`.
    GrpcBootstrap(grpc_bootstrap::GrpcBootstrapArgs),
    /// Services × clusters: weights, ready endpoints, pins.
    Status {
        /// Only what still takes traffic in this cluster (weight above 0):
        /// what must move before the cluster can be turned off.
        #[arg(long)]
        cluster: Option<String>,
        #[command(flatten)]
        conn: cli::Conn,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => {
            if std::env::var_os("RUST_LOG").is_some() {
                telemetry::init_tracing();
            }
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build();
            block_on(runtime, demo::run(args), "ferry demo")
        }
        Command::Control(args) => {
            telemetry::init_tracing();
            // One TLS crypto provider for every client (kube-rs among them),
            // chosen here rather than left to feature unification.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build();
            block_on(runtime, control::run(*args), "ferry control")
        }
        Command::Proxy(args) => {
            telemetry::init_tracing();
            // One worker: a single-threaded runtime, with no work stealing
            // or cross-thread wake-ups on the request path.
            let mut builder = match args.workers() {
                Some(1) => tokio::runtime::Builder::new_current_thread(),
                Some(n) => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n.max(1));
                    b
                }
                None => tokio::runtime::Builder::new_multi_thread(),
            };
            block_on(
                builder.enable_all().build(),
                proxy_cmd::run(args),
                "ferry proxy",
            )
        }
        Command::Check { catalog } => check(&catalog),
        Command::GrpcBootstrap(args) => match grpc_bootstrap::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry grpc-bootstrap: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Weights { command, conn } => run_client(cli::weights(&conn, command)),
        Command::Migrate { command, conn } => run_client(migrate_cli::run(&conn, command)),
        Command::Pin {
            service,
            owner,
            reason,
            ttl,
            conn,
        } => run_client(cli::pin(&conn, service, owner, reason, ttl)),
        Command::Unpin {
            service,
            owner,
            reason,
            conn,
        } => run_client(cli::unpin(&conn, service, owner, reason)),
        Command::Pins { conn } => run_client(cli::pins(&conn)),
        Command::Audit {
            service,
            limit,
            conn,
        } => run_client(cli::audit(&conn, service, limit)),
        Command::Status { cluster, conn } => run_client(cli::status(&conn, cluster)),
        Command::Campaign { command, conn } => run_client(campaign_cli::run(&conn, command)),
        Command::Cluster { command } => {
            // kube-rs builds its TLS from the process's default provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
            run_client(cluster_cmd::run(command))
        }
    }
}

fn run_client(work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    block_on(runtime, work, "ferry")
}

/// Runs `work` to completion on `runtime`, reporting failure on stderr
/// (and in the log, for the control plane).
fn block_on(
    runtime: std::io::Result<tokio::runtime::Runtime>,
    work: impl std::future::Future<Output = anyhow::Result<()>>,
    what: &str,
) -> ExitCode {
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{what}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{what} failed");
            eprintln!("{what}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match ferry_discovery::file::load_catalog_file(path) {
        Ok(file) if file.is_empty() => {
            eprintln!(
                "{}: {}",
                path.display(),
                ferry_discovery::file::RemovalError::Empty
            );
            ExitCode::FAILURE
        }
        Ok(file) => {
            let services = file.services;
            for cluster in &file.kubernetes.clusters {
                println!("cluster {}\twatched: {:?}", cluster.name, cluster.access);
            }
            if let Some(secrets) = &file.kubernetes.cluster_secrets {
                println!(
                    "cluster secrets\tlabelled {} in namespace {}, read with {}",
                    ferry_discovery::kubernetes::CLUSTER_LABEL,
                    secrets.namespace.as_deref().unwrap_or("(its own)"),
                    secrets.access.describe()
                );
            }
            for s in &services {
                let weights = s
                    .effective_weights()
                    .map(|w| {
                        w.iter()
                            .map(|(c, w)| format!("{c}={w}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                let endpoints: usize = s.backends.values().map(|b| b.endpoints.len()).sum();
                println!(
                    "{}\tclusters={}\tendpoints={}\tready={}\tweights: {}",
                    s.name,
                    s.backends.len(),
                    endpoints,
                    s.ready_endpoints(),
                    weights
                );
            }
            println!("{}: ok, {} services", path.display(), services.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
