// Kernel self-test for targets without a Python (run under qemu for AArch64): reads the cases
// written by tests/runtimes/kernel_cases.py (numpy reference results) and checks every kernel set
// this CPU runs against them. Exit status 0 when all pass; one line per failure otherwise.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "gguf.hpp"
#include "kernels.hpp"

using namespace edgeai;

template <class T> static bool read(FILE *f, T *dst, size_t n) { return std::fread(dst, sizeof(T), n, f) == n; }

int main(int argc, char **argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s CASES_FILE\n", argv[0]);
        return 2;
    }
    FILE *f = std::fopen(argv[1], "rb");
    if (!f) {
        std::perror(argv[1]);
        return 2;
    }
    uint32_t count = 0;
    if (!read(f, &count, 1)) return 2;
    int failures = 0, checks = 0;
    const std::vector<std::string> isas = kern::available();
    for (uint32_t c = 0; c < count; ++c) {
        uint32_t hdr[4];
        if (!read(f, hdr, 4)) return 2;
        const uint32_t type = hdr[0], n_rows = hdr[1], n = hdr[2], bytes = hdr[3];
        std::vector<uint8_t> rows(bytes);
        std::vector<float> x(n);
        std::vector<double> expected(n_rows), tol(n_rows);
        if (!read(f, rows.data(), bytes) || !read(f, x.data(), n) || !read(f, expected.data(), n_rows) ||
            !read(f, tol.data(), n_rows))
            return 2;
        const int w = kern::wtype_of_ggml(type);
        const size_t row_bytes = bytes / n_rows;
        for (const std::string &isa : isas) {
            const kern::Ops *ops = kern::named(isa);
            std::vector<kern::BlockQ8A> xq(n / 32 + 1);
            const void *act = x.data();
            if (kern::takes_q8(w)) {
                ops->quantize_act(x.data(), xq.data(), n);
                act = xq.data();
            }
            // the same product by the dot kernel (decode) and by the gemm kernel (prefill), two equal tokens
            std::vector<float> y2(2 * n_rows);
            const size_t stride = 0;  // both tokens read the same activations
            ops->gemm[w]({rows.data(), row_bytes, static_cast<int>(n_rows), static_cast<const uint8_t *>(act), stride, 2,
                          y2.data(), n_rows, n});
            for (uint32_t r = 0; r < n_rows; ++r) {
                const double got[3] = {ops->dot[w](rows.data() + r * row_bytes, act, n), y2[r], y2[n_rows + r]};
                for (int k = 0; k < 3; ++k, ++checks)
                    if (!(std::fabs(got[k] - expected[r]) <= tol[r])) {
                        std::printf("FAIL %s %s type=%u n=%u row=%u: %.9g vs %.9g (tolerance %.3g)\n", isa.c_str(),
                                    k ? "gemm" : "dot", type, n, r, got[k], expected[r], tol[r]);
                        ++failures;
                    }
            }
            // Q8_0 rows are also the q8_0 KV cache: keys . float x, and x . (0 + 1 * row) through the
            // values' axpy, are the same product
            if (w == kern::W_Q8_0)
                for (uint32_t r = 0; r < n_rows; ++r) {
                    std::vector<float> v(n, 0.0f);
                    ops->axpy_q8_0(1.0f, rows.data() + r * row_bytes, v.data(), n);
                    double through_v = 0;
                    for (uint32_t i = 0; i < n; ++i) through_v += double(v[i]) * x[i];
                    const double got[2] = {ops->dot_q8_0_f32(rows.data() + r * row_bytes, x.data(), n), through_v};
                    for (int k = 0; k < 2; ++k, ++checks)
                        if (!(std::fabs(got[k] - expected[r]) <= tol[r])) {
                            std::printf("FAIL %s %s n=%u row=%u: %.9g vs %.9g (tolerance %.3g)\n", isa.c_str(),
                                        k ? "axpy_q8_0" : "dot_q8_0_f32", n, r, got[k], expected[r], tol[r]);
                            ++failures;
                        }
                }
        }
    }
    std::printf("kernel sets:");
    for (const std::string &isa : isas) std::printf(" %s", isa.c_str());
    std::printf("\n%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
