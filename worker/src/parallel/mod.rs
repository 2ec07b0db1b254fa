//! Data parallel: every rank of a job holds the same adapter, takes its
//! slice of each global batch, and sums adapter gradients with the other
//! ranks before the optimizer step, so all ranks take the same step — the
//! one a single worker takes on the whole batch.
//!
//! A [`Collective`] sums across ranks: [`Single`] (one rank), [`local`]
//! (threads of one process, for tests), the coordinator relay (CPU workers,
//! `serve::collective`) and [`nccl`] (GPUs).

pub mod local;
pub mod nccl;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Sums across the ranks of one job. Every rank makes the same calls in the
/// same order with tensors of the same shapes.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum of every rank's `v`, in rank order.
    fn sum_f32(&mut self, v: Vec<f32>) -> Result<Vec<f32>>;
    /// Every rank's bytes, in rank order.
    fn gather(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>>;
    /// Sums `tensors` across ranks in place (as f32).
    fn all_reduce(&mut self, tensors: &[Tensor]) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let flat: Vec<Tensor> =
            tensors.iter().map(|t| t.detach().to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1])).collect();
        let v = Vec::<f32>::try_from(&Tensor::cat(&flat, 0))?;
        let n = v.len();
        let sum = self.sum_f32(v)?;
        if sum.len() != n {
            return Err(Error::Collective(format!("sum has {} values, sent {n}", sum.len())));
        }
        scatter_into(tensors, &Tensor::from_slice(&sum))
    }
}

/// Copies consecutive pieces of `flat` into `tensors` (shapes, kinds and
/// devices kept).
pub(crate) fn scatter_into(tensors: &[Tensor], flat: &Tensor) -> Result<()> {
    tch::no_grad(|| {
        let mut at = 0i64;
        for t in tensors {
            let n = t.numel() as i64;
            let mut dst = t.shallow_clone();
            dst.f_copy_(&flat.narrow(0, at, n).view(t.size().as_slice()))?;
            at += n;
        }
        Ok(())
    })
}

/// One rank: nothing to sum with.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn sum_f32(&mut self, v: Vec<f32>) -> Result<Vec<f32>> {
        Ok(v)
    }
    fn gather(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes])
    }
}

/// The rows of a global batch that `rank` of `world` takes: every
/// `world`-th, from `rank` (so every rank gets one when the batch has at
/// least `world` rows).
pub fn shard<T: Clone>(rows: &[T], rank: usize, world: usize) -> Vec<T> {
    rows.iter().skip(rank).step_by(world.max(1)).cloned().collect()
}

/// Gives every parameter a (zero) gradient, so ranks that see no example
/// touching a parameter still send a gradient of the right shape.
pub fn materialize_grads(params: &[Tensor]) {
    let parts: Vec<Tensor> = params.iter().filter(|p| p.requires_grad()).map(|p| p.sum(Kind::Float) * 0.0).collect();
    if let Some(z) = parts.into_iter().reduce(|a, b| a + b) {
        z.backward();
    }
}

/// Sums the gradients of `params` and the numbers in `extra` (loss and
/// metric contributions) across ranks, in one exchange; returns the summed
/// `extra`. With one rank it returns `extra` unchanged.
pub fn sync_grads(c: &mut dyn Collective, params: &[Tensor], extra: &[f64]) -> Result<Vec<f64>> {
    if c.world() == 1 {
        return Ok(extra.to_vec());
    }
    let mut ts: Vec<Tensor> = Vec::with_capacity(params.len() + 1);
    for (i, p) in params.iter().enumerate() {
        let g = p.grad();
        if !g.defined() {
            return Err(Error::Collective(format!("parameter {i} has no gradient (call materialize_grads first)")));
        }
        ts.push(g);
    }
    let device = params.first().map_or(Device::Cpu, Tensor::device);
    let ex = Tensor::from_slice(&extra.iter().map(|&x| x as f32).collect::<Vec<_>>()).to_device(device);
    ts.push(ex.shallow_clone());
    c.all_reduce(&ts)?;
    Ok(Vec::<f32>::try_from(&ex.to_device(Device::Cpu))?.into_iter().map(f64::from).collect())
}
