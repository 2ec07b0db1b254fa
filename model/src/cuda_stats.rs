//! The CUDA caching allocator's peaks (`model/csrc/cuda_stats.cpp`): what
//! `torch.cuda.max_memory_reserved` / `max_memory_allocated` read in a
//! PyTorch program, so a bench reports both sides on the same terms (the
//! CUDA context apart). `None` where libtorch was built without CUDA or the
//! call fails (no device).

#[cfg(rlhf_cuda)]
mod ffi {
    extern "C" {
        pub fn rlhf_cuda_peak_reserved(device: i32) -> i64;
        pub fn rlhf_cuda_peak_allocated(device: i32) -> i64;
        pub fn rlhf_cuda_reset_peaks(device: i32) -> i32;
        pub fn rlhf_cuda_empty_cache() -> i32;
    }
}

/// Without the shim every call fails, as the shim's do without a device.
#[cfg(not(rlhf_cuda))]
#[allow(clippy::missing_safety_doc)]
mod ffi {
    pub unsafe extern "C" fn rlhf_cuda_peak_reserved(_: i32) -> i64 {
        -1
    }
    pub unsafe extern "C" fn rlhf_cuda_peak_allocated(_: i32) -> i64 {
        -1
    }
    pub unsafe extern "C" fn rlhf_cuda_reset_peaks(_: i32) -> i32 {
        -1
    }
    pub unsafe extern "C" fn rlhf_cuda_empty_cache() -> i32 {
        -1
    }
}

/// A statistic of GPU `device`, `None` on failure (-1).
fn stat(f: unsafe extern "C" fn(i32) -> i64, device: usize) -> Option<i64> {
    // SAFETY: plain values in and out; the shim catches every exception.
    let v = unsafe { f(device as i32) };
    (v >= 0).then_some(v)
}

/// Peak bytes the caching allocator has held on GPU `device`.
pub fn peak_reserved(device: usize) -> Option<i64> {
    stat(ffi::rlhf_cuda_peak_reserved, device)
}

/// Peak bytes allocated to tensors on GPU `device`.
pub fn peak_allocated(device: usize) -> Option<i64> {
    stat(ffi::rlhf_cuda_peak_allocated, device)
}

/// Gives the caching allocator's unused blocks back to the driver
/// (`torch.cuda.empty_cache`); whether it worked.
pub fn empty_cache() -> bool {
    // SAFETY: no arguments; the shim catches every exception.
    unsafe { ffi::rlhf_cuda_empty_cache() == 0 }
}

/// Starts both peaks over from what is held now; whether it worked.
pub fn reset_peaks(device: usize) -> bool {
    // SAFETY: as in `stat`.
    unsafe { ffi::rlhf_cuda_reset_peaks(device as i32) == 0 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_a_gpu_the_statistics_say_so_rather_than_fail() {
        if !tch::Cuda::is_available() {
            // With CUDA compiled in but no device the allocator refuses: None, not a crash.
            assert_eq!(super::peak_reserved(0), None);
            assert_eq!(super::peak_allocated(0), None);
            assert!(!super::reset_peaks(0));
        }
    }
}
