//! RepAdapter: X ← X + φu(φd(X)) on a block's normed input, no activation.
//! φd is dense (d → r, no bias); φu is group-wise (k groups, r/k → d/k) with
//! a bias and starts at zero. Being linear, it merges into the projections
//! that read the block input: W' = W(I + U·D), b' = b + W·bu; unmerging
//! inverts I + U·D through the r×r Woodbury identity.

use std::collections::{BTreeMap, BTreeSet};

use tch::{Kind, Tensor};

use super::{param, uniform, Adapter, PeftConfig, PEFT_PREFIX};
use crate::error::Result;
use crate::{Block, Hooks, Model};

struct Rep {
    /// φd `[r, d]`
    down: Tensor,
    /// φu `[k, d/k, r/k]`
    up: Tensor,
    /// φu bias `[d]`
    up_bias: Tensor,
}

pub struct RepAdapter {
    cfg: PeftConfig,
    mods: BTreeMap<(usize, Block), Rep>,
    created_bias: BTreeSet<(usize, Block)>,
}

fn prefix(layer: usize, block: Block) -> String {
    let parent = match block {
        Block::Attn => "self_attn",
        Block::Mlp => "mlp",
    };
    format!("{PEFT_PREFIX}model.layers.{layer}.{parent}.repadapter")
}

impl RepAdapter {
    pub fn new(cfg: PeftConfig, model: &Model, rng: &mut rand_chacha::ChaCha8Rng) -> Result<Self> {
        cfg.validate()?;
        let (d, r, k) = (model.cfg.hidden_size, cfg.r, cfg.groups);
        if d % k != 0 {
            return Err(crate::error::Error::InvalidArgument(format!(
                "peft.groups ({k}) must divide hidden_size ({d})"
            )));
        }
        let opts = (Kind::Float, model.device);
        let bound = (6.0 / (d + r) as f64).sqrt(); // Xavier-uniform, as RepAdapter does
        let mut mods = BTreeMap::new();
        for li in 0..model.layers.len() {
            for b in cfg.blocks()? {
                let rep = Rep {
                    down: param(uniform(&[r, d], bound, rng, model.device)),
                    up: param(Tensor::zeros([k, d / k, r / k], opts)),
                    up_bias: param(Tensor::zeros([d], opts)),
                };
                mods.insert((li, b), rep);
            }
        }
        Ok(Self { cfg, mods, created_bias: BTreeSet::new() })
    }
}

impl Rep {
    /// The block-diagonal φu as a dense `[d, r]` matrix.
    fn up_dense(&self) -> Tensor {
        let blocks: Vec<Tensor> = (0..self.up.size()[0]).map(|g| self.up.get(g)).collect();
        Tensor::block_diag(&blocks)
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let h = xf.linear::<Tensor>(&self.down, None); // [.., r]
        let (k, dk, rk) = (self.up.size()[0], self.up.size()[1], self.up.size()[2]);
        let mut shape = h.size();
        let last = shape.len() - 1;
        shape[last] = k;
        shape.push(rk);
        let grouped = h.view(shape.as_slice()); // [.., k, r/k]
        let out = Tensor::einsum("...kr,kdr->...kd", &[grouped, self.up.shallow_clone()], None::<&[i64]>);
        let mut flat = out.size();
        flat.pop();
        let n = flat.len() - 1;
        flat[n] = k * dk;
        (xf + out.reshape(flat.as_slice()) + &self.up_bias).to_kind(kind)
    }
}

impl Hooks for RepAdapter {
    fn block_input(&self, layer: usize, block: Block, x: Tensor) -> Tensor {
        match self.mods.get(&(layer, block)) {
            Some(rep) => rep.forward(&x),
            None => x,
        }
    }
}

impl Adapter for RepAdapter {
    fn config(&self) -> &PeftConfig {
        &self.cfg
    }

    fn tensors(&self) -> Vec<(String, &Tensor)> {
        self.mods
            .iter()
            .flat_map(|(&(l, b), rep)| {
                let p = prefix(l, b);
                [
                    (format!("{p}.down.weight"), &rep.down),
                    (format!("{p}.up.weight"), &rep.up),
                    (format!("{p}.up.bias"), &rep.up_bias),
                ]
            })
            .collect()
    }

    fn merge_into(&mut self, model: &mut Model) -> Result<()> {
        tch::no_grad(|| {
            for (&(l, block), rep) in &self.mods {
                let u = rep.up_dense(); // [d, r]
                for &p in block.inputs() {
                    let lin = model.layers[l].proj_mut(p);
                    let w = lin.weight.to_kind(Kind::Float);
                    let bias_add = w.mv(&rep.up_bias).to_kind(lin.weight.kind());
                    let delta = w.mm(&u).mm(&rep.down).to_kind(lin.weight.kind());
                    let _ = lin.weight.f_add_(&delta)?;
                    match &mut lin.bias {
                        Some(b) => {
                            let _ = b.f_add_(&bias_add)?;
                        }
                        None => {
                            lin.bias = Some(bias_add);
                            self.created_bias.insert((l, block));
                        }
                    }
                }
            }
            Ok(())
        })
    }

    fn unmerge_from(&mut self, model: &mut Model) -> Result<()> {
        tch::no_grad(|| {
            for (&(l, block), rep) in &self.mods {
                let u = rep.up_dense(); // [d, r]
                let r = rep.down.size()[0];
                let eye = Tensor::eye(r, (Kind::Float, u.device()));
                // (I + U D)^-1 = I - U (I_r + D U)^-1 D
                let inner = (eye + rep.down.mm(&u)).f_inverse()?;
                for &p in block.inputs() {
                    let lin = model.layers[l].proj_mut(p);
                    let merged = lin.weight.to_kind(Kind::Float);
                    let w = &merged - merged.mm(&u).mm(&inner).mm(&rep.down);
                    let bias_sub = w.mv(&rep.up_bias);
                    lin.weight.f_copy_(&w.to_kind(lin.weight.kind()))?;
                    if self.created_bias.contains(&(l, block)) {
                        lin.bias = None;
                    } else if let Some(b) = &mut lin.bias {
                        let _ = b.f_sub_(&bias_sub.to_kind(b.kind()))?;
                    }
                }
            }
            self.created_bias.clear();
            Ok(())
        })
    }
}
