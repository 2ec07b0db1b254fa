//! The prompts an RL stage samples from: FewCLUE prompts (rendered with
//! their task's template, each with its gold label) and the `prompt`
//! column of files in TRL's formats (through the chat template, with the
//! generation prompt), each with what its reward functions may read.

use rlhf_common::spec::DataSpec;
use serde_json::{json, Map, Value};

use super::rewards::RewardRow;
use crate::data::formats::Content;
use crate::data::render::{at_row, Renderer};
use crate::error::{Error, Result};
use crate::train::rows;
use crate::train::setup::{task_sets_of, Loaded, Split, TaskSet};

pub struct PromptSet {
    /// Token ids of each prompt, cut from the left to the prompt budget.
    pub ids: Vec<Vec<i64>>,
    /// FewCLUE rows: (index in `sets`, gold label).
    pub gold: Vec<Option<(usize, String)>>,
    /// What reward functions read of each prompt.
    pub rows: Vec<RewardRow>,
    pub sets: Vec<TaskSet>,
}

impl PromptSet {
    /// The prompts of `data`'s training files, each at most `max_prompt`
    /// tokens (the start is cut).
    pub fn load(data: &DataSpec, l: &Loaded, max_prompt: usize) -> Result<Self> {
        Self::load_split(data, l, max_prompt, Split::Train)
    }

    /// The held-out prompts of the TRL-format sources (their `eval` files;
    /// FewCLUE's held-out sets are the eval stage's), `None` when there are
    /// none.
    pub fn held_out(data: &DataSpec, l: &Loaded, max_prompt: usize) -> Result<Option<Self>> {
        if rows::datasets(data, Split::Eval)?.is_empty() {
            return Ok(None);
        }
        let trl_only = DataSpec {
            sources: data.sources().into_iter().filter(|s| s.task.is_none()).collect(),
            task: None,
            train: None,
            eval: None,
            ..data.clone()
        };
        Self::load_split(&trl_only, l, max_prompt, Split::Eval).map(Some)
    }

    fn load_split(data: &DataSpec, l: &Loaded, max_prompt: usize, split: Split) -> Result<Self> {
        let cut = |mut ids: Vec<i64>| {
            if ids.len() > max_prompt {
                ids.drain(..ids.len() - max_prompt);
            }
            ids
        };
        let sets = if split == Split::Train { task_sets_of(data, split, true)? } else { Vec::new() };
        let mut out = Self { ids: Vec::new(), gold: Vec::new(), rows: Vec::new(), sets: Vec::new() };
        for (k, set) in sets.iter().enumerate() {
            for ex in &set.examples {
                let text = set.template.render(ex)?;
                out.ids.push(cut(l.tok.encode(&text, true)?));
                out.gold.push(Some((k, ex.label.clone())));
                let mut columns = Map::new();
                columns.insert("label".into(), json!(ex.label));
                columns.insert("answer".into(), json!(set.template.answer(&ex.label)?));
                out.rows.push(RewardRow { prompt: json!(text), columns });
            }
        }
        out.sets = sets;
        let datasets = rows::datasets(data, split)?;
        if !datasets.is_empty() {
            let chat = rows::chat_template(data, l)?;
            let r = Renderer::new(&l.tok, chat.as_ref())?;
            for ds in &datasets {
                for row in &ds.rows {
                    let prompt = match &row.prompt {
                        Some(Content::Text(t)) => json!(t),
                        Some(Content::Messages(m)) => Value::Array(m.clone()),
                        None => {
                            return Err(Error::Data {
                                path: ds.path.clone(),
                                msg: format!(
                                    "a {} file has no prompts: an RL stage needs a \"prompt\" column",
                                    ds.format.name()
                                ),
                            })
                        }
                    };
                    out.ids.push(cut(r.prompt_ids(row).map_err(|e| at_row(ds, row, e))?));
                    out.gold.push(None);
                    out.rows.push(RewardRow { prompt, columns: row.columns.clone() });
                }
            }
        }
        if out.ids.is_empty() {
            return Err(Error::InvalidArgument("data.train: no prompts".into()));
        }
        Ok(out)
    }

    /// Whether every prompt is a FewCLUE prompt with a label.
    pub fn all_labelled(&self) -> bool {
        self.gold.iter().all(Option::is_some)
    }

    /// Whether `text` is prompt `i`'s correct answer (`None`: no label).
    pub fn label_correct(&self, i: usize, text: &str) -> Option<bool> {
        let (k, g) = self.gold[i].as_ref()?;
        Some(self.sets[*k].template.label_for_answer(text) == Some(g.as_str()))
    }
}

/// Each rule reward's mean on the held-out prompts, the policy decoding
/// greedily (`eval_<metric>`, e.g. `eval_reward_exact`).
pub fn held_out_scores(
    pm: &rlhf_model::peft::PeftModel,
    tok: &rlhf_model::Tokenizer,
    set: &PromptSet,
    rules: &super::rewards::Rules,
    opts: &rlhf_model::GenerateOptions,
) -> Result<Map<String, Value>> {
    let mut sums: Vec<(String, f64)> = Vec::new();
    for (c, chunk) in set.ids.chunks(16).enumerate() {
        let gen = rlhf_model::generate(&pm.base, pm.hooks(), chunk, opts)?;
        let texts = gen.tokens.iter().map(|t| tok.decode(t, true)).collect::<std::result::Result<Vec<_>, _>>()?;
        let responses: Vec<super::rewards::Response<'_>> = texts
            .iter()
            .zip(&gen.tokens)
            .enumerate()
            .map(|(j, (text, ids))| {
                let i = c * 16 + j;
                super::rewards::Response { text, tokens: ids.len(), label_correct: None, row: &set.rows[i] }
            })
            .collect();
        let (_, parts) = rules.score(&responses)?;
        for (k, (name, s)) in parts.into_iter().enumerate() {
            if sums.len() <= k {
                sums.push((name, 0.0));
            }
            sums[k].1 += s.iter().map(|&x| f64::from(x)).sum::<f64>();
        }
    }
    let n = set.ids.len().max(1) as f64;
    Ok(sums.into_iter().map(|(name, sum)| (format!("eval_{name}"), json!(sum / n))).collect())
}
