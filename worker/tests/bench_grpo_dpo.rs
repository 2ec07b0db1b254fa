//! `rlhf-worker bench grpo` and `bench dpo` as a user runs them, on the tiny
//! preset, each beside the real TRL 1.12 trainer (scripts/setup-bench.sh
//! installs it; the bench finds the project venv by itself): every
//! configuration in its own child process, one JSON object on the last line.

use std::process::Command;

use serde_json::Value;

fn positive(v: &Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what} = {x}");
    x
}

fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf-worker"))
        .args(["--threads", "1", "bench"])
        .args(args)
        .args(["--preset", "tiny", "--json", "--iterations", "1", "--configs", "lora,trl"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run rlhf-worker");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"))
}

/// Every configuration ran and reports its figures; the phases add up to at
/// most the iteration; the ratios are lora's figures over TRL's.
fn check_configs(r: &Value, phases: &[&str]) {
    let configs = r["configs"].as_object().expect("configs object");
    assert_eq!(configs.len(), 2, "{r}");
    for name in ["lora", "trl"] {
        let c = &configs[name];
        assert!(c.get("error").is_none(), "{name} failed: {c}");
        positive(&c["peak_memory_bytes"], &format!("{name}.peak_memory_bytes"));
        positive(&c["trainable_params"], &format!("{name}.trainable_params"));
        let total = positive(&c["s_per_iter"], &format!("{name}.s_per_iter"));
        let sum: f64 = phases.iter().map(|p| c["phases"][*p].as_f64().unwrap_or(f64::NAN)).sum();
        assert!(sum.is_finite() && sum <= total * 1.01, "{name}: phases {sum} vs the iteration {total}: {c}");
    }
    assert_eq!(configs["lora"]["trainable_params"], configs["trl"]["trainable_params"], "the same LoRA shape");
    for (key, field) in [("time_ratio_vs_trl", "s_per_iter"), ("memory_ratio_vs_trl", "peak_memory_bytes")] {
        let want = configs["lora"][field].as_f64().unwrap() / configs["trl"][field].as_f64().unwrap();
        assert!((positive(&r[key], key) - want).abs() < 1e-9, "{key}: {r}");
    }
}

#[test]
fn grpo_bench_runs_the_real_trl_grpo_trainer_beside_lora() {
    let r = bench(&["grpo", "--batch", "2", "--generations", "2", "--prompt-len", "8", "--response-len", "6"]);
    assert_eq!(r["bench"], "grpo");
    assert_eq!((r["batch"].as_u64(), r["generations"].as_u64(), r["minibatch"].as_u64()), (Some(2), Some(2), Some(4)));
    check_configs(&r, &["generate", "reference", "reward", "train"]);
    let configs = &r["configs"];
    assert_eq!(
        (configs["lora"]["models_loaded"].as_u64(), configs["trl"]["models_loaded"].as_u64()),
        (Some(1), Some(2))
    );
    for name in ["lora", "trl"] {
        let reference = configs[name]["phases"]["reference"].as_f64().unwrap();
        assert!(reference < 1e-3, "beta 0: no reference pass ({name}: {reference} s)");
        positive(&configs[name]["phases"]["generate"], &format!("{name}.phases.generate"));
    }
    assert_eq!(configs["trl"]["last_metrics"]["completions/mean_length"], 6.0, "TRL sampled exactly 6 tokens");
}

#[test]
fn dpo_bench_runs_the_real_trl_dpo_trainer_beside_lora() {
    let r = bench(&["dpo", "--batch", "2", "--seq-len", "16", "--prompt-len", "4"]);
    assert_eq!(r["bench"], "dpo");
    assert_eq!((r["batch"].as_u64(), r["seq_len"].as_u64(), r["prompt_len"].as_u64()), (Some(2), Some(16), Some(4)));
    check_configs(&r, &["reference", "train"]);
    for name in ["lora", "trl"] {
        positive(&r["configs"][name]["phases"]["reference"], &format!("{name}.phases.reference"));
    }
    // The first step of both starts at the DPO loss of equal policies, ln 2;
    // one step later both have moved off it by little.
    let loss = r["configs"]["lora"]["last_metrics"]["loss"].as_f64().unwrap();
    assert!((loss - std::f64::consts::LN_2).abs() < 0.05, "{loss}");
}
