//! Rows of a TRL-format dataset as token ids and a loss mask, tokenized as
//! TRL's trainers do it:
//!
//! - standard text: the tokenizer's own special tokens, the eos token
//!   appended to `text` / `completion` when it is not already there;
//! - conversations: the model's chat template (`add_generation_prompt`
//!   after a prompt), tokenized without adding special tokens, as
//!   transformers' `apply_chat_template(..., tokenize=True)`;
//! - the loss covers the completion only (prompt-completion, preference)
//!   and the assistant turns only (`messages`): a turn's tokens are those
//!   the template adds between the conversation before it with the
//!   generation prompt and the conversation through it, so any template
//!   works, with or without `{% generation %}` markers.

use std::ops::Range;

use rlhf_model::{ChatTemplate, Tokenizer};
use serde_json::{Map, Value};

use crate::data::formats::{Content, Dataset, Row};
use crate::data::jsonl::line_error;
use crate::data::preference::PreferencePair;
use crate::error::{Error, Result};

/// Token ids and which of them the loss covers (1) or not (0).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub loss_mask: Vec<u8>,
}

impl Encoded {
    fn split(prompt: usize, ids: Vec<i64>) -> Self {
        let loss_mask = (0..ids.len()).map(|i| u8::from(i >= prompt)).collect();
        Self { ids, loss_mask }
    }

    /// Keeps the first `max_len` tokens (TRL's `max_length`).
    pub fn truncate(&mut self, max_len: usize) {
        self.ids.truncate(max_len);
        self.loss_mask.truncate(max_len);
    }

    pub fn trained(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m == 1).count()
    }
}

pub struct Renderer<'a> {
    pub tok: &'a Tokenizer,
    pub chat: Option<&'a ChatTemplate>,
    /// Appended to standard text and completions (TRL's `add_eos`).
    pub eos_text: String,
}

impl<'a> Renderer<'a> {
    pub fn new(tok: &'a Tokenizer, chat: Option<&'a ChatTemplate>) -> Result<Self> {
        let eos = tok
            .eos_ids
            .first()
            .copied()
            .ok_or_else(|| Error::InvalidArgument("the tokenizer has no eos token".into()))?;
        let eos_text = tok.decode(&[eos], false)?;
        Ok(Self { tok, chat, eos_text })
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.chat.ok_or_else(|| {
            Error::InvalidArgument(
                "conversational rows need a chat template, and the model has none (no chat_template.jinja, no \
                 chat_template in tokenizer_config.json): set data.chat_template to a Jinja file"
                    .into(),
            )
        })
    }

    /// The template's extra variables of `row`: its `tools` and
    /// `chat_template_kwargs` columns, as TRL passes them.
    fn extra(row: &Row) -> Map<String, Value> {
        let mut extra = Map::new();
        match row.columns.get("tools") {
            Some(Value::String(s)) => {
                if let Ok(v) = serde_json::from_str(s) {
                    extra.insert("tools".into(), v);
                }
            }
            Some(v @ Value::Array(_)) => {
                extra.insert("tools".into(), v.clone());
            }
            _ => {}
        }
        if let Some(Value::Object(kw)) = row.columns.get("chat_template_kwargs") {
            extra.extend(kw.clone());
        }
        extra
    }

    pub(crate) fn chat_text(&self, msgs: &[Value], generation_prompt: bool, row: &Row) -> Result<String> {
        Ok(self.template()?.render(msgs, generation_prompt, &Self::extra(row))?)
    }

    fn chat_ids(&self, msgs: &[Value], generation_prompt: bool, row: &Row) -> Result<Vec<i64>> {
        Ok(self.tok.encode(&self.chat_text(msgs, generation_prompt, row)?, false)?)
    }

    fn with_eos(&self, text: &str) -> String {
        if text.ends_with(&self.eos_text) {
            text.to_string()
        } else {
            format!("{text}{}", self.eos_text)
        }
    }

    /// The ids a policy generates after: a conversation with the
    /// generation prompt, or the text with the tokenizer's special tokens.
    pub fn prompt_ids(&self, row: &Row) -> Result<Vec<i64>> {
        match &row.prompt {
            Some(Content::Messages(m)) => self.chat_ids(m, true, row),
            Some(Content::Text(t)) => Ok(self.tok.encode(t, true)?),
            None => Err(Error::InvalidArgument("the row has no prompt".into())),
        }
    }

    /// `prompt` followed by `completion`, the loss on the completion.
    pub fn completion(&self, row: &Row, prompt: &Content, completion: &Content) -> Result<Encoded> {
        match (prompt, completion) {
            (Content::Messages(p), Content::Messages(c)) => {
                let prompt_ids = self.chat_ids(p, true, row)?;
                let all: Vec<Value> = p.iter().chain(c).cloned().collect();
                Ok(Encoded::split(prompt_ids.len(), self.chat_ids(&all, false, row)?))
            }
            (Content::Text(p), Content::Text(c)) => {
                let prompt_ids = self.tok.encode(p, true)?;
                Ok(Encoded::split(prompt_ids.len(), self.tok.encode(&self.with_eos(&format!("{p}{c}")), true)?))
            }
            _ => Err(Error::InvalidArgument("prompt and completion mix text and conversations".into())),
        }
    }

    /// A row as one trained sequence: language modeling (every token of a
    /// text, the assistant turns of a conversation), prompt-completion
    /// (the completion), or prompt-only (nothing trained: the prompt as a
    /// policy sees it).
    pub fn sequence(&self, row: &Row) -> Result<Encoded> {
        if let Some(text) = &row.text {
            return match text {
                Content::Text(t) => {
                    let ids = self.tok.encode(&self.with_eos(t), true)?;
                    Ok(Encoded::split(0, ids))
                }
                Content::Messages(m) => self.assistant_turns(m, row),
            };
        }
        match (&row.prompt, &row.completion) {
            (Some(p), Some(c)) => self.completion(row, p, c),
            (Some(_), None) => {
                let ids = self.prompt_ids(row)?;
                Ok(Encoded { loss_mask: vec![0; ids.len()], ids })
            }
            _ => Err(Error::InvalidArgument("a preference row is a pair: see pair()".into())),
        }
    }

    /// A preference row's chosen and rejected sequences.
    pub fn pair(&self, row: &Row) -> Result<(Encoded, Encoded)> {
        let empty = |c: &Content| match c {
            Content::Text(_) => Content::Text(String::new()),
            Content::Messages(_) => Content::Messages(Vec::new()),
        };
        let (Some(c), Some(r)) = (&row.chosen, &row.rejected) else {
            return Err(Error::InvalidArgument("not a preference row".into()));
        };
        let prompt = row.prompt.clone().unwrap_or_else(|| empty(c));
        Ok((self.completion(row, &prompt, c)?, self.completion(row, &prompt, r)?))
    }

    /// A conversation with the loss on its assistant turns.
    fn assistant_turns(&self, msgs: &[Value], row: &Row) -> Result<Encoded> {
        let full = self.chat_text(msgs, false, row)?;
        let mut spans: Vec<Range<usize>> = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            if m.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let before = self.chat_text(&msgs[..i], true, row)?;
            let through = self.chat_text(&msgs[..=i], false, row)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(Error::InvalidArgument(format!(
                    "the chat template renders message {i} differently once later turns follow, so its assistant \
                     tokens cannot be told apart; give this data as prompt/completion columns"
                )));
            }
            spans.push(before.len()..through.len());
        }
        if spans.is_empty() {
            return Err(Error::InvalidArgument("column \"messages\": no assistant turn to train on".into()));
        }
        let toks = self.tok.encode_with_offsets(&full, false)?;
        let loss_mask = toks.iter().map(|(_, (s, _))| u8::from(spans.iter().any(|sp| sp.contains(s)))).collect();
        Ok(Encoded { ids: toks.into_iter().map(|(id, _)| id).collect(), loss_mask })
    }
}

/// The preference rows of `ds` as text pairs for the reward stage:
/// standard rows as they are (an implicit prompt extracted), conversations
/// rendered through the chat template (`templated`: the turn's end tokens
/// included, nothing added at tokenization).
pub fn preference_pairs(ds: &Dataset, r: &Renderer<'_>) -> Result<Vec<PreferencePair>> {
    let mut out = Vec::with_capacity(ds.rows.len());
    for row in &ds.rows {
        let pair = match (&row.prompt, &row.chosen, &row.rejected) {
            (Some(Content::Text(p)), Some(Content::Text(c)), Some(Content::Text(rj))) => {
                PreferencePair::new(p.as_str(), c.as_str(), rj.as_str())
            }
            (Some(Content::Messages(p)), Some(Content::Messages(c)), Some(Content::Messages(rj))) => {
                let prompt = r.chat_text(p, true, row).map_err(|e| at_row(ds, row, e))?;
                let response = |turns: &[Value]| -> Result<String> {
                    let all: Vec<Value> = p.iter().chain(turns).cloned().collect();
                    let full = r.chat_text(&all, false, row)?;
                    full.strip_prefix(prompt.as_str()).map(str::to_string).ok_or_else(|| {
                        Error::InvalidArgument(
                            "the chat template renders the prompt differently once a response follows".into(),
                        )
                    })
                };
                let chosen = response(c).map_err(|e| at_row(ds, row, e))?;
                let rejected = response(rj).map_err(|e| at_row(ds, row, e))?;
                PreferencePair { templated: true, ..PreferencePair::new(prompt, chosen, rejected) }
            }
            _ => return Err(line_error(&ds.path, row.line, "not a preference row (prompt, chosen, rejected)")),
        };
        let margin = match row.columns.get("margin") {
            None | Some(Value::Null) => 0.0,
            Some(v) => v
                .as_f64()
                .filter(|m| m.is_finite())
                .ok_or_else(|| line_error(&ds.path, row.line, "column \"margin\": expected a finite number"))?,
        };
        out.push(PreferencePair { margin: margin as f32, ..pair });
    }
    Ok(out)
}

/// Every row of `ds` as one sequence, errors naming `file:line`.
pub fn sequences(ds: &Dataset, r: &Renderer<'_>) -> Result<Vec<Encoded>> {
    ds.rows.iter().map(|row| r.sequence(row).map_err(|e| at_row(ds, row, e))).collect()
}

/// An error about `row` of `ds`, as `file:line: ...`.
pub fn at_row(ds: &Dataset, row: &Row, e: Error) -> Error {
    match e {
        Error::DataLine { .. } => e,
        Error::InvalidArgument(msg) => line_error(&ds.path, row.line, msg),
        other => line_error(&ds.path, row.line, other.to_string()),
    }
}

/// The chat template a job uses: `data.chat_template` (a Jinja file) when
/// set, else the model's own (`None` when it has none).
pub fn chat_template(model_dir: &std::path::Path, path: Option<&std::path::Path>) -> Result<Option<ChatTemplate>> {
    Ok(match path {
        Some(p) => Some(ChatTemplate::from_file(p, model_dir)?),
        None => ChatTemplate::from_model_dir(model_dir)?,
    })
}

/// What `rlhf-worker render` prints: per row of `data` (at most `limit`),
/// one JSON line `{"ids", "loss_mask"}`, or `{"chosen": {...},
/// "rejected": {...}}` for a preference row. Every row is checked first.
pub fn render_file(
    model_dir: &std::path::Path,
    data: &std::path::Path,
    format: Option<crate::data::formats::Format>,
    template: Option<&std::path::Path>,
    limit: Option<usize>,
) -> Result<Vec<String>> {
    let cfg = rlhf_model::Config::from_dir(model_dir)?;
    let tok = Tokenizer::load(model_dir, &cfg)?;
    let chat = chat_template(model_dir, template)?;
    let r = Renderer::new(&tok, chat.as_ref())?;
    let ds = crate::data::formats::load(data, format)?;
    let n = limit.unwrap_or(usize::MAX).min(ds.rows.len());
    let mut out = Vec::with_capacity(n);
    for row in &ds.rows[..n] {
        let value = if row.chosen.is_some() {
            let (c, rj) = r.pair(row).map_err(|e| at_row(&ds, row, e))?;
            serde_json::json!({ "chosen": c, "rejected": rj })
        } else {
            serde_json::to_value(r.sequence(row).map_err(|e| at_row(&ds, row, e))?).unwrap_or_default()
        };
        out.push(value.to_string());
    }
    Ok(out)
}
