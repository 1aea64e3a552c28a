#include "quant.hpp"

#include <cmath>
#include <cstring>

#include "parallel.hpp"

namespace edgeai {

namespace {

inline uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// Elements per parallel chunk: large enough that thread start-up is noise.
constexpr size_t kGrainElements = 1 << 16;

}  // namespace

uint16_t fp32_to_fp16(float f) {
    const uint32_t x = bits_of(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) {  // NaN: keep it a (quiet) NaN with the top payload bits
        return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    }
    if (a >= 0x477ff000u) {  // >= 65520 rounds past the largest half (65504): infinity
        return static_cast<uint16_t>(sign | 0x7c00u);
    }
    if (a < 0x38800000u) {  // below 2^-14: a half subnormal (or zero)
        // Adding 0.5f aligns the half's subnormal unit (2^-24) with the float's last mantissa bit,
        // so the FPU does the round-to-nearest-even; the difference is the half's bit pattern.
        const float shifted = float_of(a) + 0.5f;
        return static_cast<uint16_t>(sign | (bits_of(shifted) - 0x3f000000u));
    }
    // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to even.
    const uint32_t mant_odd = (a >> 13) & 1u;
    a += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd;
    return static_cast<uint16_t>(sign | (a >> 13));
}

uint16_t fp32_to_bf16(float f) {
    uint32_t x = bits_of(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        x = (x & 0xffff0000u) | (64u << 16);  // quiet the NaN
    }
    const uint64_t rounded = (static_cast<uint64_t>(x) + (0x7fffu + ((x >> 16) & 1u))) >> 16;
    return static_cast<uint16_t>(rounded);
}

void quantize_q8_0(const float *src, uint8_t *dst, size_t n_blocks, int n_threads) {
    parallel_for(n_blocks, n_threads, kGrainElements / QK8_0, [&](size_t b0, size_t b1) {
        for (size_t b = b0; b < b1; ++b) {
            const float *x = src + b * QK8_0;
            uint8_t *out = dst + b * Q8_0_BLOCK_BYTES;
            float amax = 0.0f;
            for (size_t i = 0; i < QK8_0; ++i) amax = std::fmax(amax, std::fabs(x[i]));
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            const uint16_t dh = fp32_to_fp16(d);
            std::memcpy(out, &dh, 2);  // little-endian hosts only (checked at module load)
            int8_t *qs = reinterpret_cast<int8_t *>(out + 2);
            // clamped: a NaN or infinite value would make the conversion undefined (finite ones are within +-127)
            for (size_t i = 0; i < QK8_0; ++i)
                qs[i] = static_cast<int8_t>(std::roundf(std::fmin(127.0f, std::fmax(-127.0f, x[i] * id))));
        }
    });
}

void dequantize_q8_0(const uint8_t *src, float *dst, size_t n_blocks, int n_threads) {
    parallel_for(n_blocks, n_threads, kGrainElements / QK8_0, [&](size_t b0, size_t b1) {
        for (size_t b = b0; b < b1; ++b) {
            const uint8_t *in = src + b * Q8_0_BLOCK_BYTES;
            uint16_t dh;
            std::memcpy(&dh, in, 2);
            const float d = fp16_to_fp32(dh);
            const int8_t *qs = reinterpret_cast<const int8_t *>(in + 2);
            float *y = dst + b * QK8_0;
            for (size_t i = 0; i < QK8_0; ++i) y[i] = static_cast<float>(qs[i]) * d;
        }
    });
}

void quantize_q4_0(const float *src, uint8_t *dst, size_t n_blocks, int n_threads) {
    parallel_for(n_blocks, n_threads, kGrainElements / QK4_0, [&](size_t b0, size_t b1) {
        for (size_t b = b0; b < b1; ++b) {
            const float *x = src + b * QK4_0;
            uint8_t *out = dst + b * Q4_0_BLOCK_BYTES;
            float amax = 0.0f, max = 0.0f;
            for (size_t i = 0; i < QK4_0; ++i)
                if (std::fabs(x[i]) > amax) {
                    amax = std::fabs(x[i]);
                    max = x[i];
                }
            const float d = max / -8.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            const uint16_t dh = fp32_to_fp16(d);
            std::memcpy(out, &dh, 2);
            // truncated as ggml does (x * id + 8.5 lies in [0.5, 16.5] for finite x); clamped first, so
            // that a NaN or an infinity gives a code instead of an undefined conversion
            auto code = [id](float v) { return static_cast<uint8_t>(std::fmin(15.0f, std::fmax(0.0f, v * id + 8.5f))); };
            for (size_t j = 0; j < QK4_0 / 2; ++j) out[2 + j] = static_cast<uint8_t>(code(x[j]) | (code(x[j + QK4_0 / 2]) << 4));
        }
    });
}

void dequantize_q4_0(const uint8_t *src, float *dst, size_t n_blocks, int n_threads) {
    parallel_for(n_blocks, n_threads, kGrainElements / QK4_0, [&](size_t b0, size_t b1) {
        for (size_t b = b0; b < b1; ++b) {
            const uint8_t *in = src + b * Q4_0_BLOCK_BYTES;
            uint16_t dh;
            std::memcpy(&dh, in, 2);
            const float d = fp16_to_fp32(dh);
            float *y = dst + b * QK4_0;
            for (size_t j = 0; j < QK4_0 / 2; ++j) {
                y[j] = static_cast<float>((in[2 + j] & 15) - 8) * d;
                y[j + QK4_0 / 2] = static_cast<float>((in[2 + j] >> 4) - 8) * d;
            }
        }
    });
}

void convert_fp32_to_fp16(const float *src, uint16_t *dst, size_t n, int n_threads) {
    parallel_for(n, n_threads, kGrainElements, [&](size_t i0, size_t i1) {
        for (size_t i = i0; i < i1; ++i) dst[i] = fp32_to_fp16(src[i]);
    });
}

void convert_fp32_to_bf16(const float *src, uint16_t *dst, size_t n, int n_threads) {
    parallel_for(n, n_threads, kGrainElements, [&](size_t i0, size_t i1) {
        for (size_t i = i0; i < i1; ++i) dst[i] = fp32_to_bf16(src[i]);
    });
}

}  // namespace edgeai
