//! A small LLaMA model directory made from scratch: a byte-level BPE
//! tokenizer trained on a text corpus and random weights, written so that
//! `Model::load`, `Tokenizer::load` and transformers all read it.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

use super::config::{Arch, Config};
use super::save::{write_config, write_dir, write_generation_config, write_safetensors, write_tokenizer_config};
use crate::error::{Error, Result};

/// End of text; also the padding token. Always id 0.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Beginning of sequence. Always id 1. The tokenizer does not add it by
/// itself (like GPT-2/Qwen2); prepend `bos_id` where a sequence wants it.
pub const BOS_TOKEN: &str = "<s>";

/// Special tokens plus the 256 byte tokens: the smallest possible vocabulary.
pub const MIN_VOCAB: usize = 2 + 256;

/// Standard deviation of the random weights (HF `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// Model sizes for a from-scratch base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// hidden 64, 2 layers, 4 heads (2 kv), intermediate 172, 512 positions.
    Tiny,
    /// hidden 256, 4 layers, 8 heads (4 kv), intermediate 688, 1024 positions.
    Small,
}

impl Preset {
    /// The tokenizer size asked of the BPE trainer; a small corpus yields fewer.
    pub fn default_vocab_size(self) -> usize {
        match self {
            Preset::Tiny => 2000,
            Preset::Small => 4000,
        }
    }

    /// The model config for a tokenizer of `vocab_size` tokens with the
    /// given special-token ids. Embeddings are tied to the output head.
    pub fn config(self, vocab_size: i64, bos_id: i64, eos_id: i64) -> Config {
        let (hidden, layers, heads, kv_heads, inter, max_pos) = match self {
            Preset::Tiny => (64, 2, 4, 2, 172, 512),
            Preset::Small => (256, 4, 8, 4, 688, 1024),
        };
        Config {
            arch: Arch::Llama,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: max_pos,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            bos_token_id: Some(bos_id),
            eos_token_ids: vec![eos_id],
            pad_token_id: Some(eos_id),
        }
    }
}

impl FromStr for Preset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            other => Err(Error::InvalidArgument(format!("preset {other:?}: expected tiny or small"))),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
        })
    }
}

/// Trains a byte-level BPE on the UTF-8 text file `corpus` and saves it as
/// `out` (a `tokenizer.json`).
///
/// Every byte is a token, so any text encodes and decodes back exactly; no
/// normalizer, no prefix space. `<|endoftext|>` is id 0 and `<s>` id 1.
/// Pairs seen fewer than twice are not merged, so a small corpus gives a
/// vocabulary below `vocab_size`.
pub fn train_tokenizer(corpus: &Path, vocab_size: usize, out: &Path) -> Result<()> {
    if vocab_size < MIN_VOCAB {
        return Err(Error::InvalidArgument(format!(
            "vocab_size {vocab_size}: must be at least {MIN_VOCAB} (256 bytes + 2 special tokens)"
        )));
    }
    let text = read_corpus(corpus)?;
    let bad = |e: tokenizers::Error| Error::Tokenizer { path: corpus.to_path_buf(), msg: e.to_string() };
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true), AddedToken::from(BOS_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tok = TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level))
        .build()
        .map_err(bad)?;
    tok.train(&mut trainer, text.split_inclusive('\n')).map_err(bad)?;
    for (token, id) in [(EOS_TOKEN, 0), (BOS_TOKEN, 1)] {
        if tok.token_to_id(token) != Some(id) {
            return Err(Error::Tokenizer { path: out.to_path_buf(), msg: format!("{token} did not get id {id}") });
        }
    }
    let json = tok.to_string(false).map_err(|e| Error::Tokenizer { path: out.to_path_buf(), msg: e.to_string() })?;
    super::save::write_atomic(out, json.as_bytes())
}

/// Makes the model directory `out` for `preset` from `corpus`: tokenizer,
/// random weights (seeded by `seed`), configs. See [`init_model_with_vocab`].
pub fn init_model(preset: Preset, corpus: &Path, out: &Path, seed: u64) -> Result<()> {
    init_model_with_vocab(preset, preset.default_vocab_size(), corpus, out, seed)
}

/// [`init_model`] with an explicit tokenizer size (the model's vocabulary is
/// whatever the trained tokenizer ends up with, at most `vocab_size`).
///
/// A new `out` appears whole or not at all; an existing one is overwritten
/// file by file, `config.json` last.
pub fn init_model_with_vocab(preset: Preset, vocab_size: usize, corpus: &Path, out: &Path, seed: u64) -> Result<()> {
    write_dir(out, |dir| {
        let tok_path = dir.join("tokenizer.json");
        train_tokenizer(corpus, vocab_size, &tok_path)?;
        let tok = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer { path: tok_path.clone(), msg: e.to_string() })?;
        let vocab = tok.get_vocab_size(true) as i64;
        let cfg = preset.config(vocab, 1, 0);
        write_safetensors(&random_weights(&cfg, seed)?, &dir.join("model.safetensors"))?;
        write_tokenizer_config(&cfg, &tok_path, &dir.join("tokenizer_config.json"))?;
        write_generation_config(&cfg, &dir.join("generation_config.json"))?;
        write_config(&cfg, &dir.join("config.json"))
    })
}

/// Random f32 weights for `cfg` under their HF names: every matrix (and
/// bias) normal with std [`INIT_STD`], every norm weight 1.
///
/// Drawn from a ChaCha8 stream seeded by `seed`, not torch's global
/// generator, so the result depends on nothing but `cfg` and `seed` (other
/// threads drawing random numbers cannot perturb it).
pub fn random_weights(cfg: &Config, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cpu = (Kind::Float, tch::Device::Cpu);
    layout(cfg)
        .into_iter()
        .map(|(name, shape, fill)| {
            let t = match fill {
                Fill::Normal => normal(&mut rng, &shape)?,
                Fill::Ones => Tensor::f_ones(shape.as_slice(), cpu)?,
                Fill::Zeros => Tensor::f_zeros(shape.as_slice(), cpu)?,
            };
            Ok((name, t))
        })
        .collect()
}

/// How a freshly made weight is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// normal(0, [`INIT_STD`]): matrices and embeddings
    Normal,
    /// norm weights
    Ones,
    /// biases
    Zeros,
}

/// Every weight of a LLaMA-family model of shape `cfg`: HF name, shape and
/// fill, in a fixed order (so seeded draws are reproducible).
pub fn layout(cfg: &Config) -> Vec<(String, Vec<i64>, Fill)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q_dim = cfg.num_heads * cfg.head_dim;
    let kv_dim = cfg.num_kv_heads * cfg.head_dim;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h], Fill::Normal)];
    for li in 0..cfg.num_layers {
        let p = format!("model.layers.{li}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h], Fill::Ones));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h], Fill::Ones));
        let linears = [
            ("self_attn.q_proj", h, q_dim, cfg.qkv_bias),
            ("self_attn.k_proj", h, kv_dim, cfg.qkv_bias),
            ("self_attn.v_proj", h, kv_dim, cfg.qkv_bias),
            ("self_attn.o_proj", q_dim, h, cfg.o_bias),
            ("mlp.gate_proj", h, i, cfg.mlp_bias),
            ("mlp.up_proj", h, i, cfg.mlp_bias),
            ("mlp.down_proj", i, h, cfg.mlp_bias),
        ];
        for (name, in_dim, out_dim, bias) in linears {
            out.push((format!("{p}.{name}.weight"), vec![out_dim, in_dim], Fill::Normal));
            if bias {
                out.push((format!("{p}.{name}.bias"), vec![out_dim], Fill::Zeros));
            }
        }
        if cfg.qk_norm {
            for name in ["self_attn.q_norm", "self_attn.k_norm"] {
                out.push((format!("{p}.{name}.weight"), vec![cfg.head_dim], Fill::Ones));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h], Fill::Ones));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h], Fill::Normal));
    }
    out
}

/// A CPU f32 tensor of normal(0, INIT_STD) draws (Box–Muller).
fn normal(rng: &mut ChaCha8Rng, shape: &[i64]) -> Result<Tensor> {
    let n = shape.iter().product::<i64>() as usize;
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * INIT_STD;
        let theta = std::f64::consts::TAU * u2;
        v.push((r * theta.cos()) as f32);
        v.push((r * theta.sin()) as f32);
    }
    v.truncate(n);
    Ok(Tensor::f_from_slice(&v)?.f_reshape(shape)?)
}

fn read_corpus(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        msg: format!("corpus is not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
    })?;
    if text.trim().is_empty() {
        return Err(Error::Data { path: path.to_path_buf(), msg: "corpus is empty".into() });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parses_and_prints() {
        for p in [Preset::Tiny, Preset::Small] {
            assert_eq!(p.to_string().parse::<Preset>().ok(), Some(p));
        }
        assert!("huge".parse::<Preset>().is_err());
    }

    #[test]
    fn random_weights_are_seeded_and_scaled() {
        let cfg = Preset::Tiny.config(300, 1, 0);
        let a = random_weights(&cfg, 7).expect("weights");
        let b = random_weights(&cfg, 7).expect("weights");
        let c = random_weights(&cfg, 8).expect("weights");
        assert_eq!(a.len(), 1 + 2 * 9 + 1, "embed + 9 per layer + norm, tied head");
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{na} differs for the same seed");
        }
        assert!(!a[0].1.equal(&c[0].1));
        let std = a[0].1.std(true).double_value(&[]);
        assert!((std - INIT_STD).abs() < 0.002, "std {std}");
        let mean = a[0].1.mean(Kind::Float).double_value(&[]);
        assert!(mean.abs() < 0.002, "mean {mean}");
    }

    #[test]
    fn too_small_vocab_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = dir.path().join("c.txt");
        std::fs::write(&corpus, "你好\n").expect("write");
        let err = train_tokenizer(&corpus, 100, &dir.path().join("t.json")).expect_err("must fail");
        assert!(err.to_string().contains("vocab_size"), "{err}");
    }

    #[test]
    fn non_utf8_corpus_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = dir.path().join("bad.txt");
        std::fs::write(&corpus, b"ok\n\xff\xfe\n").expect("write");
        let err = train_tokenizer(&corpus, 500, &dir.path().join("t.json")).expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("bad.txt") && msg.contains("UTF-8"), "{msg}");
    }
}
