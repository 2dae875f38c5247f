// Schemas of the fused BatchNorm + ReLU of a pre-activation block, training mode (formulas in
// batch_norm_relu.h), and its autograd kernel. The forward returns the output, the batch mean and inverse
// standard deviation its backward needs (as ATen's native_batch_norm does) and the updated running statistics
// as new tensors: a functional op, so that autograd and torch.compile take it as it is; the Python wrapper
// copies them into the module's buffers. The backward recomputes ReLU's mask from the input
// (batch_norm_relu.h: passes_relu), so it neither keeps a mask nor reads the output: two tensors a pass.
//
// The autograd kernel is C++ (a torch::autograd::Function on the Autograd key) rather than
// torch.library.register_autograd: the Python one cost about 60 us a call around each forward and backward,
// ~1% of a ResNet-101-16 step on 2 cores (benchmarks/NOTES.md, "Fused BatchNorm + ReLU").
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace itconv_fast {
namespace batch_norm_relu {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs call_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& running_mean, const at::Tensor& running_var, double momentum, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("itconv_fast::batch_norm_relu", "")
                             .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, double, double)>();
  return op.call(input, weight, bias, running_mean, running_var, momentum, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                                             const at::Tensor& weight, const at::Tensor& bias,
                                                             const at::Tensor& save_mean,
                                                             const at::Tensor& save_invstd) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("itconv_fast::batch_norm_relu_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_out, input, weight, bias, save_mean, save_invstd);
}

class BatchNormReLUFunction : public torch::autograd::Function<BatchNormReLUFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                                double momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, save_mean, save_invstd, new_mean, new_var] =
        call_forward(input, weight, bias, running_mean, running_var, momentum, eps);
    ctx->save_for_backward({input, weight, bias, save_mean, save_invstd});
    ctx->mark_non_differentiable({save_mean, save_invstd, new_mean, new_var});
    // The four non-differentiable outputs get no gradient: without this, autograd would fill a zero tensor for
    // each of them before every backward (four launches a layer a step; bench/launches.py).
    ctx->set_materialize_grads(false);
    return {out, save_mean, save_invstd, new_mean, new_var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // Grad mode is on here only under create_graph: the gradient below would carry no graph, so a second
    // derivative would silently treat it as a constant. Refuse instead.
    TORCH_CHECK(!at::GradMode::is_enabled(), "batch_norm_relu: double backward (create_graph=True) is not ",
                "supported by the fused kernel; use torch.relu(F.batch_norm(...)) there ",
                "(IterResNet.fuse_bn_relu(False))");
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                                     at::Tensor(), at::Tensor()};
    auto [grad_input, grad_weight, grad_bias] = call_backward(grads[0], saved[0], saved[1], saved[2], saved[3],
                                                              saved[4]);
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Outputs batch_norm_relu_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& running_mean, const at::Tensor& running_var, double momentum,
                                 double eps) {
  const auto out = BatchNormReLUFunction::apply(input, weight, bias, running_mean, running_var, momentum, eps);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itconv_fast, m) {
  m.def(
      "batch_norm_relu(Tensor input, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
      "float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_relu_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor bias, Tensor save_mean, "
      "Tensor save_invstd) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(itconv_fast, Autograd, m) { m.impl("batch_norm_relu", &batch_norm_relu_autograd); }

}  // namespace batch_norm_relu
}  // namespace itconv_fast
