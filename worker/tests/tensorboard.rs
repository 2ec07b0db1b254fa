//! TensorBoard reads our runs: tensorboard's own EventAccumulator (installed
//! by scripts/test.sh) loads the event files a job writes beside
//! metrics.jsonl and gets every scalar in it, tag `<stage>/<key>`.

mod common;

use std::process::Command;

use common::jobs::{job, sft_toml};
use rlhf_worker::train::run::run_job;
use tch::Device;

#[test]
fn tensorboard_reads_back_every_scalar_of_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    run_job(&job(&sft_toml("f32", 12, 1, 0)), tmp.path(), Device::Cpu).unwrap();
    let events: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents."))
        .collect();
    assert_eq!(events.len(), 1, "one event file beside metrics.jsonl");
    let python = std::env::var("RLHF_PY").unwrap_or_else(|_| "python3".into());
    let script = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR (run through cargo test)"),
    )
    .join("../scripts/tensorboard_readback.py");
    let out = Command::new(&python).arg(&script).arg(tmp.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    eprintln!("tensorboard read-back: {r}");
    assert!(r["scalars_checked"].as_u64().unwrap() >= 12 * 3, "{r}");
    assert!(r["tags"].as_u64().unwrap() >= 3, "{r}");
}
