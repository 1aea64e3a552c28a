// Scalar pieces shared by every kernel set: f16/bf16 decoding, K-quant scale unpacking, and
// the reference (unvectorized) decoding of one 32-weight sub-block into integer codes.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels.hpp"
#include "quant.hpp"

namespace edgeai::kern {
// Internal linkage (each kernel set's object keeps its own copies): inline functions with external
// linkage would be weak symbols compiled with every set's flags, of which the linker keeps one.
namespace {

inline float f16(uint16_t h) { return fp16_to_fp32(h); }
inline float f16_at(const uint8_t *p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return f16(h);
}
inline float bf16(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Q4_K / Q5_K: 8 six-bit scales and mins packed in 12 bytes.
inline void k4_scales(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = static_cast<uint8_t>((s[j + 8] & 15) | ((s[j] >> 6) << 4));
        mn[j + 4] = static_cast<uint8_t>((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

// MXFP4 (ggml's block_mxfp4: E8M0 exponent byte e, then 16 bytes of 4-bit E2M1 codes, weight j in the
// low nibble of byte j, weight j+16 in its high nibble): the E2M1 values doubled, so they are
// integers (ggml's kvalues_mxfp4), and the scale halved to match: w = 2^(e-128) * E2M1_DOUBLED[code].
alignas(16) constexpr int8_t E2M1_DOUBLED[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
inline float e8m0_half(uint8_t e) {
    const uint32_t bits = e < 2 ? uint32_t(0x00200000) << e : uint32_t(e - 1) << 23;  // e 0, 1: subnormal
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

struct TypeLayout {
    int block;   // weights per block
    int bytes;   // bytes per block
};
constexpr TypeLayout LAYOUT[W_COUNT] = {
    {1, 4}, {1, 2}, {1, 2}, {32, 18}, {32, 20}, {32, 22}, {32, 24}, {32, 34}, {256, 144}, {256, 176}, {256, 210}, {32, 17},
};

// One 32-weight sub-block `sub` of a block as codes q[32] (int, signed for Q8_0 and MXFP4) with
// w = a[h]*q + b[h] on half h (values 0-15, 16-31).
inline void unpack_sub(int w, const uint8_t *blk, int sub, int q[32], float a[2], float b[2]) {
    switch (w) {
        case W_Q4_0: case W_Q5_0: case W_Q4_1: case W_Q5_1: {
            const bool five = (w == W_Q5_0 || w == W_Q5_1), affine = (w == W_Q4_1 || w == W_Q5_1);
            const float d = f16_at(blk), m = affine ? f16_at(blk + 2) : 0.0f;
            const int head = affine ? 4 : 2;
            uint32_t qh = 0;
            if (five) std::memcpy(&qh, blk + head, 4);
            const uint8_t *qs = blk + head + (five ? 4 : 0);
            for (int j = 0; j < 16; ++j) {
                q[j] = qs[j] & 15;
                q[j + 16] = qs[j] >> 4;
                if (five) {
                    q[j] |= static_cast<int>((qh >> j) & 1) << 4;
                    q[j + 16] |= static_cast<int>((qh >> (j + 16)) & 1) << 4;
                }
            }
            a[0] = a[1] = d;
            b[0] = b[1] = affine ? m : -d * (five ? 16.0f : 8.0f);
            return;
        }
        case W_Q8_0: {
            const int8_t *qs = reinterpret_cast<const int8_t *>(blk + 2);
            for (int j = 0; j < 32; ++j) q[j] = qs[j];
            a[0] = a[1] = f16_at(blk);
            b[0] = b[1] = 0.0f;
            return;
        }
        case W_Q4_K: case W_Q5_K: {
            const bool five = w == W_Q5_K;
            uint8_t sc[8], mn[8];
            k4_scales(blk + 4, sc, mn);
            const uint8_t *qh = blk + 16, *ql = five ? blk + 48 : blk + 16;
            const int c = sub / 2, shift = 4 * (sub % 2);
            for (int l = 0; l < 32; ++l) {
                q[l] = (ql[c * 32 + l] >> shift) & 15;
                if (five) q[l] |= ((qh[l] >> sub) & 1) << 4;
            }
            a[0] = a[1] = f16_at(blk) * sc[sub];
            b[0] = b[1] = -f16_at(blk + 2) * mn[sub];
            return;
        }
        case W_Q6_K: {
            const uint8_t *ql = blk, *qh = blk + 128;
            const int8_t *sc = reinterpret_cast<const int8_t *>(blk + 192);
            const float d = f16_at(blk + 208);
            const int h = sub / 4, s = (sub % 4) / 2;
            for (int pos = 0; pos < 32; ++pos) {
                const int bb = (sub % 2) * 32 + pos;
                q[pos] = ((ql[h * 64 + bb] >> (4 * s)) & 15) | (((qh[h * 32 + pos] >> (2 * (sub % 4))) & 3) << 4);
            }
            a[0] = d * sc[2 * sub];
            a[1] = d * sc[2 * sub + 1];
            b[0] = -32.0f * a[0];
            b[1] = -32.0f * a[1];
            return;
        }
        case W_MXFP4: {
            const uint8_t *qs = blk + 1;
            for (int j = 0; j < 16; ++j) {
                q[j] = E2M1_DOUBLED[qs[j] & 15];
                q[j + 16] = E2M1_DOUBLED[qs[j] >> 4];
            }
            a[0] = a[1] = e8m0_half(blk[0]);
            b[0] = b[1] = 0.0f;
            return;
        }
        default: return;
    }
}

// Reference activation quantizer (round half to even, as the SIMD versions' conversions do).
inline void quantize_act_ref(const float *x, BlockQ8A *y, size_t n) {
    for (size_t b = 0; b < n / QA; ++b, x += QA) {
        float amax = 0.0f;
        for (int j = 0; j < QA; ++j) amax = std::fmax(amax, std::fabs(x[j]));
        const float d = amax / 127.0f, id = d > 0.0f ? 127.0f / amax : 0.0f;
        int s0 = 0, s1 = 0;
        for (int j = 0; j < QA; ++j) {
            // clamped: a NaN or infinite activation (from weights that hold one) would make the
            // conversion undefined; finite codes are within +-127 already
            const int v = static_cast<int>(std::nearbyint(std::fmin(127.0f, std::fmax(-127.0f, x[j] * id))));
            y[b].qs[j] = static_cast<int8_t>(v);
            (j < 16 ? s0 : s1) += v;
        }
        y[b].d = d;
        y[b].hs[0] = d * static_cast<float>(s0);
        y[b].hs[1] = d * static_cast<float>(s1);
    }
}

// Reference quantized dot: per sub-block integer sums, then the float terms. With magnitude, the
// same sum of absolute values (the scale of its float rounding error, for tests).
inline float dot_q_ref(int w, const uint8_t *row, const BlockQ8A *x, size_t n, bool magnitude = false) {
    const TypeLayout L = LAYOUT[w];
    const int subs = L.block / 32;
    float acc = 0.0f;
    int q[32];
    float a[2], b[2];
    for (size_t blk = 0; blk < n / L.block; ++blk) {
        for (int s = 0; s < subs; ++s, ++x) {
            unpack_sub(w, row + blk * L.bytes, s, q, a, b);
            int i0 = 0, i1 = 0;
            for (int j = 0; j < 16; ++j) i0 += magnitude ? std::abs(q[j] * x->qs[j]) : q[j] * x->qs[j];
            for (int j = 16; j < 32; ++j) i1 += magnitude ? std::abs(q[j] * x->qs[j]) : q[j] * x->qs[j];
            if (magnitude)
                acc += std::fabs(a[0] * x->d) * static_cast<float>(i0) + std::fabs(a[1] * x->d) * static_cast<float>(i1) +
                       std::fabs(b[0] * x->hs[0]) + std::fabs(b[1] * x->hs[1]);
            else
                acc += a[0] * x->d * static_cast<float>(i0) + a[1] * x->d * static_cast<float>(i1) + b[0] * x->hs[0] +
                       b[1] * x->hs[1];
        }
    }
    return acc;
}

// The gemm of a type with no tiled kernel in a set: one dot per (row, token).
template <DotFn DOT> void gemm_by_dot(const Gemm &g) {
    for (int r = 0; r < g.n_rows; ++r)
        for (int t = 0; t < g.T; ++t) g.y[size_t(t) * g.ldy + r] = DOT(g.w + size_t(r) * g.row_bytes, g.x + size_t(t) * g.x_stride, g.n);
}

}  // namespace
}  // namespace edgeai::kern
