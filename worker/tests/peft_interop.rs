//! A LoRA adapter saved by rlhfd loads in Hugging Face peft and gives the
//! same logits (the other direction, peft → rlhfd, is in parity.rs).
//! Needs a python with transformers + peft: `RLHF_PY` (scripts/test.sh sets
//! it), else `python3`.

mod common;

use std::process::Command;

use common::*;
use rlhf_worker::peft::{self, Method, PeftConfig, PeftModel};
use tch::Tensor;

#[test]
fn rlhfd_lora_loads_in_peft_with_equal_logits() {
    let python = std::env::var("RLHF_PY").unwrap_or_else(|_| "python3".into());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_peft_interop.py");
    for name in MODELS {
        let mut pm = PeftModel::new(load(name));
        let cfg = PeftConfig { r: 4, alpha: 8.0, seed: 5, target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()], ..PeftConfig::new(Method::Lora) };
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
        let logits = tch::no_grad(|| pm.logits(&tokens.unsqueeze(0))).unwrap().squeeze_dim(0);
        let file = tmp.path().join("logits.safetensors");
        Tensor::write_safetensors(&[("tokens", &tokens), ("logits", &logits)], &file).unwrap();
        let out = Command::new(&python)
            .arg(&script)
            .arg(fixtures().join(name))
            .arg(&dir)
            .arg(&file)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e} (run scripts/setup.sh, or set RLHF_PY)"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{name}: peft disagrees or failed: {text}");
        assert!(text.contains("max_abs_diff"), "{text}");
    }
}
