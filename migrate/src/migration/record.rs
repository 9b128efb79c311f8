//! A migration's stored form: flat, as every record so far was written
//! (`stage`, `phase`, `step`, `paused_from`, `source_deleted`), turned
//! into the typed [`Stage`] on load. A record whose fields name a state
//! the machine cannot be in is refused with what is wrong, never guessed
//! at.

use super::*;

/// The phase as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum StoredPhase {
    #[default]
    None,
    AwaitingAck,
    Baking,
}

impl From<StepPhase> for StoredPhase {
    fn from(p: StepPhase) -> Self {
        match p {
            StepPhase::AwaitingAck => Self::AwaitingAck,
            StepPhase::Baking => Self::Baking,
        }
    }
}

/// A migration record as written to the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Stored {
    id: String,
    plan: Plan,
    stage: StageName,
    #[serde(default)]
    phase: StoredPhase,
    #[serde(default)]
    step: usize,
    #[serde(default)]
    paused_from: Option<(StageName, StoredPhase)>,
    source_weights: BTreeMap<ClusterName, u32>,
    weights: BTreeMap<ClusterName, u32>,
    reason: String,
    purpose: String,
    gates: Vec<GateResult>,
    created_by: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    phase_started_ms: i64,
    #[serde(default)]
    hold: bool,
    #[serde(default)]
    source_deleted: bool,
}

/// Why a stored record cannot be a migration.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("stage {stage} cannot have phase {phase:?}")]
    Phase { stage: &'static str, phase: String },
    #[error("step {step} is outside the plan's {steps} steps")]
    Step { step: usize, steps: usize },
    #[error("a paused migration must say where it resumes (paused_from)")]
    NoResume,
    #[error("a migration cannot resume into {0}")]
    Resume(&'static str),
}

fn step_phase(stage: StageName, phase: StoredPhase) -> Result<StepPhase, RecordError> {
    match phase {
        StoredPhase::AwaitingAck => Ok(StepPhase::AwaitingAck),
        StoredPhase::Baking => Ok(StepPhase::Baking),
        StoredPhase::None => Err(RecordError::Phase {
            stage: stage.as_str(),
            phase: "NONE".to_owned(),
        }),
    }
}

fn resume((stage, phase): (StageName, StoredPhase), step: usize) -> Result<Resume, RecordError> {
    match stage {
        StageName::Validate => Ok(Resume::Validate),
        StageName::DoubleDeploy => Ok(Resume::DoubleDeploy),
        StageName::Shift => Ok(Resume::Shift {
            step,
            phase: step_phase(stage, phase)?,
        }),
        other => Err(RecordError::Resume(other.as_str())),
    }
}

impl TryFrom<Stored> for Migration {
    type Error = RecordError;

    fn try_from(r: Stored) -> Result<Self, RecordError> {
        let steps = r.plan.steps.len();
        let in_shift = r.stage == StageName::Shift
            || (r.stage == StageName::Paused
                && r.paused_from.is_some_and(|(s, _)| s == StageName::Shift));
        if in_shift && r.step >= steps {
            return Err(RecordError::Step {
                step: r.step,
                steps,
            });
        }
        let stage = match r.stage {
            StageName::Validate => Stage::Validate,
            StageName::DoubleDeploy => Stage::DoubleDeploy,
            StageName::Shift => Stage::Shift {
                step: r.step,
                phase: step_phase(r.stage, r.phase)?,
            },
            StageName::Cleanup => Stage::Cleanup,
            StageName::Unpin => Stage::Unpin,
            StageName::Done => Stage::Done {
                source_deleted: r.source_deleted,
            },
            StageName::Paused => Stage::Paused {
                resume: resume(r.paused_from.ok_or(RecordError::NoResume)?, r.step)?,
            },
            StageName::RollingBack => Stage::RollingBack,
            StageName::RolledBack => Stage::RolledBack,
            StageName::Failed => Stage::Failed,
        };
        Ok(Migration {
            id: r.id,
            plan: r.plan,
            stage,
            source_weights: r.source_weights,
            weights: r.weights,
            reason: r.reason,
            purpose: r.purpose,
            gates: r.gates,
            created_by: r.created_by,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            phase_started_ms: r.phase_started_ms,
            applied_version: 0,
            acks: None,
            hold: r.hold,
        })
    }
}

impl From<Migration> for Stored {
    fn from(m: Migration) -> Self {
        let step = m.step_reached();
        let (phase, paused_from, source_deleted) = match m.stage {
            Stage::Shift { phase, .. } => (phase.into(), None, false),
            Stage::RollingBack => (StoredPhase::AwaitingAck, None, false),
            Stage::Paused { resume } => {
                let phase = match resume {
                    Resume::Shift { phase, .. } => phase.into(),
                    Resume::Validate | Resume::DoubleDeploy => StoredPhase::None,
                };
                (
                    StoredPhase::None,
                    Some((resume.stage().name(), phase)),
                    false,
                )
            }
            Stage::Done { source_deleted } => (StoredPhase::None, None, source_deleted),
            _ => (StoredPhase::None, None, false),
        };
        Stored {
            id: m.id,
            stage: m.stage.name(),
            phase,
            step,
            paused_from,
            plan: m.plan,
            source_weights: m.source_weights,
            weights: m.weights,
            reason: m.reason,
            purpose: m.purpose,
            gates: m.gates,
            created_by: m.created_by,
            created_at_ms: m.created_at_ms,
            updated_at_ms: m.updated_at_ms,
            phase_started_ms: m.phase_started_ms,
            hold: m.hold,
            source_deleted,
        }
    }
}
