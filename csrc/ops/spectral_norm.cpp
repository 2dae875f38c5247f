// Schemas of the batched spectral-norm power iterations (SPEC section 3), and the operator-mode
// iteration, which is the same code on every device: all B kernels per step in one grouped
// conv_transpose2d (v = W^T u) and one grouped conv2d (u = W v), driven from C++.
//
// Both ops update `u` in place (the persistent iteration vector) and return the last unit `v`;
// sigma = <u, W v> is then formed by a differentiable expression with u and v held constant.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "spectral_norm.h"

namespace itconv_fast {
namespace spectral {
namespace {

at::Tensor power_iteration_operator(const at::Tensor& weight, at::Tensor& u, int64_t n_iter) {
  check_common(weight, u, n_iter, "power_iteration_operator_");
  const int64_t B = weight.size(0), c_out = weight.size(1), c_in = weight.size(2);
  const int64_t kh = weight.size(3), kw = weight.size(4);
  TORCH_CHECK_VALUE(kh % 2 == 1 && kw % 2 == 1, "power_iteration_operator_: kernel sizes must be odd (same-size ",
                    "zero-padded convolution), got ", kh, "x", kw);
  TORCH_CHECK_VALUE(u.dim() == 4 && u.size(0) == B && u.size(1) == c_out, "power_iteration_operator_: u must have ",
                    "shape [B=", B, ", C_out=", c_out, ", H, W], got ", u.sizes());
  const int64_t H = u.size(2), W = u.size(3);
  TORCH_CHECK_VALUE(H > 0 && W > 0, "power_iteration_operator_: empty feature map ", H, "x", W);
  const at::NoGradGuard no_grad;
  const at::Tensor w = weight.reshape({B * c_out, c_in, kh, kw});
  const std::vector<int64_t> padding{kh / 2, kw / 2};
  at::Tensor uu = u.reshape({1, B * c_out, H, W});
  at::Tensor v;
  for (int64_t it = 0; it < n_iter; ++it) {
    v = at::conv_transpose2d(uu, w, {}, /*stride=*/1, padding, /*output_padding=*/0, /*groups=*/B);
    v = normalize_per_batch(v.view({B, c_in * H * W})).view({1, B * c_in, H, W});
    uu = at::conv2d(v, w, {}, /*stride=*/1, padding, /*dilation=*/1, /*groups=*/B);
    uu = normalize_per_batch(uu.view({B, c_out * H * W})).view({1, B * c_out, H, W});
  }
  u.copy_(uu.view_as(u));
  return v.view({B, c_in, H, W});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itconv_fast, m) {
  m.def("power_iteration_operator_(Tensor weight, Tensor(a!) u, int n_iter) -> Tensor");
  m.def("power_iteration_matrix_(Tensor weight, Tensor(a!) u, int n_iter) -> Tensor");
}

TORCH_LIBRARY_IMPL(itconv_fast, CompositeExplicitAutograd, m) {
  m.impl("power_iteration_operator_", &power_iteration_operator);
}

}  // namespace spectral
}  // namespace itconv_fast
