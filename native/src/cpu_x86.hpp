// x86 CPU features for the choice of kernel set (kernels.cpp). Freestanding (the emulated self-test,
// native/tests/kernel_selftest_bare.cpp, checks it on CPU models this machine is not).
#pragma once
#include <cpuid.h>

#include <cstdint>

namespace edgeai::kern {

// What the x86 sets need, from CPUID and XCR0 directly: compilers differ in which names
// __builtin_cpu_supports knows (clang before 18 rejects "f16c" and "avxvnni"). A set also needs
// the OS to save its registers (XCR0: YMM for AVX, opmask and ZMM for AVX-512).
struct X86Features {
    bool avx2 = false, avx512 = false, avx_vnni = false, avx512_vnni = false;
};

static inline X86Features x86_features() {
    X86Features f;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return f;
    uint32_t xcr0, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0), "=d"(xcr0_hi) : "c"(0));
    const bool ymm_saved = (xcr0 & 0x6) == 0x6;
#if defined(__APPLE__)
    // macOS turns the AVX-512 state on in XCR0 only when a thread first uses it (the first
    // instruction traps and the kernel enables it), so XCR0 cannot tell here: the OS saves it.
    const bool zmm_saved = ymm_saved;
#else
    const bool zmm_saved = (xcr0 & 0xE6) == 0xE6;
#endif
    unsigned max_sub = 0;
    if (!__get_cpuid_count(7, 0, &max_sub, &b, &c, &d)) return f;
    const bool avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1,
               avx512vl = (b >> 31) & 1, avx512vnni = (c >> 11) & 1;
    unsigned a1 = 0;
    if (max_sub >= 1) __get_cpuid_count(7, 1, &a1, &b, &c, &d);
    const bool avxvnni = (a1 >> 4) & 1;
    f.avx2 = ymm_saved && avx2 && fma && f16c;
    f.avx512 = f.avx2 && zmm_saved && avx512f && avx512bw && avx512vl && avx512dq;
    f.avx_vnni = f.avx2 && avxvnni;
    f.avx512_vnni = f.avx512 && avx512vnni;
    return f;
}

}  // namespace edgeai::kern
