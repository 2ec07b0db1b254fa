//! Ranks that are threads of one process (tests, and checking the relay's
//! arithmetic): each deposits its part, waits for the others, and sums the
//! parts in rank order itself.

use std::sync::{Arc, Barrier, Mutex};

use rlhf_common::collective::sum_in_rank_order;

use super::Collective;
use crate::error::{Error, Result};

struct Shared {
    parts: Mutex<Vec<Vec<u8>>>,
    barrier: Barrier,
}

pub struct LocalRank {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

/// `world` connected ranks; hand one to each thread.
pub fn group(world: usize) -> Vec<LocalRank> {
    let shared = Arc::new(Shared {
        parts: Mutex::new(vec![Vec::new(); world]),
        barrier: Barrier::new(world),
    });
    (0..world)
        .map(|rank| LocalRank {
            rank,
            world,
            shared: shared.clone(),
        })
        .collect()
}

impl LocalRank {
    fn exchange(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let poisoned = |_| Error::Collective("a rank panicked".into());
        self.shared.parts.lock().map_err(poisoned)?[self.rank] = bytes;
        self.shared.barrier.wait();
        let all = self.shared.parts.lock().map_err(poisoned)?.clone();
        self.shared.barrier.wait();
        Ok(all)
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
            .map(|b| {
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        sum_in_rank_order(&refs).map_err(Error::Collective)
    }
    fn gather(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.exchange(bytes)
    }
}
