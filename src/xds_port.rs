//! The xDS and LRS port's security: TLS (mutual with a client CA), its
//! files reloaded when they change, and the node authorization of
//! `--xds-auth` (see [`ferry_xds::auth`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_tls::{CertPair, Certificates, ClientCa, Scope};
use ferry_xds::auth::AuthSource;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct XdsPortArgs {
    /// Serve xDS and LRS over TLS with this certificate chain (PEM);
    /// needs --xds-tls-key. Reloaded when the file changes: open streams
    /// stay, new connections get the new certificate.
    #[arg(long, value_name = "FILE", requires = "xds_tls_key")]
    xds_tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --xds-tls-cert.
    #[arg(long, value_name = "FILE", requires = "xds_tls_cert")]
    xds_tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (PEM): mutual TLS.
    /// With --xds-auth, a client may instead present a bearer token.
    /// Reloaded when the file changes. Needs --xds-tls-cert.
    #[arg(long, value_name = "FILE", requires = "xds_tls_cert")]
    xds_client_ca: Option<PathBuf>,

    /// Who may connect, and as which nodes (YAML: client certificate
    /// names and bearer tokens, each with the node ids, node-id prefixes
    /// and node clusters it may claim). With it, every ADS and LRS stream
    /// must authenticate, and load reports count only for the node the
    /// stream authenticated as. Reloaded when it changes (a change that
    /// does not parse keeps the previous identities).
    #[arg(long, value_name = "FILE")]
    xds_auth: Option<PathBuf>,

    /// How often the xDS port's TLS files and --xds-auth are checked for
    /// changes.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    xds_tls_reload_interval: Duration,
}

/// The loaded TLS material and auth of the xDS port.
pub struct XdsPort {
    pub tls: Option<TlsAcceptor>,
    pub auth: Option<Arc<AuthSource>>,
}

impl XdsPort {
    /// Reads the flags' files (an error names the flag and the file) and
    /// starts watching the TLS files until `shutdown`.
    pub fn load(
        args: &XdsPortArgs,
        addr: SocketAddr,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let auth = match &args.xds_auth {
            Some(path) => {
                let auth = AuthSource::load(path).context("--xds-auth")?;
                tokio::spawn(
                    auth.clone()
                        .watch(args.xds_tls_reload_interval, shutdown.clone()),
                );
                Some(auth)
            }
            None => None,
        };
        let tls = match (&args.xds_tls_cert, &args.xds_tls_key) {
            (Some(cert), Some(key)) => {
                let pair = CertPair {
                    cert: cert.clone(),
                    key: key.clone(),
                };
                let certs = Certificates::load_for(Scope::Xds, vec![pair])
                    .context("--xds-tls-cert/--xds-tls-key")?;
                tokio::spawn(
                    certs
                        .clone()
                        .watch(args.xds_tls_reload_interval, shutdown.clone()),
                );
                let client_ca = match &args.xds_client_ca {
                    Some(path) => {
                        // With an auth file, token holders need no certificate.
                        let ca = ClientCa::load(path, auth.is_some()).context("--xds-client-ca")?;
                        tokio::spawn(
                            ca.clone()
                                .watch(args.xds_tls_reload_interval, shutdown.clone()),
                        );
                        Some(ca)
                    }
                    None => None,
                };
                Some(TlsAcceptor::from(ferry_tls::grpc_server_config(
                    certs, client_ca,
                )))
            }
            _ => None,
        };
        if tls.is_none() && auth.is_some() {
            tracing::warn!(
                "--xds-auth without --xds-tls-cert: bearer tokens cross the network in the clear"
            );
        }
        if auth.is_none() && args.xds_client_ca.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the xDS port serves every endpoint to anyone who can reach it: use --xds-client-ca or --xds-auth");
        }
        tracing::info!(
            tls = tls.is_some(),
            client_ca = args.xds_client_ca.is_some(),
            auth = auth.is_some(),
            "xDS port security"
        );
        Ok(Self { tls, auth })
    }
}
