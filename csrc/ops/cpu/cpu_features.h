// What the CPU kernels tune to, read from the machine at run time rather than assumed: the L1 data
// cache's geometry (the coupling kernel's set-crowding check), the instruction set whose vector clones
// run, and how many members the coupling kernel's register path can hold with that instruction set.
// `itconv-fast info` prints all of it (torch.ops.itconv_fast._cpu_info).
//
// Overrides, for the benchmarks' A/B measurements only (benchmarks/NOTES.md):
//   ITCONV_FAST_L1="bytes,ways"      another L1 geometry (64-byte lines);
//   ITCONV_FAST_CPU_ISA=default|avx2|avx512f   a narrower clone than the CPU's widest (refused: wider);
//   ITCONV_FAST_CPU_WIDEST=default|avx2|avx512f   treat the CPU as one whose widest clone is this (narrows only:
//                                    an AVX-512 machine then takes the branches of one without it, for the tests);
//   ITCONV_FAST_REGISTER_LIMIT=N     another register-path limit (0 turns the path off).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#include "cpu_clones.h"

namespace itconv_fast {
namespace cpu {

struct L1Cache {
  int64_t bytes = 32 * 1024, ways = 8, line = 64;
  std::string source = "default (32 KiB, 8-way, 64-byte lines)";
  int64_t sets() const { return std::max<int64_t>(1, bytes / (ways * line)); }
};

namespace detail {

inline int64_t read_sysfs_int(const std::string& path) {
  std::ifstream f(path);
  std::string text;
  if (!(f >> text) || text.empty()) return 0;
  int64_t scale = 1;
  if (text.back() == 'K') scale = 1024, text.pop_back();
  else if (text.back() == 'M') scale = 1024 * 1024, text.pop_back();
  try {
    return std::stoll(text) * scale;
  } catch (...) {
    return 0;
  }
}

inline L1Cache detect_l1() {
  L1Cache c;
  if (const char* forced = std::getenv("ITCONV_FAST_L1")) {
    long long bytes = 0, ways = 0;
    if (std::sscanf(forced, "%lld,%lld", &bytes, &ways) == 2 && bytes > 0 && ways > 0) {
      c.bytes = bytes, c.ways = ways, c.line = 64;
      c.source = "ITCONV_FAST_L1";
      return c;
    }
  }
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL1_DCACHE_ASSOC) && defined(_SC_LEVEL1_DCACHE_LINESIZE)
  const long bytes = sysconf(_SC_LEVEL1_DCACHE_SIZE), ways = sysconf(_SC_LEVEL1_DCACHE_ASSOC),
             line = sysconf(_SC_LEVEL1_DCACHE_LINESIZE);
  if (bytes > 0 && ways > 0 && line > 0) {
    c.bytes = bytes, c.ways = ways, c.line = line;
    c.source = "sysconf";
    return c;
  }
#endif
  for (int index = 0; index < 8; ++index) {  // the level-1 data (or unified) cache of cpu0
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream type_file(dir + "type");
    std::string type;
    if (!(type_file >> type)) break;
    if (read_sysfs_int(dir + "level") != 1 || type == "Instruction") continue;
    const int64_t bytes = read_sysfs_int(dir + "size"), ways = read_sysfs_int(dir + "ways_of_associativity"),
                  line = read_sysfs_int(dir + "coherency_line_size");
    if (bytes > 0 && ways > 0 && line > 0) {
      c.bytes = bytes, c.ways = ways, c.line = line;
      c.source = "sysfs";
    }
    break;
  }
  return c;
}

}  // namespace detail

inline const L1Cache& l1_cache() {
  static const L1Cache cache = detail::detect_l1();
  return cache;
}

enum class Isa { Default = 0, Avx2 = 1, Avx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512f";
    case Isa::Avx2: return "avx2";
    default: return "default";
  }
}

inline Isa detected_isa() {
#if ITCONV_HAVE_CPU_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::Avx512;
  if (__builtin_cpu_supports("avx2")) return Isa::Avx2;
#endif
  return Isa::Default;
}

// The widest clone this CPU runs, or a narrower one that ITCONV_FAST_CPU_WIDEST names (never a wider one).
inline Isa widest_isa() {
  const Isa detected = detected_isa();
  if (const char* cap = std::getenv("ITCONV_FAST_CPU_WIDEST")) {
    const std::string name(cap);
    for (const Isa candidate : {Isa::Default, Isa::Avx2, Isa::Avx512}) {
      if (name == isa_name(candidate)) return std::min(candidate, detected);
    }
  }
  return detected;
}

// The clone the coupling kernel runs: the widest the CPU supports, or a narrower one asked for.
inline Isa selected_isa() {
  static const Isa isa = [] {
    const Isa widest = widest_isa();
    if (const char* forced = std::getenv("ITCONV_FAST_CPU_ISA")) {
      const std::string name(forced);
      for (const Isa candidate : {Isa::Default, Isa::Avx2, Isa::Avx512}) {
        if (name == isa_name(candidate) && static_cast<int>(candidate) <= static_cast<int>(widest)) return candidate;
      }
    }
    return widest;
  }();
  return isa;
}

// Members the uniform register path can hold: each takes one 64-byte vector of accumulators, i.e. one
// zmm (32 of them with AVX-512), two ymm (16 with AVX2) or four xmm (16), and the shared sum one more
// vector. AVX-512: 16, the kernel's largest case (17 of 32 zmm); AVX2: 7 (7 x 2 + 2 = 16 ymm); SSE: 3.
inline int register_limit() {
  static const int limit = [] {
    if (const char* forced = std::getenv("ITCONV_FAST_REGISTER_LIMIT")) {
      const int n = std::atoi(forced);
      if (n >= 0) return std::min(n, 16);
    }
    switch (selected_isa()) {
      case Isa::Avx512: return 16;
      case Isa::Avx2: return 7;
      default: return 3;
    }
  }();
  return limit;
}

inline std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

// key=value;... for torch.ops.itconv_fast._cpu_info.
inline std::string describe() {
  const L1Cache& c = l1_cache();
  std::string s = "l1d_bytes=" + std::to_string(c.bytes) + ";l1d_ways=" + std::to_string(c.ways) +
                  ";l1d_line=" + std::to_string(c.line) + ";l1d_sets=" + std::to_string(c.sets()) +
                  ";l1d_source=" + c.source + ";isa=" + isa_name(selected_isa()) + ";widest_isa=" +
                  isa_name(widest_isa()) + ";detected_isa=" + isa_name(detected_isa()) +
                  ";register_limit=" + std::to_string(register_limit());
  s += std::string(";vector_clones=") + (ITCONV_HAVE_CPU_CLONES ? "avx512f,avx2,default" : "none (not x86-64 GCC/clang)");
  return s + ";compiler=" + compiler();
}

}  // namespace cpu
}  // namespace itconv_fast
