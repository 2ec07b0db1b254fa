//! A reward head with a log-prob term (`train.score_logprob`): its score is
//! `w·h + b + c · Σ log p(response | prompt)` computed independently from
//! whole logits, and PPO's scoring of a rollout batch (left-padded prompts,
//! right-padded responses) gives the reward stage's score (right-padded
//! whole rows) for the same rows, so the reward PPO optimises is the one
//! the reward model was trained and measured with. A saved head keeps `c`.

mod common;

use common::load;
use rlhf_model::head::{score, Head};
use rlhf_model::peft::{self, Method, PeftConfig, PeftModel};
use rlhf_worker::train::ppo::rollout::{model_scores, Batch};
use tch::{Device, Kind, Tensor};

fn model() -> PeftModel {
    let mut pm = PeftModel::new(load("tiny-qwen2"));
    let mut cfg = PeftConfig::new(Method::Lora);
    cfg.seed = 3;
    let a = peft::build(cfg, &pm.base).unwrap();
    tch::no_grad(|| {
        for p in a.parameters() {
            let _ = p.shallow_clone().f_add_(&(Tensor::randn(p.size(), (Kind::Float, Device::Cpu)) * 0.05)).unwrap();
        }
    });
    pm.add("r", a).unwrap();
    pm.set_active(Some("r")).unwrap();
    pm
}

fn head() -> Head {
    let h = Head::new(64, Device::Cpu, 5).with_logprob();
    let _ = tch::no_grad(|| h.lm_scale.as_ref().unwrap().shallow_clone().fill_(0.7));
    h
}

const PROMPTS: [&[i64]; 3] = [&[5, 9, 14, 3], &[7, 11], &[40, 41, 42]];
const RESPONSES: [&[i64]; 3] = [&[20, 21, 22, 23], &[30], &[50, 51]];

#[test]
fn the_score_adds_the_scaled_response_logprob() {
    let pm = model();
    let head = head();
    let seqs: Vec<Vec<i64>> = PROMPTS.iter().zip(RESPONSES).map(|(p, r)| [*p, r].concat()).collect();
    let starts: Vec<usize> = PROMPTS.iter().map(|p| p.len()).collect();
    let got = tch::no_grad(|| score(&pm, &head, &seqs, &starts, 0).unwrap());
    let linear =
        tch::no_grad(|| score(&pm, &Head { lm_scale: None, ..head.trainable(false) }, &seqs, &starts, 0)).unwrap();
    // Independently: each row alone, whole logits, log_softmax, gathered.
    for (i, s) in seqs.iter().enumerate() {
        let ids = Tensor::from_slice(s).view([1, -1]);
        let logp = tch::no_grad(|| pm.logits(&ids).unwrap()).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
        let sum: f64 = (starts[i]..s.len()).map(|t| logp.double_value(&[0, t as i64 - 1, s[t]])).sum();
        let want = linear.double_value(&[i as i64]) + 0.7 * sum;
        let diff = (got.double_value(&[i as i64]) - want).abs();
        assert!(diff < 1e-4, "row {i}: {} vs {want}", got.double_value(&[i as i64]));
        assert!(sum < -1.0, "row {i}: a random model's response log-prob {sum}");
    }
    // Without the term the score is the head's alone.
    let plain = Head::new(64, Device::Cpu, 5);
    let p = tch::no_grad(|| score(&pm, &plain, &seqs, &starts, 0).unwrap());
    assert!((p - &linear).abs().max().double_value(&[]) < 1e-6);
}

#[test]
fn ppo_scores_a_rollout_as_the_reward_stage_scores_it() {
    let pm = model();
    let head = head();
    let prompts: Vec<Vec<i64>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
    let responses: Vec<Vec<i64>> = RESPONSES.iter().map(|r| r.to_vec()).collect();
    let batch = Batch::new(&prompts, &responses, 0, Device::Cpu);
    let ppo = tch::no_grad(|| model_scores(&pm, &head, &batch).unwrap());
    let seqs: Vec<Vec<i64>> = prompts.iter().zip(&responses).map(|(p, r)| [p.as_slice(), r].concat()).collect();
    let starts: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let stage = tch::no_grad(|| score(&pm, &head, &seqs, &starts, 0).unwrap());
    let diff = (&ppo - &stage).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "{ppo:?} vs {stage:?}");
}

#[test]
fn a_saved_head_keeps_its_scale() {
    let dir = std::env::temp_dir().join(format!("rlhf-logprob-head-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("head.safetensors");
    head().save(&file).unwrap();
    let back = Head::load(&file, 64, Device::Cpu).unwrap();
    assert_eq!(back.lm_scale.map(|c| c.double_value(&[0])), Some(0.7f32 as f64));
    Head::new(64, Device::Cpu, 1).save(&file).unwrap();
    assert!(Head::load(&file, 64, Device::Cpu).unwrap().lm_scale.is_none());
    std::fs::remove_dir_all(dir).unwrap();
}
