// Checks and layout helpers shared by the fused BatchNorm + ReLU kernels (training mode): the CPU kernel
// (cpu/batch_norm_relu_kernel.cpp), the CUDA launcher (cuda/batch_norm_relu_kernel.cu) and the CUDA
// device code's emulation.
//
// The op computes, per channel c over the M = N * H * W values of the batch,
//   mean_c, var_c (biased), invstd_c = 1 / sqrt(var_c + eps),
//   out = max((x - mean_c) * invstd_c * gamma_c + beta_c, 0)  (as x * a_c + b_c, ATen's channels-last form),
//   new running_mean = momentum mean_c + (1 - momentum) running_mean,
//   new running_var  = momentum var_c M / (M - 1) + (1 - momentum) running_var  (ATen's formulas),
// and its backward, with g = grad_out where out > 0 (ReLU's mask, recomputed from the input with the same
// coefficients a_c, b_c and the same arithmetic as the forward's, so it is the forward's mask exactly):
//   grad_bias = sum g, grad_weight = invstd sum g (x - mean),
//   grad_input = (g - sum g / M - (x - mean) invstd^2 sum g (x - mean) / M) invstd gamma.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <tuple>

namespace itconv_fast {
namespace batch_norm_relu {

// Sums run in float within a block of rows (or a plane) and in double across blocks, so that a result
// does not depend on the number of threads and a long reduction keeps its precision.
constexpr int64_t kRowBlockElements = 4096;

// The normalisation's affine form, out = relu(x a + b): forward and backward (its ReLU mask) compute a and b
// with this one function, on the CPU and the GPU, so that their roundings agree.
template <typename acc_t>
C10_HOST_DEVICE inline void affine_coefficients(acc_t mean, acc_t invstd, acc_t weight, acc_t bias, acc_t& a,
                                                acc_t& b) {
  a = invstd * weight;
  b = bias - mean * a;
}

// ReLU's mask at one value: whether the forward's output, x a + b rounded to the input's dtype, is > 0.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline bool passes_relu(scalar_t x, acc_t a, acc_t b) {
  return static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(x) * a + b)) > acc_t(0);
}

// The two layouts the kernels read: [M, C] rows (channels-last 4-D tensors) or [N, C, S] planes
// (contiguous tensors of any rank >= 2). Anything else is made contiguous first.
inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::Tensor in_kernel_layout(const at::Tensor& x) {
  return is_channels_last(x) ? x : x.contiguous();
}

inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// A tensor in its kernel layout, as every kernel (CPU, CUDA, emulated) reads it.
struct Geometry {
  int64_t N, C, S, M;  // M = N * S values per channel
  bool rows;           // channels-last [M, C]; else planes [N, C, S]
  // Offset of value m (0 <= m < M) of channel c, and the channel of offset i.
  C10_HOST_DEVICE int64_t offset(int64_t m, int64_t c) const {
    return rows ? m * C + c : ((m / S) * C + c) * S + m % S;
  }
  C10_HOST_DEVICE int64_t channel_of(int64_t i) const { return rows ? i % C : (i / S) % C; }
};

inline Geometry geometry_of(const at::Tensor& x) {  // x in its kernel layout
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = (N == 0 || C == 0) ? 0 : x.numel() / (N * C);
  return {N, C, S, N * S, is_channels_last(x)};
}

inline at::ScalarType param_dtype_for(at::ScalarType input) {
  return (input == at::kHalf || input == at::kBFloat16) ? at::kFloat : input;
}

inline void check_params(const at::Tensor& input, const at::Tensor& p, const char* name, const char* op) {
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == C, op, ": ", name, " must have shape [C=", C, "], got ", p.sizes());
  TORCH_CHECK_VALUE(p.device() == input.device(), op, ": ", name, " is on ", p.device(), ", input on ",
                    input.device());
  TORCH_CHECK_TYPE(p.scalar_type() == input.scalar_type() || p.scalar_type() == param_dtype_for(input.scalar_type()),
                   op, ": ", name, " has dtype ", p.scalar_type(), ", input ", input.scalar_type(),
                   " (parameters must have the input's dtype, or float32 for a half or bfloat16 input)");
}

inline void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK_VALUE(input.dim() >= 2, op, ": input must be [N, C, ...], got ", input.dim(), "-D");
  const auto t = input.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
                   ": input must be float32, float64, float16 or bfloat16, got ", t);
}

inline void check_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& running_mean, const at::Tensor& running_var, double momentum, double eps) {
  constexpr const char* op = "batch_norm_relu";
  check_input(input, op);
  check_params(input, weight, "weight", op);
  check_params(input, bias, "bias", op);
  check_params(input, running_mean, "running_mean", op);
  check_params(input, running_var, "running_var", op);
  TORCH_CHECK_TYPE(weight.scalar_type() == bias.scalar_type() && weight.scalar_type() == running_mean.scalar_type() &&
                       weight.scalar_type() == running_var.scalar_type(),
                   op, ": weight, bias, running_mean and running_var must share a dtype");
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(C == 0 || input.numel() / C >= 2, op, ": training needs more than one value per channel, ",
                    "got input ", input.sizes());
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, op, ": momentum must be in [0, 1], got ", momentum);
  TORCH_CHECK_VALUE(eps > 0.0, op, ": eps must be > 0, got ", eps);
}

inline void check_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& save_mean, const at::Tensor& save_invstd) {
  constexpr const char* op = "batch_norm_relu_backward";
  check_input(input, op);
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes(), op, ": grad_out ", grad_out.sizes(), " and input ",
                    input.sizes(), " must have one shape");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == input.scalar_type(), op, ": grad_out has dtype ", grad_out.scalar_type(),
                   ", input ", input.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == input.device(), op, ": grad_out is on ", grad_out.device(), ", input on ",
                    input.device());
  check_params(input, weight, "weight", op);
  check_params(input, bias, "bias", op);
  TORCH_CHECK_TYPE(bias.scalar_type() == weight.scalar_type(), op, ": weight and bias must share a dtype");
  check_params(input, save_mean, "save_mean", op);
  check_params(input, save_invstd, "save_invstd", op);
  TORCH_CHECK_TYPE(save_mean.scalar_type() == param_dtype_for(input.scalar_type()) &&
                       save_invstd.scalar_type() == save_mean.scalar_type(),
                   op, ": save_mean and save_invstd must be ", param_dtype_for(input.scalar_type()));
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(C == 0 || input.numel() / C >= 2, op, ": needs more than one value per channel, got input ",
                    input.sizes());
}

// The op's tensors, checked, in the kernels' layout and dtypes, shared by every backend: x (and dy) in kernel
// layout, the per-channel parameters and statistics contiguous in the statistics' dtype (acc_t), the outputs
// allocated (the new running statistics and the parameter gradients in acc_t too: finish_* casts them back).
struct ForwardTensors {
  at::Tensor x, weight, bias, running_mean, running_var;
  at::Tensor out, save_mean, save_invstd, new_mean, new_var;
  Geometry g;
};

inline ForwardTensors prepare_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& running_mean, const at::Tensor& running_var, double momentum,
                                      double eps) {
  check_forward(input, weight, bias, running_mean, running_var, momentum, eps);
  ForwardTensors t;
  t.x = in_kernel_layout(input);
  t.g = geometry_of(t.x);
  const auto stat_dtype = param_dtype_for(t.x.scalar_type());
  const auto stat_options = t.x.options().dtype(stat_dtype);
  t.weight = weight.contiguous().to(stat_dtype), t.bias = bias.contiguous().to(stat_dtype);
  t.running_mean = running_mean.contiguous().to(stat_dtype), t.running_var = running_var.contiguous().to(stat_dtype);
  t.out = at::empty(t.x.sizes(), t.x.options().memory_format(layout_of(t.x)));
  t.save_mean = at::empty({t.g.C}, stat_options), t.save_invstd = at::empty({t.g.C}, stat_options);
  t.new_mean = at::empty({t.g.C}, stat_options), t.new_var = at::empty({t.g.C}, stat_options);
  return t;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_forward(
    const ForwardTensors& t, const at::Tensor& running_mean, const at::Tensor& running_var) {
  return {t.out, t.save_mean, t.save_invstd, t.new_mean.to(running_mean.scalar_type()),
          t.new_var.to(running_var.scalar_type())};
}

struct BackwardTensors {
  at::Tensor dy, x, weight, bias, save_mean, save_invstd;
  at::Tensor dx, grad_weight, grad_bias;
  Geometry g;
};

inline BackwardTensors prepare_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
                                        const at::Tensor& bias, const at::Tensor& save_mean,
                                        const at::Tensor& save_invstd) {
  check_backward(grad_out, input, weight, bias, save_mean, save_invstd);
  BackwardTensors t;
  t.x = in_kernel_layout(input);
  t.g = geometry_of(t.x);
  const auto fmt = layout_of(t.x);
  t.dy = grad_out.contiguous(fmt);
  const auto stat_dtype = param_dtype_for(t.x.scalar_type());
  const auto stat_options = t.x.options().dtype(stat_dtype);
  t.weight = weight.contiguous().to(stat_dtype), t.bias = bias.contiguous().to(stat_dtype);
  t.save_mean = save_mean.contiguous(), t.save_invstd = save_invstd.contiguous();
  t.dx = at::empty(t.x.sizes(), t.x.options().memory_format(fmt));
  t.grad_weight = at::empty({t.g.C}, stat_options), t.grad_bias = at::empty({t.g.C}, stat_options);
  return t;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_backward(const BackwardTensors& t,
                                                                      const at::Tensor& weight) {
  return {t.dx, t.grad_weight.to(weight.scalar_type()), t.grad_bias.to(weight.scalar_type())};
}

}  // namespace batch_norm_relu
}  // namespace itconv_fast
