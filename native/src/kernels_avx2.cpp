// AVX2 + FMA + F16C kernel set (compiled with those flags; chosen only when the CPU has them).
//
// Weight codes are unpacked to unsigned bytes (0..63) and multiplied with the signed activation
// bytes by maddubs; the per-half offsets of each type come from BlockQ8A::hs (see kernels.hpp).
// Q8_0's codes are signed, so they use the sign trick (|q| * sign(x, q)).
#include <immintrin.h>

#include "kernels_common.hpp"

namespace edgeai::kern {
namespace {

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 8 int32 lanes, lane k = sum of elements 4k..4k+3 of q*x (q unsigned, x signed).
inline __m256i dot_u8s8(__m256i q, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
}

inline __m256i load_x(const BlockQ8A *x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x->qs)); }

// Legacy 16-byte nibble array -> 32 codes: low nibbles are weights 0-15, high nibbles 16-31.
inline __m256i nibbles32(const uint8_t *qs) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

// Bit j of the 32-bit little-endian word at p -> 0x10 in byte j (the fifth bit of Q5 codes).
inline __m256i fifth_bits(const uint8_t *p) {
    uint32_t bits;
    std::memcpy(&bits, p, 4);
    const __m256i pick = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), pick);
    v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));  // all ones except bit j%8
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

// Legacy types: one 32-weight block per activation block.
template <bool FIVE, bool AFFINE> float dot_legacy(const uint8_t *row, const void *xv, size_t n) {
    const BlockQ8A *x = static_cast<const BlockQ8A *>(xv);
    constexpr int HEAD = AFFINE ? 4 : 2, BYTES = HEAD + (FIVE ? 4 : 0) + 16;
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (size_t b = 0; b < n / 32; ++b, row += BYTES, ++x) {
        __m256i q = nibbles32(row + HEAD + (FIVE ? 4 : 0));
        if (FIVE) q = _mm256_or_si256(q, fifth_bits(row + HEAD));
        const float d = f16_at(row);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(q, load_x(x))), _mm256_set1_ps(d * x->d), acc);
        const float bias = AFFINE ? f16_at(row + 2) : -d * (FIVE ? 16.0f : 8.0f);
        off += bias * (x->hs[0] + x->hs[1]);
    }
    return hsum(acc) + off;
}

float dot_q8_0(const uint8_t *row, const void *xv, size_t n) {
    const BlockQ8A *x = static_cast<const BlockQ8A *>(xv);
    __m256 acc = _mm256_setzero_ps();
    for (size_t b = 0; b < n / 32; ++b, row += 34, ++x) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + 2));
        const __m256i p = dot_u8s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(load_x(x), q));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(f16_at(row) * x->d), acc);
    }
    return hsum(acc);
}

template <bool FIVE> float dot_q45_k(const uint8_t *row, const void *xv, size_t n) {
    const BlockQ8A *x = static_cast<const BlockQ8A *>(xv);
    constexpr int BYTES = FIVE ? 176 : 144;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (size_t blk = 0; blk < n / 256; ++blk, row += BYTES) {
        const float d = f16_at(row), dmin = f16_at(row + 2);
        uint8_t sc[8], mn[8];
        k4_scales(row + 4, sc, mn);
        const uint8_t *ql = row + (FIVE ? 48 : 16);
        const __m256i hb = FIVE ? _mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + 16)) : _mm256_setzero_si256();
        float mins = 0.0f;
        for (int c = 0; c < 4; ++c, x += 2) {
            const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(ql + 32 * c));
            __m256i q0 = _mm256_and_si256(bytes, m4), q1 = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
            if (FIVE) {
                const __m256i b0 = _mm256_set1_epi8(static_cast<char>(1 << (2 * c)));
                const __m256i b1 = _mm256_set1_epi8(static_cast<char>(1 << (2 * c + 1)));
                const __m256i sixteen = _mm256_set1_epi8(0x10);
                q0 = _mm256_or_si256(q0, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, b0), b0), sixteen));
                q1 = _mm256_or_si256(q1, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, b1), b1), sixteen));
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(q0, load_x(x))), _mm256_set1_ps(d * sc[2 * c] * x[0].d), acc);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(q1, load_x(x + 1))), _mm256_set1_ps(d * sc[2 * c + 1] * x[1].d),
                                  acc);
            mins += mn[2 * c] * (x[0].hs[0] + x[0].hs[1]) + mn[2 * c + 1] * (x[1].hs[0] + x[1].hs[1]);
        }
        off -= dmin * mins;
    }
    return hsum(acc) + off;
}

float dot_q6_k(const uint8_t *row, const void *xv, size_t n) {
    const BlockQ8A *x = static_cast<const BlockQ8A *>(xv);
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (size_t blk = 0; blk < n / 256; ++blk, row += 210) {
        const int8_t *sc = reinterpret_cast<const int8_t *>(row + 192);
        const float d = f16_at(row + 208);
        for (int h = 0; h < 2; ++h) {
            const uint8_t *ql = row + 64 * h, *qhp = row + 128 + 32 * h;
            const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(ql));
            const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(ql + 32));
            const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(qhp));
            const __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(lo, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)),
                _mm256_or_si256(_mm256_and_si256(hi, m4),
                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 4), m4),
                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(hi, 4), m4),
                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4)),
            };
            for (int k = 0; k < 4; ++k, ++x) {
                const int g = 4 * h + k;
                const float a0 = d * sc[2 * g], a1 = d * sc[2 * g + 1];
                const __m256 scale = _mm256_set_m128(_mm_set1_ps(a1 * x->d), _mm_set1_ps(a0 * x->d));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(q[k], load_x(x))), scale, acc);
                off -= 32.0f * (a0 * x->hs[0] + a1 * x->hs[1]);
            }
        }
    }
    return hsum(acc) + off;
}

float dot_f32(const uint8_t *row, const void *xv, size_t n) {
    const float *w = reinterpret_cast<const float *>(row), *x = static_cast<const float *>(xv);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    float acc = hsum(_mm256_add_ps(a0, a1));
    for (; i < n; ++i) acc += w[i] * x[i];
    return acc;
}

float dot_f16v(const uint16_t *w, const float *x, size_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + i))),
                             _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + i + 8))),
                             _mm256_loadu_ps(x + i + 8), a1);
    }
    float acc = hsum(_mm256_add_ps(a0, a1));
    for (; i < n; ++i) acc += f16(w[i]) * x[i];
    return acc;
}

float dot_f16_row(const uint8_t *row, const void *x, size_t n) {
    return dot_f16v(reinterpret_cast<const uint16_t *>(row), static_cast<const float *>(x), n);
}

float dot_bf16(const uint8_t *row, const void *xv, size_t n) {
    const uint16_t *w = reinterpret_cast<const uint16_t *>(row);
    const float *x = static_cast<const float *>(xv);
    __m256 a0 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + i)));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), _mm256_loadu_ps(x + i), a0);
    }
    float acc = hsum(a0);
    for (; i < n; ++i) acc += bf16(w[i]) * x[i];
    return acc;
}

void axpy_f16v(float alpha, const uint16_t *v, float *y, size_t n) {
    const __m256 a = _mm256_set1_ps(alpha);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(v + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, vv, _mm256_loadu_ps(y + i)));
    }
    for (; i < n; ++i) y[i] += alpha * f16(v[i]);
}

// Same results as quantize_act_ref: x * (127/amax), rounded half to even by cvtps.
void quantize_act(const float *x, BlockQ8A *y, size_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (size_t b = 0; b < n / QA; ++b, x += QA) {
        __m256 v[4];
        __m256 m = _mm256_setzero_ps();
        for (int k = 0; k < 4; ++k) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[k]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.0f, id = d > 0.0f ? 127.0f / amax : 0.0f;
        const __m256 mul = _mm256_set1_ps(id);
        __m256i i32[4];
        for (int k = 0; k < 4; ++k) i32[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], mul));
        const __m256i s_lo = _mm256_add_epi32(i32[0], i32[1]), s_hi = _mm256_add_epi32(i32[2], i32[3]);
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(y[b].qs), _mm256_permutevar8x32_epi32(p, perm));
        alignas(32) int32_t lo[8], hi[8];
        _mm256_store_si256(reinterpret_cast<__m256i *>(lo), s_lo);
        _mm256_store_si256(reinterpret_cast<__m256i *>(hi), s_hi);
        int s0 = 0, s1 = 0;
        for (int k = 0; k < 8; ++k) {
            s0 += lo[k];
            s1 += hi[k];
        }
        y[b].d = d;
        y[b].hs[0] = d * static_cast<float>(s0);
        y[b].hs[1] = d * static_cast<float>(s1);
    }
}

const Ops OPS = {
    "avx2",
    {dot_f32, dot_f16_row, dot_bf16, dot_legacy<false, false>, dot_legacy<false, true>, dot_legacy<true, false>,
     dot_legacy<true, true>, dot_q8_0, dot_q45_k<false>, dot_q45_k<true>, dot_q6_k},
    quantize_act,
    dot_f16v,
    axpy_f16v,
};

}  // namespace

const Ops *ops_avx2() { return &OPS; }

}  // namespace edgeai::kern
