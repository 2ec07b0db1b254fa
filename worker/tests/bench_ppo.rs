//! `rlhf-worker bench ppo` as a user runs it, on the tiny preset: every
//! configuration in its own child process, one JSON object on the last line.

use std::process::Command;

use serde_json::Value;

fn positive(v: &Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what} = {x}");
    x
}

#[test]
fn tiny_bench_reports_every_field_and_shared_lora_uses_less_memory_than_naive() {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf-worker"))
        .args(["--threads", "1", "bench", "ppo", "--preset", "tiny", "--json", "--iterations", "1"])
        .args(["--batch", "2", "--prompt-len", "16", "--response-len", "8", "--configs", "lora,naive"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run rlhf-worker");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().expect("a JSON line");
    let r: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));

    assert_eq!(r["model"], "preset tiny");
    assert_eq!(r["shape"]["hidden"], 64);
    assert_eq!(
        (r["batch"].as_u64(), r["prompt_len"].as_u64(), r["response_len"].as_u64()),
        (Some(2), Some(16), Some(8))
    );
    let configs = r["configs"].as_object().expect("configs object");
    assert_eq!(configs.len(), 2, "{r}");
    for name in ["lora", "naive"] {
        let c = &configs[name];
        assert!(c.get("error").is_none(), "{name} failed: {c}");
        positive(&c["peak_memory_bytes"], &format!("{name}.peak_memory_bytes"));
        positive(&c["peak_memory_mib"], &format!("{name}.peak_memory_mib"));
        assert_eq!(c["peak_memory_source"], "VmHWM");
        let total = positive(&c["s_per_iter"], &format!("{name}.s_per_iter"));
        positive(&c["tokens_per_s"], &format!("{name}.tokens_per_s"));
        positive(&c["trainable_params"], &format!("{name}.trainable_params"));
        let mut sum = 0.0;
        for phase in ["generate", "reference", "reward", "values", "train"] {
            sum += positive(&c["phases"][phase], &format!("{name}.phases.{phase}"));
        }
        assert!(sum <= total * 1.01, "{name}: phases {sum} exceed the iteration {total}");
        assert!(c["last_metrics"]["policy_loss"].as_f64().is_some_and(f64::is_finite), "{c}");
    }
    assert_eq!(configs["lora"]["models_loaded"], 1);
    assert_eq!(configs["naive"]["models_loaded"], 4);
    let lora = configs["lora"]["peak_memory_bytes"].as_f64().unwrap_or(f64::NAN);
    let naive = configs["naive"]["peak_memory_bytes"].as_f64().unwrap_or(f64::NAN);
    assert!(lora < naive, "shared-base lora peak {lora} is not below naive {naive}");
    let ratio = positive(&r["memory_ratio_vs_naive"], "memory_ratio_vs_naive");
    assert!((ratio - lora / naive).abs() < 1e-9 && ratio < 1.0, "{ratio}");
    assert!(r["time_ratio_vs_trl"].is_null(), "no trl config was run");
}

/// The baseline is the real TRL PPOTrainer (scripts/setup-bench.sh installs
/// it; the bench finds the project venv by itself, without RLHF_PY).
#[test]
fn tiny_bench_runs_the_real_trl_ppo_trainer_beside_lora() {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf-worker"))
        .args(["--threads", "1", "bench", "ppo", "--preset", "tiny", "--json", "--iterations", "1"])
        .args([
            "--batch",
            "4",
            "--prompt-len",
            "16",
            "--response-len",
            "8",
            "--minibatch",
            "2",
            "--configs",
            "lora,trl",
        ])
        .env("RUST_LOG", "warn")
        .env_remove("RLHF_PY")
        .output()
        .expect("run rlhf-worker");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    let trl = &r["configs"]["trl"];
    assert!(trl.get("error").is_none(), "trl failed: {trl}");
    assert_eq!(trl["versions"]["trl"], "1.12.0", "{trl}");
    assert_eq!(trl["models_loaded"], 3);
    let total = positive(&trl["s_per_iter"], "trl.s_per_iter");
    let mut sum = 0.0;
    for phase in ["generate", "reference", "reward", "values", "train"] {
        sum += positive(&trl["phases"][phase], &format!("trl.phases.{phase}"));
    }
    assert!((sum - total).abs() <= total * 0.01, "trl phases {sum} vs iteration {total}");
    positive(&trl["peak_memory_bytes"], "trl.peak_memory_bytes");
    assert!(trl["last_metrics"]["policy_loss"].as_f64().is_some_and(f64::is_finite), "{trl}");
    let lora = positive(&r["configs"]["lora"]["s_per_iter"], "lora.s_per_iter");
    let ratio = positive(&r["time_ratio_vs_trl"], "time_ratio_vs_trl");
    assert!((ratio - lora / total).abs() < 1e-9, "{ratio}");
}

#[test]
fn seven_b_shape_is_refused_on_cpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf-worker"))
        .args(["bench", "ppo", "--preset", "7b-shape"])
        .output()
        .expect("run rlhf-worker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--device cuda"), "{err}");
}
