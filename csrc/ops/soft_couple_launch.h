// Host-side launch tables of the CUDA soft_couple_ kernel, in plain C++ so that the CPU tests can build
// and walk them exactly as the kernel's blocks and threads do (itconv_fast::_soft_couple_launch_plan).
//
// One launch's table, packed into one int64 buffer: group descriptors | (group, chunk begin) items |
// member pointers | mixing coefficients (doubles, bit-copied). Block b of a launch handles item b:
// thread x of it the elements begin + x + k * kThreads, k = 0 .. kPerThread - 1, that are < numel.
// Offsets are int64 throughout (a member may hold more than 2^31 elements). A call whose chunks exceed
// what one grid can hold (max_items) is split into several launches; a group may straddle two, each
// launch then carrying its own descriptor of it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "soft_couple.h"

namespace itconv_fast {
namespace soft_couple {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kChunk = int64_t{kThreads} * kPerThread;
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;  // gridDim.x limit

// The staging bucket (kMaxN of soft_couple_kernel) for a launch whose largest non-uniform group has n
// members (0: none).
inline int staging_bucket(int64_t n) {
  if (n == 0) return 0;
  if (n <= 16) return 16;
  return 64;
}

// Group descriptor fields (int64 each).
constexpr int kPtrOffset = 0, kCount = 1, kNumel = 2, kCoeffOffset = 3, kUniform = 4, kFields = 5;

// What the table needs of a group: its members' addresses (as integers), size and coefficients.
struct GroupSpec {
  std::vector<int64_t> pointers;
  int64_t numel = 0;
  const Coefficients* coeffs = nullptr;
};

struct LaunchTable {
  std::vector<int64_t> descs, items, ptrs;
  std::vector<double> coeffs;
  int64_t n_groups = 0;
  int64_t n_items() const { return static_cast<int64_t>(items.size()) / 2; }

  // The packed buffer (descs | items | ptrs | coeffs) and the offsets of its four parts.
  std::vector<int64_t> packed() const {
    std::vector<int64_t> out(descs.size() + items.size() + ptrs.size() + coeffs.size());
    int64_t* h = out.data();
    std::memcpy(h, descs.data(), descs.size() * sizeof(int64_t));
    std::memcpy(h + descs.size(), items.data(), items.size() * sizeof(int64_t));
    std::memcpy(h + descs.size() + items.size(), ptrs.data(), ptrs.size() * sizeof(int64_t));
    std::memcpy(h + descs.size() + items.size() + ptrs.size(), coeffs.data(), coeffs.size() * sizeof(double));
    return out;
  }
  int64_t items_offset() const { return static_cast<int64_t>(descs.size()); }
  int64_t ptrs_offset() const { return items_offset() + static_cast<int64_t>(items.size()); }
  int64_t coeffs_offset() const { return ptrs_offset() + static_cast<int64_t>(ptrs.size()); }

  // Adds group g's descriptor to this launch and returns its index here.
  int64_t add_group(const GroupSpec& g) {
    const int64_t coeff_offset = static_cast<int64_t>(coeffs.size());
    if (g.coeffs->uniform) {
      coeffs.push_back(g.coeffs->a);
      coeffs.push_back(g.coeffs->b);
    } else {
      coeffs.insert(coeffs.end(), g.coeffs->matrix.begin(), g.coeffs->matrix.end());
    }
    descs.insert(descs.end(), {static_cast<int64_t>(ptrs.size()), static_cast<int64_t>(g.pointers.size()), g.numel,
                               coeff_offset, g.coeffs->uniform ? 1 : 0});
    ptrs.insert(ptrs.end(), g.pointers.begin(), g.pointers.end());
    return n_groups++;
  }
};

// The launches that couple `groups` (all of one dtype), at most max_items blocks each.
inline std::vector<LaunchTable> plan_launches(const std::vector<GroupSpec>& groups, int64_t max_items = kMaxGridX) {
  TORCH_CHECK_VALUE(max_items >= 1 && max_items <= kMaxGridX, "soft_couple_: max_items must be in [1, 2^31 - 1], got ",
                    max_items);
  std::vector<LaunchTable> launches;
  for (const auto& group : groups) {
    int64_t local = -1;  // the group's index in the current launch, -1 until added there
    for (int64_t begin = 0; begin < group.numel; begin += kChunk) {
      if (launches.empty() || launches.back().n_items() == max_items) {
        launches.emplace_back();
        local = -1;
      }
      LaunchTable& launch = launches.back();
      if (local < 0) local = launch.add_group(group);
      launch.items.insert(launch.items.end(), {local, begin});
    }
  }
  return launches;
}

// Plans every launch of one call: per dtype present (float, double, half, bfloat16), the groups' tables
// and their staging bucket; launch(dtype, table, bucket) issues each. The CUDA launcher and the CPU
// emulation of the device code (csrc/emulation) both go through here, so the tests walk the real plan.
template <typename Launch>
void for_each_launch(const std::vector<DenseGroup>& groups, int64_t max_items, Launch&& launch) {
  for (const auto& group : groups) {
    TORCH_CHECK_VALUE(group.coeffs.uniform || group.members.size() <= 64,
                      "soft_couple_ (CUDA): non-uniform kernels support at most 64 coupled blocks, got ",
                      group.members.size());
  }
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<GroupSpec> specs;
    int64_t largest_general = 0;
    for (const auto& group : groups) {
      if (group.members[0].scalar_type() != dtype) continue;
      if (!group.coeffs.uniform) largest_general = std::max(largest_general, static_cast<int64_t>(group.members.size()));
      GroupSpec spec;
      spec.numel = group.numel;
      spec.coeffs = &group.coeffs;
      for (const auto& t : group.members) spec.pointers.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
      specs.push_back(std::move(spec));
    }
    const int bucket = staging_bucket(largest_general);
    for (const auto& table : plan_launches(specs, max_items)) launch(dtype, table, bucket);
  }
}

}  // namespace soft_couple
}  // namespace itconv_fast
