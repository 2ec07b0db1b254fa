//! `[data]`: where a stage's examples come from — one source (`task`,
//! `train`, `eval`) or several (`[[data.sources]]`, e.g. the four FewCLUE
//! tasks trained together).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{err, SpecError, TASKS};

/// TRL's dataset types (`data.format`).
pub const FORMATS: [&str; 4] = ["language_modeling", "prompt_only", "prompt_completion", "preference"];

/// Where the examples come from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// FewCLUE task (`eprstmt`, `tnews`, `ocnli`, `bustm`) of `train`/`eval`.
    #[serde(default)]
    pub task: Option<String>,
    /// Training file: FewCLUE JSON lines (sft, ppo prompts, reward with
    /// `from_multiple_choice`), preference pairs (reward), or text (pretrain).
    #[serde(default)]
    pub train: Option<PathBuf>,
    /// Held-out file of the same kind.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Several sources used together, instead of `task`/`train`/`eval`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<Source>,
    /// Reward: build preference pairs from the FewCLUE `train` file (the
    /// paper's multiple-choice construction).
    #[serde(default)]
    pub from_multiple_choice: bool,
    /// Reward, with `from_multiple_choice`: also train on the bare correct
    /// answer ≻ each bare wrong one (format 4, beyond the paper's three):
    /// what a one-token PPO response is, and what the three formats never
    /// compare. Held-out steps are then chosen on dev pairs of all four.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bare_pairs: bool,
    /// Prompt template with `{sentence}`, `{sentence1}`, `{sentence2}`, `{options}`.
    #[serde(default)]
    pub template: Option<String>,
    /// Label → answer text.
    #[serde(default)]
    pub verbalizer: Option<BTreeMap<String, String>>,
    /// Use at most this many training examples of each source (by stride).
    #[serde(default)]
    pub max_examples: Option<usize>,
    /// Use at most this many held-out examples of each source (by stride).
    #[serde(default)]
    pub max_eval_examples: Option<usize>,
    /// A file without `task` is in one of TRL's dataset formats:
    /// `language_modeling`, `prompt_only`, `prompt_completion` or
    /// `preference` (default: read from its columns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// A Jinja chat template for conversational rows, instead of the
    /// model's own (`chat_template.jinja` / `tokenizer_config.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<PathBuf>,
    /// Reward: skip pairs whose prompt + response exceeds this many tokens
    /// (long preference data on a small budget; the count is logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pair_tokens: Option<usize>,
}

/// One training file, with its task and held-out files.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub task: Option<String>,
    pub train: PathBuf,
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Reward: a test file, scored once by the final model and never used
    /// for any choice (steps, checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<PathBuf>,
}

/// The job kinds that train on preference pairs.
const PAIRED: [&str; 2] = ["reward", "dpo"];

impl DataSpec {
    /// The sources: `[[data.sources]]`, or the one of `task`/`train`/`eval`.
    pub fn sources(&self) -> Vec<Source> {
        if !self.sources.is_empty() {
            return self.sources.clone();
        }
        match &self.train {
            Some(train) => {
                vec![Source { task: self.task.clone(), train: train.clone(), eval: self.eval.clone(), test: None }]
            }
            None => Vec::new(),
        }
    }

    /// Calls `f` with each path and its field (under `at`).
    pub(super) fn visit_paths(&mut self, at: &str, f: &mut dyn FnMut(&str, &mut PathBuf)) {
        if let Some(p) = &mut self.train {
            f(&format!("{at}.train"), p);
        }
        if let Some(p) = &mut self.eval {
            f(&format!("{at}.eval"), p);
        }
        if let Some(p) = &mut self.chat_template {
            f(&format!("{at}.chat_template"), p);
        }
        for (i, s) in self.sources.iter_mut().enumerate() {
            f(&format!("{at}.sources[{i}].train"), &mut s.train);
            if let Some(p) = &mut s.eval {
                f(&format!("{at}.sources[{i}].eval"), p);
            }
            if let Some(p) = &mut s.test {
                f(&format!("{at}.sources[{i}].test"), p);
            }
        }
    }

    /// `needs_task`: every source must name a FewCLUE task (else a source
    /// without one is a file in TRL's formats). Errors name
    /// the field (`data.sources[2].task`).
    pub(super) fn validate(&self, kind: &str, needs_task: bool) -> Result<(), SpecError> {
        if !self.sources.is_empty() {
            for (field, set) in [
                ("data.task", self.task.is_some()),
                ("data.train", self.train.is_some()),
                ("data.eval", self.eval.is_some()),
            ] {
                if set {
                    return err(field, "give either data.sources or data.task/train/eval, not both");
                }
            }
            if self.sources.len() > 1 && (self.template.is_some() || self.verbalizer.is_some()) {
                return err(
                    "data.template",
                    "a template or verbalizer override applies to one task; drop it or use one source",
                );
            }
        } else if self.train.is_none() {
            return err("data.train", format!("required for a {kind} job (or data.sources)"));
        }
        if self.bare_pairs && !(self.from_multiple_choice && PAIRED.contains(&kind)) {
            return err("data.bare_pairs", "applies to reward and dpo jobs with data.from_multiple_choice = true");
        }
        if self.max_pair_tokens.is_some() && !PAIRED.contains(&kind) {
            return err("data.max_pair_tokens", format!("applies to reward and dpo jobs, not {kind}"));
        }
        if let Some(i) = self.sources.iter().position(|s| s.test.is_some()) {
            if !PAIRED.contains(&kind) {
                return err(format!("data.sources[{i}].test"), format!("applies to reward and dpo jobs, not {kind}"));
            }
        }
        if let Some(f) = &self.format {
            if !FORMATS.contains(&f.as_str()) {
                return err("data.format", format!("unknown format {f:?} (expected one of {})", FORMATS.join(", ")));
            }
            if self.sources().iter().all(|s| s.task.is_some()) {
                return err("data.format", "applies to files in TRL's formats (sources without a task)");
            }
        }
        if self.max_pair_tokens == Some(0) {
            return err("data.max_pair_tokens", "must be at least 1");
        }
        let one = self.sources.is_empty();
        for (i, s) in self.sources().iter().enumerate() {
            let at = |f: &str| if one { format!("data.{f}") } else { format!("data.sources[{i}].{f}") };
            match &s.task {
                None if needs_task => return err(at("task"), format!("required for a {kind} job")),
                Some(t) if !TASKS.contains(&t.as_str()) => {
                    return err(at("task"), format!("unknown task {t:?} (expected one of {})", TASKS.join(", ")));
                }
                _ => {}
            }
        }
        Ok(())
    }
}
