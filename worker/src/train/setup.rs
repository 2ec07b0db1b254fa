//! What every stage does first: load the base (merging any adapters the job
//! names), the tokenizer, the task data; and the shared batching/loss code.

use std::path::{Path, PathBuf};

use rlhf_common::spec::{DataSpec, JobSpec};
use tch::{Device, Kind, Tensor};

use crate::data::{self, Example, Task, Template};
use crate::error::{Error, Result};
use crate::train::logprobs::token_logprobs;
use rlhf_model::batch::positions;
use rlhf_model::peft::{self, PeftModel};
use rlhf_model::{parse_dtype, Mask, Tokenizer};

/// The loaded base of a job, with its tokenizer.
pub struct Loaded {
    pub pm: PeftModel,
    pub tok: Tokenizer,
    pub model_dir: PathBuf,
}

impl Loaded {
    pub fn eos(&self) -> i64 {
        self.tok.eos_ids.first().copied().unwrap_or(0)
    }

    pub fn pad(&self) -> i64 {
        self.tok.pad_id.unwrap_or_else(|| self.eos())
    }
}

/// Loads `job.model` on `device` and merges `model.merge_adapters` in order.
pub fn load_base(job: &JobSpec, device: Device) -> Result<Loaded> {
    let dir = job.model.path.clone().ok_or_else(|| Error::InvalidArgument("model.path: required".into()))?;
    let full = job.peft.as_ref().is_some_and(|p| p.method == rlhf_common::PeftMethod::Full);
    let kind = job_dtype(&job.model.dtype, &dir, device, full)?;
    let base = rlhf_model::Model::load(&dir, kind, device)?;
    let tok = Tokenizer::load(&dir, &base.cfg)?;
    let mut pm = PeftModel::new(base);
    for (i, a) in job.model.merge_adapters.iter().enumerate() {
        let adapter = peft::io::load(a, &pm.base)?;
        let name = format!("merged-{i}");
        pm.add(&name, adapter)?;
        pm.merge(&name)?;
    }
    Ok(Loaded { pm, tok, model_dir: dir })
}

/// The kind the base is loaded in: `model.dtype`, with `auto` resolved for
/// this machine and the model in `dir` (see [`rlhf_model::auto_dtype`]),
/// the choice logged.
pub fn job_dtype(dtype: &str, dir: &Path, device: Device, full: bool) -> Result<Kind> {
    if dtype != "auto" {
        return Ok(parse_dtype(dtype)?);
    }
    let (kind, why) = auto_dtype_for(dir, device, full)?;
    tracing::info!(model = %dir.display(), dtype = ?kind, "model.dtype = auto: {why}");
    Ok(kind)
}

/// `auto`'s choice on this machine for the model in `dir` (every weight
/// trained when `full`), and why.
pub fn auto_dtype_for(dir: &Path, device: Device, full: bool) -> Result<(Kind, String)> {
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("flags")).map(String::from))
        .unwrap_or_default();
    let files = rlhf_model::WeightFiles::open_dir(dir)?;
    let params: u64 =
        files.names().filter_map(|n| files.shape(n)).map(|s| s.iter().product::<i64>().max(0) as u64).sum();
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("MemAvailable:")).map(String::from))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024);
    Ok(rlhf_model::auto_dtype(device, &flags, params, available, full))
}

/// A FewCLUE task's template (with the job's overrides) and examples.
pub struct TaskSet {
    pub template: Template,
    pub examples: Vec<Example>,
}

/// Which file of each data source.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// One [`TaskSet`] per FewCLUE source of `data` (`[[data.sources]]` or the
/// single `task`/`train`/`eval`), from its train or eval file, each cut to
/// `max_examples`/`max_eval_examples` by stride. A source without an eval
/// file has no eval set; a source without a task, when the job allows
/// those (`trl`), is a file in TRL's formats (see [`crate::train::rows`]).
pub fn task_sets(data: &DataSpec, split: Split) -> Result<Vec<TaskSet>> {
    task_sets_of(data, split, false)
}

/// [`task_sets`], skipping sources without a task when `trl`.
pub fn task_sets_of(data: &DataSpec, split: Split, trl: bool) -> Result<Vec<TaskSet>> {
    let one = data.sources.is_empty();
    let mut sets = Vec::new();
    for (i, src) in data.sources().iter().enumerate() {
        if trl && src.task.is_none() {
            continue;
        }
        let field = if one { "data.task".to_string() } else { format!("data.sources[{i}].task") };
        let (path, limit) = match split {
            Split::Train => (Some(&src.train), data.max_examples),
            Split::Eval => (src.eval.as_ref(), data.max_eval_examples),
        };
        if let Some(path) = path {
            sets.push(task_set(
                src.task.as_deref(),
                &field,
                data.template.clone(),
                data.verbalizer.clone(),
                path,
                limit,
            )?);
        }
    }
    if split == Split::Train && sets.is_empty() && !trl {
        return Err(Error::InvalidArgument("data.train: required".into()));
    }
    Ok(sets)
}

/// The examples of `path` for `task` (named by `field` in errors), at most
/// `limit` of them by stride.
pub fn task_set(
    task: Option<&str>,
    field: &str,
    template: Option<String>,
    verbalizer: Option<std::collections::BTreeMap<String, String>>,
    path: &Path,
    limit: Option<usize>,
) -> Result<TaskSet> {
    let task: Task = task
        .ok_or_else(|| Error::InvalidArgument(format!("{field}: required")))?
        .parse()
        .map_err(|e: Error| Error::InvalidArgument(format!("{field}: {e}")))?;
    let template = Template::with_overrides(task, template, verbalizer)
        .map_err(|e| Error::InvalidArgument(format!("data.template: {e}")))?;
    let mut examples = data::fewclue::load(task, path)?;
    if let Some(n) = limit {
        examples = data::stride_subset(&examples, n);
    }
    Ok(TaskSet { template, examples })
}

/// Prompt ids and response ids (response ends with EOS), truncated to `max_len`.
pub fn encode_pair(
    tok: &Tokenizer,
    prompt: &str,
    response: &str,
    eos: Option<i64>,
    max_len: usize,
) -> Result<(Vec<i64>, Vec<i64>)> {
    let p = tok.encode(prompt, true)?;
    let mut r = tok.encode(response, false)?;
    r.extend(eos);
    data::truncate_prompt(&p, &r, max_len)
}

/// The next-token prediction rows of a causal forward over `ids`: hidden
/// states `[n, h]` at the positions whose next token `target_mask` (`[b, T]`,
/// 1 on tokens to predict) selects, and those tokens `[n]`. Only these rows
/// go through the LM head (see [`crate::train::logprobs`]).
pub fn lm_targets(ids: &Tensor, target_mask: &Tensor, hidden: &Tensor) -> Result<(Tensor, Tensor)> {
    let t = ids.size()[1];
    let h = hidden.size()[2];
    let inputs = hidden.narrow(1, 0, t - 1).reshape([-1, h]);
    let targets = ids.narrow(1, 1, t - 1).reshape([-1]);
    let sel = target_mask.narrow(1, 1, t - 1).reshape([-1]).nonzero().squeeze_dim(1);
    if sel.size()[0] == 0 {
        return Err(Error::InvalidArgument("batch has no target tokens (responses truncated away?)".into()));
    }
    Ok((inputs.index_select(0, &sel), targets.index_select(0, &sel)))
}

/// Mean next-token cross-entropy over the targets of `target_mask` (see
/// [`lm_targets`]) with the active adapter, without a graph, and the count
/// of targets.
pub fn lm_loss(pm: &PeftModel, ids: &Tensor, target_mask: &Tensor) -> Result<(f64, i64)> {
    let hidden = tch::no_grad(|| pm.forward(ids, &positions(ids), Mask::Causal, None))?;
    let (h, targets) = lm_targets(ids, target_mask, &hidden)?;
    let (logp, _) = token_logprobs(pm, &h, &targets, 1.0, false);
    Ok((-logp.mean(Kind::Float).double_value(&[]), targets.size()[0]))
}
