//! The LLaMA-family decoder (LLaMA, Qwen2, Qwen3): GQA attention with RoPE
//! (default or Llama 3 scaled), SwiGLU MLP, RMSNorm, optional tied
//! embeddings, optional per-head query/key RMSNorm (Qwen3). Tensor names
//! equal the Hugging Face checkpoint names.

use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::cache::KvCache;
use super::config::Config;
use super::fuse;
use super::hooks::{Block, Hooks, Norm, Proj};
use super::layers::{Linear, RmsNorm, Rope};
use super::weights::WeightFiles;
use crate::error::{Error, Result};

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Qwen3's RMSNorm over each query head (weight `[head_dim]`), before RoPE.
    pub q_norm: Option<RmsNorm>,
    /// The same on each key head.
    pub k_norm: Option<RmsNorm>,
    /// q, k and v as one projection ([`Model::fuse_projections`]); the
    /// three weights are then views of its rows.
    pub qkv: Option<Linear>,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// gate and up as one projection, as `qkv`.
    pub gate_up: Option<Linear>,
}

pub struct Layer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl Layer {
    pub fn proj(&self, p: Proj) -> &Linear {
        match p {
            Proj::Q => &self.self_attn.q_proj,
            Proj::K => &self.self_attn.k_proj,
            Proj::V => &self.self_attn.v_proj,
            Proj::O => &self.self_attn.o_proj,
            Proj::Gate => &self.mlp.gate_proj,
            Proj::Up => &self.mlp.up_proj,
            Proj::Down => &self.mlp.down_proj,
        }
    }

    pub fn proj_mut(&mut self, p: Proj) -> &mut Linear {
        match p {
            Proj::Q => &mut self.self_attn.q_proj,
            Proj::K => &mut self.self_attn.k_proj,
            Proj::V => &mut self.self_attn.v_proj,
            Proj::O => &mut self.self_attn.o_proj,
            Proj::Gate => &mut self.mlp.gate_proj,
            Proj::Up => &mut self.mlp.up_proj,
            Proj::Down => &mut self.mlp.down_proj,
        }
    }
}

/// What the attention of one forward call may see.
#[derive(Clone, Copy)]
pub enum Mask<'a> {
    /// Plain causal attention over the new tokens (no cache, no padding).
    Causal,
    /// The new tokens see every cached position and themselves causally,
    /// with no padding anywhere (single-sequence decoding).
    None,
    /// An explicit boolean mask `[b, 1, t, T]`, true = may attend.
    Explicit(&'a Tensor),
}

pub struct Model {
    pub cfg: Config,
    pub embed_tokens: Tensor,
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    /// A logit bias; only ever set by merging an adapter that shifts the final norm.
    pub lm_head_bias: Option<Tensor>,
    pub kind: Kind,
    pub device: Device,
    rope: Rope,
    /// Keeps the memory maps alive that CPU weights may view (`None` for a
    /// model built from tensors in memory).
    _weights: Option<Arc<WeightFiles>>,
}

impl Model {
    /// Loads a Hugging Face model directory.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let cfg = Config::from_dir(dir)?;
        let weights = Arc::new(WeightFiles::open_dir(dir)?);
        Self::from_weights(cfg, weights, kind, device)
    }

    pub fn from_weights(cfg: Config, w: Arc<WeightFiles>, kind: Kind, device: Device) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let q_dim = cfg.num_heads * cfg.head_dim;
        let kv_dim = cfg.num_kv_heads * cfg.head_dim;
        let embed_tokens = w.get_mapped("model.embed_tokens.weight", &[cfg.vocab_size, h], kind, device)?;
        let norm_of = |name: String, dim: i64, site: Norm| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.get_mapped(&format!("{name}.weight"), &[dim], kind, device)?,
                eps: cfg.rms_norm_eps,
                site,
            })
        };
        let norm = |name: String, site: Norm| norm_of(name, h, site);
        let mut layers = Vec::with_capacity(cfg.num_layers as usize);
        for li in 0..cfg.num_layers as usize {
            let p = format!("model.layers.{li}");
            let lin_on = |name: &str, i_dim, o_dim, bias, device| {
                Linear::load(&w, &format!("{p}.{name}"), i_dim, o_dim, bias, kind, device)
            };
            let lin = |name: &str, i_dim, o_dim, bias| lin_on(name, i_dim, o_dim, bias, device);
            // What will be fused stays on the host until it is (views of
            // the file map where the dtype matches): on a GPU only the
            // fused copies are made.
            let fused_on = if fuse::by_default() { Device::Cpu } else { device };
            let fused = |name: &str, i_dim, o_dim, bias| lin_on(name, i_dim, o_dim, bias, fused_on);
            layers.push(Layer {
                input_layernorm: norm(format!("{p}.input_layernorm"), Norm::Input(li))?,
                self_attn: Attention {
                    q_proj: fused("self_attn.q_proj", h, q_dim, cfg.qkv_bias)?,
                    k_proj: fused("self_attn.k_proj", h, kv_dim, cfg.qkv_bias)?,
                    v_proj: fused("self_attn.v_proj", h, kv_dim, cfg.qkv_bias)?,
                    o_proj: lin("self_attn.o_proj", q_dim, h, cfg.o_bias)?,
                    q_norm: cfg
                        .qk_norm
                        .then(|| norm_of(format!("{p}.self_attn.q_norm"), cfg.head_dim, Norm::QNorm(li)))
                        .transpose()?,
                    k_norm: cfg
                        .qk_norm
                        .then(|| norm_of(format!("{p}.self_attn.k_norm"), cfg.head_dim, Norm::KNorm(li)))
                        .transpose()?,
                    qkv: None,
                },
                post_attention_layernorm: norm(format!("{p}.post_attention_layernorm"), Norm::PostAttention(li))?,
                mlp: Mlp {
                    gate_proj: fused("mlp.gate_proj", h, i, cfg.mlp_bias)?,
                    up_proj: fused("mlp.up_proj", h, i, cfg.mlp_bias)?,
                    down_proj: lin("mlp.down_proj", i, h, cfg.mlp_bias)?,
                    gate_up: None,
                },
            });
        }
        let norm = norm("model.norm".into(), Norm::Final)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(&w, "lm_head", h, cfg.vocab_size, false, kind, device)?)
        };
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device);
        let mut model =
            Self { cfg, embed_tokens, layers, norm, lm_head, lm_head_bias: None, kind, device, rope, _weights: None };
        if fuse::by_default() {
            model.fuse_projections();
            // The fused weights are copies; the views they were made from
            // are gone and nothing wrote to them yet. (A part's own kind
            // and device, had the file's dtype differed, were a copy too.)
            for (li, layer) in model.layers.iter().enumerate() {
                let attn = layer.self_attn.qkv.is_some().then_some([Proj::Q, Proj::K, Proj::V].as_slice());
                let mlp = layer.mlp.gate_up.is_some().then_some([Proj::Gate, Proj::Up].as_slice());
                for &p in attn.into_iter().chain(mlp).flatten() {
                    w.release_copied(&format!("model.layers.{li}.{}.{}.weight", p.parent(), p.name()));
                    w.release_copied(&format!("model.layers.{li}.{}.{}.bias", p.parent(), p.name()));
                }
            }
        }
        model._weights = w.has_views().then_some(w);
        Ok(model)
    }

    /// A model from layers whose tensors are already in memory, in `kind` on
    /// `device` (see [`Model::from_tensors`](super::random)).
    pub(crate) fn from_parts(
        cfg: Config,
        embed_tokens: Tensor,
        layers: Vec<Layer>,
        norm: RmsNorm,
        lm_head: Option<Linear>,
        kind: Kind,
        device: Device,
    ) -> Self {
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device);
        let mut model =
            Self { cfg, embed_tokens, layers, norm, lm_head, lm_head_bias: None, kind, device, rope, _weights: None };
        if fuse::by_default() {
            model.fuse_projections();
        }
        model
    }

    /// Rejects token ids outside the vocabulary before they reach an index op.
    pub fn check_tokens(&self, ids: &[i64]) -> Result<()> {
        match ids.iter().find(|&&id| id < 0 || id >= self.cfg.vocab_size) {
            Some(&id) => Err(Error::TokenOutOfRange { id, vocab: self.cfg.vocab_size }),
            None => Ok(()),
        }
    }

    /// Hidden states after the final norm, `[b, t, hidden]`.
    ///
    /// `ids` and `positions` are `[b, t]`; with a cache, the new keys and
    /// values are appended and attention covers every cached position.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Mask<'_>,
        mut cache: Option<&mut KvCache>,
        hooks: &dyn Hooks,
    ) -> Result<Tensor> {
        let mut x = self.embed(ids, hooks)?;
        let rope = self.rope_tables(positions);
        for li in 0..self.layers.len() {
            x = self.block(li, &x, (&rope.0, &rope.1), &mask, cache.as_deref_mut(), hooks)?;
        }
        Ok(self.final_norm(&x, hooks))
    }

    /// Token embeddings `[b, t, hidden]` (the input of block 0).
    pub fn embed(&self, ids: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        let embedded = Tensor::f_embedding(&self.embed_tokens, ids, -1, false, false)?;
        Ok(hooks.embed(ids, embedded))
    }

    /// RoPE cos/sin tables for `positions`.
    pub fn rope_tables(&self, positions: &Tensor) -> (Tensor, Tensor) {
        self.rope.tables(positions, self.kind)
    }

    /// Decoder block `li`: attention then MLP, each with a residual.
    pub fn block(
        &self,
        li: usize,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        mask: &Mask<'_>,
        cache: Option<&mut KvCache>,
        hooks: &dyn Hooks,
    ) -> Result<Tensor> {
        let layer = &self.layers[li];
        let (xhat, normed) = layer.input_layernorm.forward(x);
        let normed = hooks.norm(Norm::Input(li), &xhat, normed);
        let normed = hooks.block_input(li, Block::Attn, normed);
        let attn = self.attention(li, layer, &normed, rope, mask, cache, hooks)?;
        // Not `x += …`: tch's AddAssign is in place and breaks autograd.
        let x = x + attn;
        let (xhat, normed) = layer.post_attention_layernorm.forward(&x);
        let normed = hooks.norm(Norm::PostAttention(li), &xhat, normed);
        let normed = hooks.block_input(li, Block::Mlp, normed);
        Ok(&x + self.mlp(li, layer, &normed, hooks)?)
    }

    /// The final norm: block outputs → the hidden states `forward` returns.
    pub fn final_norm(&self, x: &Tensor, hooks: &dyn Hooks) -> Tensor {
        let (xhat, y) = self.norm.forward(x);
        hooks.norm(Norm::Final, &xhat, y)
    }

    /// Vocabulary logits for hidden states.
    pub fn logits(&self, hidden: &Tensor, hooks: &dyn Hooks) -> Tensor {
        let y = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.linear::<Tensor>(&self.embed_tokens, None),
        };
        let y = match &self.lm_head_bias {
            Some(b) => y + b,
            None => y,
        };
        hooks.lm_head(hidden, y)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Mask<'_>,
        cache: Option<&mut KvCache>,
        hooks: &dyn Hooks,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let a = &layer.self_attn;
        // The three projections' outputs, from one matmul when fused (and
        // the fused matmul is the faster: see `fuse::worth_it`).
        let parts = [&a.q_proj, &a.k_proj, &a.v_proj];
        let qkv = match a.qkv.as_ref().filter(|f| fuse::worth_it(x) && fuse::current(f, &parts)) {
            Some(fused) => {
                let y = fused.forward(x);
                let (q, kv) = (nh * hd, nkv * hd);
                // Contiguous parts: what follows runs as on a separate
                // projection's output (the same kernels, the same sums).
                let part = |at, n| y.narrow(-1, at, n).contiguous();
                [part(0, q), part(q, kv), part(q + kv, kv)]
            }
            None => [a.q_proj.forward(x), a.k_proj.forward(x), a.v_proj.forward(x)],
        };
        let [yq, yk, yv] = qkv;
        // `[b, n, t, hd]` heads of a projection, each RMS-normed first if
        // the model norms them (Qwen3's q_norm / k_norm, before RoPE).
        let heads = |proj: Proj, y: Tensor, n: i64, norm: Option<&RmsNorm>| {
            let y = hooks.linear(li, proj, x, y).view([b, t, n, hd]);
            let y = match norm {
                Some(norm) => {
                    let (xhat, y) = norm.forward(&y);
                    hooks.norm(norm.site, &xhat, y)
                }
                None => y,
            };
            y.transpose(1, 2)
        };
        let q = Rope::apply(&heads(Proj::Q, yq, nh, a.q_norm.as_ref()), cos, sin);
        let k = Rope::apply(&heads(Proj::K, yk, nkv, a.k_norm.as_ref()), cos, sin);
        let v = heads(Proj::V, yv, nkv, None);
        let (k, v) = match cache {
            Some(c) => c.append(li, k, v),
            None => (k, v),
        };
        let (m, causal) = match mask {
            Mask::Causal => (None, t > 1),
            Mask::None => (None, false),
            Mask::Explicit(m) => (Some(*m), false),
        };
        let out = match m {
            // One new token under a mask (a padded batch's or the
            // fixed-shape step's decode): each key/value head's query heads
            // go in as that many queries of one head, which the mask treats
            // alike. Exact, and any backend takes it: libtorch runs GQA
            // only in flash attention, which takes no mask, and in the math
            // kernel, which copies the keys and values per query head.
            Some(m) if t == 1 && nkv != nh => {
                let q = q.reshape([b, nkv, nh / nkv, hd]);
                let out = Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, false)?;
                out.reshape([b, nh, 1, hd])
            }
            _ => Tensor::f_scaled_dot_product_attention(&q, &k, &v, m, 0.0, causal, None, nkv != nh)?,
        };
        let out = out.transpose(1, 2).reshape([b, t, nh * hd]);
        Ok(hooks.linear(li, Proj::O, &out, a.o_proj.forward(&out)))
    }

    fn mlp(&self, li: usize, layer: &Layer, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        let parts = [&layer.mlp.gate_proj, &layer.mlp.up_proj];
        let (gate, up) = match layer.mlp.gate_up.as_ref().filter(|f| fuse::worth_it(x) && fuse::current(f, &parts)) {
            Some(fused) => {
                let y = fused.forward(x);
                let i = layer.mlp.gate_proj.out_dim();
                (y.narrow(-1, 0, i).contiguous(), y.narrow(-1, i, i).contiguous())
            }
            None => (layer.mlp.gate_proj.forward(x), layer.mlp.up_proj.forward(x)),
        };
        let gate = hooks.linear(li, Proj::Gate, x, gate);
        let up = hooks.linear(li, Proj::Up, x, up);
        let act = crate::fused::swiglu(&gate, &up)?;
        Ok(hooks.linear(li, Proj::Down, &act, layer.mlp.down_proj.forward(&act)))
    }
}

/// Fused projections (`fuse.rs`).
impl Model {
    /// Fuses every layer's q/k/v and gate/up projections (once; a second
    /// call changes nothing). The fused weights are copies: the separate
    /// ones' memory is freed (on a GPU, by way of the host, so the two are
    /// never there at once) or left to the file map (on a CPU, where
    /// weights are views of it until first read).
    pub fn fuse_projections(&mut self) {
        let device = self.device;
        tch::no_grad(|| {
            if device.is_cuda() {
                // Through the host: the fused weights are new allocations,
                // which the caching allocator cannot carve from the freed
                // separate ones, so fusing on the GPU would hold both
                // (+9 GB for a 7B model). The separate ones go to the host
                // and their blocks back to the driver first.
                for layer in &mut self.layers {
                    let a = &mut layer.self_attn;
                    let mut qkv = [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj];
                    if a.qkv.is_none() && fuse::fusable(&qkv) {
                        fuse::to_host(&mut qkv);
                    }
                    let m = &mut layer.mlp;
                    let mut gate_up = [&mut m.gate_proj, &mut m.up_proj];
                    if m.gate_up.is_none() && fuse::fusable(&gate_up) {
                        fuse::to_host(&mut gate_up);
                    }
                }
                crate::cuda_stats::empty_cache();
            }
            for layer in &mut self.layers {
                let a = &mut layer.self_attn;
                if a.qkv.is_none() {
                    a.qkv = fuse::fuse(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj], device);
                }
                let m = &mut layer.mlp;
                if m.gate_up.is_none() {
                    m.gate_up = fuse::fuse(&mut [&mut m.gate_proj, &mut m.up_proj], device);
                }
            }
        })
    }

    /// Undoes [`Model::fuse_projections`]: each projection gets its own
    /// weight again (a copy of its rows of the fused one).
    pub fn separate_projections(&mut self) {
        tch::no_grad(|| {
            for layer in &mut self.layers {
                let a = &mut layer.self_attn;
                if a.qkv.take().is_some() {
                    fuse::separate(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj]);
                }
                let m = &mut layer.mlp;
                if m.gate_up.take().is_some() {
                    fuse::separate(&mut [&mut m.gate_proj, &mut m.up_proj]);
                }
            }
        })
    }

    /// Whether the projections are fused.
    pub fn is_fused(&self) -> bool {
        self.layers.first().is_some_and(|l| l.self_attn.qkv.is_some() || l.mlp.gate_up.is_some())
    }
}
