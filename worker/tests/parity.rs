//! Logits and greedy generations equal transformers (fixtures made by
//! scripts/make_fixtures.py), with and without a PEFT-saved LoRA, merged and
//! unmerged; a merged model saved by rlhfd loads back in transformers (that
//! test needs a python with transformers: `RLHF_PY`, else `python3`).

mod common;

use common::*;
use rlhf_model::peft::{self, PeftModel};
use rlhf_model::save::save_model;
use rlhf_model::{generate, GenerateOptions, Sampling};
use tch::Tensor;

const TOL: f64 = 1e-4;

fn with_lora(name: &str, merge: bool) -> PeftModel {
    let mut pm = PeftModel::new(load(name));
    let adapter = peft::io::load(&fixtures().join(format!("{name}-lora")), &pm.base).expect("peft adapter loads");
    pm.add("lora", adapter).unwrap();
    pm.set_active(Some("lora")).unwrap();
    if merge {
        pm.merge("lora").unwrap();
    }
    pm
}

fn logits(pm: &PeftModel, tokens: &Tensor) -> Tensor {
    tch::no_grad(|| pm.logits(&tokens.unsqueeze(0))).unwrap().squeeze_dim(0)
}

fn greedy(pm: &PeftModel, prompts: &[Vec<i64>]) -> Vec<Vec<i64>> {
    let opts = GenerateOptions {
        max_new_tokens: 8,
        sampling: Sampling::greedy(),
        eos_ids: vec![],
        pad_id: 0,
        steps: rlhf_model::Steps::Auto,
    };
    generate(&pm.base, pm.hooks(), prompts, &opts).unwrap().tokens
}

#[test]
fn base_logits_match_transformers() {
    for name in MODELS {
        let pm = PeftModel::new(load(name));
        let d = max_abs_diff(&logits(&pm, &expected(name, "tokens")), &expected(name, "logits_base"));
        eprintln!("{name}: base logits max |diff| {d:.3e}");
        assert!(d < TOL, "{name}: base logits differ by {d}");
    }
}

#[test]
fn lora_logits_match_peft_unmerged_and_merged() {
    for name in MODELS {
        let tokens = expected(name, "tokens");
        let want = expected(name, "logits_lora");
        let d = max_abs_diff(&logits(&with_lora(name, false), &tokens), &want);
        eprintln!("{name}: unmerged LoRA logits max |diff| {d:.3e}");
        assert!(d < TOL, "{name}: unmerged LoRA logits differ by {d}");
        let d = max_abs_diff(&logits(&with_lora(name, true), &tokens), &expected(name, "logits_lora_merged"));
        eprintln!("{name}: merged LoRA logits max |diff| {d:.3e}");
        assert!(d < TOL, "{name}: merged LoRA logits differ by {d}");
        // The adapter is far from a no-op, so the match above means something.
        assert!(max_abs_diff(&want, &expected(name, "logits_base")) > 0.5);
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in MODELS {
        let prompt = to_vec(&expected(name, "tokens"));
        let base = PeftModel::new(load(name));
        assert_eq!(
            greedy(&base, std::slice::from_ref(&prompt))[0],
            to_vec(&expected(name, "greedy_base")),
            "{name} base"
        );
        let lora = with_lora(name, false);
        assert_eq!(
            greedy(&lora, std::slice::from_ref(&prompt))[0],
            to_vec(&expected(name, "greedy_lora")),
            "{name} lora"
        );
        let merged = with_lora(name, true);
        assert_eq!(greedy(&merged, &[prompt])[0], to_vec(&expected(name, "greedy_lora")), "{name} merged lora");
    }
}

#[test]
fn left_padded_batch_matches_transformers() {
    for name in MODELS {
        let ids = expected(name, "batch_tokens");
        let mask = expected(name, "batch_mask");
        let prompts: Vec<Vec<i64>> = (0..2)
            .map(|r| {
                let row = to_vec(&ids.get(r));
                let m = to_vec(&mask.get(r));
                row.into_iter().zip(m).filter(|&(_, m)| m == 1).map(|(t, _)| t).collect()
            })
            .collect();
        assert_ne!(prompts[0].len(), prompts[1].len(), "fixture batch must need padding");
        let want = expected(name, "batch_greedy_base");
        let got = greedy(&PeftModel::new(load(name)), &prompts);
        assert_eq!(got[0], to_vec(&want.get(0)), "{name} row 0");
        assert_eq!(got[1], to_vec(&want.get(1)), "{name} row 1");
    }
}

/// Loads every `MODEL_DIR EXPECTED FIXTURE_DIR` triple of argv in
/// transformers and compares its logits on the fixture prompt with the
/// merged-LoRA logits; the class and RoPE parameters must be the fixture's.
const CHECK_SAVED: &str = r#"
import sys
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
worst = 0.0
args = sys.argv[1:]
for model_dir, expected, fixture in zip(args[0::3], args[1::3], args[2::3]):
    want = load_file(expected)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    orig = AutoConfig.from_pretrained(fixture)
    assert type(model).__name__ == orig.architectures[0], (model_dir, type(model).__name__)
    assert model.config.rope_parameters == orig.rope_parameters, (model.config.rope_parameters, orig.rope_parameters)
    assert model.config.tie_word_embeddings == orig.tie_word_embeddings
    with torch.no_grad():
        got = model(want["tokens"].unsqueeze(0)).logits[0].float()
    d = (got - want["logits_lora_merged"]).abs().max().item()
    print(f"{model_dir}: {type(model).__name__} max_abs_diff {d:.3e}")
    worst = max(worst, d)
sys.exit(0 if worst < float("TOL") else 1)
"#;

#[test]
fn merged_model_saved_by_rlhfd_loads_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = Vec::new();
    for name in MODELS {
        let pm = with_lora(name, true);
        let dir = tmp.path().join(name);
        save_model(&pm.base, &dir, Some(&fixtures().join(name).join("tokenizer.json"))).unwrap();
        // rlhfd itself reads it back as the same architecture and logits.
        let back = PeftModel::new(rlhf_model::Model::load(&dir, tch::Kind::Float, tch::Device::Cpu).unwrap());
        assert_eq!(back.base.cfg.arch, pm.base.cfg.arch, "{name}");
        assert_eq!(back.base.cfg.rope_scaling, pm.base.cfg.rope_scaling, "{name}");
        let tokens = expected(name, "tokens");
        assert_eq!(max_abs_diff(&logits(&back, &tokens), &logits(&pm, &tokens)), 0.0, "{name}");
        args.push(dir);
        args.push(fixtures().join(format!("{name}-expected.safetensors")));
        args.push(fixtures().join(name));
    }
    let python = std::env::var("RLHF_PY").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(CHECK_SAVED.replace("TOL", &TOL.to_string()))
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (run scripts/setup.sh, or set RLHF_PY)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "transformers disagrees with the saved models or failed: {text}");
    assert_eq!(text.matches("max_abs_diff").count(), MODELS.len(), "{text}");
    eprintln!("{text}");
}

#[test]
fn sharded_checkpoint_loads_every_shard() {
    let dir = fixtures().join("tiny-llama");
    assert!(dir.join("model.safetensors.index.json").exists());
    assert!(!dir.join("model.safetensors").exists());
    let m = load("tiny-llama");
    assert_eq!(m.layers.len(), 2);
    assert!(m.lm_head.is_some(), "llama fixture has an untied head");
}

/// PPO takes the old log-probs from generation (as TRL): on a left-padded,
/// sampled batch they equal a full forward over prompt + response.
#[test]
fn sampled_logprobs_equal_a_full_forward() {
    use rlhf_worker::train::ppo::rollout::{logprobs, Batch};
    for name in MODELS {
        let pm = with_lora(name, false);
        let prompts = vec![vec![42, 259, 73, 270], vec![76, 222]];
        let sampling = Sampling { temperature: 0.7, top_p: 0.9, top_k: 0, seed: 3 };
        let opts =
            GenerateOptions { max_new_tokens: 6, sampling, eos_ids: vec![], pad_id: 0, steps: rlhf_model::Steps::Auto };
        let gen = generate(&pm.base, pm.hooks(), &prompts, &opts).unwrap();
        let batch = Batch::new(&prompts, &gen.tokens, 0, tch::Device::Cpu);
        let full = logprobs(&pm, &batch, 0.7).unwrap();
        let d = max_abs_diff(&(batch.response_values(&gen.logprobs) * &batch.mask), &(full * &batch.mask));
        assert!(d < TOL, "{name}: generation log-probs differ from a full forward by {d:e}");
    }
}
