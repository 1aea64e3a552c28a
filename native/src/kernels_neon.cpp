// AArch64 NEON kernel set. Compiled three times: plain (baseline NEON, widening multiplies), with
// EDGEAI_DOTPROD under -march=armv8.2-a+dotprod (SDOT), and with EDGEAI_DOTPROD + EDGEAI_I8MM under
// -march=armv8.2-a+dotprod+i8mm (SMMLA: prefill of the 32-weight block types, 2 rows x 2 tokens per
// instruction); each is chosen when the CPU has it. Codes stay below 64 except Q8_0's, so every type
// multiplies as signed bytes.
#include <arm_neon.h>

#include "kernels_common.hpp"

namespace edgeai::kern {
namespace {

// sum over 16 lanes of q*x
inline int32_t dot16(int8x16_t q, int8x16_t x) {
#if defined(EDGEAI_DOTPROD)
    return vaddvq_s32(vdotq_s32(vdupq_n_s32(0), q, x));
#else
    const int16x8_t lo = vmull_s8(vget_low_s8(q), vget_low_s8(x));
    const int16x8_t hi = vmull_high_s8(q, x);
    return vaddvq_s32(vaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
#endif
}

// The 32 codes of a sub-block in two registers (weights 0-15, 16-31) against one BlockQ8A.
inline float sub_dot(int8x16_t q0, int8x16_t q1, const BlockQ8A *x, float a0, float a1, float b0, float b1) {
    const int32_t i0 = dot16(q0, vld1q_s8(x->qs)), i1 = dot16(q1, vld1q_s8(x->qs + 16));
    return a0 * x->d * static_cast<float>(i0) + a1 * x->d * static_cast<float>(i1) + b0 * x->hs[0] + b1 * x->hs[1];
}

// Bits 16*half .. 16*half+15 of the word at p -> 0x10 in bytes 0..15.
inline int8x16_t fifth_bits16(const uint8_t *p, int half) {
    static const uint8_t IDX[2][16] = {{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
                                       {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3}};
    static const uint8_t BIT[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    uint32_t bits;
    std::memcpy(&bits, p, 4);
    const uint8x16_t bytes = vqtbl1q_u8(vreinterpretq_u8_u32(vdupq_n_u32(bits)), vld1q_u8(IDX[half]));
    return vreinterpretq_s8_u8(vandq_u8(vtstq_u8(bytes, vld1q_u8(BIT)), vdupq_n_u8(0x10)));
}

// Bytes of one block of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0.
template <bool FIVE, bool AFFINE, bool Q8>
constexpr size_t kBlock32Bytes = Q8 ? 34 : (AFFINE ? 4 : 2) + (FIVE ? 4 : 0) + 16;

// One 32-weight block of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 as codes (c[0]: weights 0-15, c[1]: 16-31) with
// w = d*q + bias.
template <bool FIVE, bool AFFINE, bool Q8> inline void block_codes(const uint8_t *blk, int8x16_t c[2], float &d, float &bias) {
    d = f16_at(blk);
    if (Q8) {
        c[0] = vld1q_s8(reinterpret_cast<const int8_t *>(blk + 2));
        c[1] = vld1q_s8(reinterpret_cast<const int8_t *>(blk + 18));
        bias = 0.0f;
        return;
    }
    constexpr int HEAD = AFFINE ? 4 : 2;
    const uint8x16_t t = vld1q_u8(blk + HEAD + (FIVE ? 4 : 0));
    c[0] = vreinterpretq_s8_u8(vandq_u8(t, vdupq_n_u8(15)));
    c[1] = vreinterpretq_s8_u8(vshrq_n_u8(t, 4));
    if (FIVE) {
        c[0] = vorrq_s8(c[0], fifth_bits16(blk + HEAD, 0));
        c[1] = vorrq_s8(c[1], fifth_bits16(blk + HEAD, 1));
    }
    bias = AFFINE ? f16_at(blk + 2) : -d * (FIVE ? 16.0f : 8.0f);
}

// Decode of the 32-weight block types: per block, the codes against one BlockQ8A.
template <bool FIVE, bool AFFINE, bool Q8> float dot_block32(const uint8_t *row, const void *xv, size_t n) {
    constexpr size_t BYTES = kBlock32Bytes<FIVE, AFFINE, Q8>;
    const BlockQ8A *x = static_cast<const BlockQ8A *>(xv);
    float acc = 0.0f;
    for (size_t b = 0; b < n / 32; ++b, row += BYTES, ++x) {
        int8x16_t c[2];
        float d, bias;
        block_codes<FIVE, AFFINE, Q8>(row, c, d, bias);
        acc += sub_dot(c[0], c[1], x, d, d, bias, bias);
    }
    return acc;
}

// MXFP4: the 4-bit codes become their doubled E2M1 values (signed bytes) by one table lookup (TBL),
// then the integer dot as Q8_0's, times the block's scale 2^(e-128) and the activations' d.
float dot_mxfp4(const uint8_t *row, const void *xv, size_t n) {
    const BlockQ8A *x = static_cast<const BlockQ8A *>(xv);
    const int8x16_t table = vld1q_s8(E2M1_DOUBLED);
    float acc = 0.0f;
    for (size_t b = 0; b < n / 32; ++b, row += 17, ++x) {
        const uint8x16_t t = vld1q_u8(row + 1);
        const int8x16_t q0 = vqtbl1q_s8(table, vandq_u8(t, vdupq_n_u8(15))), q1 = vqtbl1q_s8(table, vshrq_n_u8(t, 4));
        const int32_t s = dot16(q0, vld1q_s8(x->qs)) + dot16(q1, vld1q_s8(x->qs + 16));
        acc += e8m0_half(row[0]) * x->d * static_cast<float>(s);
    }
    return acc;
}

#if defined(EDGEAI_I8MM)
// Prefill of the 32-weight block types by SMMLA: vmmlaq_s32(s, a, b), a = 8 codes of row r then 8
// of row r+1, b = 8 activations of token t then 8 of token t+1, adds the 2x2 integer products
// [r.t, r.t+1, r+1.t, r+1.t+1]; four per block. Rows or tokens left over go one dot at a time.
// The float steps differ from dot_block32's, so prefill and decode differ in the last bits here (as
// they do in llama.cpp); the integer sums are the same.
template <bool FIVE, bool AFFINE, bool Q8> void gemm_i8mm(const Gemm &g) {
    constexpr DotFn DOT = dot_block32<FIVE, AFFINE, Q8>;
    constexpr size_t BYTES = kBlock32Bytes<FIVE, AFFINE, Q8>;
    const size_t nb = g.n / 32;
    int r = 0;
    for (; r + 2 <= g.n_rows; r += 2) {
        const uint8_t *w0 = g.w + size_t(r) * g.row_bytes, *w1 = w0 + g.row_bytes;
        int t = 0;
        for (; t + 2 <= g.T; t += 2) {
            const BlockQ8A *x0 = reinterpret_cast<const BlockQ8A *>(g.x + size_t(t) * g.x_stride);
            const BlockQ8A *x1 = reinterpret_cast<const BlockQ8A *>(g.x + size_t(t + 1) * g.x_stride);
            float32x4_t acc = vdupq_n_f32(0.0f);
            for (size_t b = 0; b < nb; ++b) {
                int8x16_t c0[2], c1[2];
                float d0, d1, b0, b1;
                block_codes<FIVE, AFFINE, Q8>(w0 + b * BYTES, c0, d0, b0);
                block_codes<FIVE, AFFINE, Q8>(w1 + b * BYTES, c1, d1, b1);
                int32x4_t s = vdupq_n_s32(0);
                for (int h = 0; h < 2; ++h) {
                    s = vmmlaq_s32(s, vcombine_s8(vget_low_s8(c0[h]), vget_low_s8(c1[h])),
                                   vcombine_s8(vld1_s8(x0[b].qs + 16 * h), vld1_s8(x1[b].qs + 16 * h)));
                    s = vmmlaq_s32(s, vcombine_s8(vget_high_s8(c0[h]), vget_high_s8(c1[h])),
                                   vcombine_s8(vld1_s8(x0[b].qs + 16 * h + 8), vld1_s8(x1[b].qs + 16 * h + 8)));
                }
                const float dw[4] = {d0 * x0[b].d, d0 * x1[b].d, d1 * x0[b].d, d1 * x1[b].d};
                acc = vfmaq_f32(acc, vcvtq_f32_s32(s), vld1q_f32(dw));
                if (!Q8) {
                    const float xs0 = x0[b].hs[0] + x0[b].hs[1], xs1 = x1[b].hs[0] + x1[b].hs[1];
                    const float off[4] = {b0 * xs0, b0 * xs1, b1 * xs0, b1 * xs1};
                    acc = vaddq_f32(acc, vld1q_f32(off));
                }
            }
            float out[4];
            vst1q_f32(out, acc);
            g.y[size_t(t) * g.ldy + r] = out[0];
            g.y[size_t(t + 1) * g.ldy + r] = out[1];
            g.y[size_t(t) * g.ldy + r + 1] = out[2];
            g.y[size_t(t + 1) * g.ldy + r + 1] = out[3];
        }
        for (; t < g.T; ++t)
            for (int k = 0; k < 2; ++k)
                g.y[size_t(t) * g.ldy + r + k] = DOT(w0 + k * g.row_bytes, g.x + size_t(t) * g.x_stride, g.n);
    }
    for (; r < g.n_rows; ++r)
        for (int t = 0; t < g.T; ++t)
            g.y[size_t(t) * g.ldy + r] = DOT(g.w + size_t(r) * g.row_bytes, g.x + size_t(t) * g.x_stride, g.n);
}
#endif

template <bool FIVE> float dot_q45_k(const uint8_t *row, const void *xv, size_t n) {
    const BlockQ8A *x = static_cast<const BlockQ8A *>(xv);
    constexpr int BYTES = FIVE ? 176 : 144;
    float acc = 0.0f;
    for (size_t blk = 0; blk < n / 256; ++blk, row += BYTES) {
        const float d = f16_at(row), dmin = f16_at(row + 2);
        uint8_t sc[8], mn[8];
        k4_scales(row + 4, sc, mn);
        const uint8_t *ql = row + (FIVE ? 48 : 16);
        const uint8x16_t h0 = vld1q_u8(row + 16), h1 = vld1q_u8(row + 32);
        for (int s = 0; s < 8; ++s, ++x) {
            const int c = s / 2;
            uint8x16_t q0 = vld1q_u8(ql + 32 * c), q1 = vld1q_u8(ql + 32 * c + 16);
            if (s % 2) {
                q0 = vshrq_n_u8(q0, 4);
                q1 = vshrq_n_u8(q1, 4);
            } else {
                q0 = vandq_u8(q0, vdupq_n_u8(15));
                q1 = vandq_u8(q1, vdupq_n_u8(15));
            }
            if (FIVE) {
                const uint8x16_t bit = vdupq_n_u8(static_cast<uint8_t>(1 << s)), sixteen = vdupq_n_u8(0x10);
                q0 = vorrq_u8(q0, vandq_u8(vtstq_u8(h0, bit), sixteen));
                q1 = vorrq_u8(q1, vandq_u8(vtstq_u8(h1, bit), sixteen));
            }
            const float a = d * sc[s], b = -dmin * mn[s];
            acc += sub_dot(vreinterpretq_s8_u8(q0), vreinterpretq_s8_u8(q1), x, a, a, b, b);
        }
    }
    return acc;
}

float dot_q6_k(const uint8_t *row, const void *xv, size_t n) {
    const BlockQ8A *x = static_cast<const BlockQ8A *>(xv);
    float acc = 0.0f;
    for (size_t blk = 0; blk < n / 256; ++blk, row += 210) {
        const int8_t *sc = reinterpret_cast<const int8_t *>(row + 192);
        const float d = f16_at(row + 208);
        for (int g = 0; g < 8; ++g, ++x) {
            const int h = g / 4, k = g % 4;
            const uint8_t *ql = row + 64 * h + (k % 2) * 32, *qh = row + 128 + 32 * h;
            uint8x16_t l0 = vld1q_u8(ql), l1 = vld1q_u8(ql + 16);
            if (k >= 2) {
                l0 = vshrq_n_u8(l0, 4);
                l1 = vshrq_n_u8(l1, 4);
            } else {
                l0 = vandq_u8(l0, vdupq_n_u8(15));
                l1 = vandq_u8(l1, vdupq_n_u8(15));
            }
            const int8x16_t shift = vdupq_n_s8(static_cast<int8_t>(-2 * k));
            const uint8x16_t hb0 = vandq_u8(vshlq_u8(vld1q_u8(qh), shift), vdupq_n_u8(3));
            const uint8x16_t hb1 = vandq_u8(vshlq_u8(vld1q_u8(qh + 16), shift), vdupq_n_u8(3));
            const int8x16_t q0 = vreinterpretq_s8_u8(vorrq_u8(l0, vshlq_n_u8(hb0, 4)));
            const int8x16_t q1 = vreinterpretq_s8_u8(vorrq_u8(l1, vshlq_n_u8(hb1, 4)));
            const float a0 = d * sc[2 * g], a1 = d * sc[2 * g + 1];
            acc += sub_dot(q0, q1, x, a0, a1, -32.0f * a0, -32.0f * a1);
        }
    }
    return acc;
}

float dot_f32(const uint8_t *row, const void *xv, size_t n) {
    const float *w = reinterpret_cast<const float *>(row), *x = static_cast<const float *>(xv);
    float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 = vfmaq_f32(a0, vld1q_f32(w + i), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, vld1q_f32(w + i + 4), vld1q_f32(x + i + 4));
    }
    float acc = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; ++i) acc += w[i] * x[i];
    return acc;
}

float dot_f16v(const uint16_t *w, const float *x, size_t n) {
    float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(w + i));
        a0 = vfmaq_f32(a0, vcvt_f32_f16(vget_low_f16(h)), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, vcvt_high_f32_f16(h), vld1q_f32(x + i + 4));
    }
    float acc = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; ++i) acc += f16(w[i]) * x[i];
    return acc;
}

float dot_f16_row(const uint8_t *row, const void *x, size_t n) {
    return dot_f16v(reinterpret_cast<const uint16_t *>(row), static_cast<const float *>(x), n);
}

float dot_bf16(const uint8_t *row, const void *xv, size_t n) {
    const uint16_t *w = reinterpret_cast<const uint16_t *>(row);
    const float *x = static_cast<const float *>(xv);
    float32x4_t a0 = vdupq_n_f32(0);
    size_t i = 0;
    for (; i + 4 <= n; i += 4)
        a0 = vfmaq_f32(a0, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(w + i), 16)), vld1q_f32(x + i));
    float acc = vaddvq_f32(a0);
    for (; i < n; ++i) acc += bf16(w[i]) * x[i];
    return acc;
}

void axpy_f16v(float alpha, const uint16_t *v, float *y, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(v + i))), alpha));
    for (; i < n; ++i) y[i] += alpha * f16(v[i]);
}

float dot_q8_0_f32v(const uint8_t *k, const float *x, size_t n) {
    float32x4_t acc = vdupq_n_f32(0);
    for (size_t b = 0; b < n / 32; ++b, k += 34, x += 32) {
        uint16_t dh;
        std::memcpy(&dh, k, 2);
        float32x4_t s = vdupq_n_f32(0);
        for (int j = 0; j < 4; ++j) {
            const int16x8_t h = vmovl_s8(vld1_s8(reinterpret_cast<const int8_t *>(k + 2 + 8 * j)));
            s = vfmaq_f32(s, vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))), vld1q_f32(x + 8 * j));
            s = vfmaq_f32(s, vcvtq_f32_s32(vmovl_s16(vget_high_s16(h))), vld1q_f32(x + 8 * j + 4));
        }
        acc = vfmaq_n_f32(acc, s, f16(dh));
    }
    return vaddvq_f32(acc);
}

void axpy_q8_0v(float alpha, const uint8_t *v, float *y, size_t n) {
    for (size_t b = 0; b < n / 32; ++b, v += 34, y += 32) {
        uint16_t dh;
        std::memcpy(&dh, v, 2);
        const float a = alpha * f16(dh);
        const int8x16_t q0 = vld1q_s8(reinterpret_cast<const int8_t *>(v + 2)),
                        q1 = vld1q_s8(reinterpret_cast<const int8_t *>(v + 18));
        const int16x8_t h[4] = {vmovl_s8(vget_low_s8(q0)), vmovl_s8(vget_high_s8(q0)), vmovl_s8(vget_low_s8(q1)),
                                vmovl_s8(vget_high_s8(q1))};
        for (int k = 0; k < 4; ++k) {
            float *yk = y + 8 * k;
            vst1q_f32(yk, vfmaq_n_f32(vld1q_f32(yk), vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[k]))), a));
            vst1q_f32(yk + 4, vfmaq_n_f32(vld1q_f32(yk + 4), vcvtq_f32_s32(vmovl_s16(vget_high_s16(h[k]))), a));
        }
    }
}

// A Q4_0 block's 32 values as codes - 8 in 8 x 4 floats (value j: the low nibble of byte j, value
// j + 16 its high nibble).
inline void q4_0_codes(const uint8_t *blk, float32x4_t c[8]) {
    const uint8x16_t raw = vld1q_u8(blk + 2);
    const int8x16_t eight = vdupq_n_s8(8);
    const int8x16_t halves[2] = {vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(15))), eight),
                                 vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), eight)};
    for (int h = 0; h < 2; ++h) {
        const int16x8_t w[2] = {vmovl_s8(vget_low_s8(halves[h])), vmovl_s8(vget_high_s8(halves[h]))};
        for (int k = 0; k < 2; ++k) {
            c[4 * h + 2 * k] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(w[k])));
            c[4 * h + 2 * k + 1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(w[k])));
        }
    }
}

float dot_q4_0_f32v(const uint8_t *k, const float *x, size_t n) {
    float32x4_t acc = vdupq_n_f32(0);
    for (size_t b = 0; b < n / 32; ++b, k += 18, x += 32) {
        float32x4_t c[8];
        q4_0_codes(k, c);
        float32x4_t s = vmulq_f32(c[0], vld1q_f32(x));
        for (int j = 1; j < 8; ++j) s = vfmaq_f32(s, c[j], vld1q_f32(x + 4 * j));
        acc = vfmaq_n_f32(acc, s, f16_at(k));
    }
    return vaddvq_f32(acc);
}

void axpy_q4_0v(float alpha, const uint8_t *v, float *y, size_t n) {
    for (size_t b = 0; b < n / 32; ++b, v += 18, y += 32) {
        const float a = alpha * f16_at(v);
        float32x4_t c[8];
        q4_0_codes(v, c);
        for (int k = 0; k < 8; ++k) vst1q_f32(y + 4 * k, vfmaq_n_f32(vld1q_f32(y + 4 * k), c[k], a));
    }
}

void quantize_act(const float *x, BlockQ8A *y, size_t n) {
    for (size_t b = 0; b < n / QA; ++b, x += QA) {
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0);
        for (int k = 0; k < 8; ++k) {
            v[k] = vld1q_f32(x + 4 * k);
            m = vmaxq_f32(m, vabsq_f32(v[k]));
        }
        const float amax = vmaxvq_f32(m);
        const float d = amax / 127.0f, id = d > 0.0f ? 127.0f / amax : 0.0f;
        int32x4_t q[8];
        for (int k = 0; k < 8; ++k) q[k] = vcvtnq_s32_f32(vmulq_n_f32(v[k], id));
        for (int k = 0; k < 8; k += 2) {
            const int16x8_t s16 = vcombine_s16(vqmovn_s32(q[k]), vqmovn_s32(q[k + 1]));
            vst1_s8(y[b].qs + 4 * k, vqmovn_s16(s16));
        }
        const int32_t s0 = vaddvq_s32(vaddq_s32(vaddq_s32(q[0], q[1]), vaddq_s32(q[2], q[3])));
        const int32_t s1 = vaddvq_s32(vaddq_s32(vaddq_s32(q[4], q[5]), vaddq_s32(q[6], q[7])));
        y[b].d = d;
        y[b].hs[0] = d * static_cast<float>(s0);
        y[b].hs[1] = d * static_cast<float>(s1);
    }
}

const Ops OPS = {
#if defined(EDGEAI_I8MM)
    "neon-i8mm",
#elif defined(EDGEAI_DOTPROD)
    "neon-dotprod",
#else
    "neon",
#endif
    {dot_f32, dot_f16_row, dot_bf16, dot_block32<false, false, false>, dot_block32<false, true, false>,
     dot_block32<true, false, false>, dot_block32<true, true, false>, dot_block32<false, false, true>, dot_q45_k<false>,
     dot_q45_k<true>, dot_q6_k, dot_mxfp4},
#if defined(EDGEAI_I8MM)
    {gemm_by_dot<dot_f32>, gemm_by_dot<dot_f16_row>, gemm_by_dot<dot_bf16>,
     gemm_i8mm<false, false, false>, gemm_i8mm<false, true, false>,
     gemm_i8mm<true, false, false>, gemm_i8mm<true, true, false>,
     gemm_i8mm<false, false, true>, gemm_by_dot<dot_q45_k<false>>, gemm_by_dot<dot_q45_k<true>>,
     gemm_by_dot<dot_q6_k>, gemm_by_dot<dot_mxfp4>},
#else
    {gemm_by_dot<dot_f32>, gemm_by_dot<dot_f16_row>, gemm_by_dot<dot_bf16>,
     gemm_by_dot<dot_block32<false, false, false>>, gemm_by_dot<dot_block32<false, true, false>>,
     gemm_by_dot<dot_block32<true, false, false>>, gemm_by_dot<dot_block32<true, true, false>>,
     gemm_by_dot<dot_block32<false, false, true>>, gemm_by_dot<dot_q45_k<false>>, gemm_by_dot<dot_q45_k<true>>,
     gemm_by_dot<dot_q6_k>, gemm_by_dot<dot_mxfp4>},
#endif
    quantize_act,
    dot_f16v,
    axpy_f16v,
    dot_q8_0_f32v,
    axpy_q8_0v,
    dot_q4_0_f32v,
    axpy_q4_0v,
};

}  // namespace

#if defined(EDGEAI_I8MM)
const Ops *ops_neon_i8mm() { return &OPS; }
#elif defined(EDGEAI_DOTPROD)
const Ops *ops_neon_dotprod() { return &OPS; }
#else
const Ops *ops_neon() { return &OPS; }
#endif

}  // namespace edgeai::kern
