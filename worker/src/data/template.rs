//! Prompt templates and verbalizers in the style of the paper's Table 6: an
//! instruction, the text, lettered options, then `答案：`. The answers are
//! single capital letters (A, B, … O for TNEWS), so one generated token
//! decides the prediction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::fewclue::{label_name_zh, labels, Example, Task};
use crate::error::{Error, Result};

/// The text placeholders a template may use, besides `{options}`.
const TEXT_FIELDS: [&str; 3] = ["sentence", "sentence1", "sentence2"];
const OPTIONS: &str = "options";

/// A prompt template with its verbalizer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub task: Task,
    /// Prompt text with `{sentence}`, `{sentence1}`, `{sentence2}` and
    /// `{options}` placeholders; `{{` and `}}` are literal braces.
    pub template: String,
    /// `(label, answer, option description)` in option order, e.g.
    /// `("Positive", "B", "正面")`.
    pub verbalizer: Vec<(String, String, String)>,
    /// The rationale of an answer, with an `{option}` placeholder for the
    /// option description, e.g. `因为这条评论表达了{option}的情感。`.
    pub explanation: String,
}

enum Piece<'a> {
    Lit(&'a str),
    Var(&'a str),
}

/// Splits `s` into literal text and `{name}` placeholders.
fn parse(s: &str) -> Result<Vec<Piece<'_>>> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find(['{', '}']) {
        out.push(Piece::Lit(&rest[..i]));
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push(Piece::Lit(&tail[..1]));
            rest = &tail[2..];
        } else if let Some(after) = tail.strip_prefix('}') {
            out.push(Piece::Lit("}"));
            rest = after;
        } else {
            let end = tail
                .find('}')
                .ok_or_else(|| Error::InvalidArgument(format!("template: unmatched '{{' in {:?}", short(tail))))?;
            out.push(Piece::Var(&tail[1..end]));
            rest = &tail[end + 1..];
        }
    }
    out.push(Piece::Lit(rest));
    Ok(out)
}

fn short(s: &str) -> String {
    s.chars().take(20).collect()
}

fn prompt_of(task: Task) -> (&'static str, &'static str) {
    match task {
        Task::Eprstmt => (
            "判断下面这条商品评论的情感倾向。\n评论：{sentence}\n选项：\n{options}\n答案：",
            "因为这条评论表达了{option}的情感。",
        ),
        Task::Tnews => (
            "判断下面这条新闻标题属于哪个类别。\n标题：{sentence}\n选项：\n{options}\n答案：",
            "因为这条新闻的内容属于{option}类。",
        ),
        Task::Ocnli => (
            "根据前提，判断假设与前提之间的逻辑关系。\n前提：{sentence1}\n假设：{sentence2}\n选项：\n{options}\n答案：",
            "因为前提与假设之间是{option}关系。",
        ),
        Task::Bustm => (
            "判断下面两句话的意思是否相似。\n句子一：{sentence1}\n句子二：{sentence2}\n选项：\n{options}\n答案：",
            "因为这两句话的意思{option}。",
        ),
    }
}

/// The default template of `task`: options in [`labels`] order, answered by
/// the letters A, B, C, …
pub fn default_template(task: Task) -> Template {
    let (template, explanation) = prompt_of(task);
    let verbalizer = labels(task)
        .into_iter()
        .zip('A'..='Z')
        .map(|(label, letter)| {
            let desc = label_name_zh(task, label).unwrap_or(label);
            (label.to_string(), letter.to_string(), desc.to_string())
        })
        .collect();
    Template { task, template: template.to_string(), verbalizer, explanation: explanation.to_string() }
}

impl Template {
    /// The default template of `task`, with the prompt text and/or some
    /// answers (label → answer text) replaced. The template may use only
    /// the task's text fields and `{options}`, and must use every text field;
    /// answers must be non-empty and distinct. Errors name the bad
    /// placeholder or label.
    pub fn with_overrides(
        task: Task,
        template: Option<String>,
        verbalizer: Option<BTreeMap<String, String>>,
    ) -> Result<Template> {
        let mut t = default_template(task);
        if let Some(text) = template {
            let fields = task.fields();
            let mut used = Vec::new();
            for piece in parse(&text)? {
                if let Piece::Var(name) = piece {
                    if name != OPTIONS && !fields.contains(&name) {
                        let valid: Vec<String> = fields.iter().chain([&OPTIONS]).map(|f| format!("{{{f}}}")).collect();
                        return Err(Error::InvalidArgument(format!(
                            "template: placeholder {{{name}}} is not valid for {task} (valid: {})",
                            valid.join(", ")
                        )));
                    }
                    used.push(name);
                }
            }
            if let Some(missing) = fields.iter().find(|f| !used.contains(f)) {
                return Err(Error::InvalidArgument(format!(
                    "template: placeholder {{{missing}}} is required for {task}"
                )));
            }
            t.template = text;
        }
        if let Some(map) = verbalizer {
            for (label, answer) in map {
                let answer = answer.trim();
                let Some(entry) = t.verbalizer.iter_mut().find(|(l, _, _)| *l == label) else {
                    return Err(Error::InvalidArgument(format!(
                        "verbalizer: unknown {task} label {label:?} (valid: {})",
                        labels(task).join(", ")
                    )));
                };
                if answer.is_empty() {
                    return Err(Error::InvalidArgument(format!("verbalizer: empty answer for label {label:?}")));
                }
                entry.1 = answer.to_string();
            }
            for (i, (label, answer, _)) in t.verbalizer.iter().enumerate() {
                if let Some((other, _, _)) = t.verbalizer[..i].iter().find(|(_, a, _)| a == answer) {
                    return Err(Error::InvalidArgument(format!(
                        "verbalizer: labels {other:?} and {label:?} share the answer {answer:?}"
                    )));
                }
            }
        }
        Ok(t)
    }

    /// The prompt for `ex`. An unknown placeholder or a text field that `ex`
    /// lacks is an error naming it.
    pub fn render(&self, ex: &Example) -> Result<String> {
        let mut out = String::with_capacity(self.template.len() + 64);
        for piece in parse(&self.template)? {
            match piece {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var(OPTIONS) => out.push_str(&self.options_text()),
                Piece::Var(name) if TEXT_FIELDS.contains(&name) => match ex.text.get(name) {
                    Some(v) => out.push_str(v),
                    None => {
                        return Err(Error::InvalidArgument(format!(
                            "example {}: missing field {name:?} used by the template",
                            ex.id
                        )))
                    }
                },
                Piece::Var(name) => {
                    return Err(Error::InvalidArgument(format!(
                        "template: unknown placeholder {{{name}}} (valid: {{sentence}}, {{sentence1}}, {{sentence2}}, {{options}})"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The options block: one `"{answer}. {description}"` line per label.
    pub fn options_text(&self) -> String {
        let lines: Vec<String> = self.verbalizer.iter().map(|(_, a, d)| format!("{a}. {d}")).collect();
        lines.join("\n")
    }

    fn entry(&self, label: &str) -> Result<&(String, String, String)> {
        self.verbalizer.iter().find(|(l, _, _)| l == label).ok_or_else(|| {
            let valid: Vec<&str> = self.verbalizer.iter().map(|(l, _, _)| l.as_str()).collect();
            Error::InvalidArgument(format!("unknown {} label {label:?} (valid: {})", self.task, valid.join(", ")))
        })
    }

    /// The answer text of `label` (e.g. `"B"`).
    pub fn answer(&self, label: &str) -> Result<&str> {
        Ok(&self.entry(label)?.1)
    }

    /// Every answer text, in option order.
    pub fn answers(&self) -> Vec<&str> {
        self.verbalizer.iter().map(|(_, a, _)| a.as_str()).collect()
    }

    /// The labels, in option order.
    pub fn labels(&self) -> Vec<&str> {
        self.verbalizer.iter().map(|(l, _, _)| l.as_str()).collect()
    }

    /// The label a generated text answers: the trimmed text equal to an
    /// answer, else the longest answer the trimmed text starts with (so
    /// `"B. 正面"` reads as `"B"`); `None` if no answer matches.
    pub fn label_for_answer(&self, text: &str) -> Option<&str> {
        let t = text.trim();
        if t.is_empty() {
            return None;
        }
        if let Some((l, _, _)) = self.verbalizer.iter().find(|(_, a, _)| a == t) {
            return Some(l);
        }
        self.verbalizer
            .iter()
            .filter(|(_, a, _)| !a.is_empty() && t.starts_with(a.as_str()))
            .max_by_key(|(_, a, _)| a.len())
            .map(|(l, _, _)| l.as_str())
    }

    /// A short rationale for `label`, e.g. `因为这条评论表达了正面的情感。`.
    pub fn explanation(&self, label: &str) -> Result<String> {
        let desc = &self.entry(label)?.2;
        Ok(self.explanation.replace("{option}", desc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(task: Task, label: &str) -> Example {
        let text = task.fields().iter().enumerate().map(|(i, f)| (f.to_string(), format!("文本{i}"))).collect();
        Example { id: 1, text, label: label.to_string() }
    }

    #[test]
    fn eprstmt_default_renders_like_table_6() {
        let t = default_template(Task::Eprstmt);
        let ex = Example {
            id: 1,
            text: [("sentence".to_string(), "质量不错".to_string())].into(),
            label: "Positive".into(),
        };
        assert_eq!(
            t.render(&ex).unwrap(),
            "判断下面这条商品评论的情感倾向。\n评论：质量不错\n选项：\nA. 负面\nB. 正面\n答案："
        );
        assert_eq!(t.answer("Positive").unwrap(), "B");
        assert_eq!(t.answers(), ["A", "B"]);
        assert_eq!(t.explanation("Positive").unwrap(), "因为这条评论表达了正面的情感。");
        assert!(t.answer("Neutral").unwrap_err().to_string().contains("\"Neutral\""));
    }

    #[test]
    fn every_default_template_renders_and_round_trips() {
        for task in Task::ALL {
            let t = default_template(task);
            let letters: Vec<String> = ('A'..='Z').take(labels(task).len()).map(String::from).collect();
            assert_eq!(t.answers(), letters);
            for label in labels(task) {
                let prompt = t.render(&example(task, label)).unwrap();
                assert!(prompt.ends_with("答案：") && prompt.contains("文本0"), "{prompt}");
                assert!(!prompt.contains('{'), "{prompt}");
                let a = t.answer(label).unwrap();
                assert_eq!(t.label_for_answer(a), Some(label));
                let e = t.explanation(label).unwrap();
                assert!(e.starts_with("因为") && !e.contains('{'), "{e}");
            }
        }
        assert_eq!(default_template(Task::Tnews).answers().last(), Some(&"O"));
    }

    #[test]
    fn label_for_answer_trims_and_reads_first_char() {
        let t = default_template(Task::Ocnli);
        assert_eq!(t.label_for_answer(" C\n"), Some("contradiction"));
        assert_eq!(t.label_for_answer("A. 蕴含"), Some("entailment"));
        assert_eq!(t.label_for_answer("D"), None);
        assert_eq!(t.label_for_answer("  "), None);
        let t = Template::with_overrides(
            Task::Bustm,
            None,
            Some([("0".to_string(), "1".to_string()), ("1".to_string(), "10".to_string())].into()),
        )
        .unwrap();
        assert_eq!(t.label_for_answer("10"), Some("1"), "longest prefix wins");
        assert_eq!(t.label_for_answer("1"), Some("0"));
    }

    #[test]
    fn overrides_apply_and_validate() {
        let t = Template::with_overrides(
            Task::Eprstmt,
            Some("评论：{sentence}\n{options}\n{{答案}}：".into()),
            Some([("Positive".to_string(), " 好 ".to_string())].into()),
        )
        .unwrap();
        let ex = example(Task::Eprstmt, "Positive");
        assert_eq!(t.render(&ex).unwrap(), "评论：文本0\nA. 负面\n好. 正面\n{答案}：");
        assert_eq!(t.answer("Positive").unwrap(), "好");

        let err = |tpl: Option<&str>, verb: Option<&[(&str, &str)]>| {
            let verb = verb.map(|v| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect());
            Template::with_overrides(Task::Bustm, tpl.map(String::from), verb).unwrap_err().to_string()
        };
        assert!(err(Some("{sentence1} {sentence}"), None).contains("{sentence}"));
        assert!(err(Some("{sentence1} {options}"), None).contains("{sentence2}"));
        assert!(err(Some("{sentence1} {sentence2"), None).contains("unmatched"));
        assert!(err(None, Some(&[("2", "C")])).contains("\"2\""));
        assert!(err(None, Some(&[("0", " ")])).contains("\"0\""));
        assert!(err(None, Some(&[("0", "B")])).contains("share the answer \"B\""));
    }

    #[test]
    fn render_names_unknown_placeholder_and_missing_field() {
        let mut t = default_template(Task::Eprstmt);
        t.template = "{title} {sentence}".into();
        assert!(t.render(&example(Task::Eprstmt, "Positive")).unwrap_err().to_string().contains("{title}"));
        t.template = "{sentence1}".into();
        assert!(t.render(&example(Task::Eprstmt, "Positive")).unwrap_err().to_string().contains("\"sentence1\""));
    }
}
