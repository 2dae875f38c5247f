// Host-side launch plan of the CUDA soft_couple_ kernel, in plain C++ so that the CPU tests can build and
// walk it (itconv_fast::_soft_couple_launch_plan) and run the real device code over it (csrc/emulation).
//
// One launch's table, packed into one int64 buffer: group descriptors | (group, chunk begin) items |
// member pointers | mixing coefficients (as the accumulation type: float, or double for double; converted
// once here, not on every use in the kernel). Block b of a launch handles item b: thread x of it the
// per_thread consecutive elements from begin + x * per_thread that are < numel (chunk = kThreads *
// per_thread). Offsets are int64 throughout (a member may hold more than 2^31 elements). A call whose chunks
// exceed what one grid can hold (max_items) is split into several launches; a group may straddle two, each
// launch then carrying its own descriptor of it.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "soft_couple.h"

namespace itconv_fast {
namespace soft_couple {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // the most elements per thread (one pack of them when aligned)
constexpr int64_t kChunk = int64_t{kThreads} * kPerThread;
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;  // gridDim.x limit
constexpr int64_t kMaxStaged = 64;  // larger non-uniform groups use a scratch copy (kModeScratch)
constexpr int kTile = 16;           // outputs per register tile of the scratch mode

// Group modes (see soft_couple_device.cuh).
constexpr int64_t kModeUniform = 0, kModeStaged = 1, kModeScratch = 2;

// The staging bucket (kMaxN of soft_couple_kernel) for a launch whose largest staged group has n
// members (0: none).
inline int staging_bucket(int64_t n) {
  if (n == 0) return 0;
  if (n <= 16) return 16;
  return 64;
}

// Group descriptor fields (int64 each).
constexpr int kPtrOffset = 0, kCount = 1, kNumel = 2, kCoeffOffset = 3, kMode = 4, kAligned = 5, kFields = 6;

// What the table needs of a group: its members' addresses (as integers), for the scratch mode the copy's
// addresses too, its size, coefficients, and whether every member is aligned to a pack of kPerThread.
struct GroupSpec {
  std::vector<int64_t> pointers;
  std::vector<int64_t> scratch;
  int64_t numel = 0;
  const Coefficients* coeffs = nullptr;
  bool aligned = false;
};

inline int64_t group_mode(const GroupSpec& g) {
  if (g.coeffs->uniform) return kModeUniform;
  return g.scratch.empty() ? kModeStaged : kModeScratch;
}

struct LaunchTable {
  std::vector<int64_t> descs, items, ptrs;
  std::vector<double> coeffs;  // converted to the accumulation type by packed()
  int64_t n_groups = 0;
  int64_t n_items() const { return static_cast<int64_t>(items.size()) / 2; }

  // int64 slots the coefficients take as float (two per slot) or double.
  int64_t coeff_slots(bool float_coeffs) const {
    const int64_t n = static_cast<int64_t>(coeffs.size());
    return float_coeffs ? (n + 1) / 2 : n;
  }

  // The packed buffer (descs | items | ptrs | coeffs as float or double).
  std::vector<int64_t> packed(bool float_coeffs) const {
    std::vector<int64_t> out(descs.size() + items.size() + ptrs.size() + coeff_slots(float_coeffs), 0);
    int64_t* h = out.data();
    std::memcpy(h, descs.data(), descs.size() * sizeof(int64_t));
    std::memcpy(h + descs.size(), items.data(), items.size() * sizeof(int64_t));
    std::memcpy(h + descs.size() + items.size(), ptrs.data(), ptrs.size() * sizeof(int64_t));
    int64_t* c = h + coeffs_offset();
    if (float_coeffs) {
      std::vector<float> f(coeffs.begin(), coeffs.end());  // rounded once, as the reference rounds them
      std::memcpy(c, f.data(), f.size() * sizeof(float));
    } else {
      std::memcpy(c, coeffs.data(), coeffs.size() * sizeof(double));
    }
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
                               coeff_offset, group_mode(g), g.aligned ? 1 : 0});
    ptrs.insert(ptrs.end(), g.pointers.begin(), g.pointers.end());
    ptrs.insert(ptrs.end(), g.scratch.begin(), g.scratch.end());  // inputs of the scratch mode
    return n_groups++;
  }
};

// The launches that couple `groups` (all of one dtype), at most max_items blocks each, per_thread elements
// per thread.
inline std::vector<LaunchTable> plan_launches(const std::vector<GroupSpec>& groups, int64_t max_items = kMaxGridX,
                                              int per_thread = kPerThread) {
  TORCH_CHECK_VALUE(max_items >= 1 && max_items <= kMaxGridX, "soft_couple_: max_items must be in [1, 2^31 - 1], got ",
                    max_items);
  TORCH_CHECK_VALUE(per_thread >= 1 && per_thread <= kPerThread, "soft_couple_: per_thread must be in [1, ",
                    kPerThread, "], got ", per_thread);
  const int64_t chunk = int64_t{kThreads} * per_thread;
  std::vector<LaunchTable> launches;
  for (const auto& group : groups) {
    int64_t local = -1;  // the group's index in the current launch, -1 until added there
    for (int64_t begin = 0; begin < group.numel; begin += chunk) {
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

// Elements per thread for a call: the most (kPerThread, whole packs) that still gives at least target_blocks
// blocks, else fewer. Small models are latency-bound: a ResNet-101-16's gradients make ~108 chunks of 1024
// elements, under one block per SM of an H100 (132); at one element per thread they make ~400.
inline int choose_per_thread(const std::vector<DenseGroup>& groups, int64_t target_blocks) {
  for (const int p : {kPerThread, 2}) {
    const int64_t chunk = int64_t{kThreads} * p;
    int64_t blocks = 0;
    for (const auto& g : groups) blocks += (g.numel + chunk - 1) / chunk;
    if (blocks >= target_blocks) return p;
  }
  return 1;
}

// Plans every launch of one call: per dtype present (float, double, half, bfloat16) and per family (uniform
// groups; non-uniform ones), the groups' tables and their staging bucket (0 for the uniform family);
// launch(dtype, table, bucket) issues each. Non-uniform groups of more than
// kMaxStaged members are first copied to a scratch buffer (kept alive here until every launch is issued;
// on the GPU the caching allocator orders its reuse after the kernels on the stream). The CUDA launcher and
// the CPU emulation of the device code (csrc/emulation) both go through here, so the tests run the real plan.
template <typename Launch>
void for_each_launch(const std::vector<DenseGroup>& groups, int64_t max_items, int per_thread, Launch&& launch) {
  std::vector<at::Tensor> scratch_buffers;
  // Uniform and non-uniform groups go to separate launches (kernels with and without the uniform code: a
  // call couples with one kernel, so this adds no launch in practice, and halves what nvcc compiles).
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) for (const bool uniform : {true, false}) {
    std::vector<GroupSpec> specs;
    int64_t largest_staged = 0;
    for (const auto& group : groups) {
      if (group.members[0].scalar_type() != dtype || group.coeffs.uniform != uniform) continue;
      GroupSpec spec;
      spec.numel = group.numel;
      spec.coeffs = &group.coeffs;
      const int64_t n = static_cast<int64_t>(group.members.size());
      const int64_t pack_bytes = kPerThread * static_cast<int64_t>(group.members[0].element_size());
      spec.aligned = true;
      for (const auto& t : group.members) {
        const auto address = reinterpret_cast<int64_t>(t.data_ptr());
        spec.pointers.push_back(address);
        spec.aligned = spec.aligned && address % pack_bytes == 0;
      }
      if (!group.coeffs.uniform && n > kMaxStaged) {
        // [n, numel] in each member's memory order (dense members fill exactly numel elements from data_ptr),
        // inputs that nothing overwrites.
        at::Tensor copy = at::empty({n, group.numel}, group.members[0].options().memory_format(at::MemoryFormat::Contiguous));
        for (int64_t u = 0; u < n; ++u) copy[u].copy_(group.members[u].as_strided({group.numel}, {1}));
        scratch_buffers.push_back(copy);
        const auto base = reinterpret_cast<int64_t>(copy.data_ptr());
        for (int64_t u = 0; u < n; ++u) spec.scratch.push_back(base + u * group.numel * group.members[0].element_size());
      } else if (!group.coeffs.uniform) {
        largest_staged = std::max(largest_staged, n);
      }
      specs.push_back(std::move(spec));
    }
    const int bucket = uniform ? 0 : std::max(16, staging_bucket(largest_staged));
    for (const auto& table : plan_launches(specs, max_items, per_thread)) launch(dtype, table, bucket);
  }
}

}  // namespace soft_couple
}  // namespace itconv_fast
