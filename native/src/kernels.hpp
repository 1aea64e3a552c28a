// Dot-product kernels of the runtime, one set per instruction set, chosen at run time.
//
// Quantized weights are multiplied with activations quantized on the fly to BlockQ8A (as llama.cpp
// does with Q8_0/Q8_K activations): each weight block is decoded to integer codes q with, per
// 16-value half, w = a*q + b, so a block's dot product is a*d*sum(q*qx) + b*(d*sum(qx)) in integer
// arithmetic plus two float terms. Float weights (F32/F16/BF16) take float activations.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "gguf.hpp"

namespace edgeai::kern {

constexpr int QA = 32;  // activation block

// 32 activations: x ~= d * qs; hs[h] = d * sum(qs of half h) (the offset terms need it).
struct BlockQ8A {
    float d;
    float hs[2];
    int8_t qs[QA];
};

// dot of one weight row (n weights, ggml layout of its type) with n activations:
// BlockQ8A[n/32] for quantized types, float[n] for F32/F16/BF16.
using DotFn = float (*)(const uint8_t *row, const void *x, size_t n);

// A block of the product Y = X W^T (prefill): y[t * ldy + r] = dot(row r, activations of token t)
// for r < n_rows, t < T. Row r starts at w + r * row_bytes; token t's activations (as for DotFn)
// x_stride bytes after token t-1's; n weights per row.
struct Gemm {
    const uint8_t *w;
    size_t row_bytes;
    int n_rows;
    const uint8_t *x;
    size_t x_stride;
    int T;
    float *y;
    size_t ldy;
    size_t n;
};
using GemmFn = void (*)(const Gemm &g);

enum WType : int { W_F32, W_F16, W_BF16, W_Q4_0, W_Q4_1, W_Q5_0, W_Q5_1, W_Q8_0, W_Q4_K, W_Q5_K, W_Q6_K, W_MXFP4, W_COUNT };

struct Ops {
    const char *isa;
    DotFn dot[W_COUNT];
    GemmFn gemm[W_COUNT];  // tiled kernels share weight and activation loads across rows x tokens
    void (*quantize_act)(const float *x, BlockQ8A *y, size_t n);  // n a multiple of 32
    float (*dot_f16)(const uint16_t *a, const float *x, size_t n);  // attention scores over an f16 K cache
    void (*axpy_f16)(float alpha, const uint16_t *v, float *y, size_t n);  // y += alpha * v (f16 V cache)
    // The q8_0 KV cache (rows of n/32 blocks of {f16 d, int8 q[32]}): scores over its keys with the
    // query in float (not int8: quantizing the query too triples the cache's error), and
    // y += alpha * v over its values.
    float (*dot_q8_0_f32)(const uint8_t *k, const float *x, size_t n);
    void (*axpy_q8_0)(float alpha, const uint8_t *v, float *y, size_t n);
    // The same over the q4_0 KV cache (rows of n/32 blocks of {f16 d, 16 bytes: value j in the low
    // nibble of byte j, value j+16 in its high nibble}; x = d * (code - 8)).
    float (*dot_q4_0_f32)(const uint8_t *k, const float *x, size_t n);
    void (*axpy_q4_0)(float alpha, const uint8_t *v, float *y, size_t n);
    // Optional layout made once at load time (nullptr: none for the type): rows in whole 8-row
    // groups, interleaved so that decode and prefill multiply 8 rows per register with no
    // transposing per call. Same size as the plain rows (rows * row_bytes). gemm_packed takes
    // Gemm.w = the packed data of its first group and n_rows a multiple of 8.
    void (*pack[W_COUNT])(const uint8_t *w, size_t row_bytes, size_t rows, size_t n, uint8_t *out);
    GemmFn gemm_packed[W_COUNT];
    // The inverse of pack for one row: the plain bytes of row r (in a whole 8-row group) from the
    // packed data (an output matrix tied to the embedding is looked up there, not kept twice).
    void (*unpack_row[W_COUNT])(const uint8_t *packed, size_t row_bytes, size_t n, size_t r, uint8_t *row);
    // Optional (nullptr: dot_f16 per key): out[h * out_stride + j] = k_j . q_h for n_keys f16 keys
    // `stride` values apart and `heads` query heads that share them (grouped-query attention; q_h at
    // q + h * hd), hd a multiple of 8; a set computes every key's score alike, whatever its neighbours
    // and however many heads come with it.
    void (*scores_f16)(const uint16_t *k, size_t stride, int n_keys, const float *q, int heads, size_t hd, float *out,
                       size_t out_stride);
    // Optional (nullptr: axpy_f16 per value): out_h = sum_j p_h[j] * v_j over n f16 values `stride`
    // apart for `heads` heads (p_h at p + h * p_stride, out_h at out + h * hd), hd a multiple of 8, in
    // the order j = 0..n-1 (as the axpy loop adds them), whatever the number of heads.
    void (*weighted_sum_f16)(const uint16_t *v, size_t stride, int n, const float *p, size_t p_stride, int heads, size_t hd,
                             float *out);
    // Optional (nullptr: std::exp per value): g[i] = silu(g[i]) * u[i], SwiGLU's gate times up.
    void (*silu_mul)(float *g, const float *u, size_t n);
    // Optional (nullptr: std::tanh per value): g[i] = gelu_tanh(g[i]) * u[i], GeGLU (Gemma), computed
    // as g / (1 + e^(-2y)) * u with y = sqrt(2/pi) (g + 0.044715 g^3), the same function.
    void (*gelu_mul)(float *g, const float *u, size_t n);
};

// (The inline functions here are static for the reason in kernels_common.hpp.)
// Rows [r0, r1) of a matrix (r0 a multiple of 8): whole 8-row groups from the packed copy when
// there is one, the other rows from the plain layout at w.
static inline void gemm_rows(const Ops &ops, int wtype, const uint8_t *w, size_t row_bytes, const uint8_t *packed, size_t r0,
                      size_t r1, const uint8_t *x, size_t x_stride, int T, float *y, size_t ldy, size_t n) {
    if (packed && ops.gemm_packed[wtype]) {
        const size_t r8 = r0 + (r1 - r0) / 8 * 8;
        if (r8 > r0) ops.gemm_packed[wtype]({packed + r0 * row_bytes, row_bytes, int(r8 - r0), x, x_stride, T, y + r0, ldy, n});
        r0 = r8;
    }
    if (r0 < r1) ops.gemm[wtype]({w + r0 * row_bytes, row_bytes, int(r1 - r0), x, x_stride, T, y + r0, ldy, n});
}

// ggml type id -> WType, or -1 if the engine does not compute with it.
static inline int wtype_of_ggml(uint32_t t) {
    switch (t) {
        case gguf::F32: return W_F32;
        case gguf::F16: return W_F16;
        case gguf::BF16: return W_BF16;
        case gguf::Q4_0: return W_Q4_0;
        case gguf::Q4_1: return W_Q4_1;
        case gguf::Q5_0: return W_Q5_0;
        case gguf::Q5_1: return W_Q5_1;
        case gguf::Q8_0: return W_Q8_0;
        case gguf::Q4_K: return W_Q4_K;
        case gguf::Q5_K: return W_Q5_K;
        case gguf::Q6_K: return W_Q6_K;
        case gguf::MXFP4: return W_MXFP4;
        default: return -1;
    }
}
static inline bool takes_q8(int w) { return w >= W_Q4_0; }

// The best set this CPU runs (EDGEAI_ISA=scalar|avx2|avx512|avx-vnni|avx512-vnni|neon|neon-dotprod|
// neon-i8mm overrides, for tests).
const Ops &best();
// A named set, or nullptr when it is not compiled in or this CPU cannot run it.
const Ops *named(const std::string &isa);
// Every set compiled in that this CPU can run, best last.
std::vector<std::string> available();

// Per-ISA tables (defined in kernels_<isa>.cpp; only those compiled for the target exist).
const Ops *ops_scalar();
const Ops *ops_avx2();
const Ops *ops_avx512();
const Ops *ops_avx_vnni();
const Ops *ops_avx512_vnni();
const Ops *ops_neon();
const Ops *ops_neon_dotprod();
const Ops *ops_neon_i8mm();

}  // namespace edgeai::kern
