// The forward pass of the Llama family (Llama, SmolLM, Mistral, Qwen2, Qwen3) and the MoE families
// (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) over a GGUF file, with an f16 KV cache and sampling.
//
// Weights are read in place from the memory map under their GGUF names. Family facts (rope style,
// q/k norm kind, top-k renormalisation) come from the architecture table in converters/specs.py
// through ModelConfig, so this file holds no per-model special cases.
#pragma once
#include <cstdint>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "gguf.hpp"
#include "kernels.hpp"
#include "pool.hpp"

namespace edgeai {

class ModelError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

enum class QKNorm : int { NONE = 0, PER_HEAD = 1, FULL = 2 };

struct ModelConfig {
    int n_vocab = 0, n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0, head_dim = 0;  // FFN widths come from the tensors
    int n_expert = 0, n_expert_used = 0;
    float rms_eps = 1e-6f, rope_theta = 10000.0f, rope_linear_factor = 1.0f;
    bool rope_neox = false;            // halves (NEOX) instead of adjacent pairs (NORM)
    QKNorm qk_norm = QKNorm::NONE;
    bool moe_renormalize = false;      // renormalise the top-k routing weights to sum to 1
};

// A weight matrix in place: rows of `cols` weights, each `row_bytes` long, of kernel type wtype.
struct Matrix {
    const uint8_t *data = nullptr;
    int wtype = -1;
    int64_t rows = 0, cols = 0;
    size_t row_bytes = 0;
    const uint8_t *packed = nullptr;  // the kernel set's load-time layout of whole 8-row groups, if any
    const uint8_t *row(int64_t r) const { return data + static_cast<size_t>(r) * row_bytes; }
    explicit operator bool() const { return data != nullptr; }
};

// Where expert weights come from. The forward pass asks for one expert's matrix at a time, so a
// store that streams experts from disk into a budgeted cache replaces the memory-mapped one
// without touching the forward pass.
class ExpertStore {
  public:
    enum Proj { GATE = 0, UP = 1, DOWN = 2 };
    virtual ~ExpertStore() = default;
    // The matrix stays valid until release() of the same (layer, proj, expert).
    virtual Matrix acquire(int layer, Proj proj, int expert) = 0;
    virtual void release(int layer, Proj proj, int expert) = 0;
};

struct SamplingParams {
    float temperature = 0.8f;
    int top_k = 40;
    float top_p = 0.95f;
    float min_p = 0.05f;
    float repeat_penalty = 1.0f;
    int repeat_last_n = 64;
    uint64_t seed = 0;
};

// One token from logits [n_vocab] given the sequence so far (penalty -> top-k -> top-p -> min-p ->
// temperature -> draw, as runtimes/sampling.py); temperature <= 0 is greedy.
int sample_token(std::vector<float> logits, const std::vector<int32_t> &history, const SamplingParams &s,
                 std::mt19937_64 &rng);

class Model {
  public:
    Model(const std::string &path, const ModelConfig &config, int n_ctx, int n_threads, const std::string &isa);
    ~Model();

    const ModelConfig &config() const { return cfg_; }
    int n_ctx() const { return n_ctx_; }
    int n_past() const { return static_cast<int>(history_.size()); }
    const std::vector<int32_t> &history() const { return history_; }
    const char *isa() const { return ops_->isa; }
    int threads() const { return pool_.size(); }
    size_t weight_bytes() const { return weight_bytes_; }
    size_t kv_bytes() const;

    // Appends tokens to the KV cache (in batches of at most n_batch). Logits of the last token are
    // kept; with all_logits, out receives [tokens.size()][n_vocab].
    void eval(const std::vector<int32_t> &tokens, std::vector<float> *all_logits = nullptr);
    void truncate(int n);
    const std::vector<float> &logits() const { return logits_; }

    void set_sampling(const SamplingParams &p);
    int sample();  // from logits(), with the penalty over history()

  private:
    struct Layer {
        Matrix attn_norm, wq, wk, wv, wo, bq, bk, bv, q_norm, k_norm, ffn_norm;
        Matrix gate, up, down;                                  // dense FFN
        Matrix router, gate_shexp, up_shexp, down_shexp, shexp_gate;  // MoE
    };

    Matrix matrix(const std::string &name, int64_t cols, int64_t rows, bool required);
    Matrix vector(const std::string &name, int64_t n, bool required);
    void forward(const int32_t *tokens, int T, int pos0, float *logits_out, bool all);
    // y[T][w.rows] = x[T][w.cols] . w^T. reuse_activations: x is the input the previous matmul
    // quantized (same values, same width), so its int8 blocks are used again.
    void matmul(const Matrix &w, const float *x, float *y, int T, bool reuse_activations = false);
    void attention(int layer, int T, int pos0);
    void ffn(const Layer &L, int layer, int T);
    void moe(const Layer &L, int layer, int T);
    void rope(float *x, int n_heads, int pos) const;
    void ensure_scratch(int T);
    void pack_weights();  // dense layer matrices and the output into the kernel set's packed layout

    gguf::File file_;
    ModelConfig cfg_;
    int n_ctx_;
    const kern::Ops *ops_;
    ThreadPool pool_;
    size_t weight_bytes_ = 0;
    int64_t max_ff_ = 0;  // widest FFN hidden layer (dense, expert or shared expert): scratch size

    Matrix tok_embd_, output_norm_, output_;
    std::vector<Layer> layers_;
    std::vector<float> rope_freqs_;  // [head_dim/2] divisors (Llama 3.1), empty when absent
    std::unique_ptr<ExpertStore> experts_;
    std::vector<std::vector<uint8_t>> packed_;  // storage of the Matrix::packed copies

    std::vector<uint16_t> k_cache_, v_cache_;  // [n_layer][n_ctx][n_head_kv * head_dim] f16
    std::vector<int32_t> history_;
    std::vector<float> logits_;  // [n_vocab] of the last evaluated token

    // scratch, sized for the current batch T (shapes in comments)
    int scratch_T_ = 0;
    std::vector<float> x_, xb_, q_, k_, v_, att_out_, hb_, hb2_, tmp_;  // [T][...]
    std::vector<float> scores_;                                        // [threads][n_ctx]
    std::vector<kern::BlockQ8A> xq_;                                   // quantized activations
    std::vector<float> inv_freq_;                                      // [head_dim/2]
    // MoE scratch, reused across layers and steps (no allocation per decode step)
    std::vector<float> moe_router_, moe_acc_, moe_xin_, moe_out_;
    std::vector<std::vector<std::pair<int, float>>> moe_routed_;
    std::vector<int> moe_idx_;

    SamplingParams sampling_;
    std::mt19937_64 rng_;
};

}  // namespace edgeai
