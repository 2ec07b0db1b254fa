//! Bad input to the offline tools: a non-zero exit and a message naming the
//! cause — never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;
use tch::{Kind, Tensor};

const TOKENS: &str = "42,259,73,270";

/// Runs `rlhf-worker args…`, expects failure, returns stderr.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf-worker")).args(args).output().expect("run rlhf-worker");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "expected a clean failure for {args:?}, got {:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    stderr
}

fn logits_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["logits", "--model", model, "--tokens", TOKENS, "--out", out]
}

/// A writable copy of a fixture model.
fn copy_model(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

fn edit_config(dir: &Path, from: &str, to: &str) {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains(from), "config has {from}");
    std::fs::write(&p, text.replace(from, to)).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn missing_model_dir_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let err = fails(&logits_args("/nonexistent/model", s(&out)));
    assert!(err.contains("/nonexistent/model/config.json"), "{err}");
}

#[test]
fn truncated_weights_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model("tiny-qwen2", tmp.path());
    let w = m.join("model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&w).unwrap().set_len(len / 2).unwrap();
    let err = fails(&logits_args(s(&m), s(&tmp.path().join("o"))));
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn missing_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model("tiny-llama", tmp.path());
    std::fs::remove_file(m.join("model-00003-of-00005.safetensors")).unwrap();
    let err = fails(&logits_args(s(&m), s(&tmp.path().join("o"))));
    assert!(err.contains("model-00003-of-00005.safetensors"), "{err}");
}

#[test]
fn wrong_tensor_shape_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model("tiny-qwen2", tmp.path());
    edit_config(&m, "\"intermediate_size\": 128", "\"intermediate_size\": 96");
    let err = fails(&logits_args(s(&m), s(&tmp.path().join("o"))));
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight") && err.contains("[96, 64]") && err.contains("[128, 64]"),
        "{err}"
    );
}

#[test]
fn unknown_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model("tiny-qwen2", tmp.path());
    edit_config(&m, "\"model_type\": \"qwen2\"", "\"model_type\": \"gpt2\"");
    let err = fails(&logits_args(s(&m), s(&tmp.path().join("o"))));
    assert!(err.contains("unsupported architecture \"gpt2\""), "{err}");
}

#[test]
fn token_out_of_range_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixtures().join("tiny-qwen2");
    let out = tmp.path().join("o");
    let err = fails(&["logits", "--model", s(&m), "--tokens", "1,280", "--out", s(&out)]);
    assert!(err.contains("token id 280 out of range (vocab size 280)"), "{err}");
    let err = fails(&["generate", "--model", s(&m), "--tokens=-3", "--max-new-tokens", "2"]);
    assert!(err.contains("token id -3 out of range"), "{err}");
    let err = fails(&["generate", "--model", s(&m), "--tokens", "1,x", "--max-new-tokens", "2"]);
    assert!(err.contains("\"x\" is not an integer"), "{err}");
}

/// An adapter directory holding `tensors` under a LoRA config.
fn write_lora(dir: &Path, tensors: &[(&str, Tensor)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    Tensor::write_safetensors(tensors, dir.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn adapter_for_another_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixtures().join("tiny-qwen2");
    let out = tmp.path().join("o");
    let key = |l: usize, ab: &str| format!("base_model.model.model.layers.{l}.self_attn.q_proj.lora_{ab}.weight");
    let z = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu));

    // Made for a model with hidden size 896 (Qwen2.5-0.5B).
    let wide = tmp.path().join("wide");
    let tensors: Vec<(String, Tensor)> =
        (0..2).flat_map(|l| [(key(l, "A"), z(&[4, 896])), (key(l, "B"), z(&[896, 4]))]).collect();
    let refs: Vec<(&str, Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t.shallow_clone())).collect();
    write_lora(&wide, &refs);
    let err = fails(&["logits", "--model", s(&m), "--adapter", s(&wide), "--tokens", TOKENS, "--out", s(&out)]);
    assert!(err.contains(&key(0, "A")) && err.contains("[4, 64]") && err.contains("[4, 896]"), "{err}");

    // Made for a deeper model: layer 5 does not exist here.
    let deep = tmp.path().join("deep");
    let tensors: Vec<(String, Tensor)> =
        (0..6).flat_map(|l| [(key(l, "A"), z(&[4, 64])), (key(l, "B"), z(&[64, 4]))]).collect();
    let refs: Vec<(&str, Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t.shallow_clone())).collect();
    write_lora(&deep, &refs);
    let err = fails(&["logits", "--model", s(&m), "--adapter", s(&deep), "--tokens", TOKENS, "--out", s(&out)]);
    assert!(err.contains("matches no module of this model"), "{err}");
}

#[test]
fn broken_adapter_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixtures().join("tiny-qwen2");
    let out = tmp.path().join("o");
    let err =
        fails(&["logits", "--model", s(&m), "--adapter", "/nonexistent/adapter", "--tokens", TOKENS, "--out", s(&out)]);
    assert!(err.contains("/nonexistent/adapter/adapter_config.json"), "{err}");

    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("adapter_config.json"), r#"{"peft_type": "PREFIX_TUNING"}"#).unwrap();
    let err = fails(&["logits", "--model", s(&m), "--adapter", s(&bad), "--tokens", TOKENS, "--out", s(&out)]);
    assert!(err.contains("PREFIX_TUNING"), "{err}");

    std::fs::write(bad.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}"#)
        .unwrap();
    let err = fails(&["logits", "--model", s(&m), "--adapter", s(&bad), "--tokens", TOKENS, "--out", s(&out)]);
    assert!(err.contains("adapter_model.safetensors"), "{err}");
}

#[test]
fn tools_write_logits_and_generate_json() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixtures().join("tiny-qwen2");
    let out = tmp.path().join("logits.safetensors");
    let st = Command::new(env!("CARGO_BIN_EXE_rlhf-worker"))
        .args(["logits", "--model", s(&m), "--tokens", TOKENS, "--out", s(&out)])
        .status()
        .unwrap();
    assert!(st.success());
    let t = Tensor::read_safetensors(&out).unwrap();
    assert_eq!(t[0].0, "logits");
    assert_eq!(t[0].1.size(), vec![4, 280]);
    assert_eq!(t[0].1.kind(), Kind::Float);

    let out = Command::new(env!("CARGO_BIN_EXE_rlhf-worker"))
        .args([
            "generate",
            "--model",
            s(&m),
            "--prompt",
            "这部电影",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "4",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let toks = line["tokens"].as_array().unwrap();
    assert!(!toks.is_empty() && toks.len() <= 5);
    assert!(line["text"].is_string());
}
