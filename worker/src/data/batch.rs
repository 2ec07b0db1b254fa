//! Batching helpers: left truncation of prompts and a seeded epoch-wise
//! shuffler whose position can be checkpointed (padding is
//! `rlhf_model::batch`).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Fits `prompt + response` into `max_len` tokens: the response is kept
/// whole and prompt tokens are dropped from the left (the end of a prompt,
/// where the question and `答案：` sit, matters most). A response longer than
/// `max_len` on its own is an error. Note that a leading BOS token is dropped
/// with the rest of the prompt's head; callers that need it re-add it.
pub fn truncate_prompt(prompt: &[i64], response: &[i64], max_len: usize) -> Result<(Vec<i64>, Vec<i64>)> {
    let Some(room) = max_len.checked_sub(response.len()) else {
        return Err(Error::InvalidArgument(format!("response of {} tokens exceeds max_len {max_len}", response.len())));
    };
    let keep = room.min(prompt.len());
    Ok((prompt[prompt.len() - keep..].to_vec(), response.to_vec()))
}

/// Seeded epoch-wise shuffling of the indices `0..len`. Each epoch is a fresh
/// permutation determined by `(seed, epoch)` alone, so the serialised
/// position `{epoch, cursor, seed}` resumes exactly where training stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shuffler {
    pub epoch: u64,
    /// Index of the next item within the current epoch's permutation.
    pub cursor: usize,
    pub seed: u64,
    #[serde(skip)]
    perm: Vec<usize>,
    #[serde(skip)]
    perm_key: Option<(u64, usize)>,
}

impl PartialEq for Shuffler {
    fn eq(&self, other: &Self) -> bool {
        (self.epoch, self.cursor, self.seed) == (other.epoch, other.cursor, other.seed)
    }
}

impl Shuffler {
    /// A shuffler at the start of epoch 0.
    pub fn new(seed: u64) -> Self {
        Self { epoch: 0, cursor: 0, seed, perm: Vec::new(), perm_key: None }
    }

    /// The permutation of `0..len` for `epoch`.
    pub fn permutation(seed: u64, epoch: u64, len: usize) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        let mut perm: Vec<usize> = (0..len).collect();
        perm.shuffle(&mut rng);
        perm
    }

    /// The next `n` indices into a dataset of `len` items. A batch that runs
    /// past the end of an epoch continues with the next epoch's permutation,
    /// so every batch is full (it may repeat items only if `n > len`).
    /// Returns nothing when `len` is 0.
    pub fn next_batch(&mut self, n: usize, len: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        if len == 0 {
            return out;
        }
        while out.len() < n {
            if self.cursor >= len {
                self.epoch += 1;
                self.cursor = 0;
            }
            if self.perm_key != Some((self.epoch, len)) {
                self.perm = Self::permutation(self.seed, self.epoch, len);
                self.perm_key = Some((self.epoch, len));
            }
            let take = (n - out.len()).min(len - self.cursor);
            out.extend_from_slice(&self.perm[self.cursor..self.cursor + take]);
            self.cursor += take;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_prompt_from_the_left() {
        let (p, r) = truncate_prompt(&[1, 2, 3, 4, 5], &[8, 9], 5).unwrap();
        assert_eq!((p, r), (vec![3, 4, 5], vec![8, 9]));
        let (p, _) = truncate_prompt(&[1, 2], &[8, 9], 10).unwrap();
        assert_eq!(p, [1, 2]);
        let (p, r) = truncate_prompt(&[1, 2], &[8, 9], 2).unwrap();
        assert!(p.is_empty() && r == [8, 9]);
        let e = truncate_prompt(&[1], &[7, 8, 9], 2).unwrap_err().to_string();
        assert!(e.contains("3 tokens") && e.contains("max_len 2"), "{e}");
    }

    #[test]
    fn shuffler_covers_each_epoch_once() {
        let mut s = Shuffler::new(42);
        let mut epoch0: Vec<usize> = (0..3).flat_map(|_| s.next_batch(4, 12)).collect();
        assert_eq!((s.epoch, s.cursor), (0, 12));
        assert_ne!(epoch0, (0..12).collect::<Vec<_>>(), "shuffled");
        epoch0.sort_unstable();
        assert_eq!(epoch0, (0..12).collect::<Vec<_>>());
        // A batch across the epoch boundary is full and starts epoch 1.
        let b = s.next_batch(5, 12);
        assert_eq!(b, Shuffler::permutation(42, 1, 12)[..5]);
        assert_eq!((s.epoch, s.cursor), (1, 5));
        let b = s.next_batch(10, 12);
        assert_eq!(b.len(), 10);
        assert_eq!((s.epoch, s.cursor), (2, 3));
        assert_ne!(Shuffler::permutation(42, 0, 12), Shuffler::permutation(42, 1, 12));
        assert_ne!(Shuffler::permutation(42, 0, 12), Shuffler::permutation(43, 0, 12));
        assert!(Shuffler::new(1).next_batch(3, 0).is_empty());
        assert_eq!(Shuffler::new(1).next_batch(5, 2).len(), 5);
    }

    #[test]
    fn shuffler_resumes_from_serialised_position() {
        let mut a = Shuffler::new(7);
        a.next_batch(3, 10);
        a.next_batch(3, 10);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, r#"{"epoch":0,"cursor":6,"seed":7}"#);
        let mut b: Shuffler = serde_json::from_str(&json).unwrap();
        assert_eq!(a, b);
        for _ in 0..5 {
            assert_eq!(a.next_batch(3, 10), b.next_batch(3, 10));
        }
    }
}
