//! A job's `[placement]` against the workers that are connected: what keeps
//! it from being met (warnings at submit), and `submit --fit-placement`,
//! which fits it to them (used inside a batch allocation, whose workers are
//! all the cluster will have).

use rlhf_common::spec::{is_any_worker, PlacementSpec};
use rlhf_common::JobSpec;

/// What keeps a job's `[placement]` from being met by the workers connected
/// now (by name): it would sit queued until they come.
pub fn placement_warnings(spec: &JobSpec, alive: &[String]) -> Vec<String> {
    let p = &spec.placement;
    let connected = if alive.is_empty() { "none".to_string() } else { alive.join(", ") };
    let mut out = Vec::new();
    let ranks = p.data_parallel;
    if ranks > 1 && alive.len() < ranks {
        out.push(format!(
            "placement.data_parallel = {ranks} waits for {ranks} idle workers; {} connected ({connected})",
            alive.len()
        ));
    }
    let mut wanted: Vec<(String, &str)> = Vec::new();
    for (field, name) in [("trainer", &p.trainer), ("reward", &p.reward), ("critic", &p.critic)] {
        if let Some(n) = name.as_deref().filter(|n| !is_any_worker(n)) {
            wanted.push((format!("placement.{field}"), n));
        }
    }
    for (k, n) in p.rollout.iter().enumerate().filter(|(_, n)| !is_any_worker(n)) {
        wanted.push((format!("placement.rollout[{k}]"), n));
    }
    for (field, name) in wanted {
        if !alive.iter().any(|a| a == name) {
            out.push(format!(
                "{field} names worker {name:?}, which is not connected (connected: {connected}); the job waits for it"
            ));
        }
    }
    let needed = 1
        + usize::from(p.critic.as_ref().or(p.reward.as_ref()).is_some_and(|r| Some(r) != p.trainer.as_ref()))
        + p.rollout.len();
    if needed > 1 && alive.len() < needed {
        out.push(format!(
            "the placement needs {needed} workers at once (trainer, reward/critic, rollout); {} connected",
            alive.len()
        ));
    }
    out
}

/// Fits `p` to the connected workers `alive`, saying what changed (nothing
/// when it can be met as written). Names that are not connected become "*"
/// (any idle worker); then, while the roles outnumber the workers, rollout
/// workers are dropped (the named ones kept first; with none left the
/// trainer generates), then reward and critic move onto the trainer;
/// `data_parallel` is capped at the number of workers.
pub fn fit_placement(p: &mut PlacementSpec, alive: &[String]) -> Vec<String> {
    let mut notes = Vec::new();
    let absent = |n: &str| !is_any_worker(n) && !alive.iter().any(|a| a == n);
    for (field, name) in [("trainer", &mut p.trainer), ("reward", &mut p.reward), ("critic", &mut p.critic)] {
        if let Some(n) = name.as_mut().filter(|n| absent(n)) {
            notes.push(format!("placement.{field}: {n:?} is not connected; any worker"));
            *n = "*".into();
        }
    }
    for (k, n) in p.rollout.iter_mut().enumerate().filter(|(_, n)| absent(n)) {
        notes.push(format!("placement.rollout[{k}]: {n:?} is not connected; any worker"));
        *n = "*".into();
    }
    let room = alive.len().max(1);
    let host = p.critic.as_ref().or(p.reward.as_ref());
    let separate = host.is_some_and(|h| is_any_worker(h) || Some(h) != p.trainer.as_ref());
    let fixed = 1 + usize::from(separate);
    if fixed + p.rollout.len() > room {
        // Named (connected) rollout workers first, then "any".
        p.rollout.sort_by_key(|n| is_any_worker(n));
        let keep = room.saturating_sub(fixed);
        let dropped = p.rollout.split_off(keep.min(p.rollout.len()));
        notes.push(if p.rollout.is_empty() {
            format!("rollout: {} workers dropped, the trainer generates ({} connected)", dropped.len(), alive.len())
        } else {
            format!(
                "rollout: {} of {} workers kept ({} connected)",
                p.rollout.len(),
                p.rollout.len() + dropped.len(),
                alive.len()
            )
        });
    }
    if fixed > room {
        p.reward = None;
        p.critic = None;
        notes.push("reward and critic: on the trainer (one worker connected)".into());
    }
    if p.data_parallel > room {
        notes.push(format!("data_parallel: {} -> {room} (workers connected)", p.data_parallel));
        p.data_parallel = room;
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(placement: &str) -> JobSpec {
        JobSpec::from_toml(&format!(
            "version = 1\nkind = \"ppo\"\n[model]\npath = \"m\"\n[peft]\nmethod = \"lora\"\n\
             [data]\ntask = \"eprstmt\"\ntrain = \"t.json\"\n[ppo]\nreward = {{ kind = \"label\" }}\n\
             [placement]\n{placement}"
        ))
        .unwrap()
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn placement_that_cannot_be_met_is_named() {
        let alive = ["worker-a".to_string(), "worker-b".to_string()];
        let w = placement_warnings(&spec("trainer = \"cpu-0\"\nrollout = [\"worker-b\", \"*\"]\n"), &alive);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("placement.trainer names worker \"cpu-0\"") && w[0].contains("worker-a, worker-b"));
        assert!(w[1].contains("needs 3 workers"), "{w:?}");
        assert!(placement_warnings(&spec("trainer = \"worker-a\"\nrollout = [\"*\"]\n"), &alive).is_empty());
    }

    #[test]
    fn placements_are_fitted_to_the_connected_workers() {
        let pipeline =
            "trainer = \"cpu-0\"\nreward = \"cpu-1\"\ncritic = \"cpu-1\"\nrollout = [\"cpu-2\", \"cpu-3\"]\n";
        // All there: unchanged.
        let mut p = spec(pipeline).placement;
        assert!(fit_placement(&mut p, &names(&["cpu-0", "cpu-1", "cpu-2", "cpu-3"])).is_empty());
        assert_eq!(p, spec(pipeline).placement);
        // Two workers (rlhfd.sbatch --ntasks=3): rollout goes to the trainer.
        let mut p = spec(pipeline).placement;
        let notes = fit_placement(&mut p, &names(&["cpu-0", "cpu-1"]));
        assert_eq!((p.trainer.as_deref(), p.critic.as_deref()), (Some("cpu-0"), Some("cpu-1")));
        assert!(p.rollout.is_empty(), "{p:?}");
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[2].contains("the trainer generates"), "{notes:?}");
        assert!(placement_warnings(&JobSpec { placement: p, ..spec(pipeline) }, &names(&["cpu-0", "cpu-1"])).is_empty());
        // Three workers, other names: any worker for each, one rollout kept.
        let mut p = spec(pipeline).placement;
        fit_placement(&mut p, &names(&["gpu-0", "gpu-1", "gpu-2"]));
        assert_eq!((p.trainer.as_deref(), p.reward.as_deref()), (Some("*"), Some("*")));
        assert_eq!(p.rollout, ["*"]);
        // One worker: everything on it.
        let mut p = spec(pipeline).placement;
        fit_placement(&mut p, &names(&["solo"]));
        assert!(p.rollout.is_empty() && p.reward.is_none() && p.critic.is_none(), "{p:?}");
        let mut p = spec("data_parallel = 4\n").placement;
        let notes = fit_placement(&mut p, &names(&["a", "b"]));
        assert_eq!((p.data_parallel, notes), (2, vec!["data_parallel: 4 -> 2 (workers connected)".to_string()]));
        // A connected named rollout worker is kept before "any".
        let mut p = spec("trainer = \"a\"\nrollout = [\"*\", \"b\", \"*\"]\n").placement;
        fit_placement(&mut p, &names(&["a", "b"]));
        assert_eq!(p.rollout, ["b"]);
    }
}
