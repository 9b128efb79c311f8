//! Deploy work the stage machine asks for, run in tasks of their own; the
//! machine reads how it stands on later ticks.

use super::*;

impl Engine {
    /// Starts the deploy work asked for in this tick, and forgets the work
    /// of migrations that have ended.
    pub(super) fn start_deploys(&self, asked: Vec<(Migration, DeployStep)>) {
        let map = self.lock();
        let mut deploys = self.deploys.lock().unwrap_or_else(|p| p.into_inner());
        deploys.retain(|(id, step), _| {
            map.get(id).is_some_and(|m| {
                !m.stage.is_terminal()
                    || (*step == DeployStep::DeleteSource && m.source_deletion_due().is_some())
            })
        });
        drop(map);
        for (m, step) in asked {
            let key = (m.id.clone(), step);
            if deploys.contains_key(&key) {
                continue;
            }
            deploys.insert(key.clone(), DeployProgress::Pending);
            tracing::info!(
                id = %m.id, service = %m.plan.service, step = step.as_str(),
                mode = m.plan.deploy.as_str(), "deploy work started"
            );
            let deployer = self.deployer.clone();
            let deploys = self.deploys.clone();
            let wake = self.wake.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = deployer.run(&m, step).await;
                let progress = match &result {
                    Ok(()) => {
                        tracing::info!(
                            id = %m.id, step = step.as_str(), took = ?started.elapsed(),
                            "deploy work done"
                        );
                        DeployProgress::Done
                    }
                    Err(e) => {
                        tracing::warn!(id = %m.id, step = step.as_str(), error = %e, "deploy work failed");
                        DeployProgress::Failed(e.to_string())
                    }
                };
                let outcome = if result.is_ok() { "done" } else { "failed" };
                metrics::counter!("ferry_migrate_deploy_runs_total", "step" => step.as_str(), "outcome" => outcome)
                    .increment(1);
                metrics::histogram!("ferry_migrate_deploy_seconds", "step" => step.as_str())
                    .record(started.elapsed().as_secs_f64());
                let mut deploys = deploys.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(slot) = deploys.get_mut(&key) {
                    *slot = progress;
                }
                drop(deploys);
                wake.notify_one();
            });
        }
    }
}

impl Engine {
    /// Deletes the source objects of DONE migrations whose retention has
    /// passed (`--deploy kube --delete-source`), and records it. A failed
    /// deletion is tried again after [`DELETE_RETRY`].
    pub(super) async fn tick_deletions(&self, now: i64) {
        let due = self.lock().deletions_due(now);
        if due.is_empty() {
            return;
        }
        let progress = self
            .deploys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut asked = Vec::new();
        for m in due {
            let key = (m.id.clone(), DeployStep::DeleteSource);
            match progress.get(&key) {
                None => {
                    let backoff = self
                        .deletion_backoff
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&m.id)
                        .is_some_and(|at| at.elapsed() < DELETE_RETRY);
                    if !backoff {
                        asked.push((m, DeployStep::DeleteSource));
                    }
                }
                Some(DeployProgress::Pending) => {}
                Some(DeployProgress::Done) => {
                    let mut to = m.clone();
                    to.stage = Stage::Done {
                        source_deleted: true,
                    };
                    let t = Transition::plain(
                        "migration_source_deleted",
                        to,
                        "the retention passed; the source's objects were deleted",
                    );
                    if let Err(e) = self.apply(t, &m.owner()).await {
                        tracing::error!(id = %m.id, error = %e, "cannot record the source's deletion");
                    }
                }
                Some(DeployProgress::Failed(e)) => {
                    tracing::warn!(id = %m.id, error = %e, retry_in = ?DELETE_RETRY, "deleting the source failed");
                    self.deletion_backoff
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(m.id.clone(), Instant::now());
                    self.deploys
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                }
            }
        }
        self.start_deploys(asked);
    }
}

/// How long a failed source deletion waits before it is tried again.
const DELETE_RETRY: Duration = Duration::from_secs(300);
