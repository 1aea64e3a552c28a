// The checks of one kernel test case against one kernel set, shared by the hosted self-test
// (kernel_selftest.cpp, run under qemu for AArch64) and the bare one (kernel_selftest_bare.cpp,
// run in an x86 emulator for the sets this CPU lacks). Freestanding: no I/O and no allocation but
// the caller's scratch memory (scratch_bytes(case)); each failure goes to report().
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels.hpp"

namespace edgeai::selftest {

// A case as tests/runtimes/kernel_cases.py writes it: n_rows rows of n weights of a ggml type, the
// activations x[n], and per row the float64 reference product and its tolerance.
struct Case {
    uint32_t type, n_rows, n, bytes;
    const uint8_t *rows;
    const float *x;
    const double *expected, *tol;
};

enum Kernel : uint32_t { DOT, GEMM, DOT_Q8_0_F32, AXPY_Q8_0, GEMM_PACKED, UNPACK_ROW };
inline const char *kernel_name(uint32_t k) {
    const char *names[] = {"dot", "gemm", "dot_q8_0_f32", "axpy_q8_0", "gemm_packed", "unpack_row"};
    return k <= UNPACK_ROW ? names[k] : "?";
}

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

// Scratch for check(): two tokens' activations (float, and int8 blocks), outputs, and an 8-row
// matrix with its packed copy.
inline size_t scratch_bytes(const Case &c) {
    const size_t row_bytes = c.bytes / c.n_rows;
    return align64(2 * 4 * size_t(c.n)) + align64(2 * sizeof(kern::BlockQ8A) * (c.n / 32 + 1)) +
           align64(4 * 2 * size_t(c.n_rows + 8)) + align64(4 * size_t(c.n)) + 2 * align64(8 * row_bytes) +
           align64(row_bytes) + 64;
}

// Runs every kernel of `ops` that computes with the case's type against the reference: dot
// (decode), gemm over two tokens (prefill: x and -x/2, whose int8 blocks are exactly -1 times x's
// with half the scale, so the second token's products are exactly -1/2 of the first's), for Q8_0 the KV-cache kernels (keys . float x,
// and x . (0 + 1 * row) through the values' axpy), and where the set packs the type at load time,
// the packed kernel over 8 rows (the case's rows repeated) and the unpacking of each row. Returns
// the number of checks; report(Failure) is called for each that fails.
template <class Report> int check(const kern::Ops &ops, const Case &c, uint8_t *scratch, Report report) {
    const int w = kern::wtype_of_ggml(c.type);
    if (w < 0) return 0;
    const size_t n = c.n, n_rows = c.n_rows, row_bytes = c.bytes / c.n_rows;
    uint8_t *p = reinterpret_cast<uint8_t *>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
    float *x = reinterpret_cast<float *>(p);  // [2][n]: token 0, token 1
    p += align64(2 * 4 * n);
    auto *xq = reinterpret_cast<kern::BlockQ8A *>(p);  // [2][n/32 + 1]
    p += align64(2 * sizeof(kern::BlockQ8A) * (n / 32 + 1));
    float *y = reinterpret_cast<float *>(p);
    p += align64(4 * 2 * (n_rows + 8));
    float *v = reinterpret_cast<float *>(p);
    p += align64(4 * n);
    uint8_t *rows8 = p, *packed = p + align64(8 * row_bytes), *row = packed + align64(8 * row_bytes);
    std::memcpy(x, c.x, 4 * n);
    for (size_t i = 0; i < n; ++i) x[n + i] = -0.5f * x[i];

    int checks = 0;
    // token t's product with row r: expected[r] * (1, -1/2)[t]
    auto expect = [&](uint32_t kernel, uint32_t r, double got, int token = 0) {
        ++checks;
        const double e = token ? -0.5 * c.expected[r] : c.expected[r], tol = token ? 0.5 * c.tol[r] : c.tol[r];
        if (!(got - e <= tol && e - got <= tol))  // NaN fails too
            report(Failure{kernel, c.type, c.n, r, got, e, tol});
    };
    const void *act = x;
    size_t stride = 4 * n;  // bytes from token 0's activations to token 1's
    if (kern::takes_q8(w)) {
        ops.quantize_act(x, xq, n);
        ops.quantize_act(x + n, xq + n / 32 + 1, n);
        act = xq;
        stride = sizeof(kern::BlockQ8A) * (n / 32 + 1);
    }
    const auto *act_bytes = static_cast<const uint8_t *>(act);
    ops.gemm[w]({c.rows, row_bytes, int(n_rows), act_bytes, stride, 2, y, n_rows, n});
    for (uint32_t r = 0; r < n_rows; ++r) {
        expect(DOT, r, ops.dot[w](c.rows + r * row_bytes, act, n));
        expect(GEMM, r, y[r]);
        expect(GEMM, r, y[n_rows + r], 1);
    }
    if (w == kern::W_Q8_0)
        for (uint32_t r = 0; r < n_rows; ++r) {
            for (size_t i = 0; i < n; ++i) v[i] = 0.0f;
            ops.axpy_q8_0(1.0f, c.rows + r * row_bytes, v, n);
            double through_v = 0;
            for (size_t i = 0; i < n; ++i) through_v += double(v[i]) * x[i];
            expect(DOT_Q8_0_F32, r, ops.dot_q8_0_f32(c.rows + r * row_bytes, x, n));
            expect(AXPY_Q8_0, r, through_v);
        }
    if (ops.pack[w] && ops.gemm_packed[w]) {
        for (int r = 0; r < 8; ++r) std::memcpy(rows8 + r * row_bytes, c.rows + (r % n_rows) * row_bytes, row_bytes);
        ops.pack[w](rows8, row_bytes, 8, n, packed);
        for (int T = 1; T <= 2; ++T) {
            ops.gemm_packed[w]({packed, row_bytes, 8, act_bytes, stride, T, y, 8, n});
            for (int t = 0; t < T; ++t)
                for (uint32_t r = 0; r < 8; ++r) expect(GEMM_PACKED, r % n_rows, y[t * 8 + r], t);
        }
        if (ops.unpack_row[w])
            for (uint32_t r = 0; r < 8; ++r) {
                ops.unpack_row[w](packed, row_bytes, n, r, row);
                ++checks;
                if (std::memcmp(row, rows8 + r * row_bytes, row_bytes) != 0)
                    report(Failure{UNPACK_ROW, c.type, c.n, r, 0.0, 0.0, 0.0});
            }
    }
    return checks;
}

}  // namespace edgeai::selftest
