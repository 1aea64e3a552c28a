#include "model.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <numeric>

#include <fcntl.h>
#include <unistd.h>

#include "kernels_common.hpp"
#include "quant.hpp"

namespace edgeai {

namespace {

// Matrices of a layer that are streamed with it when dense weights do not fit the budget (the
// norms, biases and the router stay resident: small, and the router of the next layer is used
// for expert prefetch while the current layer's weights occupy the slots).
const char *kLayerMatrices[] = {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                                       "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "ffn_gate_shexp.weight",
                                       "ffn_up_shexp.weight", "ffn_down_shexp.weight"};

bool is_layer_matrix(const std::string &name) {
    if (name.rfind("blk.", 0) != 0) return false;
    const size_t dot = name.find('.', 4);
    if (dot == std::string::npos) return false;
    for (const char *m : kLayerMatrices)
        if (name.compare(dot + 1, std::string::npos, m) == 0) return true;
    return false;
}



void rmsnorm(const float *x, const float *w, float *y, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float scale = static_cast<float>(1.0 / std::sqrt(ss / n + eps));
    for (int i = 0; i < n; ++i) y[i] = x[i] * scale * w[i];
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// Decodes one row of any engine type into floats (embedding lookup).
void decode_row(const Matrix &m, int64_t r, float *out) {
    const uint8_t *row = m.row(r);
    switch (m.wtype) {
        case kern::W_F32: std::memcpy(out, row, m.cols * sizeof(float)); return;
        case kern::W_F16:
            for (int64_t i = 0; i < m.cols; ++i) out[i] = kern::f16_at(row + 2 * i);
            return;
        case kern::W_BF16:
            for (int64_t i = 0; i < m.cols; ++i) {
                uint16_t h;
                std::memcpy(&h, row + 2 * i, 2);
                out[i] = kern::bf16(h);
            }
            return;
        default: {
            const kern::TypeLayout L = kern::LAYOUT[m.wtype];
            int q[32];
            float a[2], b[2];
            for (int64_t blk = 0; blk < m.cols / L.block; ++blk)
                for (int s = 0; s < L.block / 32; ++s) {
                    kern::unpack_sub(m.wtype, row + blk * L.bytes, s, q, a, b);
                    float *o = out + blk * L.block + 32 * s;
                    for (int j = 0; j < 32; ++j) o[j] = a[j / 16] * static_cast<float>(q[j]) + b[j / 16];
                }
        }
    }
}

const char *const kKVTypeNames[] = {"f16", "q8_0", "q4_0"};  // by KVType

bool is_quantized(KVType t) { return t != KVType::F16; }

// One row of n values (a multiple of 32 for the quantized types) into a cache row of type t, and back.
void encode_kv(KVType t, const float *x, uint8_t *dst, int n) {
    switch (t) {
        case KVType::Q8_0: return quantize_q8_0(x, dst, size_t(n) / QK8_0, 1);
        case KVType::Q4_0: return quantize_q4_0(x, dst, size_t(n) / QK4_0, 1);
        case KVType::F16: break;
    }
    uint16_t *h = reinterpret_cast<uint16_t *>(dst);
    for (int i = 0; i < n; ++i) h[i] = fp32_to_fp16(x[i]);
}

void decode_kv(KVType t, const uint8_t *src, float *x, int n) {
    switch (t) {
        case KVType::Q8_0: return dequantize_q8_0(src, x, size_t(n) / QK8_0, 1);
        case KVType::Q4_0: return dequantize_q4_0(src, x, size_t(n) / QK4_0, 1);
        case KVType::F16: break;
    }
    const uint16_t *h = reinterpret_cast<const uint16_t *>(src);
    for (int i = 0; i < n; ++i) x[i] = fp16_to_fp32(h[i]);
}

// k . q over one head's key row of type t (the query in float), and y += alpha * one value row.
inline float dot_kv(const kern::Ops &ops, KVType t, const uint8_t *k, const float *q, size_t n) {
    switch (t) {
        case KVType::Q8_0: return ops.dot_q8_0_f32(k, q, n);
        case KVType::Q4_0: return ops.dot_q4_0_f32(k, q, n);
        case KVType::F16: break;
    }
    return ops.dot_f16(reinterpret_cast<const uint16_t *>(k), q, n);
}

inline void axpy_kv(const kern::Ops &ops, KVType t, float alpha, const uint8_t *v, float *y, size_t n) {
    switch (t) {
        case KVType::Q8_0: return ops.axpy_q8_0(alpha, v, y, n);
        case KVType::Q4_0: return ops.axpy_q4_0(alpha, v, y, n);
        case KVType::F16: break;
    }
    ops.axpy_f16(alpha, reinterpret_cast<const uint16_t *>(v), y, n);
}

}  // namespace

KVTypes kv_type_named(const std::string &name) {
    auto one = [&](const std::string &part) {
        for (int t = 0; t < 3; ++t)
            if (part == kKVTypeNames[t]) return static_cast<KVType>(t);
        throw ModelError("KV cache type '" + name + "' is not one of f16, q8_0, q4_0, or keys/values such as q8_0/q4_0");
    };
    const size_t slash = name.find('/');
    if (slash == std::string::npos) return {one(name), one(name)};
    return {one(name.substr(0, slash)), one(name.substr(slash + 1))};  // a second '/' is no type's name
}

std::string kv_type_name(KVTypes kv) {
    const std::string k = kKVTypeNames[static_cast<int>(kv.k)], v = kKVTypeNames[static_cast<int>(kv.v)];
    return k == v ? k : k + "/" + v;
}

const char *const CONFIG_FIELDS[31] = {"n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_expert",
                                       "n_expert_used", "rms_eps", "rope_theta", "rope_linear_factor", "rope_neox",
                                       "qk_norm", "moe_renormalize",
                                       // Gemma 3
                                       "ffn_gelu", "post_norms", "embd_scale", "attn_scale", "logit_softcap",
                                       "rope_theta_swa", "n_swa", "swa_pattern",
                                       // gpt-oss
                                       "attn_sinks", "ffn_norm_post_attention", "swa_rope_global", "swiglu_alpha",
                                       "swiglu_limit", "rope_yarn_factor", "rope_yarn_beta_fast", "rope_yarn_beta_slow",
                                       "rope_yarn_orig_ctx"};

bool set_config_field(ModelConfig &c, const std::string &key, double v) {
    int *const ints[] = {&c.n_vocab, &c.n_embd, &c.n_layer, &c.n_head, &c.n_head_kv, &c.head_dim, &c.n_expert, &c.n_expert_used};
    float *const floats[] = {&c.rms_eps, &c.rope_theta, &c.rope_linear_factor};
    for (int i = 0; i < 14; ++i) {
        if (key != CONFIG_FIELDS[i]) continue;
        if (i < 8) *ints[i] = static_cast<int>(v);
        else if (i < 11) *floats[i - 8] = static_cast<float>(v);
        else if (i == 11) c.rope_neox = v != 0;
        else if (i == 12) c.qk_norm = static_cast<QKNorm>(static_cast<int>(v));
        else c.moe_renormalize = v != 0;
        return true;
    }
    bool *const flags[] = {&c.ffn_gelu, &c.post_norms};
    float *const gemma_floats[] = {&c.embd_scale, &c.attn_scale, &c.logit_softcap, &c.rope_theta_swa};
    int *const gemma_ints[] = {&c.n_swa, &c.swa_pattern};
    for (int i = 14; i < 22; ++i) {
        if (key != CONFIG_FIELDS[i]) continue;
        if (i < 16) *flags[i - 14] = v != 0;
        else if (i < 20) *gemma_floats[i - 16] = static_cast<float>(v);
        else *gemma_ints[i - 20] = static_cast<int>(v);
        return true;
    }
    bool *const oai_flags[] = {&c.attn_sinks, &c.ffn_norm_post_attention, &c.swa_rope_global};
    float *const oai_floats[] = {&c.swiglu_alpha, &c.swiglu_limit, &c.rope_yarn_factor, &c.rope_yarn_beta_fast, &c.rope_yarn_beta_slow};
    for (int i = 22; i < 31; ++i) {
        if (key != CONFIG_FIELDS[i]) continue;
        if (i < 25) *oai_flags[i - 22] = v != 0;
        else if (i < 30) *oai_floats[i - 25] = static_cast<float>(v);
        else c.rope_yarn_orig_ctx = static_cast<int>(v);
        return true;
    }
    return false;
}

Model::Model(std::shared_ptr<const gguf::File> file, const ModelConfig &config, int n_ctx, int n_threads,
             const std::string &isa, const StreamConfig *stream, KVTypes kv_type, int n_seq)
    : file_(std::move(file)), cfg_(config), n_ctx_(n_ctx), ops_(isa.empty() ? &kern::best() : kern::named(isa)), pool_(n_threads),
      kv_type_(kv_type) {
    const std::string &path = file_->path();
    if (!ops_) throw ModelError("instruction set '" + isa + "' is not available on this CPU or in this build");
    const ModelConfig &c = cfg_;
    if (c.n_embd <= 0 || c.n_layer <= 0 || c.n_head <= 0 || c.n_head_kv <= 0 || c.head_dim <= 0 || c.head_dim % 2 ||
        c.n_head % c.n_head_kv || c.n_vocab <= 0)
        throw ModelError(path + ": inconsistent hyper-parameters (embedding, heads, head size or vocabulary)");
    for (KVType t : {kv_type.k, kv_type.v})
        if (is_quantized(t) && c.head_dim % kern::QA)
            throw ModelError(path + ": a " + kKVTypeNames[static_cast<int>(t)] +
                             " KV cache needs a head size that is a multiple of 32 (this model's is " +
                             std::to_string(c.head_dim) + "); use the f16 KV cache");
    k_row_ = kv_row_bytes(c, kv_type.k);
    v_row_ = kv_row_bytes(c, kv_type.v);
    // Rotations of what is quantized: keys (and queries) in chunks of the largest power of 2 dividing
    // head_dim, values in chunks of up to 64 (head_dim is a multiple of 32 here, so at least 32: one
    // rotation per block of 32 already makes each block's values alike in size, which is what a
    // per-block scale needs).
    int pow2 = kern::QA;
    while (pow2 <= c.head_dim / 2 && c.head_dim % (2 * pow2) == 0) pow2 *= 2;
    if (is_quantized(kv_type.k)) rot_k_ = pow2;
    if (is_quantized(kv_type.v)) rot_v_ = std::min(64, pow2);
    if (n_ctx <= 0) throw ModelError("n_ctx must be positive");
    if (n_seq < 1 || n_seq > kBatch)
        throw ModelError("n_seq (sequence slots) must be 1.." + std::to_string(kBatch) + ", got " + std::to_string(n_seq));
    if (c.n_swa < 0 || c.swa_pattern < 0 || !(c.embd_scale > 0) || !std::isfinite(c.embd_scale) || !(c.attn_scale >= 0) ||
        !std::isfinite(c.attn_scale) || !(c.logit_softcap >= 0) || !std::isfinite(c.logit_softcap) || !(c.rope_theta_swa > 0) ||
        !std::isfinite(c.rope_theta_swa))
        throw ModelError(path + ": inconsistent hyper-parameters (sliding window, pattern, embedding or attention scale, logit cap)");
    if ((c.n_expert > 0) != (c.n_expert_used > 0) || c.n_expert_used > c.n_expert)
        throw ModelError(path + ": expert_used_count " + std::to_string(c.n_expert_used) + " does not fit expert_count " +
                         std::to_string(c.n_expert));

    const int64_t q_dim = int64_t(c.n_head) * c.head_dim, kv_dim = int64_t(c.n_head_kv) * c.head_dim;
    const bool stream_layers = stream && stream->layer_slots > 0;
    prefetch_ = !stream || stream->prefetch;
    prefetch_top_ = stream && stream->prefetch_top > 0 ? std::min(stream->prefetch_top, c.n_expert_used)
                                                       : (c.n_expert_used + 1) / 2;
    if (stream) copy_resident(path, stream_layers);
    tok_embd_ = matrix("token_embd.weight", c.n_embd, c.n_vocab, true);
    output_norm_ = vector("output_norm.weight", c.n_embd, true);
    output_ = matrix("output.weight", c.n_embd, c.n_vocab, false);
    if (!output_) output_ = tok_embd_;
    if (Matrix m = vector("rope_freqs.weight", c.head_dim / 2, false)) {
        const float *f = reinterpret_cast<const float *>(m.data);
        rope_freqs_.assign(f, f + c.head_dim / 2);
    }
    std::vector<ExpertLayer> expert_layers;
    std::vector<Unit> layer_units;
    for (int i = 0; i < c.n_layer; ++i) {
        const std::string p = "blk." + std::to_string(i) + ".";
        Layer L;
        L.attn_norm = vector(p + "attn_norm.weight", c.n_embd, true);
        L.wq = matrix(p + "attn_q.weight", c.n_embd, q_dim, true);
        L.wk = matrix(p + "attn_k.weight", c.n_embd, kv_dim, true);
        L.wv = matrix(p + "attn_v.weight", c.n_embd, kv_dim, true);
        L.wo = matrix(p + "attn_output.weight", q_dim, c.n_embd, true);
        L.bq = vector(p + "attn_q.bias", q_dim, false);
        L.bk = vector(p + "attn_k.bias", kv_dim, false);
        L.bv = vector(p + "attn_v.bias", kv_dim, false);
        if (c.qk_norm != QKNorm::NONE) {
            const bool full = c.qk_norm == QKNorm::FULL;
            L.q_norm = vector(p + "attn_q_norm.weight", full ? q_dim : c.head_dim, true);
            L.k_norm = vector(p + "attn_k_norm.weight", full ? kv_dim : c.head_dim, true);
        }
        L.bo = vector(p + "attn_output.bias", c.n_embd, false);
        if (c.attn_sinks) L.sinks = vector(p + "attn_sinks.weight", c.n_head, true);
        L.ffn_norm = vector(p + (c.ffn_norm_post_attention ? "post_attention_norm.weight" : "ffn_norm.weight"), c.n_embd, true);
        if (c.post_norms) {
            L.post_attn_norm = vector(p + "post_attention_norm.weight", c.n_embd, true);
            L.post_ffn_norm = vector(p + "post_ffw_norm.weight", c.n_embd, true);
        }
        if (c.n_expert == 0) {
            const gguf::TensorInfo *g = file_->tensor(p + "ffn_gate.weight");
            if (!g) throw ModelError(path + ": tensor " + p + "ffn_gate.weight is missing");
            const int64_t n_ff = static_cast<int64_t>(g->ne.size() == 2 ? g->ne[1] : 0);
            L.gate = matrix(p + "ffn_gate.weight", c.n_embd, n_ff, true);
            L.up = matrix(p + "ffn_up.weight", c.n_embd, n_ff, true);
            L.down = matrix(p + "ffn_down.weight", n_ff, c.n_embd, true);
            max_ff_ = std::max(max_ff_, n_ff);
        } else {
            L.router = matrix(p + "ffn_gate_inp.weight", c.n_embd, c.n_expert, true);
            const gguf::TensorInfo *g = file_->tensor(p + "ffn_gate_exps.weight");
            if (!g || g->ne.size() != 3) throw ModelError(path + ": tensor " + p + "ffn_gate_exps.weight is missing or not 3-D");
            const int64_t n_ff = static_cast<int64_t>(g->ne[1]);
            ExpertLayer el;
            const char *names[3] = {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"};
            const int64_t cols[3] = {c.n_embd, c.n_embd, n_ff}, rows[3] = {n_ff, n_ff, c.n_embd};
            for (int k = 0; k < 3; ++k) {
                el.stacked[k] = matrix(p + names[k], cols[k], rows[k] * c.n_expert, true);
                el.stacked[k].rows = rows[k];  // one expert's
                el.file_offset[k] = file_->tensor(p + names[k])->offset;
            }
            max_ff_ = std::max(max_ff_, n_ff);
            expert_layers.push_back(el);
            L.router_b = vector(p + "ffn_gate_inp.bias", c.n_expert, false);
            const char *biases[3] = {"ffn_gate_exps.bias", "ffn_up_exps.bias", "ffn_down_exps.bias"};
            for (int k = 0; k < 3; ++k) {  // [n_expert][rows] F32, all or none
                L.exps_b[k] = matrix(p + biases[k], rows[k], c.n_expert, k > 0 && bool(L.exps_b[0]));
                if (L.exps_b[k] && L.exps_b[k].wtype != kern::W_F32) throw ModelError(path + ": tensor " + p + biases[k] + " should be F32");
            }
            if (file_->tensor(p + "ffn_gate_shexp.weight")) {
                const gguf::TensorInfo *s = file_->tensor(p + "ffn_gate_shexp.weight");
                const int64_t n_sh = static_cast<int64_t>(s->ne.size() == 2 ? s->ne[1] : 0);
                L.gate_shexp = matrix(p + "ffn_gate_shexp.weight", c.n_embd, n_sh, true);
                L.up_shexp = matrix(p + "ffn_up_shexp.weight", c.n_embd, n_sh, true);
                L.down_shexp = matrix(p + "ffn_down_shexp.weight", n_sh, c.n_embd, true);
                L.shexp_gate = vector(p + "ffn_gate_inp_shexp.weight", c.n_embd, false);
                max_ff_ = std::max(max_ff_, n_sh);
            }
        }
        layers_.push_back(L);
        if (stream_layers) {  // this layer's matrices, in the order of kLayerMatrices, as one unit
            Unit u;
            u.layer = i;
            u.name = "layer " + std::to_string(i);
            Matrix Layer::*members[] = {&Layer::wq, &Layer::wk, &Layer::wv, &Layer::wo, &Layer::gate, &Layer::up,
                                        &Layer::down, &Layer::gate_shexp, &Layer::up_shexp, &Layer::down_shexp};
            layer_members_.emplace_back();
            for (size_t k = 0; k < std::size(kLayerMatrices); ++k)
                if (const gguf::TensorInfo *t = file_->tensor(p + kLayerMatrices[k])) {
                    u.ranges.push_back({t->offset, t->nbytes});
                    layer_members_.back().push_back(members[k]);
                }
            layer_units.push_back(std::move(u));
        }
    }
    if (stream_layers) {
        if (stream->layer_slots < 2) throw ModelError("streaming dense layers needs at least 2 layer slots");
        StreamConfig lc = *stream;
        lc.slots = stream->layer_slots;
        lc.policy = CachePolicy::LAYER;
        layer_store_ = std::make_unique<StreamingStore>(path, std::move(layer_units), c.n_layer, lc);
    }
    if (stream && c.n_expert)
        experts_ = std::make_unique<StreamingExpertStore>(path, std::move(expert_layers), c.n_expert, *stream);
    else
        experts_ = std::make_unique<MmapExpertStore>(std::move(expert_layers));
    for (const gguf::TensorInfo &t : file_->tensors()) weight_bytes_ += t.nbytes;

    size_t rows = 0;  // every layer's positions: n_ctx, or a ring's, for each slot
    for (int l = 0; l < c.n_layer; ++l) {
        kv_base_.push_back(rows);
        kv_cap_.push_back(kv_positions(c, l, n_ctx));
        rows += size_t(kv_cap_.back()) * n_seq;
    }
    k_cache_.assign(rows * k_row_, 0);
    v_cache_.assign(rows * v_row_, 0);
    if (keeps_exact(kv_type.k) || keeps_exact(kv_type.v)) {
        exact_rows_ = exact_rows(n_ctx);
        const size_t exact = size_t(n_seq) * c.n_layer * exact_rows_;
        if (keeps_exact(kv_type.k)) exact_k_.assign(exact * kv_dim, 0);
        if (keeps_exact(kv_type.v)) exact_v_.assign(exact * kv_dim, 0);
        exact_pos_.assign(exact, -1);
    }
    inv_freq_.resize(c.head_dim / 2);
    inv_freq_swa_.resize(c.head_dim / 2);
    // YaRN as ggml computes it (ggml_rope_yarn_corr_dims, rope_yarn): frequencies below the correction
    // range divided by the factor, above it kept, a linear ramp between; the range rounded outwards
    float yarn_lo = 0.0f, yarn_hi = 0.0f;
    if (c.rope_yarn_factor > 0) {
        if (c.rope_yarn_orig_ctx <= 0) throw ModelError(path + ": YaRN rope scaling without an original context length");
        auto corr_dim = [&](float rotations) {
            return c.head_dim * std::log(c.rope_yarn_orig_ctx / (rotations * 2.0f * float(M_PI))) / (2.0f * std::log(c.rope_theta));
        };
        yarn_lo = std::max(0.0f, std::floor(corr_dim(c.rope_yarn_beta_fast)));
        yarn_hi = std::min(float(c.head_dim - 1), std::ceil(corr_dim(c.rope_yarn_beta_slow)));
        rope_mscale_ = 1.0f + 0.1f * std::log(c.rope_yarn_factor);
    }
    for (int i = 0; i < c.head_dim / 2; ++i) {
        inv_freq_[i] = std::pow(c.rope_theta, -2.0f * i / c.head_dim);
        if (!rope_freqs_.empty()) inv_freq_[i] /= rope_freqs_[i];
        if (c.rope_yarn_factor > 0) {
            const float keep = 1.0f - std::min(1.0f, std::max(0.0f, (i - yarn_lo) / std::max(0.001f, yarn_hi - yarn_lo)));
            inv_freq_[i] = inv_freq_[i] / c.rope_yarn_factor * (1.0f - keep) + inv_freq_[i] * keep;
        }
        inv_freq_swa_[i] = std::pow(c.rope_theta_swa, -2.0f * i / c.head_dim);
    }
    seqs_.resize(n_seq);
    for (int s = 0; s < n_seq; ++s) {
        seqs_[s].logits.assign(c.n_vocab, 0.0f);
        set_sampling(SamplingParams{}, s);
    }
    pack_weights();
}

// Streaming mode packs in place: the tensors are our own copy (resident_), and a second copy would
// spend memory the planner gave to the expert cache. Layers streamed from disk are not packed
// (their bytes are read again for every token). An output matrix tied to the embedding is packed
// too where the kernel set can read a row back (embed), and the embedding then uses the packed copy.
void Model::pack_weights() {
    const bool in_place = !resident_.empty();
    auto pack = [&](Matrix &m) {
        if (!m || !ops_->pack[m.wtype] || m.rows < 8) return;
        if (m.data == tok_embd_.data && !ops_->unpack_row[m.wtype]) return;
        const size_t rows = static_cast<size_t>(m.rows) / 8 * 8;
        if (in_place) {
            std::vector<uint8_t> packed(rows * m.row_bytes);
            ops_->pack[m.wtype](m.data, m.row_bytes, rows, static_cast<size_t>(m.cols), packed.data());
            std::memcpy(const_cast<uint8_t *>(m.data), packed.data(), packed.size());  // rows past the groups stay plain
            m.packed = m.data;
            return;
        }
        packed_.emplace_back(rows * m.row_bytes);
        ops_->pack[m.wtype](m.data, m.row_bytes, rows, static_cast<size_t>(m.cols), packed_.back().data());
        m.packed = packed_.back().data();
        // the packed copy replaces the mapped groups: drop their pages now, so that peak memory is
        // the packed weights plus one matrix, not the file twice
        file_->release(m.data, rows * m.row_bytes);
    };
    pack(output_);  // first: the largest matrix, so that its mapped pages are gone before the layers' copies exist
    if (output_.data == tok_embd_.data) tok_embd_.packed = output_.packed;
    if (!layer_store_)
        for (Layer &L : layers_)
            for (Matrix *m : {&L.wq, &L.wk, &L.wv, &L.wo, &L.gate, &L.up, &L.down}) pack(*m);
}

// The embedding of `token` into out[n_embd]: from the packed output matrix when the two are tied
// and packed (the plain rows of its 8-row groups are then gone), else from the tensor.
void Model::embed(int32_t token, float *out) {
    const Matrix &m = tok_embd_;
    if (m.packed && token < m.rows / 8 * 8) {
        embd_row_.resize(m.row_bytes);
        ops_->unpack_row[m.wtype](m.packed, m.row_bytes, static_cast<size_t>(m.cols), static_cast<size_t>(token), embd_row_.data());
        Matrix row = m;
        row.data = embd_row_.data();
        decode_row(row, 0, out);
        return;
    }
    decode_row(m, token, out);
}

Model::~Model() = default;

size_t Model::kv_bytes() const {
    return k_cache_.size() + v_cache_.size() + (exact_k_.size() + exact_v_.size()) * sizeof(uint16_t) + exact_pos_.size() * sizeof(int);
}

size_t Model::scratch_bytes() const { return scratch_sizes(cfg_, max_ff_, n_ctx_, pool_.size(), kBatch, kv_type_).bytes(cfg_, kBatch); }

// Streaming: every tensor but the stacked experts is read once into memory, so after loading the
// memory map is never touched again (its pages are not charged to the process, and a file that
// shrinks under us gives read errors instead of SIGBUS).
void Model::copy_resident(const std::string &path, bool stream_layers) {
    auto streamed = [&](const gguf::TensorInfo &t) { return is_expert_tensor(t.name) || (stream_layers && is_layer_matrix(t.name)); };
    size_t total = 0;
    for (const gguf::TensorInfo &t : file_->tensors())
        if (!streamed(t)) {
            resident_at_.emplace_back(t.offset, total);
            total += (t.nbytes + 63) & ~size_t(63);  // tensors 64 bytes apart, as in the file's alignment
        }
    std::sort(resident_at_.begin(), resident_at_.end());
    resident_.resize(total);
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw ModelError(path + ": cannot open: " + std::strerror(errno));
    for (const gguf::TensorInfo &t : file_->tensors()) {
        if (streamed(t)) continue;
        uint8_t *dst = resident_.data() + std::lower_bound(resident_at_.begin(), resident_at_.end(), std::make_pair(t.offset, size_t(0)))->second;
        size_t got = 0;
        while (got < t.nbytes) {
            const ssize_t r = ::pread(fd, dst + got, t.nbytes - got, static_cast<off_t>(t.offset + got));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                const std::string why = r < 0 ? std::strerror(errno) : "the file ended early";
                ::close(fd);
                throw ModelError(path + ": reading tensor " + t.name + " failed: " + why);
            }
            got += static_cast<size_t>(r);
        }
#if defined(POSIX_FADV_DONTNEED)
        ::posix_fadvise(fd, static_cast<off_t>(t.offset), static_cast<off_t>(t.nbytes), POSIX_FADV_DONTNEED);
#endif
    }
    ::close(fd);
}

// Streamed tensors keep their place in the memory map as a placeholder that is never read: the
// forward pass reads them from the slots of their store.
const uint8_t *Model::tensor_data(const gguf::TensorInfo &t) const {
    if (resident_at_.empty()) return file_->data(t);
    const auto it = std::lower_bound(resident_at_.begin(), resident_at_.end(), std::make_pair(t.offset, size_t(0)));
    if (it == resident_at_.end() || it->first != t.offset) return file_->data(t);
    return resident_.data() + it->second;
}

// A weight matrix of `rows` rows of `cols` (ggml shape [cols, rows], or [cols, r, n] stacked).
Matrix Model::matrix(const std::string &name, int64_t cols, int64_t rows, bool required) {
    const gguf::TensorInfo *t = file_->tensor(name);
    if (!t) {
        if (required) throw ModelError(file_->path() + ": tensor " + name + " is missing");
        return {};
    }
    uint64_t n = 1;
    for (uint64_t d : t->ne) n *= d;
    if (t->ne[0] != static_cast<uint64_t>(cols) || n != static_cast<uint64_t>(cols) * static_cast<uint64_t>(rows))
        throw ModelError(file_->path() + ": tensor " + name + " has shape " + t->shape_str() + ", expected " +
                         std::to_string(cols) + " x " + std::to_string(rows));
    const int w = kern::wtype_of_ggml(t->type);
    if (w < 0) {
        const gguf::TypeInfo *ti = gguf::type_info(t->type);
        throw ModelError(file_->path() + ": tensor " + name + " has type " + (ti ? ti->name : "?") +
                         ", which the native engine does not run; the llama.cpp backend can (backend=\"llama.cpp\")");
    }
    Matrix m;
    m.data = tensor_data(*t);
    m.wtype = w;
    m.rows = rows;
    m.cols = cols;
    m.row_bytes = t->row_bytes();
    return m;
}

Matrix Model::vector(const std::string &name, int64_t n, bool required) {
    Matrix m = matrix(name, n, 1, required);
    if (m && m.wtype != kern::W_F32)
        throw ModelError(file_->path() + ": tensor " + name + " should be F32 (norms, biases and scales are kept in F32)");
    return m;
}

int Model::grouped_heads(const ModelConfig &c, int T, KVTypes kv) {
    const bool f16 = kv.k == KVType::F16 && kv.v == KVType::F16;  // the grouped kernels read f16 caches
    return f16 && T >= kGroupHeadsTokens ? c.n_head / std::max(1, c.n_head_kv) : 1;
}

Model::Scratch Model::scratch_sizes(const ModelConfig &c, int64_t max_ff, int n_ctx, int threads, int T, KVTypes kv) {
    const size_t q_dim = size_t(c.n_head) * c.head_dim, kv_dim = size_t(c.n_head_kv) * c.head_dim;
    Scratch s;
    s.x = size_t(T) * c.n_embd;
    s.xb = size_t(T) * std::max<size_t>(c.n_embd, q_dim);
    s.q = s.att = size_t(T) * q_dim;
    s.kv = size_t(T) * kv_dim;
    s.ff = size_t(T) * static_cast<size_t>(max_ff);
    s.tmp = size_t(T) * std::max<size_t>({size_t(c.n_embd), size_t(c.n_expert), q_dim});
    // [threads][heads of a work item][n_ctx] (attention), then as much of head_dim (a ring's second run of values)
    const size_t heads = size_t(grouped_heads(c, T, kv));
    s.scores = size_t(threads) * n_ctx * heads + (c.n_swa > 0 ? size_t(threads) * c.head_dim * heads : 0);
    return s;
}

size_t Model::Scratch::bytes(const ModelConfig &c, int T) const {
    const size_t floats = x + xb + q + 2 * kv + att + 2 * ff + tmp + scores;
    const size_t widest = std::max<size_t>(std::max<size_t>(c.n_embd, size_t(c.n_head) * c.head_dim), ff / std::max(1, T));
    const size_t act_blocks = size_t(T) * (widest / kern::QA + 1);                 // xq_
    const size_t moe = c.n_expert ? size_t(T) * (c.n_expert + 3 * size_t(c.n_embd)) + c.n_embd + c.n_expert : 0;
    const size_t logits = size_t(c.n_vocab);                                          // logits_
    return (floats + moe + logits) * sizeof(float) + act_blocks * sizeof(kern::BlockQ8A);
}

size_t Model::kv_row_bytes(const ModelConfig &c, KVType t) {
    const size_t kv_dim = size_t(c.n_head_kv) * c.head_dim;
    switch (t) {
        case KVType::Q8_0: return kv_dim / QK8_0 * Q8_0_BLOCK_BYTES;
        case KVType::Q4_0: return kv_dim / QK4_0 * Q4_0_BLOCK_BYTES;
        case KVType::F16: break;
    }
    return kv_dim * sizeof(uint16_t);
}

int Model::kv_positions(const ModelConfig &c, int layer, int n_ctx) {
    if (!c.is_local(layer)) return n_ctx;
    return static_cast<int>(std::min<int64_t>(n_ctx, int64_t(c.n_swa) + kBatch - 1));
}

size_t Model::kv_bytes_for(const ModelConfig &c, int n_ctx, KVTypes kv) {
    size_t positions = 0;
    for (int l = 0; l < c.n_layer; ++l) positions += size_t(kv_positions(c, l, n_ctx));
    const int exact = keeps_exact(kv.k) + keeps_exact(kv.v);
    const size_t exact_rows_all = exact ? size_t(c.n_layer) * exact_rows(n_ctx) : 0;  // and a position per row
    return positions * (kv_row_bytes(c, kv.k) + kv_row_bytes(c, kv.v)) +
           exact_rows_all * (exact * kv_row_bytes(c, KVType::F16) + sizeof(int));
}

MemorySizes Model::memory_sizes(const gguf::File &f, const ModelConfig &c, int n_ctx, int threads, KVTypes kv) {
    MemorySizes m;
    int64_t max_ff = 0;
    std::vector<std::array<size_t, 3>> slices(c.n_layer, {0, 0, 0});
    const char *exps[3] = {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"};
    for (const gguf::TensorInfo &t : f.tensors()) {
        (is_expert_tensor(t.name) ? m.experts : m.dense) += t.nbytes;
        const bool ff = t.name.find(".ffn_gate.weight") != std::string::npos ||
                        t.name.find(".ffn_gate_exps.weight") != std::string::npos ||
                        t.name.find(".ffn_gate_shexp.weight") != std::string::npos;
        if (ff && t.ne.size() >= 2) max_ff = std::max<int64_t>(max_ff, static_cast<int64_t>(t.ne[1]));
    }
    for (int i = 0; c.n_expert && i < c.n_layer; ++i)
        for (int p = 0; p < 3; ++p)
            if (const gguf::TensorInfo *t = f.tensor("blk." + std::to_string(i) + "." + exps[p])) slices[i][p] = t->nbytes / c.n_expert;
    std::vector<std::vector<size_t>> units;
    for (int i = 0; c.n_expert && i < c.n_layer; ++i) units.push_back({slices[i][0], slices[i][1], slices[i][2]});
    m.slot = c.n_expert ? stream_slot_bytes(units) : 0;
    std::vector<std::vector<size_t>> layer_units(c.n_layer);
    for (const gguf::TensorInfo &t : f.tensors())
        if (is_layer_matrix(t.name)) {
            m.layer_matrices += t.nbytes;
            const int layer = std::atoi(t.name.c_str() + 4);
            if (layer >= 0 && layer < c.n_layer) layer_units[layer].push_back(t.nbytes);
        }
    m.layer_slot = stream_slot_bytes(layer_units);
    m.kv = kv_bytes_for(c, n_ctx, kv);
    m.scratch = scratch_sizes(c, max_ff, n_ctx, threads, kBatch, kv).bytes(c, kBatch);
    return m;
}

void Model::ensure_scratch(int T) {
    if (T <= scratch_T_) return;
    const Scratch s = scratch_sizes(cfg_, max_ff_, n_ctx_, pool_.size(), T, kv_type_);
    x_.assign(s.x, 0);
    xb_.assign(s.xb, 0);
    q_.assign(s.q, 0);
    k_.assign(s.kv, 0);
    v_.assign(s.kv, 0);
    att_out_.assign(s.att, 0);
    hb_.assign(s.ff, 0);
    hb2_.assign(s.ff, 0);
    tmp_.assign(s.tmp, 0);
    scores_.assign(s.scores, 0);
    scratch_T_ = T;
}

void Model::matmuls(std::initializer_list<std::pair<const Matrix *, float *>> outs, const float *x, int T) {
    const int64_t cols = outs.begin()->first->cols;
    bool q8 = false;
    for (const auto &[w, y] : outs) q8 = q8 || kern::takes_q8(w->wtype);
    if (q8) {  // the int8 blocks of x, once for every matrix that takes them
        const size_t nb = cols / kern::QA;
        if (xq_.size() < nb * T) xq_.resize(nb * T);  // grow only: a resize up value-initializes, serially
        auto quantize = [&](size_t t0, size_t t1) {
            for (size_t t = t0; t < t1; ++t) ops_->quantize_act(x + t * cols, xq_.data() + nb * t, cols);
        };
        if (T >= kParallelTokens) pool_.range(size_t(T), quantize);  // a batch's tokens across the pool
        else quantize(0, size_t(T));
    }
    // rows in chunks of whole 16-row units (two 8-row groups: the kernels' row blocks, which the
    // AVX-512 sets take two at a time), the matrices' units one after another, a few chunks per thread
    // and matrix so a thread the OS runs late leaves its share to the others: 4 for a token; 2 for a
    // batch, whose every chunk repacks the activations it reads (SmolLM2 Q4_0 prefill at 2 threads:
    // 1510 tok/s with 4, 1615-1650 with 2, 1530-1600 with 1, 1250-1300 with 8; AMD EPYC Zen 4). Per
    // matrix, because a server's threads share the cores with its clients: with the chunks of one
    // matrix for q, k and v, four streams through HTTP ran at 280-345 tok/s against 337-349 in three
    // interleaved runs; with as many as before, 336-421 against 291-357 (benchmarks/serve.py, Zen 3).
    size_t units = 0;
    for (const auto &[w, y] : outs) units += (w->rows + 15) / 16;
    const int chunks = static_cast<int>(std::min<size_t>(units, size_t(pool_.size()) * (T > 1 ? 2 : 4) * outs.size()));
    pool_.run(
        [&](int i, int n) {
            const size_t u0 = units * i / n, u1 = units * (i + 1) / n;
            size_t first = 0;  // the current matrix's first unit
            for (const auto &[w, y] : outs) {
                const size_t rows = size_t(w->rows), mine = (rows + 15) / 16, b = std::max(u0, first), e = std::min(u1, first + mine);
                if (b < e) {
                    const bool takes = kern::takes_q8(w->wtype);
                    const uint8_t *a = takes ? reinterpret_cast<const uint8_t *>(xq_.data()) : reinterpret_cast<const uint8_t *>(x);
                    const size_t stride = takes ? cols / kern::QA * sizeof(kern::BlockQ8A) : cols * sizeof(float);
                    const size_t r0 = (b - first) * 16, r1 = std::min(rows, (e - first) * 16);
                    kern::gemm_rows(*ops_, w->wtype, w->data, w->row_bytes, w->packed, r0, r1, a, stride, T, y, rows, size_t(cols));
                }
                first += mine;
            }
        },
        chunks);
}

void Model::rope(float *x, int n_heads, int pos, bool local, bool magnitude) const {
    const int hd = cfg_.head_dim, half = hd / 2;
    local = local && !cfg_.swa_rope_global;
    const float p = local ? static_cast<float>(pos) : static_cast<float>(pos) / cfg_.rope_linear_factor;
    const std::vector<float> &inv_freq = local ? inv_freq_swa_ : inv_freq_;
    const float m = local || !magnitude ? 1.0f : rope_mscale_;
    for (int i = 0; i < half; ++i) {
        const float theta = p * inv_freq[i], cs = m * std::cos(theta), sn = m * std::sin(theta);
        for (int h = 0; h < n_heads; ++h) {
            float *v = x + size_t(h) * hd;
            const int a = cfg_.rope_neox ? i : 2 * i, b = cfg_.rope_neox ? i + half : 2 * i + 1;
            const float x0 = v[a], x1 = v[b];
            v[a] = x0 * cs - x1 * sn;
            v[b] = x0 * sn + x1 * cs;
        }
    }
}

// In place: x[0..n) <- H x / sqrt(n), H the n x n Sylvester-Hadamard matrix (n a power of 2). The
// transform is orthonormal and its own inverse, so it keeps dot products: rotating queries and
// keys alike leaves the scores unchanged while spreading each head's outlier channels over all of
// its values, so that int8 and 4-bit blocks lose less of them (a rotation of the quantized KV caches,
// as llama.cpp does for quantized caches).
static void hadamard(float *x, int n) {
    for (int s = 1; s < n; s *= 2)
        for (int i = 0; i < n; i += 2 * s)
            for (int j = i; j < i + s; ++j) {
                const float a = x[j], b = x[j + s];
                x[j] = a + b;
                x[j + s] = a - b;
            }
    const float norm = 1.0f / std::sqrt(static_cast<float>(n));
    for (int i = 0; i < n; ++i) x[i] *= norm;
}

// hadamard() over consecutive chunks of `chunk` values of x[0..n).
static void hadamard_chunks(float *x, int n, int chunk) {
    for (int i = 0; i < n; i += chunk) hadamard(x + i, chunk);
}

void Model::attention(const Layer &L, int layer, int T) {
    const ModelConfig &c = cfg_;
    const int hd = c.head_dim, q_dim = c.n_head * hd, kv_dim = c.n_head_kv * hd, group = c.n_head / c.n_head_kv;
    const bool local = c.is_local(layer);  // a sliding-window layer: its window of keys, in a ring of kv_cap_ rows
    const int cap = kv_cap_[layer];
    matmuls({{&L.wq, q_.data()}, {&L.wk, k_.data()}, {&L.wv, v_.data()}}, xb_.data(), T);
    // Per token: biases, q/k norms, rotary positions, rotations, and the token's keys and values into the
    // cache (its own rows), across the pool for a batch.
    auto prepare = [&](size_t t0, size_t t1) {
        for (int t = static_cast<int>(t0); t < static_cast<int>(t1); ++t) {
            float *q = q_.data() + size_t(t) * q_dim, *k = k_.data() + size_t(t) * kv_dim, *v = v_.data() + size_t(t) * kv_dim;
            if (L.bq) for (int i = 0; i < q_dim; ++i) q[i] += reinterpret_cast<const float *>(L.bq.data)[i];
            if (L.bk) for (int i = 0; i < kv_dim; ++i) k[i] += reinterpret_cast<const float *>(L.bk.data)[i];
            if (L.bv) for (int i = 0; i < kv_dim; ++i) v[i] += reinterpret_cast<const float *>(L.bv.data)[i];
            const float *qn = reinterpret_cast<const float *>(L.q_norm.data), *kn = reinterpret_cast<const float *>(L.k_norm.data);
            if (c.qk_norm == QKNorm::FULL) {
                rmsnorm(q, qn, q, q_dim, c.rms_eps);
                rmsnorm(k, kn, k, kv_dim, c.rms_eps);
            } else if (c.qk_norm == QKNorm::PER_HEAD) {
                for (int h = 0; h < c.n_head; ++h) rmsnorm(q + h * hd, qn, q + h * hd, hd, c.rms_eps);
                for (int h = 0; h < c.n_head_kv; ++h) rmsnorm(k + h * hd, kn, k + h * hd, hd, c.rms_eps);
            }
            rope(q, c.n_head, row_pos_[t], local);
            rope(k, c.n_head_kv, row_pos_[t], local);
            if (rot_k_) {
                hadamard_chunks(q, q_dim, rot_k_);
                hadamard_chunks(k, kv_dim, rot_k_);
            }
            if (rot_v_) hadamard_chunks(v, kv_dim, rot_v_);
            if (obs_window_) {  // compaction scores keys by the latest queries
                const size_t at = (size_t(row_seq_[t]) * c.n_layer + layer) * obs_window_ + size_t(row_pos_[t] % obs_window_);
                std::copy(q, q + q_dim, obs_q_.data() + at * q_dim);
                obs_pos_[at] = row_pos_[t];
            }
            const size_t row = kv_at(layer, row_seq_[t], row_pos_[t]);
            encode_kv(kv_type_.k, k, k_cache_.data() + row * k_row_, kv_dim);
            encode_kv(kv_type_.v, v, v_cache_.data() + row * v_row_, kv_dim);
            if (exact_rows_) {
                const size_t e = exact_at(layer, row_seq_[t], row_pos_[t]);
                if (!exact_k_.empty()) encode_kv(KVType::F16, k, reinterpret_cast<uint8_t *>(exact_k_.data() + e * kv_dim), kv_dim);
                if (!exact_v_.empty()) encode_kv(KVType::F16, v, reinterpret_cast<uint8_t *>(exact_v_.data() + e * kv_dim), kv_dim);
                exact_pos_[e] = row_pos_[t];
            }
        }
    };
    if (T >= kParallelTokens) pool_.range(size_t(T), prepare);
    else prepare(0, size_t(T));
    const KVType kt = kv_type_.k, vt = kv_type_.v;
    const bool batched_scores = kt == KVType::F16 && ops_->scores_f16 && hd % 8 == 0;
    const bool batched_values = vt == KVType::F16 && ops_->weighted_sum_f16 && hd % 8 == 0;
    const float scale = attn_scale();
    // one head's keys (values) at one position: whole blocks of the cache's type
    const size_t k_head = k_row_ / c.n_head_kv, v_head = v_row_ / c.n_head_kv;
    // A work item: one token's `heads` query heads of one KV head. In a batch of 16 rows and more (a
    // prompt's chunk; verifications stop at 15) with f16 caches the kernels take a KV head's query heads
    // together, each key and value row converted once for them: a 2,000-token prefill 1.15-1.18x faster
    // (SmolLM2, 3 heads a KV head, AMD EPYC Zen 4, 1 and 2 threads). Where every row comes from memory
    // once either way grouping measured 4-9 % slower (decode at context 1,000, one and four sequences),
    // so decode steps take the heads one by one (a batched step of 16 sequences or more groups them too).
    auto heads_per_item = [&] {  // the most of the group (a divisor of it) that leave an item per thread
        for (int d = grouped_heads(c, T, kv_type_); d > 1; --d)
            if (group % d == 0 && size_t(T) * c.n_head / d >= size_t(pool_.size())) return d;
        return 1;
    };
    const int heads = batched_scores && batched_values ? heads_per_item() : 1;
    const size_t items = size_t(T) * c.n_head / heads;
    pool_.run([&](int ti, int nt) {
        float *sc0 = scores_.data() + size_t(ti) * n_ctx_ * heads;  // [heads][n_ctx]
        for (size_t it = items * ti / nt; it < items * (ti + 1) / nt; ++it) {
            const int t = static_cast<int>(it * heads / c.n_head), h0 = static_cast<int>(it * heads % c.n_head), kvh = h0 / group;
            // keys of positions first..pos: rows first % cap.. of the row's slot, in two runs where a ring wraps
            const size_t slot_row = kv_base_[layer] + size_t(row_seq_[t]) * cap;
            const uint8_t *kc = k_cache_.data() + slot_row * k_row_, *vc = v_cache_.data() + slot_row * v_row_;
            const int pos = row_pos_[t], first = local ? std::max(0, pos - c.n_swa + 1) : 0, n_keys = pos - first + 1;
            const int row0 = first % cap, run0 = std::min(n_keys, cap - row0);
            auto row_of = [&](int j) { return size_t(j < run0 ? row0 + j : j - run0); };
            const size_t q_at = size_t(t) * q_dim + size_t(h0) * hd;  // the item's first head; the others follow, hd apart
            const uint8_t *kh = kc + size_t(kvh) * k_head, *vh = vc + size_t(kvh) * v_head;
            // key j's f16 row (its head) when a 4-bit cache holds it exactly (exact_rows_), else null
            const int exact0 = exact_rows_ ? std::max(0, pos - kExactRecent + 1 - first) : n_keys;
            auto exact = [&](const std::vector<uint16_t> &rows, int j) -> const uint16_t * {
                if (j < exact0 || rows.empty()) return nullptr;
                const size_t e = exact_at(layer, row_seq_[t], first + j);
                return exact_pos_[e] == first + j ? rows.data() + e * kv_dim + size_t(kvh) * hd : nullptr;
            };
            if (batched_scores) {
                const float *q = q_.data() + q_at;
                ops_->scores_f16(reinterpret_cast<const uint16_t *>(kh + size_t(row0) * k_row_), k_row_ / 2, run0, q, heads, hd, sc0, n_ctx_);
                if (run0 < n_keys)
                    ops_->scores_f16(reinterpret_cast<const uint16_t *>(kh), k_row_ / 2, n_keys - run0, q, heads, hd, sc0 + run0, n_ctx_);
            }
            for (int g = 0; g < heads; ++g) {  // each head's softmax
                const int h = h0 + g;
                float *sc = sc0 + size_t(g) * n_ctx_;
                float mx = -INFINITY;
                if (batched_scores) {
                    for (int j = 0; j < n_keys; ++j) mx = std::max(mx, sc[j] *= scale);
                } else {
                    const float *q = q_.data() + q_at + size_t(g) * hd;
                    for (int j = 0; j < n_keys; ++j) {
                        const uint16_t *ke = exact(exact_k_, j);
                        sc[j] = (ke ? ops_->dot_f16(ke, q, hd) : dot_kv(*ops_, kt, kh + row_of(j) * k_row_, q, hd)) * scale;
                        mx = std::max(mx, sc[j]);
                    }
                }
                const float sink = L.sinks ? reinterpret_cast<const float *>(L.sinks.data)[h] : -INFINITY;
                mx = std::max(mx, sink);
                float sum = L.sinks ? std::exp(sink - mx) : 0.0f;  // the sink takes its share of the softmax, then is dropped
                for (int j = 0; j < n_keys; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
                const float inv = 1.0f / sum;
                if (batched_values) {
                    for (int j = 0; j < n_keys; ++j) sc[j] *= inv;
                } else {
                    float *out = att_out_.data() + q_at + size_t(g) * hd;
                    std::fill(out, out + hd, 0.0f);
                    for (int j = 0; j < n_keys; ++j) {
                        if (const uint16_t *ve = exact(exact_v_, j)) ops_->axpy_f16(sc[j] * inv, ve, out, hd);
                        else axpy_kv(*ops_, vt, sc[j] * inv, vh + row_of(j) * v_row_, out, hd);
                    }
                }
            }
            if (batched_values) {
                float *out = att_out_.data() + q_at;
                ops_->weighted_sum_f16(reinterpret_cast<const uint16_t *>(vh + size_t(row0) * v_row_), v_row_ / 2, run0, sc0, n_ctx_,
                                       heads, hd, out);
                if (run0 < n_keys) {  // the ring's wrapped run, summed apart and added
                    float *rest = scores_.data() + size_t(pool_.size()) * n_ctx_ * heads + size_t(ti) * hd * heads;
                    ops_->weighted_sum_f16(reinterpret_cast<const uint16_t *>(vh), v_row_ / 2, n_keys - run0, sc0 + run0, n_ctx_,
                                           heads, hd, rest);
                    for (int i = 0; i < hd * heads; ++i) out[i] += rest[i];
                }
            }
        }
    });
    if (rot_v_) hadamard_chunks(att_out_.data(), T * q_dim, rot_v_);  // the values' rotation undone
    matmul(L.wo, att_out_.data(), tmp_.data(), T);
    if (L.bo)
        for (int t = 0; t < T; ++t)
            for (int i = 0; i < c.n_embd; ++i) tmp_[size_t(t) * c.n_embd + i] += reinterpret_cast<const float *>(L.bo.data)[i];
    if (L.post_attn_norm) post_norm(L.post_attn_norm, T);
    for (size_t i = 0; i < size_t(T) * c.n_embd; ++i) x_[i] += tmp_[i];
}

void Model::post_norm(const Matrix &w, int T) {
    const int d = cfg_.n_embd;
    for (int t = 0; t < T; ++t) rmsnorm(&tmp_[size_t(t) * d], reinterpret_cast<const float *>(w.data), &tmp_[size_t(t) * d], d, cfg_.rms_eps);
}

// hb_[i] = gelu(hb_[i]) * hb2_[i] with GELU's tanh approximation (Gemma's gelu_pytorch_tanh), by the
// kernel set's vector code where it has one, across the pool for a batch, as swiglu.
void Model::geglu(size_t n) {
    auto apply = [this](size_t i0, size_t i1) {
        if (ops_->gelu_mul) return ops_->gelu_mul(hb_.data() + i0, hb2_.data() + i0, i1 - i0);
        constexpr float kSqrt2OverPi = 0.79788456080286535588f, kCoef = 0.044715f;
        for (size_t i = i0; i < i1; ++i) {
            const float x = hb_[i];
            hb_[i] = 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * x * (1.0f + kCoef * x * x))) * hb2_[i];
        }
    };
    if (n < kParallelElements) apply(0, n);
    else pool_.range(n, apply);
}

// hb_[i] = silu(hb_[i]) * hb2_[i] for the first n values, by the kernel set's vector code where it has
// one: across the pool for a batch (with std::exp, a tenth of a prefill's time on one thread), in
// this thread for a token.
void Model::swiglu(size_t n) {
    auto apply = [this](size_t i0, size_t i1) {
        if (ops_->silu_mul) return ops_->silu_mul(hb_.data() + i0, hb2_.data() + i0, i1 - i0);
        for (size_t i = i0; i < i1; ++i) hb_[i] = silu(hb_[i]) * hb2_[i];
    };
    if (n < kParallelElements) apply(0, n);
    else pool_.range(n, apply);
}

void Model::swiglu_oai(size_t n) {
    const float alpha = cfg_.swiglu_alpha, limit = cfg_.swiglu_limit;
    for (size_t i = 0; i < n; ++i) {
        const float g = std::min(hb_[i], limit), u = std::min(std::max(hb2_[i], -limit), limit);
        hb_[i] = g / (1.0f + std::exp(-alpha * g)) * (u + 1.0f);
    }
}

void Model::ffn(const Layer &L, int, int T) {
    const int64_t n_ff = L.gate.rows;
    matmuls({{&L.gate, hb_.data()}, {&L.up, hb2_.data()}}, xb_.data(), T);
    if (cfg_.ffn_gelu) geglu(size_t(T) * n_ff);
    else swiglu(size_t(T) * n_ff);
    matmul(L.down, hb_.data(), tmp_.data(), T);
    if (L.post_ffn_norm) post_norm(L.post_ffn_norm, T);
    for (size_t i = 0; i < size_t(T) * cfg_.n_embd; ++i) x_[i] += tmp_[i];
}

void Model::moe(const Layer &L, int layer, int T) {
    const ModelConfig &c = cfg_;
    const int E = c.n_expert, K = c.n_expert_used, d = c.n_embd;
    std::vector<float> &router = moe_router_;  // [T][E]
    router.resize(size_t(T) * E);
    matmul(L.router, xb_.data(), router.data(), T);
    if (L.router_b)
        for (int t = 0; t < T; ++t)
            for (int e = 0; e < E; ++e) router[size_t(t) * E + e] += reinterpret_cast<const float *>(L.router_b.data)[e];
    // routing: softmax over all experts, top-k by probability, optional renormalisation
    auto &routed = moe_routed_;  // expert -> (token, weight)
    routed.resize(E);
    for (auto &r : routed) r.clear();
    std::vector<int> &idx = moe_idx_;
    idx.resize(E);
    for (int t = 0; t < T; ++t) {
        float *r = router.data() + size_t(t) * E;
        const float mx = *std::max_element(r, r + E);
        float sum = 0.0f;
        for (int e = 0; e < E; ++e) sum += (r[e] = std::exp(r[e] - mx));
        for (int e = 0; e < E; ++e) r[e] /= sum;
        std::iota(idx.begin(), idx.end(), 0);
        std::partial_sort(idx.begin(), idx.begin() + K, idx.end(),
                          [&](int a, int b) { return r[a] > r[b] || (r[a] == r[b] && a < b); });
        float wsum = 0.0f;
        for (int k = 0; k < K; ++k) wsum += r[idx[k]];
        for (int k = 0; k < K; ++k) routed[idx[k]].emplace_back(t, c.moe_renormalize ? r[idx[k]] / wsum : r[idx[k]]);
    }
    std::vector<int> &order = moe_order_;  // the experts this batch routes to, each read once
    order.clear();
    for (int e = 0; e < E; ++e)
        if (!routed[e].empty()) order.push_back(e);
    experts_->request(layer, order);
    // Decode: while this layer computes, read what the next layer's router would pick for the
    // current state (a prediction; prefill reads whole batches and needs none).
    if (T == 1 && experts_->streams() && prefetch_ && layer + 1 < c.n_layer) prefetch_experts(layer + 1);
    std::vector<float> &acc = moe_acc_, &xin = moe_xin_, &out = moe_out_;  // [T][d], [Te][d], [Te][d]
    acc.assign(size_t(T) * d, 0.0f);
    for (int e : order) {
        const auto &tokens = routed[e];
        const int Te = static_cast<int>(tokens.size());
        xin.resize(size_t(Te) * d);
        for (int i = 0; i < Te; ++i) std::memcpy(&xin[size_t(i) * d], &xb_[size_t(tokens[i].first) * d], d * sizeof(float));
        const ExpertWeights w = experts_->acquire(layer, e);
        const int64_t n_ff = w.gate.rows;
        matmuls({{&w.gate, hb_.data()}, {&w.up, hb2_.data()}}, xin.data(), Te);
        // expert e's bias rows added to each of its tokens' outputs (gpt-oss)
        auto add_bias = [&](const Matrix &b, float *y, int64_t n) {
            if (!b) return;
            const float *row = reinterpret_cast<const float *>(b.row(e));
            for (int i = 0; i < Te; ++i)
                for (int64_t j = 0; j < n; ++j) y[size_t(i) * n + j] += row[j];
        };
        add_bias(L.exps_b[0], hb_.data(), n_ff);
        add_bias(L.exps_b[1], hb2_.data(), n_ff);
        if (c.swiglu_limit > 0) swiglu_oai(size_t(Te) * n_ff);
        else swiglu(size_t(Te) * n_ff);
        out.resize(size_t(Te) * d);
        matmul(w.down, hb_.data(), out.data(), Te);
        add_bias(L.exps_b[2], out.data(), d);
        experts_->release(layer, e);
        for (int i = 0; i < Te; ++i) {
            float *a = &acc[size_t(tokens[i].first) * d];
            const float wt = tokens[i].second;
            for (int j = 0; j < d; ++j) a[j] += wt * out[size_t(i) * d + j];
        }
    }
    if (L.gate_shexp) {
        const int64_t n_sh = L.gate_shexp.rows;
        matmuls({{&L.gate_shexp, hb_.data()}, {&L.up_shexp, hb2_.data()}}, xb_.data(), T);
        swiglu(size_t(T) * n_sh);
        matmul(L.down_shexp, hb_.data(), tmp_.data(), T);
        const float *gw = reinterpret_cast<const float *>(L.shexp_gate.data);
        for (int t = 0; t < T; ++t) {
            float gate = 1.0f;
            if (gw) {
                float z = 0.0f;
                for (int j = 0; j < d; ++j) z += gw[j] * xb_[size_t(t) * d + j];
                gate = 1.0f / (1.0f + std::exp(-z));
            }
            for (int j = 0; j < d; ++j) acc[size_t(t) * d + j] += gate * tmp_[size_t(t) * d + j];
        }
    }
    for (size_t i = 0; i < size_t(T) * d; ++i) x_[i] += acc[i];
}

void Model::prefetch_experts(int layer) {
    const ModelConfig &c = cfg_;
    const Layer &N = layers_[layer];
    moe_pred_in_.resize(c.n_embd);
    moe_pred_.resize(c.n_expert);
    // x_ is the residual stream after this layer's attention: normalised as the next layer will.
    rmsnorm(x_.data(), reinterpret_cast<const float *>(N.ffn_norm.data), moe_pred_in_.data(), c.n_embd, c.rms_eps);
    matmul(N.router, moe_pred_in_.data(), moe_pred_.data(), 1);
    if (N.router_b)
        for (int e = 0; e < c.n_expert; ++e) moe_pred_[e] += reinterpret_cast<const float *>(N.router_b.data)[e];
    std::vector<int> &idx = moe_idx_;
    idx.resize(c.n_expert);
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + prefetch_top_, idx.end(),
                      [&](int a, int b) { return moe_pred_[a] > moe_pred_[b] || (moe_pred_[a] == moe_pred_[b] && a < b); });
    idx.resize(prefetch_top_);  // the most likely experts (moe_idx_ is refilled by the next routing)
    experts_->prefetch(layer, idx);
}

// Dense streaming: this layer's matrices from the layer store (the next layer, in the cycle, is
// read meanwhile), as a view of the layer with its matrices pointing into the slot.
const Model::Layer &Model::acquire_layer(int l) {
    layer_store_->request(l, {l});
    layer_store_->prefetch({(l + 1) % cfg_.n_layer});
    const std::vector<const uint8_t *> at = layer_store_->acquire(l);
    layer_view_ = layers_[l];
    for (size_t k = 0; k < at.size(); ++k) (layer_view_.*layer_members_[l][k]).data = at[k];
    return layer_view_;
}

void Model::forward(const int32_t *tokens, int T, const std::vector<int> &out_rows, float *logits_out) {
    const ModelConfig &c = cfg_;
    const int d = c.n_embd;
    ensure_scratch(T);
    for (int t = 0; t < T; ++t) embed(tokens[t], x_.data() + size_t(t) * d);
    if (c.embd_scale != 1.0f)  // Gemma
        for (size_t i = 0; i < size_t(T) * d; ++i) x_[i] *= c.embd_scale;
    const float *out_norm = reinterpret_cast<const float *>(output_norm_.data);
    // xb_[t] = rmsnorm(x_[t]) * w for every token of the batch: across the pool for a batch (serial,
    // it left the other threads waiting for a twentieth of a 2-thread prefill)
    auto norm_tokens = [&](const Matrix &w) {
        auto apply = [&](size_t t0, size_t t1) {
            for (size_t t = t0; t < t1; ++t)
                rmsnorm(&x_[t * d], reinterpret_cast<const float *>(w.data), &xb_[t * d], d, c.rms_eps);
        };
        if (T >= kParallelTokens) pool_.range(size_t(T), apply);
        else apply(0, size_t(T));
    };
    for (int l = 0; l < c.n_layer; ++l) {
        if (skip_ && (*skip_)[l]) continue;  // self-speculation's draft: the layer passes its input through
        const Layer &L = layer_store_ ? acquire_layer(l) : layers_[l];
        norm_tokens(L.attn_norm);
        attention(L, l, T);
        norm_tokens(L.ffn_norm);
        if (c.n_expert) moe(L, l, T);
        else ffn(L, l, T);
        if (layer_store_) layer_store_->release(l);
    }
    const int n_out = static_cast<int>(out_rows.size());
    if (n_out == 0) return;
    for (int i = 0; i < n_out; ++i) rmsnorm(&x_[size_t(out_rows[i]) * d], out_norm, &xb_[size_t(i) * d], d, c.rms_eps);
    matmul(output_, xb_.data(), logits_out, n_out);
    if (c.logit_softcap > 0)  // Gemma 2 style soft cap (Gemma 3 files may set it)
        for (size_t i = 0; i < size_t(n_out) * c.n_vocab; ++i) logits_out[i] = c.logit_softcap * std::tanh(logits_out[i] / c.logit_softcap);
}

const Model::Sequence &Model::at(int seq) const {
    if (seq < 0 || seq >= static_cast<int>(seqs_.size()))
        throw ModelError("sequence slot " + std::to_string(seq) + " does not exist: this engine has " + std::to_string(seqs_.size()) +
                         " (slots 0.." + std::to_string(seqs_.size() - 1) + ")");
    return seqs_[seq];
}

void Model::kept_rows(Sequence &S, int pos_end) {
    // after positions up to pos_end - 1 a ring holds positions pos_end - cap .. pos_end - 1 (a layer skipped
    // for a self-speculative draft wrote none: counting it only makes truncate re-evaluate sooner than it must)
    for (int l = 0; l < cfg_.n_layer; ++l) S.ring_from = std::max(S.ring_from, pos_end - kv_cap_[l]);
}

void Model::eval(const std::vector<int32_t> &tokens, std::vector<float> *all_logits, const std::vector<uint8_t> *skip_layers, int seq) {
    Sequence &S = at(seq);
    if (tokens.empty()) return;
    if (skip_layers && skip_layers->size() != size_t(cfg_.n_layer))
        throw ModelError("the layer mask has " + std::to_string(skip_layers->size()) + " entries for " + std::to_string(cfg_.n_layer) + " layers");
    if (skip_layers && layer_store_) throw ModelError("layers cannot be skipped while dense layers are streamed");
    struct Reset {  // skip_ holds only for this call, also when it throws
        const std::vector<uint8_t> *&p;
        ~Reset() { p = nullptr; }
    } reset{skip_};
    skip_ = skip_layers;
    if (S.history.size() + tokens.size() > static_cast<size_t>(n_ctx_))
        throw ModelError("context full: " + std::to_string(S.history.size()) + " + " + std::to_string(tokens.size()) +
                         " tokens exceed n_ctx=" + std::to_string(n_ctx_) + (seqs_.size() > 1 ? " (slot " + std::to_string(seq) + ")" : ""));
    for (int32_t t : tokens)
        if (t < 0 || t >= cfg_.n_vocab)
            throw ModelError("token id " + std::to_string(t) + " is outside the vocabulary of " + std::to_string(cfg_.n_vocab));
    const size_t V = cfg_.n_vocab;
    if (all_logits) all_logits->assign(tokens.size() * V, 0.0f);
    std::vector<int> out_rows;
    for (size_t b = 0; b < tokens.size(); b += kBatch) {
        const int T = static_cast<int>(std::min<size_t>(kBatch, tokens.size() - b));
        const int pos0 = static_cast<int>(S.history.size());
        row_seq_.assign(T, seq);
        row_pos_.resize(T);
        std::iota(row_pos_.begin(), row_pos_.end(), pos0);
        out_rows.resize(all_logits ? T : 1);
        std::iota(out_rows.begin(), out_rows.end(), all_logits ? 0 : T - 1);
        // the logits go where they are kept: no vocabulary-sized buffer in between (262k for Gemma 3)
        float *out = all_logits ? all_logits->data() + b * V : S.logits.data();
        forward(tokens.data() + b, T, out_rows, out);
        S.history.insert(S.history.end(), tokens.begin() + b, tokens.begin() + b + T);
        if (all_logits) std::copy(out + size_t(T - 1) * V, out + size_t(T) * V, S.logits.begin());
        kept_rows(S, pos0 + T);
    }
}

std::vector<int32_t> Model::step(const std::vector<SeqStep> &steps) {
    // checked first, so that a bad entry changes no slot
    std::vector<uint8_t> seen(seqs_.size(), 0);
    for (const SeqStep &e : steps) {
        const Sequence &S = at(e.seq);
        if (seen[e.seq]++) throw ModelError("sequence slot " + std::to_string(e.seq) + " appears twice in one batched step");
        if (e.tokens.empty()) throw ModelError("sequence slot " + std::to_string(e.seq) + " has no tokens in this step");
        if (S.history.size() + e.tokens.size() > static_cast<size_t>(n_ctx_))
            throw ModelError("context full: " + std::to_string(S.history.size()) + " + " + std::to_string(e.tokens.size()) +
                             " tokens exceed n_ctx=" + std::to_string(n_ctx_) + " (slot " + std::to_string(e.seq) + ")");
        for (int32_t t : e.tokens)
            if (t < 0 || t >= cfg_.n_vocab)
                throw ModelError("token id " + std::to_string(t) + " is outside the vocabulary of " + std::to_string(cfg_.n_vocab) +
                                 " (slot " + std::to_string(e.seq) + ")");
    }
    // several tokens (a prompt): alone, in eval()'s batches, so that its rows get the bits they get alone
    std::vector<const SeqStep *> decode;
    for (const SeqStep &e : steps) {
        if (e.tokens.size() > 1) eval(e.tokens, nullptr, nullptr, e.seq);
        else decode.push_back(&e);
    }
    // one token per slot: one batch for all (n_seq <= kBatch rows)
    if (!decode.empty()) {
        const int T = static_cast<int>(decode.size()), V = cfg_.n_vocab;
        std::vector<int32_t> tokens(T);
        row_seq_.resize(T);
        row_pos_.resize(T);
        std::vector<int> out_rows(T);
        for (int t = 0; t < T; ++t) {
            tokens[t] = decode[t]->tokens[0];
            row_seq_[t] = decode[t]->seq;
            row_pos_[t] = static_cast<int>(seqs_[decode[t]->seq].history.size());
            out_rows[t] = t;
        }
        batch_logits_.resize(size_t(T) * V);
        forward(tokens.data(), T, out_rows, batch_logits_.data());
        for (int t = 0; t < T; ++t) {
            Sequence &S = seqs_[row_seq_[t]];
            S.history.push_back(tokens[t]);
            std::copy(batch_logits_.begin() + size_t(t) * V, batch_logits_.begin() + size_t(t + 1) * V, S.logits.begin());
            kept_rows(S, row_pos_[t] + 1);
        }
    }
    // each slot samples with its own generator: across the pool, the draws are those made one by one
    std::vector<int32_t> out(steps.size(), -1);
    std::vector<size_t> drawn;
    for (size_t i = 0; i < steps.size(); ++i)
        if (steps[i].sample) drawn.push_back(i);
    std::vector<std::exception_ptr> failed(drawn.size());
    auto draw = [&](int j, int) {
        const SeqStep &e = steps[drawn[j]];
        Sequence &S = seqs_[e.seq];
        const SamplingParams &p = S.sampling;
        const bool plain_greedy = p.temperature <= 0.0f && !e.mask && (p.repeat_penalty == 1.0f || p.repeat_last_n <= 0);
        try {
            out[drawn[j]] = plain_greedy ? static_cast<int32_t>(std::max_element(S.logits.begin(), S.logits.end()) - S.logits.begin())
                                         : sample_token(S.logits, S.history, p, S.rng, e.mask);
        } catch (...) {
            failed[j] = std::current_exception();
        }
    };
    if (drawn.size() > 1) pool_.run(draw, static_cast<int>(drawn.size()));
    else if (!drawn.empty()) draw(0, 1);
    for (const std::exception_ptr &f : failed)
        if (f) std::rethrow_exception(f);
    return out;
}

void Model::truncate(int n, int seq) {
    Sequence &S = at(seq);
    if (n < 0 || n > n_past(seq)) throw ModelError("cannot keep " + std::to_string(n) + " of " + std::to_string(n_past(seq)) + " positions");
    // The next token (position n) of a sliding-window layer reads positions n - n_swa + 1 .. n - 1;
    // when the rings have overwritten some of them, the prefix is evaluated again from an empty cache.
    if (n > 0 && std::max(0, n - cfg_.n_swa + 1) < S.ring_from) {
        std::vector<int32_t> keep(S.history.begin(), S.history.begin() + n);
        S.history.clear();
        S.ring_from = 0;
        eval(keep, nullptr, nullptr, seq);
        return;
    }
    S.history.resize(n);  // cache rows past n are simply overwritten later
    if (n == 0) S.ring_from = 0;
}

void Model::set_sampling(const SamplingParams &p, int seq) {
    Sequence &S = at(seq);
    S.sampling = p;
    S.rng.seed(p.seed);
}

void Model::refuse_rings(const char *what) const {
    for (int l = 0; l < cfg_.n_layer; ++l)
        if (cfg_.is_local(l))
            throw ModelError(std::string("cannot ") + what + " KV positions of a model with sliding-window layers: their rings "
                             "would need the moved keys re-rotated in place, which the engine does not do; truncate and "
                             "re-evaluate instead");
}

// Rotations compose: R(p - delta) = R(-delta) R(p). The Hadamard rotation is its own inverse. A
// quantized key is rounded again by each move (as in llama.cpp's context shift of a quantized
// cache): its error grows with the number of moves, not with their size.
void Model::shift_key(KVType t, const uint8_t *src, uint8_t *dst, int values, int delta, float *tmp) const {
    decode_kv(t, src, tmp, values);
    if (rot_k_) hadamard_chunks(tmp, values, rot_k_);
    rope(tmp, values / cfg_.head_dim, -delta, false, false);
    if (rot_k_) hadamard_chunks(tmp, values, rot_k_);
    encode_kv(t, tmp, dst, values);
}

void Model::forget_exact(int layer, int seq, int from) {
    const size_t row0 = exact_at(layer, seq, 0);
    for (size_t r = row0; r < row0 + size_t(exact_rows_); ++r)
        if (exact_pos_[r] >= from) exact_pos_[r] = -1;
}

// The exact rows of positions end..n-1 that a ring still holds move to their positions less
// end - start (keys re-rotated from their f16 bits, as shift_key does for the cache); the rows of
// positions start.. no longer held are forgotten. Staged first: a move can land on a row still to move.
void Model::shift_exact(int layer, int seq, int start, int end, int n, float *tmp) {
    const int kv_dim = cfg_.n_head_kv * cfg_.head_dim, delta = end - start;
    const size_t per_pos = size_t(kv_dim) * sizeof(uint16_t);
    std::vector<int> moved;
    std::vector<uint16_t> staged_k, staged_v;
    for (int p = std::max(end, n - exact_rows_); p < n; ++p) {
        const size_t e = exact_at(layer, seq, p);
        if (exact_pos_[e] != p) continue;
        moved.push_back(p - delta);
        if (!exact_k_.empty()) {
            staged_k.resize(staged_k.size() + kv_dim);
            shift_key(KVType::F16, reinterpret_cast<const uint8_t *>(exact_k_.data() + e * kv_dim),
                      reinterpret_cast<uint8_t *>(staged_k.data() + staged_k.size() - kv_dim), kv_dim, delta, tmp);
        }
        if (!exact_v_.empty()) staged_v.insert(staged_v.end(), exact_v_.begin() + e * kv_dim, exact_v_.begin() + (e + 1) * kv_dim);
    }
    forget_exact(layer, seq, start);
    for (size_t i = 0; i < moved.size(); ++i) {
        const size_t e = exact_at(layer, seq, moved[i]);
        if (!exact_k_.empty()) std::memcpy(exact_k_.data() + e * kv_dim, staged_k.data() + i * kv_dim, per_pos);
        if (!exact_v_.empty()) std::memcpy(exact_v_.data() + e * kv_dim, staged_v.data() + i * kv_dim, per_pos);
        exact_pos_[e] = moved[i];
    }
}

void Model::forget_queries(int seq) {
    if (!obs_window_) return;
    const size_t per_seq = size_t(cfg_.n_layer) * obs_window_;
    std::fill(obs_pos_.begin() + size_t(seq) * per_seq, obs_pos_.begin() + size_t(seq + 1) * per_seq, -1);
}

void Model::evict(int start, int end, int seq) {
    Sequence &S = at(seq);
    const int n = n_past(seq);
    if (start < 0 || end < start || end > n)
        throw ModelError("cannot evict positions [" + std::to_string(start) + ", " + std::to_string(end) + ") of a KV cache holding " +
                         std::to_string(n));
    const int delta = end - start;
    if (delta == 0) return;
    refuse_rings("evict");
    const int kv_dim = cfg_.n_head_kv * cfg_.head_dim;
    // Each later key moves down by delta, turned back by delta positions; values carry no position.
    auto move = [&](size_t l0, size_t l1) {
        std::vector<float> tmp(kv_dim);
        uint8_t *kc = k_cache_.data(), *vc = v_cache_.data();
        for (size_t l = l0; l < l1; ++l)
            for (int p = end; p < n; ++p) {
                const size_t from = kv_at(int(l), seq, p), to = from - delta;  // rows (no rings here: n_ctx per layer and slot)
                shift_key(kv_type_.k, kc + from * k_row_, kc + to * k_row_, kv_dim, delta, tmp.data());
                std::memmove(vc + to * v_row_, vc + from * v_row_, v_row_);
            }
        if (exact_rows_)
            for (size_t l = l0; l < l1; ++l) shift_exact(int(l), seq, start, end, n, tmp.data());
    };
    pool_.range(size_t(cfg_.n_layer), move);  // layers are independent
    S.history.erase(S.history.begin() + start, S.history.begin() + end);
    forget_queries(seq);
}

void Model::observe(int window) {
    if (window < 0 || window > n_ctx_) throw ModelError("cannot observe " + std::to_string(window) + " queries with a context of " + std::to_string(n_ctx_));
    obs_window_ = window;
    const size_t entries = size_t(seqs_.size()) * cfg_.n_layer * window;
    obs_q_.assign(entries * cfg_.n_head * cfg_.head_dim, 0.0f);
    obs_pos_.assign(entries, -1);
}

std::vector<int32_t> Model::compact(int n, int keep, int sink, int recent, int seq, std::vector<float> *scores_out) {
    Sequence &S = at(seq);
    const int past = n_past(seq);
    if (n < 0 || n > past || keep < 0 || keep > n || sink < 0 || recent < 0 || sink + recent > keep)
        throw ModelError("cannot compact the first " + std::to_string(n) + " of " + std::to_string(past) + " positions to " + std::to_string(keep) +
                         " keeping " + std::to_string(sink) + " sink and " + std::to_string(recent) + " recent ones (0 <= sink + recent <= keep <= n <= positions held)");
    refuse_rings("compact");
    const ModelConfig &c = cfg_;
    const int hd = c.head_dim, q_dim = c.n_head * hd, group = c.n_head / c.n_head_kv, n_kv = c.n_head_kv;
    const int middle = keep - sink - recent, lo = sink, hi = n - recent;  // the middle candidates: [lo, hi)
    const float scale = attn_scale();
    const size_t k_head = k_row_ / n_kv, v_head = v_row_ / n_kv;
    std::vector<int32_t> kept(size_t(c.n_layer) * n_kv * keep);
    if (scores_out) scores_out->assign(size_t(c.n_layer) * n_kv * n, 0.0f);
    // the observed queries of this slot: those of the last obs_window_ positions evaluated (probe included)
    const int newest = past - 1;
    auto work = [&](size_t i0, size_t i1) {
        std::vector<float> score(n), logit(n), pooled(n), tmp(hd);
        std::vector<int> order;
        for (size_t item = i0; item < i1; ++item) {
            const int l = int(item / n_kv), kvh = int(item % n_kv);
            uint8_t *kc = k_cache_.data() + kv_at(l, seq, 0) * k_row_ + kvh * k_head;
            uint8_t *vc = v_cache_.data() + kv_at(l, seq, 0) * v_row_ + kvh * v_head;
            std::fill(score.begin(), score.end(), 0.0f);
            if (obs_window_ && middle > 0 && hi > lo) {
                const size_t base = (size_t(seq) * c.n_layer + l) * obs_window_;
                for (int e = 0; e < obs_window_; ++e) {
                    const int qp = obs_pos_[base + e];
                    if (qp < 0 || qp > newest || qp <= newest - obs_window_) continue;  // none, rolled back, or older
                    const int m = std::min(qp, n - 1) + 1;  // the keys this query saw among the kept candidates
                    for (int g = 0; g < group; ++g) {
                        const float *q = obs_q_.data() + (base + e) * q_dim + size_t(kvh * group + g) * hd;
                        float mx = -INFINITY;
                        for (int j = 0; j < m; ++j)  // as attention scores them, from the cache's own encoding
                            mx = std::max(mx, logit[j] = dot_kv(*ops_, kv_type_.k, kc + size_t(j) * k_row_, q, hd) * scale);
                        double sum = 0.0;
                        for (int j = 0; j < m; ++j) sum += (logit[j] = std::exp(logit[j] - mx));
                        const float inv = float(1.0 / sum);
                        for (int j = 0; j < m; ++j) score[j] += logit[j] * inv;
                    }
                }
            }
            if (scores_out) std::copy(score.begin(), score.end(), scores_out->begin() + item * n);
            // max-pool the candidates' scores over kPoolWidth neighbours (within the candidates)
            for (int j = lo; j < hi; ++j) {
                float best = 0.0f;
                for (int o = std::max(lo, j - kPoolWidth / 2); o <= std::min(hi - 1, j + kPoolWidth / 2); ++o) best = std::max(best, score[o]);
                pooled[j] = best;
            }
            order.resize(std::max(0, hi - lo));
            std::iota(order.begin(), order.end(), lo);
            const int take = std::min(middle, hi - lo);
            std::partial_sort(order.begin(), order.begin() + take, order.end(),
                              [&](int a, int b) { return pooled[a] > pooled[b] || (pooled[a] == pooled[b] && a > b); });
            std::sort(order.begin(), order.begin() + take);
            int32_t *k_out = kept.data() + item * keep;
            int w = 0;
            for (int p = 0; p < sink; ++p) k_out[w++] = p;
            for (int i = 0; i < take; ++i) k_out[w++] = order[i];
            for (int p = hi; p < n; ++p) k_out[w++] = p;
            // move down in order: position k_out[i] >= i, and the rows written so far are below it
            for (int i = 0; i < keep; ++i) {
                const int p = k_out[i];
                if (p == i) continue;
                shift_key(kv_type_.k, kc + size_t(p) * k_row_, kc + size_t(i) * k_row_, hd, p - i, tmp.data());
                std::memmove(vc + size_t(i) * v_row_, vc + size_t(p) * v_row_, v_head);
            }
        }
    };
    pool_.range(size_t(c.n_layer) * n_kv, work);
    // each head kept its own positions: the exact rows past the sinks (which stay) no longer match
    if (exact_rows_)
        for (int l = 0; l < c.n_layer; ++l) forget_exact(l, seq, sink);
    std::vector<int32_t> h(S.history.begin(), S.history.begin() + sink);
    h.insert(h.end(), S.history.begin() + (n - (keep - sink)), S.history.begin() + n);
    S.history = std::move(h);
    forget_queries(seq);  // positions changed: the next compaction waits for new queries
    return kept;
}

int Model::sample(const uint32_t *mask, int seq) {
    Sequence &S = at(seq);
    // greedy without mask or penalty: the argmax, without sample_token's copy of the logits
    const SamplingParams &p = S.sampling;
    const bool plain_greedy = p.temperature <= 0.0f && !mask && (p.repeat_penalty == 1.0f || p.repeat_last_n <= 0);
    const int token = plain_greedy ? static_cast<int>(std::max_element(S.logits.begin(), S.logits.end()) - S.logits.begin())
                                   : sample_token(S.logits, S.history, p, S.rng, mask);
    // Streaming: the next step starts with layer 0, which no earlier layer can predict; its router
    // applied to the sampled token's embedding guesses its experts while the caller takes the token.
    if (experts_->streams() && prefetch_ && scratch_T_ > 0) {
        embed(token, x_.data());
        prefetch_experts(0);
    }
    return token;
}

// Same chain and semantics as runtimes/sampling.py: penalty -> top-k -> top-p -> min-p -> temperature.
// Greedy (temperature <= 0): the one arg-max token with weight 1.
void sampling_candidates(std::vector<float> &z, const std::vector<int32_t> &history, const SamplingParams &s,
                         const uint32_t *mask, std::vector<int> &ids, std::vector<double> &w) {
    if (mask) {  // first, as a grammar comes before every other stage: the rest choose among what it allows
        bool any = false;
        for (size_t t = 0; t < z.size(); ++t) {
            const bool allowed = (mask[t / 32] >> (t % 32)) & 1u;
            if (!allowed) z[t] = -std::numeric_limits<float>::infinity();
            any |= allowed;
        }
        if (!any) throw ModelError("the token mask allows no token of the vocabulary");
    }
    if (s.repeat_penalty != 1.0f && s.repeat_last_n > 0) {
        const size_t n = history.size(), from = n > size_t(s.repeat_last_n) ? n - s.repeat_last_n : 0;
        std::vector<int32_t> seen(history.begin() + from, history.end());
        std::sort(seen.begin(), seen.end());
        seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
        for (int32_t t : seen)
            if (t >= 0 && size_t(t) < z.size()) z[t] = z[t] > 0 ? z[t] / s.repeat_penalty : z[t] * s.repeat_penalty;
    }
    const int V = static_cast<int>(z.size());
    if (s.temperature <= 0.0f) {
        ids.assign(1, static_cast<int>(std::max_element(z.begin(), z.end()) - z.begin()));
        w.assign(1, 1.0);
        return;
    }
    ids.resize(V);
    std::iota(ids.begin(), ids.end(), 0);
    const int k = (s.top_k > 0 && s.top_k < V) ? s.top_k : V;
    auto before = [&](int a, int b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), before);
    ids.resize(k);
    std::vector<double> p(k);
    double sum = 0.0;
    for (int i = 0; i < k; ++i) sum += (p[i] = std::exp(double(z[ids[i]]) - z[ids[0]]));
    for (double &v : p) v /= sum;
    int keep = k;
    if (s.top_p < 1.0f) {
        double cum = 0.0;
        keep = k;
        for (int i = 0; i < k; ++i) {
            cum += p[i];
            if (cum >= s.top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    if (s.min_p > 0.0f) {
        int m = 0;
        for (int i = 0; i < keep; ++i) m += p[i] >= s.min_p * p[0];
        keep = std::max(1, m);
    }
    ids.resize(keep);
    w.resize(keep);
    for (int i = 0; i < keep; ++i) w[i] = std::exp((double(z[ids[i]]) - z[ids[0]]) / s.temperature);
}

int sample_token(std::vector<float> z, const std::vector<int32_t> &history, const SamplingParams &s, std::mt19937_64 &rng,
                 const uint32_t *mask) {
    std::vector<int> ids;
    std::vector<double> w;
    sampling_candidates(z, history, s, mask, ids, w);
    if (s.temperature <= 0.0f) return ids[0];
    const int keep = static_cast<int>(ids.size());
    double wsum = 0.0;
    for (double v : w) wsum += v;
    const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53 * wsum;
    double cum = 0.0;
    for (int i = 0; i < keep; ++i) {
        cum += w[i];
        if (u < cum) return ids[i];
    }
    return ids[keep - 1];
}

}  // namespace edgeai
