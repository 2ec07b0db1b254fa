// Fused ops with their own backward, for what libtorch's autograd would
// save more of than the backward needs. Called from Rust (model/src/fused.rs)
// on tch's tensor handles (`at::Tensor*`).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <string>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

thread_local std::string last_error;

// silu(gate) * up, saving only gate and up: the plain ops also keep
// silu(gate), a third [tokens, intermediate] tensor per MLP. The forward and
// both gradients are the same kernels autograd would run (MulBackward0,
// SiluBackward0), silu(gate) recomputed in the backward.
struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    ctx->save_for_backward({gate, up});
    return at::silu(gate) * up;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& gate = saved[0];
    const auto& up = saved[1];
    const auto& grad = grads[0];
    at::Tensor d_gate, d_up;
    if (ctx->needs_input_grad(0)) d_gate = at::silu_backward(grad * up, gate);
    if (ctx->needs_input_grad(1)) d_up = grad * at::silu(gate);
    return {d_gate, d_up};
  }
};

}  // namespace

extern "C" {

// The message of the last failed call on this thread (empty if none).
const char* rlhf_last_error() { return last_error.c_str(); }

// A new tensor handle, or null with rlhf_last_error() set.
at::Tensor* rlhf_swiglu(const at::Tensor* gate, const at::Tensor* up) {
  try {
    return new at::Tensor(SwiGlu::apply(*gate, *up));
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

}  // extern "C"
