//! What the demo shows: four services in `old`, three of them moved to
//! `new` by migrations with real stages, acknowledgement waits, bakes and
//! gates on the proxies' load reports. `search`'s new pods answer a share
//! of requests with an injected 503, so its gate fails and it rolls back;
//! `payments` is pinned by a (simulated) deploy tool, so it stays put.

use std::time::Duration;

use ferry_proto::ferry::v1::{CreateMigrationRequest, Gates, PinRequest};

pub const NAMESPACE: &str = "shop";

/// The share of `search`'s requests its new pods fail on purpose.
pub const FAULT_SHARE: f64 = 0.3;

/// What happens to one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Migrates old → new.
    Moves,
    /// Migrates, but its new pods fail a share of requests: rolls back.
    Faulty,
    /// Pinned by a deploy tool: its migration is refused.
    Pinned,
}

#[derive(Debug, Clone, Copy)]
pub struct ServicePlan {
    pub name: &'static str,
    pub fate: Fate,
    /// Typical latency in old and in new.
    pub latency_ms: (u64, u64),
}

impl ServicePlan {
    pub fn full_name(&self) -> String {
        format!("{}.{NAMESPACE}", self.name)
    }

    pub fn host(&self) -> String {
        format!("{}.demo", self.name)
    }

    pub fn latency(&self, cluster: &str) -> Duration {
        Duration::from_millis(if cluster == "old" {
            self.latency_ms.0
        } else {
            self.latency_ms.1
        })
    }

    pub fn fault_share(&self, cluster: &str) -> f64 {
        if self.fate == Fate::Faulty && cluster == "new" {
            FAULT_SHARE
        } else {
            0.0
        }
    }

    /// A line that says what is special about it, if anything.
    pub fn note(&self) -> Option<String> {
        match self.fate {
            Fate::Moves => None,
            Fate::Faulty => Some(format!(
                "injected fault: {:.0} % of requests to its new pods answer 503",
                FAULT_SHARE * 100.0
            )),
            Fate::Pinned => Some(format!("pinned by {PIN_OWNER}: {PIN_REASON}")),
        }
    }
}

pub const SERVICES: [ServicePlan; 4] = [
    ServicePlan {
        name: "checkout",
        fate: Fate::Moves,
        latency_ms: (6, 4),
    },
    ServicePlan {
        name: "cart",
        fate: Fate::Moves,
        latency_ms: (3, 3),
    },
    ServicePlan {
        name: "search",
        fate: Fate::Faulty,
        latency_ms: (8, 6),
    },
    ServicePlan {
        name: "payments",
        fate: Fate::Pinned,
        latency_ms: (5, 5),
    },
];

pub const PIN_OWNER: &str = "deploy-tool";
pub const PIN_REASON: &str = "release 2026.11.30-4 is rolling out";

/// The pin the deploy tool holds.
pub fn pin(service: &ServicePlan) -> PinRequest {
    PinRequest {
        service: service.full_name(),
        owner: PIN_OWNER.into(),
        reason: PIN_REASON.into(),
        ttl_seconds: 0,
    }
}

/// How fast the migrations go.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub steps: &'static [f64],
    pub bake: Duration,
    pub min_requests: u64,
    pub drain: Duration,
}

impl Pace {
    pub fn new(fast: bool) -> Self {
        if fast {
            Self {
                steps: &[10.0, 50.0, 100.0],
                bake: Duration::from_secs(4),
                min_requests: 20,
                drain: Duration::from_secs(1),
            }
        } else {
            Self {
                steps: &[5.0, 25.0, 50.0, 100.0],
                bake: Duration::from_secs(30),
                min_requests: 50,
                drain: Duration::from_secs(10),
            }
        }
    }
}

fn text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The migration of `service` from old to new at `pace`.
pub fn migration(service: &ServicePlan, pace: Pace) -> CreateMigrationRequest {
    CreateMigrationRequest {
        service: service.full_name(),
        from: vec!["old".into()],
        to: "new".into(),
        steps: pace.steps.to_vec(),
        bake: text(pace.bake),
        gates: Some(Gates {
            min_requests: pace.min_requests,
            data_timeout: text(pace.bake * 5),
            ..Default::default()
        }),
        ack_timeout: "30s".into(),
        drain: text(pace.drain),
        reason: "cluster old is being rebuilt (ferry demo)".into(),
        min_proxies: 1,
        ..Default::default()
    }
}

/// The catalog `ferry control` runs with: both clusters, watched through
/// their kubeconfigs, and a static entry per service that gives it a host,
/// sticky users, and all traffic on `old` to start with.
pub fn catalog(port_of: impl Fn(&str) -> u16) -> String {
    let mut yaml = String::from(
        "kubernetes:\n  namespaces: [shop]\n  clusters:\n    - {name: old, kubeconfig: old.yaml}\n    - {name: new, kubeconfig: new.yaml}\nservices:\n",
    );
    for s in SERVICES {
        yaml.push_str(&format!(
            "  - name: {name}\n    namespace: {NAMESPACE}\n    ports: [{{name: http, port: {port}}}]\n    hosts: [{host}]\n    backends: {{old: {{endpoints: []}}, new: {{endpoints: []}}}}\n    weights: {{old: 10000, new: 0}}\n    sticky: {{header: x-user}}\n",
            name = s.name,
            port = port_of(s.name),
            host = s.host(),
        ));
    }
    yaml
}
