//! The job state machine: queued → running → succeeded | failed | cancelled,
//! with running → queued when a worker is lost. Each state carries what is
//! valid in it.

use rlhf_proto::JobState as ProtoState;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running { worker: String },
    Succeeded,
    Failed { reason: String },
    Cancelled { reason: String },
}

impl JobState {
    pub fn name(&self) -> &'static str {
        self.to_proto().name()
    }

    pub fn is_terminal(&self) -> bool {
        match self {
            JobState::Succeeded | JobState::Failed { .. } | JobState::Cancelled { .. } => true,
            JobState::Queued | JobState::Running { .. } => false,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            JobState::Failed { reason } | JobState::Cancelled { reason } => reason,
            JobState::Queued | JobState::Running { .. } | JobState::Succeeded => "",
        }
    }

    pub fn worker(&self) -> &str {
        match self {
            JobState::Running { worker } => worker,
            JobState::Queued | JobState::Succeeded | JobState::Failed { .. } | JobState::Cancelled { .. } => "",
        }
    }

    /// Whether `self → next` is a legal transition (the same state is not a
    /// transition; callers treat it as a no-op).
    pub fn can_become(&self, next: &JobState) -> bool {
        match (self, next) {
            (JobState::Queued, JobState::Running { .. }) => true,
            (JobState::Queued, JobState::Cancelled { .. } | JobState::Failed { .. }) => true,
            (JobState::Running { .. }, JobState::Queued) => true,
            (JobState::Running { .. }, JobState::Succeeded | JobState::Failed { .. } | JobState::Cancelled { .. }) => {
                true
            }
            (JobState::Running { .. }, JobState::Running { .. }) => true,
            (JobState::Queued, JobState::Queued | JobState::Succeeded) => false,
            (JobState::Succeeded | JobState::Failed { .. } | JobState::Cancelled { .. }, _) => false,
        }
    }

    pub fn to_proto(&self) -> ProtoState {
        match self {
            JobState::Queued => ProtoState::Queued,
            JobState::Running { .. } => ProtoState::Running,
            JobState::Succeeded => ProtoState::Succeeded,
            JobState::Failed { .. } => ProtoState::Failed,
            JobState::Cancelled { .. } => ProtoState::Cancelled,
        }
    }

    /// Rebuilds a state from its stored columns.
    pub fn from_columns(name: &str, reason: String, worker: String) -> Option<Self> {
        Some(match name {
            "queued" => JobState::Queued,
            "running" => JobState::Running { worker },
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed { reason },
            "cancelled" => JobState::Cancelled { reason },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_are_final_and_requeue_is_legal() {
        let running = JobState::Running { worker: "w".into() };
        assert!(JobState::Queued.can_become(&running));
        assert!(running.can_become(&JobState::Queued));
        assert!(running.can_become(&JobState::Succeeded));
        for t in
            [JobState::Succeeded, JobState::Failed { reason: "x".into() }, JobState::Cancelled { reason: "y".into() }]
        {
            assert!(t.is_terminal());
            assert!(!t.can_become(&JobState::Queued) && !t.can_become(&running));
            let back = JobState::from_columns(t.name(), t.reason().into(), String::new()).unwrap();
            assert_eq!(back, t);
        }
    }
}
