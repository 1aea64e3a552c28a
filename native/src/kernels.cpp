// Run-time choice of the kernel set: the best one this CPU can run, unless EDGEAI_ISA names one.
#include <cstdlib>
#include <stdexcept>

#include "gguf.hpp"
#include "kernels.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include "cpu_x86.hpp"
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1 << 13)
#endif
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace edgeai::kern {

namespace {

bool cpu_has(const std::string &isa) {
    if (isa == "scalar") return true;
#if defined(__x86_64__) || defined(__i386__)
    const X86Features f = x86_features();
    if (isa == "avx2") return f.avx2;
    if (isa == "avx512") return f.avx512;
    if (isa == "avx-vnni") return f.avx_vnni;
    if (isa == "avx512-vnni") return f.avx512_vnni;
#endif
#if defined(__aarch64__)
    if (isa == "neon") return true;  // baseline on every AArch64 CPU
    if (isa == "neon-dotprod" || isa == "neon-i8mm") {
        const bool i8mm = isa == "neon-i8mm";  // the i8mm set uses SDOT too
#if defined(__linux__)
        return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0 && (!i8mm || (getauxval(AT_HWCAP2) & HWCAP2_I8MM) != 0);
#elif defined(__APPLE__)
        auto has = [](const char *name) {
            int v = 0;
            size_t len = sizeof(v);
            return sysctlbyname(name, &v, &len, nullptr, 0) == 0 && v != 0;
        };
        return has("hw.optional.arm.FEAT_DotProd") && (!i8mm || has("hw.optional.arm.FEAT_I8MM"));
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
#if defined(EDGEAI_HAVE_AVX512)
    if (isa == "avx512") return ops_avx512();
#endif
#if defined(EDGEAI_HAVE_AVX_VNNI)
    if (isa == "avx-vnni") return ops_avx_vnni();
#endif
#if defined(EDGEAI_HAVE_AVX512_VNNI)
    if (isa == "avx512-vnni") return ops_avx512_vnni();
#endif
#if defined(EDGEAI_HAVE_NEON)
    if (isa == "neon") return ops_neon();
#endif
#if defined(EDGEAI_HAVE_NEON_DOTPROD)
    if (isa == "neon-dotprod") return ops_neon_dotprod();
#endif
#if defined(EDGEAI_HAVE_NEON_I8MM)
    if (isa == "neon-i8mm") return ops_neon_i8mm();
#endif
    return nullptr;
}

// worst to best: byte dot products in one instruction (VNNI) count for more than wider registers
const char *const ORDER[] = {"scalar", "neon", "neon-dotprod", "neon-i8mm", "avx2", "avx512", "avx-vnni", "avx512-vnni"};

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
