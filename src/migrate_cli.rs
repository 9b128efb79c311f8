//! `ferry migrate …`: start, inspect, steer and watch migrations over the
//! `ferry.v1.Migrations` API.

use std::io::IsTerminal;

use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
use ferry_proto::ferry::v1::{
    CreateMigrationRequest, Gates, GetMigrationRequest, ListMigrationsRequest, Migration,
    MigrationActionRequest, TargetShare,
};
use serde_json::json;
use tonic::transport::Channel;

use crate::cli::{Conn, Output, request, shown, status_error};

#[derive(Debug, clap::Subcommand)]
pub enum MigrateCommand {
    /// Start a migration: `ferry migrate start checkout.shop --from old
    /// --to new --steps 1,5,25,50,100 --bake 30s`.
    Start(Box<StartArgs>),
    /// List migrations.
    List {
        /// Only this service's.
        #[arg(long)]
        service: Option<String>,
        /// Only those that have not ended.
        #[arg(long)]
        active: bool,
    },
    /// Show one migration.
    Get { id: String },
    /// Hold a migration at its current weights.
    Pause {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Continue a paused migration.
    Resume {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Send all traffic back to the source at once and stop.
    Abort {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Follow a migration live until it ends.
    Watch { id: String },
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    service: String,
    /// Source cluster(s), comma separated.
    #[arg(long, required = true, value_delimiter = ',')]
    from: Vec<String>,
    /// Target cluster, or several with their shares of the target side
    /// in percent: `new-a=60,new-b=40`.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    options: MigrationOptions,
    /// Why (goes into the audit log).
    #[arg(long)]
    reason: String,
    /// Follow the migration until it ends.
    #[arg(long)]
    watch: bool,
}

/// How each migration runs: steps, bake, gates, acknowledgements (shared
/// by `migrate start` and `campaign start`).
#[derive(Debug, clap::Args)]
pub struct MigrationOptions {
    /// Target share per step in percent, increasing, ending at 100.
    #[arg(long, value_delimiter = ',', default_value = "1,5,25,50,100")]
    pub steps: Vec<f64>,
    /// Bake time per step.
    #[arg(long, default_value = "60s")]
    bake: String,
    /// Gate: the target's error rate may exceed the source's by at
    /// most this many percentage points.
    #[arg(long, default_value_t = 1.0)]
    max_error_rate_increase: f64,
    /// Gate: hard ceiling on the target's error rate, percent (0: none).
    #[arg(long, default_value_t = 0.0)]
    max_error_rate: f64,
    /// Gate: requests each side needs per step before it decides.
    #[arg(long, default_value_t = 50)]
    min_requests: u64,
    /// Gate: the target's p99 may be at most this many times the source's
    /// (0: off). Needs --prometheus-url.
    #[arg(long, default_value_t = 0.0)]
    max_p99_ratio: f64,
    /// Gate: the target's p99 may be at most this many milliseconds (0: off).
    /// Needs --prometheus-url.
    #[arg(long, default_value_t = 0)]
    max_p99_ms: u64,
    /// Prometheus server the latency gates query (http://host:port).
    #[arg(long, default_value = "")]
    prometheus_url: String,
    /// PromQL for one side's p99 in ms ({name}, {namespace}, {cluster},
    /// {window}); default: Envoy's upstream request time histogram.
    #[arg(long, default_value = "")]
    p99_query: String,
    /// Gate: longest wait for enough data past the bake time.
    #[arg(long, default_value = "5m")]
    data_timeout: String,
    /// Share of connected proxies that must acknowledge each step (0..1).
    #[arg(long, default_value_t = 1.0)]
    ack_share: f64,
    /// Longest wait for those acknowledgements.
    #[arg(long, default_value = "60s")]
    ack_timeout: String,
    /// Connected proxies that must hold a step's weights before it bakes;
    /// no proxy connected is never an acknowledgement.
    #[arg(long, default_value_t = 1)]
    min_proxies: u32,
    /// Longest wait for both sides to be healthy.
    #[arg(long, default_value = "5m")]
    double_deploy_timeout: String,
    /// The target's ready endpoints must be ≥ this × the source's.
    #[arg(long, default_value_t = 0.5)]
    min_capacity: f64,
    /// How long the source drains at 0 % before it is released.
    #[arg(long, default_value = "10s")]
    drain: String,
    /// Who deploys: none (someone else; DOUBLE_DEPLOY waits for both sides
    /// to be healthy), hook (the control plane's --deploy-hook or
    /// --deploy-webhook, at DOUBLE_DEPLOY, CLEANUP and on a rollback) or
    /// kube (Ferry copies the workload with each cluster's
    /// deploy_kubeconfig, undoes it on a rollback, scales the source to 0
    /// at CLEANUP).
    #[arg(long, default_value = "none")]
    deploy: String,
    /// With --deploy kube: copy the Secrets the pods use too.
    #[arg(long)]
    copy_secrets: bool,
    /// With --deploy kube: how long the source's objects are kept, scaled
    /// to 0, after DONE (default 24h)…
    #[arg(long, default_value = "")]
    retain: String,
    /// …and delete them once it has passed.
    #[arg(long)]
    delete_source: bool,
}

impl MigrationOptions {
    /// The create request for `service` from `from` to `to` (a cluster,
    /// or `a=60,b=40`).
    pub fn request(
        self,
        service: String,
        from: Vec<String>,
        to: &str,
        reason: String,
    ) -> anyhow::Result<CreateMigrationRequest> {
        let (to, targets) = parse_targets(to)?;
        let MigrationOptions {
            steps,
            bake,
            max_error_rate_increase,
            max_error_rate,
            min_requests,
            max_p99_ratio,
            max_p99_ms,
            prometheus_url,
            p99_query,
            data_timeout,
            ack_share,
            ack_timeout,
            min_proxies,
            double_deploy_timeout,
            min_capacity,
            drain,
            deploy,
            copy_secrets,
            retain,
            delete_source,
        } = self;
        Ok(CreateMigrationRequest {
            service,
            from,
            to,
            targets,
            steps,
            bake,
            gates: Some(Gates {
                max_error_rate_increase_pct: max_error_rate_increase,
                max_error_rate_pct: max_error_rate,
                min_requests,
                data_timeout,
                prometheus_url,
                max_p99_ratio,
                max_p99_ms,
                p99_query,
            }),
            ack_share,
            ack_timeout,
            double_deploy_timeout,
            min_capacity,
            drain,
            reason,
            min_proxies,
            deploy,
            copy_secrets,
            retain,
            delete_source,
        })
    }
}

/// `new`, or `new-a=60%+new-b=40%` for several targets.
pub fn targets_text(to: &str, targets: &[TargetShare]) -> String {
    if targets.len() <= 1 {
        return to.to_owned();
    }
    targets
        .iter()
        .map(|t| format!("{}={}%", t.cluster, t.percent))
        .collect::<Vec<_>>()
        .join("+")
}

/// `new` → (`new`, none); `new-a=60,new-b=40` → ("", shares in percent).
pub fn parse_targets(to: &str) -> anyhow::Result<(String, Vec<TargetShare>)> {
    if !to.contains('=') {
        return Ok((to.to_owned(), Vec::new()));
    }
    let mut targets = Vec::new();
    for pair in to.split(',') {
        let Some((cluster, percent)) = pair.split_once('=') else {
            anyhow::bail!("--to {pair:?}: expected CLUSTER=PERCENT");
        };
        let percent: f64 = percent
            .trim()
            .trim_end_matches('%')
            .parse()
            .map_err(|_| anyhow::anyhow!("--to {pair:?}: {percent:?} is not a percentage"))?;
        targets.push(TargetShare {
            cluster: cluster.trim().to_owned(),
            percent,
        });
    }
    Ok((String::new(), targets))
}

async fn connect(conn: &Conn) -> anyhow::Result<MigrationsClient<Channel>> {
    Ok(MigrationsClient::new(crate::cli::channel(conn).await?))
}

pub async fn run(conn: &Conn, command: MigrateCommand) -> anyhow::Result<()> {
    let mut api = connect(conn).await?;
    let action = |id: String, reason: String| MigrationActionRequest { id, reason };
    let m = match command {
        MigrateCommand::Start(args) => {
            let StartArgs {
                service,
                from,
                to,
                options,
                reason,
                watch,
            } = *args;
            let message = options.request(service, from, &to, reason)?;
            let m = api
                .create_migration(request(conn, message))
                .await
                .map_err(status_error)?
                .into_inner();
            if watch {
                return follow(conn, &mut api, m.id).await;
            }
            m
        }
        MigrateCommand::List { service, active } => {
            let list = api
                .list_migrations(request(
                    conn,
                    ListMigrationsRequest {
                        service: service.unwrap_or_default(),
                        active_only: active,
                    },
                ))
                .await
                .map_err(status_error)?
                .into_inner()
                .migrations;
            print_list(conn, &list);
            return Ok(());
        }
        MigrateCommand::Get { id } => api
            .get_migration(request(conn, GetMigrationRequest { id }))
            .await
            .map_err(status_error)?
            .into_inner(),
        MigrateCommand::Pause { id, reason } => api
            .pause_migration(request(conn, action(id, reason)))
            .await
            .map_err(status_error)?
            .into_inner(),
        MigrateCommand::Resume { id, reason } => api
            .resume_migration(request(conn, action(id, reason)))
            .await
            .map_err(status_error)?
            .into_inner(),
        MigrateCommand::Abort { id, reason } => api
            .abort_migration(request(conn, action(id, reason)))
            .await
            .map_err(status_error)?
            .into_inner(),
        MigrateCommand::Watch { id } => return follow(conn, &mut api, id).await,
    };
    print_one(conn, &m);
    Ok(())
}

/// Prints every update until the migration ends; the exit status says how
/// it ended (success only for DONE).
async fn follow(
    conn: &Conn,
    api: &mut MigrationsClient<Channel>,
    id: String,
) -> anyhow::Result<()> {
    let mut stream = api
        .watch_migration(request(conn, GetMigrationRequest { id: id.clone() }))
        .await
        .map_err(status_error)?
        .into_inner();
    let live = conn.output == Output::Table && std::io::stdout().is_terminal();
    let mut last: Option<Migration> = None;
    while let Some(m) = stream.message().await.map_err(status_error)? {
        if conn.output == Output::Json {
            println!("{}", to_json(&m));
        } else if live {
            // Redraw one status line in place.
            print!("\r\x1b[2K{}", progress_line(&m));
            use std::io::Write;
            let _ = std::io::stdout().flush();
        } else if last
            .as_ref()
            .is_none_or(|l| progress_line(l) != progress_line(&m))
        {
            println!("{}", progress_line(&m));
        }
        last = Some(m);
    }
    if live {
        println!();
    }
    match last {
        Some(m) if m.stage == "DONE" => Ok(()),
        Some(m) if matches!(m.stage.as_str(), "ROLLED_BACK" | "FAILED") => {
            anyhow::bail!("migration {id} ended {}: {}", m.stage, m.reason)
        }
        _ => anyhow::bail!("the watch of migration {id} ended before the migration did"),
    }
}

fn pct(bp: u32) -> String {
    format!("{}.{:02}%", bp / 100, bp % 100)
}

fn weights_text(m: &Migration) -> String {
    let mut w: Vec<_> = m.weights.iter().collect();
    w.sort();
    w.iter()
        .map(|(c, bp)| format!("{c}={}", pct(**bp)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line: stage, step, weights, acks, the latest gate.
pub fn progress_line(m: &Migration) -> String {
    let mut line = format!("{} {} {}", m.id, m.service, m.stage);
    if !m.phase.is_empty() {
        line.push_str(&format!("/{}", m.phase));
    }
    if m.stage == "SHIFT" || m.stage == "PAUSED" {
        let target = m.steps_bp.get(m.step as usize).copied().unwrap_or(0);
        line.push_str(&format!(
            " step {}/{} ({})",
            m.step + 1,
            m.steps_bp.len(),
            pct(target)
        ));
    }
    if !m.weights.is_empty() {
        line.push_str(&format!(" [{}]", weights_text(m)));
    }
    if m.phase == "AWAITING_ACK" {
        line.push_str(&format!(" waiting: {}", m.waiting));
    }
    if let Some(g) = m.gates.last() {
        line.push_str(&format!(" gate {}: {}", g.outcome, shown(&g.detail)));
    }
    if !m.reason.is_empty() {
        line.push_str(&format!(" — {}", shown(&m.reason)));
    }
    line
}

fn to_json(m: &Migration) -> serde_json::Value {
    let gates: Vec<_> = m
        .gates
        .iter()
        .map(|g| json!({"step": g.step, "outcome": g.outcome, "source_requests": g.source_requests, "source_errors": g.source_errors, "target_requests": g.target_requests, "target_errors": g.target_errors, "detail": g.detail, "at_unix_ms": g.at_unix_ms}))
        .collect();
    json!({
        "id": m.id, "service": m.service, "from": m.from, "to": m.to,
        "targets": m.targets.iter().map(|t| json!({"cluster": t.cluster, "percent": t.percent})).collect::<Vec<_>>(),
        "steps_bp": m.steps_bp,
        "stage": m.stage, "phase": m.phase, "step": m.step, "weights_bp": m.weights,
        "reason": m.reason, "gates": gates, "created_by": m.created_by,
        "created_at_unix_ms": m.created_at_unix_ms, "updated_at_unix_ms": m.updated_at_unix_ms,
        "phase_started_at_unix_ms": m.phase_started_at_unix_ms,
        "acked_clients": m.acked_clients, "connected_clients": m.connected_clients, "bake": m.bake,
        "min_proxies": m.min_proxies, "returning_clients": m.returning_clients, "waiting": m.waiting,
    })
}

fn print_one(conn: &Conn, m: &Migration) {
    if conn.output == Output::Json {
        println!("{}", to_json(m));
        return;
    }
    println!(
        "{}  {}  {} → {}",
        m.id,
        m.service,
        m.from.join("+"),
        targets_text(&m.to, &m.targets)
    );
    println!("  stage     {} {}", m.stage, m.phase);
    let steps: Vec<String> = m.steps_bp.iter().map(|bp| pct(*bp)).collect();
    println!(
        "  steps     {} (now {}), bake {}",
        steps.join(", "),
        m.step + 1,
        m.bake
    );
    println!("  weights   {}", weights_text(m));
    if !m.waiting.is_empty() {
        println!("  waiting   {}", m.waiting);
    }
    println!("  by        {}", shown(&m.created_by));
    if !m.reason.is_empty() {
        println!("  reason    {}", shown(&m.reason));
    }
    for g in &m.gates {
        println!(
            "  gate {}    {} — {}",
            g.step + 1,
            g.outcome,
            shown(&g.detail)
        );
    }
}

fn print_list(conn: &Conn, list: &[Migration]) {
    if conn.output == Output::Json {
        let all: Vec<_> = list.iter().map(to_json).collect();
        println!("{}", json!(all));
        return;
    }
    println!(
        "{:<10} {:<28} {:<14} {:<14} {:>6} WEIGHTS",
        "ID", "SERVICE", "STAGE", "PHASE", "STEP"
    );
    for m in list {
        println!(
            "{:<10} {:<28} {:<14} {:<14} {:>6} {}",
            m.id,
            m.service,
            m.stage,
            m.phase,
            format!("{}/{}", m.step + 1, m.steps_bp.len()),
            weights_text(m)
        );
    }
}
