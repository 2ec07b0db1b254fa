//! Data-parallel groups: which worker runs which rank of a job, and the
//! collective round in flight. Every rank sends its part of a round; when
//! all have, the coordinator sums (or gathers) them in rank order and sends
//! the result to every rank. The last result is kept, so a rank that lost
//! it in a reconnect asks again and gets it. A restarted coordinator has no
//! last result: when some ranks got round N's result before the restart and
//! sent round N+1, while others still wait for N, it keeps the N+1 parts
//! aside, asks those ranks for their N parts again (they keep them), and
//! sums N once more. A sum (megabytes of
//! gradients) is computed off the scheduler's task: [`Reply::Sum`] hands
//! the parts out and [`Groups::finish`] takes the result back.

use std::collections::BTreeMap;

use rlhf_common::collective::sum_in_rank_order;
use rlhf_proto::{Collective, CollectiveOp, CollectiveResult, TensorData};

struct Round {
    round: u64,
    op: i32,
    parts: Vec<Option<Collective>>,
}

struct Group {
    /// Worker id of each rank (None until known again after a restart).
    members: Vec<Option<String>>,
    pending: Option<Round>,
    /// Parts of the round after `pending`, from ranks that had its result
    /// before a coordinator restart (see the module doc).
    next: Option<Round>,
    last: Option<CollectiveResult>,
    /// The round being summed off the scheduler's task.
    summing: Option<u64>,
}

/// What to do with a part.
pub(super) enum Reply {
    /// The round waits for other ranks.
    Wait,
    /// Send `result` to these workers.
    Send(Vec<String>, CollectiveResult),
    /// Sum these parts (in rank order, elsewhere), then [`Groups::finish`].
    Sum(Vec<Collective>),
}

/// Sums a round's parts in rank order (the work [`Reply::Sum`] hands out).
pub(super) fn sum_round(job: &str, round: u64, parts: &[Collective]) -> CollectiveResult {
    let mut result = CollectiveResult { job_id: job.to_string(), round, ..CollectiveResult::default() };
    match sum_parts(parts) {
        Ok(ts) => result.tensors = ts,
        Err(e) => result.error = e,
    }
    result
}

#[derive(Default)]
pub(super) struct Groups {
    by_job: BTreeMap<String, Group>,
}

impl Groups {
    /// A new group: `workers[r]` runs rank r.
    pub(super) fn create(&mut self, job: &str, workers: &[String]) {
        let members = workers.iter().cloned().map(Some).collect();
        self.by_job.insert(job.to_string(), Group { members, pending: None, next: None, last: None, summing: None });
    }

    /// Learns a rank back from a worker's report (after a coordinator
    /// restart). False when that rank belongs to another worker.
    pub(super) fn learn(&mut self, job: &str, worker: &str, rank: usize, world: usize) -> bool {
        if rank >= world {
            return false;
        }
        let g = self.by_job.entry(job.to_string()).or_insert_with(|| Group {
            members: vec![None; world],
            pending: None,
            next: None,
            last: None,
            summing: None,
        });
        match g.members.get_mut(rank) {
            Some(slot @ None) => {
                *slot = Some(worker.to_string());
                true
            }
            Some(Some(w)) => w == worker,
            None => false,
        }
    }

    pub(super) fn rank_of(&self, job: &str, worker: &str) -> Option<usize> {
        self.by_job.get(job)?.members.iter().position(|m| m.as_deref() == Some(worker))
    }

    /// Jobs with a rank on `worker`.
    pub(super) fn jobs_of(&self, worker: &str) -> Vec<String> {
        self.by_job
            .iter()
            .filter(|(_, g)| g.members.iter().any(|m| m.as_deref() == Some(worker)))
            .map(|(j, _)| j.clone())
            .collect()
    }

    /// A sum handed out by [`Reply::Sum`] is done: keep it as the last
    /// result and return the workers to send it to (none if the group is
    /// gone or moved on meanwhile).
    pub(super) fn finish(&mut self, result: &CollectiveResult) -> Vec<String> {
        let Some(g) = self.by_job.get_mut(&result.job_id) else { return Vec::new() };
        if g.summing != Some(result.round) {
            return Vec::new();
        }
        g.summing = None;
        g.last = Some(result.clone());
        g.members.iter().flatten().cloned().collect()
    }

    /// Forgets a job's group; returns its workers.
    pub(super) fn remove(&mut self, job: &str) -> Vec<String> {
        self.by_job.remove(job).map(|g| g.members.into_iter().flatten().collect()).unwrap_or_default()
    }

    /// Takes `worker`'s part of a round.
    pub(super) fn contribute(&mut self, worker: &str, part: Collective) -> Reply {
        let fail = |to: Vec<String>, part: &Collective, error: String| {
            Reply::Send(
                to,
                CollectiveResult { job_id: part.job_id.clone(), round: part.round, error, ..Default::default() },
            )
        };
        let me = vec![worker.to_string()];
        let Some(g) = self.by_job.get_mut(&part.job_id) else {
            return fail(me, &part, format!("job {} has no data-parallel group on this coordinator", part.job_id));
        };
        let (rank, world) = (part.rank as usize, part.world as usize);
        if world != g.members.len() || rank >= world {
            return fail(me, &part, format!("rank {rank} of {world}: the group has {} ranks", g.members.len()));
        }
        match &g.members[rank] {
            Some(w) if w != worker => return fail(me, &part, format!("rank {rank} belongs to worker {w}")),
            Some(_) => {}
            None => g.members[rank] = Some(worker.to_string()),
        }
        if let Some(last) = g.last.as_ref().filter(|l| l.round == part.round) {
            return Reply::Send(me, last.clone()); // asked again after a reconnect
        }
        if g.summing == Some(part.round) {
            return Reply::Wait; // a repeat while its round is being summed
        }
        let job_id = part.job_id.clone();
        let ask_again = |to: Vec<String>, round: u64| {
            let ask = CollectiveResult { job_id: job_id.clone(), round, resend_part: true, ..Default::default() };
            Reply::Send(to, ask)
        };
        let new_round = |part: &Collective| Round { round: part.round, op: part.op, parts: vec![None; world] };
        if g.pending.as_ref().is_some_and(|r| part.round + 1 == r.round) {
            // After a restart: this rank missed the result the pending
            // round's ranks got. Redo its round with their parts again.
            let ahead = g.pending.take().unwrap();
            let to = ahead.parts.iter().flatten().filter_map(|p| g.members[p.rank as usize].clone()).collect();
            g.next = Some(ahead);
            let mut again = new_round(&part);
            let n = again.round;
            again.parts[rank] = Some(part);
            g.pending = Some(again);
            return ask_again(to, n);
        }
        let round = g.pending.get_or_insert_with(|| new_round(&part));
        if part.round < round.round {
            return Reply::Wait; // a stale repeat
        }
        if part.round == round.round + 1 && round.parts[rank].is_none() {
            // After a restart: this rank got the pending round's result
            // before it. Keep its part for later and ask for the one before.
            let n = round.round;
            let next = g.next.get_or_insert_with(|| new_round(&part));
            if next.round == part.round && next.op == part.op {
                next.parts[rank] = Some(part);
                return ask_again(me, n);
            }
        }
        let everyone: Vec<String> = g.members.iter().flatten().cloned().collect();
        let Some(round) = g.pending.as_mut() else { return Reply::Wait };
        if part.round > round.round || part.op != round.op {
            let error = format!(
                "ranks out of step: rank {rank} sent {} round {}, another rank {} round {}",
                op_name(part.op),
                part.round,
                op_name(round.op),
                round.round
            );
            g.pending = None;
            g.next = None;
            return fail(everyone, &part, error);
        }
        round.parts[rank] = Some(part);
        if round.parts.iter().any(Option::is_none) {
            return Reply::Wait;
        }
        let Some(done) = g.pending.take() else {
            return Reply::Wait;
        };
        g.pending = g.next.take();
        let parts: Vec<Collective> = done.parts.into_iter().flatten().collect();
        let mut result =
            CollectiveResult { job_id: parts[0].job_id.clone(), round: done.round, ..CollectiveResult::default() };
        match CollectiveOp::try_from(done.op) {
            Ok(CollectiveOp::Sum) => {
                g.summing = Some(done.round);
                return Reply::Sum(parts);
            }
            Ok(CollectiveOp::Gather) => result.payloads = parts.into_iter().map(|p| p.payload).collect(),
            _ => result.error = format!("unknown collective op {} (expected sum or gather)", op_name(done.op)),
        }
        g.last = Some(result.clone());
        Reply::Send(everyone, result)
    }
}

/// Tensor i of the result is the sum of every rank's tensor i.
fn sum_parts(parts: &[Collective]) -> Result<Vec<TensorData>, String> {
    let n = parts[0].tensors.len();
    if let Some(p) = parts.iter().find(|p| p.tensors.len() != n) {
        return Err(format!("rank {} sent {} tensors, rank 0 sent {n}", p.rank, p.tensors.len()));
    }
    (0..n)
        .map(|i| {
            let values: Vec<&[f32]> = parts.iter().map(|p| p.tensors[i].f32.as_slice()).collect();
            let t = &parts[0].tensors[i];
            Ok(TensorData {
                name: t.name.clone(),
                shape: t.shape.clone(),
                f32: sum_in_rank_order(&values)?,
                i64: Vec::new(),
            })
        })
        .collect()
}

fn op_name(op: i32) -> String {
    CollectiveOp::try_from(op)
        .map_or_else(|_| format!("op {op}"), |o| o.as_str_name().trim_start_matches("COLLECTIVE_OP_").to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(rank: u32, round: u64, op: CollectiveOp, v: &[f32]) -> Collective {
        let t = TensorData { name: "g".into(), shape: vec![v.len() as i64], f32: v.to_vec(), i64: Vec::new() };
        Collective {
            job_id: "j".into(),
            round,
            rank,
            world: 2,
            op: op as i32,
            tensors: vec![t],
            payload: vec![rank as u8],
        }
    }

    /// What `worker`'s part makes the coordinator send (a sum done here,
    /// as the scheduler does it off its task).
    fn sent(g: &mut Groups, worker: &str, part: Collective) -> (Vec<String>, CollectiveResult) {
        match g.contribute(worker, part) {
            Reply::Send(to, res) => (to, res),
            Reply::Sum(parts) => {
                let res = sum_round(&parts[0].job_id, parts[0].round, &parts);
                (g.finish(&res), res)
            }
            Reply::Wait => panic!("expected a result"),
        }
    }

    #[test]
    fn a_round_completes_when_every_rank_sent_and_repeats_on_request() {
        let mut g = Groups::default();
        g.create("j", &["a".into(), "b".into()]);
        assert!(matches!(g.contribute("b", part(1, 0, CollectiveOp::Sum, &[1.0, 2.0])), Reply::Wait));
        let (to, r) = sent(&mut g, "a", part(0, 0, CollectiveOp::Sum, &[0.5, 0.5]));
        assert_eq!(
            (to, r.tensors[0].f32.clone(), r.error.as_str()),
            (vec!["a".to_string(), "b".into()], vec![1.5, 2.5], "")
        );
        // Rank 1 lost the result in a reconnect and asks again: only it gets it.
        let (to, again) = sent(&mut g, "b", part(1, 0, CollectiveOp::Sum, &[1.0, 2.0]));
        assert_eq!((to, again), (vec!["b".to_string()], r));
        assert!(matches!(g.contribute("a", part(0, 1, CollectiveOp::Gather, &[])), Reply::Wait));
        let (_, r) = sent(&mut g, "b", part(1, 1, CollectiveOp::Gather, &[]));
        assert_eq!(r.payloads, vec![vec![0u8], vec![1u8]]);
    }

    /// A coordinator restarted after sending round 5's result to rank 1
    /// only: rank 0 sends round 5 again, rank 1 round 6, in either order.
    /// Rank 1 is asked for its round-5 part, round 5 is summed again for
    /// both, and round 6 completes with the part kept aside.
    #[test]
    fn a_round_some_ranks_missed_in_a_restart_is_summed_again() {
        for behind_first in [true, false] {
            let mut g = Groups::default();
            assert!(g.learn("j", "a", 0, 2) && g.learn("j", "b", 1, 2));
            let behind = || part(0, 5, CollectiveOp::Sum, &[1.0]);
            let ahead = || part(1, 6, CollectiveOp::Sum, &[20.0]);
            let ask = if behind_first {
                assert!(matches!(g.contribute("a", behind()), Reply::Wait));
                sent(&mut g, "b", ahead())
            } else {
                assert!(matches!(g.contribute("b", ahead()), Reply::Wait));
                sent(&mut g, "a", behind())
            };
            assert_eq!(ask.0, vec!["b".to_string()]);
            assert!(ask.1.resend_part && ask.1.round == 5, "{:?}", ask.1);
            let (to, r5) = sent(&mut g, "b", part(1, 5, CollectiveOp::Sum, &[2.0]));
            assert_eq!((to, r5.round, r5.tensors[0].f32.clone()), (vec!["a".to_string(), "b".into()], 5, vec![3.0]));
            let (to, r6) = sent(&mut g, "a", part(0, 6, CollectiveOp::Sum, &[10.0]));
            assert_eq!((to.len(), r6.round, r6.tensors[0].f32.clone(), r6.resend_part), (2, 6, vec![30.0], false));
        }
    }

    #[test]
    fn strangers_mismatches_and_lost_groups_get_errors() {
        let mut g = Groups::default();
        g.create("j", &["a".into(), "b".into()]);
        assert!(sent(&mut g, "c", part(1, 0, CollectiveOp::Sum, &[1.0]))
            .1
            .error
            .contains("rank 1 belongs to worker b"));
        assert!(matches!(g.contribute("a", part(0, 0, CollectiveOp::Sum, &[1.0])), Reply::Wait));
        let (to, r) = sent(&mut g, "b", part(1, 0, CollectiveOp::Gather, &[]));
        assert_eq!(to.len(), 2);
        assert!(
            r.error.contains("ranks out of step: rank 1 sent gather round 0, another rank sum round 0"),
            "{}",
            r.error
        );
        assert!(matches!(g.contribute("a", part(0, 1, CollectiveOp::Sum, &[1.0, 2.0])), Reply::Wait));
        assert!(sent(&mut g, "b", part(1, 1, CollectiveOp::Sum, &[1.0]))
            .1
            .error
            .contains("rank 1 sent 1 values, rank 0 sent 2"));
        assert_eq!(g.remove("j"), vec!["a".to_string(), "b".into()]);
        assert!(sent(&mut g, "a", part(0, 2, CollectiveOp::Sum, &[1.0])).1.error.contains("no data-parallel group"));
        // After a restart, ranks are learned back from worker reports.
        assert!(g.learn("j", "b", 1, 2) && g.learn("j", "a", 0, 2) && !g.learn("j", "c", 0, 2));
        assert_eq!(g.rank_of("j", "b"), Some(1));
    }
}
