//! Datasets in TRL's conventions: the type is read from the columns (or
//! stated as `data.format`), each in the standard form (strings) or the
//! conversational form (lists of `{"role", "content"}`):
//!
//! | type | columns |
//! |---|---|
//! | language modeling | `text` / `messages` |
//! | prompt-only | `prompt` |
//! | prompt-completion | `prompt`, `completion` |
//! | preference | `prompt`, `chosen`, `rejected`, or `chosen`, `rejected` (implicit prompt) |
//!
//! ShareGPT rows (`conversations` of `{"from", "value"}`) become `messages`,
//! as TRL's `maybe_convert_to_chatml` does; an implicit prompt is the common
//! start of `chosen` and `rejected`, as its `extract_prompt` does. Other
//! columns (`answer`, ...) are kept for reward functions. Every row is
//! checked when the file is read: a bad one is an error naming `file:line`,
//! the column and what was expected, before any training starts.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::data::jsonl::{line_error, read_records};
use crate::error::{Error, Result};

/// A dataset type of TRL's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    LanguageModeling,
    PromptOnly,
    PromptCompletion,
    Preference,
}

impl Format {
    pub const NAMES: [&'static str; 4] = ["language_modeling", "prompt_only", "prompt_completion", "preference"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "language_modeling" => Some(Self::LanguageModeling),
            "prompt_only" => Some(Self::PromptOnly),
            "prompt_completion" => Some(Self::PromptCompletion),
            "preference" => Some(Self::Preference),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The type whose columns `row` has (TRL's precedence).
    fn infer(row: &Map<String, Value>) -> Option<Self> {
        let has = |k: &str| row.contains_key(k);
        if has("chosen") && has("rejected") {
            Some(Self::Preference)
        } else if has("prompt") && has("completion") {
            Some(Self::PromptCompletion)
        } else if has("text") || has("messages") || has("conversations") {
            Some(Self::LanguageModeling)
        } else if has("prompt") {
            Some(Self::PromptOnly)
        } else {
            None
        }
    }

    /// The columns a row of this type must have.
    fn columns(self, row: &Map<String, Value>) -> &'static [&'static str] {
        match self {
            Self::LanguageModeling if row.contains_key("text") => &["text"],
            Self::LanguageModeling => &["messages"],
            Self::PromptOnly => &["prompt"],
            Self::PromptCompletion => &["prompt", "completion"],
            Self::Preference if row.contains_key("prompt") => &["prompt", "chosen", "rejected"],
            Self::Preference => &["chosen", "rejected"],
        }
    }
}

/// Text, or a conversation.
#[derive(Clone, Debug, PartialEq)]
pub enum Content {
    Text(String),
    Messages(Vec<Value>),
}

impl Content {
    pub fn is_conversational(&self) -> bool {
        matches!(self, Content::Messages(_))
    }
}

/// One row: its line, its content columns by type, the other columns.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub line: usize,
    /// Language modeling: the text or conversation.
    pub text: Option<Content>,
    pub prompt: Option<Content>,
    pub completion: Option<Content>,
    pub chosen: Option<Content>,
    pub rejected: Option<Content>,
    /// Every other column (`answer`, `tools`, `chat_template_kwargs`, ...).
    pub columns: Map<String, Value>,
}

/// A file's rows, all of one type and one form.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub path: PathBuf,
    pub format: Format,
    pub conversational: bool,
    pub rows: Vec<Row>,
}

/// Whether a record looks like one of TRL's types (not FewCLUE's).
pub fn looks_like_trl(row: &Value) -> bool {
    row.as_object().and_then(Format::infer).is_some()
}

/// Reads `path` (JSON lines, a JSON array, or Parquet when it ends in
/// `.parquet`) as a dataset of `format` (inferred from the first row's
/// columns when `None`).
pub fn load(path: &Path, format: Option<Format>) -> Result<Dataset> {
    let records =
        if path.extension().is_some_and(|e| e == "parquet") { read_parquet(path)? } else { read_records(path)? };
    from_values(path, records, format)
}

/// The rows of a Parquet file (as Hugging Face datasets store them;
/// snappy-compressed or uncompressed) as JSON objects numbered from 1;
/// nested lists and structs (conversations) become JSON arrays and objects.
pub fn read_parquet(path: &Path) -> Result<Vec<(usize, Value)>> {
    use parquet::file::reader::SerializedFileReader;
    let bad = |msg: String| Error::Data { path: path.to_path_buf(), msg };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    let mut out = Vec::new();
    for (i, row) in reader.into_iter().enumerate() {
        let row = row.map_err(|e| line_error(path, i + 1, format!("row {}: {e}", i + 1)))?;
        out.push((i + 1, row.to_json_value()));
    }
    Ok(out)
}

/// The rows of `records` (line, value) read from `path`, as [`load`].
pub fn from_values(path: &Path, records: Vec<(usize, Value)>, format: Option<Format>) -> Result<Dataset> {
    let Some((first_line, first)) = records.first() else {
        return Err(Error::Data { path: path.to_path_buf(), msg: "no rows".into() });
    };
    let format = match format {
        Some(f) => f,
        None => {
            let obj = first.as_object().ok_or_else(|| line_error(path, *first_line, "expected a JSON object"))?;
            Format::infer(obj).ok_or_else(|| {
                let cols: Vec<&str> = obj.keys().map(String::as_str).collect();
                line_error(
                    path,
                    *first_line,
                    format!(
                        "columns {cols:?} are none of TRL's dataset types (text | messages | prompt | \
                         prompt+completion | prompt+chosen+rejected | chosen+rejected); set data.format or data.task"
                    ),
                )
            })?
        }
    };
    let mut rows = Vec::with_capacity(records.len());
    let mut form: Option<(bool, usize)> = None;
    for (line, value) in records {
        let row = parse_row(path, line, value, format)?;
        let conv = row_form(&row);
        match form {
            None => form = Some((conv, line)),
            Some((c, at)) if c != conv => {
                let (is, was) = if conv { ("conversational", "standard") } else { ("standard", "conversational") };
                return Err(line_error(
                    path,
                    line,
                    format!("this row is {is}, line {at} is {was}: a file holds one form"),
                ));
            }
            _ => {}
        }
        rows.push(row);
    }
    Ok(Dataset { path: path.to_path_buf(), format, conversational: form.is_some_and(|f| f.0), rows })
}

fn row_form(row: &Row) -> bool {
    [&row.text, &row.prompt, &row.completion, &row.chosen, &row.rejected]
        .into_iter()
        .flatten()
        .any(Content::is_conversational)
}

fn parse_row(path: &Path, line: usize, value: Value, format: Format) -> Result<Row> {
    let Value::Object(mut obj) = value else { return Err(line_error(path, line, "expected a JSON object")) };
    if let Some(conv) = obj.remove("conversations") {
        obj.entry("messages").or_insert(conv);
    }
    let want = format.columns(&obj);
    let mut row =
        Row { line, text: None, prompt: None, completion: None, chosen: None, rejected: None, columns: Map::new() };
    for &col in want {
        let v = obj.remove(col).unwrap_or(Value::Null);
        let content = content(path, line, col, v, format)?;
        match col {
            "text" | "messages" => row.text = Some(content),
            "prompt" => row.prompt = Some(content),
            "completion" => row.completion = Some(content),
            "chosen" => row.chosen = Some(content),
            _ => row.rejected = Some(content),
        }
    }
    match (want, &row.text) {
        (["messages"], Some(Content::Text(_))) => {
            return Err(line_error(
                path,
                line,
                "column \"messages\": expected a list of {\"role\", \"content\"}, got a string",
            ));
        }
        (["text"], Some(Content::Messages(_))) => {
            return Err(line_error(
                path,
                line,
                "column \"text\": expected a string (a conversation goes in \"messages\")",
            ));
        }
        _ => {}
    }
    let forms: Vec<bool> = [&row.prompt, &row.completion, &row.chosen, &row.rejected]
        .into_iter()
        .flatten()
        .map(Content::is_conversational)
        .collect();
    if forms.windows(2).any(|w| w[0] != w[1]) {
        return Err(line_error(path, line, format!("columns {want:?} mix strings and conversations: use one form")));
    }
    if format == Format::Preference && row.prompt.is_none() {
        extract_prompt(&mut row);
    }
    row.columns = obj;
    Ok(row)
}

/// The value of column `col` as text or a conversation.
fn content(path: &Path, line: usize, col: &str, v: Value, format: Format) -> Result<Content> {
    let at = |msg: String| line_error(path, line, format!("column {col:?}: {msg}"));
    match v {
        Value::String(s) => Ok(Content::Text(s)),
        Value::Array(items) => {
            let mut msgs = Vec::with_capacity(items.len());
            for (i, m) in items.into_iter().enumerate() {
                msgs.push(message(m).map_err(|e| at(format!("message {i}: {e}")))?);
            }
            if msgs.is_empty() && col != "prompt" {
                return Err(at("an empty conversation".into()));
            }
            Ok(Content::Messages(msgs))
        }
        Value::Null => Err(at(format!("missing (a {} row needs {:?})", format.name(), format_columns(format)))),
        other => Err(at(format!("expected a string or a list of {{\"role\", \"content\"}}, got {}", kind(&other)))),
    }
}

fn format_columns(format: Format) -> &'static str {
    match format {
        Format::LanguageModeling => "text or messages",
        Format::PromptOnly => "prompt",
        Format::PromptCompletion => "prompt and completion",
        Format::Preference => "chosen and rejected (and prompt)",
    }
}

/// A message as chat templates want it: `role` and `content` strings
/// (ShareGPT's `from`/`value` renamed), other keys kept (`tool_calls`, ...).
fn message(m: Value) -> std::result::Result<Value, String> {
    let Value::Object(mut o) = m else { return Err(format!("expected an object, got {}", kind(&m))) };
    if let (Some(from), Some(value)) = (o.get("from").cloned(), o.get("value").cloned()) {
        let role = match from.as_str() {
            Some("human") => "user",
            Some("gpt") => "assistant",
            Some("system") => "system",
            _ => return Err(format!("\"from\": expected human, gpt or system, got {from}")),
        };
        o.remove("from");
        o.remove("value");
        o.insert("role".into(), Value::String(role.into()));
        o.insert("content".into(), value);
    }
    match o.get("role") {
        Some(Value::String(_)) => {}
        Some(other) => return Err(format!("\"role\": expected a string, got {}", kind(other))),
        None => return Err("missing \"role\"".into()),
    }
    match o.get("content") {
        Some(Value::String(_)) => {}
        Some(Value::Null) | None if o.contains_key("tool_calls") => {}
        Some(other) => return Err(format!("\"content\": expected a string, got {}", kind(other))),
        None => return Err("missing \"content\"".into()),
    }
    Ok(Value::Object(o))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// TRL's `extract_prompt`: the prompt is the common start of `chosen` and
/// `rejected` (a space before the point they differ goes with the
/// answers); without a difference, everything but the last element.
fn extract_prompt(row: &mut Row) {
    match (row.chosen.take(), row.rejected.take()) {
        (Some(Content::Text(c)), Some(Content::Text(r))) => {
            let (c, r): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let mut idx = split_point(&c, &r);
            if idx > 0 && c.get(idx - 1) == Some(&' ') && c.get(idx) != r.get(idx) {
                idx -= 1;
            }
            let s = |v: &[char]| v.iter().collect::<String>();
            row.prompt = Some(Content::Text(s(&c[..idx])));
            row.chosen = Some(Content::Text(s(&c[idx..])));
            row.rejected = Some(Content::Text(s(&r[idx..])));
        }
        (Some(Content::Messages(c)), Some(Content::Messages(r))) => {
            let idx = split_point(&c, &r);
            row.prompt = Some(Content::Messages(c[..idx].to_vec()));
            row.chosen = Some(Content::Messages(c[idx..].to_vec()));
            row.rejected = Some(Content::Messages(r[idx..].to_vec()));
        }
        (c, r) => {
            row.chosen = c;
            row.rejected = r;
        }
    }
}

/// Python's `for idx in range(min(len)): if c[idx] != r[idx]: break` —
/// the first difference, else the last index the loop reached.
fn split_point<T: PartialEq>(c: &[T], r: &[T]) -> usize {
    let n = c.len().min(r.len());
    (0..n).find(|&i| c[i] != r[i]).unwrap_or(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(lines: &[Value], format: Option<Format>) -> Result<Dataset> {
        let recs = lines.iter().cloned().enumerate().map(|(i, v)| (i + 1, v)).collect();
        from_values(Path::new("d.jsonl"), recs, format)
    }

    #[test]
    fn types_are_read_from_the_columns() {
        let cases = [
            (json!({"text": "a"}), Format::LanguageModeling, false),
            (json!({"messages": [{"role": "user", "content": "a"}]}), Format::LanguageModeling, true),
            (json!({"prompt": "a"}), Format::PromptOnly, false),
            (json!({"prompt": [{"role": "user", "content": "a"}], "answer": "4"}), Format::PromptOnly, true),
            (json!({"prompt": "a", "completion": "b"}), Format::PromptCompletion, false),
            (json!({"prompt": "a", "chosen": "b", "rejected": "c"}), Format::Preference, false),
        ];
        for (row, format, conv) in cases {
            let d = rows(std::slice::from_ref(&row), None).unwrap();
            assert_eq!((d.format, d.conversational), (format, conv), "{row}");
        }
        let d = rows(&[json!({"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"})], None).unwrap();
        assert_eq!(d.rows[0].columns["answer"], "2");
    }

    #[test]
    fn sharegpt_rows_become_messages() {
        let d =
            rows(&[json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})], None)
                .unwrap();
        let Some(Content::Messages(m)) = &d.rows[0].text else { panic!() };
        assert_eq!(m[1], json!({"role": "assistant", "content": "yo"}));
    }

    #[test]
    fn implicit_prompts_are_extracted_as_trl_does() {
        let d = rows(&[json!({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"})], None).unwrap();
        let r = &d.rows[0];
        assert_eq!(r.prompt, Some(Content::Text("Q: sky? A:".into())));
        assert_eq!(r.chosen, Some(Content::Text(" blue".into())));
        let u = json!({"role": "user", "content": "sky?"});
        let d = rows(
            &[json!({"chosen": [u, {"role": "assistant", "content": "blue"}], "rejected": [u, {"role": "assistant", "content": "red"}]})],
            None,
        )
        .unwrap();
        assert_eq!(d.rows[0].prompt, Some(Content::Messages(vec![u.clone()])));
        assert!(d.conversational);
    }

    #[test]
    fn bad_rows_name_line_column_and_expectation() {
        let e = rows(&[json!({"prompt": "a", "completion": "b"}), json!({"prompt": "a", "completion": 3})], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.jsonl:2") && e.contains("\"completion\"") && e.contains("got a number"), "{e}");
        let e =
            rows(&[json!({"prompt": "a", "completion": "b"}), json!({"prompt": "a"})], None).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:2") && e.contains("\"completion\": missing"), "{e}");
        let e = rows(&[json!({"messages": [{"role": "user"}]})], None).unwrap_err().to_string();
        assert!(e.contains("message 0: missing \"content\""), "{e}");
        let e = rows(&[json!({"prompt": "a"}), json!({"prompt": [{"role": "user", "content": "a"}]})], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.jsonl:2") && e.contains("one form"), "{e}");
        let e = rows(&[json!({"question": "a"})], None).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:1") && e.contains("data.format"), "{e}");
        let e =
            rows(&[json!({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"})], None)
                .unwrap_err()
                .to_string();
        assert!(e.contains("mix strings and conversations"), "{e}");
        let e = rows(&[json!({"text": "a"})], Some(Format::Preference)).unwrap_err().to_string();
        assert!(e.contains("\"chosen\": missing"), "{e}");
    }
}
