//! Ranks that are threads of one process (tests, and checking the relay's
//! arithmetic): each deposits its part, the last to arrive publishes them
//! all, and every rank sums the parts in rank order itself. A rank that
//! stops (returns an error, panics) breaks the group, so the others get an
//! error instead of waiting forever.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rlhf_common::collective::sum_in_rank_order;

use super::Collective;
use crate::error::{Error, Result};

#[derive(Default)]
struct Round {
    parts: Vec<Option<Vec<u8>>>,
    arrived: usize,
    /// Every part of the round, until each rank has read it.
    done: Option<Arc<Vec<Vec<u8>>>>,
    unread: usize,
    broken: bool,
}

struct Shared {
    round: Mutex<Round>,
    changed: Condvar,
}

pub struct LocalRank {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

/// `world` connected ranks; hand one to each thread.
pub fn group(world: usize) -> Vec<LocalRank> {
    let round = Round { parts: vec![None; world], ..Round::default() };
    let shared = Arc::new(Shared { round: Mutex::new(round), changed: Condvar::new() });
    (0..world).map(|rank| LocalRank { rank, world, shared: shared.clone() }).collect()
}

impl LocalRank {
    fn wait<'a>(
        &'a self,
        mut st: MutexGuard<'a, Round>,
        until: impl Fn(&Round) -> bool,
    ) -> Result<MutexGuard<'a, Round>> {
        while !until(&st) {
            if st.broken {
                return Err(Error::Collective("another rank stopped".into()));
            }
            st = self.shared.changed.wait(st).map_err(|_| Error::Collective("a rank panicked".into()))?;
        }
        Ok(st)
    }

    fn exchange(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let st = self.shared.round.lock().map_err(|_| Error::Collective("a rank panicked".into()))?;
        // The previous round must be read by everyone first.
        let mut st = self.wait(st, |r| r.done.is_none())?;
        st.parts[self.rank] = Some(bytes);
        st.arrived += 1;
        if st.arrived == self.world {
            let all: Vec<Vec<u8>> = st.parts.iter_mut().map(|p| p.take().unwrap_or_default()).collect();
            st.done = Some(Arc::new(all));
            st.unread = self.world;
            st.arrived = 0;
            self.shared.changed.notify_all();
        }
        let mut st = self.wait(st, |r| r.done.is_some())?;
        let all = st.done.as_ref().map(|d| d.as_ref().clone()).unwrap_or_default();
        st.unread -= 1;
        if st.unread == 0 {
            st.done = None;
            self.shared.changed.notify_all();
        }
        Ok(all)
    }
}

impl Drop for LocalRank {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.round.lock() {
            st.broken = true;
            self.shared.changed.notify_all();
        }
    }
}

impl Collective for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn sum_f32(&mut self, v: Vec<f32>) -> Result<Vec<f32>> {
        let all = self.exchange(v.iter().flat_map(|x| x.to_le_bytes()).collect())?;
        let parts: Vec<Vec<f32>> = all
            .iter()
            .map(|b| b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            .collect();
        let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        sum_in_rank_order(&refs).map_err(Error::Collective)
    }
    fn gather(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.exchange(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sum_and_a_stopped_rank_breaks_the_group() {
        let mut ranks = group(2);
        let b = ranks.pop().unwrap();
        let a = ranks.pop().unwrap();
        let t = std::thread::spawn(move || {
            let mut b = b;
            let s = b.sum_f32(vec![1.0, 2.0]).unwrap();
            drop(b); // stops: rank 0's next call must fail, not hang
            s
        });
        let mut a = a;
        assert_eq!(a.sum_f32(vec![0.5, 0.5]).unwrap(), vec![1.5, 2.5]);
        assert_eq!(t.join().unwrap(), vec![1.5, 2.5]);
        assert!(a.gather(vec![1]).unwrap_err().to_string().contains("another rank stopped"));
    }
}
