//! rlhfd's DPO objective against TRL 1.12.0's own (`DPOTrainer._compute_loss`
//! through its collator, peft LoRA, the reference = the adapter disabled):
//! the same tiny model, adapter and fixed batch give the same loss and the
//! same gradient on every LoRA tensor, to 1e-5 in f32, for each loss type.
//! Runs scripts/trl_dpo_reference.py with `RLHF_PY` (scripts/test.sh sets
//! it to the venv that has TRL), else `python3`.

mod common;

use std::process::Command;

use common::*;
use rlhf_common::spec::DpoSpec;
use rlhf_model::peft::{self, Method, PeftConfig, PeftModel};
use rlhf_model::Model;
use rlhf_worker::train::stages::dpo::batch_loss;
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

fn check(loss_type: &str, beta: f64) {
    let name = "tiny-qwen2";
    let python = std::env::var("RLHF_PY").unwrap_or_else(|_| "python3".into());
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/trl_dpo_reference.py");
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
    let out = tmp.path().join("out.safetensors");
    let run = Command::new(&python)
        .arg(&script)
        .args([&fixtures().join(name), &dir, &inp, &out])
        .args([loss_type, &beta.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (run scripts/setup.sh, or set RLHF_PY)"));
    let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{loss_type}: TRL failed: {text}");
    let trl: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out).unwrap().into_iter().collect();

    let spec = DpoSpec { beta, loss_type: loss_type.into(), label_smoothing: 0.0 };
    let loss = batch_loss(&pm, &pairs(), &spec, 0).unwrap();
    loss.backward();
    let (ours, theirs) = (loss.double_value(&[]), trl["loss"].double_value(&[0]));
    assert!((ours - theirs).abs() < TOL, "{loss_type}: loss {ours} vs TRL {theirs}");
    let grads = pm.adapter("policy").unwrap().tensors();
    assert_eq!(grads.len(), trl.len() - 1, "{loss_type}: {:?}", trl.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (k, t) in grads {
        let want = trl.get(&k).unwrap_or_else(|| panic!("{loss_type}: TRL has no gradient for {k}"));
        let diff = (t.grad() - want).abs().max().double_value(&[]);
        assert!(diff < TOL, "{loss_type}: {k} gradient differs by {diff}");
        assert!(want.abs().max().double_value(&[]) > 1e-4, "{loss_type}: {k}: a zero gradient proves nothing");
        worst = worst.max(diff);
    }
    eprintln!("{loss_type}: loss {ours:.6} (TRL {theirs:.6}), max gradient difference {worst:.2e}");
}

#[test]
fn dpo_losses_and_gradients_equal_trls() {
    for (loss, beta) in [("sigmoid", 0.1), ("ipo", 0.5), ("hinge", 0.3)] {
        check(loss, beta);
    }
}
