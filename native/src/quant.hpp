// Element conversions and block quantizers, bit-exact with the numpy reference in edgeai.quant
// (which is itself checked against gguf-py, i.e. against ggml).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace edgeai {

// IEEE binary16 <-> binary32, round to nearest even (what numpy's astype(float16) does).
uint16_t fp32_to_fp16(float f);
// Inline: the runtime's kernels decode f16 scales in their inner loops. Static: each object has its
// own copy, so a kernel set compiled for AVX-512 never lends its copy to code run on other CPUs.
static inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {  // zero or subnormal: mant * 2^-24
        const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
        std::memcpy(&bits, &v, 4);
        bits |= sign;
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
// bfloat16, round to nearest even; NaNs become quiet NaNs (ggml's rule).
uint16_t fp32_to_bf16(float f);

// Q8_0: blocks of 32 weights -> {fp16 d; int8 qs[32]} (34 bytes), x ~= d * q.
constexpr size_t QK8_0 = 32;
constexpr size_t Q8_0_BLOCK_BYTES = 2 + QK8_0;

// src: n_blocks * 32 floats; dst: n_blocks * 34 bytes.
void quantize_q8_0(const float *src, uint8_t *dst, size_t n_blocks, int n_threads);
void dequantize_q8_0(const uint8_t *src, float *dst, size_t n_blocks, int n_threads);

// Q4_0: blocks of 32 -> {fp16 d; uint8 qs[16]} (18 bytes), x ~= d * (q - 8) with q in 0..15, value j
// in the low nibble of qs[j] and value j + 16 in its high nibble; d = (the value of largest
// magnitude) / -8, ggml's reference quantizer (blocks.cpp's RTN Q4_0 too, without its per-call setup:
// the KV cache quantizes one row per token and layer).
constexpr size_t QK4_0 = 32;
constexpr size_t Q4_0_BLOCK_BYTES = 2 + QK4_0 / 2;

void quantize_q4_0(const float *src, uint8_t *dst, size_t n_blocks, int n_threads);
void dequantize_q4_0(const uint8_t *src, float *dst, size_t n_blocks, int n_threads);

void convert_fp32_to_fp16(const float *src, uint16_t *dst, size_t n, int n_threads);
void convert_fp32_to_bf16(const float *src, uint16_t *dst, size_t n, int n_threads);

}  // namespace edgeai
