// The forward pass of the Llama family (Llama, SmolLM, Mistral, Qwen2, Qwen3) and the MoE families
// (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and Gemma 3 (sliding-window layers keeping their keys and values
// in rings) over a GGUF file, with an f16, q8_0 or q4_0 KV cache (keys and values of their own types) and
// sampling.
//
// Weights are read in place from the memory map under their GGUF names. Family facts (rope style,
// q/k norm kind, top-k renormalisation) come from the architecture table in edgeai/architectures.py
// through ModelConfig, so this file holds no per-model special cases.
#pragma once
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "expert_store.hpp"
#include "gguf.hpp"
#include "kernels.hpp"
#include "pool.hpp"

namespace edgeai {

enum class QKNorm : int { NONE = 0, PER_HEAD = 1, FULL = 2 };

// Element type of the KV cache's keys or values. Q8_0 (ggml's block: f16 scale + 32 int8) takes 34/64
// of F16's memory, Q4_0 (f16 scale + 32 4-bit codes) 18/64; each head's keys and values are whole
// blocks, so head_dim must be a multiple of 32. Scores multiply the quantized keys with the float
// query. Quantized keys (with the queries) and quantized values are rotated (model.cpp, hadamard)
// before they are quantized: half the error of a q8_0 cache on SmolLM2, and what makes 4 bits usable.
enum class KVType : int { F16 = 0, Q8_0 = 1, Q4_0 = 2 };

// The types of the keys and of the values ("q8_0/q4_0": q8_0 keys, q4_0 values).
struct KVTypes {
    KVType k = KVType::F16, v = KVType::F16;
};

struct ModelConfig {
    int n_vocab = 0, n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0, head_dim = 0;  // FFN widths come from the tensors
    int n_expert = 0, n_expert_used = 0;
    float rms_eps = 1e-6f, rope_theta = 10000.0f, rope_linear_factor = 1.0f;
    bool rope_neox = false;            // halves (NEOX) instead of adjacent pairs (NORM)
    QKNorm qk_norm = QKNorm::NONE;
    bool moe_renormalize = false;      // renormalise the top-k routing weights to sum to 1
    // Gemma 3: GELU(tanh)-gated FFN; RMSNorms on the attention and FFN outputs before their residual
    // adds; the embedding times embd_scale (sqrt(n_embd)); queries scaled by attn_scale (0:
    // 1/sqrt(head_dim)); final logits soft-capped (cap * tanh(z / cap); 0: none); and sliding-window
    // layers: with n_swa > 0, layer il is local when il % swa_pattern < swa_pattern - 1 (llama.cpp's
    // rule; swa_pattern 0: every layer), attends to the last n_swa positions, rotates with base
    // rope_theta_swa and no scaling, and keeps its keys and values in a ring (kv_positions).
    bool ffn_gelu = false, post_norms = false;
    float embd_scale = 1.0f, attn_scale = 0.0f, logit_softcap = 0.0f, rope_theta_swa = 10000.0f;
    int n_swa = 0, swa_pattern = 0;
    // gpt-oss: a learned per-head logit in each softmax's denominator (attn_sinks) and a bias on the
    // attention output; the pre-FFN norm named post_attention_norm; router and expert biases; experts
    // gated by the clamped SwiGLU min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u, +-limit) + 1)
    // when swiglu_limit > 0; sliding-window layers rotating as the full ones (swa_rope_global); and
    // YaRN (rope_yarn_factor > 0: ggml's frequency mix over the rounded correction range of
    // rope_yarn_orig_ctx and betas fast/slow, cos and sin times 1 + 0.1 ln(factor))
    bool attn_sinks = false, ffn_norm_post_attention = false, swa_rope_global = false;
    float swiglu_alpha = 0.0f, swiglu_limit = 0.0f;
    float rope_yarn_factor = 0.0f, rope_yarn_beta_fast = 32.0f, rope_yarn_beta_slow = 1.0f;
    int rope_yarn_orig_ctx = 0;
    bool is_local(int layer) const { return n_swa > 0 && (swa_pattern == 0 || layer % swa_pattern < swa_pattern - 1); }
};

// The KV types of a name: "f16" | "q8_0" | "q4_0" for keys and values alike, or "K/V" with a type for
// each (as runtimes.base.kv_cache_type), else ModelError; and back ("q4_0", or "q8_0/q4_0" when they differ).
KVTypes kv_type_named(const std::string &name);
std::string kv_type_name(KVTypes kv);

// The ModelConfig field named `key` (the names of runtimes/native.py engine_config) set to
// `value` (integers and booleans as numbers); false when no field has that name.
bool set_config_field(ModelConfig &c, const std::string &key, double value);
// Every field name set_config_field knows.
extern const char *const CONFIG_FIELDS[31];

// What a model of a given file and context needs in memory, in bytes (for the planner).
struct MemorySizes {
    size_t dense = 0;    // every tensor but the stacked experts (resident)
    size_t experts = 0;  // all stacked expert tensors
    size_t slot = 0;     // one expert-cache slot of a streaming store
    size_t layer_matrices = 0, layer_slot = 0;  // dense layer matrices (streamable) and one layer's slot
    size_t kv = 0, scratch = 0;
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
// temperature -> draw, as runtimes/sampling.py); temperature <= 0 is greedy. mask: nullptr, or
// ceil(n_vocab / 32) words whose bit t % 32 of word t / 32 allows token t; a disallowed token is never drawn, and a mask allowing none is an error.
// The tokens the sampler chooses among and their unnormalised weights, after the whole chain but the
// draw (speculative decoding's target distribution p; sample_token draws from exactly these).
// z is modified (mask and penalty applied). Greedy: the arg-max with weight 1.
void sampling_candidates(std::vector<float> &z, const std::vector<int32_t> &history, const SamplingParams &s,
                         const uint32_t *mask, std::vector<int> &ids, std::vector<double> &w);
int sample_token(std::vector<float> logits, const std::vector<int32_t> &history, const SamplingParams &s,
                 std::mt19937_64 &rng, const uint32_t *mask = nullptr);

class Model {
  public:
    static constexpr int kBatch = 64;  // prefill tokens per forward call (bounds scratch memory); also the most slots
    // Element counts of the compute buffers for a batch of T tokens (ensure_scratch allocates these).
    struct Scratch {
        size_t x = 0, xb = 0, q = 0, kv = 0, att = 0, ff = 0, tmp = 0, scores = 0;
        size_t bytes(const ModelConfig &c, int T) const;  // + activation blocks, MoE buffers, logits
    };
    static Scratch scratch_sizes(const ModelConfig &c, int64_t max_ff, int n_ctx, int threads, int T, KVTypes kv);
    static size_t kv_row_bytes(const ModelConfig &c, KVType t);  // one position of one layer's K (or V) of type t
    static size_t kv_bytes_for(const ModelConfig &c, int n_ctx, KVTypes kv);  // per slot, exact rows included
    // A 4-bit K or V cache also keeps the latest kExactRecent positions of each slot and layer in f16
    // (KIVI's full-precision residual, Liu et al. 2024), and attention reads those positions from there:
    // SmolLM2-135M, perplexity against the f16 cache, float64 model of the caches, 1,024 tokens in chunks
    // of 512: q4_0 +6.8 %, with 16 exact +1.3 %, 32 +0.4 %, 64 +0.1 %; the engine (benchmarks/kv_cache.py
    // --ctx 512 --chunks 8): 32 +1.06 %, 64 +0.50 % (+5.8 % without).
    static constexpr int kExactRecent = 64;
    static bool keeps_exact(KVType t) { return t == KVType::Q4_0; }
    // The rows of that ring per slot and layer: a batch (up to kBatch tokens) writes its positions before
    // its first query reads the kExactRecent behind it; all of n_ctx when that is fewer.
    static int exact_rows(int n_ctx) { return std::min(kExactRecent + kBatch - 1, n_ctx); }
    // Positions layer `layer`'s cache holds: n_ctx, or for a sliding-window layer a ring of its window
    // plus one prefill batch (a batch writes its keys before its first token reads the window behind it).
    static int kv_positions(const ModelConfig &c, int layer, int n_ctx);
    static MemorySizes memory_sizes(const gguf::File &f, const ModelConfig &c, int n_ctx, int threads, KVTypes kv);

    // stream: nullptr reads experts in place from the memory map; else they are streamed into a
    // cache of stream->slots experts, and every other tensor is copied into memory at load (the
    // map is then no longer read, so a file truncated while running is a read error, not a SIGBUS).
    // file: a header parsed once by the caller (Python hands the one it planned with), shared so
    // that its map lives as long as the model.
    // n_seq: sequence slots, each with its own KV rows (n_ctx positions, or its own rings), history,
    // logits, sampling parameters and random generator; at most kBatch (a decode step of every slot is
    // one forward batch). Every per-sequence call takes the slot (default 0: one-sequence callers).
    Model(std::shared_ptr<const gguf::File> file, const ModelConfig &config, int n_ctx, int n_threads,
          const std::string &isa, const StreamConfig *stream = nullptr, KVTypes kv_type = {}, int n_seq = 1);
    Model(const std::string &path, const ModelConfig &config, int n_ctx, int n_threads, const std::string &isa,
          const StreamConfig *stream = nullptr, KVTypes kv_type = {}, int n_seq = 1)
        : Model(std::make_shared<const gguf::File>(path), config, n_ctx, n_threads, isa, stream, kv_type, n_seq) {}
    ~Model();

    const ModelConfig &config() const { return cfg_; }
    int n_ctx() const { return n_ctx_; }
    int n_seq() const { return static_cast<int>(seqs_.size()); }
    int n_past(int seq = 0) const { return static_cast<int>(at(seq).history.size()); }
    const std::vector<int32_t> &history(int seq = 0) const { return at(seq).history; }
    const char *isa() const { return ops_->isa; }
    int threads() const { return pool_.size(); }
    size_t weight_bytes() const { return weight_bytes_; }
    size_t kv_bytes() const;
    KVTypes kv_type() const { return kv_type_; }
    size_t scratch_bytes() const;  // compute buffers at a full prefill batch
    size_t resident_bytes() const { return resident_.size(); }  // tensors copied into memory (streaming)
    ExpertStore &experts() { return *experts_; }
    StreamingStore *layer_store() { return layer_store_.get(); }  // nullptr unless dense layers are streamed

    // Appends tokens to the KV cache (in batches of at most n_batch). Logits of the last token are
    // kept; with all_logits, out receives [tokens.size()][n_vocab]. skip_layers: nullptr, or
    // [n_layer] flags; a flagged layer is not computed (its input passes through) and writes no KV:
    // self-speculative drafting, whose positions the caller truncates and verifies afterwards.
    void eval(const std::vector<int32_t> &tokens, std::vector<float> *all_logits = nullptr,
              const std::vector<uint8_t> *skip_layers = nullptr, int seq = 0);
    // Sliding-window layers: when their rings no longer hold the window behind position n, the kept
    // prefix is evaluated again (as llama.cpp's backend rebuilds a cache that cannot drop a tail).
    // A ring holds one batch (kBatch - 1 positions) beyond the window, so rolling back a speculative
    // draft and its verification of fewer than kBatch tokens in all never needs that.
    void truncate(int n, int seq = 0);
    // Drops positions [start, end) from the KV cache and moves the later ones down by end - start,
    // their keys re-rotated to their new positions (as llama.cpp's context shift does): generation
    // goes on without recomputing them. The overflow policies (sink + window, compaction) use it.
    void evict(int start, int end, int seq = 0);
    // Compaction (context_overflow="compact", after SnapKV, Li et al. 2024): the engine keeps the
    // queries of the last `window` positions each slot evaluated, per layer, so that a compaction can
    // score the cached keys by how much those queries attend to them. 0 (the default) keeps none.
    void observe(int window);
    int observed() const { return obs_window_; }
    static size_t observe_bytes_for(const ModelConfig &c, int window, int n_seq) {
        return size_t(n_seq) * c.n_layer * window * (size_t(c.n_head) * c.head_dim * sizeof(float) + sizeof(int));
    }
    // Keeps `keep` of the first n positions of slot seq's cache, chosen per layer and KV head: the
    // first `sink`, the last `recent` before n, and between them the positions with the highest score,
    // where a position's score is the attention probability the observed queries (the last `window`
    // evaluated positions, which may lie past n: a probe the caller evaluated and is dropped here) give
    // it, summed over those queries and the query heads of the KV head, then max-pooled over
    // kPoolWidth neighbours (SnapKV's pooling: a kept token keeps its neighbours' context); ties go to
    // the later position. Kept positions move down in order, their keys re-rotated to their new
    // positions (as evict); positions n.. are dropped. History becomes the sink tokens and the last
    // keep - sink tokens (what the slot's repeat penalty reads; the cache between holds a different
    // selection per head). Returns the kept positions [n_layer][n_head_kv][keep]; scores_out, if given,
    // receives the scores before pooling [n_layer][n_head_kv][n].
    // SnapKV pools over 7; a number's digits are single tokens in SmolLM2's vocabulary, and the passkey
    // test (benchmarks/long_context.py) lost the last digits of some keys at 7 where 11..31 kept them all.
    static constexpr int kPoolWidth = 15;
    std::vector<int32_t> compact(int n, int keep, int sink, int recent, int seq = 0, std::vector<float> *scores_out = nullptr);
    const std::vector<float> &logits(int seq = 0) const { return at(seq).logits; }

    void set_sampling(const SamplingParams &p, int seq = 0);
    int sample(const uint32_t *mask = nullptr, int seq = 0);  // from logits(seq), with the penalty over history(seq)

    // One entry of a batched step: `tokens` appended to slot `seq`; with `sample`, its next token is
    // then drawn from the last one's logits with the slot's own parameters and generator, under
    // `mask` (nullptr, or ceil(n_vocab / 32) words as sample_token's).
    struct SeqStep {
        int seq = 0;
        std::vector<int32_t> tokens;
        bool sample = true;
        const uint32_t *mask = nullptr;
    };
    // Several slots at once (continuous batching): every one-token entry (decode) goes into one
    // forward batch, so each weight matrix is read once for all of them; an entry of several tokens
    // (a prompt, forced tokens) is evaluated as eval() would, on its own, first. Each row attends to
    // its own slot's keys at its own position, so a slot gets the bits it would get alone wherever
    // the kernels give a batch's rows the one-token bits (batches below 16 rows, test_kernels.py).
    // Everything is checked before anything is computed. Returns the sampled token per entry (-1
    // where not sampled).
    std::vector<int32_t> step(const std::vector<SeqStep> &steps);

    // Held by each call from Python (module_runtime.cpp): one forward pass, one cache edit at a time.
    // Recursive: a step calls back into Python for its mask, and that callback may read the engine.
    std::recursive_mutex &calls() const { return calls_; }

  private:
    mutable std::recursive_mutex calls_;
    struct Layer {
        Matrix attn_norm, wq, wk, wv, wo, bq, bk, bv, q_norm, k_norm, ffn_norm;
        Matrix post_attn_norm, post_ffn_norm;                   // Gemma's norms on the sublayer outputs
        Matrix gate, up, down;                                  // dense FFN
        Matrix router, gate_shexp, up_shexp, down_shexp, shexp_gate;  // MoE
        Matrix bo, sinks, router_b, exps_b[3];  // gpt-oss: output bias, [n_head] sinks, router and [n_expert][rows] expert biases
    };

    Matrix matrix(const std::string &name, int64_t cols, int64_t rows, bool required);
    const uint8_t *tensor_data(const gguf::TensorInfo &t) const;
    void copy_resident(const std::string &path, bool stream_layers);  // every tensor not streamed into resident_
    const Layer &acquire_layer(int l);
    void prefetch_experts(int layer);             // the experts `layer`'s router picks for the current state
    Matrix vector(const std::string &name, int64_t n, bool required);
    // The batch's rows: token tokens[t] of slot row_seq_[t] at position row_pos_[t] (a slot's rows in
    // order of position); logits_out receives [out_rows.size()][n_vocab], the rows out_rows.
    void forward(const int32_t *tokens, int T, const std::vector<int> &out_rows, float *logits_out);
    // y[T][w.rows] = x[T][w.cols] . w^T.
    void matmul(const Matrix &w, const float *x, float *y, int T) { matmuls({{&w, y}}, x, T); }
    // The same for several matrices of the same width reading the same x (q, k and v; gate and up):
    // x quantized once, and one job of the pool for all (each job costs a wake and a join).
    void matmuls(std::initializer_list<std::pair<const Matrix *, float *>> outs, const float *x, int T);
    void attention(const Layer &L, int layer, int T);
    void ffn(const Layer &L, int layer, int T);
    void swiglu(size_t n);
    void swiglu_oai(size_t n);                     // gpt-oss's experts: the clamped SwiGLU (ModelConfig)
    void geglu(size_t n);                          // Gemma: hb_ = gelu_tanh(hb_) * hb2_
    void post_norm(const Matrix &w, int T);        // Gemma: tmp_[t] = rmsnorm(tmp_[t]) * w before the residual add
    static constexpr size_t kParallelElements = 1 << 14;  // below this, splitting costs more than it saves
    static constexpr int kParallelTokens = 8;  // per-token work of a batch this long goes across the pool
    static constexpr int kGroupHeadsTokens = 16;  // a batch this long computes a KV head's query heads together (attention)
    // Query heads of a KV head that attention's work items take together for a batch of T tokens with caches kv.
    static int grouped_heads(const ModelConfig &c, int T, KVTypes kv);
    void moe(const Layer &L, int layer, int T);
    // local: a sliding-window layer's base; magnitude: YaRN's factor on cos and sin (not when turning
    // cached keys by a position difference)
    void rope(float *x, int n_heads, int pos, bool local = false, bool magnitude = true) const;
    size_t kv_at(int layer, int seq, int pos) const {  // row of slot seq's position pos in layer's K and V caches (times k_row_ or v_row_: bytes)
        return kv_base_[layer] + size_t(seq) * kv_cap_[layer] + size_t(pos % kv_cap_[layer]);
    }
    // row of slot seq's position pos in layer's ring of exact (f16) rows (times n_head_kv * head_dim: values)
    size_t exact_at(int layer, int seq, int pos) const {
        return (size_t(seq) * cfg_.n_layer + layer) * exact_rows_ + size_t(pos % exact_rows_);
    }
    struct Sequence {  // one slot's state besides its KV rows
        std::vector<int32_t> history;
        int ring_from = 0;          // the oldest position every ring still holds (positions ring_from..n_past-1)
        std::vector<float> logits;  // [n_vocab] of the last evaluated token
        SamplingParams sampling;
        std::mt19937_64 rng;
    };
    const Sequence &at(int seq) const;
    Sequence &at(int seq) { return const_cast<Sequence &>(static_cast<const Model *>(this)->at(seq)); }
    void kept_rows(Sequence &S, int pos_end);  // after positions ..pos_end - 1 were written: what the rings still hold
    void refuse_rings(const char *what) const;  // evict and compact cannot move the keys of a ring
    // A key (one or more heads of it, `values` floats in the cache's encoding) turned back by delta
    // positions: decoded into tmp[values], rotation undone, rotary-shifted, rotated and encoded at dst.
    void shift_key(KVType t, const uint8_t *src, uint8_t *dst, int values, int delta, float *tmp) const;
    void shift_exact(int layer, int seq, int start, int end, int n, float *tmp);  // evict()'s move of the exact rows
    void forget_exact(int layer, int seq, int from);  // the exact rows of positions from.. hold nothing
    void forget_queries(int seq);  // the observed queries' positions no longer match the cache's
    float attn_scale() const {     // the scores' scale: the file's, else 1/sqrt(head_dim)
        return cfg_.attn_scale > 0 ? cfg_.attn_scale : 1.0f / std::sqrt(static_cast<float>(cfg_.head_dim));
    }
    void ensure_scratch(int T);
    void pack_weights();  // dense layer matrices and the output into the kernel set's packed layout
    void embed(int32_t token, float *out);

    std::shared_ptr<const gguf::File> file_;
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
    std::unique_ptr<StreamingStore> layer_store_;           // dense layers, when they are streamed too
    std::vector<std::vector<Matrix Layer::*>> layer_members_;  // per layer: the matrix of each streamed range
    Layer layer_view_;                                        // the layer being computed, pointing into its slot
    std::vector<uint8_t> resident_;                        // streaming: non-expert tensors
    std::vector<std::pair<uint64_t, size_t>> resident_at_;  // (file offset, offset in resident_), sorted
    std::vector<std::vector<uint8_t>> packed_;  // storage of the Matrix::packed copies
    std::vector<uint8_t> embd_row_;             // one embedding row read back from the packed output

    KVTypes kv_type_;
    size_t k_row_, v_row_;                    // bytes of one position's keys (values) in one layer
    bool prefetch_ = true;                    // streaming: read the experts the next layer's router predicts ahead
    int prefetch_top_ = 0;                    // how many of them (the most likely)
    int rot_k_ = 0, rot_v_ = 0;               // quantized keys/values: Hadamard rotation sizes of keys/queries and values (0: none)
    // [n_seq * sum of kv_cap_][k_row_ or v_row_]: n_head_kv * head_dim f16, Q8_0 or Q4_0 per row; layer
    // after layer, and within a layer slot after slot (kv_at)
    std::vector<uint8_t> k_cache_, v_cache_;
    std::vector<size_t> kv_base_;             // [n_layer]: row of each layer's first position in slot 0 (in rows: K and V rows differ in bytes)
    std::vector<int> kv_cap_;                 // [n_layer]: positions each layer holds per slot (kv_positions; a ring when < n_ctx)
    // 4-bit caches' latest positions in f16 (kExactRecent): [n_seq][n_layer][exact_rows_][n_head_kv * head_dim]
    // for keys and for values (empty where that cache is not 4-bit), as rotated as the 4-bit rows; and the
    // position each row holds (-1: none). A position is read from here when its row holds it: rows of
    // positions since truncated are written again before any query reads them.
    int exact_rows_ = 0;
    std::vector<uint16_t> exact_k_, exact_v_;
    std::vector<int> exact_pos_;
    std::vector<Sequence> seqs_;              // [n_seq]
    std::vector<int> row_seq_, row_pos_;      // [T]: the current batch's slot and position per row
    std::vector<float> batch_logits_;         // [n_seq][n_vocab]: a batched decode step's logits
    const std::vector<uint8_t> *skip_ = nullptr;  // [n_layer] layers eval() skips in this call, or none
    int obs_window_ = 0;                      // observe(): queries kept per slot and layer
    std::vector<float> obs_q_;                // [n_seq][n_layer][obs_window_][n_head * head_dim], rotated as attention uses them
    std::vector<int> obs_pos_;                // [n_seq][n_layer][obs_window_]: position of each (-1: none)

    // scratch, sized for the current batch T (shapes in comments)
    int scratch_T_ = 0;
    std::vector<float> x_, xb_, q_, k_, v_, att_out_, hb_, hb2_, tmp_;  // [T][...]
    std::vector<float> scores_;  // [threads][heads][n_ctx], then [threads][heads][head_dim] (a ring's second run of values)
    std::vector<kern::BlockQ8A> xq_;                                   // quantized activations
    std::vector<float> inv_freq_;                                      // [head_dim/2]
    std::vector<float> inv_freq_swa_;                                  // [head_dim/2], sliding-window layers
    float rope_mscale_ = 1.0f;                                         // YaRN: cos and sin times this
    // MoE scratch, reused across layers and steps (no allocation per decode step)
    std::vector<float> moe_router_, moe_acc_, moe_xin_, moe_out_;
    std::vector<std::vector<std::pair<int, float>>> moe_routed_;
    std::vector<int> moe_idx_, moe_order_;
    std::vector<float> moe_pred_in_, moe_pred_;  // [n_embd], [n_expert]: next layer's router on this state
};

}  // namespace edgeai
