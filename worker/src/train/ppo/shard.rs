//! The parts of a PPO iteration that look across data-parallel ranks. A
//! rank rolls out every world-th row of the global prompt batch; batch-wide
//! numbers (advantage whitening, minibatch token counts, logged means) are
//! sums over ranks, so every rank updates as one worker on the whole batch
//! would.

use tch::{Device, Kind, Tensor};

use super::gae::{apply_mask, WHITEN_EPS};
use crate::error::Result;
use crate::parallel::Collective;

/// Element-wise sums of `v` over ranks (unchanged with one rank).
pub fn sum_across(c: &mut dyn Collective, v: &[f64]) -> Result<Vec<f64>> {
    if c.world() == 1 {
        return Ok(v.to_vec());
    }
    Ok(c.sum_f32(v.iter().map(|&x| x as f32).collect())?.into_iter().map(f64::from).collect())
}

/// [`masked_whiten`](super::masked_whiten) with the mean and the
/// (Bessel-corrected) variance of the whole batch across ranks.
pub fn whiten_across(c: &mut dyn Collective, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let total = |t: &Tensor| t.sum(Kind::Float).double_value(&[]);
    let s = sum_across(c, &[total(&apply_mask(x, mask)), total(mask)])?;
    let n = s[1].max(1e-8);
    let mean = s[0] / n;
    let centered = x - mean;
    let sq = sum_across(c, &[total(&apply_mask(&(&centered * &centered), mask))])?[0];
    let var = sq / n * if s[1] > 1.0 { s[1] / (s[1] - 1.0) } else { 1.0 };
    Ok(centered * (1.0 / (var + WHITEN_EPS).sqrt()))
}

/// Response tokens of every row of the global batch of `rows_total` rows,
/// where this rank holds rows `rows` with response `mask`.
/// Empty with one rank, which needs no shares (see [`minibatch_part`]).
pub fn row_tokens(c: &mut dyn Collective, rows: &[usize], mask: &Tensor, rows_total: usize) -> Result<Vec<f64>> {
    if c.world() == 1 {
        return Ok(Vec::new());
    }
    let mine: Vec<f32> = Vec::try_from(&mask.sum_dim_intlist(1, false, Kind::Float).to_device(Device::Cpu))?;
    let mut all = vec![0.0; rows_total];
    for (&r, &n) in rows.iter().zip(&mine) {
        all[r] = f64::from(n);
    }
    sum_across(c, &all)
}

/// This rank's local indices among the global rows `mb`, and the share of
/// the minibatch's tokens they hold.
pub fn minibatch_part(mb: &[usize], rank: usize, world: usize, tokens: &[f64]) -> (Vec<i64>, f64) {
    let local: Vec<i64> = mb.iter().filter(|&&p| p % world == rank).map(|&p| (p / world) as i64).collect();
    if world == 1 {
        return (local, 1.0);
    }
    let all: f64 = mb.iter().map(|&p| tokens[p]).sum();
    let mine: f64 = mb.iter().filter(|&&p| p % world == rank).map(|&p| tokens[p]).sum();
    (local, if all > 0.0 { mine / all } else { 0.0 })
}

/// This rank's per-row values placed at their global rows, summed over
/// ranks: the whole batch's values on every rank.
pub fn gather(dist: &mut dyn Collective, rows: &[usize], mine: &Tensor, total: usize) -> Result<Tensor> {
    let v: Vec<f32> = Vec::try_from(&mine.to_kind(Kind::Float).to_device(tch::Device::Cpu))?;
    let mut all = vec![0.0; total];
    for (&r, &x) in rows.iter().zip(&v) {
        all[r] = f64::from(x);
    }
    let all = sum_across(dist, &all)?;
    Ok(Tensor::from_slice(&all.iter().map(|&x| x as f32).collect::<Vec<_>>()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::Single;

    #[test]
    fn one_rank_whitens_as_masked_whiten() {
        let x = Tensor::from_slice(&[1.0f32, 2.0, 5.0, -1.0, 0.5, 3.0]).view([2, 3]);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 1.0, 1.0, 1.0]).view([2, 3]);
        let ours = whiten_across(&mut Single, &x, &mask).unwrap();
        let want = super::super::masked_whiten(&x, &mask, true);
        let d = (apply_mask(&ours, &mask) - apply_mask(&want, &mask)).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn minibatch_parts_split_rows_and_tokens() {
        let tokens = [3.0, 1.0, 2.0, 2.0];
        assert_eq!(minibatch_part(&[0, 1, 3], 1, 2, &tokens), (vec![0, 1], 0.5));
        assert_eq!(minibatch_part(&[0, 2], 1, 2, &tokens), (vec![], 0.0));
        assert_eq!(minibatch_part(&[2, 0], 0, 1, &tokens), (vec![2, 0], 1.0));
    }
}
