//! Benchmarks behind `rlhf-worker bench …` that need more than one process:
//! `ppo` measures each configuration in a child process of its own, so every
//! peak-memory figure belongs to one configuration alone.

pub(crate) mod common;
pub mod configs;
pub mod decode;
pub mod dpo;
pub mod grpo;
pub mod ppo;
pub mod sft;

use std::process::Command;

use crate::error::{Error, Result};

/// Peak resident set size of this process in bytes (`VmHWM` in
/// `/proc/self/status`); `None` where that file does not exist (not Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib_field(&status, "VmHWM:").map(|kib| kib * 1024)
}

/// The value of a `Name:   1234 kB` line.
pub(crate) fn parse_kib_field(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Device memory in use on GPU `index` in MiB, from `nvidia-smi`: this
/// process's own usage where nvidia-smi lists it, else the whole GPU's.
/// `None` without nvidia-smi. Torch has no tch API for its allocator
/// statistics; since torch's caching allocator keeps what it reserved, the
/// figure at the end of a run is the peak reservation (plus the CUDA context).
pub fn gpu_used_mib(index: usize) -> Option<GpuUsage> {
    let own = Command::new("nvidia-smi")
        .args(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let pid = std::process::id().to_string();
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                let mut parts = l.split(',').map(str::trim);
                match (parts.next(), parts.next()) {
                    (Some(p), Some(mib)) if p == pid => mib.parse::<f64>().ok(),
                    _ => None,
                }
            })
        });
    if let Some(mib) = own {
        return Some(GpuUsage::Process(mib));
    }
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", &index.to_string()])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().ok().map(GpuUsage::Device)
}

/// What [`gpu_used_mib`] could see.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GpuUsage {
    /// This process's memory on the GPU.
    Process(f64),
    /// Everything in use on the GPU (subtract a reading taken at the start).
    Device(f64),
}

/// A fresh directory under the system temp dir (an unpredictable name,
/// created 0700), removed with everything in it when dropped.
pub fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(&format!("{prefix}-")).tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields() {
        let s = "Name:\tx\nVmPeak:\t  200 kB\nVmHWM:\t    1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_kib_field(s, "VmHWM:"), Some(1234));
        assert_eq!(parse_kib_field(s, "VmSwap:"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn peak_rss_is_positive() {
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
    }
}
