//! `ferry`: one binary for Ferry's control plane and tools.

mod admin;
mod control;
mod telemetry;

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
    /// Run the control plane: watch the catalog and serve it over xDS (ADS,
    /// state-of-the-world and delta) to Envoy and other xDS clients.
    Control(control::ControlArgs),
    /// Validate a catalog file and print what it describes; exits non-zero
    /// with the error (file, service, field) if it is invalid.
    Check {
        /// The catalog file (YAML) to validate.
        #[arg(long, value_name = "FILE")]
        catalog: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Control(args) => {
            telemetry::init_tracing();
            // One TLS crypto provider for every client (kube-rs among them),
            // chosen here rather than left to feature unification.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ferry: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(control::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "ferry control failed");
                    eprintln!("ferry control: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { catalog } => check(&catalog),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match ferry_discovery::file::load_catalog_file(path) {
        Ok(file) => {
            let services = file.services;
            for cluster in &file.kubernetes.clusters {
                println!("cluster {}\twatched: {:?}", cluster.name, cluster.access);
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
