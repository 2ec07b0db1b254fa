//! `reward`: base + reward adapter + a scalar head on the last token,
//! trained with −log σ(r(x, y_c) − r(x, y_r) − m). After training the head's
//! bias is shifted so the demonstrations (chosen responses) score 0 on
//! average. The head is saved beside the adapter. The loop (checkpoints,
//! resume, data parallel) is [`crate::train::supervised`].

use std::path::{Path, PathBuf};

use rlhf_common::spec::JobSpec;
use rlhf_common::Role;
use serde_json::json;
use tch::{Kind, Tensor};

use crate::data::{self, PreferencePair};
use crate::error::{Error, Result};
use crate::fields;
use crate::parallel;
use crate::train::setup::{encode_pair, load_base, task_set, Loaded};
use crate::train::stage::{Ctx, Outcome};
use crate::train::supervised::{self, Objective, Trainable};
use rlhf_model::head::{score, Head, REWARD_HEAD_FILE};
use rlhf_model::peft::{self, base_parameters, PeftConfig, PeftModel};

pub const ADAPTER: &str = Role::Reward.name();

struct Encoded {
    chosen: Vec<i64>,
    rejected: Vec<i64>,
    margin: f64,
}

fn encode(l: &Loaded, pairs: &[PreferencePair], max_len: usize) -> Result<Vec<Encoded>> {
    let eos = Some(l.eos());
    pairs
        .iter()
        .map(|p| {
            let (pc, c) = encode_pair(&l.tok, &p.prompt, &p.chosen, eos, max_len)?;
            let (pr, r) = encode_pair(&l.tok, &p.prompt, &p.rejected, eos, max_len)?;
            Ok(Encoded { chosen: [pc, c].concat(), rejected: [pr, r].concat(), margin: p.margin as f64 })
        })
        .collect()
}

/// A reward job's pairs.
struct Pairs {
    train: Vec<PreferencePair>,
    held_out: Vec<PreferencePair>,
    /// Multiple choice: bare correct ≻ bare wrong answer on the held-out
    /// files (see [`data::bare_answer_pairs`]).
    bare: Vec<PreferencePair>,
}

/// Preference pairs of every source of `data.sources` (or the one
/// `train`/`eval`), training and held-out: a source's eval file, or else
/// every 10th of its training pairs. `from_multiple_choice` builds the pairs
/// from FewCLUE files (the paper's construction); otherwise the files hold
/// pairs. Each source is cut to `max_examples`/`max_eval_examples` pairs by stride.
fn pairs_of(job: &JobSpec) -> Result<Pairs> {
    let data = job.data.clone().unwrap_or_default();
    let one = data.sources.is_empty();
    let cut = |pairs: Vec<PreferencePair>, limit: Option<usize>| match limit {
        Some(n) => data::stride_subset(&pairs, n),
        None => pairs,
    };
    let set = |i: usize, task: Option<&str>, path: &Path| {
        let field = if one { "data.task".to_string() } else { format!("data.sources[{i}].task") };
        task_set(task, &field, data.template.clone(), data.verbalizer.clone(), path, None)
    };
    let load = |i: usize, task: Option<&str>, path: &Path, limit: Option<usize>| -> Result<Vec<PreferencePair>> {
        let pairs = if data.from_multiple_choice {
            let s = set(i, task, path)?;
            data::from_multiple_choice(&s.examples, &s.template, job.seed)?
        } else {
            data::load_pairs(path)?
        };
        Ok(cut(pairs, limit))
    };
    let mut out = Pairs { train: Vec::new(), held_out: Vec::new(), bare: Vec::new() };
    for (i, src) in data.sources().iter().enumerate() {
        let all = load(i, src.task.as_deref(), &src.train, data.max_examples)?;
        match &src.eval {
            Some(p) => {
                out.train.extend(all);
                out.held_out.extend(load(i, src.task.as_deref(), p, data.max_eval_examples)?);
                if data.from_multiple_choice {
                    let s = set(i, src.task.as_deref(), p)?;
                    out.bare.extend(cut(
                        data::bare_answer_pairs(&s.examples, &s.template, job.seed)?,
                        data.max_eval_examples,
                    ));
                }
            }
            None => {
                for (k, p) in all.into_iter().enumerate() {
                    if k % 10 == 9 {
                        out.held_out.push(p)
                    } else {
                        out.train.push(p)
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Pairwise accuracy: how often the chosen response outscores the rejected one.
fn accuracy(pm: &PeftModel, head: &Head, pairs: &[Encoded], pad: i64) -> Result<f64> {
    if pairs.is_empty() {
        return Ok(f64::NAN);
    }
    let mut wins = 0usize;
    tch::no_grad(|| -> Result<()> {
        for chunk in pairs.chunks(16) {
            let seqs: Vec<Vec<i64>> =
                chunk.iter().map(|e| e.chosen.clone()).chain(chunk.iter().map(|e| e.rejected.clone())).collect();
            let r: Vec<f32> = Vec::try_from(&score(pm, head, &seqs, pad)?.to_device(tch::Device::Cpu))?;
            let n = chunk.len();
            wins += (0..n).filter(|&i| r[i] > r[n + i]).count();
        }
        Ok(())
    })?;
    Ok(wins as f64 / pairs.len() as f64)
}

/// The pairwise ranking loss −log σ(r(x, y_c) − r(x, y_r) − m) on
/// `pairs`; held-out pairwise accuracy is the metric (`accuracy`).
struct PairObjective<'a> {
    pairs: &'a [Encoded],
    held_out: &'a [Encoded],
    head: &'a Head,
    pad: i64,
}

impl Objective for PairObjective<'_> {
    fn rows(&self) -> usize {
        self.pairs.len()
    }

    fn stats(&self) -> &'static [&'static str] {
        &["loss", "train_accuracy"]
    }

    fn backward(
        &mut self,
        pm: &PeftModel,
        batch: &[usize],
        rank: usize,
        world: usize,
        accum: usize,
    ) -> Result<(Vec<f64>, usize)> {
        let tokens = batch.iter().map(|&i| self.pairs[i].chosen.len() + self.pairs[i].rejected.len()).sum();
        // This rank's pairs; their loss is a sum over the whole batch's pair count.
        let batch_pairs = batch.len() as f64;
        let chunk: Vec<&Encoded> = parallel::shard(batch, rank, world).into_iter().map(|i| &self.pairs[i]).collect();
        let seqs: Vec<Vec<i64>> =
            chunk.iter().map(|e| e.chosen.clone()).chain(chunk.iter().map(|e| e.rejected.clone())).collect();
        let r = score(pm, self.head, &seqs, self.pad)?;
        let n = chunk.len() as i64;
        let margin =
            Tensor::from_slice(&chunk.iter().map(|e| e.margin as f32).collect::<Vec<_>>()).to_device(pm.base.device);
        let diff = r.narrow(0, 0, n) - r.narrow(0, n, n) - margin;
        let (loss, acc) = if world > 1 {
            (
                -diff.log_sigmoid().sum(Kind::Float) / batch_pairs,
                diff.gt(0.0).to_kind(Kind::Float).sum(Kind::Float) / batch_pairs,
            )
        } else {
            (-diff.log_sigmoid().mean(Kind::Float), diff.gt(0.0).to_kind(Kind::Float).mean(Kind::Float))
        };
        (&loss / accum as f64).backward();
        let stats = vec![loss.double_value(&[]) / accum as f64, acc.double_value(&[]) / accum as f64];
        Ok((stats, tokens))
    }

    fn eval(&mut self, pm: &PeftModel) -> Result<Option<(&'static str, f64)>> {
        Ok(Some(("accuracy", accuracy(pm, self.head, self.held_out, self.pad)?)))
    }
}

pub fn run(job: &JobSpec, ctx: &mut Ctx<'_>) -> Result<Outcome> {
    let mut l = load_base(job, ctx.device)?;
    let Pairs { train: train_pairs, held_out: eval_pairs, bare } = pairs_of(job)?;
    let max_len = job.model.max_length;
    let data = job.data.clone().unwrap_or_default();
    let fits = |e: &Encoded| data.max_pair_tokens.is_none_or(|n| e.chosen.len().max(e.rejected.len()) <= n);
    let (train_enc, eval_enc): (Vec<Encoded>, Vec<Encoded>) = (
        encode(&l, &train_pairs, max_len)?.into_iter().filter(fits).collect(),
        encode(&l, &eval_pairs, max_len)?.into_iter().filter(fits).collect(),
    );
    let bare_enc = encode(&l, &bare, max_len)?;
    if let Some(n) = data.max_pair_tokens {
        tracing::info!(
            max_pair_tokens = n,
            train = train_enc.len(),
            of = train_pairs.len(),
            eval = eval_enc.len(),
            of_eval = eval_pairs.len(),
            "pairs within the token cap"
        );
    }
    if train_enc.is_empty() {
        return Err(Error::InvalidArgument("data.train: no preference pairs".into()));
    }
    let peft_spec = job.peft.as_ref().ok_or_else(|| Error::InvalidArgument("peft: required".into()))?;
    // A fresh adapter and head, or the reward model of `train.init_from`.
    let train = job.train.clone().unwrap_or_default();
    let (adapter, head) = match &train.init_from {
        Some(dir) => {
            let h = Head::load(&dir.join(REWARD_HEAD_FILE), l.pm.base.cfg.hidden_size, ctx.device)?;
            let head = Head { weight: h.weight.set_requires_grad(true), bias: h.bias.set_requires_grad(true) };
            (peft::io::load(dir, &l.pm.base)?, head)
        }
        None => (
            peft::build(PeftConfig::from_spec(peft_spec, job.seed), &l.pm.base)?,
            Head::new(l.pm.base.cfg.hidden_size, ctx.device, job.seed),
        ),
    };
    let trainable = adapter.num_parameters() + head.weight.numel() as i64 + 1;
    l.pm.add(ADAPTER, adapter)?;
    l.pm.set_active(Some(ADAPTER))?;
    let pad = l.pad();
    let what = Trainable {
        adapter: ADAPTER,
        extra: vec![("head.weight", head.weight.shallow_clone()), ("head.bias", head.bias.shallow_clone())],
    };
    let mut objective = PairObjective { pairs: &train_enc, held_out: &eval_enc, head: &head, pad };
    let (total, secs) = supervised::train(ctx, &l.pm, &what, &mut objective, &train, &job.checkpoint, job.seed)?;
    // Demonstrations (chosen responses) should score 0 on average.
    let offset = if !ctx.writes() {
        f64::NAN
    } else {
        tch::no_grad(|| -> Result<f64> {
            let mut sum = 0.0;
            // (at most 512 of them, by stride: long preference sets cost minutes)
            let demos = data::stride_subset(&train_enc.iter().collect::<Vec<_>>(), 512);
            for chunk in demos.chunks(16) {
                let seqs: Vec<Vec<i64>> = chunk.iter().map(|e| e.chosen.clone()).collect();
                sum += score(&l.pm, &head, &seqs, pad)?.sum(Kind::Float).double_value(&[]);
            }
            let mean = sum / demos.len() as f64;
            let _ = head.bias.shallow_clone().f_sub_(&Tensor::from(mean as f32).to_device(ctx.device))?;
            Ok(mean)
        })?
    };
    let dir: PathBuf = ctx.out.join("reward_model");
    let acc = if ctx.writes() {
        peft::io::save(l.pm.adapter(ADAPTER)?, &dir, &l.model_dir.display().to_string())?;
        head.save(&dir.join(REWARD_HEAD_FILE))?;
        accuracy(&l.pm, &head, &eval_enc, pad)?
    } else {
        f64::NAN
    };
    let mut final_metrics = fields! { "accuracy" => acc, "reward_offset" => offset, "eval_pairs" => eval_enc.len() };
    if !bare_enc.is_empty() && ctx.writes() {
        final_metrics.insert("bare_answer_accuracy".into(), json!(accuracy(&l.pm, &head, &bare_enc, pad)?));
    }
    Ok(Outcome {
        stage: job.name.clone().unwrap_or_else(|| "reward".into()),
        kind: "reward".into(),
        method: Some(peft_spec.method),
        reward_model: Some(dir),
        trainable_params: trainable,
        base_params: base_parameters(&l.pm.base),
        train_seconds: secs,
        steps: total,
        final_metrics,
        ..Outcome::default()
    })
}
