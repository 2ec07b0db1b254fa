//! rlhf-model: the numerics core of rlhfd. LLaMA-family decoders (LLaMA,
//! Qwen2) loaded from Hugging Face directories, in tch; the PEFT adapters
//! (LoRA, SSF, RepAdapter, full) that share one frozen base; the scalar
//! head of reward models and critics. No async runtime, RPC or collectives:
//! what compares against transformers + peft lives here.

pub mod batch;
pub mod cache;
pub mod config;
pub mod error;
pub mod generate;
pub mod head;
pub mod hooks;
pub mod init;
pub mod layers;
pub mod llama;
pub mod peft;
pub mod random;
pub mod sampling;
pub mod save;
pub mod tokenizer;
pub mod weights;

pub use cache::KvCache;
pub use config::{Arch, Config};
pub use error::{Error, Result};
pub use generate::{generate, generate_rows, GenerateOptions, Generation};
pub use hooks::{Block, Hooks, NoHooks, Norm, Proj};
pub use llama::{Mask, Model};
pub use sampling::Sampling;
pub use tokenizer::Tokenizer;
pub use weights::WeightFiles;

use tch::{Device, Kind};

/// Waits for `device`'s queued work (a no-op on CPU), so that a timer read
/// next measures the work, not its launch.
pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Parses `f32`, `bf16`, `f16` (and their long spellings).
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" | "float" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" | "half" => Ok(Kind::Half),
        other => Err(Error::InvalidArgument(format!("dtype {other:?}: expected f32, bf16 or f16"))),
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`, checking the device exists.
pub fn parse_device(s: &str) -> Result<Device> {
    let device = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => return Err(Error::InvalidArgument(format!("device {s:?}: expected cpu, cuda or cuda:N"))),
        },
    };
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count() as usize;
        if n >= count {
            return Err(Error::InvalidArgument(format!("device {s}: {count} CUDA device(s) available")));
        }
    }
    Ok(device)
}
