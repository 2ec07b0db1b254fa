//! Data parallel on CPU, in one process: two ranks (threads summing
//! through `parallel::local`) train the same adapter a single worker trains on
//! the same global batches and seed. Both split odd batches unevenly, so
//! the per-rank loss weighting is exercised too.

mod common;

use std::path::Path;

use common::{fixtures, max_file_diff};
use rlhf_common::spec::JobSpec;
use rlhf_worker::parallel::{local, Collective};
use rlhf_worker::train::run::{run_job, run_job_with, RunOptions};
use serde_json::Value;
use tch::Device;

fn job(text: &str) -> JobSpec {
    let mut j = JobSpec::from_toml(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    j.resolve_paths(&fixtures());
    j
}

const HEAD: &str = r#"version = 1
seed = 5
[model]
path = "tiny-llama"
max_length = 128
[peft]
method = "lora"
r = 4
alpha = 8
target_modules = ["all-linear"]
"#;

fn sft() -> String {
    format!(
        "kind = \"sft\"\n{HEAD}[data]\ntask = \"eprstmt\"\ntrain = \"fewclue/eprstmt/train.json\"\n[train]\nmax_steps = 8\nbatch_size = 5\ngrad_accum = 2\nlr = 3e-3\nwarmup_steps = 2\n"
    )
}

fn reward() -> String {
    format!(
        "kind = \"reward\"\n{HEAD}[data]\ntask = \"eprstmt\"\nfrom_multiple_choice = true\ntrain = \"fewclue/eprstmt/train.json\"\n[train]\nmax_steps = 24\nbatch_size = 5\nlr = 2e-3\n"
    )
}

/// Runs `text` as `world` ranks into `out`; rank 0 writes the job's files.
fn run_ranks(text: &str, out: &Path, world: usize) {
    let spec = job(text);
    std::thread::scope(|s| {
        let handles: Vec<_> = local::group(world)
            .into_iter()
            .map(|rank| {
                let spec = spec.clone();
                s.spawn(move || {
                    let opts =
                        RunOptions { collective: Some(Box::new(rank) as Box<dyn Collective>), ..RunOptions::default() };
                    run_job_with(&spec, out, Device::Cpu, opts)
                })
            })
            .collect();
        for (r, h) in handles.into_iter().enumerate() {
            h.join().expect("rank thread").unwrap_or_else(|e| panic!("rank {r}: {e}"));
        }
    });
}

fn losses(dir: &Path, file: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

fn check(text: &str, files: &[&str]) {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run_job(&job(text), one.path(), Device::Cpu).unwrap();
    run_ranks(text, two.path(), 2);
    for f in files {
        let d = max_file_diff(&one.path().join(f), &two.path().join(f));
        eprintln!("{f}: 2 ranks vs 1 worker: max |diff| = {d:e}");
        assert!(d < 2e-5, "{f}: 2 ranks differ from 1 worker by {d:e}");
    }
    if text.contains("kind = \"ppo\"") {
        return check_ppo_metrics(one.path(), two.path());
    }
    // The ranks log the global loss: the same numbers as one worker.
    let (l1, l2, l2b) = (
        losses(one.path(), "metrics.jsonl"),
        losses(two.path(), "metrics.jsonl"),
        losses(two.path(), "metrics-rank1.jsonl"),
    );
    assert_eq!(l1.len(), l2.len());
    for ((a, b), c) in l1.iter().zip(&l2).zip(&l2b) {
        assert!((a - b).abs() < 1e-5 && b == c, "loss {a} (1 worker) vs {b} / {c} (ranks 0 / 1)");
    }
    let k = l1.len() / 3;
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(avg(&l1[l1.len() - k..]) < avg(&l1[..k]), "loss fell: {l1:?}");
    // Only rank 0 wrote the outputs.
    assert!(!two.path().join("metrics-rank0.jsonl").exists());
}

fn ppo() -> String {
    format!(
        "kind = \"ppo\"\n{HEAD}[data]\ntask = \"eprstmt\"\ntrain = \"fewclue/eprstmt/train.json\"\n\
         [ppo]\niterations = 4\nrollout_batch = 7\nminibatch = 3\nppo_epochs = 2\nmax_new_tokens = 3\ntemperature = 1.0\n\
         lr = 3e-3\ncritic_lr = 3e-3\nkl_target = 0.5\nreward = {{ kind = \"label\" }}\n"
    )
}

#[test]
fn two_ranks_train_the_sft_adapter_of_one_worker() {
    check(&sft(), &["adapter/adapter_model.safetensors"]);
}

/// PPO logs batch-wide numbers: both ranks log what one worker logs.
fn check_ppo_metrics(one: &Path, two: &Path) {
    let read = |d: &Path, f: &str| -> Vec<Value> {
        std::fs::read_to_string(d.join(f)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (a, b, c) = (read(one, "metrics.jsonl"), read(two, "metrics.jsonl"), read(two, "metrics-rank1.jsonl"));
    assert_eq!((a.len(), b.len(), c.len()), (4, 4, 4));
    for key in [
        "reward_mean",
        "reward_std",
        "kl",
        "kl_coef",
        "policy_loss",
        "value_loss",
        "response_len",
        "advantage_mean",
        "grad_norm",
    ] {
        for ((x, y), z) in a.iter().zip(&b).zip(&c) {
            let (x, y, z) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap(), z[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + x.abs()) && (y - z).abs() <= 1e-6 * (1.0 + y.abs()),
                "{key}: {x} (1 worker) vs {y} / {z} (ranks 0 / 1)"
            );
        }
    }
}

#[test]
fn two_ranks_train_the_ppo_policy_and_critic_of_one_worker() {
    check(
        &ppo(),
        &["adapter/adapter_model.safetensors", "critic/adapter_model.safetensors", "critic/value_head.safetensors"],
    );
}

#[test]
fn two_ranks_train_the_reward_model_of_one_worker() {
    check(&reward(), &["reward_model/adapter_model.safetensors", "reward_model/reward_head.safetensors"]);
}

/// A whole pipeline (pretrain → sft → reward → ppo → eval) on two ranks:
/// every training stage matches one worker's, rank 0 evaluates and writes
/// the report.
#[test]
fn two_ranks_run_the_pipeline_of_one_worker() {
    let text = r#"version = 1
kind = "pipeline"
seed = 7
[model]
init = { preset = "tiny", corpus = "corpus/tiny_zh.txt" }
max_length = 96
[peft]
method = "lora"
r = 4
target_modules = ["all-linear"]
[data]
task = "eprstmt"
train = "fewclue/eprstmt/train.json"
[[stage]]
name = "pretrain"
kind = "pretrain"
data = { train = "corpus/tiny_zh.txt" }
train = { max_steps = 4, batch_size = 4, lr = 3e-3 }
[[stage]]
name = "sft"
kind = "sft"
train = { max_steps = 4, batch_size = 5, lr = 3e-3 }
[[stage]]
name = "reward"
kind = "reward"
data = { task = "eprstmt", from_multiple_choice = true, train = "fewclue/eprstmt/train.json" }
train = { max_steps = 4, batch_size = 4, lr = 1e-3 }
[[stage]]
name = "ppo"
kind = "ppo"
ppo = { iterations = 2, rollout_batch = 6, minibatch = 4, max_new_tokens = 3, temperature = 0.7, reward = { kind = "model" } }
[[stage]]
name = "eval"
kind = "eval"
eval = { modes = ["choice"], tasks = [{ task = "eprstmt", path = "fewclue/eprstmt/dev.json" }] }
"#;
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run_job(&job(text), one.path(), Device::Cpu).unwrap();
    run_ranks(text, two.path(), 2);
    for f in [
        "stages/sft/adapter/adapter_model.safetensors",
        "stages/reward/reward_model/adapter_model.safetensors",
        "stages/ppo/adapter/adapter_model.safetensors",
    ] {
        let d = max_file_diff(&one.path().join(f), &two.path().join(f));
        eprintln!("{f}: 2 ranks vs 1 worker: max |diff| = {d:e}");
        // Adam turns float-rounding differences of near-zero gradients into
        // up to lr-sized steps, and the stages compound them: looser than above.
        assert!(d < 1e-4, "{f}: {d:e}");
    }
    let report = |d: &Path| std::fs::read_to_string(d.join("report.md")).unwrap();
    assert!(report(two.path()).contains("eprstmt"), "{}", report(two.path()));
    let accuracy = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("stages/eval/outcome.json")).unwrap()).unwrap()
    };
    assert_eq!(accuracy(one.path())["accuracies"], accuracy(two.path())["accuracies"]);
}

/// GPU ranks sum with NCCL through cudarc's run-time loading: this build
/// (made without CUDA) finds and loads the NCCL that torch ships.
#[test]
fn nccl_loads_at_run_time_without_cuda_at_build_time() {
    let v = rlhf_worker::parallel::nccl::version().expect("libnccl loads");
    eprintln!("NCCL version code {v}");
    assert!(v >= 20000, "NCCL 2.x, got {v}");
    // A CPU rank cannot join an NCCL group; it says why instead of crashing.
    let boot: Box<dyn Collective> = Box::new(rlhf_worker::parallel::Single);
    let e = rlhf_worker::parallel::nccl::NcclRank::init(boot, Device::Cpu).err().expect("refused on cpu").to_string();
    assert!(e.contains("nccl needs a cuda device"), "{e}");
}

/// A rank generates its rows of a global batch: each row samples from its
/// own stream, so the rows come out as they would in the whole batch.
#[test]
fn a_slice_of_a_batch_samples_what_the_whole_batch_samples() {
    use rlhf_model::{generate, generate_rows, GenerateOptions, NoHooks, Sampling};
    let m = common::load("tiny-llama");
    let prompts: Vec<Vec<i64>> = vec![vec![42, 259, 73], vec![270, 76], vec![222, 166, 125, 249], vec![167, 227]];
    let opts = GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling { temperature: 1.0, top_p: 0.95, top_k: 0, seed: 11 },
        eos_ids: vec![],
        pad_id: 0,
        steps: rlhf_model::Steps::Auto,
    };
    let all = generate(&m, &NoHooks, &prompts, &opts).unwrap();
    let odd = generate_rows(&m, &NoHooks, &[prompts[1].clone(), prompts[3].clone()], &opts, &[1, 3]).unwrap();
    assert_eq!(odd.tokens, vec![all.tokens[1].clone(), all.tokens[3].clone()]);
    assert_ne!(all.tokens[1], all.tokens[3], "rows draw from different streams");
}
