//! `metrics.jsonl` (one JSON object per step), the same scalars as
//! TensorBoard events beside it (tag `<stage>/<key>`), and progress output:
//! a redrawn bar on a terminal, plain lines otherwise.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};

use super::tfevents::EventWriter;
use crate::error::{Error, Result};

pub struct Metrics {
    path: PathBuf,
    file: BufWriter<File>,
    tty: bool,
    start: Instant,
    /// Added to every record (e.g. `"stage": "sft"`).
    tags: Map<String, Value>,
    quiet: bool,
    observer: Observer,
    /// TensorBoard events (None if the file could not be made).
    events: Option<EventWriter>,
}

/// Called with every record: `(step, total, record)`.
pub type OnRecord = Box<dyn FnMut(usize, usize, &Map<String, Value>) + Send>;

/// How a caller (the worker daemon) follows and stops a run: every record is
/// passed to `on_record`; once `cancel` is set, the next record ends the run
/// with `Error::Cancelled`.
#[derive(Default)]
pub struct Observer {
    pub cancel: Option<Arc<AtomicBool>>,
    pub on_record: Option<OnRecord>,
}

impl Metrics {
    /// Appends to `path` (created if missing).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: BufWriter::new(file),
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            tags: Map::new(),
            quiet: std::env::var_os("RLHF_QUIET").is_some(),
            observer: Observer::default(),
            // The job's own records only (not a data-parallel rank's copy).
            events: path.parent().filter(|_| path.ends_with("metrics.jsonl")).and_then(
                |dir| match EventWriter::create(dir) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::warn!(error = %e, "no TensorBoard events for this run");
                        None
                    }
                },
            ),
        })
    }

    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = observer;
        self
    }

    pub fn set_tag(&mut self, key: &str, value: impl Into<Value>) {
        self.tags.insert(key.to_string(), value.into());
    }

    /// Writes one record; `step`/`total` drive the progress line.
    pub fn log(&mut self, step: usize, total: usize, fields: Map<String, Value>) -> Result<()> {
        let mut rec = self.tags.clone();
        rec.insert("step".into(), step.into());
        rec.extend(fields);
        let line = Value::Object(rec.clone()).to_string();
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(|e| Error::io(&self.path, e))?;
        if let Some(w) = &mut self.events {
            let stage = rec.get("stage").and_then(Value::as_str).unwrap_or_default();
            let scalars: Vec<(String, f32)> = rec
                .iter()
                .filter(|(k, _)| k.as_str() != "step")
                .filter_map(|(k, v)| v.as_f64().map(|x| (k, x as f32)))
                .map(|(k, x)| (if stage.is_empty() { k.clone() } else { format!("{stage}/{k}") }, x))
                .collect();
            w.scalars(step as i64, &scalars)?;
        }
        if !self.quiet {
            self.progress(step, total, &rec);
        }
        if let Some(f) = &mut self.observer.on_record {
            f(step, total, &rec);
        }
        if self.observer.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    fn progress(&self, step: usize, total: usize, rec: &Map<String, Value>) {
        let stage = rec.get("stage").and_then(Value::as_str).unwrap_or("");
        let shown: Vec<String> = ["loss", "accuracy", "reward_mean", "kl", "eval_accuracy"]
            .iter()
            .filter_map(|k| rec.get(*k).and_then(Value::as_f64).map(|v| format!("{k} {v:.4}")))
            .collect();
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if step > 0 && total >= step { elapsed / step as f64 * (total - step) as f64 } else { 0.0 };
        if self.tty {
            let width = 24;
            let filled = (width * step.min(total)).checked_div(total).unwrap_or(0);
            eprint!(
                "\r{stage:>8} [{}{}] {step}/{total} {} eta {eta:.0}s   ",
                "#".repeat(filled),
                " ".repeat(width - filled),
                shown.join(" ")
            );
            if step >= total {
                eprintln!();
            }
        } else {
            eprintln!("{stage} step {step}/{total} {} ({elapsed:.1}s)", shown.join(" "));
        }
    }
}

/// Appends `fields` as one JSON line to `path` (created when missing).
pub fn append_jsonl(path: &Path, fields: &Map<String, Value>) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
    writeln!(f, "{}", Value::Object(fields.clone())).map_err(|e| Error::io(path, e))
}

/// Builds a JSON field map: `fields!{"loss" => 1.0, "step_time" => t}`.
#[macro_export]
macro_rules! fields {
    ($($k:expr => $v:expr),* $(,)?) => {{
        let mut m = serde_json::Map::new();
        $( m.insert($k.to_string(), serde_json::json!($v)); )*
        m
    }};
}
