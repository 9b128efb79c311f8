//! The engine's migrations, indexed so that each tick and each transition
//! costs what is active, not every migration ever run.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Deref;

use crate::migration::{Migration, StageName};

/// Every migration by id, with the ids of those not ended and a count per
/// stage, kept as records change.
#[derive(Debug, Default, Clone)]
pub struct Migrations {
    all: BTreeMap<String, Migration>,
    active: BTreeSet<String>,
    by_stage: BTreeMap<StageName, u64>,
    /// The ids of those that ended last, newest first.
    ended: VecDeque<String>,
    /// DONE ones whose source objects are to be deleted after their
    /// retention.
    deletions: BTreeSet<String>,
}

/// How many recently ended migrations are kept at hand.
const RECENT: usize = 100;

impl Migrations {
    pub fn new(all: BTreeMap<String, Migration>) -> Self {
        let mut ended: Vec<(i64, String)> = all
            .values()
            .filter(|m| m.stage.is_terminal())
            .map(|m| (m.updated_at_ms, m.id.clone()))
            .collect();
        ended.sort();
        let mut out = Self::default();
        for (id, m) in all {
            out.insert(id, m);
        }
        out.ended = ended
            .into_iter()
            .rev()
            .take(RECENT)
            .map(|(_, id)| id)
            .collect();
        out
    }

    /// Adds or replaces a record.
    pub fn insert(&mut self, id: String, m: Migration) {
        if m.source_deletion_due().is_some() {
            self.deletions.insert(id.clone());
        } else {
            self.deletions.remove(&id);
        }
        if m.stage.is_terminal() {
            if self.active.remove(&id) {
                self.ended.retain(|e| *e != id);
                self.ended.push_front(id.clone());
                self.ended.truncate(RECENT);
            }
        } else {
            self.active.insert(id.clone());
        }
        *self.by_stage.entry(m.stage.name()).or_default() += 1;
        if let Some(old) = self.all.insert(id, m)
            && let Some(n) = self.by_stage.get_mut(&old.stage.name())
        {
            *n = n.saturating_sub(1);
        }
    }

    /// Those not ended, in id order.
    pub fn active(&self) -> impl Iterator<Item = &Migration> {
        self.active.iter().filter_map(|id| self.all.get(id))
    }

    /// Those not ended, then up to `ended` of those that ended last
    /// (newest first).
    pub fn recent(&self, ended: usize) -> Vec<Migration> {
        let mut out: Vec<Migration> = self.active().cloned().collect();
        out.extend(
            self.ended
                .iter()
                .take(ended)
                .filter_map(|id| self.all.get(id))
                .cloned(),
        );
        out
    }

    /// DONE migrations whose source deletion is due at `now`.
    pub fn deletions_due(&self, now: i64) -> Vec<Migration> {
        self.deletions
            .iter()
            .filter_map(|id| self.all.get(id))
            .filter(|m| m.source_deletion_due().is_some_and(|due| due <= now))
            .cloned()
            .collect()
    }

    /// How many are in `stage`.
    pub fn count(&self, stage: StageName) -> u64 {
        self.by_stage.get(&stage).copied().unwrap_or(0)
    }
}

impl Deref for Migrations {
    type Target = BTreeMap<String, Migration>;

    fn deref(&self) -> &Self::Target {
        &self.all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn record(id: &str, stage: StageName, updated: i64) -> Migration {
        let json = serde_json::json!({
            "id": id,
            "plan": {"service": "a.ns", "from": ["old"], "to": "new", "steps": [10000],
                     "bake_ms": 1, "gates": {"max_error_rate_increase": 0.01, "max_error_rate": 0.0,
                     "min_requests": 1, "data_timeout_ms": 1}, "ack_share": 1.0,
                     "ack_timeout_ms": 1, "double_deploy_timeout_ms": 1, "min_capacity": 0.5, "drain_ms": 1},
            "stage": stage, "phase": "AWAITING_ACK", "step": 0, "paused_from": null,
            "source_weights": {}, "weights": {}, "reason": "", "purpose": "", "gates": [],
            "created_by": "t", "created_at_ms": 0, "updated_at_ms": updated, "phase_started_ms": 0,
        });
        serde_json::from_value(json).expect("a migration record")
    }

    #[test]
    fn the_index_follows_every_change() {
        let mut all = BTreeMap::new();
        for (id, stage, at) in [
            ("mig-1", StageName::Done, 10),
            ("mig-2", StageName::RolledBack, 30),
            ("mig-3", StageName::Shift, 5),
        ] {
            all.insert(id.to_owned(), record(id, stage, at));
        }
        let mut m = Migrations::new(all);
        let ids = |v: Vec<Migration>| v.into_iter().map(|m| m.id).collect::<Vec<_>>();
        assert_eq!(
            m.active().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["mig-3"]
        );
        assert_eq!(ids(m.recent(5)), ["mig-3", "mig-2", "mig-1"]);
        assert_eq!(
            (m.count(StageName::Shift), m.count(StageName::Done)),
            (1, 1)
        );
        // mig-3 ends: it leaves the active set and is the newest ended.
        m.insert("mig-3".into(), record("mig-3", StageName::Done, 40));
        assert_eq!(m.active().count(), 0);
        assert_eq!(ids(m.recent(2)), ["mig-3", "mig-2"]);
        assert_eq!(
            (m.count(StageName::Shift), m.count(StageName::Done)),
            (0, 2)
        );
        // A new one is active; ended ones stay listed.
        m.insert("mig-4".into(), record("mig-4", StageName::Validate, 50));
        assert_eq!(ids(m.recent(1)), ["mig-4", "mig-3"]);
        assert_eq!(m.len(), 4);
    }
}
