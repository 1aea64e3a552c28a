#include "pool.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EDGEAI_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define EDGEAI_PAUSE() asm volatile("yield")
#else
#define EDGEAI_PAUSE() ((void)0)
#endif

namespace edgeai {

namespace {
// Spins before sleeping: long enough to bridge the gap between the operations of one decode step,
// short enough that an idle model does not keep a core busy.
constexpr int kSpins = 1 << 16;
}  // namespace

namespace {
// Never more threads than the machine has: spinning workers beyond the cores stall the whole machine
// (the Python side caps and warns first; this holds for every other caller).
int bounded(int n_threads) {
    const int cores = static_cast<int>(std::thread::hardware_concurrency());
    return n_threads < 1 ? 1 : (cores > 0 && n_threads > cores ? cores : n_threads);
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_(bounded(n_threads)) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this] { loop(); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (std::thread &t : workers_) t.join();
}

void ThreadPool::work() {
    for (int c; (c = next_.fetch_add(1, std::memory_order_relaxed)) < chunks_;) (*job_)(c, chunks_);
}

// The protocol (all seq_cst): the caller publishes job_/chunks_, opens, works, closes, then waits
// for busy_ == 0. A worker raises busy_ before it looks at open_, so once the caller has seen
// busy_ == 0 after closing, no worker can still read this job.
void ThreadPool::run(const std::function<void(int, int)> &fn, int n_chunks) {
    if (n_chunks <= 0) n_chunks = n_;
    if (n_ == 1 || n_chunks == 1) {
        for (int i = 0; i < n_chunks; ++i) fn(i, n_chunks);
        return;
    }
    job_ = &fn;
    chunks_ = n_chunks;
    next_.store(0);
    open_.store(true);
    {
        std::lock_guard<std::mutex> lock(mutex_);
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    work();
    open_.store(false);
    while (busy_.load() != 0) EDGEAI_PAUSE();
}

void ThreadPool::range(size_t count, const std::function<void(size_t, size_t)> &fn) {
    run([&](int i, int n) {
        const size_t b = count * i / n, e = count * (i + 1) / n;
        if (b < e) fn(b, e);
    });
}

void ThreadPool::loop() {
    uint64_t seen = 0;
    for (;;) {
        uint64_t g = generation_.load(std::memory_order_acquire);
        for (int s = 0; g == seen && s < kSpins; ++s) {
            EDGEAI_PAUSE();
            g = generation_.load(std::memory_order_acquire);
        }
        if (g == seen) {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
            g = generation_.load(std::memory_order_acquire);
        }
        seen = g;
        if (stop_.load()) return;
        busy_.fetch_add(1);
        if (open_.load()) work();
        busy_.fetch_sub(1);
    }
}

}  // namespace edgeai
