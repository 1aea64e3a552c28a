// Fuzz target: loading the engine (edgeai::Model) from arbitrary bytes, then one tiny evaluation.
// The model's configuration comes from the file's own header the way runtimes/native.py
// engine_config reads it (hyper-parameters under general.architecture's prefix, the vocabulary from
// token_embd.weight), so the fuzzer can make header and tensors disagree. A file must load and run, or
// end in gguf::FormatError or edgeai::ModelError; anything else stops the run. n_ctx is 4 and one
// thread: the point is the checks, not the compute. Seeds: corpus/model (benchmarks/fuzz.py).
#include <climits>
#include <system_error>
#include <vector>

#include "fuzz_input.hpp"
#include "model.hpp"

using namespace edgeai;

namespace {

// A header integer as the engine's int, or false where Python's int() -> C int would refuse it.
bool header_int(const gguf::File &f, const std::string &key, int64_t fallback, int &out) {
    const int64_t v = f.get_int(key, fallback);
    if (v < INT_MIN || v > INT_MAX) return false;
    out = static_cast<int>(v);
    return true;
}

bool config_of(const gguf::File &f, ModelConfig &c) {
    const std::string a = f.get_string("general.architecture", "");
    const gguf::TensorInfo *embd = f.tensor("token_embd.weight");
    if (!embd || embd->ne.size() != 2 || embd->ne[1] > INT_MAX) return false;
    c.n_vocab = static_cast<int>(embd->ne[1]);
    if (!header_int(f, a + ".embedding_length", 0, c.n_embd) || !header_int(f, a + ".block_count", 0, c.n_layer) ||
        !header_int(f, a + ".attention.head_count", 0, c.n_head) ||
        !header_int(f, a + ".attention.head_count_kv", c.n_head, c.n_head_kv) ||
        !header_int(f, a + ".attention.key_length", c.n_head > 0 ? c.n_embd / c.n_head : 0, c.head_dim) ||
        !header_int(f, a + ".expert_count", 0, c.n_expert) || !header_int(f, a + ".expert_used_count", 0, c.n_expert_used))
        return false;
    c.rms_eps = static_cast<float>(f.get_float(a + ".attention.layer_norm_rms_epsilon", 1e-6));
    c.rope_theta = static_cast<float>(f.get_float(a + ".rope.freq_base", 10000.0));
    // Family facts: edgeai/architectures.py's for the seeds' architectures (llama: adjacent pairs; the Qwen
    // families: halves, Qwen3 q/k norms per head). Any value is valid input to the engine.
    c.rope_neox = a != "llama";
    c.qk_norm = f.tensor("blk.0.attn_q_norm.weight") ? QKNorm::PER_HEAD : QKNorm::NONE;
    c.moe_renormalize = a == "qwen3moe";
    return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const std::string path = fuzz::as_file(data, size);
    try {
        ModelConfig c;
        {
            gguf::File f(path);
            if (!config_of(f, c)) return 0;
        }
        // every key and value type once: f16, q8_0 keys with q4_0 values, and the other way round
        for (KVTypes kv : {KVTypes{}, KVTypes{KVType::Q8_0, KVType::Q4_0}, KVTypes{KVType::Q4_0, KVType::Q8_0}}) {
            try {
                Model m(path, c, 4, 1, "", nullptr, kv);
                m.eval({0, c.n_vocab - 1});
                m.set_sampling(SamplingParams{});
                (void)m.sample();
            } catch (const ModelError &e) {
                fuzz::check_message(e.what());
            }
        }
    } catch (const gguf::FormatError &e) {
        fuzz::check_message(e.what());
    } catch (const ModelError &e) {
        fuzz::check_message(e.what());
    } catch (const std::system_error &) {
    }
    return 0;
}
