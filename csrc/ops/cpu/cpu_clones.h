// Function multiversioning for the CPU kernels' hot loops: compiled for AVX-512, AVX2 and the
// baseline ISA. FMA stays off (-ffp-contract=off), so every clone rounds identically.
//
// ITCONV_CPU_CLONES: target_clones (the loader picks the widest clone the CPU supports); GCC, and clang
// from version 14. ITCONV_TARGET_AVX512 / ITCONV_TARGET_AVX2: single-ISA functions for kernels that pick
// their clone themselves (cpu_features.h: selected_isa), which GCC and clang both compile. Other
// compilers or architectures get the baseline code only, and `itconv-fast info` says so
// (vector_clones=none).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) && !defined(__clang__) || defined(__clang__) && __clang_major__ >= 14)
#define ITCONV_HAVE_CPU_CLONES 1
#define ITCONV_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define ITCONV_TARGET_AVX512 __attribute__((target("avx512f")))
#define ITCONV_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define ITCONV_HAVE_CPU_CLONES 0
#define ITCONV_CPU_CLONES
#define ITCONV_TARGET_AVX512
#define ITCONV_TARGET_AVX2
#endif

// Helpers of a cloned function must be inlined into it: an out-of-line helper is compiled once, for
// the baseline ISA, whichever clone calls it. The same holds for a lambda's body (ITCONV_LAMBDA_INLINE goes
// after its parameter list).
#if defined(__GNUC__)
#define ITCONV_ALWAYS_INLINE inline __attribute__((always_inline))
#define ITCONV_LAMBDA_INLINE __attribute__((always_inline))
#else
#define ITCONV_ALWAYS_INLINE inline
#define ITCONV_LAMBDA_INLINE
#endif
