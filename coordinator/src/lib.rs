//! rlhf-coordinator: the job scheduler daemon. It arrives with the
//! orchestration work (issue "Coordinator, per-device workers and rlhfctl");
//! for now the crate only pins its place in the workspace.
