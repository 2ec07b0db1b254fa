//! `tokenizer.json` through the `tokenizers` crate, with the special token
//! ids gathered from `config.json`, `generation_config.json` and
//! `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer as HfTokenizer;

use super::config::{Config, TokenIds};
use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: HfTokenizer,
    path: PathBuf,
    pub bos_id: Option<i64>,
    pub eos_ids: Vec<i64>,
    pub pad_id: Option<i64>,
}

impl Tokenizer {
    pub fn load(dir: &Path, cfg: &Config) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner =
            HfTokenizer::from_file(&path).map_err(|e| Error::Tokenizer { path: path.clone(), msg: e.to_string() })?;
        let mut eos_ids = cfg.eos_token_ids.clone();
        let mut bos_id = cfg.bos_token_id;
        let mut pad_id = cfg.pad_token_id;
        if let Some(gen) = read_json(&dir.join("generation_config.json")) {
            let ids = |k: &str| gen.get(k).cloned().and_then(|v| serde_json::from_value::<TokenIds>(v).ok());
            if let Some(ids) = ids("eos_token_id") {
                for id in ids.to_vec() {
                    if !eos_ids.contains(&id) {
                        eos_ids.push(id);
                    }
                }
            }
            bos_id = bos_id.or_else(|| ids("bos_token_id").and_then(|i| i.to_vec().first().copied()));
            pad_id = pad_id.or_else(|| ids("pad_token_id").and_then(|i| i.to_vec().first().copied()));
        }
        if let Some(tc) = read_json(&dir.join("tokenizer_config.json")) {
            let id_of = |k: &str| {
                let v = tc.get(k)?;
                let s = v.as_str().or_else(|| v.get("content").and_then(Value::as_str))?;
                inner.token_to_id(s).map(i64::from)
            };
            if let Some(id) = id_of("eos_token") {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
            bos_id = bos_id.or_else(|| id_of("bos_token"));
            pad_id = pad_id.or_else(|| id_of("pad_token"));
        }
        Ok(Self { inner, path, bos_id, eos_ids, pad_id })
    }

    /// Token ids of `text`, with the tokenizer's own special-token rules.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Token ids of `text` with each token's byte range in `text` (added
    /// and special tokens included), for masks built from text spans.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<Vec<(i64, (usize, usize))>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().iter().zip(enc.get_offsets()).map(|(&i, &o)| (i64::from(i), o)).collect())
    }

    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner
            .decode(&ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), msg: e.to_string() })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}
