//! Shared helpers for the worker's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use rlhf_worker::model::{Model, WeightFiles};
use tch::{Device, Kind, Tensor};

pub const MODELS: [&str; 2] = ["tiny-llama", "tiny-qwen2"];

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn load(name: &str) -> Model {
    Model::load(&fixtures().join(name), Kind::Float, Device::Cpu).expect("fixture model loads")
}

/// A tensor from `<name>-expected.safetensors`.
pub fn expected(name: &str, tensor: &str) -> Tensor {
    let files = WeightFiles::open_file(&fixtures().join(format!("{name}-expected.safetensors"))).expect("expected file");
    files.get_any(tensor).expect("expected tensor")
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

pub fn to_vec(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&t.reshape([-1])).expect("int tensor")
}
