// The checks of one kernel test case against one kernel set, shared by the hosted self-test
// (kernel_selftest.cpp, run under qemu for AArch64) and the bare one (kernel_selftest_bare.cpp,
// run in an x86 emulator for the sets this CPU lacks). Freestanding: no I/O and no allocation but
// the caller's scratch memory (scratch_bytes(case)); each failure goes to report().
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels.hpp"
#include "kernels_common.hpp"

namespace edgeai::selftest {

// A case as tests/runtimes/kernel_cases.py writes it: n_rows rows of n weights of a ggml type, the
// activations x[n], and per row the float64 reference product and its tolerance.
struct Case {
    uint32_t type, n_rows, n, bytes;
    const uint8_t *rows;
    const float *x;
    const double *expected, *tol;
};

enum Kernel : uint32_t { DOT, GEMM, DOT_Q8_0_F32, AXPY_Q8_0, GEMM_PACKED, UNPACK_ROW, DOT_Q4_0_F32, AXPY_Q4_0 };
inline const char *kernel_name(uint32_t k) {
    const char *names[] = {"dot", "gemm", "dot_q8_0_f32", "axpy_q8_0", "gemm_packed", "unpack_row", "dot_q4_0_f32", "axpy_q4_0"};
    const char *vs_scalar[] = {"dot vs scalar", "gemm vs scalar", "?", "?", "gemm_packed vs scalar", "?", "?", "?"};
    const uint32_t i = k & 0xff;
    return i > AXPY_Q4_0 ? "?" : (k & 0x100) ? vs_scalar[i] : names[i];
}
// The KV-cache kernels (float query or output): held to the float64 reference only.
inline bool kv_kernel(uint32_t k) { return k == DOT_Q8_0_F32 || k == AXPY_Q8_0 || k == DOT_Q4_0_F32 || k == AXPY_Q4_0; }

struct Failure {
    uint32_t kernel, type, n, row;
    double got, expected, tol;
};

// Parses the case at p (the layout of kernel_cases.write_cases, p 8-byte aligned); returns the
// byte after it.
inline const uint8_t *read_case(const uint8_t *p, Case &c) {
    uint32_t hdr[4];
    std::memcpy(hdr, p, sizeof hdr);
    c = {hdr[0], hdr[1], hdr[2], hdr[3], p + 16, nullptr, nullptr, nullptr};
    p += 16 + ((c.bytes + 7) & ~uint32_t(7));  // rows padded to 8 bytes: the floats after are aligned
    c.x = reinterpret_cast<const float *>(p);
    p += 4 * size_t(c.n);  // n is a multiple of 32
    c.expected = reinterpret_cast<const double *>(p);
    p += 8 * size_t(c.n_rows);
    c.tol = reinterpret_cast<const double *>(p);
    return p + 8 * size_t(c.n_rows);
}

inline size_t align64(size_t v) { return (v + 63) & ~size_t(63); }

// Tokens of the prefill checks: token t is factor[t] * x. Powers of two keep the int8 blocks of
// quantize_act exact (the same codes, sign-flipped, with the scale times |factor|), so token t's
// products are exactly factor[t] times token 0's, and the reference is the same up to the factor.
constexpr int kTokens = 9;
constexpr float kFactor[kTokens] = {1.0f, -0.5f, 2.0f, -0.25f, 0.5f, -1.0f, 4.0f, -2.0f, 0.125f};
constexpr int kPackedRows = 16;  // two 8-row groups

// Scratch for check(): the tokens' activations (float, and int8 blocks), outputs, the scalar
// reference per (token, row), and a 16-row matrix with its packed copy.
inline size_t scratch_bytes(const Case &c) {
    const size_t row_bytes = c.bytes / c.n_rows, rows = c.n_rows > kPackedRows ? c.n_rows : kPackedRows;
    return align64(kTokens * 4 * size_t(c.n)) + align64(kTokens * sizeof(kern::BlockQ8A) * (c.n / 32 + 1)) +
           align64(4 * kTokens * rows) + align64(2 * 8 * kTokens * size_t(c.n_rows)) + align64(4 * size_t(c.n)) +
           2 * align64(kPackedRows * row_bytes) + align64(row_bytes) + 64;
}

// Failure.kernel | kVsScalar: a kernel's result against the scalar reference on the same int8
// activations (kernels_common.hpp dot_q_ref), a tolerance of float rounding only.
constexpr uint32_t kVsScalar = 0x100;

// Runs every kernel of `ops` that computes with the case's type against the float64 reference of
// the case: dot (decode); gemm (prefill) over 1, 2, 3 and 9 tokens (kFactor), which reaches the
// tiles' leftover rows and tokens; for Q8_0 and Q4_0 the KV-cache kernels (keys . float x, and
// x . (0 + 1 * row) through the values' axpy); and where the set packs the type at load time, the
// packed kernel over 16 rows (the case's rows repeated) and the unpacking of each row. For types
// with int8 activations every result is also held to the scalar reference on the same int8
// activations within float rounding (the float64 reference's tolerance must allow for the
// activations' rounding, which would hide small errors). Returns the number of checks;
// report(Failure) is called for each that fails; seen(kernel, result) for every result (so that
// sets can be compared with each other bit for bit).
template <class Report, class Seen>
int check(const kern::Ops &ops, const Case &c, uint8_t *scratch, Report report, Seen seen) {
    const int w = kern::wtype_of_ggml(c.type);
    if (w < 0) return 0;
    const size_t n = c.n, n_rows = c.n_rows, row_bytes = c.bytes / c.n_rows, nbq = n / 32 + 1;
    const bool q8 = kern::takes_q8(w);
    uint8_t *p = reinterpret_cast<uint8_t *>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
    auto take = [&p](size_t bytes) {
        uint8_t *at = p;
        p += align64(bytes);
        return at;
    };
    auto *x = reinterpret_cast<float *>(take(kTokens * 4 * n));                           // [token][n]
    auto *xq = reinterpret_cast<kern::BlockQ8A *>(take(kTokens * sizeof(kern::BlockQ8A) * nbq));  // [token][nbq]
    const size_t y_rows = n_rows > kPackedRows ? n_rows : kPackedRows;
    auto *y = reinterpret_cast<float *>(take(4 * kTokens * y_rows));  // [token][rows]
    auto *ref = reinterpret_cast<double *>(take(2 * 8 * kTokens * n_rows));  // [token][row], then magnitudes
    double *mag = ref + kTokens * n_rows;
    auto *v = reinterpret_cast<float *>(take(4 * n));
    uint8_t *rows16 = take(kPackedRows * row_bytes), *packed = take(kPackedRows * row_bytes), *row = take(row_bytes);

    for (int t = 0; t < kTokens; ++t)
        for (size_t i = 0; i < n; ++i) x[t * n + i] = kFactor[t] * c.x[i];
    const void *act = x;
    size_t stride = 4 * n;  // bytes from one token's activations to the next's
    if (q8) {
        for (int t = 0; t < kTokens; ++t) ops.quantize_act(x + t * n, xq + t * nbq, n);
        act = xq;
        stride = sizeof(kern::BlockQ8A) * nbq;
        for (int t = 0; t < kTokens; ++t)
            for (uint32_t r = 0; r < n_rows; ++r) {
                ref[t * n_rows + r] = kern::dot_q_ref(w, c.rows + r * row_bytes, xq + t * nbq, n);
                mag[t * n_rows + r] = kern::dot_q_ref(w, c.rows + r * row_bytes, xq + t * nbq, n, true);
            }
    }
    const auto *act_bytes = static_cast<const uint8_t *>(act);

    int checks = 0;
    // token t's product with row r
    auto expect = [&](uint32_t kernel, uint32_t r, double got, int t = 0) {
        ++checks;
        seen(kernel, got);
        const double f = kFactor[t], e = f * c.expected[r], tol = (f < 0 ? -f : f) * c.tol[r];
        if (!(got - e <= tol && e - got <= tol))  // NaN fails too
            report(Failure{kernel, c.type, c.n, r, got, e, tol});
        if (q8 && !kv_kernel(kernel)) {
            const double e2 = ref[t * n_rows + r], tol2 = 1e-5 * mag[t * n_rows + r] + 1e-6;
            if (!(got - e2 <= tol2 && e2 - got <= tol2)) report(Failure{kernel | kVsScalar, c.type, c.n, r, got, e2, tol2});
        }
    };
    for (uint32_t r = 0; r < n_rows; ++r)
        for (int t = 0; t < kTokens; ++t) expect(DOT, r, ops.dot[w](c.rows + r * row_bytes, act_bytes + t * stride, n), t);
    for (int T : {1, 2, 3, kTokens}) {
        ops.gemm[w]({c.rows, row_bytes, int(n_rows), act_bytes, stride, T, y, n_rows, n});
        for (int t = 0; t < T; ++t)
            for (uint32_t r = 0; r < n_rows; ++r) expect(GEMM, r, y[t * n_rows + r], t);
    }
    if (w == kern::W_Q8_0 || w == kern::W_Q4_0) {
        const bool q4 = w == kern::W_Q4_0;
        for (uint32_t r = 0; r < n_rows; ++r) {
            for (size_t i = 0; i < n; ++i) v[i] = 0.0f;
            (q4 ? ops.axpy_q4_0 : ops.axpy_q8_0)(1.0f, c.rows + r * row_bytes, v, n);
            double through_v = 0;
            for (size_t i = 0; i < n; ++i) through_v += double(v[i]) * x[i];
            expect(q4 ? DOT_Q4_0_F32 : DOT_Q8_0_F32, r, (q4 ? ops.dot_q4_0_f32 : ops.dot_q8_0_f32)(c.rows + r * row_bytes, x, n));
            expect(q4 ? AXPY_Q4_0 : AXPY_Q8_0, r, through_v);
        }
    }
    if (ops.pack[w] && ops.gemm_packed[w]) {
        for (int r = 0; r < kPackedRows; ++r) std::memcpy(rows16 + r * row_bytes, c.rows + (r % n_rows) * row_bytes, row_bytes);
        ops.pack[w](rows16, row_bytes, kPackedRows, n, packed);
        for (int T : {1, 2, 3, kTokens}) {
            ops.gemm_packed[w]({packed, row_bytes, kPackedRows, act_bytes, stride, T, y, kPackedRows, n});
            for (int t = 0; t < T; ++t)
                for (uint32_t r = 0; r < kPackedRows; ++r) expect(GEMM_PACKED, r % n_rows, y[t * kPackedRows + r], t);
        }
        if (ops.unpack_row[w])
            for (uint32_t r = 0; r < kPackedRows; ++r) {
                ops.unpack_row[w](packed, row_bytes, n, r, row);
                ++checks;
                if (std::memcmp(row, rows16 + r * row_bytes, row_bytes) != 0)
                    report(Failure{UNPACK_ROW, c.type, c.n, r, 0.0, 0.0, 0.0});
            }
    }
    return checks;
}

}  // namespace edgeai::selftest
