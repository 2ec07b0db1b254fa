//! JSON Lines (or one JSON array) records with their 1-based line numbers,
//! plus small field accessors whose errors name `file:line` and the field.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Reads the records of `path`.
///
/// If the first non-space character of the file is `[`, the file is one JSON
/// array and a record's number is its index + 1. Otherwise it is JSON Lines:
/// blank lines are skipped and a record's number is its 1-based line in the
/// file. A line that is not valid UTF-8 or not valid JSON is an
/// [`Error::DataLine`] naming the file and line.
pub fn read_records(path: &Path) -> Result<Vec<(usize, Value)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        read_array(path, bytes)
    } else {
        read_lines(path, bytes)
    }
}

fn read_array(path: &Path, bytes: &[u8]) -> Result<Vec<(usize, Value)>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        line_error(path, line, "invalid UTF-8")
    })?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| line_error(path, e.line().max(1), format!("invalid JSON: {e}")))?;
    match value {
        Value::Array(items) => Ok(items.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect()),
        _ => Err(Error::Data { path: path.to_path_buf(), msg: "expected a JSON array or JSON Lines".into() }),
    }
}

fn read_lines(path: &Path, bytes: &[u8]) -> Result<Vec<(usize, Value)>> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = std::str::from_utf8(raw).map_err(|_| line_error(path, line, "invalid UTF-8"))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let value = serde_json::from_str(text).map_err(|e| line_error(path, line, format!("invalid JSON: {e}")))?;
        out.push((line, value));
    }
    Ok(out)
}

pub(crate) fn line_error(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::DataLine { path: path.to_path_buf(), line, msg: msg.into() }
}

/// One record being decoded: knows where it came from, so every error names
/// `file:line` and the field.
pub(crate) struct Record<'a> {
    pub path: &'a Path,
    pub line: usize,
    pub obj: &'a Map<String, Value>,
}

impl<'a> Record<'a> {
    pub fn new(path: &'a Path, line: usize, value: &'a Value) -> Result<Self> {
        match value {
            Value::Object(obj) => Ok(Self { path, line, obj }),
            _ => Err(line_error(path, line, "expected a JSON object")),
        }
    }

    pub fn err(&self, msg: impl Into<String>) -> Error {
        line_error(self.path, self.line, msg)
    }

    pub fn field(&self, name: &str) -> Result<&'a Value> {
        match self.obj.get(name) {
            Some(Value::Null) | None => Err(self.err(format!("missing field {name:?}"))),
            Some(v) => Ok(v),
        }
    }

    pub fn str_field(&self, name: &str) -> Result<&'a str> {
        self.field(name)?.as_str().ok_or_else(|| self.err(format!("field {name:?}: expected a string")))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn jsonl_skips_blank_lines_and_keeps_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "a.jsonl", b"{\"a\":1}\n\n  \r\n{\"a\":2}\r\n");
        let recs = read_records(&p).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].0, 1);
        assert_eq!(recs[1].0, 4);
        assert_eq!(recs[1].1["a"], 2);
    }

    #[test]
    fn json_array_numbers_by_index() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "a.json", b"\xEF\xBB\xBF  [\n {\"a\":1},\n {\"a\":2}\n]");
        let recs = read_records(&p).unwrap();
        assert_eq!(recs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn corrupt_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "bad.jsonl", b"{\"a\":1}\n{\"a\":\n{\"a\":3}\n");
        match read_records(&p) {
            Err(Error::DataLine { path, line, .. }) => {
                assert_eq!(path, p);
                assert_eq!(line, 2);
            }
            other => panic!("expected DataLine, got {other:?}"),
        }
        let p = write(&dir, "utf8.jsonl", b"{\"a\":1}\n\"\xff\"\n");
        assert!(matches!(read_records(&p), Err(Error::DataLine { line: 2, .. })));
        let e = read_records(&p).unwrap_err().to_string();
        assert!(e.contains("utf8.jsonl:2"), "{e}");
    }

    #[test]
    fn corrupt_array_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "bad.json", b"[\n{\"a\":1},\n{\"a\" 2}\n]");
        assert!(matches!(read_records(&p), Err(Error::DataLine { line: 3, .. })));
        assert!(matches!(read_records(&dir.path().join("nope.json")), Err(Error::Io { .. })));
    }

    #[test]
    fn record_field_errors_name_the_field() {
        let p = Path::new("x.jsonl");
        let v: Value = serde_json::json!({"a": 1, "n": null});
        let r = Record::new(p, 7, &v).unwrap();
        let e = r.str_field("a").unwrap_err().to_string();
        assert!(e.contains("x.jsonl:7") && e.contains("\"a\""), "{e}");
        assert!(r.field("n").unwrap_err().to_string().contains("missing field \"n\""));
        assert!(Record::new(p, 1, &serde_json::json!([1])).is_err());
    }
}
