// The whole engine without Python, for other targets (run under qemu for AArch64 by
// tests/runtimes/test_kernels_aarch64.py): loads a GGUF with the ModelConfig given as "key value"
// lines (runtimes/native.py engine_config), evaluates the tokens, and writes the logits of every
// position as float32 [n_tokens][n_vocab].
//
//   engine_logits MODEL.gguf CONFIG.txt TOKENS.bin(int32) OUT.bin THREADS KV_TYPE(f16|q8_0)
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <string>
#include <vector>

#include "model.hpp"

int main(int argc, char **argv) {
    if (argc != 7) {
        std::fprintf(stderr, "usage: %s MODEL CONFIG TOKENS OUT THREADS KV_TYPE\n", argv[0]);
        return 2;
    }
    try {
        edgeai::ModelConfig c;
        std::ifstream cfg(argv[2]);
        std::string key;
        double v;
        while (cfg >> key >> v) {
            if (key == "n_vocab") c.n_vocab = int(v);
            else if (key == "n_embd") c.n_embd = int(v);
            else if (key == "n_layer") c.n_layer = int(v);
            else if (key == "n_head") c.n_head = int(v);
            else if (key == "n_head_kv") c.n_head_kv = int(v);
            else if (key == "head_dim") c.head_dim = int(v);
            else if (key == "n_expert") c.n_expert = int(v);
            else if (key == "n_expert_used") c.n_expert_used = int(v);
            else if (key == "rms_eps") c.rms_eps = float(v);
            else if (key == "rope_theta") c.rope_theta = float(v);
            else if (key == "rope_linear_factor") c.rope_linear_factor = float(v);
            else if (key == "rope_neox") c.rope_neox = v != 0;
            else if (key == "qk_norm") c.qk_norm = static_cast<edgeai::QKNorm>(int(v));
            else if (key == "moe_renormalize") c.moe_renormalize = v != 0;
        }
        std::ifstream tok(argv[3], std::ios::binary);
        std::vector<int32_t> tokens;
        for (int32_t t; tok.read(reinterpret_cast<char *>(&t), 4);) tokens.push_back(t);
        const std::string kv = argv[6];
        edgeai::Model model(argv[1], c, 256, std::atoi(argv[5]), "", nullptr,
                            kv == "q8_0" ? edgeai::KVType::Q8_0 : edgeai::KVType::F16);
        std::vector<float> logits;
        model.eval(tokens, &logits);
        std::ofstream out(argv[4], std::ios::binary);
        out.write(reinterpret_cast<const char *>(logits.data()), std::streamsize(4 * logits.size()));
        std::printf("kernel set %s, %zu tokens, %d threads\n", model.isa(), tokens.size(), model.threads());
        return out ? 0 : 1;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
