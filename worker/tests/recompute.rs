//! Activation checkpointing (`ppo.gradient_checkpointing`) gives the
//! gradients of the plain backward for every adapter method on both model
//! families, on a left-padded PPO batch; and a PPO job trains the same
//! adapters with it on or off.

mod common;

use common::*;
use rlhf_common::spec::JobSpec;
use rlhf_model::peft::{self, Method, PeftConfig, PeftModel};
use rlhf_worker::train::logprobs::backprop_through_head;
use rlhf_worker::train::ppo::rollout::Batch;
use rlhf_worker::train::run::run_job;
use tch::{Device, Kind, Tensor};

fn adapter_model(name: &str, method: Method) -> PeftModel {
    let mut pm = PeftModel::new(load(name));
    let mut c = PeftConfig::new(method);
    c.r = 4;
    c.seed = 5;
    if method == Method::Lora {
        c.target_modules = vec!["all-linear".into()];
    }
    let a = peft::build(c, &pm.base).unwrap();
    // Away from the identity init, so every parameter gets a gradient.
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(9);
    tch::no_grad(|| {
        for mut t in a.parameters() {
            let _ = t.f_add_(&peft::normal(&t.size(), 0.05, &mut rng, t.device())).unwrap();
        }
    });
    pm.add("a", a).unwrap();
    pm.set_active(Some("a")).unwrap();
    pm
}

/// A batch of two prompts (one left-padded) with responses of 3 and 1 tokens.
fn batch() -> Batch {
    Batch::new(&[vec![5, 9, 14, 3], vec![7, 11]], &[vec![20, 21, 22], vec![30]], 0, Device::Cpu)
}

/// Gradients of a logprob-weighted loss, and the loss.
fn grads(pm: &PeftModel, recompute: bool) -> (Vec<Tensor>, f64) {
    let b = batch();
    let params = pm.adapter("a").unwrap().parameters();
    for p in &params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let weights = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 1.5, 0.0, 0.0]).view([2, 3]);
    let loss = b
        .train_step(pm, recompute, |hidden| {
            backprop_through_head(pm, hidden, &b.response, 1.0, false, |logp, _| {
                let loss = (logp * &weights * &b.mask).sum(Kind::Float);
                let v = loss.double_value(&[]);
                Ok((loss, v))
            })
        })
        .unwrap();
    (params.iter().map(|p| p.grad().copy()).collect(), loss)
}

#[test]
fn checkpointed_gradients_equal_plain_ones() {
    for name in MODELS {
        for method in [Method::Lora, Method::Ssf, Method::RepAdapter, Method::Full] {
            let pm = adapter_model(name, method);
            let (plain, l1) = grads(&pm, false);
            let (ckpt, l2) = grads(&pm, true);
            assert_eq!(l1, l2, "{name} {method:?}: loss");
            let mut worst = 0f64;
            for (a, b) in plain.iter().zip(&ckpt) {
                assert!(
                    a.abs().sum(Kind::Float).double_value(&[]) > 0.0 || method == Method::Full,
                    "{name} {method:?}: a zero gradient"
                );
                worst = worst.max((a - b).abs().max().double_value(&[]) / (1.0 + a.abs().max().double_value(&[])));
            }
            assert!(worst < 1e-5, "{name} {method:?}: gradients differ by {worst:e}");
        }
    }
}

/// Runs the job `text(false)` and `text(true)`; `files` must match.
fn same_outputs(text: impl Fn(bool) -> String, files: &[&str]) {
    let mut outs = Vec::new();
    for on in [false, true] {
        let mut job = JobSpec::from_toml(&text(on)).unwrap();
        job.resolve_paths(&fixtures());
        let dir = tempfile::tempdir().unwrap();
        run_job(&job, dir.path(), Device::Cpu).unwrap();
        outs.push(dir);
    }
    for f in files {
        let d = max_file_diff(&outs[0].path().join(f), &outs[1].path().join(f));
        eprintln!("{f}: checkpointing on vs off: max |diff| = {d:e}");
        assert!(d < 1e-5, "{f}: {d:e}");
    }
}

#[test]
fn a_ppo_job_trains_the_same_adapters_with_checkpointing() {
    let text = |on: bool| {
        format!(
            "version = 1\nkind = \"ppo\"\nseed = 6\n[model]\npath = \"tiny-qwen2\"\nmax_length = 128\n\
             [peft]\nmethod = \"lora\"\nr = 4\ntarget_modules = [\"all-linear\"]\n\
             [data]\ntask = \"eprstmt\"\ntrain = \"fewclue/eprstmt/train.json\"\n\
             [ppo]\niterations = 3\nrollout_batch = 6\nminibatch = 3\nmax_new_tokens = 3\ntemperature = 1.0\nlr = 3e-3\n\
             gradient_checkpointing = {on}\nreward = {{ kind = \"label\" }}\n"
        )
    };
    same_outputs(text, &["adapter/adapter_model.safetensors", "critic/adapter_model.safetensors"]);
}

#[test]
fn an_sft_job_trains_the_same_adapter_with_checkpointing() {
    let text = |on: bool| {
        format!(
            "version = 1\nkind = \"sft\"\nseed = 2\n[model]\npath = \"tiny-llama\"\nmax_length = 128\n\
             [peft]\nmethod = \"ssf\"\n[data]\ntask = \"eprstmt\"\ntrain = \"fewclue/eprstmt/train.json\"\n\
             [train]\nmax_steps = 5\nbatch_size = 4\nlr = 3e-3\ngradient_checkpointing = {on}\n"
        )
    };
    same_outputs(text, &["adapter/adapter_model.safetensors"]);
}
