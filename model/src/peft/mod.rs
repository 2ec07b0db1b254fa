//! Parameter-efficient adapters on a shared frozen base.
//!
//! Every method implements [`Adapter`]: hooks into the forward pass, a list
//! of trainable tensors, and an exact merge into (and unmerge from) the base
//! weights. [`PeftModel`] holds one base and any number of named adapters,
//! one of them active — the policy/reward/critic views of one model.

pub mod config;
pub mod full;
pub mod io;
pub mod lora;
pub mod model;
pub mod repadapter;
pub mod ssf;

pub use config::{Method, PeftConfig};
pub use model::PeftModel;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::{Hooks, Model};

/// The prefix PEFT puts before the base model's own tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";

pub trait Adapter: Hooks + Send {
    fn config(&self) -> &PeftConfig;

    /// Every tensor of the adapter, named as in `adapter_model.safetensors`.
    fn tensors(&self) -> Vec<(String, &Tensor)>;

    /// Folds the adapter into the base weights.
    fn merge_into(&mut self, model: &mut Model) -> Result<()>;

    /// Takes a merged adapter back out of the base weights.
    fn unmerge_from(&mut self, model: &mut Model) -> Result<()>;

    /// The trainable tensors (all of the adapter's tensors).
    fn parameters(&self) -> Vec<Tensor> {
        self.tensors().into_iter().map(|(_, t)| t.shallow_clone()).collect()
    }

    /// Number of trainable scalars.
    fn num_parameters(&self) -> i64 {
        self.tensors().iter().map(|(_, t)| t.numel() as i64).sum()
    }
}

/// A fresh trainable tensor on the model's device, in f32.
pub(crate) fn param(t: Tensor) -> Tensor {
    t.to_kind(Kind::Float).set_requires_grad(true)
}

/// Uniform(-bound, bound) values drawn from `rng` (not torch's global
/// generator, so concurrent threads cannot perturb a seeded init).
pub(crate) fn uniform(shape: &[i64], bound: f64, rng: &mut ChaCha8Rng, device: tch::Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-bound..bound) as f32).collect();
    Tensor::from_slice(&v).view(shape).to_device(device)
}

/// Normal(0, std) values drawn from `rng` (Box–Muller).
pub fn normal(shape: &[i64], std: f64, rng: &mut ChaCha8Rng, device: tch::Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect();
    Tensor::from_slice(&v).view(shape).to_device(device)
}

/// Number of scalars in the base model (the denominator of the paper's
/// trainable-parameter ratio).
pub fn base_parameters(model: &Model) -> i64 {
    let mut n = model.embed_tokens.numel();
    for l in &model.layers {
        n += l.input_layernorm.weight.numel() + l.post_attention_layernorm.weight.numel();
        for norm in [&l.self_attn.q_norm, &l.self_attn.k_norm].into_iter().flatten() {
            n += norm.weight.numel();
        }
        for p in crate::Proj::ALL {
            let lin = l.proj(p);
            n += lin.weight.numel() + lin.bias.as_ref().map_or(0, Tensor::numel);
        }
    }
    n += model.norm.weight.numel();
    if let Some(h) = &model.lm_head {
        n += h.weight.numel();
    }
    n as i64
}

/// A freshly initialised adapter of `cfg.method` for `model`, seeded by `cfg.seed`.
pub fn build(cfg: PeftConfig, model: &Model) -> Result<Box<dyn Adapter>> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    Ok(match cfg.method {
        Method::Lora => Box::new(lora::Lora::new(cfg, model, &mut rng)?),
        Method::Ssf => Box::new(ssf::Ssf::new(cfg, model)?),
        Method::RepAdapter => Box::new(repadapter::RepAdapter::new(cfg, model, &mut rng)?),
        Method::Full => Box::new(full::Full::new(cfg, model)?),
    })
}
