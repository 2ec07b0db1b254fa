//! AdamW over loose tensors (adapter parameters), a linear-warmup + cosine
//! schedule, and global-norm gradient clipping.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::parallel::Collective;
use rlhf_model::WeightFiles;

pub struct AdamW {
    params: Vec<Tensor>,
    /// Each parameter's learning rate as a multiple of the step's `lr`.
    lr_scale: Vec<f64>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: i64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(params: Vec<Tensor>, weight_decay: f64) -> Self {
        let m = params.iter().map(Tensor::zeros_like).collect();
        let v = params.iter().map(Tensor::zeros_like).collect();
        let lr_scale = vec![1.0; params.len()];
        Self { params, lr_scale, m, v, step: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }

    /// Parameters `from..` learn at `scale` × the step's learning rate.
    pub fn scale_lr_from(&mut self, from: usize, scale: f64) {
        for s in self.lr_scale.iter_mut().skip(from) {
            *s = scale;
        }
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`;
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
            if grads.is_empty() {
                return 0.0;
            }
            let sq: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float)).collect();
            let norm = Tensor::stack(&sq, 0).sum(Kind::Float).sqrt().double_value(&[]);
            if norm.is_finite() && norm > max_norm {
                let scale = max_norm / (norm + 1e-6);
                for mut g in grads {
                    let _ = g.g_mul_scalar_(scale);
                }
            }
            norm
        })
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        tch::no_grad(|| {
            for (((p, m), v), scale) in self.params.iter_mut().zip(&mut self.m).zip(&mut self.v).zip(&self.lr_scale) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let lr = lr * scale;
                if self.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = m.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = v.g_mul_scalar_(b2).g_add_(&(g.square() * (1.0 - b2)));
                let denom = (&*v / bc2).sqrt() + self.eps;
                let _ = p.g_sub_(&((&*m / bc1) / denom * lr));
            }
        });
    }

    /// The data-parallel step: sums the gradients and `extra` (loss and
    /// metric parts) over the ranks of `dist`, clips to `max_norm`, takes
    /// one step at `lr` and zeroes the gradients. Returns the gradient norm
    /// before clipping and the summed `extra` (unchanged with one rank).
    pub fn step_across(
        &mut self,
        dist: &mut dyn Collective,
        extra: &[f64],
        max_norm: f64,
        lr: f64,
    ) -> Result<(f64, Vec<f64>)> {
        let summed = crate::parallel::sync_grads(dist, &self.params, extra)?;
        let norm = self.clip_grad_norm(max_norm);
        self.step(lr);
        self.zero_grad();
        Ok((norm, summed))
    }

    /// Moments and step count, for checkpoints.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            named.push((format!("m.{i}"), m.to_device(tch::Device::Cpu)));
            named.push((format!("v.{i}"), v.to_device(tch::Device::Cpu)));
        }
        named.push(("step".into(), Tensor::from(self.step)));
        Tensor::write_safetensors(&named, path)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let files = WeightFiles::open_file(path)?;
        tch::no_grad(|| -> Result<()> {
            for (i, (m, v)) in self.m.iter_mut().zip(&mut self.v).enumerate() {
                m.f_copy_(&files.get(&format!("m.{i}"), &m.size(), Kind::Float, m.device())?)?;
                v.f_copy_(&files.get(&format!("v.{i}"), &v.size(), Kind::Float, v.device())?)?;
            }
            Ok(())
        })?;
        self.step = files.get("step", &[], Kind::Int64, tch::Device::Cpu)?.int64_value(&[]);
        Ok(())
    }
}

/// Linear warmup to `base_lr`, then cosine decay to 10% of it at `total` steps.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub base_lr: f64,
    pub warmup: usize,
    pub total: usize,
}

impl Schedule {
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.base_lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let min = 0.1 * self.base_lr;
        min + (self.base_lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_minimises_a_quadratic() {
        let x = Tensor::from_slice(&[3.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![x.shallow_clone()], 0.0);
        for _ in 0..300 {
            opt.zero_grad();
            let loss = (&x - Tensor::from_slice(&[1.0f32, 1.0])).square().sum(Kind::Float);
            loss.backward();
            opt.step(0.05);
        }
        let v: Vec<f32> = Vec::try_from(&x.detach()).unwrap();
        assert!((v[0] - 1.0).abs() < 1e-2 && (v[1] - 1.0).abs() < 1e-2, "{v:?}");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let x = Tensor::from_slice(&[1.0f32, 1.0]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![x.shallow_clone()], 0.0);
        (&x * 30.0).sum(Kind::Float).backward(); // grad = [30, 30]
        let before = opt.clip_grad_norm(1.0);
        assert!((before - 30.0 * 2f64.sqrt()).abs() < 1e-3);
        let after = x.grad().square().sum(Kind::Float).sqrt().double_value(&[]);
        assert!((after - 1.0).abs() < 1e-3);
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = Schedule { base_lr: 1.0, warmup: 4, total: 20 };
        assert!((s.lr(0) - 0.25).abs() < 1e-9 && (s.lr(3) - 1.0).abs() < 1e-9);
        assert!(s.lr(10) < 1.0 && s.lr(10) > s.lr(19));
        assert!((s.lr(20) - 0.1).abs() < 1e-9);
    }
}
