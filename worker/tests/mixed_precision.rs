//! Mixed precision: the same SFT, reward and PPO jobs with `model.dtype =
//! "bf16"` (frozen base in bf16; adapters, heads, optimizer state, norms,
//! log-probs and losses in f32) track the f32 runs on the tiny fixtures.
//!
//! Tolerances, stated once here:
//! - SFT: the first step's loss within 2% (one forward, bf16 rounding only);
//!   the mean of the last ten losses within 0.05 absolute (the runs drift
//!   apart step by step, as any two precisions do); eval accuracy within 0.1.
//! - Reward: final held-out pairwise accuracy within 0.1, and ≥ 0.75 in both.
//! - PPO: the bf16 run raises its reward as the f32 run does (last five
//!   iterations ≥ first three + 0.2), and its final mean reward is within 0.2.

mod common;

use std::path::Path;

use common::jobs::{job, ppo_toml, reward_toml, sft_toml};
use rlhf_worker::train::run::run_job;
use serde_json::Value;
use tch::Device;

fn run(text: &str, out: &Path) -> (Vec<Value>, Value) {
    let outcomes = run_job(&job(text), out, Device::Cpu).unwrap();
    let m = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (m, Value::Object(outcomes[0].final_metrics.clone()))
}

fn series(m: &[Value], key: &str) -> Vec<f64> {
    m.iter().filter_map(|r| r.get(key).and_then(Value::as_f64)).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[test]
fn bf16_sft_reward_and_ppo_track_f32() {
    let tmp = tempfile::tempdir().unwrap();
    // SFT.
    let (f, _) = run(&sft_toml("f32", 60, 1, 0), &tmp.path().join("sft-f32"));
    let (b, _) = run(&sft_toml("bf16", 60, 1, 0), &tmp.path().join("sft-bf16"));
    let (lf, lb) = (series(&f, "loss"), series(&b, "loss"));
    assert_eq!(lf.len(), lb.len());
    assert!((lf[0] - lb[0]).abs() <= 0.02 * lf[0], "first loss f32 {} bf16 {}", lf[0], lb[0]);
    let (tf, tb) = (mean(&lf[50..]), mean(&lb[50..]));
    assert!((tf - tb).abs() <= 0.05, "last losses f32 {tf} bf16 {tb}\nf32 {lf:?}\nbf16 {lb:?}");
    assert!(tb < 0.25 * mean(&lb[..5]), "bf16 loss did not fall: {lb:?}");
    let last = |m: &[Value]| series(m, "eval_accuracy").last().copied().expect("an eval at the last step");
    let (af, ab) = (last(&f), last(&b));
    assert!((af - ab).abs() <= 0.1, "eval accuracy f32 {af} bf16 {ab}");
    eprintln!("sft: first loss {} / {}, last-10 mean {tf} / {tb}, accuracy {af} / {ab} (f32 / bf16)", lf[0], lb[0]);

    // Reward model.
    let (_, rf) = run(&reward_toml("f32"), &tmp.path().join("rm-f32"));
    let (_, rb) = run(&reward_toml("bf16"), &tmp.path().join("rm-bf16"));
    let (af, ab) = (rf["accuracy"].as_f64().unwrap(), rb["accuracy"].as_f64().unwrap());
    assert!(af >= 0.75 && ab >= 0.75 && (af - ab).abs() <= 0.1, "reward accuracy f32 {af} bf16 {ab}");
    eprintln!("reward: held-out accuracy {af} / {ab}");

    // PPO from each precision's own SFT adapter.
    let ppo = |dtype: &str| ppo_toml(dtype, &tmp.path().join(format!("sft-{dtype}/adapter")), 25, 3);
    let (pf, _) = run(&ppo("f32"), &tmp.path().join("ppo-f32"));
    let (pb, _) = run(&ppo("bf16"), &tmp.path().join("ppo-bf16"));
    let (rf, rb) = (series(&pf, "reward_mean"), series(&pb, "reward_mean"));
    for (name, r) in [("f32", &rf), ("bf16", &rb)] {
        assert!(mean(&r[20..]) >= mean(&r[..3]) + 0.2, "{name} reward did not rise: {r:?}");
    }
    let (ef, eb) = (mean(&rf[20..]), mean(&rb[20..]));
    assert!((ef - eb).abs() <= 0.2, "final reward f32 {ef} bf16 {eb}\nf32 {rf:?}\nbf16 {rb:?}");
    eprintln!("ppo: final reward {ef} / {eb}");
}
