//! `ferry grpc-bootstrap`: the xDS bootstrap a proxyless gRPC client reads
//! (from the file named by `GRPC_XDS_BOOTSTRAP`, or the text in
//! `GRPC_XDS_BOOTSTRAP_CONFIG`) to take its targets from Ferry.
//!
//! ```json
//! {
//!   "xds_servers": [{
//!     "server_uri": "ferry.ferry-system:18000",
//!     "channel_creds": [{"type": "insecure"}],   // or "tls", with --xds-ca
//!     "server_features": ["xds_v3"]
//!   }],
//!   "node": {"id": "checkout-7d9f", "cluster": "shop", "locality": {"zone": "a"}}
//! }
//! ```

use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::{Value, json};

/// The longest node id (and node cluster) Ferry's xDS port accepts.
const MAX_NODE_ID_BYTES: usize = ferry_xds::session::MAX_NODE_ID_BYTES;

#[derive(Debug, clap::Args)]
pub struct GrpcBootstrapArgs {
    /// Ferry's xDS address as the gRPC clients reach it (HOST:PORT; an
    /// IPv6 address in brackets).
    #[arg(long, value_name = "HOST:PORT")]
    pub xds_addr: String,
    /// The node id the clients announce (shown on Ferry's /status).
    #[arg(long, value_name = "ID")]
    pub node_id: String,
    /// The node's cluster (shown on Ferry's /status).
    #[arg(long, value_name = "NAME", default_value = "")]
    pub node_cluster: String,
    /// The node's zone (its locality).
    #[arg(long, value_name = "ZONE")]
    pub zone: Option<String>,
    /// TLS to an xDS port that serves it: the CA (PEM) its certificate
    /// must chain to, as a path on the clients' hosts.
    #[arg(long, value_name = "FILE")]
    pub xds_ca: Option<PathBuf>,
    /// The clients' certificate chain (PEM) for an xDS port with mutual
    /// TLS; needs --xds-key and --xds-ca.
    #[arg(long, value_name = "FILE", requires_all = ["xds_key", "xds_ca"])]
    pub xds_cert: Option<PathBuf>,
    /// The private key (PEM) of --xds-cert.
    #[arg(long, value_name = "FILE", requires = "xds_cert")]
    pub xds_key: Option<PathBuf>,
}

/// How a gRPC client secures its channel to the xDS server: the bootstrap's
/// `channel_creds`, of which the client uses the first it supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelCreds {
    /// Plaintext, for an xDS port without TLS.
    Insecure,
    /// TLS, and mutual TLS with a client certificate (gRFC A65's `tls`
    /// channel credentials; the files are paths on the clients' hosts,
    /// which gRPC watches for renewals).
    Tls {
        ca: PathBuf,
        identity: Option<(PathBuf, PathBuf)>,
    },
}

impl ChannelCreds {
    fn to_json(&self) -> Value {
        match self {
            Self::Insecure => json!({"type": "insecure"}),
            Self::Tls { ca, identity } => {
                let mut config = json!({"ca_certificate_file": ca.display().to_string()});
                if let Some((cert, key)) = identity {
                    config["certificate_file"] = json!(cert.display().to_string());
                    config["private_key_file"] = json!(key.display().to_string());
                }
                json!({"type": "tls", "config": config})
            }
        }
    }
}

/// A bootstrap's content, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcBootstrap {
    pub server_uri: String,
    pub channel_creds: ChannelCreds,
    pub node_id: String,
    pub node_cluster: String,
    pub zone: Option<String>,
}

/// What makes a bootstrap request wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "--xds-addr {0:?} is not HOST:PORT (a host name or IP address, an IPv6 address in brackets, and a port from 1 to 65535)"
    )]
    Address(String),
    #[error("--node-id is empty: every xDS client needs a node id")]
    EmptyNodeId,
    #[error("--{field} is {len} bytes, more than the {MAX_NODE_ID_BYTES} Ferry's xDS port accepts")]
    TooLong { field: &'static str, len: usize },
    #[error("--{field} {value:?} holds a control character")]
    Control { field: &'static str, value: String },
}

impl GrpcBootstrap {
    pub fn from_args(args: &GrpcBootstrapArgs) -> Result<Self, BootstrapError> {
        let server_uri = check_address(args.xds_addr.trim())?;
        if args.node_id.is_empty() {
            return Err(BootstrapError::EmptyNodeId);
        }
        let zone = args.zone.clone().unwrap_or_default();
        for (field, value) in [
            ("node-id", &args.node_id),
            ("node-cluster", &args.node_cluster),
            ("zone", &zone),
        ] {
            if value.len() > MAX_NODE_ID_BYTES {
                return Err(BootstrapError::TooLong {
                    field,
                    len: value.len(),
                });
            }
            if value.chars().any(char::is_control) {
                return Err(BootstrapError::Control {
                    field,
                    value: value.clone(),
                });
            }
        }
        Ok(Self {
            server_uri,
            channel_creds: match &args.xds_ca {
                None => ChannelCreds::Insecure,
                Some(ca) => ChannelCreds::Tls {
                    ca: ca.clone(),
                    identity: args.xds_cert.clone().zip(args.xds_key.clone()),
                },
            },
            node_id: args.node_id.clone(),
            node_cluster: args.node_cluster.clone(),
            zone: args.zone.clone().filter(|z| !z.is_empty()),
        })
    }

    pub fn to_json(&self) -> Value {
        let mut node = json!({"id": self.node_id});
        if !self.node_cluster.is_empty() {
            node["cluster"] = json!(self.node_cluster);
        }
        if let Some(zone) = &self.zone {
            node["locality"] = json!({"zone": zone});
        }
        json!({
            "xds_servers": [{
                "server_uri": self.server_uri,
                "channel_creds": [self.channel_creds.to_json()],
                "server_features": ["xds_v3"],
            }],
            "node": node,
        })
    }
}

/// `addr` as a gRPC server URI, when it is HOST:PORT.
fn check_address(addr: &str) -> Result<String, BootstrapError> {
    let bad = || BootstrapError::Address(addr.to_owned());
    let port = if let Some(rest) = addr.strip_prefix('[') {
        let (ip, port) = rest.split_once("]:").ok_or_else(bad)?;
        if !matches!(ip.parse::<IpAddr>(), Ok(IpAddr::V6(_))) {
            return Err(bad());
        }
        port
    } else {
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        if host.contains(':') || !(host.parse::<IpAddr>().is_ok() || is_host_name(host)) {
            return Err(bad());
        }
        port
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.chars().all(|c| c.is_ascii_digit()) => {}
        _ => return Err(bad()),
    }
    Ok(addr.to_owned())
}

fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Prints the bootstrap, or says what is wrong with the arguments.
pub fn run(args: &GrpcBootstrapArgs) -> anyhow::Result<()> {
    let bootstrap = GrpcBootstrap::from_args(args)?;
    println!("{}", serde_json::to_string_pretty(&bootstrap.to_json())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(addr: &str, node: &str) -> GrpcBootstrapArgs {
        GrpcBootstrapArgs {
            xds_addr: addr.into(),
            node_id: node.into(),
            node_cluster: String::new(),
            zone: None,
            xds_ca: None,
            xds_cert: None,
            xds_key: None,
        }
    }

    #[test]
    fn tls_settings_become_tls_channel_creds() {
        let mut a = args("ferry.ferry-system:18000", "checkout-1");
        a.xds_ca = Some("/etc/ferry/xds-ca.pem".into());
        let json = GrpcBootstrap::from_args(&a).unwrap().to_json();
        assert_eq!(
            json["xds_servers"][0]["channel_creds"],
            json!([{"type": "tls", "config": {"ca_certificate_file": "/etc/ferry/xds-ca.pem"}}])
        );
        a.xds_cert = Some("/etc/ferry/client.pem".into());
        a.xds_key = Some("/etc/ferry/client.key".into());
        let json = GrpcBootstrap::from_args(&a).unwrap().to_json();
        assert_eq!(
            json["xds_servers"][0]["channel_creds"],
            json!([{"type": "tls", "config": {
                "ca_certificate_file": "/etc/ferry/xds-ca.pem",
                "certificate_file": "/etc/ferry/client.pem",
                "private_key_file": "/etc/ferry/client.key",
            }}])
        );
    }

    #[test]
    fn the_bootstrap_names_the_server_its_creds_and_the_node() {
        let mut a = args("ferry.ferry-system:18000", "checkout-1");
        a.node_cluster = "shop".into();
        a.zone = Some("a".into());
        let json = GrpcBootstrap::from_args(&a).unwrap().to_json();
        assert_eq!(
            json,
            json!({
                "xds_servers": [{
                    "server_uri": "ferry.ferry-system:18000",
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }],
                "node": {"id": "checkout-1", "cluster": "shop", "locality": {"zone": "a"}},
            })
        );
        let plain = GrpcBootstrap::from_args(&args("127.0.0.1:18000", "n"))
            .unwrap()
            .to_json();
        assert_eq!(plain["node"], json!({"id": "n"}));
        let v6 = GrpcBootstrap::from_args(&args("[::1]:18000", "n")).unwrap();
        assert_eq!(v6.server_uri, "[::1]:18000");
    }

    #[test]
    fn bad_arguments_are_refused_naming_what_is_wrong() {
        for addr in [
            "",
            "ferry",
            "ferry:",
            "ferry:0",
            "ferry:70000",
            "ferry:+80",
            ":18000",
            "::1:18000",
            "[::1]18000",
            "[10.0.0.1]:80",
            "http://ferry:18000",
            "fer ry:18000",
            "-ferry:18000",
        ] {
            let e = GrpcBootstrap::from_args(&args(addr, "n")).unwrap_err();
            assert_eq!(e, BootstrapError::Address(addr.into()), "{addr:?}");
            assert!(e.to_string().contains("--xds-addr"), "{e}");
        }
        assert_eq!(
            GrpcBootstrap::from_args(&args("ferry:18000", "")),
            Err(BootstrapError::EmptyNodeId)
        );
        let long = "n".repeat(MAX_NODE_ID_BYTES + 1);
        let e = GrpcBootstrap::from_args(&args("ferry:18000", &long)).unwrap_err();
        assert!(e.to_string().contains("--node-id is 257 bytes"), "{e}");
        let e = GrpcBootstrap::from_args(&args("ferry:18000", "a\nb")).unwrap_err();
        assert!(e.to_string().contains("--node-id"), "{e}");
    }
}
