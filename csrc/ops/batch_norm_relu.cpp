// Schemas of the fused BatchNorm + ReLU of a pre-activation block, training mode (formulas in
// batch_norm_relu.h). The forward returns the output, the batch mean and inverse standard deviation its
// backward needs (as ATen's native_batch_norm does) and the updated running statistics as new tensors: a
// functional op, so that autograd (torch.library.register_autograd) and torch.compile take it as it is; the
// Python wrapper copies them into the module's buffers. The backward recomputes ReLU's mask from the input
// (batch_norm_relu.h: passes_relu), so it neither keeps a mask nor reads the output: two tensors a pass.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace itconv_fast {
namespace batch_norm_relu {

TORCH_LIBRARY_FRAGMENT(itconv_fast, m) {
  m.def(
      "batch_norm_relu(Tensor input, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
      "float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_relu_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor bias, Tensor save_mean, "
      "Tensor save_invstd) -> (Tensor, Tensor, Tensor)");
}

}  // namespace batch_norm_relu
}  // namespace itconv_fast
