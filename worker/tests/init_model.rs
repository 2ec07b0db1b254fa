//! A from-scratch model directory (tokenizer + random LLaMA) and saving
//! loaded models back to Hugging Face directories.

mod common;

use std::path::PathBuf;

use rlhf_model::init::{init_model, train_tokenizer, Preset, BOS_TOKEN, EOS_TOKEN};
use rlhf_model::save::save_model;
use rlhf_model::{Config, Mask, Model, NoHooks, Tokenizer};
use tch::{Device, Kind, Tensor};

fn corpus() -> PathBuf {
    common::fixtures().join("corpus/tiny_zh.txt")
}

fn logits(model: &Model, ids: &[i64]) -> Tensor {
    let t = ids.len() as i64;
    let ids = Tensor::from_slice(ids).view([1, t]);
    let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]);
    let hidden = model.forward(&ids, &pos, Mask::Causal, None, &NoHooks).expect("forward");
    model.logits(&hidden, &NoHooks)
}

#[test]
fn tiny_model_from_scratch_loads_and_tokenizes_chinese() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("tiny");
    let start = std::time::Instant::now();
    init_model(Preset::Tiny, &corpus(), &out, 1234).expect("init_model");
    let elapsed = start.elapsed();

    let model = Model::load(&out, Kind::Float, Device::Cpu).expect("model loads");
    let cfg = Config::from_dir(&out).expect("config");
    let tok = Tokenizer::load(&out, &cfg).expect("tokenizer loads");
    let vocab = tok.vocab_size() as i64;
    assert_eq!(cfg.vocab_size, vocab);
    assert!(vocab > 258 && vocab <= 2000, "vocab {vocab}");
    assert_eq!((cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads), (64, 2, 4, 2));
    assert_eq!((cfg.intermediate_size, cfg.max_position_embeddings), (172, 512));
    assert_eq!(tok.token_to_id(EOS_TOKEN), Some(0));
    assert_eq!(tok.token_to_id(BOS_TOKEN), Some(1));
    assert_eq!((tok.eos_ids.clone(), tok.pad_id, tok.bos_id), (vec![0], Some(0), Some(1)));

    let params: i64 = Tensor::read_safetensors(out.join("model.safetensors"))
        .expect("read weights")
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    eprintln!("tiny preset: vocab {vocab}, {params} parameters, init_model took {elapsed:?}");

    for s in [
        "这款耳机音质很好，价格也不贵。答案：正面",
        "鲸鱼在北冰洋里唱歌 🐋 and some English, 123!",
        "选项：A 教育 B 体育 C 财经 D 科技\n答案：D",
    ] {
        let ids = tok.encode(s, true).expect("encode");
        assert_eq!(tok.decode(&ids, false).expect("decode"), s);
    }
    for s in ["答案：", "A", "B", "C", "D", "选项：", "正面", "负面"] {
        let ids = tok.encode(s, false).expect("encode");
        assert!(ids.len() <= 3, "{s:?} -> {ids:?}");
    }
    assert_eq!(tok.encode("A", false).expect("encode").len(), 1);
    assert!(tok.encode("答案：", false).expect("encode").len() <= 2);

    let ids = tok.encode("评论：东西很好用。答案：", false).expect("encode");
    let y = logits(&model, &ids);
    assert_eq!(y.size(), vec![1, ids.len() as i64, vocab]);
    assert!(y.isfinite().all().int64_value(&[]) == 1);
}

#[test]
fn init_model_is_deterministic_for_a_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    init_model(Preset::Tiny, &corpus(), &a, 5).expect("init a");
    init_model(Preset::Tiny, &corpus(), &b, 5).expect("init b");
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        let (x, y) = (std::fs::read(a.join(f)).expect("read"), std::fs::read(b.join(f)).expect("read"));
        assert!(x == y, "{f} differs between runs with the same seed");
    }
    // Re-running into an existing directory overwrites it in place.
    init_model(Preset::Tiny, &corpus(), &a, 6).expect("re-init");
    assert!(
        std::fs::read(a.join("model.safetensors")).expect("read")
            != std::fs::read(b.join("model.safetensors")).expect("read")
    );
    assert!(Model::load(&a, Kind::Float, Device::Cpu).is_ok());
}

#[test]
fn saved_fixture_models_reload_with_identical_logits() {
    for name in common::MODELS {
        let src = common::fixtures().join(name);
        let model = common::load(name);
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join(name);
        save_model(&model, &out, Some(&src.join("tokenizer.json"))).expect("save_model");

        let names: Vec<String> = Tensor::read_safetensors(out.join("model.safetensors"))
            .expect("read")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names.contains(&"lm_head.weight".to_string()), !model.cfg.tie_word_embeddings, "{name}");
        assert!(names.iter().all(|n| n.starts_with("model.") || n == "lm_head.weight"), "{name}: {names:?}");

        let back = Model::load(&out, Kind::Float, Device::Cpu).expect("reload");
        assert_eq!(back.cfg.arch, model.cfg.arch, "{name}");
        assert_eq!(back.cfg.eos_token_ids, model.cfg.eos_token_ids, "{name}");
        let ids = [3i64, 17, 42, 5, 99, 7];
        let diff = common::max_abs_diff(&logits(&model, &ids), &logits(&back, &ids));
        assert_eq!(diff, 0.0, "{name}: logits changed by {diff}");

        let cfg = Config::from_dir(&out).expect("config");
        let tok = Tokenizer::load(&out, &cfg).expect("tokenizer");
        let orig = Tokenizer::load(&src, &model.cfg).expect("fixture tokenizer");
        assert_eq!(tok.encode("hello world", false).expect("enc"), orig.encode("hello world", false).expect("enc"));
        assert_eq!((tok.eos_ids.clone(), tok.pad_id), (orig.eos_ids.clone(), orig.pad_id), "{name}");
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            let same = std::fs::read(out.join(f)).expect("read") == std::fs::read(src.join(f)).expect("read");
            assert!(same, "{name}: {f} must be copied verbatim");
        }
    }
}

#[test]
fn save_into_the_loaded_directory_is_safe() {
    // The loaded weights are views into model.safetensors; replacing that
    // file must neither corrupt them nor the new file.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("m");
    init_model(Preset::Tiny, &corpus(), &out, 9).expect("init");
    let model = Model::load(&out, Kind::Float, Device::Cpu).expect("load");
    let ids = [2i64, 40, 41, 100];
    let before = logits(&model, &ids);
    save_model(&model, &out, Some(&out.join("tokenizer.json"))).expect("save over itself");
    let back = Model::load(&out, Kind::Float, Device::Cpu).expect("reload");
    assert_eq!(common::max_abs_diff(&before, &logits(&back, &ids)), 0.0);
    assert_eq!(common::max_abs_diff(&before, &logits(&model, &ids)), 0.0);
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn merged_logit_bias_cannot_be_saved() {
    let mut model = common::load("tiny-llama");
    model.lm_head_bias = Some(Tensor::zeros([model.cfg.vocab_size], (Kind::Float, Device::Cpu)));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("m");
    let err = save_model(&model, &out, None).expect_err("must refuse");
    assert!(err.to_string().contains("logit bias"), "{err}");
    assert!(!out.exists(), "nothing may be written");
}

#[test]
fn merged_biases_are_declared_in_the_saved_config() {
    // What merging SSF/RepAdapter leaves behind: biases the config lacked.
    for name in common::MODELS {
        let mut model = common::load(name);
        let qwen3 = model.cfg.arch == rlhf_model::Arch::Qwen3;
        for layer in &mut model.layers {
            // Qwen3 has no MLP bias: its attention biases are tried instead.
            let lin = if qwen3 { &mut layer.self_attn.q_proj } else { &mut layer.mlp.up_proj };
            lin.bias = Some(Tensor::randn([lin.out_dim()], (Kind::Float, Device::Cpu)));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join(name);
        save_model(&model, &out, None).expect("save");
        let back = Model::load(&out, Kind::Float, Device::Cpu).expect("reload");
        if qwen3 {
            assert_eq!(back.cfg.arch, model.cfg.arch, "{name}");
            assert!(back.cfg.qkv_bias && back.cfg.o_bias && !back.cfg.mlp_bias, "{name}");
        } else {
            assert!(back.cfg.mlp_bias, "{name}");
        }
        let ids = [1i64, 2, 3, 4];
        assert_eq!(common::max_abs_diff(&logits(&model, &ids), &logits(&back, &ids)), 0.0, "{name}");
        if qwen3 {
            // A Qwen3 checkpoint cannot hold an MLP bias, nor can a LLaMA hold its q/k norms.
            let up = &mut model.layers[0].mlp.up_proj;
            up.bias = Some(Tensor::zeros([up.out_dim()], (Kind::Float, Device::Cpu)));
            let refused = dir.path().join("refused");
            let err = save_model(&model, &refused, None).expect_err("must refuse");
            assert!(err.to_string().contains("qwen3"), "{err}");
            assert!(!refused.exists(), "nothing may be written");
        }
    }
}

#[test]
fn missing_corpus_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-corpus.txt");
    let out = dir.path().join("m");
    let err = init_model(Preset::Tiny, &missing, &out, 0).expect_err("must fail");
    assert!(err.to_string().contains("no-such-corpus.txt"), "{err}");
    assert!(!out.exists(), "a failed init must leave no directory");
    let err = train_tokenizer(&missing, 1000, &dir.path().join("t.json")).expect_err("must fail");
    assert!(err.to_string().contains("no-such-corpus.txt"), "{err}");

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").expect("write");
    let err = init_model(Preset::Tiny, &empty, &out, 0).expect_err("must fail");
    assert!(err.to_string().contains("empty.txt"), "{err}");
}
