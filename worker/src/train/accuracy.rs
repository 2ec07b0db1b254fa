//! FewCLUE accuracy, two ways: `choice` (argmax of the options' answer-token
//! log-probabilities after the prompt) and `generate` (the paper's settings:
//! sample max_new_tokens with temperature 0.1 / top-p 0.9, one beam, and read
//! the answer off the text).

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::data::{Example, Template};
use crate::error::{Error, Result};
use rlhf_model::batch::left_padded;
use rlhf_model::generate::{attention_mask, positions_from_mask};
use rlhf_model::peft::PeftModel;
use rlhf_model::sampling::{row_streams, sample_rows};
use rlhf_model::{generate, GenerateOptions, Mask, Sampling, Tokenizer};

/// A task's prompts, ready to score.
pub struct TaskEval {
    pub template: Template,
    pub prompts: Vec<Vec<i64>>,
    /// Each example's id in its file.
    pub ids: Vec<i64>,
    /// Index of each example's label in `template.labels()`.
    pub gold: Vec<usize>,
    /// First token of each option's answer, in option order.
    pub answer_ids: Vec<i64>,
}

impl TaskEval {
    pub fn new(tok: &Tokenizer, template: &Template, examples: &[Example], max_len: usize) -> Result<Self> {
        let labels = template.labels();
        let mut answer_ids = Vec::new();
        for a in template.answers() {
            let ids = tok.encode(a, false)?;
            let first =
                *ids.first().ok_or_else(|| Error::InvalidArgument(format!("answer {a:?} encodes to no tokens")))?;
            if answer_ids.contains(&first) {
                return Err(Error::InvalidArgument(format!(
                    "verbalizer answers must start with distinct tokens ({a:?} does not)"
                )));
            }
            answer_ids.push(first);
        }
        let mut prompts = Vec::with_capacity(examples.len());
        let mut gold = Vec::with_capacity(examples.len());
        for ex in examples {
            let mut ids = tok.encode(&template.render(ex)?, true)?;
            if ids.len() > max_len {
                ids.drain(..ids.len() - max_len);
            }
            prompts.push(ids);
            let g = labels.iter().position(|l| *l == ex.label).ok_or_else(|| {
                Error::InvalidArgument(format!("example {}: label {:?} not in the verbalizer", ex.id, ex.label))
            })?;
            gold.push(g);
        }
        let ids = examples.iter().map(|e| e.id).collect();
        Ok(Self { template: template.clone(), prompts, ids, gold, answer_ids })
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }
}

/// Sampling settings of the `generate` mode.
#[derive(Clone, Debug)]
pub struct GenSettings {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

/// One example scored in both modes: a line of `predictions.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    pub id: i64,
    /// The prompt's ids as the model saw them (after any truncation).
    pub prompt_ids: Vec<i64>,
    /// The first token of each option's answer, in `labels()` order.
    pub option_ids: Vec<i64>,
    pub gold: String,
    /// The gold label's index in `labels()` (and in `option_ids`).
    pub gold_option: usize,
    /// The option with the highest answer-token log-prob.
    pub choice: String,
    /// Log-prob of each option's first answer token, in `labels()` order.
    pub option_logprobs: Vec<f32>,
    /// The generated text, and the label it reads as (none: no option).
    pub generated: Option<String>,
    pub generate: Option<String>,
}

impl Prediction {
    pub fn choice_correct(&self) -> bool {
        self.choice == self.gold
    }

    pub fn generate_correct(&self) -> bool {
        self.generate.as_deref() == Some(self.gold.as_str())
    }
}

/// Scores every prompt of `te`: the options' answer-token log-probs at the
/// last prompt position (`choice`), and with `generate` settings also the
/// generated answer. With `max_new_tokens = 1` (the paper's setting) one
/// forward per prompt serves both modes: the generated token is sampled
/// from the same logits, with the streams `generate` would use; longer
/// answers are generated on.
pub fn score(
    pm: &PeftModel,
    tok: &Tokenizer,
    te: &TaskEval,
    generate_with: Option<&GenSettings>,
    batch: usize,
    pad: i64,
) -> Result<Vec<Prediction>> {
    let labels = te.template.labels();
    let answers = Tensor::from_slice(&te.answer_ids).to_device(pm.base.device);
    let batch = batch.max(1);
    let mut out = Vec::with_capacity(te.len());
    tch::no_grad(|| -> Result<()> {
        for (i, start) in (0..te.len()).step_by(batch).enumerate() {
            let end = (start + batch).min(te.len());
            let chunk = &te.prompts[start..end];
            let (ids, mask) = left_padded(chunk, pad, pm.base.device);
            let t = ids.size()[1];
            let m = attention_mask(&mask, t);
            let hidden = pm.forward(&ids, &positions_from_mask(&mask), Mask::Explicit(&m), None)?;
            let logits = pm.base.logits(&hidden.select(1, t - 1), pm.hooks()).to_kind(Kind::Float);
            let options = logits.log_softmax(-1, Kind::Float).index_select(1, &answers).to_device(tch::Device::Cpu);
            let generated: Vec<Option<Vec<i64>>> = match generate_with {
                None => vec![None; chunk.len()],
                Some(s) => {
                    let sampling = Sampling {
                        temperature: s.temperature,
                        top_p: s.top_p,
                        top_k: 0,
                        seed: s.seed.wrapping_add(i as u64),
                    };
                    if s.max_new_tokens == 1 {
                        let mut rngs = row_streams(sampling.seed, &(0..chunk.len() as u64).collect::<Vec<_>>());
                        let (next, _) = sample_rows(&logits, &sampling, &mut rngs);
                        Vec::<i64>::try_from(&next.to_device(tch::Device::Cpu))?
                            .into_iter()
                            .map(|t| Some(vec![t]))
                            .collect()
                    } else {
                        let opts = GenerateOptions {
                            max_new_tokens: s.max_new_tokens,
                            sampling,
                            eos_ids: tok.eos_ids.clone(),
                            pad_id: pad,
                            steps: rlhf_model::Steps::Auto,
                        };
                        generate(&pm.base, pm.hooks(), chunk, &opts)?.tokens.into_iter().map(Some).collect()
                    }
                }
            };
            for (j, new) in generated.into_iter().enumerate() {
                let k = start + j;
                let option_logprobs: Vec<f32> = Vec::try_from(&options.get(j as i64))?;
                let best = option_logprobs
                    .iter()
                    .enumerate()
                    .fold(0, |b, (o, &lp)| if lp > option_logprobs[b] { o } else { b });
                let text = new.map(|n| tok.decode(&n, true)).transpose()?;
                out.push(Prediction {
                    id: te.ids[k],
                    prompt_ids: te.prompts[k].clone(),
                    option_ids: te.answer_ids.clone(),
                    gold: labels[te.gold[k]].to_string(),
                    gold_option: te.gold[k],
                    choice: labels[best].to_string(),
                    option_logprobs,
                    generate: text.as_deref().and_then(|x| te.template.label_for_answer(x)).map(str::to_string),
                    generated: text,
                });
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Accuracy of argmax over the options' first answer tokens.
pub fn choice_accuracy(pm: &PeftModel, tok: &Tokenizer, te: &TaskEval, batch: usize, pad: i64) -> Result<f64> {
    let preds = score(pm, tok, te, None, batch, pad)?;
    Ok(accuracy(&preds, Prediction::choice_correct))
}

/// The share of `preds` that `correct` accepts (0 for none).
pub fn accuracy(preds: &[Prediction], correct: fn(&Prediction) -> bool) -> f64 {
    if preds.is_empty() {
        return 0.0;
    }
    preds.iter().filter(|p| correct(p)).count() as f64 / preds.len() as f64
}
