//! The building blocks: linear projections, RMSNorm, rotary embeddings.

use tch::{Kind, Tensor};

use super::config::RopeScaling;
use super::hooks::Norm;
use super::weights::WeightFiles;
use crate::error::Result;

/// `y = x Wᵀ + b` with HF's `[out, in]` weight layout.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(
        w: &WeightFiles,
        prefix: &str,
        in_dim: i64,
        out_dim: i64,
        bias: bool,
        kind: Kind,
        device: tch::Device,
    ) -> Result<Self> {
        let weight = w.get_mapped(&format!("{prefix}.weight"), &[out_dim, in_dim], kind, device)?;
        let bias = if bias { Some(w.get_mapped(&format!("{prefix}.bias"), &[out_dim], kind, device)?) } else { None };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }

    pub fn in_dim(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_dim(&self) -> i64 {
        self.weight.size()[0]
    }
}

/// Root-mean-square layer norm, computed in f32 as transformers does.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    pub site: Norm,
}

impl RmsNorm {
    /// Returns `(x̂, weight ⊙ x̂)`; adapters that scale the norm need `x̂`.
    pub fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.square().mean_dim(-1, true, Kind::Float);
        let xhat = (xf * (var + self.eps).rsqrt()).to_kind(kind);
        let y = &self.weight * &xhat;
        (xhat, y)
    }
}

/// Rotary position embedding tables for given positions.
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    pub fn new(head_dim: i64, theta: f64, scaling: Option<RopeScaling>, device: tch::Device) -> Self {
        Self { inv_freq: Self::inv_freq(head_dim, theta, scaling, device) }
    }

    /// The `[head_dim / 2]` f32 inverse frequencies, computed with the same
    /// f32 tensor operations as transformers' `_compute_default_rope_parameters`
    /// and `_compute_llama3_parameters`.
    pub fn inv_freq(head_dim: i64, theta: f64, scaling: Option<RopeScaling>, device: tch::Device) -> Tensor {
        let exponents =
            Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / head_dim as f64;
        let inv_freq = Tensor::from(theta).to_device(device).to_kind(Kind::Float).pow(&exponents).reciprocal();
        match scaling {
            None => inv_freq,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old_context_len = original_max_position_embeddings as f64;
                let low_freq_wavelen = old_context_len / low_freq_factor;
                let high_freq_wavelen = old_context_len / high_freq_factor;
                // `2 * math.pi / inv_freq` is `inv_freq.reciprocal() * (2 * math.pi)` in torch.
                let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
                // Long wavelengths are divided by `factor`, short ones kept.
                let scaled = (&inv_freq / factor).where_self(&wavelen.gt(low_freq_wavelen), &inv_freq);
                // In between: interpolated by a smooth factor.
                let smooth =
                    (wavelen.reciprocal() * old_context_len - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed = smooth.rsub_scalar(1.0) * &scaled / factor + &smooth * &scaled;
                let medium = wavelen
                    .lt(high_freq_wavelen)
                    .logical_not()
                    .logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
                smoothed.where_self(&medium, &scaled)
            }
        }
    }

    /// `(cos, sin)` of shape `[b, 1, t, head_dim]` for positions `[b, t]`.
    pub fn tables(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq; // [b,t,hd/2]
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }

    /// Rotates `x` `[b, heads, t, hd]` by the tables.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let x1 = x.narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        let rotated = Tensor::cat(&[-x2, x1], 3);
        x * cos + rotated * sin
    }
}
