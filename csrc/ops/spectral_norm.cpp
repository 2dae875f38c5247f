// Schemas of the batched spectral-norm power iterations (SPEC section 3), and the operator-mode
// iteration, which is the same code on every device: all B kernels per step in one grouped
// conv_transpose2d (v = W^T u) and one grouped conv2d (u = W v), driven from C++ (on the CPU, large
// kernels go one by one in parallel instead; see operator_path).
//
// Both ops update `u` in place (the persistent iteration vector) and return the last unit `v` and
// sigma = |W v| = <u, W v> (no gradient here: the Python wrapper attaches d sigma / dW = u v^T, the
// formula with u and v held constant, so no extra convolution runs in the forward pass).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "spectral_norm.h"

namespace itconv_fast {
namespace spectral {
namespace {

enum class OperatorPath { Grouped, PerKernel, PerKernelParallel };

// Which way the B kernels' convolutions run. On the GPU one grouped convolution. On the CPU the grouped
// call wins while a kernel's work C_in C_out H W is small and loses from about 2^22 (benchmarks/NOTES.md,
// "Operator mode against the per-layer loop"); past kGroupedMaxWork the kernels go one by one, spread over
// the threads. ITCONV_FAST_OPERATOR_PATH=grouped|serial|parallel forces a path (for the benchmarks'
// A/B measurements only).
constexpr int64_t kGroupedMaxWork = int64_t{1} << 20;

OperatorPath operator_path(bool cpu, int64_t c_in, int64_t c_out, int64_t H, int64_t W) {
  if (const char* forced = std::getenv("ITCONV_FAST_OPERATOR_PATH")) {
    const std::string name(forced);
    if (name == "grouped") return OperatorPath::Grouped;
    if (name == "serial") return OperatorPath::PerKernel;
    if (name == "parallel") return OperatorPath::PerKernelParallel;
  }
  if (!cpu) return OperatorPath::Grouped;
  return c_in * c_out * H * W <= kGroupedMaxWork ? OperatorPath::Grouped : OperatorPath::PerKernelParallel;
}

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
  const OperatorPath path = operator_path(kernels[0].is_cpu(), c_in, c_out, H, W);
  at::Tensor w;
  if (path == OperatorPath::Grouped) w = (stacked.defined() ? stacked : at::stack(kernels)).reshape({B * c_out, c_in, kh, kw});
  // Kernel by kernel: b's result written into its slice of `out`; in parallel over b with each convolution
  // on one thread (a nested parallel region runs serially), or one after another with threaded convolutions.
  auto per_kernel = [&](at::Tensor out, auto&& one) {
    if (path == OperatorPath::PerKernelParallel) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard no_grad_here;  // grad mode is thread-local
        for (int64_t b = begin; b < end; ++b) out.narrow(0, b, 1).copy_(one(b));
      });
    } else {
      for (int64_t b = 0; b < B; ++b) out.narrow(0, b, 1).copy_(one(b));
    }
    return out;
  };
  auto adjoint = [&](const at::Tensor& x) {  // [B, C_out, H, W] -> W^T x, [B, C_in, H, W]
    if (path == OperatorPath::Grouped) {
      return at::conv_transpose2d(x.reshape({1, B * c_out, H, W}), w, {}, 1, padding, 0, B).view({B, c_in, H, W});
    }
    return per_kernel(at::empty({B, c_in, H, W}, x.options()),
                      [&](int64_t b) { return at::conv_transpose2d(x.narrow(0, b, 1), kernels[b], {}, 1, padding); });
  };
  auto forward = [&](const at::Tensor& x) {  // [B, C_in, H, W] -> W x, [B, C_out, H, W]
    if (path == OperatorPath::Grouped) {
      return at::conv2d(x.reshape({1, B * c_in, H, W}), w, {}, 1, padding, 1, B).view({B, c_out, H, W});
    }
    return per_kernel(at::empty({B, c_out, H, W}, x.options()),
                      [&](int64_t b) { return at::conv2d(x.narrow(0, b, 1), kernels[b], {}, 1, padding); });
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
