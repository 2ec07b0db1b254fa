//! A stage's files in TRL's formats (the sources of `data` without a
//! FewCLUE task): read and checked whole before training, rendered through
//! the job's chat template, cut to `max_length`.

use rlhf_common::spec::DataSpec;
use rlhf_model::peft::PeftModel;
use rlhf_model::ChatTemplate;
use tch::Kind;

use crate::data::formats::{self, Dataset, Format};
use crate::data::render::{self, Renderer};
use crate::data::stride_subset;
use crate::error::{Error, Result};
use crate::train::lm::Sample;
use crate::train::setup::{Loaded, Split};
use rlhf_model::batch::right_padded;

/// The TRL-format files of `data` for `split`, each cut to
/// `max_examples` / `max_eval_examples` rows by stride.
pub fn datasets(data: &DataSpec, split: Split) -> Result<Vec<Dataset>> {
    let format = match &data.format {
        Some(f) => Some(Format::parse(f).ok_or_else(|| Error::InvalidArgument(format!("data.format: unknown {f:?}")))?),
        None => None,
    };
    let mut out = Vec::new();
    for src in data.sources().iter().filter(|s| s.task.is_none()) {
        let (path, limit) = match split {
            Split::Train => (Some(&src.train), data.max_examples),
            Split::Eval => (src.eval.as_ref(), data.max_eval_examples),
        };
        if let Some(path) = path {
            let mut ds = formats::load(path, format)?;
            if let Some(n) = limit {
                ds.rows = stride_subset(&ds.rows, n);
            }
            out.push(ds);
        }
    }
    Ok(out)
}

/// The job's chat template: `data.chat_template`, else the model's own.
pub fn chat_template(data: &DataSpec, l: &Loaded) -> Result<Option<ChatTemplate>> {
    render::chat_template(&l.model_dir, data.chat_template.as_deref())
}

/// SFT samples of `sets`: each row's ids with the loss on its completion
/// or assistant turns, cut to `max_len` tokens. A row with nothing to train
/// (prompt-only, preference) is an error naming it; rows whose trained
/// tokens all fall past `max_len` are dropped and counted.
pub fn sft_samples(sets: &[Dataset], r: &Renderer<'_>, max_len: usize) -> Result<(Vec<Sample>, usize)> {
    let mut samples = Vec::new();
    let mut dropped = 0;
    for ds in sets {
        if matches!(ds.format, Format::PromptOnly | Format::Preference) {
            return Err(Error::Data {
                path: ds.path.clone(),
                msg: format!(
                    "a {} file has nothing for sft to learn (it needs text, messages or prompt + completion)",
                    ds.format.name()
                ),
            });
        }
        for mut e in render::sequences(ds, r)? {
            e.truncate(max_len);
            if e.trained() == 0 {
                dropped += 1;
                continue;
            }
            samples.push(Sample { ids: e.ids, targets: e.loss_mask.into_iter().map(i64::from).collect() });
        }
    }
    if dropped > 0 {
        tracing::warn!(dropped, max_len, "rows with no trained token within model.max_length were left out");
    }
    Ok((samples, dropped))
}

/// Mean next-token accuracy on the trained tokens of `samples` (TRL's
/// `mean_token_accuracy`), in batches of `batch`.
pub fn token_accuracy(pm: &PeftModel, samples: &[Sample], pad: i64, batch: usize) -> Result<f64> {
    let (mut right, mut total) = (0i64, 0i64);
    for chunk in samples.chunks(batch.max(1)) {
        let ids: Vec<Vec<i64>> = chunk.iter().map(|s| s.ids.clone()).collect();
        let tg: Vec<Vec<i64>> = chunk.iter().map(|s| s.targets.clone()).collect();
        let device = pm.base.device;
        let (ids, _) = right_padded(&ids, pad, device);
        let (tg, _) = right_padded(&tg, 0, device);
        let t = ids.size()[1];
        let logits = tch::no_grad(|| pm.logits(&ids))?;
        let pred = logits.narrow(1, 0, t - 1).argmax(-1, false);
        let next = ids.narrow(1, 1, t - 1);
        let mask = tg.narrow(1, 1, t - 1).to_kind(Kind::Bool);
        right += pred.eq_tensor(&next).logical_and(&mask).sum(Kind::Int64).int64_value(&[]);
        total += mask.sum(Kind::Int64).int64_value(&[]);
    }
    if total == 0 {
        return Ok(f64::NAN);
    }
    Ok(right as f64 / total as f64)
}
