//! Which adapter, where, and how big — shared by job files and
//! `adapter_config.json`.

use crate::error::{Error, Result};
use crate::{Block, Proj};

pub use rlhf_common::spec::PeftMethod as Method;
use rlhf_common::spec::PeftSpec;

/// An adapter's shape: a job file's `[peft]` section plus the seed of its
/// initialisation. Fields a method does not use are ignored by it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftConfig {
    pub method: Method,
    /// LoRA rank / RepAdapter hidden width.
    pub r: i64,
    /// LoRA scale numerator: the update is (alpha / r)·B·A.
    pub alpha: f64,
    /// Module names: projections (`q_proj` … `down_proj`, or `all-linear`),
    /// norms for SSF (`input_layernorm`, `post_attention_layernorm`, `norm`),
    /// blocks for RepAdapter (`self_attn`, `mlp`). Empty = the method's default.
    pub target_modules: Vec<String>,
    /// RepAdapter: groups of the up projection.
    pub groups: i64,
    /// Seed of the random initialisation.
    pub seed: u64,
}

/// Where an SSF scale-and-shift sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SsfSite {
    Proj(Proj),
    InputNorm,
    PostAttentionNorm,
    FinalNorm,
}

impl PeftConfig {
    /// The adapter a job file's `[peft]` section describes, seeded by the job.
    pub fn from_spec(spec: &PeftSpec, seed: u64) -> Self {
        Self {
            method: spec.method,
            r: spec.r,
            alpha: spec.alpha,
            target_modules: spec.target_modules.clone(),
            groups: spec.groups,
            seed,
        }
    }

    /// The method with the job file's defaults, seed 0.
    pub fn new(method: Method) -> Self {
        Self::from_spec(&PeftSpec::new(method), 0)
    }

    /// Checks the numbers; names the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if matches!(self.method, Method::Lora | Method::RepAdapter) && self.r <= 0 {
            return bad(format!("peft.r must be positive, got {}", self.r));
        }
        if self.method == Method::Lora && !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("peft.alpha must be positive, got {}", self.alpha));
        }
        if self.method == Method::RepAdapter && (self.groups <= 0 || self.r % self.groups != 0) {
            return bad(format!("peft.groups must be positive and divide r ({}), got {}", self.r, self.groups));
        }
        match self.method {
            Method::Lora => self.projections().map(|_| ()),
            Method::Ssf => self.ssf_sites().map(|_| ()),
            Method::RepAdapter => self.blocks().map(|_| ()),
            Method::Full => Ok(()),
        }
    }

    fn targets_or<'a>(&'a self, default: &'a [&'a str]) -> Vec<&'a str> {
        if self.target_modules.is_empty() {
            default.to_vec()
        } else {
            self.target_modules.iter().map(String::as_str).collect()
        }
    }

    fn unknown(&self, name: &str, allowed: &str) -> Error {
        Error::InvalidArgument(format!(
            "peft.target_modules: unknown module {name:?} for {:?} (allowed: {allowed})",
            self.method
        ))
    }

    /// LoRA targets (default q_proj, v_proj as PEFT does for LLaMA).
    pub fn projections(&self) -> Result<Vec<Proj>> {
        let mut out = Vec::new();
        for name in self.targets_or(&["q_proj", "v_proj"]) {
            if name == "all-linear" {
                out.extend(Proj::ALL);
            } else {
                out.push(Proj::from_name(name).ok_or_else(|| self.unknown(name, "q_proj..down_proj, all-linear"))?);
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// SSF sites (default: every projection and every norm).
    pub fn ssf_sites(&self) -> Result<Vec<SsfSite>> {
        let all = ["all-linear", "input_layernorm", "post_attention_layernorm", "norm"];
        let mut out = Vec::new();
        for name in self.targets_or(&all) {
            match name {
                "all-linear" => out.extend(Proj::ALL.map(SsfSite::Proj)),
                "input_layernorm" => out.push(SsfSite::InputNorm),
                "post_attention_layernorm" => out.push(SsfSite::PostAttentionNorm),
                "norm" => out.push(SsfSite::FinalNorm),
                _ => out.push(SsfSite::Proj(Proj::from_name(name).ok_or_else(|| {
                    self.unknown(name, "q_proj..down_proj, all-linear, input_layernorm, post_attention_layernorm, norm")
                })?)),
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// RepAdapter blocks (default both).
    pub fn blocks(&self) -> Result<Vec<Block>> {
        let mut out = Vec::new();
        for name in self.targets_or(&["self_attn", "mlp"]) {
            out.push(match name {
                "self_attn" => Block::Attn,
                "mlp" => Block::Mlp,
                _ => return Err(self.unknown(name, "self_attn, mlp")),
            });
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}
