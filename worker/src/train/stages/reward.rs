//! `reward`: base + reward adapter + a scalar head on the last token,
//! trained with −log σ(r(x, y_c) − r(x, y_r) − m). After training the head's
//! bias is shifted so the demonstrations (chosen responses) score 0 on
//! average. The head is saved beside the adapter. The loop (checkpoints,
//! resume, data parallel) is [`crate::train::supervised`].

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use rlhf_common::spec::JobSpec;
use rlhf_common::Role;
use serde_json::json;
use tch::{Kind, Tensor};

use crate::data::formats::{self, Dataset, Format};
use crate::data::{self, render, PreferencePair};
use crate::error::{Error, Result};
use crate::fields;
use crate::parallel;
use crate::train::ppo::rollout::Batch;
use crate::train::setup::{encode_pair, load_base, task_set, Loaded};
use crate::train::stage::{Ctx, Outcome};
use crate::train::supervised::{self, Objective, Trainable};
use rlhf_model::head::{summed_logprobs, Head, REWARD_HEAD_FILE};
use rlhf_model::peft::{self, base_parameters, PeftConfig, PeftModel};

pub const ADAPTER: &str = Role::Reward.name();

/// A preference pair as token ids (prompt + response per side).
pub(crate) struct Encoded {
    pub chosen: Vec<i64>,
    pub rejected: Vec<i64>,
    /// Where each side's response begins.
    pub chosen_start: usize,
    pub rejected_start: usize,
    pub margin: f64,
    /// The multiple-choice task and pair format (see [`PreferencePair`]).
    pub task: Option<String>,
    pub format: u8,
}

pub(crate) fn encode(l: &Loaded, pairs: &[PreferencePair], max_len: usize) -> Result<Vec<Encoded>> {
    pairs.iter().enumerate().map(|(i, p)| encode_one(l, p, max_len).map_err(|e| too_long(i, e))).collect()
}

/// [`encode`] with `data.max_pair_tokens`: a pair whose longer side
/// (prompt and response) has more than `cap` tokens, or whose response
/// alone exceeds `max_len`, is skipped rather than an error.
pub(crate) fn encode_within(
    l: &Loaded,
    pairs: &[PreferencePair],
    max_len: usize,
    cap: Option<usize>,
) -> Result<Vec<Encoded>> {
    let Some(cap) = cap else { return encode(l, pairs, max_len) };
    Ok(pairs
        .iter()
        .filter_map(|p| encode_one(l, p, max_len).ok())
        .filter(|e| e.chosen.len().max(e.rejected.len()) <= cap)
        .collect())
}

fn too_long(i: usize, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!(
            "preference pair {} (in file order): {m} (model.max_length): raise model.max_length, or set \
             data.max_pair_tokens to skip longer pairs",
            i + 1
        )),
        other => other,
    }
}

fn encode_one(l: &Loaded, p: &PreferencePair, max_len: usize) -> Result<Encoded> {
    let side = |response: &str| {
        if p.templated {
            // Rendered by the chat template: its special tokens are
            // in the text and each turn ends as the template ends it.
            let prompt = l.tok.encode(&p.prompt, false)?;
            data::truncate_prompt(&prompt, &l.tok.encode(response, false)?, max_len)
        } else {
            encode_pair(&l.tok, &p.prompt, response, Some(l.eos()), max_len)
        }
    };
    let (pc, c) = side(&p.chosen)?;
    let (pr, r) = side(&p.rejected)?;
    Ok(Encoded {
        chosen_start: pc.len(),
        rejected_start: pr.len(),
        chosen: [pc, c].concat(),
        rejected: [pr, r].concat(),
        margin: p.margin as f64,
        task: p.task.clone(),
        format: p.format,
    })
}

/// A preference file in TRL's conversational or implicit-prompt form
/// (read whole and checked), or `None` for the forms [`data::load_pairs`]
/// reads (explicit string prompts, ShareGPT `conversations`).
fn trl_preference(path: &Path) -> Result<Option<Dataset>> {
    let records = data::read_records(path)?;
    let trl = records.first().and_then(|(_, v)| v.as_object()).is_some_and(|o| {
        !o.contains_key("conversations") && (!o.contains_key("prompt") || o.get("chosen").is_some_and(|c| c.is_array()))
    });
    if !trl {
        return Ok(None);
    }
    formats::from_values(path, records, Some(Format::Preference)).map(Some)
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
    let model_dir = job.model.path.clone().unwrap_or_default();
    let one = data.sources.is_empty();
    let set = |i: usize, task: Option<&str>, path: &Path, limit: Option<usize>| {
        let field = if one { "data.task".to_string() } else { format!("data.sources[{i}].task") };
        task_set(task, &field, data.template.clone(), data.verbalizer.clone(), path, limit)
    };
    // (pairs, bare-answer pairs) of one file.
    // `train`: the file trains (bare-answer pairs join its pairs with
    // `data.bare_pairs`; held-out and test sets keep the paper's three formats
    // and measure bare answers apart).
    let load = |i: usize, task: Option<&str>, path: &Path, limit: Option<usize>, train: bool| -> Result<_> {
        if data.from_multiple_choice {
            let s = set(i, task, path, limit)?;
            Ok((
                data::from_multiple_choice(&s.examples, &s.template, data.bare_pairs && train)?,
                data::bare_answer_pairs(&s.examples, &s.template)?,
            ))
        } else {
            let pairs = match trl_preference(path)? {
                Some(ds) => {
                    let cfg = rlhf_model::Config::from_dir(&model_dir)?;
                    let tok = rlhf_model::Tokenizer::load(&model_dir, &cfg)?;
                    let chat = render::chat_template(&model_dir, data.chat_template.as_deref())?;
                    render::preference_pairs(&ds, &render::Renderer::new(&tok, chat.as_ref())?)?
                }
                None => data::load_pairs(path)?,
            };
            Ok((limit.map_or_else(|| pairs.clone(), |n| data::stride_subset(&pairs, n)), Vec::new()))
        }
    };
    let mut out = Pairs::default();
    for (i, src) in data.sources().iter().enumerate() {
        let task = src.task.as_deref();
        let (all, _) = load(i, task, &src.train, data.max_examples, true)?;
        match &src.eval {
            Some(p) => {
                out.train.extend(all);
                let (held_out, bare) = load(i, task, p, data.max_eval_examples, false)?;
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
            let (test, bare) = load(i, task, p, data.max_eval_examples, false)?;
            out.test.extend(test);
            out.bare_test.extend(bare);
        }
    }
    Ok(out)
}

/// Writes the pairs of `job` (a reward job) into `out` as JSON lines, one
/// file per non-empty set (train.jsonl: the rows training draws from, see
/// [`balanced_rows`]); returns {set: count}.
pub fn write_pairs(job: &JobSpec, out: &Path) -> Result<BTreeMap<String, usize>> {
    let mut p = pairs_of(job)?;
    let rows = balanced_rows(&p.train.iter().map(|e| (e.task.as_deref(), e.format)).collect::<Vec<_>>());
    p.train = rows.iter().map(|&i| p.train[i].clone()).collect();
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

/// The examples of a pair set, each with its task and its pairs' range:
/// a multiple-choice example is its format-1 pair and the format-2/3 pairs
/// after it; a pair read from a file is an example of its own.
fn examples<'a>(tags: &[(Option<&'a str>, u8)]) -> Vec<(Option<&'a str>, Range<usize>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < tags.len() {
        let end = (i + 1..tags.len()).find(|&j| tags[j].1 <= 1).unwrap_or(tags.len());
        out.push((tags[i].0, i..end));
        i = end;
    }
    out
}

/// The examples training draws from, as indices into [`examples`]: each
/// task's repeated (cyclically) up to the largest task's count, so that
/// every task weighs the same (TNEWS has 7× the others' training examples).
fn balanced_examples(examples: &[(Option<&str>, Range<usize>)]) -> Vec<usize> {
    let mut tasks: Vec<(Option<&str>, Vec<usize>)> = Vec::new();
    for (k, (task, _)) in examples.iter().enumerate() {
        match tasks.iter_mut().find(|(t, _)| t == task) {
            Some((_, v)) => v.push(k),
            None => tasks.push((*task, vec![k])),
        }
    }
    let largest = tasks.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    tasks.iter().flat_map(|(_, r)| r.iter().copied().cycle().take(largest)).collect()
}

/// Each pair's weight within its example, summing to 1 per example: the
/// paper's three formats (and format 4, bare ≻ bare, with `data.bare_pairs`)
/// weigh the same. An example with k options has one
/// format-1 pair ("explained ≻ bare") but k − 1 each of formats 2 and 3
/// ("bare ≻ explained wrong"); counted as they come, format 3 outweighs
/// format 1 k − 1 to 1 and a reward model fits most pairs by preferring
/// short answers without telling right from wrong (measured on
/// Qwen2.5-0.5B: 86% on format 3, 44% on format 1, 56% on bare letters).
fn pair_weights(tags: &[(Option<&str>, u8)], examples: &[(Option<&str>, Range<usize>)]) -> Vec<f32> {
    let mut w = vec![1f32; tags.len()];
    for (_, r) in examples {
        let wrongs = r.clone().filter(|&j| tags[j].1 == 3).count().max(1) as f32;
        for j in r.clone() {
            w[j] = if tags[j].1 == 1 { wrongs } else { 1.0 };
        }
        let total: f32 = r.clone().map(|j| w[j]).sum();
        for j in r.clone() {
            w[j] /= total;
        }
    }
    w
}

/// The pairs as training weighs them, one row per draw (for another
/// trainer that draws pairs uniformly, as `rlhf-worker pairs` writes them):
/// the balanced examples in order, each format-1 pair k − 1 times and every
/// other pair once.
pub(crate) fn balanced_rows(tags: &[(Option<&str>, u8)]) -> Vec<usize> {
    let ex = examples(tags);
    let mut rows = Vec::new();
    for k in balanced_examples(&ex) {
        let r = ex[k].1.clone();
        let wrongs = r.clone().filter(|&j| tags[j].1 == 3).count().max(1);
        for j in r {
            let times = if tags[j].1 == 1 { wrongs } else { 1 };
            rows.extend(std::iter::repeat_n(j, times));
        }
    }
    rows
}

/// A sequence and where its response begins.
type Seq<'a> = (&'a [i64], usize);

/// The distinct sequences of `pairs`, and each pair's (chosen, rejected)
/// indices into them.
fn distinct(pairs: &[Encoded]) -> (Vec<Seq<'_>>, Vec<(usize, usize)>) {
    let mut index: HashMap<Seq<'_>, usize> = HashMap::new();
    let mut seqs: Vec<Seq<'_>> = Vec::new();
    let mut ids = Vec::with_capacity(pairs.len());
    for e in pairs {
        let mut at = [0; 2];
        for (k, s) in
            [(e.chosen.as_slice(), e.chosen_start), (e.rejected.as_slice(), e.rejected_start)].into_iter().enumerate()
        {
            at[k] = *index.entry(s).or_insert_with(|| {
                seqs.push(s);
                seqs.len() - 1
            });
        }
        ids.push((at[0], at[1]));
    }
    (seqs, ids)
}

/// Scores of `seqs` (each with where its response begins), as
/// [`rlhf_model::head::score`] gives them, with a graph. Sequences with the
/// same prompt (a multiple-choice example's, all of them) share its forward:
/// the prompt runs once and only the responses run per sequence
/// ([`Batch::hidden`]), which on FewCLUE's long prompts and short answers is
/// most of the cost (TNEWS: one prompt for 16 sequences, 30 with bare pairs).
fn score_all(pm: &PeftModel, head: &Head, seqs: &[Seq<'_>], pad: i64) -> Result<Tensor> {
    let prompts: Vec<Vec<i64>> = seqs.iter().map(|&(s, k)| s[..k].to_vec()).collect();
    let responses: Vec<Vec<i64>> = seqs.iter().map(|&(s, k)| s[k..].to_vec()).collect();
    let batch = Batch::new(&prompts, &responses, pad, pm.base.device);
    let hidden = batch.hidden(pm)?;
    let r = head.forward(&batch.last_of(&hidden));
    Ok(match &head.lm_scale {
        Some(c) => r + c * response_logprob(pm, &batch, &hidden),
        None => r,
    })
}

/// `Σ log p(response | prompt)` per row of `batch` from its hidden states
/// `[b, P + R, h]`, with a graph (logits only at response positions).
fn response_logprob(pm: &PeftModel, batch: &Batch, hidden: &Tensor) -> Tensor {
    let part = batch.response_part(hidden);
    let (r, h) = (part.size()[1], part.size()[2]);
    let (mut at, mut rows) = (Vec::new(), Vec::new());
    for (i, &n) in batch.lens.iter().enumerate() {
        for j in 0..n as i64 {
            at.push(i as i64 * r + j);
            rows.push(i as i64);
        }
    }
    let targets = batch.response.reshape([-1]).index_select(0, &Tensor::from_slice(&at).to_device(hidden.device()));
    summed_logprobs(pm, &part.reshape([-1, h]), &at, &targets, &rows, batch.lens.len())
}

/// Whether each pair's chosen response outscores its rejected one. Each
/// distinct sequence is scored once (a multiple-choice example's pairs
/// share most of theirs), in batches of consecutive sequences, so an
/// example's sequences share their prompt's forward.
fn wins(pm: &PeftModel, head: &Head, pairs: &[Encoded], pad: i64) -> Result<Vec<bool>> {
    let (seqs, ids) = distinct(pairs);
    let mut scores: Vec<f32> = Vec::with_capacity(seqs.len());
    tch::no_grad(|| -> Result<()> {
        for chunk in seqs.chunks(16) {
            scores.extend(Vec::<f32>::try_from(&score_all(pm, head, chunk, pad)?.to_device(tch::Device::Cpu))?);
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
pub(crate) fn accuracies(prefix: &str, pairs: &[Encoded], wins: &[bool]) -> serde_json::Map<String, serde_json::Value> {
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
/// `pairs`, one example (prompt) at a time with all of its pairs, as
/// InstructGPT trains on all comparisons of a prompt together: its distinct
/// responses are scored once and every pair between them counts, weighed by
/// [`pair_weights`]. A batch is `train.batch_size` examples (drawn from
/// [`balanced_examples`]); its loss is the mean of theirs. Held-out
/// pairwise accuracy is the metric (`accuracy`).
struct PairObjective<'a> {
    pairs: &'a [Encoded],
    weights: &'a [f32],
    examples: &'a [(Option<&'a str>, Range<usize>)],
    /// The training rows: indices into `examples`.
    rows: &'a [usize],
    held_out: &'a [Encoded],
    /// Dev bare-answer pairs, when training on them (`data.bare_pairs`).
    held_out_bare: &'a [Encoded],
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
        // This rank's examples; each weighs 1 / (the whole batch's examples).
        let share = 1.0 / (batch.len() * accum) as f64;
        let device = pm.base.device;
        let (mut loss_sum, mut acc_sum, mut tokens) = (0.0, 0.0, 0);
        for i in parallel::shard(batch, rank, world) {
            let range = self.examples[self.rows[i]].1.clone();
            let pairs = &self.pairs[range.clone()];
            let (seqs, ids) = distinct(pairs);
            tokens += seqs.iter().map(|(s, _)| s.len()).sum::<usize>();
            let r = score_all(pm, self.head, &seqs, self.pad)?;
            let pick = |k: fn(&(usize, usize)) -> usize| {
                Tensor::from_slice(&ids.iter().map(|p| k(p) as i64).collect::<Vec<_>>()).to_device(device)
            };
            let margin =
                Tensor::from_slice(&pairs.iter().map(|e| e.margin as f32).collect::<Vec<_>>()).to_device(device);
            let w = Tensor::from_slice(&self.weights[range]).to_device(device);
            let diff = r.index_select(0, &pick(|p| p.0)) - r.index_select(0, &pick(|p| p.1)) - margin;
            let loss = -(diff.log_sigmoid() * &w).sum(Kind::Float);
            let acc = (diff.gt(0.0).to_kind(Kind::Float) * &w).sum(Kind::Float);
            (&loss * share).backward();
            loss_sum += loss.double_value(&[]) * share;
            acc_sum += acc.double_value(&[]) * share;
        }
        Ok((vec![loss_sum, acc_sum], tokens))
    }

    fn eval(&mut self, pm: &PeftModel) -> Result<Vec<(&'static str, f64)>> {
        let acc = accuracy(pm, self.head, self.held_out, self.pad)?;
        if self.held_out_bare.is_empty() {
            return Ok(vec![("accuracy", acc)]);
        }
        // Trained on bare answers too: steps are chosen on both kinds of dev pairs alike.
        let bare = accuracy(pm, self.head, self.held_out_bare, self.pad)?;
        Ok(vec![("selection_accuracy", (acc + bare) / 2.0), ("accuracy", acc), ("bare_answer_accuracy", bare)])
    }
}

pub fn run(job: &JobSpec, ctx: &mut Ctx<'_>) -> Result<Outcome> {
    let mut l = load_base(job, ctx.device)?;
    let Pairs { train: train_pairs, held_out: eval_pairs, test, bare, bare_test } = pairs_of(job)?;
    let max_len = job.model.max_length;
    let data = job.data.clone().unwrap_or_default();
    let cap = data.max_pair_tokens;
    let (train_enc, eval_enc) =
        (encode_within(&l, &train_pairs, max_len, cap)?, encode_within(&l, &eval_pairs, max_len, cap)?);
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
            let head = h.trainable(true);
            let head = if train.score_logprob && head.lm_scale.is_none() { head.with_logprob() } else { head };
            (peft::io::load(dir, &l.pm.base)?, head)
        }
        None => {
            let head = Head::new(l.pm.base.cfg.hidden_size, ctx.device, job.seed);
            (
                peft::build(PeftConfig::from_spec(peft_spec, job.seed), &l.pm.base)?,
                if train.score_logprob { head.with_logprob() } else { head },
            )
        }
    };
    let trainable = adapter.num_parameters() + head.tensors().iter().map(|(_, t)| t.numel() as i64).sum::<i64>();
    l.pm.add(ADAPTER, adapter)?;
    l.pm.set_active(Some(ADAPTER))?;
    let pad = l.pad();
    let what = Trainable { adapter: ADAPTER, extra: head.tensors() };
    let tags: Vec<(Option<&str>, u8)> = train_enc.iter().map(|e| (e.task.as_deref(), e.format)).collect();
    let examples = examples(&tags);
    let weights = pair_weights(&tags, &examples);
    let rows = balanced_examples(&examples);
    tracing::info!(pairs = train_enc.len(), examples = examples.len(), rows = rows.len(), "reward training examples");
    let mut objective = PairObjective {
        pairs: &train_enc,
        weights: &weights,
        examples: &examples,
        rows: &rows,
        held_out: &eval_enc,
        held_out_bare: if data.bare_pairs { &bare_enc } else { &[] },
        head: &head,
        pad,
    };
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
                let seqs: Vec<Seq<'_>> = chunk.iter().map(|e| (e.chosen.as_slice(), e.chosen_start)).collect();
                sum += score_all(&l.pm, &head, &seqs, pad)?.sum(Kind::Float).double_value(&[]);
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
        Encoded {
            chosen: vec![1],
            rejected: vec![2],
            chosen_start: 0,
            rejected_start: 0,
            margin: 0.0,
            task: Some(task.into()),
            format,
        }
    }

    /// Scoring with each prompt's forward shared equals the per-sequence
    /// score of `rlhf_model::head::score` (log-prob term included), and so
    /// do the gradients it gives the head (w, b and c).
    #[test]
    fn shared_prompt_scores_equal_the_per_sequence_score() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2");
        let pm = PeftModel::new(rlhf_model::Model::load(&dir, Kind::Float, tch::Device::Cpu).unwrap());
        let head = Head::new(pm.base.cfg.hidden_size, tch::Device::Cpu, 5).with_logprob();
        // Two examples' answers (prompts of different lengths) and a lone one.
        let (a, b) = (vec![5i64, 9, 14, 3, 8, 20, 21], vec![7i64, 11, 30]);
        let seqs: Vec<Seq<'_>> = vec![(&a[..], 5), (&a[..6], 5), (&b[..], 2), (&b[..], 1), (&[40, 41, 42, 50, 51], 3)];
        let grads = |r: Tensor| {
            r.sum(Kind::Float).backward();
            let c = head.lm_scale.as_ref().unwrap();
            let g: Vec<Tensor> = [&head.weight, &head.bias, c].iter().map(|t| t.grad().copy()).collect();
            for t in [&head.weight, &head.bias, c] {
                let _ = t.grad().zero_();
            }
            g
        };
        let shared = score_all(&pm, &head, &seqs, 0).unwrap();
        let owned: Vec<Vec<i64>> = seqs.iter().map(|(s, _)| s.to_vec()).collect();
        let starts: Vec<usize> = seqs.iter().map(|&(_, k)| k).collect();
        let plain = rlhf_model::head::score(&pm, &head, &owned, &starts, 0).unwrap();
        let diff = (&shared - &plain).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "scores differ by {diff}: {shared} vs {plain}");
        for (g, h) in grads(shared).iter().zip(grads(plain)) {
            let d = (g - h).abs().max().double_value(&[]);
            assert!(d < 1e-4, "head gradients differ by {d}");
        }
    }

    #[test]
    fn balanced_rows_weigh_formats_and_tasks_alike() {
        // A binary task (one example: formats 1, 2, 3) and a 3-option task
        // (one example: format 1, then 2 and 3 for each of two wrong options).
        let pairs = [
            pair("a", 1),
            pair("a", 2),
            pair("a", 3),
            pair("b", 1),
            pair("b", 2),
            pair("b", 3),
            pair("b", 2),
            pair("b", 3),
        ];
        let tags: Vec<(Option<&str>, u8)> = pairs.iter().map(|e| (e.task.as_deref(), e.format)).collect();
        let rows = balanced_rows(&tags);
        let count = |task: &str, format: u8| {
            rows.iter().filter(|&&r| pairs[r].task.as_deref() == Some(task) && pairs[r].format == format).count()
        };
        // Task b: its format-1 pair twice, each other pair once; task a's
        // example once (each task has one example).
        assert_eq!([count("b", 1), count("b", 2), count("b", 3)], [2, 2, 2]);
        assert_eq!([count("a", 1), count("a", 2), count("a", 3)], [1, 1, 1]);
        assert_eq!(rows.len(), 9);
        // Pairs from files are each drawn once.
        assert_eq!(balanced_rows(&[(None, 0), (None, 0), (None, 0)]), vec![0, 1, 2]);
        // Training draws examples, each task's as often.
        let ex = examples(&tags);
        assert_eq!(ex, vec![(Some("a"), 0..3), (Some("b"), 3..8)]);
        assert_eq!(balanced_examples(&ex), vec![0, 1]);
        // Within b: the format-1 pair weighs as much as the two format-3 pairs together.
        let w = pair_weights(&tags, &ex);
        let close = |a: f32, b: f32| (a - b).abs() < 1e-6;
        assert!(close(w[..3].iter().sum(), 1.0) && close(w[3..].iter().sum(), 1.0), "{w:?}");
        assert!(close(w[3], w[5] + w[7]) && close(w[4], w[5]), "{w:?}");
    }
}
