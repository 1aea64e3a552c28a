// A persistent thread pool for per-token work: a decode step issues a few hundred small parallel
// operations, so workers are created once and woken by a generation counter (spinning briefly,
// then sleeping), instead of creating threads per operation.
#pragma once
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace edgeai {

class ThreadPool {
  public:
    explicit ThreadPool(int n_threads);  // n_threads >= 1, the calling thread included
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool &operator=(const ThreadPool &) = delete;

    int size() const { return n_; }
    // Calls fn(i, n) for i in [0, n) with one call per thread (the caller runs i = 0); returns when
    // every call has returned. Not reentrant.
    void run(const std::function<void(int, int)> &fn);
    // fn(begin, end) over a static split of [0, count) into size() ranges.
    void range(size_t count, const std::function<void(size_t, size_t)> &fn);

  private:
    void loop(int index);

    int n_;
    std::vector<std::thread> workers_;
    const std::function<void(int, int)> *job_ = nullptr;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> remaining_{0};
    std::atomic<bool> stop_{false};
    std::mutex mutex_;
    std::condition_variable wake_;
};

}  // namespace edgeai
