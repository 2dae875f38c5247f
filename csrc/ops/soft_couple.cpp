// Schema of the fused soft gradient coupling (SPEC section 2).
//
//   g_t <- (1 - lam) g_t + lam * sum_u K[t, u] g_u      for the coupled blocks of every group
//
// `grads` holds the members of every group back to back; `group_sizes[i]` says how many belong to
// group i. One call couples every group: that is the point of the op.
//
// Two private ops make the CUDA path checkable on a machine without a GPU:
// - _soft_couple_launch_plan builds the CUDA kernel's launch tables (soft_couple_launch.h) for groups given
//   by size only (member "pointers" are member numbers, nothing is allocated), for the tests to walk;
// - _soft_couple_aten_ runs couple_with_aten_ops, the CUDA op's path under graph capture, on any device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "soft_couple.h"
#include "soft_couple_launch.h"

namespace itconv_fast {
namespace soft_couple {
namespace {

// Per launch four tensors: descriptors [G, kFields], items [I, 2], member numbers [P], coefficients [C]
// (float64). Groups use lam = 0.5 and the default bandwidth; member numbers run over the whole call (a
// scratch-mode group lists its members, then -1 - member for the rows of its copy).
std::vector<at::Tensor> launch_plan(at::IntArrayRef numels, at::IntArrayRef member_counts, c10::string_view kernel,
                                    int64_t max_items, int64_t per_thread) {
  TORCH_CHECK_VALUE(numels.size() == member_counts.size(), "_soft_couple_launch_plan: ", numels.size(), " numels but ",
                    member_counts.size(), " member counts");
  const Kernel kind = parse_kernel(std::string(kernel));
  std::vector<Coefficients> coeffs;
  coeffs.reserve(numels.size());
  std::vector<GroupSpec> specs;
  int64_t next_member = 0;
  for (size_t g = 0; g < numels.size(); ++g) {
    TORCH_CHECK_VALUE(numels[g] >= 0 && member_counts[g] >= 1, "_soft_couple_launch_plan: group ", g,
                      " needs numel >= 0 and at least one member");
    coeffs.push_back(mixing_coefficients(kind, 0.5, c10::nullopt, member_counts[g]));
  }
  for (size_t g = 0; g < numels.size(); ++g) {
    GroupSpec spec;
    spec.numel = numels[g];
    spec.coeffs = &coeffs[g];
    for (int64_t j = 0; j < member_counts[g]; ++j) spec.pointers.push_back(next_member++);
    if (!coeffs[g].uniform && member_counts[g] > kMaxStaged) {  // as for_each_launch: a scratch copy's rows
      for (int64_t j = 0; j < member_counts[g]; ++j) spec.scratch.push_back(-1 - spec.pointers[j]);
    }
    specs.push_back(std::move(spec));
  }
  std::vector<at::Tensor> out;
  const auto as_long = [](const std::vector<int64_t>& v, std::vector<int64_t> shape) {
    return at::tensor(v, at::kLong).reshape(shape);
  };
  for (const auto& launch : plan_launches(specs, max_items, static_cast<int>(per_thread))) {
    out.push_back(as_long(launch.descs, {launch.n_groups, kFields}));
    out.push_back(as_long(launch.items, {launch.n_items(), 2}));
    out.push_back(as_long(launch.ptrs, {static_cast<int64_t>(launch.ptrs.size())}));
    out.push_back(at::tensor(launch.coeffs, at::kDouble));
  }
  return out;
}

void soft_couple_aten(at::TensorList grads, at::IntArrayRef group_sizes, double lam, c10::string_view kernel,
                      c10::optional<double> bandwidth, int64_t skip_first) {
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  const auto groups = prepare_groups(grads, group_sizes, lam, std::string(kernel), bandwidth, skip_first, write_back);
  couple_with_aten_ops(groups);
  finish_write_back(write_back);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itconv_fast, m) {
  m.def(
      "soft_couple_(Tensor(a!)[] grads, int[] group_sizes, float lam, str kernel, "
      "float? bandwidth, int skip_first) -> ()");
  m.def("_soft_couple_launch_plan(int[] numels, int[] member_counts, str kernel, int max_items, int per_thread=4) -> Tensor[]",
        &launch_plan);
  m.def(
      "_soft_couple_aten_(Tensor(a!)[] grads, int[] group_sizes, float lam, str kernel, "
      "float? bandwidth, int skip_first) -> ()");
}

TORCH_LIBRARY_IMPL(itconv_fast, CompositeExplicitAutograd, m) {
  m.impl("_soft_couple_aten_", &soft_couple_aten);
}

}  // namespace soft_couple
}  // namespace itconv_fast
