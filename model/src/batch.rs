//! Token batches as tensors: right padding (training, scoring), left padding
//! (batched generation, so every row ends at the same position), positions,
//! and gathering one hidden state per row. The one place rlhfd pads.

use tch::{Device, Kind, Tensor};

/// Row-major `[seqs.len(), width]` ids padded with `pad`, and the 0/1 mask,
/// each sequence placed at the left (`left = false`) or right end of its row.
fn padded(seqs: &[Vec<i64>], pad: i64, left: bool) -> (Vec<i64>, Vec<i64>, usize) {
    let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::with_capacity(seqs.len() * width), Vec::with_capacity(seqs.len() * width));
    for s in seqs {
        let fill = width - s.len();
        if left {
            ids.extend(std::iter::repeat_n(pad, fill).chain(s.iter().copied()));
            mask.extend(std::iter::repeat_n(0i64, fill).chain(std::iter::repeat_n(1, s.len())));
        } else {
            ids.extend(s.iter().copied().chain(std::iter::repeat_n(pad, fill)));
            mask.extend(std::iter::repeat_n(1i64, s.len()).chain(std::iter::repeat_n(0, fill)));
        }
    }
    (ids, mask, width)
}

fn tensors(seqs: &[Vec<i64>], pad: i64, left: bool, device: Device) -> (Tensor, Tensor) {
    let (ids, mask, width) = padded(seqs, pad, left);
    let shape = [seqs.len() as i64, width as i64];
    (Tensor::from_slice(&ids).view(shape).to_device(device), Tensor::from_slice(&mask).view(shape).to_device(device))
}

/// Right-pads `seqs` into `[b, T]` ids and a `[b, T]` f32 0/1 mask.
/// Rows with equal keys, for sharing their work: the first row of each
/// distinct key and, per row, its key's index among those firsts; `None`
/// when every key is distinct.
pub fn distinct_rows<K: Eq + std::hash::Hash>(keys: &[K]) -> Option<(Vec<i64>, Vec<i64>)> {
    let mut index = std::collections::HashMap::new();
    let mut firsts = Vec::new();
    let slot: Vec<i64> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            *index.entry(k).or_insert_with(|| {
                firsts.push(i as i64);
                firsts.len() as i64 - 1
            })
        })
        .collect();
    (firsts.len() < keys.len()).then_some((firsts, slot))
}

pub fn right_padded(seqs: &[Vec<i64>], pad: i64, device: Device) -> (Tensor, Tensor) {
    let (ids, mask) = tensors(seqs, pad, false, device);
    (ids, mask.to_kind(Kind::Float))
}

/// Left-pads `seqs` into `[b, T]` ids and a `[b, T]` int64 0/1 mask.
pub fn left_padded(seqs: &[Vec<i64>], pad: i64, device: Device) -> (Tensor, Tensor) {
    tensors(seqs, pad, true, device)
}

/// Positions 0..T for every row of `[b, T]` ids.
pub fn positions(ids: &Tensor) -> Tensor {
    let (b, t) = (ids.size()[0], ids.size()[1]);
    Tensor::arange(t, (Kind::Int64, ids.device())).unsqueeze(0).expand([b, t], false)
}

/// Row `i`'s hidden state at position `pos[i]`: `[b, T, h]` → `[b, h]`.
pub fn hidden_at(hidden: &Tensor, pos: &[i64]) -> Tensor {
    let (b, h) = (hidden.size()[0], hidden.size()[2]);
    let idx = Tensor::from_slice(pos).to_device(hidden.device()).view([b, 1, 1]).expand([b, 1, h], false);
    hidden.gather(1, &idx, false).squeeze_dim(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(t: &Tensor) -> Vec<Vec<i64>> {
        (0..t.size()[0]).map(|r| Vec::<i64>::try_from(t.get(r).to_kind(Kind::Int64)).unwrap()).collect()
    }

    #[test]
    fn pads_and_masks_on_either_side() {
        let seqs = vec![vec![1, 2, 3], vec![4], vec![]];
        let (ids, mask) = right_padded(&seqs, 0, Device::Cpu);
        assert_eq!(rows(&ids), vec![vec![1, 2, 3], vec![4, 0, 0], vec![0, 0, 0]]);
        assert_eq!(rows(&mask), vec![vec![1, 1, 1], vec![1, 0, 0], vec![0, 0, 0]]);
        assert_eq!(mask.kind(), Kind::Float);
        let (ids, mask) = left_padded(&seqs, -1, Device::Cpu);
        assert_eq!(rows(&ids), vec![vec![1, 2, 3], vec![-1, -1, 4], vec![-1, -1, -1]]);
        assert_eq!(rows(&mask), vec![vec![1, 1, 1], vec![0, 0, 1], vec![0, 0, 0]]);
        assert_eq!(right_padded(&[], 0, Device::Cpu).0.size(), vec![0, 0]);
    }

    #[test]
    fn gathers_one_hidden_state_per_row() {
        let hidden = Tensor::arange(2 * 3 * 2, (Kind::Float, Device::Cpu)).view([2, 3, 2]);
        let got = hidden_at(&hidden, &[2, 0]);
        assert_eq!(Vec::<f32>::try_from(got.view([-1])).unwrap(), vec![4.0, 5.0, 6.0, 7.0]);
        assert_eq!(
            rows(&positions(&Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu)))),
            vec![vec![0, 1, 2], vec![0, 1, 2]]
        );
    }
}
