// Helpers shared by the spectral-norm kernels.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace itconv_fast {
namespace spectral {

// Below this norm a vector is left as it is rather than divided by (almost) zero.
constexpr double kNormEps = 1e-12;

// The CUDA matrix power iteration runs one block per matrix, or, for matrices of at least
// kMultiBlockMinElements elements (1 MiB of float) and more than one tile of rows, several blocks per matrix
// in tiles of kTileRows rows (spectral_norm_device.cuh).
constexpr int64_t kTileRows = 64;
constexpr int64_t kMultiBlockMinElements = int64_t{1} << 18;

inline bool use_multi_block(int64_t rows, int64_t cols) {
  return rows > kTileRows && rows * cols >= kMultiBlockMinElements;
}

inline void check_common(const at::Tensor& weight, const at::Tensor& u, int64_t n_iter, const char* op) {
  TORCH_CHECK_VALUE(weight.dim() == 5, op, ": weight must be 5-D [B, C_out, C_in, kh, kw], got ", weight.dim(), "-D");
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
                   ": weight must be float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK_TYPE(u.scalar_type() == weight.scalar_type(), op, ": u has dtype ", u.scalar_type(), ", weight ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(u.device() == weight.device(), op, ": u is on ", u.device(), ", weight on ", weight.device());
  TORCH_CHECK_VALUE(n_iter >= 1, op, ": n_iter must be >= 1, got ", n_iter);
  TORCH_CHECK_VALUE(weight.numel() > 0, op, ": weight is empty ", weight.sizes());
}

// Matrix mode: weight[b] is read as [C_out, C_in*kh*kw]; u must be [B, C_out]. Returns (B, rows, cols).
inline std::tuple<int64_t, int64_t, int64_t> check_matrix(const at::Tensor& weight, const at::Tensor& u, int64_t n_iter) {
  check_common(weight, u, n_iter, "power_iteration_matrix_");
  const int64_t B = weight.size(0), rows = weight.size(1);
  const int64_t cols = weight.size(2) * weight.size(3) * weight.size(4);
  TORCH_CHECK_VALUE(u.dim() == 2 && u.size(0) == B && u.size(1) == rows, "power_iteration_matrix_: u must have shape [B=",
                    B, ", C_out=", rows, "], got ", u.sizes());
  return {B, rows, cols};
}

// The list form of the ops: B same-shaped 4-D kernels [C_out, C_in, kh, kw] (e.g. the T blocks' own
// weights, read in place instead of stacked into a new 5-D tensor). Checks them and returns the shape
// of the stack they stand for, [B, C_out, C_in, kh, kw].
inline std::vector<int64_t> check_kernel_list(at::TensorList weights, const char* op) {
  TORCH_CHECK_VALUE(!weights.empty(), op, ": weights is an empty list");
  const at::Tensor& first = weights[0];
  TORCH_CHECK_VALUE(first.dim() == 4, op, ": every kernel must be 4-D [C_out, C_in, kh, kw], kernel 0 is ",
                    first.dim(), "-D");
  for (size_t b = 1; b < weights.size(); ++b) {
    const at::Tensor& w = weights[b];
    TORCH_CHECK_VALUE(w.sizes() == first.sizes(), op, ": kernel ", b, " has shape ", w.sizes(), ", kernel 0 has ",
                      first.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == first.scalar_type(), op, ": kernel ", b, " has dtype ", w.scalar_type(),
                     ", kernel 0 has ", first.scalar_type());
    TORCH_CHECK_VALUE(w.device() == first.device(), op, ": kernel ", b, " is on ", w.device(), ", kernel 0 on ",
                      first.device());
  }
  std::vector<int64_t> shape{static_cast<int64_t>(weights.size())};
  for (const auto size : first.sizes()) shape.push_back(size);
  return shape;
}

// x [B, N] -> each row divided by its 2-norm (rows of norm < eps are left unscaled).
inline at::Tensor normalize_per_batch(const at::Tensor& x) {
  return x / x.norm(2, {1}, /*keepdim=*/true).clamp_min(kNormEps);
}

}  // namespace spectral
}  // namespace itconv_fast
