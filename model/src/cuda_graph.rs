//! CUDA graphs (`model/csrc/cuda_graph.cpp`, libtorch's `at::cuda::CUDAGraph`):
//! a decode step's kernels recorded once and replayed each step with one
//! launch, so a step costs what its kernels cost rather than what issuing
//! a few thousand of them from the host costs. Only where the build has
//! the shim (`cfg(rlhf_cuda_graph)`: libtorch with CUDA and its runtime
//! headers); elsewhere [`CudaGraph::new`] says so.
//!
//! A capture records the ops issued between [`CudaGraph::capture`]'s start
//! and end on this thread; they run only on [`CudaGraph::replay`], on the
//! same memory: the inputs must be tensors updated in place, and the
//! outputs are the tensors the capture returned, rewritten by each replay.

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result};

#[cfg(rlhf_cuda_graph)]
mod ffi {
    use std::ffi::{c_char, c_void};
    extern "C" {
        pub fn rlhf_graph_new(device: i32, err: *mut *mut c_char) -> *mut c_void;
        pub fn rlhf_graph_enter(g: *mut c_void, err: *mut *mut c_char) -> i32;
        pub fn rlhf_graph_leave(g: *mut c_void, err: *mut *mut c_char) -> i32;
        pub fn rlhf_graph_begin(g: *mut c_void, err: *mut *mut c_char) -> i32;
        pub fn rlhf_graph_end(g: *mut c_void, err: *mut *mut c_char) -> i32;
        pub fn rlhf_graph_replay(g: *mut c_void, err: *mut *mut c_char) -> i32;
        pub fn rlhf_graph_free(g: *mut c_void);
        pub fn rlhf_graph_free_error(err: *mut c_char);
    }
}

/// Without the shim no graph is ever made, so the others are never called.
#[cfg(not(rlhf_cuda_graph))]
#[allow(clippy::missing_safety_doc)]
mod ffi {
    use std::ffi::{c_char, c_void};
    pub unsafe fn rlhf_graph_new(_: i32, _: *mut *mut c_char) -> *mut c_void {
        std::ptr::null_mut()
    }
    pub unsafe fn rlhf_graph_enter(_: *mut c_void, _: *mut *mut c_char) -> i32 {
        -1
    }
    pub unsafe fn rlhf_graph_leave(_: *mut c_void, _: *mut *mut c_char) -> i32 {
        -1
    }
    pub unsafe fn rlhf_graph_begin(_: *mut c_void, _: *mut *mut c_char) -> i32 {
        -1
    }
    pub unsafe fn rlhf_graph_end(_: *mut c_void, _: *mut *mut c_char) -> i32 {
        -1
    }
    pub unsafe fn rlhf_graph_replay(_: *mut c_void, _: *mut *mut c_char) -> i32 {
        -1
    }
    pub unsafe fn rlhf_graph_free(_: *mut c_void) {}
    pub unsafe fn rlhf_graph_free_error(_: *mut c_char) {}
}

/// Whether this build can make CUDA graphs at all (a device is still needed).
pub const COMPILED: bool = cfg!(rlhf_cuda_graph);

/// One recorded graph on one GPU.
pub struct CudaGraph {
    ptr: *mut c_void,
    captured: bool,
}

/// Calls a shim function; its error message (if any) as an [`Error`].
fn call(what: &str, f: impl FnOnce(*mut *mut c_char) -> i32) -> Result<()> {
    let mut err: *mut c_char = std::ptr::null_mut();
    if f(&mut err) == 0 {
        return Ok(());
    }
    Err(Error::CudaGraph(format!("{what}: {}", take_message(err))))
}

fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "failed (no CUDA graph support in this build)".into();
    }
    // SAFETY: the shim hands over a NUL-terminated strdup'd string.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    // SAFETY: freed once, by the allocator that made it.
    unsafe { ffi::rlhf_graph_free_error(err) };
    msg.lines().next().unwrap_or_default().to_string()
}

impl CudaGraph {
    /// An empty graph on GPU `device`.
    pub fn new(device: usize) -> Result<Self> {
        if !COMPILED {
            return Err(Error::CudaGraph("this build has no CUDA graph shim (libtorch without CUDA)".into()));
        }
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: plain values in; the shim catches every exception.
        let ptr = unsafe { ffi::rlhf_graph_new(device as i32, &mut err) };
        if ptr.is_null() {
            return Err(Error::CudaGraph(format!("new graph on cuda:{device}: {}", take_message(err))));
        }
        Ok(Self { ptr, captured: false })
    }

    /// Runs `step` once and then records it, both on the graph's side
    /// stream (the caller's stream waits for them after). The first run is
    /// a real one (it also initialises what a capture cannot, such as
    /// cuBLAS workspaces); the recorded one's result holds the output
    /// tensors each replay rewrites. Returns both. A panic in `step` (an op
    /// a capture does not allow) is caught and returned as an error, the
    /// capture ended.
    pub fn capture<S>(&mut self, step: &mut dyn FnMut() -> Result<S>) -> Result<(S, S)> {
        // SAFETY (every shim call below): `self.ptr` is a live graph.
        call("enter the side stream", |e| unsafe { ffi::rlhf_graph_enter(self.ptr, e) })?;
        let recorded = self.record(step);
        let left = call("leave the side stream", |e| unsafe { ffi::rlhf_graph_leave(self.ptr, e) });
        let out = recorded?;
        left?;
        self.captured = true;
        Ok(out)
    }

    fn record<S>(&mut self, step: &mut dyn FnMut() -> Result<S>) -> Result<(S, S)> {
        let warm = caught("warm-up step", &mut *step)?;
        call("begin capture", |e| unsafe { ffi::rlhf_graph_begin(self.ptr, e) })?;
        let recorded = caught("captured step", step);
        let ended = call("end capture", |e| unsafe { ffi::rlhf_graph_end(self.ptr, e) });
        let out = recorded?;
        ended?;
        Ok((warm, out))
    }

    /// Runs the recorded work again on the current stream.
    pub fn replay(&self) -> Result<()> {
        if !self.captured {
            return Err(Error::CudaGraph("replay before a capture".into()));
        }
        // SAFETY: a live, captured graph.
        call("replay", |e| unsafe { ffi::rlhf_graph_replay(self.ptr, e) })
    }
}

/// `f`'s result, a panic inside it (a tch op that failed) as an error.
fn caught<T>(what: &str, f: &mut dyn FnMut() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into());
            Err(Error::CudaGraph(format!("{what}: {}", msg.lines().next().unwrap_or_default())))
        }
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: freed once; the shim catches every exception.
        unsafe { ffi::rlhf_graph_free(self.ptr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_a_graph_is_refused_with_a_reason() {
        if tch::Cuda::is_available() {
            return;
        }
        let err = CudaGraph::new(0).err().expect("no device, no graph").to_string();
        assert!(err.contains("CUDA graph"), "{err}");
    }

    #[test]
    fn a_panic_inside_a_capture_becomes_an_error() {
        let r: Result<()> = caught("step", &mut || panic!("operation not permitted when stream is capturing"));
        assert!(r.unwrap_err().to_string().contains("not permitted"));
    }
}
