//! Shared helpers for the worker's integration tests.
#![allow(dead_code)]

pub mod jobs;

use std::path::PathBuf;

use rlhf_model::{Model, WeightFiles};
use tch::{Device, Kind, Tensor};

/// The transformers fixtures (scripts/make_fixtures.py): LLaMA (untied,
/// sharded), Qwen2 (q/k/v bias, tied), Qwen3 (q/k norm, head_dim ≠
/// hidden/heads, untied), LLaMA with Llama 3.1 RoPE scaling (tied).
pub const MODELS: [&str; 4] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-llama3"];

pub fn fixtures() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR (run through cargo test)"))
        .join("tests/fixtures")
}

pub fn load(name: &str) -> Model {
    Model::load(&fixtures().join(name), Kind::Float, Device::Cpu).expect("fixture model loads")
}

/// A tensor from `<name>-expected.safetensors`.
pub fn expected(name: &str, tensor: &str) -> Tensor {
    let files =
        WeightFiles::open_file(&fixtures().join(format!("{name}-expected.safetensors"))).expect("expected file");
    files.get_any(tensor).expect("expected tensor")
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

pub fn to_vec(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&t.reshape([-1])).expect("int tensor")
}

/// Largest |a - b| over the tensors of two safetensors files (same names and shapes).
pub fn max_file_diff(a: &std::path::Path, b: &std::path::Path) -> f64 {
    let (fa, fb) = (WeightFiles::open_file(a).expect("first file"), WeightFiles::open_file(b).expect("second file"));
    let names: Vec<String> = fa.names().map(String::from).collect();
    assert!(!names.is_empty(), "{} holds no tensors", a.display());
    names
        .iter()
        .map(|n| {
            let (x, y) = (fa.get_any(n).expect("tensor"), fb.get_any(n).expect("tensor"));
            assert_eq!(x.size(), y.size(), "{n}");
            max_abs_diff(&x, &y)
        })
        .fold(0.0, f64::max)
}
