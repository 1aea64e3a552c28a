#include "blocks.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "parallel.hpp"
#include "quant.hpp"

namespace edgeai {

namespace {

constexpr int QK = 32;     // legacy block and K-quant sub-block (Q4_K, Q5_K)
constexpr int QK_K = 256;  // K-quant super-block
constexpr int kSearchSteps = 20;

inline int nearest_int(float v) { return static_cast<int>(std::roundf(v)); }
// Round half to even in one instruction (cvtss2si): for the trial codes of scale searches, where ties
// do not matter and roundf (a library call without SSE4.1) dominated the time. RTN paths keep
// nearest_int: their bytes must equal the numpy reference's.
inline int nearest_int_fast(float v) { return static_cast<int>(std::lrintf(v)); }
inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

inline void put_f16(uint8_t *dst, float v) {
    const uint16_t h = fp32_to_fp16(v);
    std::memcpy(dst, &h, 2);
}
inline float get_f16(const uint8_t *src) {
    uint16_t h;
    std::memcpy(&h, src, 2);
    return fp16_to_fp32(h);
}

// Weighted sum of squared errors of x ~= scale * L + offset.
template <typename Code>
float weighted_error(const float *x, const float *w, const Code *L, int n, float scale, float offset) {
    float err = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float diff = scale * static_cast<float>(L[i]) + offset - x[i];
        err += w[i] * diff * diff;
    }
    return err;
}

// The value of largest magnitude, with its sign (the first one on ties, as ggml picks it).
float signed_absmax(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < n; ++i) {
        if (std::fabs(x[i]) > amax) {
            amax = std::fabs(x[i]);
            max = x[i];
        }
    }
    return max;
}

// ---- symmetric fit: x ~= scale * L, L in [-nmax, nmax-1] ------------------------------------
// The value of largest magnitude maps to -nmax, the level that has no positive twin.
float fit_symmetric(const float *x, const float *w, int n, int nmax, Fit fit, int8_t *L) {
    const float max = signed_absmax(x, n), amax = std::fabs(max);
    if (amax == 0.0f) {
        std::fill(L, L + n, 0);
        return 0.0f;
    }
    float best_scale = max / static_cast<float>(-nmax);
    {
        const float iscale = 1.0f / best_scale;
        for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1));
    }
    if (fit == Fit::RTN) return best_scale;
    // Each trial's error comes from its sums: for the least-squares scale of codes l,
    // sum w (x - scale l)^2 = sum w x^2 - (sum w x l)^2 / sum w l^2; the codes are rebuilt once at the end.
    float sxx = 0.0f;
    for (int i = 0; i < n; ++i) sxx += w[i] * x[i] * x[i];
    float best_err = weighted_error(x, w, L, n, best_scale, 0.0f);
    float best_iscale = 0.0f;
    for (int step = -kSearchSteps / 2; step <= kSearchSteps / 2; ++step) {
        const float iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(step)) / max;
        float sumlx = 0.0f, suml2 = 0.0f;
        for (int i = 0; i < n; ++i) {
            const float l = static_cast<float>(clampi(nearest_int_fast(iscale * x[i]), -nmax, nmax - 1));
            sumlx += w[i] * x[i] * l;
            suml2 += w[i] * l * l;
        }
        if (suml2 <= 0.0f) continue;
        const float err = sxx - sumlx * sumlx / suml2;
        if (err < best_err) {
            best_err = err;
            best_scale = sumlx / suml2;  // least squares for these codes
            best_iscale = iscale;
        }
    }
    if (best_iscale != 0.0f) {
        for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(clampi(nearest_int_fast(best_iscale * x[i]), -nmax, nmax - 1));
    }
    return best_scale;
}

// ---- affine fit: x ~= scale * L + offset, L in [0, nmax] --------------------------------------
// K-quants store the offset as a non-negative "min" that is subtracted, so offset <= 0 there.
void fit_affine(const float *x, const float *w, int n, int nmax, bool offset_nonpositive, Fit fit, uint8_t *L,
                float *scale_out, float *offset_out) {
    float min = x[0], max = x[0];
    for (int i = 1; i < n; ++i) {
        min = std::min(min, x[i]);
        max = std::max(max, x[i]);
    }
    if (offset_nonpositive && min > 0.0f) min = 0.0f;
    if (max == min) {
        std::fill(L, L + n, 0);
        *scale_out = 0.0f;
        *offset_out = min;
        return;
    }
    float best_scale = (max - min) / static_cast<float>(nmax), best_offset = min;
    {
        const float iscale = 1.0f / best_scale;
        for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(clampi(nearest_int(iscale * (x[i] - min)), 0, nmax));
    }
    if (fit == Fit::SEARCH) {
        // As in fit_symmetric, each trial's error from its sums (no second pass over the block).
        float sw = 0, sx = 0, sxx = 0;
        for (int i = 0; i < n; ++i) {
            sw += w[i];
            sx += w[i] * x[i];
            sxx += w[i] * x[i] * x[i];
        }
        float best_err = weighted_error(x, w, L, n, best_scale, best_offset);
        float best_iscale = 0.0f;
        for (int step = 0; step <= kSearchSteps; ++step) {
            const float iscale = (-1.0f + 0.1f * static_cast<float>(step) + static_cast<float>(nmax)) / (max - min);
            float sl = 0, sll = 0, slx = 0;
            for (int i = 0; i < n; ++i) {
                const float fl = static_cast<float>(clampi(nearest_int_fast(iscale * (x[i] - min)), 0, nmax));
                sl += w[i] * fl;
                sll += w[i] * fl * fl;
                slx += w[i] * fl * x[i];
            }
            const float det = sw * sll - sl * sl;
            if (det <= 0.0f) continue;
            float scale = (sw * slx - sl * sx) / det;
            float offset = (sll * sx - sl * slx) / det;
            if (offset_nonpositive && offset > 0.0f) {
                offset = 0.0f;
                scale = sll > 0.0f ? slx / sll : 0.0f;
            }
            if (scale <= 0.0f) continue;
            // sum w (x - scale l - offset)^2 expanded
            const float err = sxx - 2.0f * scale * slx - 2.0f * offset * sx + scale * scale * sll +
                              2.0f * scale * offset * sl + offset * offset * sw;
            if (err < best_err) {
                best_err = err;
                best_scale = scale;
                best_offset = offset;
                best_iscale = iscale;
            }
        }
        if (best_iscale != 0.0f) {
            for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(clampi(nearest_int_fast(best_iscale * (x[i] - min)), 0, nmax));
        }
    }
    *scale_out = best_scale;
    *offset_out = best_offset;
}

// ---- legacy types: gguf-py's algorithm for RTN -------------------------------------------------
// Codes of one 32-block after its scale fields: [qh: 4 bytes, bit i = bit 4 of code i] (5-bit types),
// then 16 bytes with code j in the low nibble and code j+16 in the high nibble.
void pack_legacy_codes(const int *q, uint8_t *dst, bool five_bit) {
    if (five_bit) {
        uint32_t qh = 0;
        for (int i = 0; i < QK; ++i) qh |= static_cast<uint32_t>((q[i] >> 4) & 1) << i;
        std::memcpy(dst, &qh, 4);
        dst += 4;
    }
    for (int j = 0; j < QK / 2; ++j) dst[j] = static_cast<uint8_t>((q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4));
}

void quantize_q4_0_q5_0(const float *x, const float *w, uint8_t *out, Fit fit, bool five_bit) {
    const int nmax = five_bit ? 16 : 8;
    int q[QK];
    float d;
    if (fit == Fit::RTN) {
        const float max = signed_absmax(x, QK);
        d = max / static_cast<float>(-nmax);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const float bias = static_cast<float>(nmax) + 0.5f;
        for (int i = 0; i < QK; ++i) q[i] = std::min(2 * nmax - 1, static_cast<int>(x[i] * id + bias));
    } else {
        int8_t L[QK];
        const float scale = fit_symmetric(x, w, QK, nmax, fit, L);
        d = fp16_to_fp32(fp32_to_fp16(scale));
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < QK; ++i) q[i] = clampi(nearest_int(x[i] * id), -nmax, nmax - 1) + nmax;
    }
    put_f16(out, d);
    pack_legacy_codes(q, out + 2, five_bit);
}

void quantize_q4_1_q5_1(const float *x, const float *w, uint8_t *out, Fit fit, bool five_bit) {
    const int nmax = five_bit ? 31 : 15;
    int q[QK];
    float d, m;
    if (fit == Fit::RTN) {
        float min = x[0], max = x[0];
        for (int i = 1; i < QK; ++i) {
            min = std::min(min, x[i]);
            max = std::max(max, x[i]);
        }
        d = (max - min) / static_cast<float>(nmax);
        m = min;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < QK; ++i) q[i] = std::min(nmax, static_cast<int>((x[i] - min) * id + 0.5f));
    } else {
        uint8_t L[QK];
        float scale, offset;
        fit_affine(x, w, QK, nmax, false, fit, L, &scale, &offset);
        d = fp16_to_fp32(fp32_to_fp16(scale));
        m = fp16_to_fp32(fp32_to_fp16(offset));
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < QK; ++i) q[i] = clampi(nearest_int((x[i] - m) * id), 0, nmax);
    }
    put_f16(out, d);
    put_f16(out + 2, m);
    pack_legacy_codes(q, out + 4, five_bit);
}

// ---- Q4_K / Q5_K: 8 sub-blocks of 32, 6-bit scales and mins under fp16 d and dmin ----------------
// Codes for fixed quantized scales; returns the weighted error.
float kquant_codes(const float *x, const float *w, int nmax, float d, float dmin, const uint8_t *sc,
                   const uint8_t *mn, uint8_t *L) {
    float err = 0.0f;
    for (int j = 0; j < QK_K / QK; ++j) {
        const float ds = d * static_cast<float>(sc[j]);
        const float dm = dmin * static_cast<float>(mn[j]);
        for (int i = j * QK; i < (j + 1) * QK; ++i) {
            const int l = ds > 0.0f ? clampi(nearest_int((x[i] + dm) / ds), 0, nmax) : 0;
            L[i] = static_cast<uint8_t>(l);
            const float diff = ds * static_cast<float>(l) - dm - x[i];
            err += w[i] * diff * diff;
        }
    }
    return err;
}

void quantize_q45_k(const float *x, const float *w, uint8_t *out, Fit fit, bool five_bit) {
    const int nmax = five_bit ? 31 : 15;
    constexpr int NS = QK_K / QK;
    float scales[NS], mins[NS];
    uint8_t L[QK_K];
    for (int j = 0; j < NS; ++j) {
        float offset;
        fit_affine(x + j * QK, w + j * QK, QK, nmax, true, fit, L + j * QK, &scales[j], &offset);
        scales[j] = std::max(scales[j], 0.0f);
        mins[j] = -offset;  // >= 0
    }
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < NS; ++j) {
        max_scale = std::max(max_scale, scales[j]);
        max_min = std::max(max_min, mins[j]);
    }
    float d = fp16_to_fp32(fp32_to_fp16(max_scale / 63.0f));
    float dmin = fp16_to_fp32(fp32_to_fp16(max_min / 63.0f));
    uint8_t sc[NS], mn[NS];
    for (int j = 0; j < NS; ++j) {
        sc[j] = static_cast<uint8_t>(d > 0.0f ? std::min(63, nearest_int(scales[j] / d)) : 0);
        mn[j] = static_cast<uint8_t>(dmin > 0.0f ? std::min(63, nearest_int(mins[j] / dmin)) : 0);
    }
    float err = kquant_codes(x, w, nmax, d, dmin, sc, mn, L);
    if (fit == Fit::SEARCH) {
        // Refit d and dmin jointly for the chosen codes: x ~= d * (sc*L) - dmin * mn.
        float saa = 0, sab = 0, sbb = 0, sax = 0, sbx = 0;
        for (int i = 0; i < QK_K; ++i) {
            const float a = static_cast<float>(sc[i / QK]) * static_cast<float>(L[i]);
            const float b = static_cast<float>(mn[i / QK]);
            saa += w[i] * a * a;
            sab += w[i] * a * b;
            sbb += w[i] * b * b;
            sax += w[i] * a * x[i];
            sbx += w[i] * b * x[i];
        }
        const float det = saa * sbb - sab * sab;
        if (det > 0.0f) {
            const float d2 = fp16_to_fp32(fp32_to_fp16((sax * sbb - sab * sbx) / det));
            const float dmin2 = fp16_to_fp32(fp32_to_fp16((sax * sab - saa * sbx) / det));
            if (d2 > 0.0f && dmin2 >= 0.0f) {
                uint8_t L2[QK_K];
                const float err2 = kquant_codes(x, w, nmax, d2, dmin2, sc, mn, L2);
                if (err2 < err) {
                    d = d2;
                    dmin = dmin2;
                    std::copy(L2, L2 + QK_K, L);
                }
            }
        }
    }
    put_f16(out, d);
    put_f16(out + 2, dmin);
    uint8_t *s = out + 4;
    for (int j = 0; j < 4; ++j) {
        s[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = static_cast<uint8_t>((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
        s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
    }
    uint8_t *qh = out + 16;
    uint8_t *ql = five_bit ? out + 48 : out + 16;
    if (five_bit) std::memset(qh, 0, 32);
    for (int c = 0; c < 4; ++c) {  // 32 bytes hold sub-blocks 2c (low nibbles) and 2c+1 (high nibbles)
        for (int l = 0; l < QK; ++l) {
            const uint8_t lo = L[(2 * c) * QK + l], hi = L[(2 * c + 1) * QK + l];
            ql[c * QK + l] = static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
            if (five_bit) qh[l] |= static_cast<uint8_t>(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
        }
    }
}

// ---- Q6_K: 16 sub-blocks of 16, int8 scales under one fp16 d, codes in [-32, 31] --------------------
float q6_k_codes(const float *x, const float *w, float d, const int8_t *sc, int8_t *L) {
    float err = 0.0f;
    for (int i = 0; i < QK_K; ++i) {
        const float ds = d * static_cast<float>(sc[i / 16]);
        const int l = ds != 0.0f ? clampi(nearest_int(x[i] / ds), -32, 31) : 0;
        L[i] = static_cast<int8_t>(l);
        const float diff = ds * static_cast<float>(l) - x[i];
        err += w[i] * diff * diff;
    }
    return err;
}

void quantize_q6_k(const float *x, const float *w, uint8_t *out, Fit fit) {
    constexpr int NS = QK_K / 16;
    float scales[NS];
    int8_t L[QK_K];
    float max_abs = 0.0f, max_scale = 0.0f;
    for (int j = 0; j < NS; ++j) {
        scales[j] = fit_symmetric(x + 16 * j, w + 16 * j, 16, 32, fit, L + 16 * j);
        if (std::fabs(scales[j]) > max_abs) {
            max_abs = std::fabs(scales[j]);
            max_scale = scales[j];
        }
    }
    int8_t sc[NS] = {0};
    float d = 0.0f;
    if (max_abs > 0.0f) {
        d = fp16_to_fp32(fp32_to_fp16(max_scale / -128.0f));
        for (int j = 0; j < NS; ++j) sc[j] = static_cast<int8_t>(d != 0.0f ? clampi(nearest_int(scales[j] / d), -128, 127) : 0);
    }
    float err = q6_k_codes(x, w, d, sc, L);
    if (fit == Fit::SEARCH && d != 0.0f) {
        float saa = 0, sax = 0;
        for (int i = 0; i < QK_K; ++i) {
            const float a = static_cast<float>(sc[i / 16]) * static_cast<float>(L[i]);
            saa += w[i] * a * a;
            sax += w[i] * a * x[i];
        }
        if (saa > 0.0f) {
            const float d2 = fp16_to_fp32(fp32_to_fp16(sax / saa));
            int8_t L2[QK_K];
            const float err2 = q6_k_codes(x, w, d2, sc, L2);
            if (err2 < err) {
                d = d2;
                std::copy(L2, L2 + QK_K, L);
            }
        }
    }
    uint8_t *ql = out, *qh = out + 128;
    int8_t *scales_out = reinterpret_cast<int8_t *>(out + 192);
    std::memset(ql, 0, 128);
    std::memset(qh, 0, 64);
    for (int i = 0; i < QK_K; ++i) {
        const int q = L[i] + 32;  // 0..63
        const int g = i / 32, pos = i % 32;
        const int h = g / 4, s = (g % 4) / 2, b = (g % 2) * 32 + pos;
        ql[h * 64 + b] |= static_cast<uint8_t>((q & 15) << (4 * s));
        qh[h * 32 + pos] |= static_cast<uint8_t>((q >> 4) << (2 * (g % 4)));
    }
    std::memcpy(scales_out, sc, NS);
    put_f16(out + 208, d);
}

// ---- IQ4_NL / IQ4_XS: x ~= scale * kIQ4[L], a non-uniform 4-bit grid ------------------------------
constexpr float kIQ4[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
constexpr int kIQ4Zero = 8;  // the grid point nearest 0 (the code of an all-zero block)

// The nearest grid point (ties: the lower one), as the numpy reference's argmin.
inline int iq4_index(float v) {
    int best = 0;
    float best_dist = std::fabs(v - kIQ4[0]);
    for (int k = 1; k < 16; ++k) {
        const float dist = std::fabs(v - kIQ4[k]);
        if (dist < best_dist) {
            best_dist = dist;
            best = k;
        }
    }
    return best;
}

inline void iq4_codes(const float *x, int n, float scale, uint8_t *L) {
    const float id = scale != 0.0f ? 1.0f / scale : 0.0f;
    for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(iq4_index(x[i] * id));
}

// RTN: the value of largest magnitude lands on -127. SEARCH: llama.cpp's trials of inverse scales
// around that one, each scored by its weighted least-squares scale.
float fit_iq4(const float *x, const float *w, int n, Fit fit, uint8_t *L) {
    const float max = signed_absmax(x, n), amax = std::fabs(max);
    if (amax == 0.0f) {
        std::fill(L, L + n, kIQ4Zero);
        return max / kIQ4[0];  // -0, as the numpy reference writes it
    }
    const float scale = max / kIQ4[0];
    iq4_codes(x, n, scale, L);
    if (fit == Fit::RTN) return scale;
    float best_scale = scale, best_score = -1.0f, best_id = 1.0f / scale;
    for (int step = -7; step <= 8; ++step) {  // step 8: the RTN codes themselves, refit
        const float id = step == 8 ? 1.0f / scale : (static_cast<float>(step) + kIQ4[0]) / max;
        float sumqx = 0.0f, sumq2 = 0.0f;
        for (int i = 0; i < n; ++i) {
            const float q = kIQ4[iq4_index(x[i] * id)];
            sumqx += w[i] * q * x[i];
            sumq2 += w[i] * q * q;
        }
        if (sumq2 <= 0.0f) continue;
        const float score = sumqx * sumqx / sumq2;  // error reduction of the least-squares scale
        if (score > best_score) {
            best_score = score;
            best_scale = sumqx / sumq2;
            best_id = id;
        }
    }
    for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(iq4_index(x[i] * best_id));
    return best_scale;
}

void pack_iq4_nibbles(const uint8_t *L, uint8_t *dst) {
    for (int j = 0; j < QK / 2; ++j) dst[j] = static_cast<uint8_t>((L[j] & 15) | ((L[j + QK / 2] & 15) << 4));
}

void quantize_iq4_nl(const float *x, const float *w, uint8_t *out, Fit fit) {
    uint8_t L[QK];
    const float scale = fit_iq4(x, w, QK, fit, L);
    const float d = fp16_to_fp32(fp32_to_fp16(scale));
    if (fit == Fit::SEARCH) iq4_codes(x, QK, d, L);  // codes for the scale the decoder sees
    put_f16(out, scale);
    pack_iq4_nibbles(L, out + 2);
}

float iq4_xs_codes(const float *x, const float *w, float d, const int *ls, uint8_t *L) {
    float err = 0.0f;
    for (int j = 0; j < QK_K / QK; ++j) {
        const float dl = d * static_cast<float>(ls[j]);
        iq4_codes(x + j * QK, QK, dl, L + j * QK);
        for (int i = j * QK; i < (j + 1) * QK; ++i) {
            const float diff = dl * kIQ4[L[i]] - x[i];
            err += w[i] * diff * diff;
        }
    }
    return err;
}

void quantize_iq4_xs(const float *x, const float *w, uint8_t *out, Fit fit) {
    constexpr int NS = QK_K / QK;
    float scales[NS];
    uint8_t L[QK_K];
    float max_abs = 0.0f, max_scale = 0.0f;
    for (int j = 0; j < NS; ++j) {
        scales[j] = fit_iq4(x + j * QK, w + j * QK, QK, fit, L + j * QK);
        if (j == 0 || std::fabs(scales[j]) > max_abs) {  // the first of the largest, as numpy's argmax
            max_abs = std::fabs(scales[j]);
            max_scale = scales[j];
        }
    }
    const float d_raw = max_scale / -32.0f;
    const float id = d_raw != 0.0f ? 1.0f / d_raw : 0.0f;
    int ls[NS];
    for (int j = 0; j < NS; ++j) ls[j] = clampi(nearest_int(id * scales[j]), -32, 31);
    float d = fp16_to_fp32(fp32_to_fp16(d_raw));
    float err = iq4_xs_codes(x, w, d, ls, L);
    if (fit == Fit::SEARCH && d != 0.0f) {  // refit d by weighted least squares for these codes
        float saa = 0, sax = 0;
        for (int i = 0; i < QK_K; ++i) {
            const float a = static_cast<float>(ls[i / QK]) * kIQ4[L[i]];
            saa += w[i] * a * a;
            sax += w[i] * a * x[i];
        }
        if (saa > 0.0f) {
            const float d2 = fp16_to_fp32(fp32_to_fp16(sax / saa));
            uint8_t L2[QK_K];
            if (iq4_xs_codes(x, w, d2, ls, L2) < err) {
                d = d2;
                std::copy(L2, L2 + QK_K, L);
            }
        }
    }
    put_f16(out, fit == Fit::SEARCH ? d : d_raw);
    uint16_t scales_h = 0;
    for (int j = 0; j < NS; ++j) {
        const int u = ls[j] + 32;  // 0..63
        scales_h = static_cast<uint16_t>(scales_h | ((u >> 4) << (2 * j)));
        if (j % 2 == 0) out[4 + j / 2] = static_cast<uint8_t>(u & 15);
        else out[4 + j / 2] = static_cast<uint8_t>(out[4 + j / 2] | ((u & 15) << 4));
    }
    std::memcpy(out + 2, &scales_h, 2);
    for (int j = 0; j < NS; ++j) pack_iq4_nibbles(L + j * QK, out + 8 + 16 * j);
}

void quantize_block(BlockType t, Fit fit, const float *x, const float *w, uint8_t *out) {
    switch (t) {
        case BlockType::Q4_0: return quantize_q4_0_q5_0(x, w, out, fit, false);
        case BlockType::Q5_0: return quantize_q4_0_q5_0(x, w, out, fit, true);
        case BlockType::Q4_1: return quantize_q4_1_q5_1(x, w, out, fit, false);
        case BlockType::Q5_1: return quantize_q4_1_q5_1(x, w, out, fit, true);
        case BlockType::Q4_K: return quantize_q45_k(x, w, out, fit, false);
        case BlockType::Q5_K: return quantize_q45_k(x, w, out, fit, true);
        case BlockType::Q6_K: return quantize_q6_k(x, w, out, fit);
        case BlockType::IQ4_NL: return quantize_iq4_nl(x, w, out, fit);
        case BlockType::IQ4_XS: return quantize_iq4_xs(x, w, out, fit);
    }
}

// ---- decoders ----------------------------------------------------------------------------------
void dequantize_block(BlockType t, const uint8_t *in, float *y) {
    switch (t) {
        case BlockType::Q4_0:
        case BlockType::Q5_0: {
            const bool five = t == BlockType::Q5_0;
            const float d = get_f16(in);
            uint32_t qh = 0;
            if (five) std::memcpy(&qh, in + 2, 4);
            const uint8_t *qs = in + (five ? 6 : 2);
            const int offset = five ? 16 : 8;
            for (int j = 0; j < QK / 2; ++j) {
                int lo = qs[j] & 15, hi = qs[j] >> 4;
                if (five) {
                    lo |= static_cast<int>((qh >> j) & 1) << 4;
                    hi |= static_cast<int>((qh >> (j + 16)) & 1) << 4;
                }
                y[j] = d * static_cast<float>(lo - offset);
                y[j + QK / 2] = d * static_cast<float>(hi - offset);
            }
            return;
        }
        case BlockType::Q4_1:
        case BlockType::Q5_1: {
            const bool five = t == BlockType::Q5_1;
            const float d = get_f16(in), m = get_f16(in + 2);
            uint32_t qh = 0;
            if (five) std::memcpy(&qh, in + 4, 4);
            const uint8_t *qs = in + (five ? 8 : 4);
            for (int j = 0; j < QK / 2; ++j) {
                int lo = qs[j] & 15, hi = qs[j] >> 4;
                if (five) {
                    lo |= static_cast<int>((qh >> j) & 1) << 4;
                    hi |= static_cast<int>((qh >> (j + 16)) & 1) << 4;
                }
                y[j] = d * static_cast<float>(lo) + m;
                y[j + QK / 2] = d * static_cast<float>(hi) + m;
            }
            return;
        }
        case BlockType::Q4_K:
        case BlockType::Q5_K: {
            const bool five = t == BlockType::Q5_K;
            const float d = get_f16(in), dmin = get_f16(in + 2);
            const uint8_t *s = in + 4;
            uint8_t sc[8], mn[8];
            for (int j = 0; j < 4; ++j) {
                sc[j] = s[j] & 63;
                mn[j] = s[j + 4] & 63;
                sc[j + 4] = static_cast<uint8_t>((s[j + 8] & 15) | ((s[j] >> 6) << 4));
                mn[j + 4] = static_cast<uint8_t>((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
            }
            const uint8_t *qh = in + 16;
            const uint8_t *ql = five ? in + 48 : in + 16;
            for (int sb = 0; sb < 8; ++sb) {
                const float ds = d * static_cast<float>(sc[sb]), dm = dmin * static_cast<float>(mn[sb]);
                const int c = sb / 2, shift = 4 * (sb % 2);
                for (int l = 0; l < QK; ++l) {
                    int q = (ql[c * QK + l] >> shift) & 15;
                    if (five) q |= ((qh[l] >> sb) & 1) << 4;
                    y[sb * QK + l] = ds * static_cast<float>(q) - dm;
                }
            }
            return;
        }
        case BlockType::Q6_K: {
            const uint8_t *ql = in, *qh = in + 128;
            const int8_t *sc = reinterpret_cast<const int8_t *>(in + 192);
            const float d = get_f16(in + 208);
            for (int i = 0; i < QK_K; ++i) {
                const int g = i / 32, pos = i % 32;
                const int h = g / 4, s = (g % 4) / 2, b = (g % 2) * 32 + pos;
                const int q = ((ql[h * 64 + b] >> (4 * s)) & 15) | (((qh[h * 32 + pos] >> (2 * (g % 4))) & 3) << 4);
                y[i] = d * static_cast<float>(sc[i / 16]) * static_cast<float>(q - 32);
            }
            return;
        }
        case BlockType::IQ4_NL: {
            const float d = get_f16(in);
            for (int j = 0; j < QK / 2; ++j) {
                y[j] = d * kIQ4[in[2 + j] & 15];
                y[j + QK / 2] = d * kIQ4[in[2 + j] >> 4];
            }
            return;
        }
        case BlockType::IQ4_XS: {
            const float d = get_f16(in);
            uint16_t scales_h;
            std::memcpy(&scales_h, in + 2, 2);
            for (int sb = 0; sb < 8; ++sb) {
                const int ls = ((in[4 + sb / 2] >> (4 * (sb % 2))) & 15) | (((scales_h >> (2 * sb)) & 3) << 4);
                const float dl = d * static_cast<float>(ls - 32);
                const uint8_t *qs = in + 8 + 16 * sb;
                for (int j = 0; j < QK / 2; ++j) {
                    y[sb * QK + j] = dl * kIQ4[qs[j] & 15];
                    y[sb * QK + j + QK / 2] = dl * kIQ4[qs[j] >> 4];
                }
            }
            return;
        }
    }
}

}  // namespace

BlockInfo block_info(BlockType t) {
    switch (t) {
        case BlockType::Q4_0: return {32, 18};
        case BlockType::Q4_1: return {32, 20};
        case BlockType::Q5_0: return {32, 22};
        case BlockType::Q5_1: return {32, 24};
        case BlockType::Q4_K: return {256, 144};
        case BlockType::Q5_K: return {256, 176};
        case BlockType::Q6_K: return {256, 210};
        case BlockType::IQ4_NL: return {32, 18};
        case BlockType::IQ4_XS: return {256, 136};
    }
    throw std::invalid_argument("unknown block type");
}

void quantize_rows(BlockType t, Fit fit, const float *src, uint8_t *dst, size_t n_rows, size_t n_per_row,
                   const float *importance, int n_threads) {
    const BlockInfo info = block_info(t);
    const size_t blocks_per_row = n_per_row / static_cast<size_t>(info.block_size);
    std::vector<float> uniform;
    if (importance == nullptr) {
        uniform.assign(n_per_row, 1.0f);
        importance = uniform.data();
    }
    parallel_for(n_rows, n_threads, std::max<size_t>(1, 65536 / n_per_row), [&](size_t r0, size_t r1) {
        for (size_t r = r0; r < r1; ++r) {
            for (size_t b = 0; b < blocks_per_row; ++b) {
                const size_t col = b * static_cast<size_t>(info.block_size);
                quantize_block(t, fit, src + r * n_per_row + col, importance + col,
                               dst + (r * blocks_per_row + b) * static_cast<size_t>(info.type_size));
            }
        }
    });
}

void dequantize(BlockType t, const uint8_t *src, float *dst, size_t n, int n_threads) {
    const BlockInfo info = block_info(t);
    const size_t n_blocks = n / static_cast<size_t>(info.block_size);
    parallel_for(n_blocks, n_threads, 256, [&](size_t b0, size_t b1) {
        for (size_t b = b0; b < b1; ++b) {
            dequantize_block(t, src + b * static_cast<size_t>(info.type_size), dst + b * static_cast<size_t>(info.block_size));
        }
    });
}

}  // namespace edgeai
