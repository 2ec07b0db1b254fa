//! Rows that share a prompt (GRPO's and RLOO's groups) share its forward:
//! the prompt runs once, its keys and values go to each row, and only the
//! responses run per row. Everything computed that way equals the plain
//! per-row forward (to float rounding): hidden states at every real
//! position, the LoRA gradients of a training step, and generation (the
//! shared prefill) against generating each row alone.

mod common;

use common::load;
use rlhf_model::generate::{generate_rows, GenerateOptions};
use rlhf_model::peft::{self, Method, PeftConfig, PeftModel};
use rlhf_model::sampling::Sampling;
use rlhf_worker::train::ppo::rollout::Batch;
use tch::{Device, Kind, Tensor};

fn model() -> PeftModel {
    let mut pm = PeftModel::new(load("tiny-qwen2"));
    let mut cfg = PeftConfig::new(Method::Lora);
    cfg.seed = 3;
    cfg.target_modules = vec!["all-linear".into()];
    let a = peft::build(cfg, &pm.base).unwrap();
    tch::no_grad(|| {
        for p in a.parameters() {
            // Deterministic (tests share torch's global generator).
            let wave = Tensor::arange(p.numel() as i64, (Kind::Float, Device::Cpu)).sin().view(p.size().as_slice());
            let _ = p.shallow_clone().f_add_(&(wave * 0.05)).unwrap();
        }
    });
    pm.add("policy", a).unwrap();
    pm.set_active(Some("policy")).unwrap();
    pm
}

/// Two groups of three samples (prompts of different lengths, so the
/// shorter is left-padded) and a lone prompt; responses of several lengths.
fn rows() -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let a = vec![5, 9, 14, 3, 8];
    let b = vec![7, 11];
    let prompts = vec![a.clone(), a.clone(), a, b.clone(), b.clone(), b, vec![40, 41, 42]];
    let responses =
        vec![vec![20, 21, 22], vec![23], vec![24, 25], vec![30, 31, 32], vec![33, 34], vec![35], vec![50, 51, 52]];
    (prompts, responses)
}

/// The same batch with every row's prompt treated as its own.
fn unshared(batch: &Batch) -> Batch {
    let mut plain = batch.select(&(0..batch.rows()).collect::<Vec<_>>());
    plain.prompt_of = (0..plain.prompt_of.len()).collect();
    plain
}

#[test]
fn shared_prompt_hidden_states_equal_the_plain_forward() {
    let pm = model();
    let (prompts, responses) = rows();
    let batch = Batch::new(&prompts, &responses, 0, Device::Cpu);
    let shared = tch::no_grad(|| batch.hidden(&pm)).unwrap();
    let plain = tch::no_grad(|| unshared(&batch).hidden(&pm)).unwrap();
    assert_eq!(shared.size(), plain.size());
    let real = batch.attn.unsqueeze(-1).to_kind(Kind::Float);
    let diff = ((&shared - &plain) * &real).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "max |shared - plain| on real tokens = {diff}");
    assert!(shared.abs().max().double_value(&[]) > 0.1, "non-trivial hidden states");
}

#[test]
fn a_training_step_on_shared_prompts_gives_the_plain_gradients() {
    let (prompts, responses) = rows();
    let batch = Batch::new(&prompts, &responses, 0, Device::Cpu);
    let weights = Tensor::arange(64, (Kind::Float, Device::Cpu)).cos();
    let grads = |b: &Batch| -> Vec<Tensor> {
        let pm = model();
        b.train_step(&pm, false, |h| {
            let loss = ((h * &weights).sum_dim_intlist(-1, false, Kind::Float) * &b.mask).sum(Kind::Float);
            Ok((loss, ()))
        })
        .unwrap();
        pm.adapter("policy").unwrap().parameters().iter().map(|p| p.grad().copy()).collect()
    };
    let (shared, plain) = (grads(&batch), grads(&unshared(&batch)));
    let mut worst = 0f64;
    for (s, p) in shared.iter().zip(&plain) {
        let scale = p.abs().max().double_value(&[]).max(1e-6);
        worst = worst.max((s - p).abs().max().double_value(&[]) / scale);
    }
    assert!(worst < 1e-4, "largest relative LoRA gradient difference {worst}");
    assert!(plain.iter().any(|g| g.abs().max().double_value(&[]) > 1e-4), "the step has gradients");
}

#[test]
fn generating_a_group_equals_generating_each_row_alone() {
    let pm = model();
    let (prompts, _) = rows();
    let opts = GenerateOptions {
        max_new_tokens: 5,
        sampling: Sampling { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 11 },
        eos_ids: Vec::new(),
        pad_id: 0,
        steps: rlhf_model::Steps::Auto,
    };
    let ids: Vec<u64> = (0..prompts.len() as u64).collect();
    let together = tch::no_grad(|| generate_rows(&pm.base, pm.hooks(), &prompts, &opts, &ids)).unwrap();
    let distinct: std::collections::HashSet<&Vec<i64>> = together.tokens.iter().collect();
    assert!(distinct.len() > 3, "samples of one prompt differ: {:?}", together.tokens);
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate_rows(&pm.base, pm.hooks(), std::slice::from_ref(p), &opts, &[i as u64]).unwrap();
        assert_eq!(alone.tokens[0], together.tokens[i], "row {i}");
        for (a, b) in alone.logprobs[0].iter().zip(&together.logprobs[i]) {
            assert!((a - b).abs() < 1e-4, "row {i}: log-prob {a} vs {b}");
        }
    }
}

/// `ppo.generate_batch`: a rollout generated a few rows at a time (each
/// part's cache freed before the next) gives the tokens of one pass.
#[test]
fn generating_in_parts_equals_one_pass() {
    use rlhf_common::spec::PpoSpec;
    use rlhf_worker::train::ppo::iteration::generate_parts;
    let pm = model();
    let (prompts, _) = rows();
    let opts = GenerateOptions {
        max_new_tokens: 5,
        sampling: Sampling { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 12 },
        eos_ids: Vec::new(),
        pad_id: 0,
        steps: rlhf_model::Steps::Auto,
    };
    let ids: Vec<u64> = (0..prompts.len() as u64).collect();
    let spec = |g: Option<usize>| -> PpoSpec {
        let mut s: PpoSpec = serde_json::from_value(serde_json::json!({ "rollout_batch": 7, "minibatch": 7 })).unwrap();
        s.generate_batch = g;
        s
    };
    let whole = tch::no_grad(|| generate_parts(&pm.base, pm.hooks(), &spec(None), &prompts, &opts, &ids)).unwrap();
    let parts = tch::no_grad(|| generate_parts(&pm.base, pm.hooks(), &spec(Some(3)), &prompts, &opts, &ids)).unwrap();
    assert_eq!(parts.tokens, whole.tokens);
    let worst = parts.logprobs.iter().flatten().zip(whole.logprobs.iter().flatten()).map(|(a, b)| (a - b).abs());
    let worst = worst.fold(0f32, f32::max);
    assert!(worst < 1e-4, "log-probs differ by {worst}");
}
