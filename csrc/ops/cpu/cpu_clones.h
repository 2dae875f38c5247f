// Function multiversioning for the CPU kernels' hot loops: compiled for AVX-512, AVX2 and the
// baseline ISA; the loader picks the widest clone the CPU supports. FMA stays off
// (-ffp-contract=off), so every clone rounds identically.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ITCONV_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ITCONV_CPU_CLONES
#endif

// Helpers of a cloned function must be inlined into it: an out-of-line helper is compiled once, for
// the baseline ISA, whichever clone calls it.
#if defined(__GNUC__)
#define ITCONV_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ITCONV_ALWAYS_INLINE inline
#endif
