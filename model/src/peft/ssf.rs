//! SSF (scale and shift features): y ← γ ⊙ y + β after the targeted
//! projections and norms; γ = 1, β = 0 at init.
//!
//! Merging folds γ into the producing weight. A norm has no bias, so its β is
//! carried into the biases of the projections that read the norm's output
//! (q/k/v, gate/up, or the LM head), which is exact because they are linear.

use std::collections::{BTreeMap, BTreeSet};

use tch::{Kind, Tensor};

use super::config::SsfSite;
use super::{param, Adapter, PeftConfig, PEFT_PREFIX};
use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::{Hooks, Model, Norm, Proj};

/// One scale-and-shift site: a projection of a layer, or a norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Site {
    Proj(usize, Proj),
    Norm(Norm),
}

impl Site {
    fn module(self) -> String {
        match self {
            Site::Proj(l, p) => format!("model.layers.{l}.{}.{}", p.parent(), p.name()),
            Site::Norm(n) => n.module_name(),
        }
    }
}

pub struct Ssf {
    cfg: PeftConfig,
    /// site -> (γ, β), each `[features]`
    mods: BTreeMap<Site, (Tensor, Tensor)>,
    /// Linears that had no bias until a merge gave them one.
    created_bias: BTreeSet<Site>,
}

impl Ssf {
    pub fn new(cfg: PeftConfig, model: &Model) -> Result<Self> {
        cfg.validate()?;
        let opts = (Kind::Float, model.device);
        let h = model.cfg.hidden_size;
        let mut mods = BTreeMap::new();
        let mut add = |site: Site, n: i64| {
            mods.insert(site, (param(Tensor::ones([n], opts)), param(Tensor::zeros([n], opts))));
        };
        for s in cfg.ssf_sites()? {
            for (li, layer) in model.layers.iter().enumerate() {
                match s {
                    SsfSite::Proj(p) => add(Site::Proj(li, p), layer.proj(p).out_dim()),
                    SsfSite::InputNorm => add(Site::Norm(Norm::Input(li)), h),
                    SsfSite::PostAttentionNorm => add(Site::Norm(Norm::PostAttention(li)), h),
                    SsfSite::FinalNorm => {}
                }
            }
            if s == SsfSite::FinalNorm {
                add(Site::Norm(Norm::Final), h);
            }
        }
        Ok(Self { cfg, mods, created_bias: BTreeSet::new() })
    }

    fn apply(&self, site: Site, y: Tensor) -> Tensor {
        match self.mods.get(&site) {
            // One fused f32 `β + y ⊙ γ` straight from y (a bf16 y is promoted
            // inside the kernel, not copied to f32 first, and only y itself
            // is kept for the backward), rounded back to y's dtype.
            Some((g, b)) => {
                let kind = y.kind();
                b.addcmul(&y, g).to_kind(kind)
            }
            None => y,
        }
    }
}

impl Hooks for Ssf {
    fn linear(&self, layer: usize, proj: Proj, _x: &Tensor, y: Tensor) -> Tensor {
        self.apply(Site::Proj(layer, proj), y)
    }

    fn norm(&self, norm: Norm, _xhat: &Tensor, y: Tensor) -> Tensor {
        self.apply(Site::Norm(norm), y)
    }
}

/// The linears that read a norm's output, with their site keys.
fn readers(model: &mut Model, norm: Norm) -> Vec<(Site, &mut Linear)> {
    match norm {
        Norm::Input(l) | Norm::PostAttention(l) => {
            let procs: &[Proj] =
                if matches!(norm, Norm::Input(_)) { &[Proj::Q, Proj::K, Proj::V] } else { &[Proj::Gate, Proj::Up] };
            let layer = &mut model.layers[l];
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            let mut out: Vec<(Site, &mut Linear)> = Vec::new();
            for (p, lin) in [
                (Proj::Q, &mut a.q_proj),
                (Proj::K, &mut a.k_proj),
                (Proj::V, &mut a.v_proj),
                (Proj::Gate, &mut m.gate_proj),
                (Proj::Up, &mut m.up_proj),
            ] {
                if procs.contains(&p) {
                    out.push((Site::Proj(l, p), lin));
                }
            }
            out
        }
        Norm::Final | Norm::QNorm(_) | Norm::KNorm(_) => Vec::new(),
    }
}

impl Ssf {
    /// Adds `w @ shift` to a reader's bias (creating the bias if needed).
    fn shift_bias(
        created: &mut BTreeSet<Site>,
        site: Site,
        bias: &mut Option<Tensor>,
        w: &Tensor,
        shift: &Tensor,
        sign: f64,
    ) -> Result<()> {
        let add = (w.to_kind(Kind::Float).mv(shift) * sign).to_kind(w.kind());
        match bias {
            Some(b) => {
                let _ = b.f_add_(&add)?;
            }
            None => {
                *bias = Some(add);
                created.insert(site);
            }
        }
        Ok(())
    }

    fn merge_norm(&mut self, model: &mut Model, norm: Norm, sign: f64) -> Result<()> {
        let Some((g, b)) = self.mods.get(&Site::Norm(norm)) else { return Ok(()) };
        let (g, b) = (g.shallow_clone(), b.shallow_clone());
        if sign > 0.0 {
            for (site, lin) in readers(model, norm) {
                Self::shift_bias(&mut self.created_bias, site, &mut lin.bias, &lin.weight, &b, 1.0)?;
            }
        }
        let w = match norm {
            Norm::Input(l) => &mut model.layers[l].input_layernorm.weight,
            Norm::PostAttention(l) => &mut model.layers[l].post_attention_layernorm.weight,
            Norm::Final => &mut model.norm.weight,
            // Not an SSF site: their output is rotated, not read by a
            // linear, so a shift could not be folded (nothing has changed yet).
            Norm::QNorm(_) | Norm::KNorm(_) => {
                return Err(Error::InvalidArgument(format!("SSF cannot merge into {}", norm.module_name())))
            }
        };
        let g = g.to_kind(w.kind());
        let _ = if sign > 0.0 { w.f_mul_(&g)? } else { w.f_div_(&g)? };
        if norm == Norm::Final {
            // The LM head reads the final norm: its shift becomes a logit bias.
            let head = model.lm_head.as_ref().map_or(&model.embed_tokens, |h| &h.weight).shallow_clone();
            Self::shift_bias(
                &mut self.created_bias,
                Site::Norm(Norm::Final),
                &mut model.lm_head_bias,
                &head,
                &b,
                sign,
            )?;
        } else if sign < 0.0 {
            for (site, lin) in readers(model, norm) {
                Self::shift_bias(&mut self.created_bias, site, &mut lin.bias, &lin.weight, &b, -1.0)?;
            }
        }
        Ok(())
    }

    fn merge_proj(&mut self, model: &mut Model, l: usize, p: Proj, sign: f64) -> Result<()> {
        let site = Site::Proj(l, p);
        let Some((g, b)) = self.mods.get(&site) else { return Ok(()) };
        let lin = model.layers[l].proj_mut(p);
        let (g, b) = (g.to_kind(lin.weight.kind()), b.to_kind(lin.weight.kind()));
        if sign > 0.0 {
            let _ = lin.weight.f_mul_(&g.unsqueeze(1))?;
            match &mut lin.bias {
                Some(bias) => {
                    let _ = bias.f_mul_(&g)?.f_add_(&b)?;
                }
                None => {
                    lin.bias = Some(b.copy());
                    self.created_bias.insert(site);
                }
            }
        } else {
            let _ = lin.weight.f_div_(&g.unsqueeze(1))?;
            if let Some(bias) = &mut lin.bias {
                let _ = bias.f_sub_(&b)?.f_div_(&g)?;
            }
        }
        Ok(())
    }

    /// Drops biases that only exist because of a merge (they are ~0 now).
    fn drop_created_biases(&mut self, model: &mut Model) {
        for site in std::mem::take(&mut self.created_bias) {
            match site {
                Site::Proj(l, p) => model.layers[l].proj_mut(p).bias = None,
                Site::Norm(_) => model.lm_head_bias = None,
            }
        }
    }
}

impl Adapter for Ssf {
    fn config(&self) -> &PeftConfig {
        &self.cfg
    }

    fn tensors(&self) -> Vec<(String, &Tensor)> {
        self.mods
            .iter()
            .flat_map(|(site, (g, b))| {
                let m = site.module();
                [(format!("{PEFT_PREFIX}{m}.ssf_scale"), g), (format!("{PEFT_PREFIX}{m}.ssf_shift"), b)]
            })
            .collect()
    }

    fn merge_into(&mut self, model: &mut Model) -> Result<()> {
        let sites: Vec<Site> = self.mods.keys().copied().collect();
        tch::no_grad(|| {
            // Norms first: their shift flows into the readers' unscaled weights.
            for s in &sites {
                if let Site::Norm(n) = *s {
                    self.merge_norm(model, n, 1.0)?;
                }
            }
            for s in &sites {
                if let Site::Proj(l, p) = *s {
                    self.merge_proj(model, l, p, 1.0)?;
                }
            }
            Ok(())
        })
    }

    fn unmerge_from(&mut self, model: &mut Model) -> Result<()> {
        let sites: Vec<Site> = self.mods.keys().copied().collect();
        tch::no_grad(|| {
            for s in &sites {
                if let Site::Proj(l, p) = *s {
                    self.merge_proj(model, l, p, -1.0)?;
                }
            }
            for s in &sites {
                if let Site::Norm(n) = *s {
                    self.merge_norm(model, n, -1.0)?;
                }
            }
            self.drop_created_biases(model);
            Ok(())
        })
    }
}
