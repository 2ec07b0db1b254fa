//! Logits and greedy generations equal transformers (fixtures made by
//! scripts/make_fixtures.py), with and without a PEFT-saved LoRA, merged and
//! unmerged.

mod common;

use common::*;
use rlhf_model::peft::{self, PeftModel};
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
    let opts = GenerateOptions { max_new_tokens: 8, sampling: Sampling::greedy(), eos_ids: vec![], pad_id: 0 };
    generate(&pm.base, pm.hooks(), prompts, &opts).unwrap().tokens
}

#[test]
fn base_logits_match_transformers() {
    for name in MODELS {
        let pm = PeftModel::new(load(name));
        let d = max_abs_diff(&logits(&pm, &expected(name, "tokens")), &expected(name, "logits_base"));
        assert!(d < TOL, "{name}: base logits differ by {d}");
    }
}

#[test]
fn lora_logits_match_peft_unmerged_and_merged() {
    for name in MODELS {
        let tokens = expected(name, "tokens");
        let want = expected(name, "logits_lora");
        let d = max_abs_diff(&logits(&with_lora(name, false), &tokens), &want);
        assert!(d < TOL, "{name}: unmerged LoRA logits differ by {d}");
        let d = max_abs_diff(&logits(&with_lora(name, true), &tokens), &expected(name, "logits_lora_merged"));
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
        let opts = GenerateOptions { max_new_tokens: 6, sampling, eos_ids: vec![], pad_id: 0 };
        let gen = generate(&pm.base, pm.hooks(), &prompts, &opts).unwrap();
        let batch = Batch::new(&prompts, &gen.tokens, 0, tch::Device::Cpu);
        let full = logprobs(&pm, &batch, 0.7).unwrap();
        let d = max_abs_diff(&(batch.response_values(&gen.logprobs) * &batch.mask), &(full * &batch.mask));
        assert!(d < TOL, "{name}: generation log-probs differ from a full forward by {d:e}");
    }
}
