//! A LoRA adapter saved by rlhfd loads in Hugging Face peft and gives the
//! same logits (the other direction, peft → rlhfd, is in parity.rs).
//! Needs a python with transformers + peft: `RLHF_PY` (scripts/test.sh sets
//! it), else `python3`.

mod common;

use std::process::Command;

use common::*;
use rlhf_model::peft::{self, Method, PeftConfig, PeftModel};
use rlhf_model::Model;
use tch::{Device, Kind, Tensor};

/// Runs check_peft_interop.py on a perturbed LoRA over `name` with the base
/// in `kind`; returns its report.
fn check(name: &str, kind: Kind, dtype: &str, tol: f64) -> String {
    let python = std::env::var("RLHF_PY").unwrap_or_else(|_| "python3".into());
    let script = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR (run through cargo test)"),
    )
    .join("../scripts/check_peft_interop.py");
    let base = Model::load(&fixtures().join(name), kind, Device::Cpu).unwrap();
    let mut pm = PeftModel::new(base);
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
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    peft::io::save(pm.adapter("policy").unwrap(), &dir, name).unwrap();
    let tokens = expected(name, "tokens");
    let logits = tch::no_grad(|| pm.logits(&tokens.unsqueeze(0))).unwrap().squeeze_dim(0).to_kind(Kind::Float);
    let file = tmp.path().join("logits.safetensors");
    Tensor::write_safetensors(&[("tokens", &tokens), ("logits", &logits)], &file).unwrap();
    let out = Command::new(&python)
        .arg(&script)
        .arg(fixtures().join(name))
        .arg(&dir)
        .arg(&file)
        .args([dtype, &tol.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (run scripts/setup.sh, or set RLHF_PY)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} {dtype}: peft disagrees or failed: {text}");
    assert!(text.contains("max_abs_diff"), "{text}");
    text
}

#[test]
fn rlhfd_lora_loads_in_peft_with_equal_logits() {
    for name in MODELS {
        check(name, Kind::Float, "f32", 1e-4);
    }
}

/// Mixed precision: the base in bf16, the LoRA in f32 (as peft keeps it),
/// against transformers + peft with the base in bf16. The logits of these
/// fixtures reach about 3.5, where one bf16 step (8 significant bits) is
/// 0.016; rounding differs in a few places (peft computes the LoRA update
/// in f32 and adds it in f32, rlhfd computes and adds it in bf16, as
/// autocast would), so the bound is five such steps.
#[test]
fn bf16_base_with_f32_lora_matches_transformers_and_peft_in_bf16() {
    for name in MODELS {
        let report = check(name, Kind::BFloat16, "bf16", 0.08);
        eprintln!("{name} bf16: {report}");
    }
}
