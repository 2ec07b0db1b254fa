//! The rule rewards of an RL stage (everything but the reward model, which
//! the reward role scores): `label`, `match`, `exact`, `regex`, `length`
//! and `http`, each with its weight, summed; each function's own scores are
//! kept for its metric (`reward_<kind>`).

use std::time::Duration;

use rlhf_common::spec::{RewardSource, WeightedReward};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// What a reward function may read of a prompt: the prompt as the data
/// gave it (text or messages) and the row's other columns.
#[derive(Clone, Debug, Default)]
pub struct RewardRow {
    pub prompt: Value,
    pub columns: Map<String, Value>,
}

/// One scored response: its text, its length in tokens, and whether it is
/// the FewCLUE row's correct answer (`None`: not a FewCLUE row).
pub struct Response<'a> {
    pub text: &'a str,
    pub tokens: usize,
    pub label_correct: Option<bool>,
    pub row: &'a RewardRow,
}

enum Rule {
    Label,
    Match { text: String, weight: f64 },
    Exact { column: String },
    Regex { re: regex::Regex, score: f64 },
    Length { target: usize, penalty: f64 },
    Http(Http),
}

/// Per response, the weighted sum of the rules' scores; and each rule's
/// own scores under its metric name.
pub type Scored = (Vec<f32>, Vec<(String, Vec<f32>)>);

/// The rule rewards of a stage, with their weights and metric names.
pub struct Rules {
    rules: Vec<(String, f64, Rule)>,
}

impl Rules {
    /// The rules of `fns` (the reward model, if any, is left to the reward
    /// role). `http` token files are read here.
    pub fn new(fns: &[WeightedReward]) -> Result<Self> {
        let mut rules = Vec::new();
        let count = |kind: &str| fns.iter().filter(|w| w.source.name() == kind).count();
        let mut seen: std::collections::BTreeMap<&str, usize> = Default::default();
        for w in fns {
            let kind = w.source.name();
            let k = seen.entry(kind).or_default();
            *k += 1;
            let name = if count(kind) > 1 { format!("reward_{kind}_{k}") } else { format!("reward_{kind}") };
            let rule = match &w.source {
                RewardSource::Model { .. } => continue,
                RewardSource::Label => Rule::Label,
                RewardSource::Match { text, weight } => Rule::Match { text: text.clone(), weight: *weight },
                RewardSource::Exact { column } => Rule::Exact { column: column.clone() },
                RewardSource::Regex { pattern, score } => Rule::Regex {
                    re: regex::Regex::new(pattern)
                        .map_err(|e| Error::InvalidArgument(format!("ppo.rewards: regex {pattern:?}: {e}")))?,
                    score: *score,
                },
                RewardSource::Length { target, penalty } => Rule::Length { target: *target, penalty: *penalty },
                RewardSource::Http { url, token_file, timeout_ms, retries, batch } => Rule::Http(Http::new(
                    url,
                    token_file.as_deref(),
                    Duration::from_millis(*timeout_ms),
                    *retries,
                    *batch,
                )?),
            };
            rules.push((name, w.weight, rule));
        }
        Ok(Self { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a rule needs FewCLUE labels.
    pub fn needs_labels(&self) -> bool {
        self.rules.iter().any(|(_, _, r)| matches!(r, Rule::Label))
    }

    /// The weighted sum of every rule's score per response, and each
    /// rule's own scores under its metric name.
    pub fn score(&self, responses: &[Response<'_>]) -> Result<Scored> {
        let mut total = vec![0f32; responses.len()];
        let mut parts = Vec::with_capacity(self.rules.len());
        for (name, weight, rule) in &self.rules {
            let s: Vec<f32> = match rule {
                Rule::Http(h) => h.score(responses)?,
                Rule::Label => responses
                    .iter()
                    .map(|r| {
                        r.label_correct.map(|c| f32::from(u8::from(c))).ok_or_else(|| {
                            Error::InvalidArgument("ppo.rewards: a label reward needs FewCLUE prompts".into())
                        })
                    })
                    .collect::<Result<_>>()?,
                _ => responses.iter().map(|r| local_score(rule, r)).collect::<Result<_>>()?,
            };
            for (t, v) in total.iter_mut().zip(&s) {
                *t += (*weight as f32) * v;
            }
            parts.push((name.clone(), s));
        }
        Ok((total, parts))
    }
}

fn local_score(rule: &Rule, r: &Response<'_>) -> Result<f32> {
    Ok(match rule {
        Rule::Match { text, weight } => (r.text.matches(text.as_str()).count() as f64 * weight) as f32,
        Rule::Exact { column } => {
            let gold = match r.row.columns.get(column) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "ppo.rewards: exact: the row has no {column:?} column (a string or number)"
                    )))
                }
            };
            f32::from(u8::from(final_answer(r.text).is_some_and(|a| same_answer(&a, &gold))))
        }
        Rule::Regex { re, score } => {
            if re.is_match(r.text) {
                *score as f32
            } else {
                0.0
            }
        }
        Rule::Length { target, penalty } => -((r.tokens.saturating_sub(*target)) as f64 * penalty) as f32,
        Rule::Label | Rule::Http(_) => unreachable!("scored in Rules::score"),
    })
}

/// The final answer of a completion: the text after the last `####`, else
/// the content of the last `\boxed{...}`, else the last number.
pub fn final_answer(text: &str) -> Option<String> {
    if let Some(i) = text.rfind("####") {
        let rest = text[i + 4..].trim();
        let first = rest.lines().next().unwrap_or("").trim();
        return (!first.is_empty()).then(|| first.to_string());
    }
    if let Some(i) = text.rfind("\\boxed{") {
        let body = &text[i + 7..];
        let mut depth = 1;
        for (j, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(body[..j].trim().to_string());
                    }
                }
                _ => {}
            }
        }
        return None;
    }
    static NUMBER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let number = NUMBER.get_or_init(|| regex::Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("a valid pattern"));
    number.find_iter(text).last().map(|m| m.as_str().to_string())
}

/// Equal as numbers where both parse (commas, `$`, a trailing `.` and `%`
/// ignored), else as trimmed text.
pub fn same_answer(a: &str, gold: &str) -> bool {
    let num = |s: &str| -> Option<f64> {
        let t: String = s.trim().trim_end_matches('.').chars().filter(|c| !matches!(c, ',' | '$' | '%')).collect();
        t.parse::<f64>().ok().filter(|x| x.is_finite())
    };
    match (num(a), num(gold)) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * y.abs().max(1.0),
        _ => a.trim() == gold.trim(),
    }
}

/// A user's scorer over HTTP: bounded in time (a timeout per request,
/// `retries` more tries on connection errors, 429 and 5xx) and in size (the
/// answer is read up to 64 bytes a row + 64 KiB), authenticated with a
/// bearer token when the job names a token file.
struct Http {
    url: String,
    token: Option<String>,
    agent: ureq::Agent,
    retries: u32,
    batch: usize,
}

impl Http {
    fn new(
        url: &str,
        token_file: Option<&std::path::Path>,
        timeout: Duration,
        retries: u32,
        batch: usize,
    ) -> Result<Self> {
        let token = match token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?.trim().to_string();
                if t.is_empty() || t.len() > 4096 {
                    return Err(Error::Data {
                        path: p.to_path_buf(),
                        msg: "expected a token of 1 to 4096 bytes".into(),
                    });
                }
                Some(t)
            }
            None => None,
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .new_agent();
        Ok(Self { url: url.to_string(), token, agent, retries, batch })
    }

    fn score(&self, responses: &[Response<'_>]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(responses.len());
        for chunk in responses.chunks(self.batch) {
            let rows: Vec<Value> = chunk
                .iter()
                .map(|r| {
                    let mut m = r.row.columns.clone();
                    m.insert("prompt".into(), r.row.prompt.clone());
                    m.insert("completion".into(), json!(r.text));
                    Value::Object(m)
                })
                .collect();
            let body = serde_json::to_vec(&json!({ "rows": rows })).unwrap_or_default();
            out.extend(self.post(&body, chunk.len())?);
        }
        Ok(out)
    }

    fn post(&self, body: &[u8], n: usize) -> Result<Vec<f32>> {
        let fail = |msg: String| Error::InvalidArgument(format!("http reward {}: {msg}", self.url));
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << (attempt - 1).min(4)));
            }
            let mut req = self.agent.post(&self.url).header("Content-Type", "application/json");
            if let Some(t) = &self.token {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            let mut resp = match req.send(body) {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let limit = 64 * n as u64 + 65_536;
            let text = resp.body_mut().with_config().limit(limit).read_to_vec();
            if status == 429 || status >= 500 {
                last = format!("status {status}");
                continue;
            }
            if status != 200 {
                let detail = text.ok().map(|b| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned());
                return Err(fail(format!("status {status}: {}", detail.unwrap_or_default())));
            }
            let bytes = text.map_err(|e| fail(format!("reading the answer: {e}")))?;
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| fail(format!("answer is not JSON: {e}")))?;
            let rewards = v
                .get("rewards")
                .and_then(Value::as_array)
                .ok_or_else(|| fail("answer has no \"rewards\" list".into()))?;
            if rewards.len() != n {
                return Err(fail(format!("{} rewards for {n} rows", rewards.len())));
            }
            return rewards
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    r.as_f64()
                        .filter(|x| x.is_finite())
                        .map(|x| x as f32)
                        .ok_or_else(|| fail(format!("rewards[{i}]: expected a finite number, got {r}")))
                })
                .collect();
        }
        Err(fail(format!("no answer after {} tries: {last}", self.retries + 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_answers_come_from_hashes_boxes_or_the_last_number() {
        assert_eq!(final_answer("so 3+4=7\n#### 7").as_deref(), Some("7"));
        assert_eq!(final_answer("the answer is \\boxed{\\frac{1}{2}} ok").as_deref(), Some("\\frac{1}{2}"));
        assert_eq!(final_answer("first 12, then 1,234.5 apples").as_deref(), Some("1,234.5"));
        assert_eq!(final_answer("no digits"), None);
        assert!(same_answer("1,234.50", "1234.5") && same_answer("$7.", "7") && !same_answer("8", "7"));
        assert!(same_answer(" 猫 ", "猫") && !same_answer("狗", "猫"));
    }

    fn row(answer: &str) -> RewardRow {
        let mut columns = Map::new();
        columns.insert("answer".into(), json!(answer));
        RewardRow { prompt: json!("q"), columns }
    }

    #[test]
    fn rules_are_weighted_and_kept_apart() {
        let fns: Vec<WeightedReward> = serde_json::from_value(json!([
            { "kind": "exact", "weight": 2.0 },
            { "kind": "regex", "pattern": "^\\d+$", "score": 0.5 },
            { "kind": "length", "target": 2, "penalty": 0.25 },
        ]))
        .unwrap();
        let rules = Rules::new(&fns).unwrap();
        let (a, b) = (row("7"), row("9"));
        let rs = [
            Response { text: "7", tokens: 1, label_correct: None, row: &a },
            Response { text: "it is 8", tokens: 4, label_correct: None, row: &b },
        ];
        let (total, parts) = rules.score(&rs).unwrap();
        assert_eq!(total, vec![2.0 + 0.5, -0.5]);
        let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["reward_exact", "reward_regex", "reward_length"]);
        assert_eq!(parts[0].1, vec![1.0, 0.0]);
        let e = rules.score(&[Response { text: "7", tokens: 1, label_correct: None, row: &RewardRow::default() }]);
        assert!(e.unwrap_err().to_string().contains("\"answer\""));
    }
}
