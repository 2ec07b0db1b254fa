//! The model's own chat template: the Jinja `chat_template` of a Hugging
//! Face model directory (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`), rendered with minijinja the way transformers'
//! `apply_chat_template` renders it with Jinja2: `trim_blocks` and
//! `lstrip_blocks` on, Python string and dict methods (`.strip()`,
//! `.items()`), `raise_exception`, `strftime_now`, and a `tojson` that
//! writes what Python's `json.dumps(ensure_ascii=False)` writes. The
//! tokenizer's special tokens (`bos_token`, `eos_token`, ...) are in scope,
//! as in transformers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

use crate::error::{Error, Result};

const NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (a file, or `tokenizer_config.json`).
    pub origin: PathBuf,
    specials: BTreeMap<String, Json>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The template of the model in `dir`: `chat_template.jinja` (what
    /// transformers 4.43+ saves), else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of `{name, template}` of which
    /// `default` is used). `None` when the model has none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let specials = special_tokens(dir);
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            return Self::new(text, jinja, specials).map(Some);
        }
        let config = dir.join("tokenizer_config.json");
        let Some(tc) = read_json(&config) else { return Ok(None) };
        let text = match tc.get("chat_template") {
            None | Some(Json::Null) => return Ok(None),
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(named)) => {
                let default = named.iter().find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
                match default.and_then(|t| t.get("template")).and_then(Json::as_str) {
                    Some(s) => s.to_string(),
                    None => {
                        return Err(template_error(&config, "chat_template: a list without a \"default\" template"))
                    }
                }
            }
            Some(_) => return Err(template_error(&config, "chat_template: expected a string or a list")),
        };
        Self::new(text, config, specials).map(Some)
    }

    /// A template from its own file (`data.chat_template`), with the special
    /// tokens of the model in `model_dir`.
    pub fn from_file(path: &Path, model_dir: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::new(text, path.to_path_buf(), special_tokens(model_dir))
    }

    /// Compiles `source`; a syntax error names `origin` and the line.
    pub fn new(source: String, origin: PathBuf, specials: BTreeMap<String, Json>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| strftime_utc(&fmt, unix_now()));
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source).map_err(|e| render_error(&origin, &e))?;
        Ok(Self { env, origin, specials })
    }

    /// The text of `messages` (a list of `{"role", "content", ...}`), with
    /// the assistant header appended when `add_generation_prompt`. `extra`
    /// is passed to the template as more variables (`tools`,
    /// `enable_thinking`, ...), as transformers' `**kwargs`.
    pub fn render(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Json>,
    ) -> Result<String> {
        let mut ctx: BTreeMap<String, Value> =
            self.specials.iter().map(|(k, v)| (k.clone(), Value::from_serialize(v))).collect();
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        for (k, v) in extra {
            ctx.insert(k.clone(), Value::from_serialize(v));
        }
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        let template = self.env.get_template(NAME).map_err(|e| render_error(&self.origin, &e))?;
        template.render(ctx).map_err(|e| render_error(&self.origin, &e))
    }
}

/// The special tokens of `tokenizer_config.json` by name (`bos_token`,
/// `eos_token`, `pad_token`, `unk_token`, ... and
/// `additional_special_tokens`), as transformers hands them to templates.
fn special_tokens(dir: &Path) -> BTreeMap<String, Json> {
    let mut out = BTreeMap::new();
    let Some(tc) = read_json(&dir.join("tokenizer_config.json")) else { return out };
    for key in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
        let token = match tc.get(key) {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_string),
            _ => None,
        };
        if let Some(t) = token {
            out.insert(key.to_string(), Json::String(t));
        }
    }
    if let Some(extra @ Json::Array(_)) = tc.get("additional_special_tokens") {
        out.insert("additional_special_tokens".into(), extra.clone());
    }
    out
}

fn read_json(path: &Path) -> Option<Json> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn template_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::ChatTemplate { path: path.to_path_buf(), msg: msg.into() }
}

/// A minijinja error with its line, and a template's own
/// `raise_exception` message as it wrote it.
fn render_error(path: &Path, e: &minijinja::Error) -> Error {
    let mut msg = match e.line() {
        Some(line) => format!("line {line}: "),
        None => String::new(),
    };
    msg.push_str(&e.detail().map(str::to_string).unwrap_or_else(|| e.kind().to_string()));
    template_error(path, msg)
}

/// Jinja's `tojson` as transformers defines it: `json.dumps(x,
/// ensure_ascii=False, indent=indent, separators=separators,
/// sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "separators: expected two strings")),
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let style = JsonStyle { indent, item, key, sort_keys: sort_keys.unwrap_or(false) };
    let mut out = String::new();
    style.write(&value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<usize>,
    item: String,
    key: String,
    sort_keys: bool,
}

impl JsonStyle {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    }

    fn write(&self, v: &Value, depth: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => match v.as_i64() {
                Some(i) if v.is_integer() => out.push_str(&i.to_string()),
                _ => out.push_str(&python_float(f64::try_from(v.clone())?)),
            },
            ValueKind::String => out.push_str(&serde_json::to_string(v.as_str().unwrap_or("")).unwrap_or_default()),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(depth + 1, out);
                    let name = k.as_str().map(str::to_string).unwrap_or_else(|| k.to_string());
                    out.push_str(&serde_json::to_string(&name).unwrap_or_default());
                    out.push_str(&self.key);
                    self.write(&v.get_item(k)?, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push('}');
            }
            _ => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(depth + 1, out);
                    self.write(item, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push(']');
            }
        }
        Ok(())
    }
}

/// Python's `repr` of a float, as `json.dumps` writes it (`1.0`, `0.1`,
/// `1e-07`, `NaN`).
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let exp = if x == 0.0 { 0 } else { x.abs().log10().floor() as i32 };
    if !(-4..16).contains(&exp) {
        let s = format!("{x:e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        return format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    let s = format!("{x}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `strftime` for the directives chat templates use (`%d %b %Y`, `%B`,
/// `%m`, `%H:%M:%S`, `%%`), in UTC.
fn strftime_utc(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(src: &str) -> ChatTemplate {
        let specials = BTreeMap::from([("eos_token".to_string(), json!("</s>"))]);
        ChatTemplate::new(src.into(), "t.jinja".into(), specials).unwrap()
    }

    #[test]
    fn renders_with_jinja2_whitespace_rules_and_python_methods() {
        let t = template(
            "{% for m in messages %}\n  {{ m['role'] }}: {{ m.content.strip() }}{{ eos_token }}\n{% endfor %}\n{% if add_generation_prompt %}assistant:{% endif %}",
        );
        let msgs = [json!({"role": "user", "content": "  你好 👋 "}), json!({"role": "assistant", "content": "hi"})];
        let text = t.render(&msgs, true, &Default::default()).unwrap();
        assert_eq!(text, "  user: 你好 👋</s>\n  assistant: hi</s>\nassistant:");
    }

    #[test]
    fn raise_exception_and_syntax_errors_name_the_template() {
        let t = template("{{ raise_exception('roles must alternate') }}");
        let e = t.render(&[], false, &Default::default()).unwrap_err().to_string();
        assert!(e.contains("t.jinja") && e.contains("roles must alternate"), "{e}");
        let e = ChatTemplate::new("{% if %}".into(), "bad.jinja".into(), BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("bad.jinja") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let t = template("{{ x | tojson }}|{{ x | tojson(indent=2) }}");
        let mut extra = serde_json::Map::new();
        extra.insert("x".into(), json!({"a": [1, 2.5, "é"], "b": null, "c": 1e-7}));
        let text = t.render(&[], false, &extra).unwrap();
        assert_eq!(
            text,
            "{\"a\": [1, 2.5, \"é\"], \"b\": null, \"c\": 1e-07}|{\n  \"a\": [\n    1,\n    2.5,\n    \"é\"\n  ],\n  \"b\": null,\n  \"c\": 1e-07\n}"
        );
    }

    #[test]
    fn strftime_covers_the_template_directives() {
        // 2024-07-26 13:25:09 UTC
        assert_eq!(strftime_utc("%d %b %Y %B %m %H:%M:%S %%", 1_722_000_309), "26 Jul 2024 July 07 13:25:09 %");
    }
}
