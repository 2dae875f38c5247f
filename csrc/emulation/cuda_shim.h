// A small emulation of the CUDA built-ins our __global__ bodies use, so that the CPU tests can execute
// the real device code (csrc/ops/cuda/*_device.cuh) over the real launch tables.
//
// Model: one fiber (ucontext) per CUDA thread, all on one OS thread, scheduled deterministically. The
// lowest-numbered runnable thread runs until it reaches a barrier or returns; then the next one runs.
// Barriers are released when every thread that has not returned has reached them:
//   __syncthreads()                  every live thread of the block (threads that returned count as arrived,
//                                    as on Volta and later);
//   __shfl_down_sync(mask, v, d)     every live thread of the warp (full-warp masks only): the value is
//                                    posted, the warp meets, lane l reads lane l + d (its own when l + d >= 32),
//                                    and the warp meets again before anyone posts the next value.
// A barrier that can never be released (threads waiting at different barriers) throws "barrier deadlock".
// Blocks run one after another, so `__shared__` (a function-local static here) is one array per block.
//
// Running threads one at a time until their next barrier is the most adversarial legal schedule for a
// missing barrier: thread 0 runs ahead of every other warp, so it reads whatever they have not written yet.
// Memory errors are the tests' business: they surround every buffer with guard elements.
//
// Arithmetic: __fmul_rn / __fadd_rn are plain products and sums; build with -ffp-contract=off so that
// no fused multiply-add appears (the same flag the real kernels' bit-exactness rests on: nvcc --fmad=false).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

struct itconv_dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The built-in variables: plain globals (every fiber runs on the same OS thread; the scheduler sets
// threadIdx before it resumes a fiber).
inline itconv_dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() ::itconv_emulation::Block::current().syncthreads()
#define ITCONV_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::itconv_emulation::dynamic_smem().data())

inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fadd_rn(float x, float y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __dadd_rn(double x, double y) { return x + y; }
using std::max;
using std::sqrt;

namespace itconv_emulation {

// The threads of one block as fibers, and the barriers between them.
class Block {
 public:
  enum class State { Runnable, AtSync, AtWarpSync, Done };

  static Block& current() { return *current_block(); }

  // Runs body() once per thread of block `block_index` (blockDim.x threads), to completion.
  void run(unsigned block_index, unsigned n_threads, const std::function<void()>& body) {
    n_ = static_cast<int>(n_threads);
    body_ = &body;
    threads_.resize(n_);
    slots_.assign(n_, 0);
    for (int t = 0; t < n_; ++t) {
      Thread& th = threads_[t];
      th.stack.resize(kStackBytes);
      getcontext(&th.context);
      th.context.uc_stack.ss_sp = th.stack.data();
      th.context.uc_stack.ss_size = th.stack.size();
      th.context.uc_link = &scheduler_;
      makecontext(&th.context, &Block::entry, 0);
      th.state = State::Runnable;
    }
    blockIdx.x = block_index;
    Block* previous = current_block();
    current_block() = this;
    error_.clear();
    for (;;) {
      const int next = lowest_runnable();
      if (next < 0) {
        if (all_done()) break;
        if (!release_barriers()) {
          error_ = describe_deadlock();
          break;
        }
        continue;
      }
      running_ = next;
      threadIdx.x = static_cast<unsigned>(next);
      swapcontext(&scheduler_, &threads_[next].context);
      if (!error_.empty()) break;
    }
    current_block() = previous;
    if (!error_.empty()) throw std::runtime_error("emulated block " + std::to_string(block_index) + ": " + error_);
  }

  void syncthreads() { wait(State::AtSync); }

  template <typename T>
  T shfl_down(T value, unsigned delta) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
    const int me = running_;
    std::memcpy(&slots_[me], &value, sizeof(T));
    wait(State::AtWarpSync);  // everyone has posted
    const int lane = me % warpSize;
    const int source = lane + static_cast<int>(delta) < warpSize ? me + static_cast<int>(delta) : me;
    T out;
    std::memcpy(&out, &slots_[std::min(source, n_ - 1)], sizeof(T));
    wait(State::AtWarpSync);  // everyone has read
    return out;
  }

 private:
  static constexpr size_t kStackBytes = 64 * 1024;
  struct Thread {
    ucontext_t context;
    std::vector<char> stack;
    State state = State::Done;
  };

  static Block*& current_block() {
    static Block* block = nullptr;
    return block;
  }

  static void entry() {
    Block& b = current();
    try {
      (*b.body_)();
    } catch (const std::exception& e) {  // never unwind across fibers: report through the scheduler
      b.error_ = std::string("thread ") + std::to_string(b.running_) + " threw: " + e.what();
    }
    b.threads_[b.running_].state = State::Done;
    // returning resumes uc_link: the scheduler
  }

  void wait(State s) {
    threads_[running_].state = s;
    swapcontext(&threads_[running_].context, &scheduler_);
  }

  int lowest_runnable() const {
    for (int t = 0; t < n_; ++t) {
      if (threads_[t].state == State::Runnable) return t;
    }
    return -1;
  }

  bool all_done() const {
    return std::all_of(threads_.begin(), threads_.end(), [](const Thread& t) { return t.state == State::Done; });
  }

  // Releases every barrier whose participants have all arrived; false if none could be released.
  bool release_barriers() {
    bool released = false;
    for (int w = 0; w * warpSize < n_; ++w) {
      const int lo = w * warpSize, hi = std::min(n_, lo + warpSize);
      bool complete = true, any = false;
      for (int t = lo; t < hi; ++t) {
        const State s = threads_[t].state;
        if (s == State::AtWarpSync) any = true;
        else if (s != State::Done) complete = false;
      }
      if (any && complete) {
        for (int t = lo; t < hi; ++t) {
          if (threads_[t].state == State::AtWarpSync) threads_[t].state = State::Runnable;
        }
        released = true;
      }
    }
    if (released) return true;
    bool block_complete = true, any = false;
    for (const Thread& t : threads_) {
      if (t.state == State::AtSync) any = true;
      else if (t.state != State::Done) block_complete = false;
    }
    if (any && block_complete) {
      for (Thread& t : threads_) {
        if (t.state == State::AtSync) t.state = State::Runnable;
      }
      return true;
    }
    return false;
  }

  std::string describe_deadlock() const {
    int at_sync = 0, at_warp = 0, done = 0;
    for (const Thread& t : threads_) {
      at_sync += t.state == State::AtSync;
      at_warp += t.state == State::AtWarpSync;
      done += t.state == State::Done;
    }
    return "barrier deadlock: " + std::to_string(at_sync) + " threads at __syncthreads, " + std::to_string(at_warp) +
           " at a warp shuffle, " + std::to_string(done) + " returned";
  }

  int n_ = 0;
  int running_ = -1;
  const std::function<void()>* body_ = nullptr;
  std::vector<Thread> threads_;
  std::vector<uint64_t> slots_;
  ucontext_t scheduler_;
  std::string error_;
};

// The launch's dynamic shared memory (ITCONV_DYNAMIC_SMEM), refilled with a garbage pattern before every
// block, as a GPU's would hold whatever the previous block left.
inline std::vector<unsigned char>& dynamic_smem() {
  static std::vector<unsigned char> bytes;
  return bytes;
}

// kernel<<<grid, block, smem_bytes>>>(...) as emulate_launch(grid, block, smem_bytes, [&] { kernel(...); }):
// blocks in order.
inline void emulate_launch(unsigned grid, unsigned block, size_t smem_bytes, const std::function<void()>& body) {
  if (block == 0 || block > 1024) throw std::invalid_argument("emulate_launch: block size must be in [1, 1024]");
  if (smem_bytes > 227 * 1024) throw std::invalid_argument("emulate_launch: more dynamic shared memory than an H100 has");
  gridDim.x = grid;
  blockDim.x = block;
  Block runner;
  for (unsigned b = 0; b < grid; ++b) {
    dynamic_smem().assign(smem_bytes + 16, 0xA5);
    runner.run(b, block, body);
  }
}

}  // namespace itconv_emulation

template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  if (mask != 0xffffffffu) throw std::logic_error("emulated __shfl_down_sync supports full-warp masks only");
  return ::itconv_emulation::Block::current().shfl_down(value, delta);
}
