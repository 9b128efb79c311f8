//! Client commands over the traffic API: `ferry weights`, `ferry pin`,
//! `ferry unpin`, `ferry pins`, `ferry audit`, `ferry status`.

use anyhow::{Context, bail};
use ferry_discovery::TOTAL_WEIGHT;
use ferry_proto::ferry::v1::traffic_client::TrafficClient;
use ferry_proto::ferry::v1::{
    ClearWeightsRequest, ClusterWeight, GetWeightsRequest, ListAuditRequest, ListPinsRequest,
    ListServicesRequest, PinRecord, PinRequest, SetWeightsRequest, UnpinRequest,
};
use serde_json::json;
use tonic::transport::Channel;

/// Where the traffic API is, and how to print.
#[derive(Debug, clap::Args)]
pub struct Conn {
    /// The control plane's traffic API.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:18001",
        env = "FERRY_SERVER"
    )]
    pub server: String,
    /// Output: a human table, or JSON for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// Who is acting (recorded in the audit log when the API does not
    /// authenticate callers).
    #[arg(long, global = true, env = "FERRY_ACTOR", default_value = "")]
    pub actor: String,
    /// Bearer token for an API that requires one.
    #[arg(
        long,
        global = true,
        env = "FERRY_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub token: String,
    /// CA (PEM) that signed the API's certificate (for an https:// server).
    #[arg(long, global = true, env = "FERRY_CA", value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for an API that takes mutual TLS.
    #[arg(
        long,
        global = true,
        env = "FERRY_CERT",
        value_name = "FILE",
        requires = "key"
    )]
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        global = true,
        env = "FERRY_KEY",
        value_name = "FILE",
        requires = "cert"
    )]
    pub key: Option<std::path::PathBuf>,
}

/// A channel to the API, with TLS (and a client certificate) as asked.
pub async fn channel(conn: &Conn) -> anyhow::Result<Channel> {
    let mut endpoint = Channel::from_shared(conn.server.clone())
        .with_context(|| format!("--server {:?} is not a URL", conn.server))?;
    if conn.server.starts_with("https://") || conn.ca.is_some() || conn.cert.is_some() {
        let read = |path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &conn.ca {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&conn.cert, &conn.key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        endpoint = endpoint.tls_config(tls).context("API TLS settings")?;
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to the API at {}", conn.server))
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum WeightsCommand {
    /// Show the weights a service's traffic follows.
    Get { service: String },
    /// Set weights: `ferry weights set checkout.shop old=90 new=10`
    /// (percent, up to two decimals; with --bp, basis points).
    Set {
        service: String,
        /// CLUSTER=WEIGHT pairs.
        #[arg(required = true)]
        weights: Vec<String>,
        /// Weights are basis points (0..10000) rather than percent.
        #[arg(long)]
        bp: bool,
        /// Why (goes into the audit log).
        #[arg(long, default_value = "set with the ferry CLI")]
        reason: String,
        /// Act as this pin owner.
        #[arg(long, default_value = "")]
        owner: String,
        /// Refuse unless the policy is still at this version.
        #[arg(long, default_value_t = 0)]
        expected_version: u64,
    },
    /// Drop weights set through the API; the catalog's apply again.
    Clear {
        service: String,
        #[arg(long, default_value = "cleared with the ferry CLI")]
        reason: String,
        #[arg(long, default_value = "")]
        owner: String,
    },
}

async fn connect(conn: &Conn) -> anyhow::Result<TrafficClient<Channel>> {
    Ok(TrafficClient::new(channel(conn).await?))
}

pub fn request<T>(conn: &Conn, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if !conn.actor.is_empty()
        && let Ok(v) = conn.actor.parse()
    {
        r.metadata_mut().insert("x-ferry-actor", v);
    }
    if !conn.token.is_empty()
        && let Ok(v) = format!("Bearer {}", conn.token).parse()
    {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

pub fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

/// Parses `old=90` (percent, ≤ 2 decimals) or, with `bp`, `old=9000`.
pub fn parse_weight(pair: &str, bp: bool) -> anyhow::Result<ClusterWeight> {
    let Some((cluster, value)) = pair.split_once('=') else {
        bail!("{pair:?}: expected CLUSTER=WEIGHT");
    };
    let basis_points = if bp {
        value
            .parse::<u32>()
            .with_context(|| format!("{pair:?}: not a whole number of basis points"))?
    } else {
        let (whole, frac) = value.split_once('.').unwrap_or((value, ""));
        if frac.len() > 2 || !frac.chars().all(|c| c.is_ascii_digit()) {
            bail!("{pair:?}: percent takes at most two decimals");
        }
        let whole: u32 = whole
            .parse()
            .with_context(|| format!("{pair:?}: not a percentage"))?;
        let frac: u32 = format!("{frac:0<2}").parse().unwrap_or(0);
        whole
            .checked_mul(100)
            .and_then(|w| w.checked_add(frac))
            .with_context(|| format!("{pair:?}: too large"))?
    };
    Ok(ClusterWeight {
        cluster: cluster.to_owned(),
        basis_points,
    })
}

/// Parses every `CLUSTER=WEIGHT`. In percent, the sum is checked here so
/// the error speaks the unit the user typed; the API (basis points)
/// checks it again.
pub fn parse_weights(pairs: &[String], bp: bool) -> anyhow::Result<Vec<ClusterWeight>> {
    let weights = pairs
        .iter()
        .map(|w| parse_weight(w, bp))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !bp {
        if let Some(w) = weights.iter().find(|w| w.basis_points > TOTAL_WEIGHT) {
            bail!(
                "{}={} is more than 100 %",
                w.cluster,
                percent_value(w.basis_points)
            );
        }
        let sum: u64 = weights.iter().map(|w| u64::from(w.basis_points)).sum();
        if !weights.is_empty() && sum != u64::from(TOTAL_WEIGHT) {
            bail!(
                "weights sum to {} %, must be 100 %",
                percent_value(sum.min(u64::from(u32::MAX)) as u32)
            );
        }
    }
    Ok(weights)
}

/// Basis points as a percentage with two decimals, no unit.
fn percent_value(bp: u32) -> String {
    format!("{}.{:02}", bp / 100, bp % 100)
}

fn percent(bp: u32) -> String {
    format!("{}.{:02}%", bp / 100, bp % 100)
}

pub async fn weights(conn: &Conn, command: WeightsCommand) -> anyhow::Result<()> {
    let mut api = connect(conn).await?;
    let reply = match command {
        WeightsCommand::Get { service } => {
            api.get_weights(request(conn, GetWeightsRequest { service }))
                .await
        }
        WeightsCommand::Set {
            service,
            weights,
            bp,
            reason,
            owner,
            expected_version,
        } => {
            let weights = parse_weights(&weights, bp)?;
            let message = SetWeightsRequest {
                service,
                weights,
                expected_version,
                reason,
                owner,
            };
            api.set_weights(request(conn, message)).await
        }
        WeightsCommand::Clear {
            service,
            reason,
            owner,
        } => {
            let message = ClearWeightsRequest {
                service,
                expected_version: 0,
                reason,
                owner,
            };
            api.clear_weights(request(conn, message)).await
        }
    }
    .map_err(status_error)?
    .into_inner();
    if conn.output == Output::Json {
        let weights: serde_json::Map<String, serde_json::Value> = reply
            .weights
            .iter()
            .map(|w| (w.cluster.clone(), json!(w.basis_points)))
            .collect();
        println!(
            "{}",
            json!({"service": reply.service, "weights_bp": weights, "source": reply.source, "policy_version": reply.policy_version})
        );
        return Ok(());
    }
    println!(
        "{}  (from {}, policy version {})",
        reply.service, reply.source, reply.policy_version
    );
    for w in &reply.weights {
        println!("  {:<20} {:>8}", w.cluster, percent(w.basis_points));
    }
    Ok(())
}

pub async fn pin(
    conn: &Conn,
    service: String,
    owner: String,
    reason: String,
    ttl: u64,
) -> anyhow::Result<()> {
    let mut api = connect(conn).await?;
    let pin = api
        .pin(request(
            conn,
            PinRequest {
                service,
                owner,
                reason,
                ttl_seconds: ttl,
            },
        ))
        .await
        .map_err(status_error)?
        .into_inner();
    print_pins(conn, &[pin]);
    Ok(())
}

pub async fn unpin(
    conn: &Conn,
    service: String,
    owner: String,
    reason: String,
) -> anyhow::Result<()> {
    let mut api = connect(conn).await?;
    let reply = api
        .unpin(request(
            conn,
            UnpinRequest {
                service: service.clone(),
                owner,
                reason,
            },
        ))
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "{service} unpinned (policy version {})",
        reply.policy_version
    );
    Ok(())
}

pub async fn pins(conn: &Conn) -> anyhow::Result<()> {
    let mut api = connect(conn).await?;
    let pins = api
        .list_pins(request(conn, ListPinsRequest {}))
        .await
        .map_err(status_error)?
        .into_inner()
        .pins;
    print_pins(conn, &pins);
    Ok(())
}

fn print_pins(conn: &Conn, pins: &[PinRecord]) {
    if conn.output == Output::Json {
        let list: Vec<_> = pins
            .iter()
            .map(|p| json!({"service": p.service, "owner": p.owner, "reason": p.reason, "pinned_at_unix_ms": p.pinned_at_unix_ms, "expires_at_unix_ms": p.expires_at_unix_ms}))
            .collect();
        println!("{}", json!(list));
        return;
    }
    println!("{:<32} {:<20} {:<12} REASON", "SERVICE", "OWNER", "EXPIRES");
    for p in pins {
        let expires = if p.expires_at_unix_ms == 0 {
            "never".to_owned()
        } else {
            let left = (p.expires_at_unix_ms - ferry_migrate::policy::now_ms()).max(0) / 1000;
            format!("in {left}s")
        };
        println!(
            "{:<32} {:<20} {:<12} {}",
            shown(&p.service),
            shown(&p.owner),
            expires,
            shown(&p.reason)
        );
    }
}

/// Text from the API as a table shows it: control characters (newlines,
/// ESC, CR, NUL…) escaped, so a value can neither forge a line nor drive
/// the terminal.
pub fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    ferry_discovery::untrusted::escape(text)
}

pub async fn audit(conn: &Conn, service: Option<String>, limit: u32) -> anyhow::Result<()> {
    let mut api = connect(conn).await?;
    let reply = api
        .list_audit(request(
            conn,
            ListAuditRequest {
                service: service.unwrap_or_default(),
                limit,
            },
        ))
        .await
        .map_err(status_error)?
        .into_inner();
    let entries = reply.entries;
    if conn.output == Output::Json {
        let list: Vec<_> = entries
            .iter()
            .map(|e| json!({"policy_version": e.policy_version, "at_unix_ms": e.at_unix_ms, "actor": e.actor, "action": e.action, "service": e.service, "reason": e.reason, "detail": e.detail}))
            .collect();
        println!("{}", json!(list));
        return Ok(());
    }
    println!(
        "{:>7} {:<14} {:<16} {:<16} {:<28} DETAIL / REASON",
        "VERSION", "AT(unix ms)", "ACTOR", "ACTION", "SERVICE"
    );
    for e in &entries {
        println!(
            "{:>7} {:<14} {:<16} {:<16} {:<28} {} — {}",
            e.policy_version,
            e.at_unix_ms,
            shown(&e.actor),
            shown(&e.action),
            shown(&e.service),
            shown(&e.detail),
            shown(&e.reason)
        );
    }
    if reply.omitted > 0 {
        println!(
            "({} older entries left out to keep the answer under 1 MiB; use a smaller --limit or --service)",
            reply.omitted
        );
    }
    Ok(())
}

pub async fn status(conn: &Conn, cluster: Option<String>) -> anyhow::Result<()> {
    let mut api = connect(conn).await?;
    let reply = api
        .list_services(request(conn, ListServicesRequest {}))
        .await
        .map_err(status_error)?
        .into_inner();
    if let Some(cluster) = cluster {
        return still_serving(conn, &reply, &cluster);
    }
    if conn.output == Output::Json {
        let services: Vec<_> = reply
            .services
            .iter()
            .map(|s| {
                let backends: Vec<_> = s
                    .backends
                    .iter()
                    .map(|b| json!({"cluster": b.cluster, "weight_bp": b.basis_points, "endpoints": b.endpoints, "ready": b.ready, "stale": b.stale}))
                    .collect();
                json!({"service": s.service, "weights_from": s.weights_source, "pinned_by": s.pin.as_ref().map(|p| p.owner.clone()), "backends": backends})
            })
            .collect();
        println!(
            "{}",
            json!({"policy_version": reply.policy_version, "services": services})
        );
        return Ok(());
    }
    println!("policy version {}", reply.policy_version);
    println!(
        "{:<32} {:<14} {:>9} {:>11} {:<6} {:<16} PIN",
        "SERVICE", "CLUSTER", "WEIGHT", "READY/ALL", "STALE", "FROM"
    );
    for s in &reply.services {
        for (i, b) in s.backends.iter().enumerate() {
            let (name, from, pin) = if i == 0 {
                (
                    s.service.as_str(),
                    s.weights_source.as_str(),
                    s.pin.as_ref().map(|p| p.owner.as_str()).unwrap_or("-"),
                )
            } else {
                ("", "", "")
            };
            println!(
                "{:<32} {:<14} {:>9} {:>11} {:<6} {:<16} {}",
                name,
                b.cluster,
                percent(b.basis_points),
                format!("{}/{}", b.ready, b.endpoints),
                if b.stale { "yes" } else { "-" },
                from,
                pin
            );
        }
    }
    Ok(())
}

/// `ferry status --cluster old`: the services `cluster` still serves
/// (weight above 0) — the answer to "can we turn it off?".
fn still_serving(
    conn: &Conn,
    reply: &ferry_proto::ferry::v1::ListServicesResponse,
    cluster: &str,
) -> anyhow::Result<()> {
    let serving: Vec<(&str, u32, u32)> = reply
        .services
        .iter()
        .filter_map(|s| {
            let b = s.backends.iter().find(|b| b.cluster == cluster)?;
            (b.basis_points > 0).then_some((s.service.as_str(), b.basis_points, b.endpoints))
        })
        .collect();
    let idle = reply
        .services
        .iter()
        .filter(|s| {
            s.backends
                .iter()
                .any(|b| b.cluster == cluster && b.basis_points == 0)
        })
        .count();
    if conn.output == Output::Json {
        let list: Vec<_> = serving
            .iter()
            .map(|(s, bp, n)| json!({"service": s, "weight_bp": bp, "endpoints": n}))
            .collect();
        println!(
            "{}",
            json!({"cluster": cluster, "serving": list, "idle_backends": idle})
        );
        return Ok(());
    }
    if serving.is_empty() {
        println!(
            "cluster {cluster} takes no traffic: no service routes to it ({idle} services still list it at 0 %)"
        );
        return Ok(());
    }
    println!(
        "cluster {cluster} still takes traffic for {} services ({idle} more list it at 0 %):",
        serving.len()
    );
    println!("{:<32} {:>9} {:>9}", "SERVICE", "WEIGHT", "ENDPOINTS");
    for (service, bp, endpoints) in serving {
        println!("{service:<32} {:>9} {endpoints:>9}", percent(bp));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_weights_take_two_decimals() {
        assert_eq!(parse_weight("old=90", false).unwrap().basis_points, 9000);
        assert_eq!(parse_weight("new=0.01", false).unwrap().basis_points, 1);
        assert_eq!(parse_weight("new=12.5", false).unwrap().basis_points, 1250);
        assert_eq!(parse_weight("new=9000", true).unwrap().basis_points, 9000);
        assert!(parse_weight("new=0.001", false).is_err());
        assert!(parse_weight("new", false).is_err());
        assert!(parse_weight("new=-1", false).is_err());
    }

    fn pairs(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_percent_sum_error_speaks_percent() {
        let e = parse_weights(&pairs(&["dc-old=60", "dc-new=30"]), false).unwrap_err();
        assert_eq!(e.to_string(), "weights sum to 90.00 %, must be 100 %");
        let e = parse_weights(&pairs(&["dc-old=120.5", "dc-new=0"]), false).unwrap_err();
        assert_eq!(e.to_string(), "dc-old=120.50 is more than 100 %");
        let ok = parse_weights(&pairs(&["a=99.99", "b=0.01"]), false).unwrap();
        assert_eq!(ok.iter().map(|w| w.basis_points).sum::<u32>(), 10000);
        // In basis points the API checks the sum and speaks basis points.
        assert!(parse_weights(&pairs(&["a=6000", "b=3000"]), true).is_ok());
    }
}
