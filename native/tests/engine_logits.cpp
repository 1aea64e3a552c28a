// The whole engine without Python, for other targets (run under qemu for AArch64 by
// tests/runtimes/test_kernels_aarch64.py): loads a GGUF with the ModelConfig given as "key value"
// lines (runtimes/native.py engine_config), evaluates the tokens, and writes the logits of every
// position as float32 [n_tokens][n_vocab].
//
//   engine_logits MODEL.gguf CONFIG.txt TOKENS.bin(int32) OUT.bin THREADS KV_TYPE(f16|q8_0|q4_0|K/V)
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
        while (cfg >> key >> v) edgeai::set_config_field(c, key, v);  // n_ctx_train and the like: not the engine's
        std::ifstream tok(argv[3], std::ios::binary);
        std::vector<int32_t> tokens;
        for (int32_t t; tok.read(reinterpret_cast<char *>(&t), 4);) tokens.push_back(t);
        edgeai::Model model(argv[1], c, 256, std::atoi(argv[5]), "", nullptr, edgeai::kv_type_named(argv[6]));
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
