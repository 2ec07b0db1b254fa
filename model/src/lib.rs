//! rlhf-model: the numerics core of rlhfd. LLaMA-family decoders (LLaMA,
//! Qwen2) loaded from Hugging Face directories, in tch; the PEFT adapters
//! (LoRA, SSF, RepAdapter, full) that share one frozen base; the scalar
//! head of reward models and critics. No async runtime, RPC or collectives:
//! what compares against transformers + peft lives here.

pub mod batch;
pub mod cache;
pub mod chat;
pub mod config;
pub mod cuda_graph;
pub mod cuda_stats;
pub mod error;
pub mod fixed_step;
pub mod fuse;
pub mod fused;
pub mod generate;
pub mod head;
pub mod hooks;
pub mod init;
pub mod layers;
pub mod llama;
pub mod options;
pub mod peft;
pub mod random;
pub mod sampling;
pub mod save;
pub mod tokenizer;
pub mod weights;

pub use cache::{CacheShape, KvCache};
pub use chat::ChatTemplate;
pub use config::{Arch, Config};
pub use error::{Error, Result};
pub use generate::{
    cache_shape, generate, generate_rows, generate_rows_in, generate_rows_plain, GenerateOptions, Generation, Steps,
};
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

/// Parses `f32`, `bf16`, `f16` (and their long spellings); `auto` is
/// resolved by the caller (see [`auto_dtype`]).
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" | "float" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" | "half" => Ok(Kind::Half),
        other => Err(Error::InvalidArgument(format!("dtype {other:?}: expected f32, bf16 or f16"))),
    }
}

/// What `model.dtype = "auto"` means on `device`: bf16 where its matmuls
/// are fast (a CUDA device, or a CPU whose `/proc/cpuinfo` flags, given as
/// `cpu_flags`, include AMX), else f32 — unless training in f32 would not
/// fit in `available` bytes, when bf16 weights are used anyway: `params` ×
/// 12 bytes for adapters on a frozen base, × 40 when every weight trains
/// (`full`: weights, gradients, two AdamW moments and activations; full
/// fine-tuning of Qwen2.5-0.5B peaked at 18.8 GiB here). Returns the kind
/// and why, for the log.
pub fn auto_dtype(device: Device, cpu_flags: &str, params: u64, available: u64, full: bool) -> (Kind, String) {
    if device.is_cuda() {
        return (Kind::BFloat16, "bf16 on a GPU".into());
    }
    if cpu_flags.split_whitespace().any(|f| f == "amx_bf16") {
        return (Kind::BFloat16, "bf16: this CPU has AMX (bf16 matmuls faster than f32)".into());
    }
    let need = params.saturating_mul(if full { 40 } else { 12 });
    if available > 0 && need > available {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return (
            Kind::BFloat16,
            format!(
                "bf16 weights: f32 would need ~{:.1} GiB, {:.1} GiB available (this CPU lacks AMX, so bf16 matmuls run slower)",
                gib(need),
                gib(available)
            ),
        );
    }
    (Kind::Float, "f32: this CPU lacks AMX, where bf16 matmuls run slower than f32".into())
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

#[cfg(test)]
mod dtype_tests {
    use super::*;

    #[test]
    fn auto_dtype_picks_bf16_only_where_it_is_fast_or_needed() {
        let gib = 1u64 << 30;
        let no_amx = "fpu avx512f avx512_bf16";
        assert_eq!(auto_dtype(Device::Cuda(0), no_amx, 500_000_000, 24 * gib, false).0, Kind::BFloat16);
        assert_eq!(
            auto_dtype(Device::Cpu, "avx512f amx_bf16 amx_tile", 500_000_000, 24 * gib, false).0,
            Kind::BFloat16
        );
        let (k, why) = auto_dtype(Device::Cpu, no_amx, 500_000_000, 24 * gib, false);
        assert_eq!(k, Kind::Float, "{why}");
        // Full fine-tuning of the same model in 16 GiB would not fit in f32.
        assert_eq!(auto_dtype(Device::Cpu, no_amx, 500_000_000, 16 * gib, true).0, Kind::BFloat16);
        // A 7B model's f32 weights do not fit 24 GiB: bf16, and the log says so.
        let (k, why) = auto_dtype(Device::Cpu, no_amx, 7_000_000_000, 24 * gib, false);
        assert_eq!(k, Kind::BFloat16);
        assert!(why.contains("GiB available"), "{why}");
    }
}
