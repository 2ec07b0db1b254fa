//! Preference pairs for reward-model training: loaded from files, or built
//! from multiple-choice examples as in the paper.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fewclue::Example;
use super::jsonl::{read_records, Record};
use super::template::Template;
use crate::error::{Error, Result};

/// One comparison: `chosen` is preferred over `rejected` as a response to
/// `prompt`, by `margin` (0 when unknown). Pairs built from a multiple-choice
/// task carry the task and which of the paper's formats (1–3) they are, for
/// per-task and per-format accuracies; pairs read from a file carry neither.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    #[serde(default)]
    pub margin: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub format: u8,
    /// `prompt` and the responses are already rendered through the chat
    /// template (special tokens written out, the eos of each turn
    /// included): tokenized without adding special tokens or an eos.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub templated: bool,
}

impl PreferencePair {
    /// `chosen` ≻ `rejected` after `prompt`, untagged, margin 0.
    pub fn new(prompt: impl Into<String>, chosen: impl Into<String>, rejected: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            chosen: chosen.into(),
            rejected: rejected.into(),
            margin: 0.0,
            task: None,
            format: 0,
            templated: false,
        }
    }

    /// The pair tagged with its multiple-choice task and format.
    fn tagged(self, task: &str, format: u8) -> Self {
        Self { task: Some(task.to_string()), format, ..self }
    }
}

fn is_zero(f: &u8) -> bool {
    *f == 0
}

/// Loads preference pairs from a JSON Lines file or a JSON array. A record is
/// either
/// - `{"prompt", "chosen", "rejected"[, "margin"]}` (strings; margin a number,
///   default 0), or
/// - ShareGPT style as in LLaMA-Factory's `dpo_zh_demo.json` and MedicalGPT's
///   `dpo_zh_500.jsonl`: `{"conversations": [{"from", "value"}, …], "chosen",
///   "rejected"}` where chosen/rejected are a string or a `{"from", "value"}`
///   object. The prompt is rendered by [`render_conversation`].
///
/// Errors name `file:line` and the field.
pub fn load_pairs(path: &Path) -> Result<Vec<PreferencePair>> {
    let mut out = Vec::new();
    for (line, value) in read_records(path)? {
        let rec = Record::new(path, line, &value)?;
        let prompt = if rec.obj.contains_key("conversations") {
            conversation_prompt(&rec)?
        } else if rec.obj.contains_key("prompt") {
            rec.str_field("prompt")?.to_string()
        } else {
            return Err(rec.err("expected field \"prompt\" or \"conversations\" (with \"chosen\" and \"rejected\")"));
        };
        let chosen = response(&rec, "chosen")?;
        let rejected = response(&rec, "rejected")?;
        let margin = match rec.obj.get("margin") {
            None | Some(Value::Null) => 0.0,
            Some(v) => match v.as_f64() {
                Some(m) if m.is_finite() => m as f32,
                _ => return Err(rec.err("field \"margin\": expected a finite number")),
            },
        };
        out.push(PreferencePair { margin, ..PreferencePair::new(prompt, chosen, rejected) });
    }
    if out.is_empty() {
        return Err(Error::Data { path: path.to_path_buf(), msg: "no preference pairs".into() });
    }
    Ok(out)
}

/// A response field: a non-empty string or a `{"from", "value"}` object.
fn response(rec: &Record<'_>, field: &str) -> Result<String> {
    let text = match rec.field(field)? {
        Value::String(s) => s.as_str(),
        Value::Object(o) => o
            .get("value")
            .and_then(Value::as_str)
            .ok_or_else(|| rec.err(format!("field {field:?}: expected a string \"value\"")))?,
        _ => return Err(rec.err(format!("field {field:?}: expected a string or a {{from, value}} object"))),
    };
    if text.trim().is_empty() {
        return Err(rec.err(format!("field {field:?}: empty response")));
    }
    Ok(text.to_string())
}

/// Who speaks a turn of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    System,
    Human,
    Assistant,
}

fn conversation_prompt(rec: &Record<'_>) -> Result<String> {
    let Value::Array(turns) = rec.field("conversations")? else {
        return Err(rec.err("field \"conversations\": expected a list of {from, value} objects"));
    };
    let mut parsed = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let field = |name: &str| turn.get(name).and_then(Value::as_str);
        let bad = |what: &str| rec.err(format!("field \"conversations[{i}].{what}\""));
        let speaker = match field("from").ok_or_else(|| bad("from\": expected a string"))? {
            "system" => Speaker::System,
            "human" | "user" => Speaker::Human,
            "gpt" | "assistant" => Speaker::Assistant,
            other => return Err(bad(&format!("from\": unknown speaker {other:?} (valid: system, human, gpt)"))),
        };
        let value = field("value").ok_or_else(|| bad("value\": expected a string"))?;
        parsed.push((speaker, value));
    }
    match parsed.iter().rev().find(|(s, _)| *s != Speaker::System) {
        Some((Speaker::Human, _)) => Ok(render_conversation(&parsed)),
        Some(_) => Err(rec.err("field \"conversations\": the last turn must be from \"human\"")),
        None => Err(rec.err("field \"conversations\": no \"human\" turn")),
    }
}

/// One prompt text from a conversation: the system turns first, then the
/// dialogue, blocks separated by a blank line. A single human turn is its
/// text alone; with several turns each is prefixed `用户：` or `助手：`.
pub fn render_conversation(turns: &[(Speaker, &str)]) -> String {
    let system = turns.iter().filter(|(s, _)| *s == Speaker::System).map(|(_, v)| v.trim().to_string());
    let dialogue: Vec<_> = turns.iter().filter(|(s, _)| *s != Speaker::System).collect();
    let dialogue = match dialogue.as_slice() {
        [(_, v)] => vec![v.trim().to_string()],
        _ => dialogue
            .iter()
            .map(|(s, v)| format!("{}{}", if *s == Speaker::Human { "用户：" } else { "助手：" }, v.trim()))
            .collect(),
    };
    system.chain(dialogue).filter(|b| !b.is_empty()).collect::<Vec<_>>().join("\n\n")
}

/// A response in the multiple-choice construction: the bare answer (`"B"`)
/// or the answer followed by its rationale (`"B。因为这条评论表达了正面的情感。"`).
fn respond(answer: &str, explanation: Option<&str>) -> String {
    match explanation {
        Some(e) => format!("{answer}。{e}"),
        None => answer.to_string(),
    }
}

/// The paper's multiple-choice → preference construction. For each example,
/// with `prompt = template.render(ex)`, its correct answer `c` with rationale
/// `e_c`, and **every** wrong answer `w` with its rationale `e_w`:
/// 1. `"c。e_c"` ≻ `"c"` (an explanation is better than none), once;
/// 2. `"c。e_c"` ≻ `"w。e_w"` (the correct answer is better), per `w`;
/// 3. `"c"` ≻ `"w。e_w"` (a correct bare answer beats a wrong explained
///    one), per `w`.
///
/// So an example of a task with k options gives 1 + 2(k − 1) pairs (TNEWS:
/// 29), in that order, wrong answers in option order. Margins are 0. An
/// example whose label the template does not know is an error.
///
/// With `bare`, each wrong answer also gives format 4, `"c"` ≻ `"w"` (not
/// one of the paper's three: what a one-token answer meets in PPO), after
/// its formats 2 and 3: 1 + 3(k − 1) pairs.
pub fn from_multiple_choice(examples: &[Example], template: &Template, bare: bool) -> Result<Vec<PreferencePair>> {
    let task = template.task.name().to_string();
    let mut out = Vec::new();
    for ex in examples {
        let prompt = template.render(ex)?;
        let correct = template.answer(&ex.label)?;
        let explained = respond(correct, Some(&template.explanation(&ex.label)?));
        let pair = |chosen: &str, rejected: &str, format: u8| {
            PreferencePair::new(prompt.as_str(), chosen, rejected).tagged(&task, format)
        };
        out.push(pair(&explained, correct, 1));
        for w in wrong_labels(template, &ex.label)? {
            let wrong_explained = respond(template.answer(w)?, Some(&template.explanation(w)?));
            out.push(pair(&explained, &wrong_explained, 2));
            out.push(pair(correct, &wrong_explained, 3));
            if bare {
                out.push(pair(correct, template.answer(w)?, 4));
            }
        }
    }
    Ok(out)
}

/// Every label of `template` but `label` (which must be one of them).
fn wrong_labels<'t>(template: &'t Template, label: &str) -> Result<Vec<&'t str>> {
    let labels = template.labels();
    if labels.len() < 2 {
        return Err(Error::InvalidArgument(format!("template for {} has fewer than two labels", template.task)));
    }
    template.answer(label)?;
    Ok(labels.into_iter().filter(|l| *l != label).collect())
}

/// The pairs a one-token answer meets in PPO (the paper's nt = 1): the bare
/// correct answer ≻ each bare wrong one (format 0: not one of the paper's
/// three). The construction never trains on them; they measure whether a
/// reward model tells right from wrong answers when nothing else differs.
pub fn bare_answer_pairs(examples: &[Example], template: &Template) -> Result<Vec<PreferencePair>> {
    let task = template.task.name().to_string();
    let mut out = Vec::new();
    for ex in examples {
        let prompt = template.render(ex)?;
        let correct = template.answer(&ex.label)?;
        for w in wrong_labels(template, &ex.label)? {
            out.push(PreferencePair::new(prompt.as_str(), correct, template.answer(w)?).tagged(&task, 0));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::data::fewclue::Task;
    use crate::data::template::default_template;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR (run through cargo test)"))
            .join("tests/fixtures/data")
            .join(name)
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let p = dir.path().join("prefs.jsonl");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn loads_flat_fixture() {
        let pairs = load_pairs(&fixture("prefs_flat.jsonl")).unwrap();
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[0].prompt, "一年有几个季节？");
        assert_eq!(pairs[0].margin, 0.0);
        assert_eq!(pairs[1].margin, 1.5);
        assert!(pairs.iter().all(|p| !p.chosen.is_empty() && !p.rejected.is_empty()));
    }

    #[test]
    fn loads_sharegpt_array_fixture() {
        let pairs = load_pairs(&fixture("prefs_sharegpt.json")).unwrap();
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[0].prompt, "用一句话介绍长江。");
        assert_eq!(pairs[0].chosen, "长江是中国最长的河流，全长约六千三百千米。");
        assert_eq!(pairs[1].prompt, "你是一个乐于助人的助手。\n\n把“早上好”翻译成英文。");
        assert_eq!(pairs[2].prompt, "用户：推荐一种水果。\n\n助手：苹果。\n\n用户：为什么？");
    }

    #[test]
    fn loads_sharegpt_jsonl_fixture() {
        let pairs = load_pairs(&fixture("prefs_sharegpt.jsonl")).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].prompt, "二加三等于几？");
        assert_eq!(pairs[0].chosen, "二加三等于五。");
        assert_eq!(pairs[1].prompt, "请简洁回答。\n\n水的化学式是什么？");
    }

    #[test]
    fn bad_records_name_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let ok = r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#;
        let cases = [
            (r#"{"prompt": "p", "chosen": "a"}"#, "\"rejected\""),
            (r#"{"prompt": "p", "chosen": 3, "rejected": "b"}"#, "\"chosen\""),
            (r#"{"prompt": "p", "chosen": " ", "rejected": "b"}"#, "\"chosen\": empty"),
            (r#"{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "x"}"#, "\"margin\""),
            (r#"{"question": "p", "chosen": "a", "rejected": "b"}"#, "\"conversations\""),
            (r#"{"conversations": {}, "chosen": "a", "rejected": "b"}"#, "\"conversations\""),
            (
                r#"{"conversations": [{"from": "bot", "value": "x"}], "chosen": "a", "rejected": "b"}"#,
                "conversations[0].from",
            ),
            (r#"{"conversations": [{"from": "human"}], "chosen": "a", "rejected": "b"}"#, "conversations[0].value"),
            (
                r#"{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "chosen": "a", "rejected": "b"}"#,
                "last turn",
            ),
            (
                r#"{"conversations": [{"from": "system", "value": "s"}], "chosen": "a", "rejected": "b"}"#,
                "no \"human\"",
            ),
            (
                r#"{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt"}, "rejected": "b"}"#,
                "\"chosen\"",
            ),
        ];
        for (bad, needle) in cases {
            let p = write(&dir, &format!("{ok}\n\n{bad}\n"));
            let e = load_pairs(&p).unwrap_err();
            assert!(matches!(e, Error::DataLine { line: 3, .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("prefs.jsonl:3") && msg.contains(needle), "{msg} lacks {needle}");
        }
        let p = write(&dir, "\n");
        assert!(matches!(load_pairs(&p), Err(Error::Data { .. })));
    }

    fn examples() -> Vec<Example> {
        let ex = |id, s: &str, label: &str| Example {
            id,
            text: BTreeMap::from([("sentence".to_string(), s.to_string())]),
            label: label.to_string(),
        };
        vec![ex(1, "物流很快，东西也好", "Positive"), ex(2, "尺码偏小，退货麻烦", "Negative")]
    }

    #[test]
    fn multiple_choice_construction() {
        let t = default_template(Task::Eprstmt);
        let pairs = from_multiple_choice(&examples(), &t, false).unwrap();
        assert_eq!(pairs.len(), 6);
        let prompt = t.render(&examples()[0]).unwrap();
        assert!(pairs[..3].iter().all(|p| p.prompt == prompt && p.margin == 0.0));
        assert!(pairs.iter().all(|p| p.task.as_deref() == Some("eprstmt")));
        let good = "B。因为这条评论表达了正面的情感。";
        let wrong = "A。因为这条评论表达了负面的情感。";
        assert_eq!((pairs[0].chosen.as_str(), pairs[0].rejected.as_str(), pairs[0].format), (good, "B", 1));
        assert_eq!((pairs[1].chosen.as_str(), pairs[1].rejected.as_str(), pairs[1].format), (good, wrong, 2));
        assert_eq!((pairs[2].chosen.as_str(), pairs[2].rejected.as_str(), pairs[2].format), ("B", wrong, 3));
        assert_eq!(pairs[3].chosen, "A。因为这条评论表达了负面的情感。");
        assert_eq!(pairs[5].rejected, "B。因为这条评论表达了正面的情感。");
    }

    #[test]
    fn multiple_choice_pairs_every_wrong_option() {
        let t = default_template(Task::Tnews);
        let examples: Vec<Example> = (0..30)
            .map(|i| Example {
                id: i,
                text: BTreeMap::from([("sentence".to_string(), format!("标题{i}"))]),
                label: t.labels()[i as usize % 15].to_string(),
            })
            .collect();
        let pairs = from_multiple_choice(&examples, &t, false).unwrap();
        // 1 + 2 × 14 pairs per example.
        assert_eq!(pairs.len(), 30 * 29);
        for (ex, p) in examples.iter().zip(pairs.chunks(29)) {
            let correct = t.answer(&ex.label).unwrap();
            assert_eq!((p[0].rejected.as_str(), p[0].format), (correct, 1));
            let mut wrongs: Vec<&str> = p[1..].iter().step_by(2).map(|q| q.rejected.as_str()).collect();
            assert_eq!(wrongs, p[2..].iter().step_by(2).map(|q| q.rejected.as_str()).collect::<Vec<_>>());
            wrongs.dedup();
            assert_eq!(wrongs.len(), 14);
            assert!(wrongs.iter().all(|w| t.label_for_answer(w).is_some_and(|l| l != ex.label)));
        }
        let mut bad = examples[0].clone();
        bad.label = "105".into();
        assert!(from_multiple_choice(&[bad], &t, false).unwrap_err().to_string().contains("\"105\""));
    }

    #[test]
    fn bare_answer_pairs_pit_the_bare_answer_against_each_wrong_one() {
        let t = default_template(Task::Eprstmt);
        let full = from_multiple_choice(&examples(), &t, false).unwrap();
        let bare = bare_answer_pairs(&examples(), &t).unwrap();
        assert_eq!(bare.len(), 2);
        assert_eq!((bare[0].chosen.as_str(), bare[0].rejected.as_str()), ("B", "A"));
        assert!(full[1].rejected.starts_with(&bare[0].rejected));
        assert_eq!(bare[0].prompt, full[0].prompt);
    }

    #[test]
    fn bare_pairs_follow_each_wrong_answers_formats_2_and_3() {
        let t = default_template(Task::Eprstmt);
        let with = from_multiple_choice(&examples(), &t, true).unwrap();
        assert_eq!(with.len(), 8);
        assert_eq!(with.iter().map(|p| p.format).collect::<Vec<_>>(), [1, 2, 3, 4, 1, 2, 3, 4]);
        assert_eq!((with[3].chosen.as_str(), with[3].rejected.as_str()), ("B", "A"));
        let without = from_multiple_choice(&examples(), &t, false).unwrap();
        let kept: Vec<_> = with.iter().filter(|p| p.format != 4).cloned().collect();
        assert_eq!(kept, without);
    }

    #[test]
    fn pair_serde_defaults_margin() {
        let p: PreferencePair = serde_json::from_str(r#"{"prompt":"p","chosen":"a","rejected":"b"}"#).unwrap();
        assert_eq!(p.margin, 0.0);
    }
}
