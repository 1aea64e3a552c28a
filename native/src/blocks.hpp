// Block formats written by edgeai: ggml's legacy (Q4_0, Q4_1, Q5_0, Q5_1), K-quants
// (Q4_K, Q5_K, Q6_K) and the non-uniform IQ4_NL / IQ4_XS. Byte layouts are ggml's; the numpy reference in quant/blocks.py decodes
// and (in RTN mode) encodes them identically, and gguf-py decodes them identically.
#pragma once
#include <cstddef>
#include <cstdint>

namespace edgeai {

enum class BlockType : int { Q4_0 = 0, Q4_1 = 1, Q5_0 = 2, Q5_1 = 3, Q4_K = 4, Q5_K = 5, Q6_K = 6, IQ4_NL = 7, IQ4_XS = 8 };

struct BlockInfo {
    int block_size;  // weights per block
    int type_size;   // bytes per block
};
BlockInfo block_info(BlockType t);

// How the codes and scales of each block are chosen.
enum class Fit : int {
    // Closed-form scales from each block's extremes. For the legacy types this is gguf-py's
    // (ggml's reference) algorithm bit for bit; for K-quants the numpy reference's.
    RTN = 0,
    // Search candidate scales for the least importance-weighted squared error, then refit the
    // (super-)block scales by weighted least squares for the codes chosen.
    SEARCH = 1,
};

// Quantize n_rows rows of n_per_row floats (a multiple of the block size) into dst.
// importance: n_per_row non-negative weights, one per input column (e.g. mean x^2 of the
// activations that multiply that column), or nullptr for uniform. Used by Fit::SEARCH only.
void quantize_rows(BlockType t, Fit fit, const float *src, uint8_t *dst, size_t n_rows, size_t n_per_row,
                   const float *importance, int n_threads);

// Decode n (a multiple of the block size) weights.
void dequantize(BlockType t, const uint8_t *src, float *dst, size_t n, int n_threads);

}  // namespace edgeai
