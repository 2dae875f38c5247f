// Schemas of the batched spectral-norm power iterations (SPEC section 3), and the operator-mode
// iteration, which is the same code on every device: all B kernels per step in one grouped
// conv_transpose2d (v = W^T u) and one grouped conv2d (u = W v), driven from C++.
//
// Both ops update `u` in place (the persistent iteration vector) and return the last unit `v` and
// sigma = |W v| = <u, W v> (no gradient here: the Python wrapper attaches d sigma / dW = u v^T, the
// formula with u and v held constant, so no extra convolution runs in the forward pass).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "spectral_norm.h"

namespace itconv_fast {
namespace spectral {
namespace {

// The iteration on B kernels given as a 5-D stack (`stacked` defined) or as a list of 4-D kernels
// (`stacked` undefined: the list is stacked only if the grouped path needs it).
std::tuple<at::Tensor, at::Tensor> operator_iteration(at::TensorList kernels, at::Tensor stacked, at::Tensor& u,
                                                      int64_t n_iter, c10::IntArrayRef shape) {
  const int64_t B = shape[0], c_out = shape[1], c_in = shape[2], kh = shape[3], kw = shape[4];
  TORCH_CHECK_VALUE(kh % 2 == 1 && kw % 2 == 1, "power_iteration_operator_: kernel sizes must be odd (same-size ",
                    "zero-padded convolution), got ", kh, "x", kw);
  TORCH_CHECK_VALUE(u.dim() == 4 && u.size(0) == B && u.size(1) == c_out, "power_iteration_operator_: u must have ",
                    "shape [B=", B, ", C_out=", c_out, ", H, W], got ", u.sizes());
  const int64_t H = u.size(2), W = u.size(3);
  TORCH_CHECK_VALUE(H > 0 && W > 0, "power_iteration_operator_: empty feature map ", H, "x", W);
  const at::NoGradGuard no_grad;
  const std::vector<int64_t> padding{kh / 2, kw / 2};
  // One grouped conv for all B kernels is fastest while the kernels are narrow; for wide ones (more
  // than 128 channels) the CPU libraries' grouped convolutions fall far behind B dense ones (measured:
  // 145 ms against 21 ms for 16 kernels of 256 channels on 8 x 8), so those go kernel by kernel.
  const bool grouped = !kernels[0].is_cpu() || std::max(c_in, c_out) <= 128;
  at::Tensor w;
  if (grouped) w = (stacked.defined() ? stacked : at::stack(kernels)).reshape({B * c_out, c_in, kh, kw});
  auto adjoint = [&](const at::Tensor& x) {  // [B, C_out, H, W] -> W^T x, [B, C_in, H, W]
    if (grouped) {
      return at::conv_transpose2d(x.reshape({1, B * c_out, H, W}), w, {}, 1, padding, 0, B).view({B, c_in, H, W});
    }
    std::vector<at::Tensor> out;
    for (int64_t b = 0; b < B; ++b) out.push_back(at::conv_transpose2d(x.narrow(0, b, 1), kernels[b], {}, 1, padding));
    return at::cat(out);
  };
  auto forward = [&](const at::Tensor& x) {  // [B, C_in, H, W] -> W x, [B, C_out, H, W]
    if (grouped) {
      return at::conv2d(x.reshape({1, B * c_in, H, W}), w, {}, 1, padding, 1, B).view({B, c_out, H, W});
    }
    std::vector<at::Tensor> out;
    for (int64_t b = 0; b < B; ++b) out.push_back(at::conv2d(x.narrow(0, b, 1), kernels[b], {}, 1, padding));
    return at::cat(out);
  };
  at::Tensor uu = u;
  at::Tensor v, sigma;
  for (int64_t it = 0; it < n_iter; ++it) {
    v = normalize_per_batch(adjoint(uu).reshape({B, -1})).view({B, c_in, H, W});
    const at::Tensor wv = forward(v).reshape({B, -1});
    sigma = wv.norm(2, {1});
    uu = (wv / sigma.clamp_min(kNormEps).unsqueeze(1)).view({B, c_out, H, W});
  }
  u.copy_(uu);
  return {v, sigma};
}

std::tuple<at::Tensor, at::Tensor> power_iteration_operator(const at::Tensor& weight, at::Tensor& u, int64_t n_iter) {
  check_common(weight, u, n_iter, "power_iteration_operator_");
  return operator_iteration(weight.unbind(0), weight, u, n_iter, weight.sizes());
}

std::tuple<at::Tensor, at::Tensor> power_iteration_operator_list(at::TensorList weights, at::Tensor& u, int64_t n_iter) {
  const auto shape = check_kernel_list(weights, "power_iteration_operator_");
  check_common(weights[0].unsqueeze(0).expand(shape), u, n_iter, "power_iteration_operator_");
  return operator_iteration(weights, at::Tensor(), u, n_iter, shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itconv_fast, m) {
  m.def("power_iteration_operator_(Tensor weight, Tensor(a!) u, int n_iter) -> (Tensor, Tensor)");
  m.def("power_iteration_matrix_(Tensor weight, Tensor(a!) u, int n_iter) -> (Tensor, Tensor)");
  // The same with the kernels as a list of B 4-D tensors (read in place, no stacking).
  m.def("power_iteration_operator_.list(Tensor[] weights, Tensor(a!) u, int n_iter) -> (Tensor, Tensor)");
  m.def("power_iteration_matrix_.list(Tensor[] weights, Tensor(a!) u, int n_iter) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(itconv_fast, CompositeExplicitAutograd, m) {
  m.impl("power_iteration_operator_", &power_iteration_operator);
  m.impl("power_iteration_operator_.list", &power_iteration_operator_list);
}

}  // namespace spectral
}  // namespace itconv_fast
