// Function multiversioning for the CPU kernels' hot loops: compiled for AVX2 and for the baseline ISA,
// the loader picks the clone the CPU supports. FMA stays off (-ffp-contract=off), so every clone
// rounds identically.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ITCONV_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ITCONV_CPU_CLONES
#endif
