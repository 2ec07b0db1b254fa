//! FewCLUE accuracy, two ways: `choice` (argmax of the options' answer-token
//! log-probabilities after the prompt) and `generate` (the paper's settings:
//! sample max_new_tokens with temperature 0.1 / top-p 0.9, one beam, and read
//! the answer off the text).

use tch::Tensor;

use crate::data::{Example, Template};
use crate::error::{Error, Result};
use crate::model::generate::{attention_mask, left_pad, positions_from_mask};
use crate::model::{generate, GenerateOptions, Mask, Sampling, Tokenizer};
use crate::peft::PeftModel;

/// A task's prompts, ready to score.
pub struct TaskEval {
    pub template: Template,
    pub prompts: Vec<Vec<i64>>,
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
            let first = *ids.first().ok_or_else(|| Error::InvalidArgument(format!("answer {a:?} encodes to no tokens")))?;
            if answer_ids.contains(&first) {
                return Err(Error::InvalidArgument(format!("verbalizer answers must start with distinct tokens ({a:?} does not)")));
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
            let g = labels
                .iter()
                .position(|l| *l == ex.label)
                .ok_or_else(|| Error::InvalidArgument(format!("example {}: label {:?} not in the verbalizer", ex.id, ex.label)))?;
            gold.push(g);
        }
        Ok(Self { template: template.clone(), prompts, gold, answer_ids })
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }
}

/// Accuracy of argmax over the options' first answer tokens.
pub fn choice_accuracy(pm: &PeftModel, te: &TaskEval, batch: usize, pad: i64) -> Result<f64> {
    if te.is_empty() {
        return Ok(0.0);
    }
    let answers = Tensor::from_slice(&te.answer_ids).to_device(pm.base.device);
    let mut correct = 0usize;
    tch::no_grad(|| -> Result<()> {
        for (chunk, gold) in te.prompts.chunks(batch.max(1)).zip(te.gold.chunks(batch.max(1))) {
            let (ids, mask) = left_pad(chunk, pad, pm.base.device);
            let t = ids.size()[1];
            let m = attention_mask(&mask, t);
            let hidden = pm.forward(&ids, &positions_from_mask(&mask), Mask::Explicit(&m), None)?;
            let logits = pm.base.logits(&hidden.select(1, t - 1), pm.hooks());
            let pick: Vec<i64> = Vec::try_from(&logits.index_select(1, &answers).argmax(-1, false).to_device(tch::Device::Cpu))?;
            correct += pick.iter().zip(gold).filter(|(p, g)| **p as usize == **g).count();
        }
        Ok(())
    })?;
    Ok(correct as f64 / te.len() as f64)
}

/// Sampling settings of the `generate` mode.
#[derive(Clone, Debug)]
pub struct GenSettings {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

/// Accuracy of generated answers read through the verbalizer.
pub fn generate_accuracy(pm: &PeftModel, tok: &Tokenizer, te: &TaskEval, s: &GenSettings, batch: usize) -> Result<f64> {
    if te.is_empty() {
        return Ok(0.0);
    }
    let labels = te.template.labels();
    let mut correct = 0usize;
    for (i, (chunk, gold)) in te.prompts.chunks(batch.max(1)).zip(te.gold.chunks(batch.max(1))).enumerate() {
        let opts = GenerateOptions {
            max_new_tokens: s.max_new_tokens,
            sampling: Sampling { temperature: s.temperature, top_p: s.top_p, top_k: 0, seed: s.seed.wrapping_add(i as u64) },
            eos_ids: tok.eos_ids.clone(),
            pad_id: tok.pad_id.or(tok.eos_ids.first().copied()).unwrap_or(0),
        };
        let out = generate(&pm.base, pm.hooks(), chunk, &opts)?;
        for (new, g) in out.tokens.iter().zip(gold) {
            let text = tok.decode(new, true)?;
            if te.template.label_for_answer(&text) == Some(labels[*g]) {
                correct += 1;
            }
        }
    }
    Ok(correct as f64 / te.len() as f64)
}

