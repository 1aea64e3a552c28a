// Split a range of independent work items over threads.
// This is the converter's batch parallelism (a few large calls per tensor); the decode loop will
// get a persistent pool of its own, since creating threads per token costs more than the work.
#pragma once
#include <cstddef>
#include <functional>

namespace edgeai {

// Number of threads to use when the caller passes 0: the hardware concurrency, at least 1.
int default_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n), using up to n_threads threads
// (the calling thread included). Chunks are at least `grain` items long.
void parallel_for(size_t n, int n_threads, size_t grain,
                  const std::function<void(size_t, size_t)> &fn);

}  // namespace edgeai
