//! The subset of a Hugging Face `config.json` that LLaMA-family decoders need.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// `eos_token_id` is an int or a list of ints in HF configs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: i64,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<TokenIds>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> i64 {
    2048
}

/// The decoder family, which decides where biases sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// A validated decoder configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
}

impl Config {
    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&text).map_err(|msg| match msg {
            ConfigError::Arch(a) => Error::UnsupportedArchitecture(a),
            ConfigError::Invalid(msg) => Error::Config { path: path.clone(), msg },
        })
    }

    fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let name = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.as_ref().and_then(|a| a.first().cloned()))
            .unwrap_or_default();
        let arch = match name.as_str() {
            "llama" | "LlamaForCausalLM" => Arch::Llama,
            "qwen2" | "Qwen2ForCausalLM" => Arch::Qwen2,
            other => return Err(ConfigError::Arch(other.to_string())),
        };
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ConfigError::Invalid(format!("hidden_act {act:?}: only silu is supported")));
            }
        }
        for (field, v) in [("rope_scaling", &raw.rope_scaling), ("rope_parameters", &raw.rope_parameters)] {
            if let Some(v) = v {
                let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str());
                if !(v.is_null() || kind == Some("default") || kind.is_none() && v.get("rope_theta").is_some()) {
                    return Err(ConfigError::Invalid(format!("{field}: only default RoPE is supported, got {v}")));
                }
            }
        }
        // transformers 5 moves rope_theta into rope_parameters.
        let rope_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .unwrap_or(raw.rope_theta);
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let positive = [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("num_key_value_heads", num_kv_heads),
            ("max_position_embeddings", raw.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v <= 0 {
                return Err(ConfigError::Invalid(format!("{field} must be positive, got {v}")));
            }
        }
        if raw.num_attention_heads % num_kv_heads != 0 {
            return Err(ConfigError::Invalid(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                raw.num_attention_heads
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim <= 0 || head_dim % 2 != 0 {
            return Err(ConfigError::Invalid(format!("head_dim must be positive and even, got {head_dim}")));
        }
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Llama => {
                let b = raw.attention_bias.unwrap_or(false);
                (b, b)
            }
        };
        let first = |t: &Option<TokenIds>| t.as_ref().and_then(|t| t.to_vec().first().copied());
        Ok(Config {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias,
            bos_token_id: first(&raw.bos_token_id),
            eos_token_ids: raw.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default(),
            pad_token_id: first(&raw.pad_token_id),
        })
    }
}

enum ConfigError {
    Arch(String),
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN: &str = r#"{"model_type":"qwen2","vocab_size":100,"hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"tie_word_embeddings":true,"eos_token_id":[5,6]}"#;

    #[test]
    fn qwen2_has_qkv_bias_and_gqa() {
        let Ok(c) = Config::from_json(QWEN) else { panic!("config should parse") };
        assert_eq!(c.arch, Arch::Qwen2);
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
        assert_eq!(c.eos_token_ids, vec![5, 6]);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let text = QWEN.replace("qwen2", "gpt2");
        assert!(matches!(Config::from_json(&text), Err(ConfigError::Arch(a)) if a == "gpt2"));
    }

    #[test]
    fn bad_head_split_is_rejected() {
        let text = QWEN.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(matches!(Config::from_json(&text), Err(ConfigError::Invalid(m)) if m.contains("num_key_value_heads")));
    }
}
