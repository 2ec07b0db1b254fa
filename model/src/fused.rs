//! Fused ops with their own backward (`model/csrc/fused.cpp`), where plain
//! tensor ops would make autograd keep more than the backward needs.

use std::ffi::CStr;

use tch::Tensor;

use crate::error::{Error, Result};

mod ffi {
    use std::os::raw::c_char;
    use torch_sys::C_tensor;

    extern "C" {
        pub fn rlhf_last_error() -> *const c_char;
        pub fn rlhf_swiglu(gate: *const C_tensor, up: *const C_tensor) -> *mut C_tensor;
    }
}

/// A tensor handle from the shim, or its error.
fn wrap(ptr: *mut torch_sys::C_tensor, what: &str) -> Result<Tensor> {
    if ptr.is_null() {
        // SAFETY: the shim returns a NUL-terminated string owned by this thread.
        let msg = unsafe { CStr::from_ptr(ffi::rlhf_last_error()) }.to_string_lossy().into_owned();
        return Err(Error::Torch(tch::TchError::Torch(format!("{what}: {msg}"))));
    }
    // SAFETY: a fresh `at::Tensor*` allocated with `new`, as tch's own handles are.
    Ok(unsafe { Tensor::from_ptr(ptr) })
}

/// `silu(gate) * up`, the SwiGLU of a LLaMA/Qwen MLP. Where a graph is being
/// recorded it saves only `gate` and `up` (the plain ops also keep
/// `silu(gate)`: a third `[tokens, intermediate]` tensor per layer) and
/// recomputes `silu(gate)` in the backward; values and gradients equal the
/// plain ops' bit for bit.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !(gate.requires_grad() || up.requires_grad()) {
        return Ok(gate.silu() * up);
    }
    // SAFETY: both handles are live for the call; the shim copies them.
    wrap(unsafe { ffi::rlhf_swiglu(gate.as_ptr(), up.as_ptr()) }, "swiglu")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn plain_and_fused(kind: Kind) -> (Vec<Tensor>, Vec<Tensor>) {
        // Drawn once: tests share torch's global generator, so a second
        // seeded draw could see another test's draws in between.
        let inputs: Vec<Tensor> =
            (0..3).map(|_| Tensor::randn([3, 5, 64], (Kind::Float, Device::Cpu)).to_kind(kind)).collect();
        let run = |fused: bool| {
            let gate = inputs[0].copy().set_requires_grad(true);
            let up = inputs[1].copy().set_requires_grad(true);
            let w = &inputs[2];
            let y = if fused { swiglu(&gate, &up).unwrap() } else { gate.silu() * &up };
            (&y * w).sum(Kind::Float).backward();
            vec![y.detach(), gate.grad(), up.grad()]
        };
        (run(false), run(true))
    }

    #[test]
    fn swiglu_equals_the_plain_ops_bit_for_bit() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let (plain, fused) = plain_and_fused(kind);
            for (p, f) in plain.iter().zip(&fused) {
                assert_eq!(p.kind(), kind);
                assert!(p.equal(f), "{kind:?}: max diff {}", (p - f).abs().max().double_value(&[]));
            }
        }
    }

    #[test]
    fn swiglu_without_a_graph_is_the_plain_value() {
        let gate = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let up = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        assert!(swiglu(&gate, &up).unwrap().equal(&(gate.silu() * &up)));
    }

    #[test]
    fn swiglu_names_a_shape_error() {
        let gate = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let up = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        let err = swiglu(&gate, &up).unwrap_err().to_string();
        assert!(err.contains("swiglu"), "{err}");
    }
}
