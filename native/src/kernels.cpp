// Run-time choice of the kernel set: the best one this CPU can run, unless EDGEAI_ISA names one.
#include <cstdlib>
#include <stdexcept>

#include "gguf.hpp"
#include "kernels.hpp"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace edgeai::kern {

namespace {

bool cpu_has(const std::string &isa) {
    if (isa == "scalar") return true;
#if defined(__x86_64__) || defined(__i386__)
    if (isa == "avx2") {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
#endif
#if defined(__aarch64__)
    if (isa == "neon") return true;  // baseline on every AArch64 CPU
    if (isa == "neon-dotprod") {
#if defined(__linux__)
        return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
        int v = 0;
        size_t len = sizeof(v);
        return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, nullptr, 0) == 0 && v != 0;
#else
        return false;
#endif
    }
#endif
    return false;
}

const Ops *compiled(const std::string &isa) {
    if (isa == "scalar") return ops_scalar();
#if defined(EDGEAI_HAVE_AVX2)
    if (isa == "avx2") return ops_avx2();
#endif
#if defined(EDGEAI_HAVE_NEON)
    if (isa == "neon") return ops_neon();
#endif
#if defined(EDGEAI_HAVE_NEON_DOTPROD)
    if (isa == "neon-dotprod") return ops_neon_dotprod();
#endif
    return nullptr;
}

const char *const ORDER[] = {"scalar", "neon", "neon-dotprod", "avx2"};

const Ops &choose() {
    if (const char *env = std::getenv("EDGEAI_ISA"); env && *env) {
        if (const Ops *o = named(env)) return *o;
        throw std::runtime_error(std::string("EDGEAI_ISA=") + env + " is not available on this CPU/build");
    }
    const Ops *best_ops = ops_scalar();
    for (const char *isa : ORDER)
        if (const Ops *o = named(isa)) best_ops = o;
    return *best_ops;
}

}  // namespace

int wtype_of_ggml(uint32_t t) {
    switch (t) {
        case gguf::F32: return W_F32;
        case gguf::F16: return W_F16;
        case gguf::BF16: return W_BF16;
        case gguf::Q4_0: return W_Q4_0;
        case gguf::Q4_1: return W_Q4_1;
        case gguf::Q5_0: return W_Q5_0;
        case gguf::Q5_1: return W_Q5_1;
        case gguf::Q8_0: return W_Q8_0;
        case gguf::Q4_K: return W_Q4_K;
        case gguf::Q5_K: return W_Q5_K;
        case gguf::Q6_K: return W_Q6_K;
        default: return -1;
    }
}

const Ops *named(const std::string &isa) { return cpu_has(isa) ? compiled(isa) : nullptr; }

std::vector<std::string> available() {
    std::vector<std::string> out;
    for (const char *isa : ORDER)
        if (named(isa)) out.emplace_back(isa);
    return out;
}

const Ops &best() {
    static const Ops &chosen = choose();
    return chosen;
}

}  // namespace edgeai::kern
