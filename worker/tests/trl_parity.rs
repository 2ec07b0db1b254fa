//! rlhfd's DPO, GRPO and RLOO objectives against TRL 1.12.0's own
//! (`DPOTrainer._compute_loss` through its collator, the reference = the
//! adapter disabled; `GRPOTrainer._compute_loss` and
//! `RLOOTrainer._compute_loss` on a fixed rollout: token ids, old and
//! reference log-probs, advantages): the same tiny model, peft LoRA and batch
//! give the same loss and the same gradient on every LoRA tensor, to 1e-5 in
//! f32, for each loss type. Runs scripts/trl_{dpo,group}_reference.py with
//! `RLHF_PY` (scripts/test.sh sets it to the venv that has TRL), else
//! `python3`.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::*;
use rlhf_common::spec::DpoSpec;
use rlhf_model::peft::{self, Method, PeftConfig, PeftModel};
use rlhf_model::Model;
use rlhf_worker::train::logprobs::backprop_through_head;
use rlhf_worker::train::ppo::group::{grpo_loss, rloo_loss, Clip};
use rlhf_worker::train::ppo::rollout::{logprobs, Batch};
use rlhf_worker::train::stages::dpo::batch_backward;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-5;

fn policy(name: &str) -> PeftModel {
    let mut pm = PeftModel::new(Model::load(&fixtures().join(name), Kind::Float, Device::Cpu).unwrap());
    let cfg = PeftConfig {
        r: 4,
        alpha: 8.0,
        seed: 5,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..PeftConfig::new(Method::Lora)
    };
    let adapter = peft::build(cfg, &pm.base).unwrap();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(9);
    tch::no_grad(|| {
        for mut t in adapter.parameters() {
            let _ = t.f_add_(&peft::normal(&t.size(), 0.1, &mut rng, t.device())).unwrap();
        }
    });
    pm.add("policy", adapter).unwrap();
    pm.set_active(Some("policy")).unwrap();
    pm
}

/// Three pairs of different prompt and completion lengths.
fn pairs() -> Vec<(Vec<i64>, Vec<i64>, Vec<i64>)> {
    vec![
        (vec![5, 9, 14, 3, 22], vec![20, 21, 22, 23], vec![30, 31]),
        (vec![7, 11], vec![40], vec![41, 42, 43, 44, 45]),
        (vec![60, 61, 62, 63, 64, 65, 66], vec![70, 71, 72], vec![73, 74, 75]),
    ]
}

fn check_dpo(loss_type: &str, beta: f64) {
    let name = "tiny-qwen2";
    let pm = policy(name);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    peft::io::save(pm.adapter("policy").unwrap(), &dir, name).unwrap();
    let mut named = Vec::new();
    for (i, (p, c, r)) in pairs().iter().enumerate() {
        named.extend([
            (format!("p{i}"), Tensor::from_slice(p)),
            (format!("c{i}"), Tensor::from_slice(c)),
            (format!("r{i}"), Tensor::from_slice(r)),
        ]);
    }
    let inp = tmp.path().join("in.safetensors");
    Tensor::write_safetensors(&named, &inp).unwrap();
    let trl =
        reference("trl_dpo_reference.py", &[&fixtures().join(name), &dir, &inp], &[loss_type, &beta.to_string()], &tmp);
    let spec = DpoSpec { beta, loss_type: loss_type.into(), label_smoothing: 0.0 };
    // The training step's own path, with and without activation checkpointing.
    for recompute in [false, true] {
        let loss = batch_backward(&pm, &pairs(), &spec, 0, recompute).unwrap();
        compare(&pm, loss, &trl, loss_type);
        for p in pm.adapter("policy").unwrap().parameters() {
            let _ = p.grad().zero_();
        }
    }
}

/// Runs `script` (in scripts/) with `paths`, an output file and `args`;
/// returns what it wrote.
fn reference(
    script: &str,
    paths: &[&std::path::Path],
    args: &[&str],
    tmp: &tempfile::TempDir,
) -> HashMap<String, Tensor> {
    let python = std::env::var("RLHF_PY").unwrap_or_else(|_| "python3".into());
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts").join(script);
    let out = tmp.path().join("out.safetensors");
    let run = Command::new(&python)
        .arg(&script)
        .args(paths)
        .arg(&out)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (run scripts/setup.sh, or set RLHF_PY)"));
    let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{args:?}: TRL failed: {text}");
    Tensor::read_safetensors(&out).unwrap().into_iter().collect()
}

/// Our loss `ours` (its gradients in the policy adapter) against TRL's.
fn compare(pm: &PeftModel, ours: f64, trl: &HashMap<String, Tensor>, what: &str) {
    let theirs = trl["loss"].double_value(&[0]);
    assert!((ours - theirs).abs() < TOL, "{what}: loss {ours} vs TRL {theirs}");
    let grads = pm.adapter("policy").unwrap().tensors();
    assert_eq!(grads.len(), trl.len() - 1, "{what}: {:?}", trl.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (k, t) in grads {
        let want = trl.get(&k).unwrap_or_else(|| panic!("{what}: TRL has no gradient for {k}"));
        let diff = (t.grad() - want).abs().max().double_value(&[]);
        assert!(diff < TOL, "{what}: {k} gradient differs by {diff}");
        assert!(want.abs().max().double_value(&[]) > 1e-5, "{what}: {k}: a zero gradient proves nothing");
        worst = worst.max(diff);
    }
    eprintln!("{what}: loss {ours:.6} (TRL {theirs:.6}), max gradient difference {worst:.2e}");
}

/// A fixed rollout (ragged prompts and completions), its old and reference
/// log-probs moved off the policy's own so that ratios clip and the KL is
/// not zero, and advantages of both signs; GRPO (`loss_type`) or RLOO.
fn check_group(algo: &str, loss_type: &str, beta: f64) {
    let name = "tiny-qwen2";
    let pm = policy(name);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    peft::io::save(pm.adapter("policy").unwrap(), &dir, name).unwrap();
    let prompts = vec![vec![5, 9, 14, 3, 22], vec![7, 11], vec![60, 61, 62], vec![80, 81, 82, 83]];
    let completions = vec![vec![20, 21, 22, 23], vec![40], vec![73, 74, 75], vec![90, 91]];
    let batch = Batch::new(&prompts, &completions, 0, Device::Cpu);
    let current = tch::no_grad(|| logprobs(&pm, &batch, 1.0)).unwrap();
    let shift = Tensor::from_slice(&[
        0.3f32, -0.25, 0.05, 0.4, -0.35, 0.0, 0.0, 0.0, 0.1, 0.28, -0.3, 0.0, -0.05, 0.5, 0.0, 0.0,
    ])
    .view([4, 4]);
    let old = (&current + &shift) * &batch.mask;
    let refp = (&current - &shift * 0.5) * &batch.mask;
    let adv = Tensor::from_slice(&[1.0f32, -0.7, 0.4, -1.2]);
    let p = batch.prompt_width;
    let named = [
        ("prompt_ids", batch.ids.narrow(1, 0, p).contiguous()),
        ("prompt_mask", batch.attn.narrow(1, 0, p).contiguous()),
        ("completion_ids", batch.response.shallow_clone()),
        ("completion_mask", batch.mask.to_kind(Kind::Int64)),
        ("old", old.shallow_clone()),
        ("ref", refp.shallow_clone()),
        ("advantages", adv.shallow_clone()),
    ];
    let inp = tmp.path().join("in.safetensors");
    Tensor::write_safetensors(&named, &inp).unwrap();
    let (eps, eps_high) = (0.2, 0.28);
    let args = [algo, loss_type, &beta.to_string(), &eps.to_string(), &eps_high.to_string()];
    let trl = reference("trl_group_reference.py", &[&fixtures().join(name), &dir, &inp], &args, &tmp);

    let (rows, width) = (batch.rows() as f64, batch.mask.size()[1] as f64);
    let tokens = batch.mask.sum(Kind::Float).double_value(&[]);
    let denom = match (algo, loss_type) {
        ("rloo", _) | (_, "grpo") => rows,
        (_, "dr_grpo") => rows * width,
        _ => tokens,
    };
    let clip = Clip { low: eps, high: eps_high };
    let ours = batch
        .train_step(&pm, false, |hidden| {
            backprop_through_head(&pm, hidden, &batch.response, 1.0, false, |logp, _| {
                let out = match algo {
                    "rloo" => rloo_loss(logp, &old, &adv, &batch.mask, clip, denom),
                    _ => grpo_loss(logp, &old, Some(&refp), &adv, &batch.mask, clip, beta, true, loss_type, denom),
                };
                let v = out.loss.double_value(&[]);
                Ok((out.loss, v))
            })
        })
        .unwrap();
    compare(&pm, ours, &trl, &format!("{algo} {loss_type} beta {beta}"));
}

#[test]
fn grpo_and_rloo_losses_and_gradients_equal_trls() {
    for (algo, loss, beta) in [
        ("grpo", "dapo", 0.0),
        ("grpo", "dapo", 0.04),
        ("grpo", "grpo", 0.04),
        ("grpo", "dr_grpo", 0.1),
        ("rloo", "-", 0.0),
    ] {
        check_group(algo, loss, beta);
    }
}

#[test]
fn dpo_losses_and_gradients_equal_trls() {
    for (loss, beta) in [("sigmoid", 0.1), ("ipo", 0.5), ("hinge", 0.3)] {
        check_dpo(loss, beta);
    }
}
