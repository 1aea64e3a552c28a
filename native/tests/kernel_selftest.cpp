// Kernel self-test for targets without a Python (run under qemu for AArch64): reads the cases
// written by tests/runtimes/kernel_cases.py (numpy reference results) and checks every kernel set
// this CPU runs against them (kernel_checks.hpp). Exit status 0 when all pass; one line per
// failure otherwise.
#include <cstdio>
#include <vector>

#include "kernel_checks.hpp"

using namespace edgeai;

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
    std::vector<uint64_t> file;  // 8-byte aligned, as read_case wants
    for (uint64_t word = 0; std::fread(&word, 1, sizeof word, f) > 0; word = 0) file.push_back(word);
    std::fclose(f);
    if (file.empty()) return 2;
    const auto *p = reinterpret_cast<const uint8_t *>(file.data()), *end = p + 8 * file.size();
    const uint32_t count = static_cast<uint32_t>(file[0]);
    p += 8;
    int failures = 0, checks = 0;
    const std::vector<std::string> isas = kern::available();
    for (uint32_t i = 0; i < count; ++i) {
        selftest::Case c;
        p = selftest::read_case(p, c);
        if (p > end) return 2;
        std::vector<uint8_t> scratch(selftest::scratch_bytes(c));
        for (const std::string &isa : isas)
            checks += selftest::check(*kern::named(isa), c, scratch.data(), [&](const selftest::Failure &e) {
                std::printf("FAIL %s %s type=%u n=%u row=%u: %.9g vs %.9g (tolerance %.3g)\n", isa.c_str(),
                            selftest::kernel_name(e.kernel), e.type, e.n, e.row, e.got, e.expected, e.tol);
                ++failures;
            }, [](uint32_t, double) {});
    }
    std::printf("kernel sets:");
    for (const std::string &isa : isas) std::printf(" %s", isa.c_str());
    std::printf("\n%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
