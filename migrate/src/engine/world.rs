//! The live control plane as the stage machine sees it, and the p99
//! readings latency gates judge.

use super::*;

/// The live control plane as the stage machine sees it.
pub(super) struct LiveWorld<'a> {
    pub(super) catalog: &'a CatalogSnapshot,
    pub(super) snapshot: &'a Snapshot,
    pub(super) clients: &'a ClientRegistry,
    pub(super) loads: &'a LoadReports,
    pub(super) policy: &'a Policy,
    pub(super) fleet: &'a Fleet,
    pub(super) latencies: &'a BTreeMap<String, LatencyReading>,
    pub(super) returning: usize,
    /// Deploy work as it stands.
    pub(super) deploys: &'a Deploys,
    /// Deploy work the stage machine asked for that has not started.
    pub(super) asked: std::cell::RefCell<Vec<(Migration, DeployStep)>>,
}

impl World for LiveWorld<'_> {
    fn service(&self, name: &ServiceName) -> Option<&Service> {
        self.catalog.services.get(name).map(|s| &**s)
    }

    fn weights(&self, name: &ServiceName) -> Option<Weights> {
        self.policy
            .weights(&name.to_string())
            .ok()
            .map(|(_, w, _, _)| w)
    }

    fn acks(&self, policy_version: u64) -> Acks {
        let (acked, total) = local_acks(self.snapshot, self.clients, policy_version);
        let (peers_acked, peers_total) = self.fleet.acks(policy_version);
        Acks {
            acked: acked + peers_acked,
            connected: total + peers_total,
            returning: self.returning,
        }
    }

    fn load(&self, service: &ServiceName, cluster: &ClusterName, since_ms: i64) -> Load {
        self.loads
            .since(&service.to_string(), cluster.as_str(), since_ms)
    }

    fn deploy(&self, m: &Migration, step: DeployStep) -> DeployProgress {
        match self.deploys.get(&(m.id.clone(), step)) {
            Some(progress) => progress.clone(),
            None => {
                self.asked.borrow_mut().push((m.clone(), step));
                DeployProgress::Pending
            }
        }
    }

    fn latency(&self, m: &Migration) -> Latency {
        self.latencies
            .get(&m.id)
            .filter(|r| Some(r.step) == m.stage.step() && r.phase_started_ms == m.phase_started_ms)
            .map(|r| r.latency)
            .unwrap_or_default()
    }
}

/// The latest p99 readings of one migration's baking step.
#[derive(Debug, Clone, Copy)]
pub(super) struct LatencyReading {
    step: usize,
    phase_started_ms: i64,
    fetched: std::time::Instant,
    latency: Latency,
}

impl Engine {
    /// Reads the p99 latencies of every baking step with latency gates from
    /// Prometheus, at most once a second each. A failed query leaves no
    /// reading: the gate then sees "not enough data", never a pass.
    pub(super) async fn refresh_latencies(&self) {
        if !self.is_leading() {
            return;
        }
        let due: Vec<Migration> = self
            .lock()
            .values()
            .filter(|m| {
                matches!(
                    m.stage,
                    Stage::Shift {
                        phase: StepPhase::Baking,
                        ..
                    }
                )
            })
            .filter(|m| m.plan.gates.latency.is_some())
            .cloned()
            .collect();
        for m in due {
            let Some(gate) = &m.plan.gates.latency else {
                continue;
            };
            let fresh = self
                .latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&m.id)
                .is_some_and(|r| {
                    Some(r.step) == m.stage.step()
                        && r.phase_started_ms == m.phase_started_ms
                        && r.fetched.elapsed() < Duration::from_secs(1)
                });
            if fresh {
                continue;
            }
            let window = Duration::from_millis((now_ms() - m.phase_started_ms).max(0) as u64);
            let (name, namespace) = (m.plan.service.name(), m.plan.service.namespace());
            let sources = format!(
                "({})",
                m.plan
                    .from
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join("|")
            );
            let mut reading = Latency::default();
            let targets = format!(
                "({})",
                m.plan
                    .target_shares()
                    .iter()
                    .map(|(c, _)| c.to_string())
                    .collect::<Vec<_>>()
                    .join("|")
            );
            for (side, cluster) in [("source", sources), ("target", targets)] {
                let query = render(&gate.p99_query, name, namespace, &cluster, window);
                let value = match self.prometheus.scalar(&gate.prometheus_url, &query).await {
                    Ok(v) => v,
                    Err(e) => {
                        metrics::counter!("ferry_migrate_prometheus_errors_total").increment(1);
                        tracing::warn!(id = %m.id, side, error = %e, "cannot read p99 from Prometheus");
                        None
                    }
                };
                match side {
                    "source" => reading.source_p99_ms = value,
                    _ => reading.target_p99_ms = value,
                }
            }
            self.latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    m.id.clone(),
                    LatencyReading {
                        step: m.step_reached(),
                        phase_started_ms: m.phase_started_ms,
                        fetched: std::time::Instant::now(),
                        latency: reading,
                    },
                );
        }
    }
}
