//! The demo's operator: pins `payments` as the deploy tool would, starts
//! the migrations through the migrations API (as `ferry migrate start`
//! does), and follows them into the view model the terminal and the
//! summary show.

use std::collections::BTreeMap;

use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
use ferry_proto::ferry::v1::traffic_client::TrafficClient;
use ferry_proto::ferry::v1::{
    GetWeightsRequest, ListMigrationsRequest, ListServicesRequest, Migration,
};
use tonic::transport::Channel;

use super::scenario::{self, Fate, Pace, SERVICES, ServicePlan};

/// Where one service stands, as shown.
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub plan: ServicePlan,
    pub migration: Option<Migration>,
    /// Why no migration runs (the refusal), for a pinned service.
    pub refused: Option<String>,
    /// The service's weights now (basis points).
    pub weights: BTreeMap<String, u32>,
}

impl ServiceView {
    pub fn stage(&self) -> &str {
        match (&self.migration, &self.refused) {
            (Some(m), _) => &m.stage,
            (None, Some(_)) => "PINNED",
            (None, None) => "WAITING",
        }
    }

    /// DONE, ROLLED_BACK, FAILED or PINNED once it has ended.
    pub fn outcome(&self) -> Option<&str> {
        match (&self.migration, &self.refused) {
            (Some(m), _) if matches!(m.stage.as_str(), "DONE" | "ROLLED_BACK" | "FAILED") => {
                Some(&m.stage)
            }
            (None, Some(_)) => Some("PINNED"),
            _ => None,
        }
    }

    pub fn duration_s(&self) -> f64 {
        self.migration
            .as_ref()
            .filter(|_| self.outcome().is_some())
            .map(|m| (m.updated_at_unix_ms - m.created_at_unix_ms) as f64 / 1000.0)
            .unwrap_or(0.0)
    }

    /// Step k of n, when shifting.
    pub fn step(&self) -> Option<(u32, usize)> {
        let m = self.migration.as_ref()?;
        (!m.steps_bp.is_empty() && matches!(m.stage.as_str(), "SHIFT" | "PAUSED"))
            .then(|| (m.step + 1, m.steps_bp.len()))
    }

    /// The latest word on it: what a step waits for, the last gate, or
    /// why it ended.
    pub fn detail(&self) -> String {
        if let Some(r) = &self.refused {
            return r.clone();
        }
        let Some(m) = &self.migration else {
            return String::new();
        };
        if !m.reason.is_empty() {
            return m.reason.clone();
        }
        if !m.waiting.is_empty() {
            return format!("waiting: {}", m.waiting);
        }
        m.gates
            .last()
            .map(|g| format!("gate {}: {}", g.outcome, g.detail))
            .unwrap_or_default()
    }
}

/// The API clients of the demo's control plane.
pub struct Operator {
    traffic: TrafficClient<Channel>,
    migrations: MigrationsClient<Channel>,
    pub views: Vec<ServiceView>,
}

fn actor<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "x-ferry-actor",
        tonic::metadata::MetadataValue::from_static("ferry-demo"),
    );
    r
}

impl Operator {
    pub async fn connect(api: std::net::SocketAddr) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(format!("http://{api}"))?
            .connect()
            .await?;
        Ok(Self {
            traffic: TrafficClient::new(channel.clone()),
            migrations: MigrationsClient::new(channel),
            views: SERVICES
                .iter()
                .map(|plan| ServiceView {
                    plan: *plan,
                    migration: None,
                    refused: None,
                    weights: BTreeMap::new(),
                })
                .collect(),
        })
    }

    /// The deploy tool pins its service; every other service starts
    /// migrating. The pinned one is tried too, and refused.
    pub async fn start(&mut self, pace: Pace) -> anyhow::Result<()> {
        for plan in SERVICES.iter().filter(|s| s.fate == Fate::Pinned) {
            self.traffic.pin(actor(scenario::pin(plan))).await?;
        }
        for view in &mut self.views {
            match self
                .migrations
                .create_migration(actor(scenario::migration(&view.plan, pace)))
                .await
            {
                Ok(m) => view.migration = Some(m.into_inner()),
                Err(status) if view.plan.fate == Fate::Pinned => {
                    view.refused = Some(status.message().to_owned());
                }
                Err(status) => {
                    anyhow::bail!(
                        "the migration of {} was refused: {}",
                        view.plan.full_name(),
                        status.message()
                    )
                }
            }
        }
        Ok(())
    }

    /// Reads every migration and the services' weights again.
    pub async fn refresh(&mut self) -> anyhow::Result<()> {
        let list = self
            .migrations
            .list_migrations(ListMigrationsRequest::default())
            .await?
            .into_inner()
            .migrations;
        for view in &mut self.views {
            let name = view.plan.full_name();
            if let Some(m) = list.iter().rev().find(|m| m.service == name) {
                view.migration = Some(m.clone());
            }
            if let Ok(w) = self
                .traffic
                .get_weights(GetWeightsRequest {
                    service: name.clone(),
                })
                .await
            {
                view.weights = w
                    .into_inner()
                    .weights
                    .into_iter()
                    .map(|w| (w.cluster, w.basis_points))
                    .collect();
            }
        }
        Ok(())
    }

    /// Whether the control plane knows every service with ready endpoints
    /// in both clusters.
    pub async fn discovered(&mut self) -> bool {
        let Ok(list) = self.traffic.list_services(ListServicesRequest {}).await else {
            return false;
        };
        let list = list.into_inner().services;
        SERVICES.iter().all(|plan| {
            list.iter()
                .find(|s| s.service == plan.full_name())
                .is_some_and(|s| {
                    ["old", "new"]
                        .iter()
                        .all(|c| s.backends.iter().any(|b| b.cluster == *c && b.ready > 0))
                })
        })
    }

    /// Every service has its outcome.
    pub fn finished(&self) -> bool {
        self.views.iter().all(|v| v.outcome().is_some())
    }
}
