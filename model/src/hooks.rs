//! Where adapters plug into the decoder's forward pass.
//!
//! The base model calls these at fixed sites; an adapter overrides the ones it
//! needs. `NoHooks` is the plain base model (and the reference policy).

use tch::Tensor;

/// A linear projection inside a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The Hugging Face module name (`q_proj`, …).
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// An RMSNorm of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Norm {
    /// `model.layers.{i}.input_layernorm`
    Input(usize),
    /// `model.layers.{i}.post_attention_layernorm`
    PostAttention(usize),
    /// `model.norm`
    Final,
    /// `model.layers.{i}.self_attn.q_norm` (Qwen3): on each query head
    /// `[b, t, heads, head_dim]`, before RoPE.
    QNorm(usize),
    /// `model.layers.{i}.self_attn.k_norm` (Qwen3): on each key head.
    KNorm(usize),
}

impl Norm {
    pub fn module_name(self) -> String {
        match self {
            Norm::Input(i) => format!("model.layers.{i}.input_layernorm"),
            Norm::PostAttention(i) => format!("model.layers.{i}.post_attention_layernorm"),
            Norm::Final => "model.norm".to_string(),
            Norm::QNorm(i) => format!("model.layers.{i}.self_attn.q_norm"),
            Norm::KNorm(i) => format!("model.layers.{i}.self_attn.k_norm"),
        }
    }
}

/// The two sub-blocks of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Block {
    Attn,
    Mlp,
}

impl Block {
    /// The projections that read the block's normed input.
    pub fn inputs(self) -> &'static [Proj] {
        match self {
            Block::Attn => &[Proj::Q, Proj::K, Proj::V],
            Block::Mlp => &[Proj::Gate, Proj::Up],
        }
    }
}

/// Adapter sites in the forward pass. Every method defaults to identity.
pub trait Hooks {
    /// After `model.embed_tokens`: `y` is the embedding of `ids`.
    fn embed(&self, _ids: &Tensor, y: Tensor) -> Tensor {
        y
    }
    /// After projection `proj` of layer `layer`: `x` its input, `y` its output.
    fn linear(&self, _layer: usize, _proj: Proj, _x: &Tensor, y: Tensor) -> Tensor {
        y
    }
    /// After an RMSNorm: `xhat` the normalised input (before the weight), `y` the output.
    fn norm(&self, _norm: Norm, _xhat: &Tensor, y: Tensor) -> Tensor {
        y
    }
    /// On a block's normed input, before its projections.
    fn block_input(&self, _layer: usize, _block: Block, x: Tensor) -> Tensor {
        x
    }
    /// After `lm_head`.
    fn lm_head(&self, _x: &Tensor, y: Tensor) -> Tensor {
        y
    }
}

/// The base model as it is.
pub struct NoHooks;

impl Hooks for NoHooks {}
