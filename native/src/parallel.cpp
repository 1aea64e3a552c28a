#include "parallel.hpp"

#include <algorithm>
#include <thread>
#include <vector>

namespace edgeai {

int default_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(n);
}

void parallel_for(size_t n, int n_threads, size_t grain,
                  const std::function<void(size_t, size_t)> &fn) {
    if (n == 0) return;
    if (n_threads <= 0) n_threads = default_threads();
    grain = std::max<size_t>(grain, 1);
    const size_t max_chunks = (n + grain - 1) / grain;
    const size_t n_chunks = std::min<size_t>(static_cast<size_t>(n_threads), max_chunks);
    if (n_chunks <= 1) {
        fn(0, n);
        return;
    }
    const size_t per = (n + n_chunks - 1) / n_chunks;
    std::vector<std::thread> workers;
    workers.reserve(n_chunks - 1);
    for (size_t c = 1; c < n_chunks; ++c) {
        const size_t begin = c * per, end = std::min(n, begin + per);
        if (begin >= end) break;
        workers.emplace_back(fn, begin, end);
    }
    fn(0, std::min(n, per));
    for (auto &w : workers) w.join();
}

}  // namespace edgeai
