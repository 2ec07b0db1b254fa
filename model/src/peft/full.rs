//! Full-parameter training in the adapter shape: a zero-initialised delta for
//! every base tensor, so the base stays frozen and shareable, "disabled"
//! means the base, and merging is W += ΔW. This is the paper's
//! "without PEFT" baseline.

use tch::{Kind, Tensor};

use super::{param, Adapter, PeftConfig, PEFT_PREFIX};
use crate::error::Result;
use crate::{Hooks, Model, Norm, Proj};

struct LinearDelta {
    weight: Tensor,
    bias: Option<Tensor>,
}

pub struct Full {
    cfg: PeftConfig,
    embed: Tensor,
    /// Per layer: the seven projections in `Proj::ALL` order.
    linears: Vec<Vec<LinearDelta>>,
    /// Per layer: (input_layernorm, post_attention_layernorm).
    norms: Vec<(Tensor, Tensor)>,
    /// Per layer: (q_norm, k_norm) where the model has them (Qwen3).
    head_norms: Vec<(Option<Tensor>, Option<Tensor>)>,
    final_norm: Tensor,
    /// `None` when the head is tied to the embedding (its delta is `embed`).
    lm_head: Option<Tensor>,
}

fn zeros_like(t: &Tensor) -> Tensor {
    param(Tensor::zeros(t.size(), (Kind::Float, t.device())))
}

impl Full {
    pub fn new(cfg: PeftConfig, model: &Model) -> Result<Self> {
        cfg.validate()?;
        let linears = model
            .layers
            .iter()
            .map(|l| {
                Proj::ALL
                    .iter()
                    .map(|&p| {
                        let lin = l.proj(p);
                        LinearDelta { weight: zeros_like(&lin.weight), bias: lin.bias.as_ref().map(zeros_like) }
                    })
                    .collect()
            })
            .collect();
        let norms = model
            .layers
            .iter()
            .map(|l| (zeros_like(&l.input_layernorm.weight), zeros_like(&l.post_attention_layernorm.weight)))
            .collect();
        let head_norms = model
            .layers
            .iter()
            .map(|l| {
                let delta = |n: &Option<crate::layers::RmsNorm>| n.as_ref().map(|n| zeros_like(&n.weight));
                (delta(&l.self_attn.q_norm), delta(&l.self_attn.k_norm))
            })
            .collect();
        Ok(Self {
            cfg,
            embed: zeros_like(&model.embed_tokens),
            linears,
            norms,
            head_norms,
            final_norm: zeros_like(&model.norm.weight),
            lm_head: model.lm_head.as_ref().map(|h| zeros_like(&h.weight)),
        })
    }

    fn norm_delta(&self, norm: Norm) -> Option<&Tensor> {
        match norm {
            Norm::Input(l) => Some(&self.norms[l].0),
            Norm::PostAttention(l) => Some(&self.norms[l].1),
            Norm::Final => Some(&self.final_norm),
            Norm::QNorm(l) => self.head_norms.get(l).and_then(|n| n.0.as_ref()),
            Norm::KNorm(l) => self.head_norms.get(l).and_then(|n| n.1.as_ref()),
        }
    }

    fn proj_index(p: Proj) -> usize {
        Proj::ALL.iter().position(|&q| q == p).unwrap_or(0)
    }

    fn apply(&self, model: &mut Model, sign: f64) -> Result<()> {
        // The f32 delta is added in place, so a bf16/f16 weight is rounded once.
        let add = |w: &mut Tensor, d: &Tensor| -> Result<()> {
            let _ = w.f_add_(&(d * sign))?;
            Ok(())
        };
        tch::no_grad(|| {
            add(&mut model.embed_tokens, &self.embed)?;
            for (li, layer) in model.layers.iter_mut().enumerate() {
                for &p in &Proj::ALL {
                    let d = &self.linears[li][Self::proj_index(p)];
                    let lin = layer.proj_mut(p);
                    add(&mut lin.weight, &d.weight)?;
                    if let (Some(b), Some(db)) = (&mut lin.bias, &d.bias) {
                        add(b, db)?;
                    }
                }
                add(&mut layer.input_layernorm.weight, &self.norms[li].0)?;
                add(&mut layer.post_attention_layernorm.weight, &self.norms[li].1)?;
                let (q, k) = &self.head_norms[li];
                for (norm, d) in [(&mut layer.self_attn.q_norm, q), (&mut layer.self_attn.k_norm, k)] {
                    if let (Some(n), Some(d)) = (norm, d) {
                        add(&mut n.weight, d)?;
                    }
                }
            }
            add(&mut model.norm.weight, &self.final_norm)?;
            if let (Some(h), Some(d)) = (&mut model.lm_head, &self.lm_head) {
                add(&mut h.weight, d)?;
            }
            Ok(())
        })
    }
}

impl Hooks for Full {
    fn embed(&self, ids: &Tensor, y: Tensor) -> Tensor {
        let kind = y.kind();
        y + Tensor::embedding(&self.embed, ids, -1, false, false).to_kind(kind)
    }

    fn linear(&self, layer: usize, proj: Proj, x: &Tensor, y: Tensor) -> Tensor {
        let d = &self.linears[layer][Self::proj_index(proj)];
        let kind = y.kind();
        if kind == Kind::Float {
            return y + x.linear(&d.weight, d.bias.as_ref());
        }
        // The f32 delta cast to the activations' dtype: the matmul runs on
        // bf16/f16 inputs; its gradient reaches the f32 delta.
        let bias = d.bias.as_ref().map(|b| b.to_kind(kind));
        y + x.linear(&d.weight.to_kind(kind), bias.as_ref())
    }

    fn norm(&self, norm: Norm, xhat: &Tensor, y: Tensor) -> Tensor {
        let Some(d) = self.norm_delta(norm) else { return y };
        let kind = y.kind();
        y + (xhat.to_kind(Kind::Float) * d).to_kind(kind)
    }

    fn lm_head(&self, x: &Tensor, y: Tensor) -> Tensor {
        let d = self.lm_head.as_ref().unwrap_or(&self.embed);
        let kind = y.kind();
        y + x.to_kind(Kind::Float).linear::<Tensor>(d, None).to_kind(kind)
    }
}

impl Adapter for Full {
    fn config(&self) -> &PeftConfig {
        &self.cfg
    }

    fn tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![(format!("{PEFT_PREFIX}model.embed_tokens.weight"), &self.embed)];
        for (li, ((lins, norms), (q, k))) in self.linears.iter().zip(&self.norms).zip(&self.head_norms).enumerate() {
            for (p, d) in Proj::ALL.iter().zip(lins) {
                let m = format!("{PEFT_PREFIX}model.layers.{li}.{}.{}", p.parent(), p.name());
                out.push((format!("{m}.weight"), &d.weight));
                if let Some(b) = &d.bias {
                    out.push((format!("{m}.bias"), b));
                }
            }
            out.push((format!("{PEFT_PREFIX}{}.weight", Norm::Input(li).module_name()), &norms.0));
            out.push((format!("{PEFT_PREFIX}{}.weight", Norm::PostAttention(li).module_name()), &norms.1));
            for (norm, d) in [(Norm::QNorm(li), q), (Norm::KNorm(li), k)] {
                if let Some(d) = d {
                    out.push((format!("{PEFT_PREFIX}{}.weight", norm.module_name()), d));
                }
            }
        }
        out.push((format!("{PEFT_PREFIX}model.norm.weight"), &self.final_norm));
        if let Some(h) = &self.lm_head {
            out.push((format!("{PEFT_PREFIX}lm_head.weight"), h));
        }
        out
    }

    fn merge_into(&mut self, model: &mut Model) -> Result<()> {
        self.apply(model, 1.0)
    }

    fn unmerge_from(&mut self, model: &mut Model) -> Result<()> {
        self.apply(model, -1.0)
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::config::Arch;
    use crate::init::Preset;
    use crate::peft::{base_parameters, Method};
    use crate::random::random_model;
    use crate::{Mask, NoHooks};

    fn logits(model: &Model, hooks: &dyn Hooks) -> Tensor {
        let ids = Tensor::from_slice(&[5i64, 17, 2, 250, 9, 33]).unsqueeze(0);
        let pos = Tensor::arange(6, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let h = model.forward(&ids, &pos, Mask::Causal, None, hooks).expect("forward");
        model.logits(&h, hooks)
    }

    #[test]
    fn full_trains_and_merges_the_qwen3_head_norms() {
        let mut cfg = Preset::Tiny.config(300, 1, 0);
        (cfg.arch, cfg.qk_norm, cfg.head_dim) = (Arch::Qwen3, true, 32);
        let mut model = random_model(cfg, Kind::Float, Device::Cpu, 1).expect("model");
        let mut full = Full::new(PeftConfig::new(Method::Full), &model).expect("adapter");
        assert_eq!(full.num_parameters(), base_parameters(&model), "every base weight has a delta");
        let names: Vec<String> = full.tensors().into_iter().map(|(n, _)| n).collect();
        for n in ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"] {
            assert!(names.contains(&format!("{PEFT_PREFIX}{n}")), "{n} missing from {names:?}");
        }

        // The loss reaches the q/k norm deltas.
        let base = tch::no_grad(|| logits(&model, &NoHooks));
        logits(&model, &full).log_softmax(-1, Kind::Float).mean(Kind::Float).backward();
        for (q, k) in &full.head_norms {
            for d in [q, k].into_iter().flatten() {
                assert!(d.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "no gradient");
            }
        }

        // Moving only the head-norm deltas changes the logits, and merging is exact.
        tch::no_grad(|| {
            for (q, k) in &full.head_norms {
                for d in [q, k].into_iter().flatten() {
                    let _ = d.shallow_clone().f_add_(&Tensor::full([32], 0.3, (Kind::Float, Device::Cpu)));
                }
            }
        });
        let unmerged = tch::no_grad(|| logits(&model, &full));
        assert!((&unmerged - &base).abs().max().double_value(&[]) > 1e-3, "q/k norm deltas must matter");
        full.merge_into(&mut model).expect("merge");
        let merged = tch::no_grad(|| logits(&model, &NoHooks));
        assert!((&merged - &unmerged).abs().max().double_value(&[]) < 1e-5);
        let q_norm = model.layers[0].self_attn.q_norm.as_ref().expect("q_norm");
        assert!((q_norm.weight.mean(Kind::Float).double_value(&[]) - 1.3).abs() < 1e-6);
        full.unmerge_from(&mut model).expect("unmerge");
        let back = tch::no_grad(|| logits(&model, &NoHooks));
        assert!((&back - &base).abs().max().double_value(&[]) < 1e-5);
    }
}
