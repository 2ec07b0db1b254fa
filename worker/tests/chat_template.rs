//! The model's own chat template gives the token ids transformers'
//! `apply_chat_template(..., tokenize=True)` gives, on a fixture carrying
//! Qwen2.5's real template (system prompts, multi-turn, Chinese, emoji,
//! whitespace, a tool); conversational prompt-completion rows get TRL's ids
//! and completion mask; a conversation's loss covers its assistant turns
//! only; `rlhf-worker render` prints them. Needs a python with
//! transformers: `RLHF_PY` (scripts/test.sh sets it), else `python3`.

mod common;

use std::path::Path;
use std::process::Command;

use common::fixtures;
use rlhf_model::{ChatTemplate, Config, Tokenizer};
use rlhf_worker::data::formats::{self, Format};
use rlhf_worker::data::render::{Encoded, Renderer};
use serde_json::Value;

const MODEL: &str = "tiny-qwen2-chat";

fn tokenizer(name: &str) -> Tokenizer {
    let dir = fixtures().join(name);
    Tokenizer::load(&dir, &Config::from_dir(&dir).unwrap()).unwrap()
}

fn transformers_says(cases: &Path) -> Vec<Value> {
    let python = std::env::var("RLHF_PY").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_chat_template.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(fixtures().join(MODEL))
        .arg(cases)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (run scripts/setup.sh, or set RLHF_PY)"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "transformers failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn ids_equal_transformers_apply_chat_template() {
    let cases_path = fixtures().join("data/chat_cases.jsonl");
    let expected = transformers_says(&cases_path);
    let tok = tokenizer(MODEL);
    let chat = ChatTemplate::from_model_dir(&fixtures().join(MODEL)).unwrap().expect("the fixture has a template");
    let r = Renderer::new(&tok, Some(&chat)).unwrap();
    let cases = rlhf_worker::data::read_records(&cases_path).unwrap();
    assert_eq!(cases.len(), expected.len());
    let (mut conversations, mut rows) = (0, 0);
    for ((line, case), want) in cases.iter().zip(&expected) {
        if case.get("completion").is_some() {
            let ds = formats::from_values(&cases_path, vec![(*line, case.clone())], None).unwrap();
            assert_eq!(ds.format, Format::PromptCompletion);
            let got = r.sequence(&ds.rows[0]).unwrap();
            let want_mask: Vec<u8> = serde_json::from_value(want["loss_mask"].clone()).unwrap();
            assert_eq!(got.ids, to_ids(&want["ids"]), "line {line}: ids");
            assert_eq!(got.loss_mask, want_mask, "line {line}: completion mask");
            rows += 1;
        } else {
            let msgs = case["messages"].as_array().unwrap();
            let mut extra = serde_json::Map::new();
            if let Some(tools) = case.get("tools") {
                extra.insert("tools".into(), tools.clone());
            }
            let text = chat.render(msgs, case["add_generation_prompt"].as_bool().unwrap(), &extra).unwrap();
            assert_eq!(tok.encode(&text, false).unwrap(), to_ids(&want["ids"]), "line {line}: {text:?}");
            conversations += 1;
        }
    }
    assert!(conversations >= 9 && rows >= 2, "{conversations} conversations, {rows} rows");
}

fn to_ids(v: &Value) -> Vec<i64> {
    serde_json::from_value(v.clone()).unwrap()
}

fn decode_trained(tok: &Tokenizer, e: &Encoded) -> String {
    let ids: Vec<i64> = e.ids.iter().zip(&e.loss_mask).filter(|(_, &m)| m == 1).map(|(&i, _)| i).collect();
    tok.decode(&ids, false).unwrap()
}

#[test]
fn conversations_train_on_assistant_turns_only() {
    let tok = tokenizer(MODEL);
    let chat = ChatTemplate::from_model_dir(&fixtures().join(MODEL)).unwrap().unwrap();
    let r = Renderer::new(&tok, Some(&chat)).unwrap();
    let row = serde_json::json!({"messages": [
        {"role": "system", "content": "只回答数字。"},
        {"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2=?"}, {"role": "assistant", "content": "四 4"},
    ]});
    let ds = formats::from_values(Path::new("m.jsonl"), vec![(1, row)], None).unwrap();
    let e = r.sequence(&ds.rows[0]).unwrap();
    assert_eq!(decode_trained(&tok, &e), "2<|im_end|>\n四 4<|im_end|>\n");
    // A standard prompt-completion row: the completion and the eos token.
    let row = serde_json::json!({"prompt": "1+1=", "completion": "2"});
    let ds = formats::from_values(Path::new("p.jsonl"), vec![(1, row)], None).unwrap();
    let e = r.sequence(&ds.rows[0]).unwrap();
    assert_eq!(decode_trained(&tok, &e), "2<|im_end|>");
}

#[test]
fn a_model_without_a_template_says_how_to_give_one() {
    let tok = tokenizer("tiny-qwen2");
    assert!(ChatTemplate::from_model_dir(&fixtures().join("tiny-qwen2")).unwrap().is_none());
    let r = Renderer::new(&tok, None).unwrap();
    let row = serde_json::json!({"prompt": [{"role": "user", "content": "hi"}]});
    let ds = formats::from_values(Path::new("q.jsonl"), vec![(3, row)], None).unwrap();
    let e = r.sequence(&ds.rows[0]).map_err(|e| rlhf_worker::data::render::at_row(&ds, &ds.rows[0], e));
    let msg = e.unwrap_err().to_string();
    assert!(msg.contains("q.jsonl:3") && msg.contains("data.chat_template"), "{msg}");
    // With a template file named by the job, the same row renders.
    let chat =
        ChatTemplate::from_file(&fixtures().join(MODEL).join("chat_template.jinja"), &fixtures().join(MODEL)).unwrap();
    let r = Renderer::new(&tok, Some(&chat)).unwrap();
    let e = r.sequence(&ds.rows[0]).unwrap();
    assert!(tok.decode(&e.ids, false).unwrap().ends_with("<|im_start|>assistant\n"));
}

#[test]
fn render_prints_ids_and_loss_mask_per_row() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sft.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"3+4?\"}], \"completion\": [{\"role\": \"assistant\", \"content\": \"7\"}]}\n\
         {\"prompt\": [{\"role\": \"user\", \"content\": \"5+1?\"}], \"completion\": [{\"role\": \"assistant\", \"content\": \"6\"}]}\n",
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_rlhf-worker");
    let model = fixtures().join(MODEL);
    let out = Command::new(bin)
        .args(["render", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .args(["--limit", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: Value = serde_json::from_str(text.trim()).unwrap();
    let (ids, mask) = (v["ids"].as_array().unwrap(), v["loss_mask"].as_array().unwrap());
    assert_eq!(ids.len(), mask.len());
    assert_eq!(mask.iter().filter(|m| m.as_u64() == Some(1)).count(), 3, "7, <|im_end|>, \\n: {text}");
    // A preference row: both sides, each trained on its own answer.
    let prefs = fixtures().join("data/prefs_chat.jsonl");
    let out = Command::new(bin)
        .args(["render", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&prefs)
        .args(["--limit", "1"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for side in ["chosen", "rejected"] {
        let mask = v[side]["loss_mask"].as_array().unwrap();
        assert_eq!(mask.len(), v[side]["ids"].as_array().unwrap().len());
        assert!(mask.iter().any(|m| m == 1) && mask[0] == 0, "{side}: {v}");
    }
    // A bad row is refused with file:line and the column, nothing printed.
    std::fs::write(&data, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": 7}\n")
        .unwrap();
    let out = Command::new(bin).args(["render", "--model"]).arg(&model).arg("--data").arg(&data).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{err}");
    assert!(err.contains("sft.jsonl:2") && err.contains("\"completion\""), "{err}");
}

#[test]
fn a_parquet_file_gives_the_rows_and_ids_of_its_json_lines_twin() {
    let data = fixtures().join("data");
    let jsonl = formats::load(&data.join("arith_sft_eval.jsonl"), None).unwrap();
    let parquet = formats::load(&data.join("arith_sft_eval.parquet"), None).unwrap();
    assert_eq!((parquet.format, parquet.conversational), (Format::PromptCompletion, true));
    assert_eq!(parquet.rows.len(), 32);
    for (a, b) in jsonl.rows.iter().zip(&parquet.rows) {
        assert_eq!((&a.prompt, &a.completion, &a.columns), (&b.prompt, &b.completion, &b.columns));
    }
    let bin = env!("CARGO_BIN_EXE_rlhf-worker");
    let render = |file: &str| {
        let out = Command::new(bin)
            .args(["render", "--model"])
            .arg(fixtures().join(MODEL))
            .arg("--data")
            .arg(data.join(file))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(render("arith_sft_eval.parquet"), render("arith_sft_eval.jsonl"));
}
