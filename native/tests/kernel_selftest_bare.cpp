// The kernel self-test with no operating system, for an x86 emulator (tests/runtimes/x86emu.py):
// the x86 kernel sets this CPU lacks (AVX-512, AVX-VNNI) are checked in an emulated CPU that has
// them. Built without the C and C++ libraries (-nostdlib -static; not -ffreestanding, under which
// newer libstdc++ refuses the headers the kernels include) with one set, the one whose ops_*
// function EDGEAI_SET names. The emulator writes the cases file (kernel_cases.write_cases) into
// memory and calls edgeai_selftest; the results come back through memory.
#include <cpuid.h>

#include <cstddef>
#include <cstdint>
#include <new>

#include "cpu_x86.hpp"
#include "kernel_checks.hpp"

using namespace edgeai;

namespace edgeai::kern {
const Ops *EDGEAI_SET();
}

// What a freestanding program must supply: the memory functions the compiler calls, and the
// allocation of the per-call buffers of some kernels (a bump allocator over a static arena that
// edgeai_selftest resets per case).
namespace {
alignas(64) uint8_t g_arena[8 << 20];
size_t g_used = 0;
}  // namespace

extern "C" {
void *memcpy(void *d, const void *s, size_t n) {
    auto *dp = static_cast<volatile uint8_t *>(d);  // volatile: keep the compiler from calling memcpy here
    const auto *sp = static_cast<const uint8_t *>(s);
    for (size_t i = 0; i < n; ++i) dp[i] = sp[i];
    return d;
}
void *memmove(void *d, const void *s, size_t n) {
    auto *dp = static_cast<volatile uint8_t *>(d);
    const auto *sp = static_cast<const uint8_t *>(s);
    if (dp < sp)
        for (size_t i = 0; i < n; ++i) dp[i] = sp[i];
    else
        for (size_t i = n; i-- > 0;) dp[i] = sp[i];
    return d;
}
void *memset(void *d, int v, size_t n) {
    auto *dp = static_cast<volatile uint8_t *>(d);
    for (size_t i = 0; i < n; ++i) dp[i] = static_cast<uint8_t>(v);
    return d;
}
int memcmp(const void *a, const void *b, size_t n) {
    const auto *x = static_cast<const uint8_t *>(a), *y = static_cast<const uint8_t *>(b);
    for (size_t i = 0; i < n; ++i)
        if (x[i] != y[i]) return x[i] < y[i] ? -1 : 1;
    return 0;
}
}

static void *arena_alloc(size_t n, size_t align) {
    const size_t at = (g_used + align - 1) & ~(align - 1);
    if (at + n > sizeof g_arena) __builtin_trap();  // the emulator reports the #UD
    g_used = at + n;
    return g_arena + at;
}
void *operator new(size_t n) { return arena_alloc(n, 16); }
void *operator new[](size_t n) { return arena_alloc(n, 16); }
void *operator new(size_t n, std::align_val_t a) { return arena_alloc(n, static_cast<size_t>(a)); }
void *operator new[](size_t n, std::align_val_t a) { return arena_alloc(n, static_cast<size_t>(a)); }
void operator delete(void *) noexcept {}
void operator delete[](void *) noexcept {}
void operator delete(void *, size_t) noexcept {}
void operator delete[](void *, size_t) noexcept {}
void operator delete(void *, std::align_val_t) noexcept {}
void operator delete[](void *, std::align_val_t) noexcept {}
void operator delete(void *, size_t, std::align_val_t) noexcept {}
void operator delete[](void *, size_t, std::align_val_t) noexcept {}
namespace std {
void __throw_length_error(const char *) { __builtin_trap(); }
void __throw_bad_alloc() { __builtin_trap(); }
void __throw_bad_array_new_length() { __builtin_trap(); }
}  // namespace std

// Runs every case of the cases file at `cases` against the set; writes up to max_failures
// Failure records to `failures`, the number of checks (out[0]) and failures (out[1]), and in
// out[2..3] a 64-bit FNV-1a hash of the float bits of every result of the quantized kernels (sets
// whose integer sums and float steps agree hash alike).
extern "C" void edgeai_selftest(const uint8_t *cases, uint8_t *scratch, selftest::Failure *failures,
                                uint32_t max_failures, uint32_t *out) {
    const kern::Ops &ops = *kern::EDGEAI_SET();
    uint32_t count;
    memcpy(&count, cases, 4);
    const uint8_t *p = cases + 8;
    uint32_t checks = 0, failed = 0;
    uint64_t hash = 0xcbf29ce484222325ull;
    for (uint32_t i = 0; i < count; ++i) {
        selftest::Case c;
        p = selftest::read_case(p, c);
        g_used = 0;
        checks += selftest::check(
            ops, c, scratch,
            [&](const selftest::Failure &f) {
                if (failed < max_failures) failures[failed] = f;
                ++failed;
            },
            [&](uint32_t kernel, double got) {
                if (!kern::takes_q8(kern::wtype_of_ggml(c.type)) || kernel == selftest::AXPY_Q8_0 ||
                    kernel == selftest::AXPY_Q4_0)
                    return;
                const float v = static_cast<float>(got);
                uint32_t bits;
                memcpy(&bits, &v, 4);
                for (int i = 0; i < 4; ++i) hash = (hash ^ ((bits >> (8 * i)) & 0xff)) * 0x100000001b3ull;
            });
    }
    out[0] = checks;
    out[1] = failed;
    out[2] = static_cast<uint32_t>(hash);
    out[3] = static_cast<uint32_t>(hash >> 32);
}

// The kernel sets the engine would choose on this CPU (cpu_x86.hpp): out[0..3] = avx2, avx512,
// avx-vnni, avx512-vnni (1 or 0).
extern "C" void edgeai_x86_sets(uint32_t *out) {
    const kern::X86Features f = kern::x86_features();
    out[0] = f.avx2, out[1] = f.avx512, out[2] = f.avx_vnni, out[3] = f.avx512_vnni;
}

// What the emulated CPU is: out[0..2] = CPUID leaf 7 EBX, ECX, EDX; out[3] = leaf 7.1 EAX; out[4..15]
// = the brand string (leaves 0x80000002-4).
extern "C" void edgeai_cpuid(uint32_t *out) {
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    out[0] = b, out[1] = c, out[2] = d;
    __cpuid_count(7, 1, a, b, c, d);
    out[3] = a;
    for (unsigned leaf = 0; leaf < 3; ++leaf) {
        __cpuid(0x80000002 + leaf, a, b, c, d);
        out[4 + 4 * leaf] = a, out[5 + 4 * leaf] = b, out[6 + 4 * leaf] = c, out[7 + 4 * leaf] = d;
    }
}

// The emulator returns here: the call's return address points at this instruction (hlt).
extern "C" __attribute__((naked, noreturn)) void edgeai_selftest_return() { __asm__("hlt"); }
