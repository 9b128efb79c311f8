//! `ferry campaign …`: move every service of one cluster to another over
//! the `ferry.v1.Campaigns` API.

use std::io::{IsTerminal, Write};

use ferry_proto::ferry::v1::campaigns_client::CampaignsClient;
use ferry_proto::ferry::v1::{
    Campaign, CampaignActionRequest, CreateCampaignRequest, GetCampaignRequest,
    ListCampaignsRequest, RetryCampaignRequest,
};
use serde_json::json;
use tonic::transport::Channel;

use crate::cli::{Conn, Output, request, shown, status_error};
use crate::migrate_cli::MigrationOptions;

#[derive(Debug, clap::Subcommand)]
pub enum CampaignCommand {
    /// Start a campaign: `ferry campaign start --from old --to new
    /// --concurrency 20 --max-failures 3 --reason "retire old"`.
    Start(Box<StartArgs>),
    /// List campaigns.
    List {
        /// Only those that have not ended.
        #[arg(long)]
        active: bool,
    },
    /// Show one campaign, with every service.
    Get { id: String },
    /// Launch nothing more; in-flight migrations stop at the end of their
    /// current step.
    Pause {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Launch again, and let held migrations go on.
    Resume {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Launch nothing more and roll back the migrations in flight.
    Abort {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Queue skipped and rolled-back services again.
    Retry {
        id: String,
        /// Only these services (name.namespace); default: all of them.
        #[arg(long = "service")]
        services: Vec<String>,
        #[arg(long)]
        reason: String,
    },
    /// Follow a campaign live until it ends: counts, the services in
    /// flight with their stage and step, throughput and ETA.
    Watch { id: String },
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The cluster being emptied.
    #[arg(long)]
    from: String,
    /// The cluster its services move to, or several with their shares in
    /// percent: `new-a=60,new-b=40`.
    #[arg(long)]
    to: String,
    /// Only services matching these globs on name.namespace (`checkout.*`,
    /// `*.shop`), comma separated or repeated.
    #[arg(long, value_delimiter = ',')]
    services: Vec<String>,
    /// Only services in these namespaces.
    #[arg(long = "namespace", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Migrations of this campaign in flight at once.
    #[arg(long, default_value_t = 20)]
    concurrency: u32,
    /// Rolled-back services after which no more are launched (0: never
    /// stop).
    #[arg(long, default_value_t = 3)]
    max_failures: u32,
    /// smallest-first (fewest endpoints in --from first), largest-first or
    /// name.
    #[arg(long, default_value = "smallest-first")]
    order: String,
    #[command(flatten)]
    migration: MigrationOptions,
    /// Why (goes into the audit log).
    #[arg(long)]
    reason: String,
    /// Follow the campaign until it ends.
    #[arg(long)]
    watch: bool,
}

async fn connect(conn: &Conn) -> anyhow::Result<CampaignsClient<Channel>> {
    Ok(CampaignsClient::new(crate::cli::channel(conn).await?))
}

pub async fn run(conn: &Conn, command: CampaignCommand) -> anyhow::Result<()> {
    let mut api = connect(conn).await?;
    let action = |id: String, reason: String| CampaignActionRequest { id, reason };
    let c = match command {
        CampaignCommand::Start(args) => {
            let StartArgs {
                from,
                to,
                services,
                namespaces,
                concurrency,
                max_failures,
                order,
                migration,
                reason,
                watch,
            } = *args;
            let (to, targets) = crate::migrate_cli::parse_targets(&to)?;
            let message = CreateCampaignRequest {
                from,
                to,
                targets,
                services,
                namespaces,
                concurrency,
                max_failures,
                unlimited_failures: max_failures == 0,
                order,
                migration: Some(migration.request(String::new(), Vec::new(), "", String::new())?),
                reason,
            };
            let c = api
                .create_campaign(request(conn, message))
                .await
                .map_err(status_error)?
                .into_inner();
            if watch {
                return follow(conn, &mut api, c.id).await;
            }
            c
        }
        CampaignCommand::List { active } => {
            let list = api
                .list_campaigns(request(
                    conn,
                    ListCampaignsRequest {
                        active_only: active,
                    },
                ))
                .await
                .map_err(status_error)?
                .into_inner()
                .campaigns;
            if conn.output == Output::Json {
                let all: Vec<_> = list.iter().map(to_json).collect();
                println!("{}", json!({ "campaigns": all }));
            } else {
                for c in &list {
                    println!("{}", summary_line(c));
                }
            }
            return Ok(());
        }
        CampaignCommand::Get { id } => api
            .get_campaign(request(conn, GetCampaignRequest { id }))
            .await
            .map_err(status_error)?
            .into_inner(),
        CampaignCommand::Pause { id, reason } => api
            .pause_campaign(request(conn, action(id, reason)))
            .await
            .map_err(status_error)?
            .into_inner(),
        CampaignCommand::Resume { id, reason } => api
            .resume_campaign(request(conn, action(id, reason)))
            .await
            .map_err(status_error)?
            .into_inner(),
        CampaignCommand::Abort { id, reason } => api
            .abort_campaign(request(conn, action(id, reason)))
            .await
            .map_err(status_error)?
            .into_inner(),
        CampaignCommand::Retry {
            id,
            services,
            reason,
        } => api
            .retry_campaign(request(
                conn,
                RetryCampaignRequest {
                    id,
                    services,
                    reason,
                },
            ))
            .await
            .map_err(status_error)?
            .into_inner(),
        CampaignCommand::Watch { id } => return follow(conn, &mut api, id).await,
    };
    if conn.output == Output::Json {
        println!("{}", to_json(&c));
    } else {
        println!("{}", details(&c));
    }
    Ok(())
}

/// Prints every update until the campaign ends: on a terminal one block
/// redrawn in place, in a pipe a line whenever the summary or a service's
/// progress changes. Exits successfully only for DONE.
async fn follow(conn: &Conn, api: &mut CampaignsClient<Channel>, id: String) -> anyhow::Result<()> {
    let mut stream = api
        .watch_campaign(request(conn, GetCampaignRequest { id: id.clone() }))
        .await
        .map_err(status_error)?
        .into_inner();
    let live = conn.output == Output::Table && std::io::stdout().is_terminal();
    let mut last: Option<Campaign> = None;
    let mut drawn_lines = 0usize;
    let mut printed: std::collections::BTreeMap<String, String> = Default::default();
    while let Some(c) = stream.message().await.map_err(status_error)? {
        if conn.output == Output::Json {
            println!("{}", to_json(&c));
        } else if live {
            let block = live_block(&c);
            let mut out = std::io::stdout().lock();
            if drawn_lines > 0 {
                // Back to the top of the last block, then clear below.
                let _ = write!(out, "\x1b[{drawn_lines}A\r\x1b[J");
            }
            let _ = write!(out, "{block}");
            let _ = out.flush();
            drawn_lines = block.lines().count();
        } else {
            let line = summary_line(&c);
            if printed.get("").is_none_or(|l| *l != line) {
                println!("{line}");
                printed.insert(String::new(), line);
            }
            for s in &c.services {
                let state = service_line(s);
                if printed.get(&s.service).is_none_or(|l| *l != state) {
                    if s.state != "queued" {
                        println!("  {state}");
                    }
                    printed.insert(s.service.clone(), state);
                }
            }
        }
        last = Some(c);
    }
    match last {
        Some(c) if c.state == "DONE" => Ok(()),
        Some(c) if matches!(c.state.as_str(), "HALTED" | "ABORTED") => {
            anyhow::bail!("campaign {id} ended {}: {}", c.state, c.reason)
        }
        _ => anyhow::bail!("the watch of campaign {id} ended before the campaign did"),
    }
}

/// One line: state, counts, throughput, ETA.
pub fn summary_line(c: &Campaign) -> String {
    let n = c.counts.unwrap_or_default();
    let mut line = format!(
        "{} {} → {} {}: {} done, {} in flight, {} queued, {} rolled back, {} skipped",
        c.id,
        c.from,
        crate::migrate_cli::targets_text(&c.to, &c.targets),
        c.state,
        n.done,
        n.in_flight,
        n.queued,
        n.rolled_back,
        n.skipped
    );
    if c.per_minute > 0.0 {
        line.push_str(&format!(" ({:.1}/min", c.per_minute));
        if c.eta_seconds > 0 {
            let eta = std::time::Duration::from_secs(c.eta_seconds as u64);
            line.push_str(&format!(", ETA {}", humantime::format_duration(eta)));
        }
        line.push(')');
    }
    if !c.reason.is_empty() {
        line.push_str(&format!(" — {}", shown(&c.reason)));
    }
    line
}

fn service_line(s: &ferry_proto::ferry::v1::CampaignService) -> String {
    let mut line = format!("{:<32} {:<11}", s.service, s.state);
    if !s.migration.is_empty() {
        line.push_str(&format!(" {}", s.migration));
    }
    if !s.progress.is_empty() {
        line.push_str(&format!(" {}", s.progress));
    }
    if !s.reason.is_empty() {
        line.push_str(&format!(" — {}", shown(&s.reason)));
    }
    line
}

/// The summary and the services that are not simply queued or done.
fn live_block(c: &Campaign) -> String {
    let mut out = format!("{}\n", summary_line(c));
    for s in c
        .services
        .iter()
        .filter(|s| matches!(s.state.as_str(), "in_flight" | "rolled_back" | "skipped"))
    {
        out.push_str(&format!("  {}\n", service_line(s)));
    }
    out
}

/// The summary and every service.
fn details(c: &Campaign) -> String {
    let mut out = summary_line(c);
    out.push_str(&format!(
        "\n  concurrency {}, max failures {}, order {}, by {}: {}",
        c.concurrency,
        c.max_failures,
        c.order,
        c.created_by,
        shown(&c.purpose)
    ));
    for s in &c.services {
        out.push_str(&format!("\n  {}", service_line(s)));
    }
    out
}

fn to_json(c: &Campaign) -> serde_json::Value {
    let n = c.counts.unwrap_or_default();
    let services: Vec<_> = c
        .services
        .iter()
        .map(|s| json!({"service": s.service, "state": s.state, "migration": s.migration, "reason": s.reason, "endpoints": s.endpoints, "progress": s.progress, "updated_at_unix_ms": s.updated_at_unix_ms}))
        .collect();
    json!({
        "id": c.id, "from": c.from, "to": c.to, "state": c.state, "reason": c.reason,
        "purpose": c.purpose, "concurrency": c.concurrency, "max_failures": c.max_failures,
        "order": c.order, "created_by": c.created_by, "created_at_unix_ms": c.created_at_unix_ms,
        "updated_at_unix_ms": c.updated_at_unix_ms, "ended_at_unix_ms": c.ended_at_unix_ms,
        "per_minute": c.per_minute, "eta_seconds": c.eta_seconds,
        "counts": {"queued": n.queued, "in_flight": n.in_flight, "done": n.done, "rolled_back": n.rolled_back, "skipped": n.skipped},
        "services": services,
    })
}
