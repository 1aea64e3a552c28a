// Fuzz target: the GGUF reader (src/gguf.cpp) on arbitrary bytes. A bad file must end in
// gguf::FormatError (valid UTF-8 message) or std::system_error; a file it accepts must describe
// tensors that lie inside it with sizes that match their shapes. Anything else (a crash, a sanitizer
// report, another exception, a broken invariant) stops the run. Seeds: corpus/gguf (benchmarks/fuzz.py).
#include <cstdlib>
#include <system_error>

#include "fuzz_input.hpp"
#include "gguf.hpp"

using namespace edgeai;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const std::string path = fuzz::as_file(data, size);
    try {
        gguf::File f(path);
        for (const auto &[key, value] : f.metadata()) {
            // the typed getters either convert or throw FormatError naming the key
            try { (void)f.get_int(key, 0); } catch (const gguf::FormatError &e) { fuzz::check_message(e.what()); }
            try { (void)f.get_float(key, 0); } catch (const gguf::FormatError &e) { fuzz::check_message(e.what()); }
            try { (void)f.get_string(key, ""); } catch (const gguf::FormatError &e) { fuzz::check_message(e.what()); }
        }
        unsigned sum = 0;
        for (const gguf::TensorInfo &t : f.tensors()) {
            const gguf::TypeInfo *ti = gguf::type_info(t.type);
            // in 128 bits: a count that wraps around in 64 must not pass for a small one
            unsigned __int128 n = 1;
            for (uint64_t d : t.ne) n *= d;
            // invariants callers rely on: a known type, whole blocks, nbytes exact and inside the file
            if (!ti || t.ne.empty() || t.ne[0] % ti->block_size || t.nbytes != n / ti->block_size * ti->type_size ||
                t.offset > f.size() || t.nbytes > f.size() - t.offset ||
                static_cast<unsigned __int128>(t.row_bytes()) * t.n_rows() != t.nbytes ||
                f.tensor(t.name) != &t)
                std::fprintf(stderr, "tensor '%s' breaks the reader's invariants\n", gguf::valid_utf8(t.name).c_str()), std::abort();
            if (t.nbytes) sum += f.data(t)[0] + f.data(t)[t.nbytes - 1];  // the first and last byte are readable
        }
        volatile unsigned keep = sum;
        (void)keep;
    } catch (const gguf::FormatError &e) {
        fuzz::check_message(e.what());
    } catch (const std::system_error &) {
        // the input could not be mapped (an empty file): not the parser's to judge
    }
    return 0;
}
