//! Deploy work the stage machine asks for, run in tasks of their own; the
//! machine reads how it stands on later ticks.

use super::*;

impl Engine {
    /// Starts the deploy work asked for in this tick, and forgets the work
    /// of migrations that have ended.
    pub(super) fn start_deploys(&self, asked: Vec<(Migration, DeployStep)>, map: &Migrations) {
        let mut deploys = self.deploys.lock().unwrap_or_else(|p| p.into_inner());
        deploys.retain(|(id, _), _| map.get(id).is_some_and(|m| !m.stage.is_terminal()));
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
