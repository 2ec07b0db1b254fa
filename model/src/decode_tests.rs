//! The decode loop's fast path (a static cache written in place, finished
//! rows leaving the batch) against the plain one (a cache grown by
//! concatenation, every row decoded to the end): the same tokens and
//! log-probs (see [`fast_equals_plain`]), greedy and sampled, f32 and bf16,
//! on a tiny random model and, when it is present, on Qwen2.5-0.5B.

use std::path::PathBuf;

use tch::{Device, Kind};

use super::*;
use crate::init::Preset;
use crate::random::random_model;
use crate::sampling::Sampling;
use crate::NoHooks;

/// Prompts of several lengths (left padding), two of them the same (a
/// shared prefill), over token ids below `vocab`.
fn prompts(vocab: i64) -> Vec<Vec<i64>> {
    let t = |seed: i64, n: i64| (0..n).map(|i| (seed * 31 + i * 17) % (vocab - 10) + 5).collect::<Vec<i64>>();
    vec![t(1, 7), t(2, 3), t(1, 7), t(3, 12), t(4, 1), t(5, 9)]
}

fn run(model: &Model, prompts: &[Vec<i64>], opts: &GenerateOptions, cache: &mut KvCache, decode: Decode) -> Generation {
    let rows: Vec<u64> = (0..prompts.len() as u64).collect();
    tch::no_grad(|| generate_inner(model, &NoHooks, prompts, opts, &rows, cache, decode)).expect("generate")
}

/// Every variant of the loop gives the plain one's tokens; its log-probs
/// bit for bit with every row kept, and to float rounding (2e-6) once rows
/// leave the batch (a smaller batch is a different GEMM shape, whose sums
/// may round differently in the last bit). Returns the response lengths
/// (so a test can check rows finish apart).
fn fast_equals_plain(model: &Model, prompts: &[Vec<i64>], opts: &GenerateOptions) -> Vec<usize> {
    let plain = run(
        model,
        prompts,
        opts,
        &mut KvCache::new(model.layers.len()),
        Decode { drop_finished_at: 2.0, ..Decode::default() },
    );
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let shape = cache_shape(model, prompts.len(), longest + opts.max_new_tokens);
    let mut reused = KvCache::with_capacity(cache_shape(model, 1, 2));
    let keep_all = Decode { drop_finished_at: 2.0, ..Decode::default() };
    let fixed = GenerateOptions { steps: Steps::Fixed, ..opts.clone() };
    let mut small = KvCache::with_capacity(cache_shape(model, 2, 3));
    for (what, cache, decode, opts) in [
        ("static", &mut KvCache::with_capacity(shape), keep_all, opts),
        ("static, dropping finished rows", &mut KvCache::with_capacity(shape), Decode::default(), opts),
        (
            "static, dropping each finished row",
            &mut KvCache::with_capacity(shape),
            Decode { drop_finished_at: 0.0, ..Decode::default() },
            opts,
        ),
        ("growing, dropping finished rows", &mut KvCache::new(model.layers.len()), Decode::default(), opts),
        ("a small static cache that grows", &mut reused, Decode::default(), opts),
        ("the fixed-shape step (a CUDA graph's)", &mut KvCache::with_capacity(shape), Decode::default(), &fixed),
        ("the fixed-shape step in a cache it must grow", &mut small, Decode::default(), &fixed),
    ] {
        let fast = run(model, prompts, opts, cache, decode);
        if opts.steps == Steps::Fixed && model.kind != Kind::Float {
            // In bf16 a sum over more positions rounds differently (in
            // the last bit of a bf16 attention output), which may flip a
            // sampled token: see `fixed_step_in_bf16_keeps_greedy_tokens`.
            continue;
        }
        assert_eq!(fast.tokens, plain.tokens, "{what}: tokens");
        let pairs = || fast.logprobs.iter().flatten().zip(plain.logprobs.iter().flatten());
        let worst = pairs().map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if opts.steps == Steps::Fixed {
            // Attention over every position of the cache, the unwritten
            // ones masked: the same sums in another blocking.
            assert!(worst <= 1e-5, "{what}: log-probs differ by {worst:e}");
        } else if decode.drop_finished_at > 1.0 {
            assert_eq!(fast.logprobs, plain.logprobs, "{what}: log-probs");
        } else {
            assert!(worst <= 2e-6, "{what}: log-probs differ by {worst:e}");
        }
    }
    // The grown cache serves a second generation as it is.
    let again = run(model, prompts, opts, &mut reused, Decode::default());
    assert_eq!(again.tokens, plain.tokens, "reused cache");
    plain.tokens.iter().map(Vec::len).collect()
}

fn options(sampling: Sampling, eos_ids: Vec<i64>, max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens, sampling, eos_ids, pad_id: 0, steps: Steps::Auto }
}

fn sampled(seed: u64) -> Sampling {
    Sampling { temperature: 1.0, top_p: 0.9, top_k: 0, seed }
}

#[test]
fn fast_decode_equals_the_plain_loop_on_a_tiny_model() {
    for kind in [Kind::Float, Kind::BFloat16] {
        let vocab = 300;
        let model = random_model(Preset::Tiny.config(vocab, 1, 2), kind, Device::Cpu, 3).expect("model");
        // Many end tokens, so that rows finish at different steps.
        let eos: Vec<i64> = (0..vocab).filter(|t| t % 9 == 0).collect();
        for sampling in [Sampling::greedy(), sampled(7), sampled(8)] {
            let lens = fast_equals_plain(&model, &prompts(vocab), &options(sampling.clone(), eos.clone(), 24));
            if sampling.temperature > 0.0 {
                assert!(lens.iter().min() < lens.iter().max(), "{kind:?}: rows should finish apart: {lens:?}");
            }
        }
    }
}

/// The pretrained Qwen2.5-0.5B from `RLHF_QWEN_DIR` or the scripts' cache, if present.
fn qwen_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("RLHF_QWEN_DIR").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rlhfd/models/qwen2.5-coder-0.5b"))
    })?;
    dir.join("model.safetensors").exists().then_some(dir)
}

#[test]
fn fast_decode_equals_the_plain_loop_on_qwen_when_present() {
    let Some(dir) = qwen_dir() else {
        eprintln!("Qwen2.5-0.5B not present (RLHF_QWEN_DIR or ~/.cache/rlhfd/models): checked on the tiny model only");
        return;
    };
    let model = Model::load(&dir, Kind::BFloat16, Device::Cpu).expect("qwen");
    let vocab = model.cfg.vocab_size;
    // Frequent tokens (spaces, punctuation, newlines) end rows at different steps.
    let eos: Vec<i64> = vec![11, 13, 198, 220, 271, 151643, 151645];
    for sampling in [Sampling::greedy(), sampled(3)] {
        fast_equals_plain(&model, &prompts(vocab.min(20000)), &options(sampling, eos.clone(), 16));
    }
}

/// The fixed-shape step in bf16 against the eager loop, greedy. A bf16
/// attention output over more (masked) positions may round one last bit
/// differently, which moves a logit by a bf16 step (1/16 at the tiny
/// model's ~10, 1/8 at Qwen's ~30) and can flip a near tie: each row
/// follows the eager one until such a flip, with log-probs within
/// `tolerance` up to it, and the flips are rare (three quarters of the
/// tokens or more before any).
fn fixed_keeps_greedy_tokens(model: &Model, prompts: &[Vec<i64>], max_new_tokens: usize, tolerance: f32) {
    let opts = options(Sampling::greedy(), vec![], max_new_tokens);
    let fixed = GenerateOptions { steps: Steps::Fixed, ..opts.clone() };
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let shape = cache_shape(model, prompts.len(), longest + max_new_tokens);
    let eager = run(model, prompts, &opts, &mut KvCache::with_capacity(shape), Decode::default());
    let step = run(model, prompts, &fixed, &mut KvCache::with_capacity(shape), Decode::default());
    let (mut same, mut total) = (0, 0);
    for (row, (a, b)) in step.tokens.iter().zip(&eager.tokens).enumerate() {
        let agree = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        // The log-prob of the first differing token is of the same context too.
        for i in 0..(agree + 1).min(a.len()) {
            let d = (step.logprobs[row][i] - eager.logprobs[row][i]).abs();
            assert!(d <= tolerance, "row {row} token {i}: log-probs differ by {d:e}");
        }
        same += agree;
        total += b.len();
    }
    assert!(
        same * 4 >= total * 3,
        "only {same} of {total} tokens before rows part: {:?} vs {:?}",
        step.tokens,
        eager.tokens
    );
}

#[test]
fn fixed_step_in_bf16_keeps_greedy_tokens() {
    let vocab = 300;
    let model = random_model(Preset::Tiny.config(vocab, 1, 2), Kind::BFloat16, Device::Cpu, 3).expect("model");
    fixed_keeps_greedy_tokens(&model, &prompts(vocab), 24, 0.05);
    if let Some(dir) = qwen_dir() {
        let model = Model::load(&dir, Kind::BFloat16, Device::Cpu).expect("qwen");
        fixed_keeps_greedy_tokens(&model, &prompts(20000), 16, 0.2);
    }
}

#[test]
fn graph_steps_without_a_gpu_are_refused_with_a_reason() {
    let vocab = 300;
    let model = random_model(Preset::Tiny.config(vocab, 1, 2), Kind::Float, Device::Cpu, 3).expect("model");
    let opts = GenerateOptions { steps: Steps::Graph, ..options(Sampling::greedy(), vec![], 4) };
    let err = generate(&model, &NoHooks, &prompts(vocab), &opts).expect_err("no CUDA graphs on a CPU");
    assert!(err.to_string().contains("CUDA graph"), "{err}");
    // Auto is the eager loop here.
    assert_eq!(crate::fixed_step::resolve(Steps::Auto, Device::Cpu), Steps::Eager);
    let auto = GenerateOptions { steps: Steps::Auto, ..opts };
    assert_eq!(generate(&model, &NoHooks, &prompts(vocab), &auto).expect("auto").tokens.len(), 6);
}

/// The fixed-shape step runs the adapters' hooks as the eager loop does:
/// LoRA, SSF and RepAdapter (each trained a little: values away from their
/// identity init), sampled, f32.
#[test]
fn fixed_step_equals_the_eager_loop_under_every_adapter() {
    use crate::peft::{self, Method, PeftConfig, PeftModel};
    let vocab = 300;
    for method in [Method::Lora, Method::Ssf, Method::RepAdapter] {
        let base = random_model(Preset::Tiny.config(vocab, 1, 2), Kind::Float, Device::Cpu, 3).expect("model");
        let mut pm = PeftModel::new(base);
        let mut cfg = PeftConfig::new(method);
        cfg.seed = 5;
        let adapter = peft::build(cfg, &pm.base).expect("adapter");
        tch::no_grad(|| {
            for p in adapter.parameters() {
                let n = p.numel() as i64;
                let wave = tch::Tensor::arange(n, (Kind::Float, Device::Cpu)).sin().view(p.size().as_slice());
                let _ = p.shallow_clone().f_add_(&(wave * 0.1)).expect("perturb");
            }
        });
        pm.add("policy", adapter).expect("add");
        pm.set_active(Some("policy")).expect("active");
        let opts = options(sampled(4), (0..vocab).filter(|t| t % 9 == 0).collect(), 16);
        let fixed = GenerateOptions { steps: Steps::Fixed, ..opts.clone() };
        let eager = generate(&pm.base, pm.hooks(), &prompts(vocab), &opts).expect("eager");
        let step = generate(&pm.base, pm.hooks(), &prompts(vocab), &fixed).expect("fixed");
        assert_eq!(step.tokens, eager.tokens, "{method:?}");
        let pairs = step.logprobs.iter().flatten().zip(eager.logprobs.iter().flatten());
        let worst = pairs.map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{method:?}: log-probs differ by {worst:e}");
    }
}

/// A masked decode step with grouped-query heads (the tiny preset has 4
/// query heads over 2 key/value heads) runs each group as queries of one
/// head; with nothing masked it gives what the unmasked GQA kernel does.
#[test]
fn masked_grouped_query_decode_equals_the_unmasked_kernel() {
    let model = random_model(Preset::Tiny.config(300, 1, 2), Kind::Float, Device::Cpu, 3).expect("model");
    assert!(model.cfg.num_kv_heads < model.cfg.num_heads);
    let ids = tch::Tensor::from_slice(&[5i64, 17, 2, 250, 9, 33, 41, 8]).view([2, 4]);
    let step = |masked: bool| {
        tch::no_grad(|| {
            let mut cache = KvCache::new(model.layers.len());
            let pos = crate::batch::positions(&ids);
            let _ = model.forward(&ids, &pos, Mask::Causal, Some(&mut cache), &NoHooks).expect("prefill");
            let next = tch::Tensor::from_slice(&[7i64, 11]).view([2, 1]);
            let pos = tch::Tensor::from_slice(&[4i64, 4]).view([2, 1]);
            let all = tch::Tensor::ones([2, 1, 1, 5], (Kind::Bool, Device::Cpu));
            let mask = if masked { Mask::Explicit(&all) } else { Mask::None };
            model.forward(&next, &pos, mask, Some(&mut cache), &NoHooks).expect("step")
        })
    };
    let d = (step(true) - step(false)).abs().max().double_value(&[]);
    assert!(d <= 1e-6, "grouped masked decode differs by {d:e}");
}

/// Under `Steps::Auto` a capture that fails (here: no CUDA device) is
/// reported, and the generation goes on with the fixed-shape step op by op:
/// the tokens it would have given.
#[test]
fn a_failed_capture_under_auto_goes_on_without_graphs() {
    let vocab = 300;
    let model = random_model(Preset::Tiny.config(vocab, 1, 2), Kind::Float, Device::Cpu, 3).expect("model");
    let p = prompts(vocab);
    let longest = p.iter().map(Vec::len).max().unwrap_or(0);
    let shape = cache_shape(&model, p.len(), longest + 12);
    let opts = options(sampled(9), vec![], 12);
    let fixed = GenerateOptions { steps: Steps::Fixed, ..opts.clone() };
    let want = run(&model, &p, &fixed, &mut KvCache::with_capacity(shape), Decode::default());
    let anywhere = Decode { graphs_anywhere: true, ..Decode::default() };
    let got = run(&model, &p, &opts, &mut KvCache::with_capacity(shape), anywhere);
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.logprobs, want.logprobs);
    // Forced graphs fail instead.
    let forced = GenerateOptions { steps: Steps::Graph, ..opts };
    let rows: Vec<u64> = (0..p.len() as u64).collect();
    let mut cache = KvCache::with_capacity(shape);
    let err = tch::no_grad(|| generate_inner(&model, &NoHooks, &p, &forced, &rows, &mut cache, Decode::default()));
    assert!(err.expect_err("no CUDA device").to_string().contains("CUDA graph"));
}
