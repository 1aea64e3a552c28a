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
    // Calls fn(i, n_chunks) once for each i in [0, n_chunks) (default: one chunk per thread) and
    // returns when all calls have returned. Chunks go to whichever thread asks first, the calling
    // thread included, so a worker the OS has not scheduled yet delays nothing: the caller takes
    // its chunks. Not reentrant.
    void run(const std::function<void(int, int)> &fn, int n_chunks = 0);
    // fn(begin, end) over a static split of [0, count) into size() ranges.
    void range(size_t count, const std::function<void(size_t, size_t)> &fn);

  private:
    void loop();
    void work();  // takes chunks of the open job until none is left

    int n_;
    std::vector<std::thread> workers_;
    const std::function<void(int, int)> *job_ = nullptr;
    int chunks_ = 0;
    std::atomic<int> next_{0};       // next chunk to take
    std::atomic<bool> open_{false};  // job_ may be read (workers check it after raising busy_)
    std::atomic<int> busy_{0};       // workers inside a job
    std::atomic<uint64_t> generation_{0};
    std::atomic<bool> stop_{false};
    std::mutex mutex_;
    std::condition_variable wake_;
};

}  // namespace edgeai
