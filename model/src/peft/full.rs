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
        Ok(Self {
            cfg,
            embed: zeros_like(&model.embed_tokens),
            linears,
            norms,
            final_norm: zeros_like(&model.norm.weight),
            lm_head: model.lm_head.as_ref().map(|h| zeros_like(&h.weight)),
        })
    }

    fn norm_delta(&self, norm: Norm) -> &Tensor {
        match norm {
            Norm::Input(l) => &self.norms[l].0,
            Norm::PostAttention(l) => &self.norms[l].1,
            Norm::Final => &self.final_norm,
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
        let kind = y.kind();
        y + (xhat.to_kind(Kind::Float) * self.norm_delta(norm)).to_kind(kind)
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
        for (li, (lins, norms)) in self.linears.iter().zip(&self.norms).enumerate() {
            for (p, d) in Proj::ALL.iter().zip(lins) {
                let m = format!("{PEFT_PREFIX}model.layers.{li}.{}.{}", p.parent(), p.name());
                out.push((format!("{m}.weight"), &d.weight));
                if let Some(b) = &d.bias {
                    out.push((format!("{m}.bias"), b));
                }
            }
            out.push((format!("{PEFT_PREFIX}{}.weight", Norm::Input(li).module_name()), &norms.0));
            out.push((format!("{PEFT_PREFIX}{}.weight", Norm::PostAttention(li).module_name()), &norms.1));
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
