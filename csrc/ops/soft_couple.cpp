// Schema of the fused soft gradient coupling (SPEC section 2).
//
//   g_t <- (1 - lam) g_t + lam * sum_u K[t, u] g_u      for the coupled blocks of every group
//
// `grads` holds the members of every group back to back; `group_sizes[i]` says how many belong to
// group i. One call couples every group: that is the point of the op.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(itconv_fast, m) {
  m.def(
      "soft_couple_(Tensor(a!)[] grads, int[] group_sizes, float lam, str kernel, "
      "float? bandwidth, int skip_first) -> ()");
}
