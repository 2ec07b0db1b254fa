//! `rlhf-worker bench decode` as a user runs it, on the tiny preset: the
//! figures of each --steps mode in one run (the eager loop, the CUDA graph's
//! fixed-shape step run op by op, the plain loop), the same tokens from
//! each in f32; a bad --steps is refused by name.

use std::process::{Command, Output};

use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlhf-worker"))
        .args(["--threads", "1", "bench", "decode", "--preset", "tiny", "--prompt-len", "8", "--new-tokens", "6"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run rlhf-worker")
}

fn positive(v: &Value, what: &str) {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what} = {x}");
}

#[test]
fn decode_bench_compares_step_modes_in_one_run() {
    let out = bench(&["--batch", "1", "3", "--runs", "1", "--steps", "auto", "fixed", "eager"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    assert_eq!((r["steps"].as_str(), r["steps_resolved"].as_str()), (Some("auto"), Some("eager")), "{r}");
    for b in ["1", "3"] {
        positive(&r["decode_ms_per_step"][b], "decode_ms_per_step");
        positive(&r["plain_decode_ms_per_step"][b], "plain_decode_ms_per_step");
        for mode in ["fixed", "eager"] {
            positive(&r["steps_ms_per_step"][mode][b], mode);
            // f32: every mode decodes the same greedy tokens.
            assert_eq!(r["steps_token_agreement"][mode][b].as_f64(), Some(1.0), "{mode} at batch {b}: {r}");
        }
    }
}

#[test]
fn decode_bench_refuses_an_unknown_step_mode_by_name() {
    let out = bench(&["--steps", "warp"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--steps") && stderr.contains("warp"), "{stderr}");
}
