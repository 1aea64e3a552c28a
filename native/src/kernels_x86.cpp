// The x86 kernel sets: AVX2 + FMA + F16C, and the same source compiled again for newer CPUs
// (chosen only when the CPU has the instructions; CMakeLists.txt, kernels.cpp):
//   avx2         -mavx2 -mfma -mf16c
//   avx512       + -mavx512f/bw/vl/dq: EVEX encodings and 32 vector registers (Skylake-X)
//   avx-vnni     + -mavxvnni, EDGEAI_AVX_VNNI: byte dot products in one instruction (VEX vpdpbusd;
//                Alder Lake and later laptops, which have no AVX-512)
//   avx512-vnni  + -mavx512vnni, EDGEAI_AVX512_VNNI: the same through EVEX (Ice Lake, Zen 4)
// Vectors stay 256 bits wide in every set: decode is bound by memory, 512-bit operations are split
// in two on Zen 4 and lower the clock of many Intel parts, and one layout serves every set (the
// packed weights made at load time are the same whichever set runs).
//
// Weight codes are unpacked to unsigned bytes (0..63) and multiplied with the signed activation
// bytes (maddubs, or vpdpbusd with VNNI); the per-half offsets of each type come from
// BlockQ8A::hs (see kernels.hpp). Q8_0's codes are signed, and so are MXFP4's values (looked up
// from its codes), so they use the sign trick (|q| * sign(x, q)). The integer sums are exact in every set (no int16 pair sum of a caller
// exceeds 32767), so every set computes the same integers; the float steps are the same source.
#include <immintrin.h>

#include <new>
#include <type_traits>

#include "kernels_common.hpp"

namespace edgeai::kern {
namespace {

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#if defined(EDGEAI_AVX512_VNNI) || defined(EDGEAI_AVX_VNNI)
#define EDGEAI_VNNI 1
#endif

// v, kept as a running sum where the code makes it. Without this GCC reassociates the int16/int32
// adds of a block's unrolled byte products into one tree whose leaves are all live at once: a tile of
// 4 tokens then spills them to the stack every block (objdump: 70-80 stack accesses in each AVX2
// packed kernel; 4 sequences in one step of SmolLM2 Q4_0 at 1 thread 12.2 ms before, 10.6 after,
// AMD EPYC Zen 3). An empty asm: no instruction, the integer sums are unchanged.
template <class I> inline I running(I v) {
#if defined(__AVX512F__)
    __asm__("" : "+v"(v));
#else
    __asm__("" : "+x"(v));
#endif
    return v;
}

// acc + (lane k: sum of elements 4k..4k+3 of q*x), q unsigned and x signed bytes, 8 int32 lanes.
inline __m256i dpbusd(__m256i acc, __m256i q, __m256i x) {
#if defined(EDGEAI_AVX512_VNNI)
    return _mm256_dpbusd_epi32(acc, q, x);
#elif defined(EDGEAI_AVX_VNNI)
    return _mm256_dpbusd_avx_epi32(acc, q, x);
#else
    return running(_mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1))));
#endif
}

// 8 int32 lanes, lane k = sum of elements 4k..4k+3 of q*x (q unsigned, x signed).
inline __m256i dot_u8s8(__m256i q, __m256i x) {
#if defined(EDGEAI_VNNI)
    return dpbusd(_mm256_setzero_si256(), q, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
#endif
}

// The integer steps of the byte dot products at one register width, so that one BlockSums serves the
// 256-bit kernels of every set and the 512-bit ones of the AVX-512 sets.
struct V256 {
    using I = __m256i;
    static I zero() { return _mm256_setzero_si256(); }
    static I add16(I a, I b) { return _mm256_add_epi16(a, b); }
    static I add32(I a, I b) { return _mm256_add_epi32(a, b); }
    static I maddubs(I q, I x) { return _mm256_maddubs_epi16(q, x); }
    static I widen(I a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }  // int16 pairs -> int32
    static I dpbusd(I acc, I q, I x) { return kern::dpbusd(acc, q, x); }
};

#if defined(__AVX512BW__)
struct V512 {
    using I = __m512i;
    static I zero() { return _mm512_setzero_si512(); }
    static I add16(I a, I b) { return _mm512_add_epi16(a, b); }
    static I add32(I a, I b) { return _mm512_add_epi32(a, b); }
    static I maddubs(I q, I x) { return _mm512_maddubs_epi16(q, x); }
    static I widen(I a) { return _mm512_madd_epi16(a, _mm512_set1_epi16(1)); }
    static I dpbusd(I acc, I q, I x) {
#if defined(EDGEAI_AVX512_VNNI)
        return _mm512_dpbusd_epi32(acc, q, x);
#else
        return running(add32(acc, widen(maddubs(q, x))));
#endif
    }
};
#endif

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

// Integer dot of a block's signed values q (Q8_0, MXFP4) with one activation block, 8 int32 lanes (sign trick).
inline __m256i signed_dot(__m256i q, __m256i xv) { return dot_u8s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q)); }

float dot_q8_0(const uint8_t *row, const void *xv, size_t n) {
    const BlockQ8A *x = static_cast<const BlockQ8A *>(xv);
    __m256 acc = _mm256_setzero_ps();
    for (size_t b = 0; b < n / 32; ++b, row += 34, ++x) {
        const __m256i p = signed_dot(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + 2)), load_x(x));
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

// Lane r = the sum of the 8 lanes of v[r], by one tree for every r (so a key's score does not
// depend on the keys beside it).
inline __m256 reduce8_ps(const __m256 v[8]) {
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

// Heads of a KV head's group computed together by the attention kernels below: each key and value
// row is converted from f16 once for all of them. Three hold 24 sums in the AVX-512 sets' 32 vector
// registers; AVX2's 16 take one head at a time.
#if defined(__AVX512F__)
constexpr int kHeadsTogether = 3;
#else
constexpr int kHeadsTogether = 1;
#endif

// Attention scores of G query heads over an f16 K cache, 8 keys per step: one accumulator per key and
// head over the head's values, the 8 of a head reduced together (no horizontal sum per key, no call
// per key). Each head's sums are the ones it gets alone (G = 1), in the same order.
template <int G>
void scores_f16_heads(const uint16_t *k, size_t stride, int n_keys, const float *q, size_t hd, float *out, size_t out_stride) {
    auto key = [&](int j, size_t d) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(k + size_t(j) * stride + d))); };
    for (int j = 0; j < n_keys; j += 8) {
        const int m = n_keys - j < 8 ? n_keys - j : 8;
        __m256 a[G][8];
        for (auto &h : a)
            for (auto &v : h) v = _mm256_setzero_ps();
        for (size_t d = 0; d < hd; d += 8) {
            __m256 qv[G];
            for (int g = 0; g < G; ++g) qv[g] = _mm256_loadu_ps(q + g * hd + d);
            auto add = [&](int r) {
                const __m256 kr = key(j + r, d);
                for (int g = 0; g < G; ++g) a[g][r] = _mm256_fmadd_ps(kr, qv[g], a[g][r]);
            };
            if (m == 8)
                for (int r = 0; r < 8; ++r) add(r);
            else
                for (int r = 0; r < m; ++r) add(r);
        }
        for (int g = 0; g < G; ++g) {
            alignas(32) float s[8];
            _mm256_store_ps(s, reduce8_ps(a[g]));
            for (int r = 0; r < m; ++r) out[g * out_stride + j + r] = s[r];
        }
    }
}

void scores_f16(const uint16_t *k, size_t stride, int n_keys, const float *q, int heads, size_t hd, float *out, size_t out_stride) {
    int h = 0;
    for (; kHeadsTogether >= 3 && h + 3 <= heads; h += 3) scores_f16_heads<3>(k, stride, n_keys, q + h * hd, hd, out + h * out_stride, out_stride);
    for (; kHeadsTogether >= 2 && h + 2 <= heads; h += 2) scores_f16_heads<2>(k, stride, n_keys, q + h * hd, hd, out + h * out_stride, out_stride);
    for (; h < heads; ++h) scores_f16_heads<1>(k, stride, n_keys, q + h * hd, hd, out + h * out_stride, out_stride);
}

// The attention output of G heads over an f16 V cache: 64 output values per head at a time stay in
// registers while every value row, converted once, adds to them (axpy per row loads and stores the
// output each time). Each head's sums are the ones it gets alone, in the same order.
template <int G>
void weighted_sum_f16_heads(const uint16_t *v, size_t stride, int n, const float *p, size_t p_stride, size_t hd, float *out) {
    for (size_t d0 = 0; d0 < hd; d0 += 64) {
        const int m = static_cast<int>((hd - d0 < 64 ? hd - d0 : 64) / 8);
        __m256 a[G][8];
        for (auto &h : a)
            for (auto &x : h) x = _mm256_setzero_ps();
        for (int j = 0; j < n; ++j) {
            __m256 pj[G];
            for (int g = 0; g < G; ++g) pj[g] = _mm256_set1_ps(p[g * p_stride + j]);
            const uint16_t *row = v + size_t(j) * stride + d0;
            for (int i = 0; i < m; ++i) {
                const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row + 8 * i)));
                for (int g = 0; g < G; ++g) a[g][i] = _mm256_fmadd_ps(pj[g], x, a[g][i]);
            }
        }
        for (int g = 0; g < G; ++g)
            for (int i = 0; i < m; ++i) _mm256_storeu_ps(out + g * hd + d0 + 8 * i, a[g][i]);
    }
}

void weighted_sum_f16(const uint16_t *v, size_t stride, int n, const float *p, size_t p_stride, int heads, size_t hd, float *out) {
    int h = 0;
    for (; kHeadsTogether >= 3 && h + 3 <= heads; h += 3) weighted_sum_f16_heads<3>(v, stride, n, p + h * p_stride, p_stride, hd, out + h * hd);
    for (; kHeadsTogether >= 2 && h + 2 <= heads; h += 2) weighted_sum_f16_heads<2>(v, stride, n, p + h * p_stride, p_stride, hd, out + h * hd);
    for (; h < heads; ++h) weighted_sum_f16_heads<1>(v, stride, n, p + h * p_stride, p_stride, hd, out + h * hd);
}

// e^x for 8 floats: 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, so r keeps
// its low bits), e^r by a degree-6 polynomial on |r| <= ln(2)/2 (the Cephes expf coefficients;
// relative error about 2e-7); +inf above 88.3 and 0 below -87.3, where 2^n would leave the normal floats.
inline __m256 exp8(__m256 x) {
    const __m256 over = _mm256_cmp_ps(x, _mm256_set1_ps(88.3f), _CMP_GT_OQ);
    const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
    return _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), over);
}

// SwiGLU: g = g / (1 + e^-g) * u, 8 at a time; the last few through the same vector code.
void silu_mul(float *g, const float *u, size_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    auto eight = [&](__m256 x, __m256 up) {
        return _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)))), up);
    };
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(g + i, eight(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    if (i < n) {
        alignas(32) float gx[8] = {}, ux[8] = {};
        for (size_t k = i; k < n; ++k) gx[k - i] = g[k], ux[k - i] = u[k];
        _mm256_store_ps(gx, eight(_mm256_load_ps(gx), _mm256_load_ps(ux)));
        for (size_t k = i; k < n; ++k) g[k] = gx[k - i];
    }
}

// GeGLU with GELU's tanh approximation: 0.5 g (1 + tanh y) = g / (1 + e^(-2y)), y = sqrt(2/pi) (g + 0.044715 g^3),
// 8 at a time as silu_mul (libm's tanhf was a sixth of a Gemma 3 prefill).
void gelu_mul(float *g, const float *u, size_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), c1 = _mm256_set1_ps(-2.0f * 0.79788456080286535588f),
                 c3 = _mm256_set1_ps(-2.0f * 0.79788456080286535588f * 0.044715f);
    auto eight = [&](__m256 x, __m256 up) {
        const __m256 minus_2y = _mm256_mul_ps(x, _mm256_fmadd_ps(c3, _mm256_mul_ps(x, x), c1));
        return _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, exp8(minus_2y))), up);
    };
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(g + i, eight(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    if (i < n) {
        alignas(32) float gx[8] = {}, ux[8] = {};
        for (size_t k = i; k < n; ++k) gx[k - i] = g[k], ux[k - i] = u[k];
        _mm256_store_ps(gx, eight(_mm256_load_ps(gx), _mm256_load_ps(ux)));
        for (size_t k = i; k < n; ++k) g[k] = gx[k - i];
    }
}

float dot_q8_0_f32v(const uint8_t *k, const float *x, size_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (size_t b = 0; b < n / 32; ++b, k += 34, x += 32) {
        uint16_t dh;
        std::memcpy(&dh, k, 2);
        __m256 s = _mm256_setzero_ps();
        for (int j = 0; j < 4; ++j) {
            const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(k + 2 + 8 * j));
            s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_loadu_ps(x + 8 * j), s);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(dh)), s, acc);
    }
    return hsum(acc);
}

void axpy_q8_0v(float alpha, const uint8_t *v, float *y, size_t n) {
    for (size_t b = 0; b < n / 32; ++b, v += 34, y += 32) {
        uint16_t dh;
        std::memcpy(&dh, v, 2);
        const __m256 a = _mm256_set1_ps(alpha * f16(dh));
        for (int k = 0; k < 4; ++k) {
            const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(v + 2 + 8 * k));
            const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            _mm256_storeu_ps(y + 8 * k, _mm256_fmadd_ps(a, qf, _mm256_loadu_ps(y + 8 * k)));
        }
    }
}

// A Q4_0 block's 32 values as codes - 8 in 4 x 8 floats (values 0-7, 8-15, 16-23, 24-31): value j
// is the low nibble of byte j, value j + 16 its high nibble.
inline void q4_0_codes(const uint8_t *blk, __m256 c[4]) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 2)), nib = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(raw, nib), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nib);
    const __m256i eight = _mm256_set1_epi32(8);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; ++k) c[k] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[k]), eight));
}

float dot_q4_0_f32v(const uint8_t *k, const float *x, size_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (size_t b = 0; b < n / 32; ++b, k += 18, x += 32) {
        __m256 c[4];
        q4_0_codes(k, c);
        __m256 s = _mm256_mul_ps(c[0], _mm256_loadu_ps(x));
        for (int j = 1; j < 4; ++j) s = _mm256_fmadd_ps(c[j], _mm256_loadu_ps(x + 8 * j), s);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(k)), s, acc);
    }
    return hsum(acc);
}

void axpy_q4_0v(float alpha, const uint8_t *v, float *y, size_t n) {
    for (size_t b = 0; b < n / 32; ++b, v += 18, y += 32) {
        const __m256 a = _mm256_set1_ps(alpha * f16_at(v));
        __m256 c[4];
        q4_0_codes(v, c);
        for (int k = 0; k < 4; ++k) _mm256_storeu_ps(y + 8 * k, _mm256_fmadd_ps(a, c[k], _mm256_loadu_ps(y + 8 * k)));
    }
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
        // clamped to +-127 (finite codes are already): a NaN converts to INT_MIN, and four of them
        // overflowed the code sums below; max_ps gives its second operand for a NaN
        const __m256 cmin = _mm256_set1_ps(-127.0f), cmax = _mm256_set1_ps(127.0f);
        for (int k = 0; k < 4; ++k) i32[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v[k], mul), cmin), cmax));
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


// ---- Tiled kernels (prefill): an RM-row x RN-token tile keeps RM*RN float accumulators, unpacks
// each weight block once for RN tokens and loads each activation block once for RM rows.

// Decode (one token) streams the weights once: each row block prefetches the block kPrefetchRows
// rows further on, which short rows (a few hundred bytes) give the hardware prefetcher no time for.
constexpr int kPrefetchRows = 8;
constexpr int kPrefetchGroups = 1;  // the same, for packed 8-row groups

template <int BYTES> inline void prefetch_lines(const uint8_t *p) {
    for (int o = 0; o < BYTES; o += 64) _mm_prefetch(reinterpret_cast<const char *>(p + o), _MM_HINT_T0);
}

inline float f16c(const uint8_t *p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

inline const BlockQ8A *xblocks(const uint8_t *x, size_t stride, int t) {
    return reinterpret_cast<const BlockQ8A *>(x + size_t(t) * stride);
}

template <int RM, int RN> inline void store_tile(__m256 (&acc)[RM][RN], float *y, size_t ldy) {
    for (int r = 0; r < RM; ++r)
        for (int t = 0; t < RN; ++t) y[size_t(t) * ldy + r] = hsum(acc[r][t]);
}

// Q4_0 / Q5_0: codes 0..15 (0..31) against signed activations; the -8 (-16) offset is taken off
// in int16 per pair of products (maddubs(q, x) - maddubs(8, x), exact: |values| <= 7874).
template <bool FIVE> struct TileQ40_50 {
    template <int RM, int RN>
    static void run(const uint8_t *w, size_t rb, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t n) {
        constexpr int BYTES = FIVE ? 22 : 18;
        __m256 acc[RM][RN];
        for (auto &a : acc)
            for (auto &v : a) v = _mm256_setzero_ps();
        const __m256i mid = _mm256_set1_epi8(FIVE ? 16 : 8);
        for (size_t b = 0; b < n / 32; ++b) {
            __m256i q[RM];
            __m256 dw[RM];
            for (int r = 0; r < RM; ++r) {
                const uint8_t *blk = w + r * rb + b * BYTES;
                if (RN == 1) _mm_prefetch(reinterpret_cast<const char *>(blk + kPrefetchRows * rb), _MM_HINT_T0);
                q[r] = nibbles32(blk + (FIVE ? 6 : 2));
                if (FIVE) q[r] = _mm256_or_si256(q[r], fifth_bits(blk + 2));
                dw[r] = _mm256_set1_ps(f16c(blk));
            }
            for (int t = 0; t < RN; ++t) {
                const BlockQ8A *xb = xblocks(x, xs, t) + b;
#if defined(EDGEAI_VNNI)
                const __m256i xv = load_x(xb), c = dot_u8s8(mid, xv);
#else
                const __m256i xv = load_x(xb), c = _mm256_maddubs_epi16(mid, xv);
#endif
                const __m256 dx = _mm256_set1_ps(xb->d);
                for (int r = 0; r < RM; ++r) {
#if defined(EDGEAI_VNNI)
                    const __m256i p = _mm256_sub_epi32(dot_u8s8(q[r], xv), c);
#else
                    const __m256i p = _mm256_madd_epi16(_mm256_sub_epi16(_mm256_maddubs_epi16(q[r], xv), c), _mm256_set1_epi16(1));
#endif
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw[r], dx), acc[r][t]);
                }
            }
        }
        store_tile<RM, RN>(acc, y, ldy);
    }
};

// Lane r = sum of the 8 lanes of v[r]: one vector of 8 row results, so the float work (convert,
// scale, accumulate) is done once per 8 rows instead of once per row.
inline __m256i reduce8(const __m256i v[8]) {
    const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}

// The f16 at the same offset of 8 rows rb bytes apart, as 8 floats.
inline __m256 f16x8(const uint8_t *p, size_t rb) {
    uint16_t h[8];
    for (int r = 0; r < 8; ++r) std::memcpy(&h[r], p + r * rb, 2);
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(h)));
}

// The legacy 32-weight blocks: f16 d, for Q4_1 / Q5_1 f16 m, for Q5 a u32 of fifth bits, 16 nibble
// bytes. Packed at load time (pack_legacy), per 8-row group and block: the 8 rows' f16 d, their f16 m,
// 4 chunks of codes, the fifth-bit words; the same size as the 8 plain blocks.
template <bool FIVE, bool AFFINE> struct LegacyBlock {
    static constexpr int QH = AFFINE ? 4 : 2;       // offset of the fifth bits
    static constexpr int QS = QH + (FIVE ? 4 : 0);  // offset of the nibbles
    static constexpr int BYTES = QS + 16;
    static constexpr size_t GROUP = 8 * BYTES;      // packed bytes per 8-row group and block
    static constexpr int CODES = AFFINE ? 32 : 16;  // packed: offset of the code chunks
    static constexpr int FIFTH = CODES + 128;       // packed: offset of the fifth-bit words
};

// The end of a legacy block for one token, one lane per row: the block's integer dots (codes 0..15
// or 0..31) times d_w * d_x, plus the offset through the activation block sum sx: -mid * d_w * sx
// (Q4_0 / Q5_0, -8 / -16) or m_w * sx (Q4_1 / Q5_1). Every path (decode, batches, plain or packed
// rows, 256 or 512 bits) takes these steps in this order, so all give the same bits.
template <bool FIVE, bool AFFINE> inline __m256 legacy_accumulate(__m256 acc, __m256 dw, __m256 mw, __m256i dots, const BlockQ8A *xb) {
    const float sx = xb->hs[0] + xb->hs[1];
    if (AFFINE)
        return _mm256_fmadd_ps(dw, _mm256_mul_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(xb->d)),
                               _mm256_fmadd_ps(mw, _mm256_set1_ps(sx), acc));
    const __m256 inner = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(xb->d), _mm256_set1_ps(-(FIVE ? 16.0f : 8.0f) * sx));
    return _mm256_fmadd_ps(dw, inner, acc);
}

// 8 rows x RN tokens of a legacy type with one lane per row: each token's integer dots against the 8
// rows are reduced to one vector, so converting, scaling and accumulating cost a few instructions
// per 8 rows.
template <bool FIVE, bool AFFINE, int RN>
void rows8_legacy(const uint8_t *w, size_t rb, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t n) {
    using L = LegacyBlock<FIVE, AFFINE>;
    __m256 acc[RN];
    for (auto &v : acc) v = _mm256_setzero_ps();
    for (size_t b = 0; b < n / 32; ++b) {
        __m256i q[8];
        for (int r = 0; r < 8; ++r) {
            const uint8_t *blk = w + r * rb + b * L::BYTES;
            if (RN == 1) _mm_prefetch(reinterpret_cast<const char *>(blk + kPrefetchRows * rb), _MM_HINT_T0);
            q[r] = nibbles32(blk + L::QS);
            if (FIVE) q[r] = _mm256_or_si256(q[r], fifth_bits(blk + L::QH));
        }
        const __m256 dw = f16x8(w + b * L::BYTES, rb), mw = AFFINE ? f16x8(w + b * L::BYTES + 2, rb) : _mm256_setzero_ps();
        for (int t = 0; t < RN; ++t) {
            const BlockQ8A *xb = xblocks(x, xs, t) + b;
            const __m256i xv = load_x(xb);
            __m256i p[8];
            for (int r = 0; r < 8; ++r) p[r] = dot_u8s8(q[r], xv);
            acc[t] = legacy_accumulate<FIVE, AFFINE>(acc[t], dw, mw, reduce8(p), xb);
        }
    }
    for (int t = 0; t < RN; ++t) _mm256_storeu_ps(y + t * ldy, acc[t]);
}

// The integer dot products of one legacy block with one token, one lane per row, summed over
// the products of the low-nibble (half 0) and high-nibble (half 1) codes. AVX2 sums in int16 and
// widens once per block: Q4 both halves in one sum (exact: 8 maddubs, <= 30480), one register per token
// (two sums: 12 stack accesses in the AVX2 packed Q4_0 kernel against 8, objdump), Q5 each half in its
// own (4 maddubs, <= 31496). VNNI sums in int32.
template <class V, bool FIVE> struct BlockSumsT {
    using I = typename V::I;
#if defined(EDGEAI_VNNI)
    I s = V::zero();
    void add(int, I q, I x) { s = V::dpbusd(s, q, x); }
    I dots() const { return s; }
#else
    I s0 = V::zero(), s1 = V::zero();
    void add(int half, I q, I x) {
        I &h = FIVE && half ? s1 : s0;
        h = running(V::add16(h, V::maddubs(q, x)));
    }
    I dots() const { return FIVE ? V::add32(V::widen(s0), V::widen(s1)) : V::widen(s0); }
#endif
};
template <bool FIVE> using BlockSums = BlockSumsT<V256, FIVE>;

// A growable array of this file's own (not std::vector: its members would be weak symbols that
// every set's object defines, compiled with that set's flags, and the linker keeps one copy for
// all callers: an AVX-512 copy would then run on CPUs without AVX-512). 32-byte aligned.
template <class T> class Buffer {
  public:
    Buffer() = default;
    Buffer(const Buffer &) = delete;
    Buffer &operator=(const Buffer &) = delete;
    ~Buffer() { ::operator delete(p_, std::align_val_t(32)); }
    void resize(size_t n) {
        if (n <= n_) return;
        ::operator delete(p_, std::align_val_t(32));
        p_ = static_cast<T *>(::operator new(n * sizeof(T), std::align_val_t(32)));
        n_ = n;
    }
    T &operator[](size_t i) { return p_[i]; }
    const T &operator[](size_t i) const { return p_[i]; }

  private:
    T *p_ = nullptr;
    size_t n_ = 0;
};

// Prefill over 8 rows of a legacy type for many tokens: the 8 rows' codes are first transposed
// into a buffer (per block, register k holds weights 4k..4k+3 of rows 0..7), so each token
// multiplies them with its 4-byte activation groups broadcast and the products land directly in
// one lane per row: no horizontal reduction per token. Sums of up to 8 (Q4) / 4 (Q5) maddubs
// stay exact in int16 (<= 30480 / 31496).
struct Packed8 {
    Buffer<__m256i> codes;  // [block][k]
    Buffer<float> scales;   // [block][row]
    Buffer<float> mins;     // [block][row]: Q4_1 / Q5_1
};

inline void transpose8x32(const __m256i r[8], __m256i *out) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3
        const __m256i *tt = t + 4 * h;
        u[4 * h + 0] = _mm256_unpacklo_epi64(tt[0], tt[2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(tt[0], tt[2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(tt[1], tt[3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(tt[1], tt[3]);
    }
    for (int k = 0; k < 4; ++k) {
        out[k] = _mm256_permute2x128_si256(u[k], u[4 + k], 0x20);
        out[k + 4] = _mm256_permute2x128_si256(u[k], u[4 + k], 0x31);
    }
}

template <bool FIVE, bool AFFINE> void pack8_legacy(const uint8_t *w, size_t rb, size_t nb, Packed8 &pk) {
    using L = LegacyBlock<FIVE, AFFINE>;
    pk.codes.resize(nb * 8);
    pk.scales.resize(nb * 8);
    if (AFFINE) pk.mins.resize(nb * 8);
    for (size_t b = 0; b < nb; ++b) {
        __m256i q[8];
        for (int r = 0; r < 8; ++r) {
            const uint8_t *blk = w + r * rb + b * L::BYTES;
            q[r] = nibbles32(blk + L::QS);
            if (FIVE) q[r] = _mm256_or_si256(q[r], fifth_bits(blk + L::QH));
        }
        transpose8x32(q, &pk.codes[b * 8]);
        _mm256_storeu_ps(&pk.scales[b * 8], f16x8(w + b * L::BYTES, rb));
        if (AFFINE) _mm256_storeu_ps(&pk.mins[b * 8], f16x8(w + b * L::BYTES + 2, rb));
    }
}

// RN tokens against one transposed 8-row group: each code register is loaded once for RN tokens.
template <bool FIVE, bool AFFINE, int RN>
void packed8_tokens(const Packed8 &pk, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t nb) {
    __m256 acc[RN];
    for (auto &v : acc) v = _mm256_setzero_ps();
    for (size_t b = 0; b < nb; ++b) {
        const __m256i *W = &pk.codes[b * 8];
        const BlockQ8A *xb[RN];
        for (int t = 0; t < RN; ++t) xb[t] = xblocks(x, xs, t) + b;
        // activation bytes 4k..4k+3 in every lane (a broadcast load: no shuffle)
        auto xg = [&](int t, int k) {
            return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float *>(xb[t]->qs + 4 * k)));
        };
        BlockSums<FIVE> s[RN];
        for (int k = 0; k < 4; ++k) {
            const __m256i wl = _mm256_load_si256(W + k), wh = _mm256_load_si256(W + 4 + k);
            for (int t = 0; t < RN; ++t) {
                s[t].add(0, wl, xg(t, k));
                s[t].add(1, wh, xg(t, 4 + k));
            }
        }
        const __m256 dw = _mm256_loadu_ps(&pk.scales[b * 8]), mw = AFFINE ? _mm256_loadu_ps(&pk.mins[b * 8]) : _mm256_setzero_ps();
        for (int t = 0; t < RN; ++t) acc[t] = legacy_accumulate<FIVE, AFFINE>(acc[t], dw, mw, s[t].dots(), xb[t]);
    }
    for (int t = 0; t < RN; ++t) _mm256_storeu_ps(y + t * ldy, acc[t]);
}

// Q8_0: signed codes by the sign trick, |q| once per row block and sign(x, q) per pair.
struct TileQ8_0 {
    template <int RM, int RN>
    static void run(const uint8_t *w, size_t rb, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t n) {
        __m256 acc[RM][RN];
        for (auto &a : acc)
            for (auto &v : a) v = _mm256_setzero_ps();
        for (size_t b = 0; b < n / 32; ++b) {
            __m256i q[RM], aq[RM];
            __m256 dw[RM];
            for (int r = 0; r < RM; ++r) {
                const uint8_t *blk = w + r * rb + b * 34;
                if (RN == 1) _mm_prefetch(reinterpret_cast<const char *>(blk + kPrefetchRows * rb), _MM_HINT_T0);
                q[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + 2));
                aq[r] = _mm256_sign_epi8(q[r], q[r]);
                dw[r] = _mm256_set1_ps(f16c(blk));
            }
            for (int t = 0; t < RN; ++t) {
                const BlockQ8A *xb = xblocks(x, xs, t) + b;
                const __m256i xv = load_x(xb);
                const __m256 dx = _mm256_set1_ps(xb->d);
                for (int r = 0; r < RM; ++r) {
                    const __m256i p = dot_u8s8(aq[r], _mm256_sign_epi8(xv, q[r]));
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw[r], dx), acc[r][t]);
                }
            }
        }
        store_tile<RM, RN>(acc, y, ldy);
    }
};

// The block types whose 32 weights are signed bytes times one float scale per block, multiplied by
// the sign trick (|q| * sign(x, q)): Q8_0 (Q8_0Block) and MXFP4 (MXFP4Block, with the MXFP4
// kernels). A block type B gives
//   BYTES                  bytes of one block
//   values(blk)            its 32 weights as signed bytes
//   scales8(w, rb, b)      block b's scale of the 8 rows at w (rb bytes apart), one lane per row
// Its static members are inline, so the loops below compile to what a loop per type would.
struct Q8_0Block {
    static constexpr size_t BYTES = 34;
    static __m256i values(const uint8_t *blk) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + 2)); }
    static __m256 scales8(const uint8_t *w, size_t rb, size_t b) { return f16x8(w + b * BYTES, rb); }
};

// Prefill over 8 transposed rows of a signed-byte block type (as Packed8 for Q4_0): per block 8
// registers of |values| then 8 of the signed values, and the 8 rows' float scales; each token's
// broadcast activations take the values' signs (packed8_q8_0_tokens).
template <class B> void pack8_signed(const uint8_t *w, size_t rb, size_t nb, Packed8 &pk) {
    pk.codes.resize(nb * 16);
    pk.scales.resize(nb * 8);
    for (size_t b = 0; b < nb; ++b) {
        __m256i q[8];
        for (int r = 0; r < 8; ++r) q[r] = B::values(w + r * rb + b * B::BYTES);
        __m256i *out = &pk.codes[b * 16];
        transpose8x32(q, out + 8);
        for (int k = 0; k < 8; ++k) out[k] = _mm256_sign_epi8(out[8 + k], out[8 + k]);
        _mm256_storeu_ps(&pk.scales[b * 8], B::scales8(w, rb, b));
    }
}

// Decode over 8 rows of a signed-byte block type with one lane per row (as rows8_legacy): per
// block the 8 rows' integer dots reduced to one vector, then one float step per 8 rows,
// acc = fma(d_w * d_x, float(dots), acc).
template <class B> void rows8_signed(const uint8_t *w, size_t rb, const BlockQ8A *x, float *y, size_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (size_t b = 0; b < n / 32; ++b, ++x) {
        const __m256i xv = load_x(x);
        __m256i p[8];
        for (int r = 0; r < 8; ++r) {
            const uint8_t *blk = w + r * rb + b * B::BYTES;
            _mm_prefetch(reinterpret_cast<const char *>(blk + kPrefetchRows * rb), _MM_HINT_T0);
            p[r] = signed_dot(B::values(blk), xv);
        }
        acc = _mm256_fmadd_ps(_mm256_mul_ps(B::scales8(w, rb, b), _mm256_set1_ps(x->d)), _mm256_cvtepi32_ps(reduce8(p)), acc);
    }
    _mm256_storeu_ps(y, acc);
}

// SMALL: codes of magnitude <= 12 (MXFP4's values), whose 8 maddubs per block sum exactly in int16
// (<= 24384) before one widening, where AVX2 has no vpdpbusd; the same integers either way.
template <int RN, bool SMALL = false>
void packed8_q8_0_tokens(const Packed8 &pk, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t nb) {
    __m256 acc[RN];
    for (auto &v : acc) v = _mm256_setzero_ps();
    for (size_t b = 0; b < nb; ++b) {
        const __m256i *W = &pk.codes[b * 16];
        const BlockQ8A *xb[RN];
        for (int t = 0; t < RN; ++t) xb[t] = xblocks(x, xs, t) + b;
        __m256i s[RN];
        for (int t = 0; t < RN; ++t) s[t] = _mm256_setzero_si256();
        for (int k = 0; k < 8; ++k) {
            const __m256i aw = _mm256_load_si256(W + k), sw = _mm256_load_si256(W + 8 + k);
            for (int t = 0; t < RN; ++t) {
                const __m256i xv = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float *>(xb[t]->qs + 4 * k)));
#if !defined(EDGEAI_VNNI)
                if (SMALL) {
                    s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, sw)));
                    continue;
                }
#endif
                s[t] = dpbusd(s[t], aw, _mm256_sign_epi8(xv, sw));
            }
        }
#if !defined(EDGEAI_VNNI)
        if (SMALL)
            for (int t = 0; t < RN; ++t) s[t] = _mm256_madd_epi16(s[t], _mm256_set1_epi16(1));
#endif
        const __m256 dw = _mm256_loadu_ps(&pk.scales[b * 8]);
        for (int t = 0; t < RN; ++t)
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xb[t]->d)), _mm256_cvtepi32_ps(s[t]), acc[t]);
    }
    for (int t = 0; t < RN; ++t) _mm256_storeu_ps(y + t * ldy, acc[t]);
}

// Sum of the two half sums of 8 consecutive activation blocks, one per lane.
inline __m256 block_sums8(const BlockQ8A *x) {
    return _mm256_setr_ps(x[0].hs[0] + x[0].hs[1], x[1].hs[0] + x[1].hs[1], x[2].hs[0] + x[2].hs[1],
                          x[3].hs[0] + x[3].hs[1], x[4].hs[0] + x[4].hs[1], x[5].hs[0] + x[5].hs[1],
                          x[6].hs[0] + x[6].hs[1], x[7].hs[0] + x[7].hs[1]);
}

// Q4_K: per 32-weight sub-block a float scale d*sc; the mins (dmin*mn per sub-block against the
// activation block sums) go into the same accumulator as one 8-lane product per super-block.
struct TileQ4_K {
    template <int RM, int RN>
    static void run(const uint8_t *w, size_t rb, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t n) {
        __m256 acc[RM][RN];
        for (auto &a : acc)
            for (auto &v : a) v = _mm256_setzero_ps();
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        for (size_t blk = 0; blk < n / 256; ++blk) {
            alignas(32) float rs[RM][8];
            __m256 rmin[RM];
            for (int r = 0; r < RM; ++r) {
                const uint8_t *row = w + r * rb + blk * 144;
                if (RN == 1) prefetch_lines<144>(row + kPrefetchRows * rb);
                uint8_t sc[8], mn[8];
                k4_scales(row + 4, sc, mn);
                const __m256 d = _mm256_set1_ps(f16c(row)), dmin = _mm256_set1_ps(f16c(row + 2));
                uint64_t s8, m8;
                std::memcpy(&s8, sc, 8);
                std::memcpy(&m8, mn, 8);
                _mm256_store_ps(rs[r], _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(s8))))));
                rmin[r] = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(m8)))));
            }
            for (int t = 0; t < RN; ++t) {
                const __m256 s = block_sums8(xblocks(x, xs, t) + blk * 8);
                for (int r = 0; r < RM; ++r) acc[r][t] = _mm256_fnmadd_ps(rmin[r], s, acc[r][t]);
            }
            for (int c = 0; c < 4; ++c) {
                __m256i q0[RM], q1[RM];
                for (int r = 0; r < RM; ++r) {
                    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + r * rb + blk * 144 + 16 + 32 * c));
                    q0[r] = _mm256_and_si256(bytes, m4);
                    q1[r] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
                }
                for (int t = 0; t < RN; ++t) {
                    const BlockQ8A *xb = xblocks(x, xs, t) + blk * 8 + 2 * c;
                    const __m256i x0 = load_x(xb), x1 = load_x(xb + 1);
                    const __m256 d0 = _mm256_set1_ps(xb[0].d), d1 = _mm256_set1_ps(xb[1].d);
                    for (int r = 0; r < RM; ++r) {
                        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(q0[r], x0)),
                                                    _mm256_mul_ps(_mm256_set1_ps(rs[r][2 * c]), d0), acc[r][t]);
                        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(q1[r], x1)),
                                                    _mm256_mul_ps(_mm256_set1_ps(rs[r][2 * c + 1]), d1), acc[r][t]);
                    }
                }
            }
        }
        store_tile<RM, RN>(acc, y, ldy);
    }
};

// Q6_K: the int8 scale of each 16-weight half multiplies in int16 (madd with the scale in place
// of ones), so one float scale d * x.d per sub-block remains; the -32 offset goes through the
// activation half sums as two 8-lane products per super-block.
struct TileQ6_K {
    template <int RM, int RN>
    static void run(const uint8_t *w, size_t rb, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t n) {
        __m256 acc[RM][RN];
        for (auto &a : acc)
            for (auto &v : a) v = _mm256_setzero_ps();
        const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
        for (size_t blk = 0; blk < n / 256; ++blk) {
            __m256 dw[RM], off_lo[RM], off_hi[RM];
            alignas(32) int16_t sc16[RM][8][16];
            for (int r = 0; r < RM; ++r) {
                const uint8_t *row = w + r * rb + blk * 210;
                if (RN == 1) prefetch_lines<210>(row + kPrefetchRows * rb);
                const int8_t *sc = reinterpret_cast<const int8_t *>(row + 192);
                const float d = f16c(row + 208);
                dw[r] = _mm256_set1_ps(d);
                const __m128i s16 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(sc));
                const __m256 m32d = _mm256_set1_ps(32.0f * d);
                off_lo[r] = _mm256_mul_ps(m32d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s16)));
                off_hi[r] = _mm256_mul_ps(m32d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s16, 8))));
                for (int g = 0; g < 8; ++g) {
                    const __m256i v = _mm256_set_m128i(_mm_set1_epi16(sc[2 * g + 1]), _mm_set1_epi16(sc[2 * g]));
                    _mm256_store_si256(reinterpret_cast<__m256i *>(sc16[r][g]), v);
                }
            }
            for (int t = 0; t < RN; ++t) {
                const BlockQ8A *xb = xblocks(x, xs, t) + blk * 8;
                const __m256 h_lo = _mm256_setr_ps(xb[0].hs[0], xb[0].hs[1], xb[1].hs[0], xb[1].hs[1], xb[2].hs[0],
                                                   xb[2].hs[1], xb[3].hs[0], xb[3].hs[1]);
                const __m256 h_hi = _mm256_setr_ps(xb[4].hs[0], xb[4].hs[1], xb[5].hs[0], xb[5].hs[1], xb[6].hs[0],
                                                   xb[6].hs[1], xb[7].hs[0], xb[7].hs[1]);
                for (int r = 0; r < RM; ++r)
                    acc[r][t] = _mm256_fnmadd_ps(off_hi[r], h_hi, _mm256_fnmadd_ps(off_lo[r], h_lo, acc[r][t]));
            }
            for (int h = 0; h < 2; ++h) {
                for (int k = 0; k < 4; ++k) {
                    const int g = 4 * h + k;
                    __m256i q[RM];
                    for (int r = 0; r < RM; ++r) {
                        const uint8_t *row = w + r * rb + blk * 210;
                        const __m256i src = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + 64 * h + 32 * (k & 1)));
                        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + 128 + 32 * h));
                        const __m256i lo = k < 2 ? _mm256_and_si256(src, m4) : _mm256_and_si256(_mm256_srli_epi16(src, 4), m4);
                        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), m2);
                        q[r] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
                    }
                    for (int t = 0; t < RN; ++t) {
                        const BlockQ8A *xb = xblocks(x, xs, t) + blk * 8 + g;
                        const __m256i xv = load_x(xb);
                        const __m256 dx = _mm256_set1_ps(xb->d);
                        for (int r = 0; r < RM; ++r) {
                            const __m256i s = _mm256_load_si256(reinterpret_cast<const __m256i *>(sc16[r][g]));
                            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[r], xv), s);
                            acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw[r], dx), acc[r][t]);
                        }
                    }
                }
            }
        }
        store_tile<RM, RN>(acc, y, ldy);
    }
};

// Activation bytes 4k..4k+3 of a block in every lane (a broadcast load: no shuffle).
inline __m256i x_group(const BlockQ8A *xb, int k) {
    return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float *>(xb->qs + 4 * k)));
}

// K-quant prefill over 8 rows, as Packed8 for Q4_0: per 32-weight sub-block j of each super-block,
// the 8 rows' codes transposed (register k holds weights 4k..4k+3 of rows 0..7) and, per 16-weight
// half, the 8 rows' float scales and the float multipliers of the activation half sums (Q4_K: its
// mins; Q6_K: its -32 offset). A token then takes 8 dot-product instructions per sub-block whose
// results land one lane per row, and 2-4 float steps per 8 rows: no horizontal sums.
struct PackedK {
    Buffer<__m256i> codes;  // [super-block][j][k]
    Buffer<float> scale;    // [super-block][j][half][row]
    Buffer<float> offset;   // [super-block][j][half][row]: times the activation half sum, subtracted
};

void pack8_q4_k(const uint8_t *w, size_t rb, size_t nsb, PackedK &pk) {
    pk.codes.resize(nsb * 64);
    pk.scale.resize(nsb * 128);
    pk.offset.resize(nsb * 128);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (size_t b = 0; b < nsb; ++b) {
        for (int r = 0; r < 8; ++r) {
            const uint8_t *blk = w + r * rb + b * 144;
            uint8_t sc[8], mn[8];
            k4_scales(blk + 4, sc, mn);
            const float d = f16c(blk), dmin = f16c(blk + 2);
            for (int j = 0; j < 8; ++j)
                for (int h = 0; h < 2; ++h) {  // one scale per sub-block: both halves alike
                    pk.scale[((b * 8 + j) * 2 + h) * 8 + r] = d * float(sc[j]);
                    pk.offset[((b * 8 + j) * 2 + h) * 8 + r] = dmin * float(mn[j]);
                }
        }
        for (int c = 0; c < 4; ++c) {  // 32 code bytes: low nibbles sub-block 2c, high nibbles 2c+1
            __m256i lo[8], hi[8];
            for (int r = 0; r < 8; ++r) {
                const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + r * rb + b * 144 + 16 + 32 * c));
                lo[r] = _mm256_and_si256(bytes, m4);
                hi[r] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
            }
            transpose8x32(lo, &pk.codes[(b * 8 + 2 * c) * 8]);
            transpose8x32(hi, &pk.codes[(b * 8 + 2 * c + 1) * 8]);
        }
    }
}

void pack8_q6_k(const uint8_t *w, size_t rb, size_t nsb, PackedK &pk) {
    pk.codes.resize(nsb * 64);
    pk.scale.resize(nsb * 128);
    pk.offset.resize(nsb * 128);
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    for (size_t b = 0; b < nsb; ++b) {
        for (int r = 0; r < 8; ++r) {
            const uint8_t *blk = w + r * rb + b * 210;
            const int8_t *sc = reinterpret_cast<const int8_t *>(blk + 192);
            const float d = f16c(blk + 208);
            for (int i = 0; i < 16; ++i) {  // 16-weight group i = half i%2 of sub-block i/2
                pk.scale[b * 128 + i * 8 + r] = d * float(sc[i]);
                pk.offset[b * 128 + i * 8 + r] = 32.0f * d * float(sc[i]);
            }
        }
        for (int h = 0; h < 2; ++h)  // weights 128h..: ql bytes 64h.., qh bytes 128+32h..
            for (int k = 0; k < 4; ++k) {
                __m256i q[8];
                for (int r = 0; r < 8; ++r) {
                    const uint8_t *row = w + r * rb + b * 210;
                    const __m256i src = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + 64 * h + 32 * (k & 1)));
                    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + 128 + 32 * h));
                    const __m256i lo = k < 2 ? _mm256_and_si256(src, m4) : _mm256_and_si256(_mm256_srli_epi16(src, 4), m4);
                    q[r] = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), m2), 4));
                }
                transpose8x32(q, &pk.codes[(b * 8 + 4 * h + k) * 8]);
            }
    }
}

// Integer dots of one transposed sub-block with one token, per 16-weight half, one lane per row.
// Q4_K codes (0..15) sum 4 products per half exactly in int16 (<= 15360) before widening; Q6_K's
// (0..63) widen every product (2 maddubs would reach 32004).
template <bool SIX> struct HalfSums {
    __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#if defined(EDGEAI_VNNI)
    void add(int half, __m256i q, __m256i x) { s[half] = dpbusd(s[half], q, x); }
    __m256i dots(int half) const { return s[half]; }
#else
    void add(int half, __m256i q, __m256i x) {
        s[half] = SIX ? _mm256_add_epi32(s[half], _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1)))
                      : _mm256_add_epi16(s[half], _mm256_maddubs_epi16(q, x));
    }
    __m256i dots(int half) const { return SIX ? s[half] : _mm256_madd_epi16(s[half], _mm256_set1_epi16(1)); }
#endif
};

// RN tokens against one transposed 8-row group of K-quant super-blocks.
template <bool SIX, int RN>
void packed8_k_tokens(const PackedK &pk, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t nsb) {
    __m256 acc[RN];
    for (auto &v : acc) v = _mm256_setzero_ps();
    for (size_t j = 0; j < nsb * 8; ++j) {  // the sub-blocks of a whole row
        const __m256i *W = &pk.codes[j * 8];
        const BlockQ8A *xb[RN];
        for (int t = 0; t < RN; ++t) xb[t] = xblocks(x, xs, t) + j;
        HalfSums<SIX> s[RN];
        for (int k = 0; k < 4; ++k) {
            const __m256i wl = _mm256_load_si256(W + k), wh = _mm256_load_si256(W + 4 + k);
            for (int t = 0; t < RN; ++t) {
                s[t].add(0, wl, x_group(xb[t], k));
                s[t].add(1, wh, x_group(xb[t], 4 + k));
            }
        }
        const float *sc = &pk.scale[j * 16], *off = &pk.offset[j * 16];
        for (int t = 0; t < RN; ++t) {
            const __m256 dx = _mm256_set1_ps(xb[t]->d);
            if (SIX) {
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t].dots(0)), _mm256_mul_ps(_mm256_loadu_ps(sc), dx), acc[t]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t].dots(1)), _mm256_mul_ps(_mm256_loadu_ps(sc + 8), dx), acc[t]);
                acc[t] = _mm256_fnmadd_ps(_mm256_loadu_ps(off), _mm256_set1_ps(xb[t]->hs[0]), acc[t]);
                acc[t] = _mm256_fnmadd_ps(_mm256_loadu_ps(off + 8), _mm256_set1_ps(xb[t]->hs[1]), acc[t]);
            } else {  // one scale and one min for the whole sub-block
                const __m256i dots = _mm256_add_epi32(s[t].dots(0), s[t].dots(1));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(_mm256_loadu_ps(sc), dx), acc[t]);
                acc[t] = _mm256_fnmadd_ps(_mm256_loadu_ps(off), _mm256_set1_ps(xb[t]->hs[0] + xb[t]->hs[1]), acc[t]);
            }
        }
    }
    for (int t = 0; t < RN; ++t) _mm256_storeu_ps(y + t * ldy, acc[t]);
}

constexpr int kTileRows = 4, kTileTokens = 3;
// From this many tokens on, rows' codes are transposed 8 at a time (pays from 8 tokens). Below it a
// batch takes the one-token kernels' accumulation order, so its logits equal decode's bit for bit:
// speculative decoding verifies up to 15 tokens (edgeai/speculative.py) and relies on it.
constexpr int kPackMinTokens = 16;

// All tokens for the RM rows at w: full RN-token tiles, then one narrower tile for the rest.
template <class K, int RM> void row_block(const Gemm &g, const uint8_t *w, float *y) {
    constexpr int RN = kTileTokens;
    int t = 0;
    for (; t + RN <= g.T; t += RN) K::template run<RM, RN>(w, g.row_bytes, g.x + t * g.x_stride, g.x_stride, y + t * g.ldy, g.ldy, g.n);
    const uint8_t *x = g.x + t * g.x_stride;
    float *yt = y + t * g.ldy;
    switch (g.T - t) {
        case 1: K::template run<RM, 1>(w, g.row_bytes, x, g.x_stride, yt, g.ldy, g.n); break;
        case 2: K::template run<RM, 2>(w, g.row_bytes, x, g.x_stride, yt, g.ldy, g.n); break;
        default: break;
    }
    static_assert(kTileTokens == 3, "the switch above covers remainders 1..kTileTokens-1");
}

template <class K> void gemm_tiled(const Gemm &g) {
    int r = 0;
    for (; r + kTileRows <= g.n_rows; r += kTileRows) row_block<K, kTileRows>(g, g.w + size_t(r) * g.row_bytes, g.y + r);
    for (; r < g.n_rows; ++r) row_block<K, 1>(g, g.w + size_t(r) * g.row_bytes, g.y + r);
}

// The legacy types: groups of 8 rows with one lane per row (rows8), 4 tokens at a time; from
// kPackMinTokens tokens on, each group transposed first (Packed8). The last rows (fewer than 8) by row
// tiles (Q4_0 / Q5_0) or by the one-row dot (Q4_1 / Q5_1), either for every token count alike.
template <bool FIVE, bool AFFINE> void gemm_legacy(const Gemm &g) {
    constexpr int RN = 4;
    int r = 0;
    if (g.T >= kPackMinTokens) {
        Packed8 pk;  // per call, not thread_local: TLS lookups in a shared library cost a call each
        const size_t nb = g.n / 32;
        for (; r + 8 <= g.n_rows; r += 8) {
            pack8_legacy<FIVE, AFFINE>(g.w + size_t(r) * g.row_bytes, g.row_bytes, nb, pk);
            int t = 0;
            for (; t + 4 <= g.T; t += 4)
                packed8_tokens<FIVE, AFFINE, 4>(pk, g.x + t * g.x_stride, g.x_stride, g.y + t * g.ldy + r, g.ldy, nb);
            for (; t < g.T; ++t) packed8_tokens<FIVE, AFFINE, 1>(pk, g.x + t * g.x_stride, g.x_stride, g.y + t * g.ldy + r, g.ldy, nb);
        }
    }
    for (; r + 8 <= g.n_rows; r += 8) {
        const uint8_t *w = g.w + size_t(r) * g.row_bytes;
        int t = 0;
        for (; t + RN <= g.T; t += RN)
            rows8_legacy<FIVE, AFFINE, RN>(w, g.row_bytes, g.x + t * g.x_stride, g.x_stride, g.y + t * g.ldy + r, g.ldy, g.n);
        const uint8_t *x = g.x + t * g.x_stride;
        float *y = g.y + t * g.ldy + r;
        switch (g.T - t) {
            case 1: rows8_legacy<FIVE, AFFINE, 1>(w, g.row_bytes, x, g.x_stride, y, g.ldy, g.n); break;
            case 2: rows8_legacy<FIVE, AFFINE, 2>(w, g.row_bytes, x, g.x_stride, y, g.ldy, g.n); break;
            case 3: rows8_legacy<FIVE, AFFINE, 3>(w, g.row_bytes, x, g.x_stride, y, g.ldy, g.n); break;
            default: break;
        }
    }
    if constexpr (AFFINE) {
        const Gemm rest{g.w + size_t(r) * g.row_bytes, g.row_bytes, g.n_rows - r, g.x, g.x_stride, g.T, g.y + r, g.ldy, g.n};
        gemm_by_dot<dot_legacy<FIVE, true>>(rest);
    } else {
        for (; r < g.n_rows; ++r) row_block<TileQ40_50<FIVE>, 1>(g, g.w + size_t(r) * g.row_bytes, g.y + r);
    }
}

// Q4_K / Q6_K: from kPackMinTokens tokens on, groups of 8 rows transposed per call (PackedK), 4
// tokens at a time; fewer tokens and the last rows (fewer than 8) by row tiles.
template <bool SIX> void gemm_k(const Gemm &g) {
    int r = 0;
    if (g.T >= kPackMinTokens) {
        PackedK pk;
        const size_t nsb = g.n / 256;
        for (; r + 8 <= g.n_rows; r += 8) {
            (SIX ? pack8_q6_k : pack8_q4_k)(g.w + size_t(r) * g.row_bytes, g.row_bytes, nsb, pk);
            int t = 0;
            for (; t + 4 <= g.T; t += 4) packed8_k_tokens<SIX, 4>(pk, g.x + t * g.x_stride, g.x_stride, g.y + t * g.ldy + r, g.ldy, nsb);
            for (; t < g.T; ++t) packed8_k_tokens<SIX, 1>(pk, g.x + t * g.x_stride, g.x_stride, g.y + t * g.ldy + r, g.ldy, nsb);
        }
    }
    const Gemm rest{g.w + size_t(r) * g.row_bytes, g.row_bytes, g.n_rows - r, g.x, g.x_stride, g.T, g.y + r, g.ldy, g.n};
    if (SIX) gemm_tiled<TileQ6_K>(rest);
    else gemm_tiled<TileQ4_K>(rest);
}

// Legacy types packed at load time: per 8-row group and block, the 8 f16 scales (Q4_1 / Q5_1: then
// the 8 f16 mins), then 4 chunks of 32 bytes; chunk c holds bytes 4c..4c+3 of each row's 16 code
// bytes (rows 0..7), so its low nibbles are weights 4c..4c+3 and its high nibbles weights
// 16+4c..16+4c+3 of the 8 rows. Q5 types then have 8 words of fifth bits, word 2c+h bit 4r+i =
// fifth bit of row r's weight 16h+4c+i. (Offsets in LegacyBlock.)
template <bool FIVE, bool AFFINE> void pack_legacy(const uint8_t *w, size_t rb, size_t rows, size_t n, uint8_t *out) {
    using L = LegacyBlock<FIVE, AFFINE>;
    for (size_t g = 0; g < rows / 8; ++g)
        for (size_t b = 0; b < n / 32; ++b, out += L::GROUP) {
            uint32_t masks[8] = {};
            for (int r = 0; r < 8; ++r) {
                const uint8_t *blk = w + (g * 8 + r) * rb + b * L::BYTES;
                std::memcpy(out + 2 * r, blk, 2);
                if (AFFINE) std::memcpy(out + 16 + 2 * r, blk + 2, 2);
                for (int c = 0; c < 4; ++c) std::memcpy(out + L::CODES + 32 * c + 4 * r, blk + L::QS + 4 * c, 4);
                if (FIVE) {
                    uint32_t qh;
                    std::memcpy(&qh, blk + L::QH, 4);
                    for (int c = 0; c < 4; ++c)
                        for (int h = 0; h < 2; ++h)
                            for (int i = 0; i < 4; ++i) masks[2 * c + h] |= ((qh >> (16 * h + 4 * c + i)) & 1u) << (4 * r + i);
                }
            }
            if (FIVE) std::memcpy(out + L::FIFTH, masks, 32);
        }
}

template <bool FIVE, bool AFFINE> void unpack_row_legacy(const uint8_t *packed, size_t, size_t n, size_t r, uint8_t *row) {
    using L = LegacyBlock<FIVE, AFFINE>;
    const size_t nb = n / 32, l = r % 8;
    const uint8_t *pw = packed + (r / 8) * nb * L::GROUP;
    for (size_t b = 0; b < nb; ++b, pw += L::GROUP, row += L::BYTES) {
        std::memcpy(row, pw + 2 * l, 2);
        if (AFFINE) std::memcpy(row + 2, pw + 16 + 2 * l, 2);
        for (int c = 0; c < 4; ++c) std::memcpy(row + L::QS + 4 * c, pw + L::CODES + 32 * c + 4 * l, 4);
        if (FIVE) {
            uint32_t masks[8], qh = 0;
            std::memcpy(masks, pw + L::FIFTH, 32);
            for (int c = 0; c < 4; ++c)
                for (int h = 0; h < 2; ++h)
                    for (int i = 0; i < 4; ++i) qh |= ((masks[2 * c + h] >> (4 * l + i)) & 1u) << (16 * h + 4 * c + i);
            std::memcpy(row + L::QH, &qh, 4);
        }
    }
}

// prefetch: read the next group ahead (for one token always: decode is bound by the weights' reads;
// for a tile of tokens in its first pass over the rows: the later passes find them in cache).
template <bool FIVE, bool AFFINE, int RN>
void packed_legacy_tokens(const uint8_t *pw, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t nb, size_t group_bytes,
                          bool prefetch) {
    using L = LegacyBlock<FIVE, AFFINE>;
    __m256 acc[RN];
    for (auto &v : acc) v = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (size_t b = 0; b < nb; ++b, pw += L::GROUP) {
        if (prefetch) prefetch_lines<L::GROUP>(pw + kPrefetchGroups * group_bytes);
        const BlockQ8A *xb[RN];
        for (int t = 0; t < RN; ++t) xb[t] = xblocks(x, xs, t) + b;
        auto xg = [&](int t, int k) {
            return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float *>(xb[t]->qs + 4 * k)));
        };
        BlockSums<FIVE> s[RN];
        for (int c = 0; c < 4; ++c) {
            const __m256i chunk = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(pw + L::CODES + 32 * c));
            __m256i lo = _mm256_and_si256(chunk, m4), hi = _mm256_and_si256(_mm256_srli_epi16(chunk, 4), m4);
            if (FIVE) {
                lo = _mm256_or_si256(lo, fifth_bits(pw + L::FIFTH + 8 * c));
                hi = _mm256_or_si256(hi, fifth_bits(pw + L::FIFTH + 8 * c + 4));
            }
            for (int t = 0; t < RN; ++t) {
                s[t].add(0, lo, xg(t, c));
                s[t].add(1, hi, xg(t, c + 4));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(pw)));
        const __m256 mw = AFFINE ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(pw + 16))) : _mm256_setzero_ps();
        for (int t = 0; t < RN; ++t) acc[t] = legacy_accumulate<FIVE, AFFINE>(acc[t], dw, mw, s[t].dots(), xb[t]);
    }
    for (int t = 0; t < RN; ++t) _mm256_storeu_ps(y + t * ldy, acc[t]);
}

#if defined(__AVX512BW__)
// ---- 512 bits for the load-time packed prefill (the AVX-512 sets): two neighbouring 8-row groups in
// one register (group g in the low half, g+1 in the high half), so each instruction does the work of
// two and each token's activation broadcast serves 16 rows. Per lane the integer sums and float steps
// are the 256-bit kernels' own, so every set still computes the same bits.

// Bytes of group g (low half) and group g+1 (high half), `group_bytes` apart.
inline __m512i load_pair(const uint8_t *p, size_t group_bytes) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p + group_bytes)), 1);
}

// The 8 f16 scales of group g and of group g+1, as 16 floats.
inline __m512 scales_pair(const uint8_t *p, size_t group_bytes) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))),
        _mm_loadu_si128(reinterpret_cast<const __m128i *>(p + group_bytes)), 1));
}

// Activation bytes 4k..4k+3 of a block in every lane.
inline __m512i x_group512(const BlockQ8A *xb, int k) {
    int32_t v;
    std::memcpy(&v, xb->qs + 4 * k, 4);
    return _mm512_set1_epi32(v);
}

template <bool FIVE> using BlockSums512 = BlockSumsT<V512, FIVE>;  // BlockSums for 16 rows

// fifth_bits of group g's word (low half) and group g+1's (high half).
inline __m512i fifth_bits_pair(const uint8_t *p, size_t group_bytes) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + group_bytes, 4);
    return _mm512_maskz_mov_epi8(static_cast<__mmask64>(lo) | (static_cast<__mmask64>(hi) << 32), _mm512_set1_epi8(0x10));
}

template <bool FIVE, bool AFFINE, int RN>
void packed16_legacy_tokens(const uint8_t *pw, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t nb, size_t group_bytes,
                            bool prefetch) {  // prefetch: as packed_legacy_tokens', the next pair of groups
    using L = LegacyBlock<FIVE, AFFINE>;
    __m512 acc[RN];
    for (auto &v : acc) v = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (size_t b = 0; b < nb; ++b, pw += L::GROUP) {
        if (prefetch) {
            prefetch_lines<L::GROUP>(pw + 2 * kPrefetchGroups * group_bytes);
            prefetch_lines<L::GROUP>(pw + (2 * kPrefetchGroups + 1) * group_bytes);
        }
        const BlockQ8A *xb[RN];
        for (int t = 0; t < RN; ++t) xb[t] = xblocks(x, xs, t) + b;
        BlockSums512<FIVE> s[RN];
        for (int c = 0; c < 4; ++c) {
            const __m512i chunk = load_pair(pw + L::CODES + 32 * c, group_bytes);
            __m512i lo = _mm512_and_si512(chunk, m4), hi = _mm512_and_si512(_mm512_srli_epi16(chunk, 4), m4);
            if (FIVE) {
                lo = _mm512_or_si512(lo, fifth_bits_pair(pw + L::FIFTH + 8 * c, group_bytes));
                hi = _mm512_or_si512(hi, fifth_bits_pair(pw + L::FIFTH + 8 * c + 4, group_bytes));
            }
            for (int t = 0; t < RN; ++t) {
                s[t].add(0, lo, x_group512(xb[t], c));
                s[t].add(1, hi, x_group512(xb[t], c + 4));
            }
        }
        const __m512 dw = scales_pair(pw, group_bytes), mw = AFFINE ? scales_pair(pw + 16, group_bytes) : _mm512_setzero_ps();
        for (int t = 0; t < RN; ++t) {  // as legacy_accumulate
            const float sx = xb[t]->hs[0] + xb[t]->hs[1];
            if (AFFINE) {
                acc[t] = _mm512_fmadd_ps(dw, _mm512_mul_ps(_mm512_cvtepi32_ps(s[t].dots()), _mm512_set1_ps(xb[t]->d)),
                                         _mm512_fmadd_ps(mw, _mm512_set1_ps(sx), acc[t]));
            } else {
                const __m512 inner = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t].dots()), _mm512_set1_ps(xb[t]->d),
                                                     _mm512_set1_ps(-(FIVE ? 16.0f : 8.0f) * sx));
                acc[t] = _mm512_fmadd_ps(dw, inner, acc[t]);
            }
        }
    }
    for (int t = 0; t < RN; ++t) _mm512_storeu_ps(y + t * ldy, acc[t]);
}

#endif

// Q8_0 packed at load time: per 8-row group and block, the 8 f16 scales, then 8 chunks of 32
// bytes; chunk k holds codes 4k..4k+3 of rows 0..7 (the transposed layout of Packed8, signed codes
// only: the absolute values are taken per use, so the packed copy is the plain rows' size).
constexpr size_t kGroupBytesQ8 = 8 * 34;

void pack_q8_0(const uint8_t *w, size_t rb, size_t rows, size_t n, uint8_t *out) {
    for (size_t g = 0; g < rows / 8; ++g)
        for (size_t b = 0; b < n / 32; ++b, out += kGroupBytesQ8)
            for (int r = 0; r < 8; ++r) {
                const uint8_t *blk = w + (g * 8 + r) * rb + b * 34;
                std::memcpy(out + 2 * r, blk, 2);
                for (int k = 0; k < 8; ++k) std::memcpy(out + 16 + 32 * k + 4 * r, blk + 2 + 4 * k, 4);
            }
}

void unpack_row_q8_0(const uint8_t *packed, size_t, size_t n, size_t r, uint8_t *row) {
    const size_t nb = n / 32, l = r % 8;
    const uint8_t *pw = packed + (r / 8) * nb * kGroupBytesQ8;
    for (size_t b = 0; b < nb; ++b, pw += kGroupBytesQ8, row += 34) {
        std::memcpy(row, pw + 2 * l, 2);
        for (int k = 0; k < 8; ++k) std::memcpy(row + 2 + 4 * k, pw + 16 + 32 * k + 4 * l, 4);
    }
}

template <int RN>
void packed_q8_0_tokens(const uint8_t *pw, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t nb, size_t group_bytes,
                        bool prefetch) {  // prefetch: as packed_legacy_tokens'
    __m256 acc[RN];
    for (auto &v : acc) v = _mm256_setzero_ps();
    for (size_t b = 0; b < nb; ++b, pw += kGroupBytesQ8) {
        if (prefetch) prefetch_lines<kGroupBytesQ8>(pw + kPrefetchGroups * group_bytes);
        const BlockQ8A *xb[RN];
        for (int t = 0; t < RN; ++t) xb[t] = xblocks(x, xs, t) + b;
        __m256i s[RN];
        for (int t = 0; t < RN; ++t) s[t] = _mm256_setzero_si256();
        for (int k = 0; k < 8; ++k) {
            const __m256i sw = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(pw + 16 + 32 * k));
            const __m256i aw = _mm256_sign_epi8(sw, sw);
            for (int t = 0; t < RN; ++t) {  // activation bytes 4k..4k+3 in every lane, with the codes' signs
                const __m256i xv = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float *>(xb[t]->qs + 4 * k)));
                s[t] = dpbusd(s[t], aw, _mm256_sign_epi8(xv, sw));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(pw)));
        for (int t = 0; t < RN; ++t)
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xb[t]->d)), _mm256_cvtepi32_ps(s[t]), acc[t]);
    }
    for (int t = 0; t < RN; ++t) _mm256_storeu_ps(y + t * ldy, acc[t]);
}

#if defined(__AVX512BW__)
template <int RN>
void packed16_q8_0_tokens(const uint8_t *pw, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t nb, size_t group_bytes,
                          bool prefetch) {  // prefetch: as packed16_legacy_tokens'
    __m512 acc[RN];
    for (auto &v : acc) v = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    for (size_t b = 0; b < nb; ++b, pw += kGroupBytesQ8) {
        if (prefetch) {
            prefetch_lines<kGroupBytesQ8>(pw + 2 * kPrefetchGroups * group_bytes);
            prefetch_lines<kGroupBytesQ8>(pw + (2 * kPrefetchGroups + 1) * group_bytes);
        }
        const BlockQ8A *xb[RN];
        for (int t = 0; t < RN; ++t) xb[t] = xblocks(x, xs, t) + b;
        __m512i s[RN];
        for (int t = 0; t < RN; ++t) s[t] = _mm512_setzero_si512();
        for (int k = 0; k < 8; ++k) {  // the sign trick without vpsignb: negate x where the code is negative
            const __m512i sw = load_pair(pw + 16 + 32 * k, group_bytes);
            const __m512i aw = _mm512_abs_epi8(sw);
            const __mmask64 neg = _mm512_movepi8_mask(sw);
            for (int t = 0; t < RN; ++t) {
                const __m512i xv = x_group512(xb[t], k);
                s[t] = V512::dpbusd(s[t], aw, _mm512_mask_sub_epi8(xv, neg, zero, xv));
            }
        }
        const __m512 dw = scales_pair(pw, group_bytes);
        for (int t = 0; t < RN; ++t)
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(xb[t]->d)), _mm512_cvtepi32_ps(s[t]), acc[t]);
    }
    for (int t = 0; t < RN; ++t) _mm512_storeu_ps(y + t * ldy, acc[t]);
}
#endif

// The tiling of the load-time packed kernels, K::tokens8<RN> computing RN tokens on one 8-row group
// and K::tokens16<RN> (AVX-512) on two neighbouring ones: tiles of 4 tokens, then the 1-3 left one by
// one (tiles of 2 and 3 measured slower than that: SmolLM2 Q4_0, a batched step of 2 sequences 9.0 ms
// against 6.9, AMD EPYC Zen 4, 1 thread). Each token's sums are the same in every tile, so every T
// gives a token the bits it gets alone. The first pass over a row group prefetches the next one (later
// passes find it in cache): without it a tile of 4 tokens waited on memory (4 sequences in one step:
// 15.0 ms before, 9.9 after; 8: 19.0, 15.4).
template <class K> void gemm_packed(const Gemm &g, size_t group_bytes) {
    const size_t nb = g.n / 32;
    auto tiles = [&](auto run) {  // run(std::integral_constant<int, RN>, first token)
        int t = 0;
        for (; t + 4 <= g.T; t += 4) run(std::integral_constant<int, 4>{}, t);
        for (; t < g.T; ++t) run(std::integral_constant<int, 1>{}, t);
    };
    int r = 0;
#if defined(__AVX512BW__)
    for (; g.T >= 4 && r + 16 <= g.n_rows; r += 16) {  // 16 rows x 4 tokens; the tokens left by 8-row groups
        const uint8_t *pw = g.w + size_t(r / 8) * group_bytes;
        tiles([&](auto rn, int t) {
            constexpr int RN = decltype(rn)::value;
            const uint8_t *x = g.x + t * g.x_stride;
            float *y = g.y + t * g.ldy + r;
            if (RN == 1) {
                K::template tokens8<1>(pw, x, g.x_stride, y, g.ldy, nb, group_bytes, true);
                K::template tokens8<1>(pw + group_bytes, x, g.x_stride, y + 8, g.ldy, nb, group_bytes, true);
            } else {
                K::template tokens16<RN>(pw, x, g.x_stride, y, g.ldy, nb, group_bytes, t == 0);
            }
        });
    }
#endif
    for (; r + 8 <= g.n_rows; r += 8) {
        const uint8_t *pw = g.w + size_t(r / 8) * group_bytes;
        tiles([&](auto rn, int t) {
            constexpr int RN = decltype(rn)::value;
            K::template tokens8<RN>(pw, g.x + t * g.x_stride, g.x_stride, g.y + t * g.ldy + r, g.ldy, nb, group_bytes, RN == 1 || t == 0);
        });
    }
}

template <bool FIVE, bool AFFINE> struct PackedLegacy {
    template <int RN> static void tokens8(const uint8_t *pw, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t nb,
                                          size_t group_bytes, bool prefetch) {
        packed_legacy_tokens<FIVE, AFFINE, RN>(pw, x, xs, y, ldy, nb, group_bytes, prefetch);
    }
#if defined(__AVX512BW__)
    template <int RN> static void tokens16(const uint8_t *pw, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t nb,
                                           size_t group_bytes, bool prefetch) {
        packed16_legacy_tokens<FIVE, AFFINE, RN>(pw, x, xs, y, ldy, nb, group_bytes, prefetch);
    }
#endif
};

struct PackedQ8_0 {
    template <int RN> static void tokens8(const uint8_t *pw, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t nb,
                                          size_t group_bytes, bool prefetch) {
        packed_q8_0_tokens<RN>(pw, x, xs, y, ldy, nb, group_bytes, prefetch);
    }
#if defined(__AVX512BW__)
    template <int RN> static void tokens16(const uint8_t *pw, const uint8_t *x, size_t xs, float *y, size_t ldy, size_t nb,
                                           size_t group_bytes, bool prefetch) {
        packed16_q8_0_tokens<RN>(pw, x, xs, y, ldy, nb, group_bytes, prefetch);
    }
#endif
};

template <bool FIVE, bool AFFINE> void gemm_packed_legacy(const Gemm &g) {
    gemm_packed<PackedLegacy<FIVE, AFFINE>>(g, g.n / 32 * LegacyBlock<FIVE, AFFINE>::GROUP);
}

void gemm_packed_q8_0(const Gemm &g) { gemm_packed<PackedQ8_0>(g, g.n / 32 * kGroupBytesQ8); }

// Q8_0 on plain rows: 8-row groups transposed per call for any batch, one token by rows8_signed,
// the last rows by tiles. Whole-block integer sums scaled once per block, as the load-time packed
// kernel does, so that plain and packed rows give bit-identical results (dense layers streamed
// from disk are not packed, and must compute what the resident layers compute).
void gemm_q8_0(const Gemm &g) {
    int r = 0;
    if (g.T >= 2) {
        Packed8 pk;
        const size_t nb = g.n / 32;
        for (; r + 8 <= g.n_rows; r += 8) {
            pack8_signed<Q8_0Block>(g.w + size_t(r) * g.row_bytes, g.row_bytes, nb, pk);
            int t = 0;
            for (; t + 4 <= g.T; t += 4) packed8_q8_0_tokens<4>(pk, g.x + t * g.x_stride, g.x_stride, g.y + t * g.ldy + r, g.ldy, nb);
            for (; t < g.T; ++t) packed8_q8_0_tokens<1>(pk, g.x + t * g.x_stride, g.x_stride, g.y + t * g.ldy + r, g.ldy, nb);
        }
    }
    if (g.T == 1)
        for (; r + 8 <= g.n_rows; r += 8)
            rows8_signed<Q8_0Block>(g.w + size_t(r) * g.row_bytes, g.row_bytes, reinterpret_cast<const BlockQ8A *>(g.x), g.y + r, g.n);
    gemm_tiled<TileQ8_0>({g.w + size_t(r) * g.row_bytes, g.row_bytes, g.n_rows - r, g.x, g.x_stride, g.T, g.y + r, g.ldy, g.n});
}

// ---- MXFP4: the 4-bit codes become their doubled E2M1 values (signed bytes, |v| <= 12) by one
// table lookup, then multiply as Q8_0's codes do (sign trick); the scale 2^(e-128) is a float.
// Every path takes one float step per block and row: acc = fma(d_w * d_x, float(integer dot), acc),
// whole-block integer dots exact in every set, so decode, batches (plain rows, transposed groups),
// the rows left over and every x86 set give the same bits.

// The 32 weights of a block's 16 code bytes as signed bytes (weights 0-15, then 16-31).
inline __m256i mxfp4_values(const uint8_t *qs) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i *>(E2M1_DOUBLED)));
    return _mm256_shuffle_epi8(table, nibbles32(qs));
}

inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

// fma(a, b, c) rounded once, as one lane of _mm256_fmadd_ps.
inline float fma1(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

float dot_mxfp4(const uint8_t *row, const void *xv, size_t n) {
    const BlockQ8A *x = static_cast<const BlockQ8A *>(xv);
    float acc = 0.0f;
    for (size_t b = 0; b < n / 32; ++b, row += 17, ++x)
        acc = fma1(e8m0_half(row[0]) * x->d, static_cast<float>(hsum_i32(signed_dot(mxfp4_values(row + 1), load_x(x)))), acc);
    return acc;
}

// The 8 rows' scales of block b, one lane per row (e8m0_half in 8 lanes).
inline __m256 mxfp4_scales8(const uint8_t *w, size_t rb, size_t b) {
    const uint8_t *p = w + b * 17;
    const __m256i e = _mm256_setr_epi32(p[0], p[rb], p[2 * rb], p[3 * rb], p[4 * rb], p[5 * rb], p[6 * rb], p[7 * rb]);
    const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
    const __m256i subnormal = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);  // e 0, 1
    const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e);
    return _mm256_castsi256_ps(_mm256_blendv_epi8(normal, subnormal, small));
}

// MXFP4 as a signed-byte block type (see Q8_0Block): 8-row groups decode by rows8_signed<MXFP4Block>, and
// pack8_signed<MXFP4Block> transposes them into Q8_0's layout of Packed8, which
// packed8_q8_0_tokens<RN, SMALL> multiplies with any number of tokens.
struct MXFP4Block {
    static constexpr size_t BYTES = 17;
    static __m256i values(const uint8_t *blk) { return mxfp4_values(blk + 1); }
    static __m256 scales8(const uint8_t *w, size_t rb, size_t b) { return mxfp4_scales8(w, rb, b); }
};

// One token: 8-row groups by rows8_signed; more tokens: 8-row groups transposed, 4 tokens at a time;
// the last rows (fewer than 8) one dot per token.
void gemm_mxfp4(const Gemm &g) {
    int r = 0;
    const size_t nb = g.n / 32;
    if (g.T >= 2) {
        Packed8 pk;
        for (; r + 8 <= g.n_rows; r += 8) {
            pack8_signed<MXFP4Block>(g.w + size_t(r) * g.row_bytes, g.row_bytes, nb, pk);
            int t = 0;
            for (; t + 4 <= g.T; t += 4) packed8_q8_0_tokens<4, true>(pk, g.x + t * g.x_stride, g.x_stride, g.y + t * g.ldy + r, g.ldy, nb);
            for (; t < g.T; ++t) packed8_q8_0_tokens<1, true>(pk, g.x + t * g.x_stride, g.x_stride, g.y + t * g.ldy + r, g.ldy, nb);
        }
    } else {
        for (; r + 8 <= g.n_rows; r += 8)
            rows8_signed<MXFP4Block>(g.w + size_t(r) * g.row_bytes, g.row_bytes, reinterpret_cast<const BlockQ8A *>(g.x), g.y + r, g.n);
    }
    gemm_by_dot<dot_mxfp4>({g.w + size_t(r) * g.row_bytes, g.row_bytes, g.n_rows - r, g.x, g.x_stride, g.T, g.y + r, g.ldy, g.n});
}

const Ops OPS = {
#if defined(EDGEAI_AVX512_VNNI)
    "avx512-vnni",
#elif defined(EDGEAI_AVX_VNNI)
    "avx-vnni",
#elif defined(EDGEAI_AVX512)
    "avx512",
#else
    "avx2",
#endif
    {dot_f32, dot_f16_row, dot_bf16, dot_legacy<false, false>, dot_legacy<false, true>, dot_legacy<true, false>,
     dot_legacy<true, true>, dot_q8_0, dot_q45_k<false>, dot_q45_k<true>, dot_q6_k, dot_mxfp4},
    {gemm_by_dot<dot_f32>, gemm_by_dot<dot_f16_row>, gemm_by_dot<dot_bf16>, gemm_legacy<false, false>,
     gemm_legacy<false, true>, gemm_legacy<true, false>, gemm_legacy<true, true>,
     gemm_q8_0, gemm_k<false>, gemm_by_dot<dot_q45_k<true>>, gemm_k<true>, gemm_mxfp4},
    quantize_act,
    dot_f16v,
    axpy_f16v,
    dot_q8_0_f32v,
    axpy_q8_0v,
    dot_q4_0_f32v,
    axpy_q4_0v,
    {nullptr, nullptr, nullptr, pack_legacy<false, false>, pack_legacy<false, true>, pack_legacy<true, false>,
     pack_legacy<true, true>, pack_q8_0},
    {nullptr, nullptr, nullptr, gemm_packed_legacy<false, false>, gemm_packed_legacy<false, true>,
     gemm_packed_legacy<true, false>, gemm_packed_legacy<true, true>, gemm_packed_q8_0},
    {nullptr, nullptr, nullptr, unpack_row_legacy<false, false>, unpack_row_legacy<false, true>,
     unpack_row_legacy<true, false>, unpack_row_legacy<true, true>, unpack_row_q8_0},
    scores_f16,
    weighted_sum_f16,
    silu_mul,
    gelu_mul,
};

}  // namespace

#if defined(EDGEAI_AVX512_VNNI)
const Ops *ops_avx512_vnni() { return &OPS; }
#elif defined(EDGEAI_AVX_VNNI)
const Ops *ops_avx_vnni() { return &OPS; }
#elif defined(EDGEAI_AVX512)
const Ops *ops_avx512() { return &OPS; }
#else
const Ops *ops_avx2() { return &OPS; }
#endif

}  // namespace edgeai::kern
