//! The `dpo` stage on CPU with tiny models: TRL's loss types computed as
//! written, and DPO on the multiple-choice pairs of the eprstmt fixture
//! raising held-out reward accuracy and margins (the reference: the same
//! base with the adapter off).

mod common;

use common::jobs::{job, LORA};
use rlhf_common::spec::DpoSpec;
use rlhf_worker::train::run::run_job;
use rlhf_worker::train::stages::dpo::dpo_loss;
use serde_json::Value;
use tch::{Device, Tensor};

fn dpo_toml(loss: &str, steps: usize) -> String {
    format!(
        r#"version = 1
kind = "dpo"
seed = 3
[model]
path = "tiny-llama"
dtype = "f32"
max_length = 256
{LORA}
[data]
task = "eprstmt"
from_multiple_choice = true
train = "fewclue/eprstmt/train.json"
eval = "fewclue/eprstmt/dev.json"
[dpo]
beta = 1.0
loss_type = "{loss}"
[train]
max_steps = {steps}
batch_size = 8
lr = 5e-3
warmup_steps = 3
eval_every = 10
"#
    )
}

fn series(dir: &std::path::Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap().get(key).and_then(Value::as_f64))
        .collect()
}

#[test]
fn each_loss_type_is_trls_formula() {
    let t = |v: &[f32]| Tensor::from_slice(v);
    let (pc, pr, rc, rr) = (t(&[-3.0, -5.0]), t(&[-4.0, -2.0]), t(&[-3.5, -4.0]), t(&[-3.0, -2.5]));
    let lens = (t(&[2.0, 4.0]), t(&[1.0, 2.0]));
    let run = |loss: &str, eps: f64| {
        let spec = DpoSpec { beta: 0.5, loss_type: loss.into(), label_smoothing: eps };
        let out = dpo_loss(&spec, (&pc, &pr), (&rc, &rr), (&lens.0, &lens.1));
        Vec::<f32>::try_from(&out.loss).unwrap()
    };
    // Δ = (pc − rc) − (pr − rr) = [0.5 − (−1.0), −1.0 − 0.5] = [1.5, −1.5]; β = 0.5.
    let ls = |x: f64| -(1.0 + (-x).exp()).ln(); // log σ(x)
    let close = |got: Vec<f32>, want: [f64; 2]| {
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    };
    close(run("sigmoid", 0.0), [-ls(0.75), -ls(-0.75)]);
    close(run("sigmoid", 0.2), [-0.8 * ls(0.75) - 0.2 * ls(-0.75), -0.8 * ls(-0.75) - 0.2 * ls(0.75)]);
    close(run("hinge", 0.0), [0.25, 1.75]);
    // IPO: per-token averaged log-ratios, (Δ̄ − 1/(2β))², 1/(2β) = 1.
    close(run("ipo", 0.0), [(0.5 / 2.0 + 1.0 - 1.0f64).powi(2), (-1.0 / 4.0 - 0.5 / 2.0 - 1.0f64).powi(2)]);
    // The implicit rewards are β · log-ratio.
    let spec = DpoSpec { beta: 0.5, ..DpoSpec::default() };
    let out = dpo_loss(&spec, (&pc, &pr), (&rc, &rr), (&lens.0, &lens.1));
    assert_eq!(Vec::<f32>::try_from(&out.chosen_rewards).unwrap(), vec![0.25, -0.5]);
    assert_eq!(Vec::<f32>::try_from(&out.rejected_rewards).unwrap(), vec![-0.5, 0.25]);
}

#[test]
fn dpo_raises_held_out_reward_accuracy_and_margins() {
    let tmp = tempfile::tempdir().unwrap();
    let outcomes = run_job(&job(&dpo_toml("sigmoid", 80)), tmp.path(), Device::Cpu).unwrap();
    let o = &outcomes[0];
    assert_eq!(o.kind, "dpo");
    let acc = series(tmp.path(), "accuracy");
    assert_eq!(acc.len(), 8, "{acc:?}");
    let final_acc = o.final_metrics["accuracy"].as_f64().unwrap();
    assert!(final_acc >= 0.8, "held-out reward accuracy {final_acc} ({acc:?})");
    assert!(o.final_metrics["accuracy_margin"].as_f64().unwrap() > 0.5, "{:?}", o.final_metrics);
    let margins = series(tmp.path(), "rewards_margins");
    let (first, last) = (&margins[..10], &margins[margins.len() - 10..]);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(last) > mean(first) + 0.5, "margins {first:?} → {last:?}");
    // The first step starts at the reference: every implicit reward is 0.
    assert!(margins[0].abs() < 1e-4 && series(tmp.path(), "loss")[0] > 0.69, "{margins:?}");
    assert!(tmp.path().join("adapter/adapter_config.json").exists());
}

#[test]
fn ipo_and_hinge_raise_the_margins_too() {
    for loss in ["ipo", "hinge"] {
        let tmp = tempfile::tempdir().unwrap();
        run_job(&job(&dpo_toml(loss, 40)), tmp.path(), Device::Cpu).unwrap();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (margins, losses) = (series(tmp.path(), "rewards_margins"), series(tmp.path(), "loss"));
        assert!(mean(&margins[30..]) > mean(&margins[..10]) + 0.2, "{loss}: margins {margins:?}");
        assert!(mean(&losses[30..]) < mean(&losses[..10]), "{loss}: losses {losses:?}");
    }
}

#[test]
fn bad_dpo_options_name_the_field() {
    for (bad, field) in [
        ("beta = 0.0", "dpo.beta"),
        ("loss_type = \"kto\"", "dpo.loss_type"),
        ("label_smoothing = 0.5", "dpo.label_smoothing"),
        ("loss_type = \"ipo\"\nlabel_smoothing = 0.1", "dpo.label_smoothing"),
    ] {
        let text = dpo_toml("sigmoid", 1).replace("beta = 1.0\nloss_type = \"sigmoid\"", bad);
        let e = rlhf_common::spec::JobSpec::from_toml(&text).unwrap_err().to_string();
        assert!(e.starts_with(field), "{bad}: {e}");
    }
}

#[test]
fn an_interrupted_dpo_resumes_from_its_checkpoint_to_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    // With model selection on: the best evaluation's state survives the resume too.
    let text = |every: usize| {
        dpo_toml("sigmoid", 30).replace("eval_every = 10", "eval_every = 5\nselect_best = true")
            + &format!("[checkpoint]\nevery = {every}\n")
    };
    let whole = tmp.path().join("whole");
    run_job(&job(&text(0)), &whole, Device::Cpu).unwrap();
    let part = tmp.path().join("part");
    run_job(&job(&text(10)), &part, Device::Cpu).unwrap();
    // Pretend the process died right after the step-20 checkpoint.
    std::fs::remove_dir_all(part.join("adapter")).unwrap();
    std::fs::remove_dir_all(part.join("checkpoints/step-10")).ok();
    std::fs::remove_file(part.join("metrics.jsonl")).unwrap();
    run_job(&job(&text(10)), &part, Device::Cpu).unwrap();
    assert_eq!(series(&part, "step").first().copied(), Some(21.0), "resumed at the checkpoint");
    let read = |d: &std::path::Path| {
        let mut t = Tensor::read_safetensors(d.join("adapter/adapter_model.safetensors")).unwrap();
        t.sort_by(|x, y| x.0.cmp(&y.0));
        t
    };
    let (a, b) = (read(&whole), read(&part));
    assert!(!a.is_empty() && a.len() == b.len());
    for ((ka, xa), (_, xb)) in a.iter().zip(&b) {
        assert!(xa.equal(xb), "{ka} differs after resume");
    }
}

#[test]
fn a_pipeline_runs_dpo_over_the_sft_model_and_evaluates_it() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        r#"version = 1
kind = "pipeline"
seed = 3
[model]
path = "tiny-llama"
dtype = "f32"
max_length = 256
{LORA}
[data]
task = "eprstmt"
train = "fewclue/eprstmt/train.json"
eval = "fewclue/eprstmt/dev.json"
[[stage]]
name = "sft"
kind = "sft"
train = {{ max_steps = 20, batch_size = 8, lr = 3e-3 }}
[[stage]]
name = "dpo"
kind = "dpo"
data = {{ task = "eprstmt", from_multiple_choice = true, train = "fewclue/eprstmt/train.json", eval = "fewclue/eprstmt/dev.json" }}
dpo = {{ beta = 1.0 }}
train = {{ max_steps = 10, batch_size = 8, lr = 5e-3 }}
[[stage]]
name = "eval"
kind = "eval"
eval = {{ modes = ["choice"], tasks = [{{ task = "eprstmt", path = "fewclue/eprstmt/dev.json" }}] }}
"#
    );
    let outcomes = run_job(&job(&text), tmp.path(), Device::Cpu).unwrap();
    let kinds: Vec<&str> = outcomes.iter().map(|o| o.kind.as_str()).collect();
    assert_eq!(kinds, ["sft", "dpo", "eval"]);
    // DPO's reference is the SFT model (merged under both): the first step
    // starts at zero implicit rewards.
    let margins: Vec<f64> = std::fs::read_to_string(tmp.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["stage"] == "dpo")
        .filter_map(|r| r.get("rewards_margins").and_then(Value::as_f64))
        .collect();
    assert!(margins.len() == 10 && margins[0].abs() < 1e-4, "{margins:?}");
    assert!(tmp.path().join("stages/dpo/adapter/adapter_config.json").exists());
    let report = std::fs::read_to_string(tmp.path().join("report.md")).unwrap();
    assert!(report.contains("dpo"), "{report}");
}

#[test]
fn select_best_keeps_the_best_evaluations_state() {
    let tmp = tempfile::tempdir().unwrap();
    let text = dpo_toml("sigmoid", 40).replace("eval_every = 10", "eval_every = 4\nselect_best = true");
    let o = &run_job(&job(&text), tmp.path(), Device::Cpu).unwrap()[0];
    let acc = series(tmp.path(), "accuracy");
    let best = acc.iter().cloned().fold(f64::MIN, f64::max);
    // The final model is scored again after the restore: the same value.
    let final_acc = o.final_metrics["accuracy"].as_f64().unwrap();
    assert!((final_acc - best).abs() < 1e-9, "final {final_acc}, evaluations {acc:?}");
    let selected = series(tmp.path(), "selected_step");
    let at = acc.iter().position(|&a| a == best).unwrap();
    // The seeded run peaks before its end, so the restore path runs.
    assert!(at + 1 < acc.len(), "the best evaluation is the last: nothing restored ({acc:?})");
    assert_eq!(selected, vec![4.0 * (at + 1) as f64], "{acc:?}");
}
