// Element conversions and block quantizers, bit-exact with the numpy reference in edgeai.quant
// (which is itself checked against gguf-py, i.e. against ggml).
#pragma once
#include <cstddef>
#include <cstdint>

namespace edgeai {

// IEEE binary16 <-> binary32, round to nearest even (what numpy's astype(float16) does).
uint16_t fp32_to_fp16(float f);
float fp16_to_fp32(uint16_t h);
// bfloat16, round to nearest even; NaNs become quiet NaNs (ggml's rule).
uint16_t fp32_to_bf16(float f);

// Q8_0: blocks of 32 weights -> {fp16 d; int8 qs[32]} (34 bytes), x ~= d * q.
constexpr size_t QK8_0 = 32;
constexpr size_t Q8_0_BLOCK_BYTES = 2 + QK8_0;

// src: n_blocks * 32 floats; dst: n_blocks * 34 bytes.
void quantize_q8_0(const float *src, uint8_t *dst, size_t n_blocks, int n_threads);
void dequantize_q8_0(const uint8_t *src, float *dst, size_t n_blocks, int n_threads);

void convert_fp32_to_fp16(const float *src, uint16_t *dst, size_t n, int n_threads);
void convert_fp32_to_bf16(const float *src, uint16_t *dst, size_t n, int n_threads);

}  // namespace edgeai
