//! The four FewCLUE tasks used in the paper (EPRSTMT, TNEWS, OCNLI, BUSTM):
//! loading the original JSON-lines files and the fixed label sets.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::jsonl::{read_records, Record};
use crate::error::{Error, Result};

/// A FewCLUE task. Serialised in lowercase (`"eprstmt"`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// E-commerce review sentiment: `sentence`, Positive/Negative.
    Eprstmt,
    /// News title classification: `sentence`, 15 classes (ids 100–116).
    Tnews,
    /// Natural language inference: `sentence1` (premise), `sentence2` (hypothesis).
    Ocnli,
    /// Short text pair similarity: `sentence1`, `sentence2`, "0"/"1".
    Bustm,
}

impl Task {
    /// Every task, in a fixed order.
    pub const ALL: [Task; 4] = [Task::Eprstmt, Task::Tnews, Task::Ocnli, Task::Bustm];

    /// The lowercase name, as in FewCLUE's directory names.
    pub fn name(self) -> &'static str {
        match self {
            Task::Eprstmt => "eprstmt",
            Task::Tnews => "tnews",
            Task::Ocnli => "ocnli",
            Task::Bustm => "bustm",
        }
    }

    /// The text fields of an example of this task.
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Task::Eprstmt | Task::Tnews => &["sentence"],
            Task::Ocnli | Task::Bustm => &["sentence1", "sentence2"],
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        Task::ALL.into_iter().find(|task| task.name().eq_ignore_ascii_case(t)).ok_or_else(|| {
            let valid: Vec<_> = Task::ALL.iter().map(|t| t.name()).collect();
            Error::InvalidArgument(format!("unknown FewCLUE task {s:?} (valid: {})", valid.join(", ")))
        })
    }
}

/// One labelled example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub id: i64,
    /// `"sentence"` (eprstmt, tnews) or `"sentence1"`/`"sentence2"` (ocnli, bustm).
    pub text: BTreeMap<String, String>,
    /// Canonical label, one of [`labels`]`(task)`.
    pub label: String,
}

const EPRSTMT: &[(&str, &str)] = &[("Negative", "负面"), ("Positive", "正面")];
const TNEWS: &[(&str, &str)] = &[
    ("100", "故事"),
    ("101", "文化"),
    ("102", "娱乐"),
    ("103", "体育"),
    ("104", "财经"),
    ("106", "房产"),
    ("107", "汽车"),
    ("108", "教育"),
    ("109", "科技"),
    ("110", "军事"),
    ("112", "旅游"),
    ("113", "国际"),
    ("114", "股票"),
    ("115", "农业"),
    ("116", "电竞"),
];
const OCNLI: &[(&str, &str)] = &[("entailment", "蕴含"), ("neutral", "中立"), ("contradiction", "矛盾")];
const BUSTM: &[(&str, &str)] = &[("0", "不相似"), ("1", "相似")];

fn table(task: Task) -> &'static [(&'static str, &'static str)] {
    match task {
        Task::Eprstmt => EPRSTMT,
        Task::Tnews => TNEWS,
        Task::Ocnli => OCNLI,
        Task::Bustm => BUSTM,
    }
}

/// The canonical labels of `task` in a fixed order (the option order of the
/// default templates): eprstmt Negative, Positive; tnews the 15 ids 100–116
/// without 105 and 111; ocnli entailment, neutral, contradiction; bustm "0", "1".
pub fn labels(task: Task) -> Vec<&'static str> {
    table(task).iter().map(|(l, _)| *l).collect()
}

/// The Chinese name of a canonical label (负面/正面, the TNEWS category names,
/// 蕴含/中立/矛盾, 不相似/相似); `None` for a label the task does not have.
pub fn label_name_zh(task: Task, label: &str) -> Option<&'static str> {
    table(task).iter().find(|(l, _)| *l == label).map(|(_, zh)| *zh)
}

/// Loads a FewCLUE file (JSON Lines as distributed, e.g. `train_0.json`,
/// `test_public.json`). OCNLI records labelled `"-"` (no annotator majority)
/// are skipped. A missing field, a wrong type or an unknown label is an
/// [`Error::DataLine`] naming the field; a file with no examples is an
/// [`Error::Data`].
pub fn load(task: Task, path: &Path) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (line, value) in read_records(path)? {
        let rec = Record::new(path, line, &value)?;
        if let Some(ex) = parse_example(task, &rec)? {
            out.push(ex);
        }
    }
    if out.is_empty() {
        return Err(Error::Data { path: path.to_path_buf(), msg: format!("no {task} examples") });
    }
    Ok(out)
}

fn parse_example(task: Task, rec: &Record<'_>) -> Result<Option<Example>> {
    let label = match rec.field("label")? {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => return Err(rec.err("field \"label\": expected a string or an integer")),
    };
    if task == Task::Ocnli && label == "-" {
        return Ok(None);
    }
    if label_name_zh(task, &label).is_none() {
        return Err(
            rec.err(format!("field \"label\": unknown {task} label {label:?} (valid: {})", labels(task).join(", ")))
        );
    }
    let id = match rec.field("id")? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| rec.err("field \"id\": expected an integer"))?;
    let mut text = BTreeMap::new();
    for &f in task.fields() {
        text.insert(f.to_string(), rec.str_field(f)?.to_string());
    }
    Ok(Some(Example { id, text, label }))
}

/// `n` items taken by an even stride over `items` (all of them if `n` is at
/// least `items.len()`). FewCLUE's `test_public.json` is sorted by label, so
/// a subset must be spread over the whole file, never taken from the head.
pub fn stride_subset<T: Clone>(items: &[T], n: usize) -> Vec<T> {
    let len = items.len();
    if n >= len {
        return items.to_vec();
    }
    // i * len / n is strictly increasing for n < len, so no item repeats.
    (0..n).map(|i| items[i * len / n].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
        let p = dir.path().join("data.json");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn task_names_round_trip() {
        for t in Task::ALL {
            assert_eq!(t.name().parse::<Task>().unwrap(), t);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{}\"", t.name()));
            assert_eq!(serde_json::from_str::<Task>(&format!("\"{}\"", t.name())).unwrap(), t);
        }
        assert_eq!("TNEWS".parse::<Task>().unwrap(), Task::Tnews);
        let e = "cmnli".parse::<Task>().unwrap_err().to_string();
        assert!(e.contains("cmnli") && e.contains("eprstmt, tnews, ocnli, bustm"), "{e}");
    }

    #[test]
    fn label_sets() {
        assert_eq!(labels(Task::Eprstmt), ["Negative", "Positive"]);
        let tnews = labels(Task::Tnews);
        assert_eq!(tnews.len(), 15);
        assert!(!tnews.contains(&"105") && !tnews.contains(&"111"));
        assert_eq!(tnews.first(), Some(&"100"));
        assert_eq!(tnews.last(), Some(&"116"));
        assert_eq!(label_name_zh(Task::Tnews, "116"), Some("电竞"));
        assert_eq!(label_name_zh(Task::Eprstmt, "Positive"), Some("正面"));
        assert_eq!(label_name_zh(Task::Ocnli, "contradiction"), Some("矛盾"));
        assert_eq!(label_name_zh(Task::Bustm, "1"), Some("相似"));
        assert_eq!(label_name_zh(Task::Bustm, "2"), None);
    }

    #[test]
    fn loads_each_task_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "{\"id\": 3, \"sentence\": \"包装很好，发货也快\", \"label\": \"Positive\"}\n\n{\"id\": 4, \"sentence\": \"用了两天就坏了\", \"label\": \"Negative\"}\n");
        let ex = load(Task::Eprstmt, &p).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].id, 3);
        assert_eq!(ex[0].text["sentence"], "包装很好，发货也快");
        assert_eq!(ex[1].label, "Negative");

        let p = write(&dir, "{\"label\": 109, \"label_desc\": \"news_tech\", \"sentence\": \"新款芯片发布\", \"keywords\": \"芯片\", \"id\": 7}\n");
        let ex = load(Task::Tnews, &p).unwrap();
        assert_eq!(ex[0].label, "109");

        let p = write(&dir, "{\"sentence1\": \"他在看书\", \"sentence2\": \"他在阅读\", \"label\": \"entailment\", \"label0\": null, \"id\": 0}\n{\"sentence1\": \"甲\", \"sentence2\": \"乙\", \"label\": \"-\", \"id\": 1}\n");
        let ex = load(Task::Ocnli, &p).unwrap();
        assert_eq!(ex.len(), 1, "label \"-\" is skipped");
        assert_eq!(ex[0].text["sentence2"], "他在阅读");

        let p =
            write(&dir, "{\"id\": 9, \"sentence1\": \"打开闹钟\", \"sentence2\": \"开启闹钟\", \"label\": \"1\"}\n");
        assert_eq!(load(Task::Bustm, &p).unwrap()[0].label, "1");
    }

    #[test]
    fn bad_records_name_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                Task::Eprstmt,
                "{\"id\": 1, \"sentence\": \"好\", \"label\": \"Positive\"}\n{\"id\": 2, \"label\": \"Positive\"}\n",
                2,
                "\"sentence\"",
            ),
            (Task::Eprstmt, "{\"id\": 1, \"sentence\": \"好\", \"label\": \"Neutral\"}\n", 1, "\"Neutral\""),
            (Task::Tnews, "{\"id\": 1, \"sentence\": \"x\", \"label\": 105}\n", 1, "\"105\""),
            (
                Task::Bustm,
                "{\"id\": 1, \"sentence1\": \"x\", \"sentence2\": 5, \"label\": \"0\"}\n",
                1,
                "\"sentence2\"",
            ),
            (Task::Bustm, "{\"sentence1\": \"x\", \"sentence2\": \"y\", \"label\": \"0\"}\n", 1, "\"id\""),
            (Task::Ocnli, "{\"id\": 1, \"sentence1\": \"x\", \"sentence2\": \"y\"}\n", 1, "\"label\""),
            (Task::Ocnli, "[1]\n", 1, "object"),
        ];
        for (task, text, line, needle) in cases {
            let p = write(&dir, text);
            let err = load(task, &p).unwrap_err();
            assert!(matches!(err, Error::DataLine { line: l, .. } if l == line), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(needle) && msg.contains(&format!("data.json:{line}")), "{msg}");
        }
        let p = write(&dir, "\n");
        assert!(matches!(load(Task::Eprstmt, &p), Err(Error::Data { .. })));
    }

    #[test]
    fn stride_subset_spreads_over_sorted_data() {
        let items: Vec<usize> = (0..10).collect();
        assert_eq!(stride_subset(&items, 5), [0, 2, 4, 6, 8]);
        assert_eq!(stride_subset(&items, 3), [0, 3, 6]);
        assert_eq!(stride_subset(&items, 20), items);
        assert!(stride_subset(&items, 0).is_empty());
        // Sorted by label (two classes of 100): a 10-item subset holds both.
        let sorted: Vec<u8> = (0..200).map(|i| (i >= 100) as u8).collect();
        let sub = stride_subset(&sorted, 10);
        assert_eq!(sub.iter().filter(|&&l| l == 1).count(), 5);
        let odd: Vec<usize> = (0..7).collect();
        let sub = stride_subset(&odd, 6);
        assert_eq!(sub.len(), 6);
        assert!(sub.windows(2).all(|w| w[0] < w[1]));
    }
}
