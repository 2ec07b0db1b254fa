//! `reward`: base + reward adapter + a scalar head on the last token,
//! trained with −log σ(r(x, y_c) − r(x, y_r) − m). After training the head's
//! bias is shifted so the demonstrations (chosen responses) score 0 on
//! average. The head is saved beside the adapter. The loop (checkpoints,
//! resume, data parallel) is [`crate::train::supervised`].

use std::collections::{BTreeMap, HashMap};
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
    /// The multiple-choice task and pair format (see [`PreferencePair`]).
    task: Option<String>,
    format: u8,
}

fn encode(l: &Loaded, pairs: &[PreferencePair], max_len: usize) -> Result<Vec<Encoded>> {
    let eos = Some(l.eos());
    pairs
        .iter()
        .map(|p| {
            let (pc, c) = encode_pair(&l.tok, &p.prompt, &p.chosen, eos, max_len)?;
            let (pr, r) = encode_pair(&l.tok, &p.prompt, &p.rejected, eos, max_len)?;
            Ok(Encoded {
                chosen: [pc, c].concat(),
                rejected: [pr, r].concat(),
                margin: p.margin as f64,
                task: p.task.clone(),
                format: p.format,
            })
        })
        .collect()
}

/// A reward job's pairs.
#[derive(Default)]
pub struct Pairs {
    pub train: Vec<PreferencePair>,
    /// Held out: the sources' eval files (steps and checkpoints are chosen
    /// on them), or every 10th training pair.
    pub held_out: Vec<PreferencePair>,
    /// The sources' test files: scored once, by the final model, and never
    /// used for any choice.
    pub test: Vec<PreferencePair>,
    /// Multiple choice: bare correct ≻ each bare wrong answer on the
    /// held-out and test files (see [`data::bare_answer_pairs`]).
    pub bare: Vec<PreferencePair>,
    pub bare_test: Vec<PreferencePair>,
}

/// Preference pairs of every source of `data.sources` (or the one
/// `train`/`eval`). `from_multiple_choice` builds them from FewCLUE files
/// (the paper's construction, every wrong option), cut to
/// `max_examples` (train) / `max_eval_examples` (eval, test) examples per
/// source by stride; otherwise the files hold pairs, cut to that many pairs.
pub fn pairs_of(job: &JobSpec) -> Result<Pairs> {
    let data = job.data.clone().unwrap_or_default();
    let one = data.sources.is_empty();
    let set = |i: usize, task: Option<&str>, path: &Path, limit: Option<usize>| {
        let field = if one { "data.task".to_string() } else { format!("data.sources[{i}].task") };
        task_set(task, &field, data.template.clone(), data.verbalizer.clone(), path, limit)
    };
    // (pairs, bare-answer pairs) of one file.
    let load = |i: usize, task: Option<&str>, path: &Path, limit: Option<usize>| -> Result<_> {
        if data.from_multiple_choice {
            let s = set(i, task, path, limit)?;
            Ok((
                data::from_multiple_choice(&s.examples, &s.template)?,
                data::bare_answer_pairs(&s.examples, &s.template)?,
            ))
        } else {
            let pairs = data::load_pairs(path)?;
            Ok((limit.map_or_else(|| pairs.clone(), |n| data::stride_subset(&pairs, n)), Vec::new()))
        }
    };
    let mut out = Pairs::default();
    for (i, src) in data.sources().iter().enumerate() {
        let task = src.task.as_deref();
        let (all, _) = load(i, task, &src.train, data.max_examples)?;
        match &src.eval {
            Some(p) => {
                out.train.extend(all);
                let (held_out, bare) = load(i, task, p, data.max_eval_examples)?;
                out.held_out.extend(held_out);
                out.bare.extend(bare);
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
        if let Some(p) = &src.test {
            let (test, bare) = load(i, task, p, data.max_eval_examples)?;
            out.test.extend(test);
            out.bare_test.extend(bare);
        }
    }
    Ok(out)
}

/// Writes the pairs of `job` (a reward job) into `out` as JSON lines, one
/// file per non-empty set; returns {set: count}.
pub fn write_pairs(job: &JobSpec, out: &Path) -> Result<BTreeMap<String, usize>> {
    let p = pairs_of(job)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut written = BTreeMap::new();
    for (name, set) in
        [("train", &p.train), ("eval", &p.held_out), ("test", &p.test), ("bare", &p.bare), ("bare_test", &p.bare_test)]
    {
        if set.is_empty() {
            continue;
        }
        let mut text = String::new();
        for pair in set {
            text += &serde_json::to_string(pair).map_err(|e| Error::InvalidArgument(e.to_string()))?;
            text.push('\n');
        }
        let file = out.join(format!("{name}.jsonl"));
        std::fs::write(&file, text).map_err(|e| Error::io(&file, e))?;
        written.insert(name.to_string(), set.len());
    }
    Ok(written)
}

/// The rows the training draws from, as indices into `pairs`. Pairs read
/// from files: each once. Multiple-choice pairs: balanced so that each
/// format weighs the same within an example and each task the same within
/// the set. An example with k options has one format-1 pair but k − 1 of
/// formats 2 and 3; drawn as they are, "bare ≻ explained" (format 3) would
/// outweigh "explained ≻ bare" (format 1) k − 1 to 1 and a reward model
/// could fit most pairs by preferring short answers, without telling right
/// from wrong (measured on Qwen2.5-0.5B: 86% on format 3, 44% on format 1,
/// 56% on bare letters). So each format-1 pair is drawn k − 1 times, and
/// each task's rows are repeated (cyclically) up to the largest task's count.
fn balanced_rows(pairs: &[Encoded]) -> Vec<usize> {
    if pairs.iter().all(|p| p.task.is_none()) {
        return (0..pairs.len()).collect();
    }
    // Per task, in order of first appearance: its rows.
    let mut tasks: Vec<(Option<&str>, Vec<usize>)> = Vec::new();
    let mut i = 0;
    while i < pairs.len() {
        // One example's pairs: a format-1 pair and the pairs after it up to the next one.
        let end = (i + 1..pairs.len()).find(|&j| pairs[j].format <= 1).unwrap_or(pairs.len());
        let task = pairs[i].task.as_deref();
        let at = match tasks.iter().position(|(t, _)| *t == task) {
            Some(k) => k,
            None => {
                tasks.push((task, Vec::new()));
                tasks.len() - 1
            }
        };
        let rows = &mut tasks[at].1;
        let wrongs = (i + 1..end).filter(|&j| pairs[j].format == 3).count().max(1);
        if pairs[i].format == 1 {
            rows.extend(std::iter::repeat_n(i, wrongs));
            rows.extend(i + 1..end);
        } else {
            rows.extend(i..end);
        }
        i = end;
    }
    let largest = tasks.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    tasks.iter().flat_map(|(_, r)| r.iter().copied().cycle().take(largest)).collect()
}

/// Whether each pair's chosen response outscores its rejected one. Each
/// distinct sequence is scored once (a multiple-choice example's pairs
/// share most of theirs), in batches of similar lengths.
fn wins(pm: &PeftModel, head: &Head, pairs: &[Encoded], pad: i64) -> Result<Vec<bool>> {
    let mut index: HashMap<&[i64], usize> = HashMap::new();
    let mut seqs: Vec<&[i64]> = Vec::new();
    let mut ids = Vec::with_capacity(pairs.len());
    for e in pairs {
        let c = *index.entry(e.chosen.as_slice()).or_insert_with(|| {
            seqs.push(e.chosen.as_slice());
            seqs.len() - 1
        });
        let r = *index.entry(e.rejected.as_slice()).or_insert_with(|| {
            seqs.push(e.rejected.as_slice());
            seqs.len() - 1
        });
        ids.push((c, r));
    }
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let mut scores = vec![0f32; seqs.len()];
    tch::no_grad(|| -> Result<()> {
        for chunk in order.chunks(16) {
            let batch: Vec<Vec<i64>> = chunk.iter().map(|&i| seqs[i].to_vec()).collect();
            let r: Vec<f32> = Vec::try_from(&score(pm, head, &batch, pad)?.to_device(tch::Device::Cpu))?;
            for (&i, v) in chunk.iter().zip(r) {
                scores[i] = v;
            }
        }
        Ok(())
    })?;
    Ok(ids.iter().map(|&(c, r)| scores[c] > scores[r]).collect())
}

/// Pairwise accuracy: how often the chosen response outscores the rejected one.
fn accuracy(pm: &PeftModel, head: &Head, pairs: &[Encoded], pad: i64) -> Result<f64> {
    if pairs.is_empty() {
        return Ok(f64::NAN);
    }
    let w = wins(pm, head, pairs, pad)?;
    Ok(w.iter().filter(|&&x| x).count() as f64 / w.len() as f64)
}

/// `<prefix>` (all pairs), `<prefix>_<task>` per task and `<prefix>_mean`
/// (their mean), `<prefix>_format<k>` per pair format.
fn accuracies(prefix: &str, pairs: &[Encoded], wins: &[bool]) -> serde_json::Map<String, serde_json::Value> {
    let mut groups: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (e, &w) in pairs.iter().zip(wins) {
        let mut keys = vec![prefix.to_string()];
        if let Some(t) = &e.task {
            keys.push(format!("{prefix}_{t}"));
        }
        if e.format > 0 {
            keys.push(format!("{prefix}_format{}", e.format));
        }
        for k in keys {
            let g = groups.entry(k).or_default();
            g.0 += usize::from(w);
            g.1 += 1;
        }
    }
    let mut out = serde_json::Map::new();
    let mut tasks = Vec::new();
    for (k, (won, n)) in groups {
        let acc = won as f64 / n as f64;
        if k.len() > prefix.len() && !k[prefix.len()..].starts_with("_format") {
            tasks.push(acc);
        }
        out.insert(k, json!(acc));
    }
    if !tasks.is_empty() {
        out.insert(format!("{prefix}_mean"), json!(tasks.iter().sum::<f64>() / tasks.len() as f64));
    }
    out
}

/// The pairwise ranking loss −log σ(r(x, y_c) − r(x, y_r) − m) on
/// `pairs`; held-out pairwise accuracy is the metric (`accuracy`).
struct PairObjective<'a> {
    pairs: &'a [Encoded],
    /// The training rows: indices into `pairs` (see [`balanced_rows`]).
    rows: &'a [usize],
    held_out: &'a [Encoded],
    head: &'a Head,
    pad: i64,
}

impl Objective for PairObjective<'_> {
    fn rows(&self) -> usize {
        self.rows.len()
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
        let batch: Vec<usize> = batch.iter().map(|&i| self.rows[i]).collect();
        let batch = batch.as_slice();
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
    let Pairs { train: train_pairs, held_out: eval_pairs, test, bare, bare_test } = pairs_of(job)?;
    let max_len = job.model.max_length;
    let data = job.data.clone().unwrap_or_default();
    let fits = |e: &Encoded| data.max_pair_tokens.is_none_or(|n| e.chosen.len().max(e.rejected.len()) <= n);
    let (train_enc, eval_enc): (Vec<Encoded>, Vec<Encoded>) = (
        encode(&l, &train_pairs, max_len)?.into_iter().filter(fits).collect(),
        encode(&l, &eval_pairs, max_len)?.into_iter().filter(fits).collect(),
    );
    let (test_enc, bare_enc, bare_test_enc) =
        (encode(&l, &test, max_len)?, encode(&l, &bare, max_len)?, encode(&l, &bare_test, max_len)?);
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
    let rows = balanced_rows(&train_enc);
    if rows.len() != train_enc.len() {
        tracing::info!(
            pairs = train_enc.len(),
            rows = rows.len(),
            "multiple-choice pairs balanced over tasks and formats"
        );
    }
    let mut objective = PairObjective { pairs: &train_enc, rows: &rows, held_out: &eval_enc, head: &head, pad };
    let (total, secs) = supervised::train(ctx, &l.pm, &what, &mut objective, &train, &job.checkpoint, job.seed)?;
    // Demonstrations (chosen responses) should score 0 on average.
    let offset = if !ctx.writes() {
        f64::NAN
    } else {
        tch::no_grad(|| -> Result<f64> {
            let mut sum = 0.0;
            // (at most 128 of them, by stride: each costs a forward)
            let demos = data::stride_subset(&train_enc.iter().collect::<Vec<_>>(), 128);
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
    let mut final_metrics = fields! { "reward_offset" => offset, "eval_pairs" => eval_enc.len() };
    if ctx.writes() {
        peft::io::save(l.pm.adapter(ADAPTER)?, &dir, &l.model_dir.display().to_string())?;
        head.save(&dir.join(REWARD_HEAD_FILE))?;
        // The final model on every held-out set: per task and pair format.
        for (prefix, pairs) in [
            ("accuracy", &eval_enc),
            ("bare_answer_accuracy", &bare_enc),
            ("test_accuracy", &test_enc),
            ("bare_test_accuracy", &bare_test_enc),
        ] {
            if !pairs.is_empty() {
                final_metrics.extend(accuracies(prefix, pairs, &wins(&l.pm, &head, pairs, pad)?));
            }
        }
        if !test_enc.is_empty() {
            final_metrics.insert("test_pairs".into(), json!(test_enc.len()));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(task: &str, format: u8) -> Encoded {
        Encoded { chosen: vec![1], rejected: vec![2], margin: 0.0, task: Some(task.into()), format }
    }

    #[test]
    fn balanced_rows_weigh_formats_and_tasks_alike() {
        // A binary task (one example: formats 1, 2, 3) and a 3-option task
        // (one example: format 1, then 2 and 3 for each of two wrong options).
        let pairs = vec![
            pair("a", 1),
            pair("a", 2),
            pair("a", 3),
            pair("b", 1),
            pair("b", 2),
            pair("b", 3),
            pair("b", 2),
            pair("b", 3),
        ];
        let rows = balanced_rows(&pairs);
        let count = |task: &str, format: u8| {
            rows.iter().filter(|&&r| pairs[r].task.as_deref() == Some(task) && pairs[r].format == format).count()
        };
        // Task b: its format-1 pair twice, each other pair once (6 rows);
        // task a's 3 rows repeated up to 6.
        assert_eq!([count("b", 1), count("b", 2), count("b", 3)], [2, 2, 2]);
        assert_eq!([count("a", 1), count("a", 2), count("a", 3)], [2, 2, 2]);
        assert_eq!(rows.len(), 12);
        // Pairs from files are each drawn once.
        let files: Vec<Encoded> = (0..3)
            .map(|_| Encoded { chosen: vec![1], rejected: vec![2], margin: 0.0, task: None, format: 0 })
            .collect();
        assert_eq!(balanced_rows(&files), vec![0, 1, 2]);
    }
}
