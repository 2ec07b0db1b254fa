//! The subset of a Hugging Face `config.json` that LLaMA-family decoders need.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

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
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: i64,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
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

/// The decoder family, which decides where biases and norms sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    /// Bias on q/k/v (not o), none in the MLP.
    Qwen2,
    /// Optional bias on q/k/v/o together (`attention_bias`), none in the MLP,
    /// and a per-head RMSNorm on queries and keys before RoPE.
    Qwen3,
}

impl Arch {
    /// `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    /// The transformers class (`architectures` in `config.json`).
    pub fn class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// A RoPE other than the default one: how the inverse frequencies are
/// rescaled (transformers' `rope_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's `"llama3"`: wavelengths beyond `original / low_freq_factor`
    /// are stretched by `factor`, those below `original / high_freq_factor`
    /// kept, the ones between interpolated (`_compute_llama3_parameters`).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: i64 },
}

impl RopeScaling {
    /// transformers' `rope_type`.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }
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
    /// `None`: the default RoPE.
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm (`q_norm`, `k_norm`, weight `[head_dim]`) on each query and
    /// key head before RoPE (Qwen3).
    pub qk_norm: bool,
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
            "qwen3" | "Qwen3ForCausalLM" => Arch::Qwen3,
            other => return Err(ConfigError::Arch(other.to_string())),
        };
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ConfigError::Invalid(format!("hidden_act {act:?}: only silu is supported")));
            }
        }
        if arch == Arch::Qwen3 && raw.use_sliding_window == Some(true) {
            return Err(ConfigError::Invalid("use_sliding_window: sliding-window attention is not supported".into()));
        }
        let (rope_theta, rope_scaling) = rope(&raw)?;
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
        // Qwen3Config declares head_dim = 128; the others derive it.
        let default_head_dim = if arch == Arch::Qwen3 { 128 } else { raw.hidden_size / raw.num_attention_heads };
        let head_dim = raw.head_dim.unwrap_or(default_head_dim);
        if head_dim <= 0 || head_dim % 2 != 0 {
            return Err(ConfigError::Invalid(format!("head_dim must be positive and even, got {head_dim}")));
        }
        // Qwen2 and Qwen3 build their MLPs without bias whatever the config says.
        let (qkv_bias, o_bias, mlp_bias) = match arch {
            Arch::Qwen2 => (true, false, false),
            Arch::Qwen3 => {
                let b = raw.attention_bias.unwrap_or(false);
                (b, b, false)
            }
            Arch::Llama => {
                let b = raw.attention_bias.unwrap_or(false);
                (b, b, raw.mlp_bias)
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
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: arch == Arch::Qwen3,
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

/// Whether a `rope_scaling` / `rope_parameters` value says anything
/// (transformers treats `null` and `{}` as absent).
fn given(v: &Option<Value>) -> Option<&Value> {
    v.as_ref().filter(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty()))
}

/// `rope_theta` and the RoPE scaling, read as transformers 5 reads them:
/// `rope_scaling` (older configs) if given, else `rope_parameters`; the
/// theta from that dict, else the top-level `rope_theta`, else 10000.
fn rope(raw: &RawConfig) -> Result<(f64, Option<RopeScaling>), ConfigError> {
    let (field, params) = match (given(&raw.rope_scaling), given(&raw.rope_parameters)) {
        (Some(v), _) => ("rope_scaling", v),
        (None, Some(v)) => ("rope_parameters", v),
        (None, None) => return Ok((raw.rope_theta, None)),
    };
    let bad = |msg: String| ConfigError::Invalid(format!("{field}: {msg}"));
    let Some(p) = params.as_object() else { return Err(bad(format!("expected an object, got {params}"))) };
    if p.values().any(Value::is_object) {
        return Err(bad(format!("RoPE parameters per layer type are not supported, got {params}")));
    }
    let number = |key: &str| -> Result<Option<f64>, ConfigError> {
        match p.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(ConfigError::Invalid(format!("{field}.{key}: expected a number, got {v}"))),
            },
        }
    };
    let theta = number("rope_theta")?.unwrap_or(raw.rope_theta);
    if theta <= 0.0 {
        return Err(bad(format!("rope_theta must be positive, got {theta}")));
    }
    if let Some(f) = number("partial_rotary_factor")? {
        if f != 1.0 {
            return Err(bad(format!("partial_rotary_factor {f}: only RoPE over the whole head is supported")));
        }
    }
    let kind = p.get("rope_type").or_else(|| p.get("type"));
    let scaling = match kind.map(|k| k.as_str().ok_or(k)) {
        Some(Ok("default")) => None,
        // A dict without a type that only moves rope_theta (transformers 5).
        None if p.contains_key("rope_theta") => None,
        Some(Ok("llama3")) => {
            let required = |key: &str| {
                number(key)?.ok_or_else(|| ConfigError::Invalid(format!("{field}.{key}: required by llama3 RoPE")))
            };
            let factor = required("factor")?;
            let low_freq_factor = required("low_freq_factor")?;
            let high_freq_factor = required("high_freq_factor")?;
            // transformers falls back to max_position_embeddings.
            let original = match p.get("original_max_position_embeddings") {
                None | Some(Value::Null) => raw.max_position_embeddings,
                Some(v) => v.as_i64().ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "{field}.original_max_position_embeddings: expected an integer, got {v}"
                    ))
                })?,
            };
            for (key, v) in [("factor", factor), ("low_freq_factor", low_freq_factor)] {
                if v <= 0.0 {
                    return Err(ConfigError::Invalid(format!("{field}.{key} must be positive, got {v}")));
                }
            }
            if original <= 0 {
                return Err(ConfigError::Invalid(format!(
                    "{field}.original_max_position_embeddings must be positive, got {original}"
                )));
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            })
        }
        _ => {
            let what = kind.map_or_else(|| "no rope_type".to_string(), |k| format!("rope_type {k}"));
            return Err(bad(format!("{what}: only default and llama3 RoPE are supported, got {params}")));
        }
    };
    Ok((theta, scaling))
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

    const QWEN3: &str = r#"{"architectures":["Qwen3ForCausalLM"],"model_type":"qwen3","vocab_size":100,
        "hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"head_dim":32,"rms_norm_eps":1e-6,"tie_word_embeddings":false,
        "rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},"use_sliding_window":false,
        "sliding_window":null,"layer_types":["full_attention","full_attention"],"eos_token_id":5}"#;

    fn parse(text: &str) -> Config {
        match Config::from_json(text) {
            Ok(c) => c,
            Err(ConfigError::Arch(a)) => panic!("architecture {a}"),
            Err(ConfigError::Invalid(m)) => panic!("{m}"),
        }
    }

    fn invalid(text: &str) -> String {
        match Config::from_json(text) {
            Err(ConfigError::Invalid(m)) => m,
            Err(ConfigError::Arch(a)) => panic!("architecture {a}"),
            Ok(c) => panic!("parsed: {c:?}"),
        }
    }

    #[test]
    fn qwen3_has_qk_norm_explicit_head_dim_and_no_bias() {
        let c = parse(QWEN3);
        assert_eq!(c.arch, Arch::Qwen3);
        assert!(c.qk_norm);
        assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 32), "head_dim is not hidden / heads");
        assert_eq!((c.rope_theta, c.rope_scaling), (1e6, None));
        assert!(!c.tie_word_embeddings);
        // attention_bias covers q, k, v and o; head_dim defaults to 128 as in Qwen3Config.
        let c = parse(&QWEN3.replace(r#""head_dim":32,"#, r#""attention_bias":true,"mlp_bias":true,"#));
        assert!(c.qkv_bias && c.o_bias && !c.mlp_bias);
        assert_eq!(c.head_dim, 128);
        // Neither LLaMA nor Qwen2 norms its heads.
        assert!(!parse(QWEN).qk_norm && !parse(&QWEN.replace("qwen2", "llama")).qk_norm);
        let m = invalid(&QWEN3.replace(r#""use_sliding_window":false"#, r#""use_sliding_window":true"#));
        assert!(m.contains("use_sliding_window"), "{m}");
    }

    const LLAMA3: &str = r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"max_position_embeddings":256,ROPE}"#;

    fn llama3(rope: &str) -> String {
        LLAMA3.replace("ROPE", rope)
    }

    fn inv_freq(c: &Config) -> Vec<f32> {
        let t = crate::layers::Rope::inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, tch::Device::Cpu);
        Vec::<f32>::try_from(&t).expect("f32 values")
    }

    fn assert_close(got: &[f32], want: &[(usize, f32)]) {
        for &(i, w) in want {
            assert!((got[i] - w).abs() <= 1e-6 * w.abs(), "inv_freq[{i}] = {} , transformers {w}", got[i]);
        }
    }

    #[test]
    fn llama3_rope_parses_from_either_field_and_scales_inv_freq_as_transformers() {
        let params = r#""rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":64"#;
        let want_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        // transformers 5: everything in rope_parameters; older: rope_scaling + rope_theta.
        let new = parse(&llama3(&format!(r#""rope_parameters":{{{params},"rope_theta":10000.0}}"#)));
        let old = parse(&llama3(&format!(r#""rope_theta":10000.0,"rope_scaling":{{{params}}}"#)));
        let typed = parse(&llama3(&format!(r#""rope_scaling":{{{}}}"#, params.replace("rope_type", "type"))));
        for c in [&new, &old, &typed] {
            assert_eq!((c.rope_theta, c.rope_scaling), (10000.0, Some(want_scaling)));
        }
        // Values from transformers' _compute_llama3_parameters: index 0 has a
        // short wavelength (kept), 1 and 2 are interpolated, the rest divided by 8.
        let got = inv_freq(&new);
        assert_eq!(got.len(), 8);
        assert_close(
            &got,
            &[
                (0, 1.0),
                (1, 0.244_384_59),
                (2, 0.013_042_256),
                (3, 0.003_952_847_3),
                (4, 0.001_25),
                (7, 3.952_847_3e-5),
            ],
        );
        let unscaled = Vec::<f32>::try_from(crate::layers::Rope::inv_freq(16, 10000.0, None, tch::Device::Cpu))
            .expect("f32 values");
        assert_close(&unscaled, &[(0, 1.0), (4, 0.01)]);

        // Llama 3.1's own numbers: head_dim 128, theta 500000, original 8192.
        let c = parse(&LLAMA3.replace(r#""hidden_size":64"#, r#""hidden_size":512"#).replace(
            "ROPE",
            r#""rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,
                "high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        ));
        let got = inv_freq(&c);
        assert_eq!(got.len(), 64);
        assert_close(
            &got,
            &[
                (1, 0.814_617_2),
                (28, 0.003_211_446),
                (29, 0.002_166_570_6),
                (33, 0.000_312_693_65),
                (34, 0.000_178_507_79),
                (35, 9.556_212e-5),
                (63, 3.068_926e-7),
            ],
        );

        // original_max_position_embeddings defaults to max_position_embeddings.
        let c = parse(&llama3(
            r#""rope_scaling":{"rope_type":"llama3","factor":8,"low_freq_factor":1,"high_freq_factor":4}"#,
        ));
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { original_max_position_embeddings: 256, .. })));
        let m = invalid(&llama3(r#""rope_parameters":{"rope_type":"llama3","rope_theta":1e4,"factor":8}"#));
        assert!(m.contains("rope_parameters.low_freq_factor"), "{m}");
    }

    #[test]
    fn other_rope_types_are_rejected_naming_the_field() {
        for (field, rope) in [
            (
                "rope_scaling",
                r#""rope_scaling":{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":64}"#,
            ),
            ("rope_scaling", r#""rope_scaling":{"type":"linear","factor":2.0}"#),
            ("rope_parameters", r#""rope_parameters":{"rope_type":"dynamic","factor":2.0,"rope_theta":1e4}"#),
            ("rope_parameters", r#""rope_parameters":{"factor":2.0}"#),
        ] {
            let m = invalid(&llama3(rope));
            assert!(m.starts_with(field) && m.contains("only default and llama3"), "{m}");
        }
        let m = invalid(&llama3(r#""rope_parameters":{"rope_type":"yarn","factor":4.0,"rope_theta":1e4}"#));
        assert!(m.contains(r#"rope_type "yarn""#), "{m}");
        let m = invalid(&llama3(
            r#""rope_parameters":{"rope_type":"default","rope_theta":1e4,"partial_rotary_factor":0.5}"#,
        ));
        assert!(m.contains("partial_rotary_factor"), "{m}");
        // Default RoPE in any spelling, and null / empty dicts, parse.
        for rope in [
            r#""rope_scaling":null,"rope_theta":500000.0"#,
            r#""rope_scaling":{},"rope_parameters":{"rope_theta":500000.0}"#,
            r#""rope_parameters":{"rope_type":"default","rope_theta":500000.0}"#,
        ] {
            let c = parse(&llama3(rope));
            assert_eq!((c.rope_theta, c.rope_scaling), (500000.0, None), "{rope}");
        }
    }

    #[test]
    fn bad_head_split_is_rejected() {
        let text = QWEN.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(matches!(Config::from_json(&text), Err(ConfigError::Invalid(m)) if m.contains("num_key_value_heads")));
    }
}
