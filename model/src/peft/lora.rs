//! LoRA: W' = W + (alpha/r)·B·A on the targeted projections; A random
//! (PEFT's Kaiming-uniform), B zero at init.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::{param, uniform, Adapter, PeftConfig, PEFT_PREFIX};
use crate::error::Result;
use crate::{Hooks, Model, Proj};

pub struct Lora {
    cfg: PeftConfig,
    scale: f64,
    /// (layer, projection) -> (A `[r, in]`, B `[out, r]`)
    mods: BTreeMap<(usize, Proj), (Tensor, Tensor)>,
}

fn key(layer: usize, p: Proj, ab: &str) -> String {
    format!("{PEFT_PREFIX}model.layers.{layer}.{}.{}.lora_{ab}.weight", p.parent(), p.name())
}

impl Lora {
    pub fn new(cfg: PeftConfig, model: &Model, rng: &mut rand_chacha::ChaCha8Rng) -> Result<Self> {
        cfg.validate()?;
        let targets = cfg.projections()?;
        let r = cfg.r;
        let mut mods = BTreeMap::new();
        for (li, layer) in model.layers.iter().enumerate() {
            for &p in &targets {
                let lin = layer.proj(p);
                let bound = 1.0 / (lin.in_dim() as f64).sqrt();
                let opts = (Kind::Float, model.device);
                let a = param(uniform(&[r, lin.in_dim()], bound, rng, model.device));
                let b = param(Tensor::zeros([lin.out_dim(), r], opts));
                mods.insert((li, p), (a, b));
            }
        }
        let scale = cfg.alpha / r as f64;
        Ok(Self { cfg, scale, mods })
    }

    /// `B·A·scale` in f32. Added to (or taken from) a bf16/f16 weight in
    /// place, it is rounded once, as peft's merge does (`weight += delta`
    /// with an f32 delta), not twice.
    fn delta(&self, a: &Tensor, b: &Tensor) -> Tensor {
        b.mm(a) * self.scale
    }
}

impl Hooks for Lora {
    fn linear(&self, layer: usize, proj: Proj, x: &Tensor, y: Tensor) -> Tensor {
        match self.mods.get(&(layer, proj)) {
            // f32 activations: the update in f32. Lower-precision ones:
            // the small A and scaled B are cast to the activations' dtype,
            // so both matmuls run on bf16/f16 inputs (as autocast would) and
            // no [tokens, features] tensor is cast; gradients still reach
            // the f32 A and B through the casts.
            Some((a, b)) if x.kind() == Kind::Float => {
                y + x.linear::<Tensor>(a, None).linear::<Tensor>(b, None) * self.scale
            }
            Some((a, b)) => {
                let kind = x.kind();
                y + x.linear::<Tensor>(&a.to_kind(kind), None).linear::<Tensor>(&(b * self.scale).to_kind(kind), None)
            }
            None => y,
        }
    }
}

impl Adapter for Lora {
    fn config(&self) -> &PeftConfig {
        &self.cfg
    }

    fn tensors(&self) -> Vec<(String, &Tensor)> {
        self.mods.iter().flat_map(|(&(l, p), (a, b))| [(key(l, p, "A"), a), (key(l, p, "B"), b)]).collect()
    }

    fn merge_into(&mut self, model: &mut Model) -> Result<()> {
        tch::no_grad(|| {
            for (&(l, p), (a, b)) in &self.mods {
                let w = &mut model.layers[l].proj_mut(p).weight;
                let _ = w.f_add_(&self.delta(a, b))?;
            }
            Ok(())
        })
    }

    fn unmerge_from(&mut self, model: &mut Model) -> Result<()> {
        tch::no_grad(|| {
            for (&(l, p), (a, b)) in &self.mods {
                let w = &mut model.layers[l].proj_mut(p).weight;
                let _ = w.f_sub_(&self.delta(a, b))?;
            }
            Ok(())
        })
    }
}
