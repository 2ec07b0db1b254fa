//! Where an RL stage's scalar reward comes from: `ppo.reward` (one source)
//! or `[[ppo.rewards]]` (several, each with a `weight`, summed). Errors
//! name the field (`ppo.rewards[1].pattern`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{err, SpecError};

/// One reward function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RewardSource {
    /// A reward model trained by a `reward` job (adapter + head directory).
    Model {
        #[serde(default)]
        path: Option<PathBuf>,
    },
    /// 1 when the response starts with the verbalised correct answer of the
    /// FewCLUE prompt, else 0 (a verifiable reward).
    Label,
    /// `weight` per occurrence of `text` in the response.
    Match {
        text: String,
        #[serde(default = "unit")]
        weight: f64,
    },
    /// 1 when the completion's final answer (after `####`, else inside the
    /// last `\boxed{}`, else the last number) equals the row's `column`
    /// (numerically where both parse), else 0.
    Exact {
        #[serde(default = "answer")]
        column: String,
    },
    /// `score` when the completion matches `pattern` (a Rust regex), else 0.
    Regex {
        pattern: String,
        #[serde(default = "unit")]
        score: f64,
    },
    /// `-penalty` per response token beyond `target`.
    Length {
        target: usize,
        #[serde(default = "default_length_penalty")]
        penalty: f64,
    },
    /// A user's scorer: batches of `{"rows": [{"prompt", "completion",
    /// <columns>}]}` are POSTed to `url`, which answers `{"rewards":
    /// [...]}`, one number per row.
    Http {
        url: String,
        /// A file holding the bearer token sent as `Authorization` (inside
        /// the data dir, like every path of a job).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_file: Option<PathBuf>,
        /// Per request.
        #[serde(default = "default_http_timeout")]
        timeout_ms: u64,
        /// Retries after a failed request (connection error, 5xx, 429).
        #[serde(default = "default_http_retries")]
        retries: u32,
        /// Rows per request.
        #[serde(default = "default_http_batch")]
        batch: usize,
    },
}

fn unit() -> f64 {
    1.0
}
fn answer() -> String {
    "answer".into()
}
fn default_length_penalty() -> f64 {
    0.01
}
fn default_http_timeout() -> u64 {
    10_000
}
fn default_http_retries() -> u32 {
    2
}
fn default_http_batch() -> usize {
    64
}

impl RewardSource {
    /// The name its metric goes by (`reward_<name>`).
    pub fn name(&self) -> &'static str {
        match self {
            RewardSource::Model { .. } => "model",
            RewardSource::Label => "label",
            RewardSource::Match { .. } => "match",
            RewardSource::Exact { .. } => "exact",
            RewardSource::Regex { .. } => "regex",
            RewardSource::Length { .. } => "length",
            RewardSource::Http { .. } => "http",
        }
    }

    /// Checks the values of the source at `at` (`ppo.reward`,
    /// `ppo.rewards[2]`).
    pub(super) fn validate(&self, at: &str, in_pipeline: bool) -> Result<(), SpecError> {
        match self {
            RewardSource::Model { path: None } if !in_pipeline => {
                err(format!("{at}.path"), "required for a model reward outside a pipeline")
            }
            RewardSource::Match { text, .. } if text.is_empty() => err(format!("{at}.text"), "must not be empty"),
            RewardSource::Exact { column } if column.is_empty() => err(format!("{at}.column"), "must not be empty"),
            RewardSource::Regex { pattern, score } => {
                if let Err(e) = regex::Regex::new(pattern) {
                    return err(format!("{at}.pattern"), format!("not a valid regex: {e}"));
                }
                if !score.is_finite() {
                    return err(format!("{at}.score"), "must be finite");
                }
                Ok(())
            }
            RewardSource::Length { penalty, .. } if !(penalty.is_finite() && *penalty >= 0.0) => {
                err(format!("{at}.penalty"), format!("must be finite and ≥ 0, got {penalty}"))
            }
            RewardSource::Http { url, token_file, timeout_ms, retries, batch } => {
                let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
                    (Some(r), _) => (true, r),
                    (None, Some(r)) => (false, r),
                    (None, None) => (false, ""),
                };
                let host = rest.split('/').next().unwrap_or("");
                let name = match host.strip_prefix('[') {
                    Some(v6) => v6.split(']').next().unwrap_or(""),
                    None => host.split(':').next().unwrap_or(""),
                };
                if name.is_empty() {
                    return err(
                        format!("{at}.url"),
                        format!("expected http://HOST[:PORT]/PATH or https://..., got {url:?}"),
                    );
                }
                // As the coordinator itself: beyond loopback only TLS, and
                // only with a credential.
                let loopback = matches!(name, "127.0.0.1" | "localhost" | "::1");
                let allowed = loopback || (tls && token_file.is_some());
                if !allowed {
                    return err(
                        format!("{at}.url"),
                        format!("{url:?} is not on this machine: use https:// and a token_file (a bearer token)"),
                    );
                }
                if !(1..=120_000).contains(timeout_ms) {
                    return err(format!("{at}.timeout_ms"), format!("must be in 1..=120000, got {timeout_ms}"));
                }
                if *retries > 5 {
                    return err(format!("{at}.retries"), format!("must be at most 5, got {retries}"));
                }
                if !(1..=4096).contains(batch) {
                    return err(format!("{at}.batch"), format!("must be in 1..=4096, got {batch}"));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// One of `[[ppo.rewards]]`: a reward function and its weight in the sum.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedReward {
    pub source: RewardSource,
    pub weight: f64,
}

impl Serialize for WeightedReward {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut v = serde_json::to_value(&self.source).map_err(serde::ser::Error::custom)?;
        if let Some(m) = v.as_object_mut() {
            m.retain(|_, v| !v.is_null()); // TOML has no null: an unset path stays unset
            m.insert("weight".into(), serde_json::json!(self.weight));
        }
        v.serialize(s)
    }
}

impl<'de> Deserialize<'de> for WeightedReward {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut m = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let weight = match m.remove("weight") {
            None => 1.0,
            Some(w) => w.as_f64().ok_or_else(|| serde::de::Error::custom("weight: expected a finite number"))?,
        };
        let source = RewardSource::deserialize(serde_json::Value::Object(m)).map_err(serde::de::Error::custom)?;
        Ok(Self { source, weight })
    }
}

/// The reward functions of `reward` / `rewards`, checked: exactly one of
/// the two is given, weights are finite, at most one reward model.
pub(super) fn validate(
    reward: &Option<RewardSource>,
    rewards: &[WeightedReward],
    in_pipeline: bool,
) -> Result<(), SpecError> {
    match (reward, rewards.is_empty()) {
        (Some(_), false) => return err("ppo.rewards", "give ppo.reward or [[ppo.rewards]], not both"),
        (None, true) => return err("ppo.reward", "required (or [[ppo.rewards]])"),
        (Some(r), true) => return r.validate("ppo.reward", in_pipeline),
        (None, false) => {}
    }
    let mut models = 0;
    for (i, w) in rewards.iter().enumerate() {
        let at = format!("ppo.rewards[{i}]");
        if !w.weight.is_finite() {
            return err(format!("{at}.weight"), "must be finite");
        }
        w.source.validate(&at, in_pipeline)?;
        if matches!(w.source, RewardSource::Model { .. }) {
            models += 1;
            if models > 1 {
                return err(format!("{at}.kind"), "at most one reward model per stage");
            }
        }
    }
    Ok(())
}

/// Every reward function of a stage with its weight: `reward` alone
/// weighs 1.
pub fn weighted(reward: &Option<RewardSource>, rewards: &[WeightedReward]) -> Vec<WeightedReward> {
    match reward {
        Some(r) => vec![WeightedReward { source: r.clone(), weight: 1.0 }],
        None => rewards.to_vec(),
    }
}
