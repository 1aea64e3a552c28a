// A minimal io_uring for reads (Linux >= 5.6), through the raw system calls: no liburing, so the
// wheel has no extra dependency. Elsewhere, or where the kernel or a seccomp policy refuses
// io_uring, open() returns false and callers fall back to pread threads.
#pragma once
#include <cstddef>
#include <cstdint>

namespace edgeai {

class Uring {
  public:
    Uring() = default;
    ~Uring();
    Uring(const Uring &) = delete;
    Uring &operator=(const Uring &) = delete;

    bool open(unsigned entries);  // false (errno set) when io_uring cannot be used here
    unsigned capacity() const { return entries_; }
    // Queues a read of len bytes at off into buf; false when the submission ring is full.
    bool read(int fd, void *buf, unsigned len, uint64_t off, uint64_t tag);
    // Submits what is queued and waits for at least `wait` completions; -errno on failure.
    int submit(unsigned wait);
    // One completion: its tag and result (bytes read, or -errno); false when none is ready.
    bool reap(uint64_t *tag, int *result);

  private:
    int fd_ = -1;
    unsigned entries_ = 0, to_submit_ = 0;
    void *sq_ptr_ = nullptr, *cq_ptr_ = nullptr, *sqes_ = nullptr;
    size_t sq_len_ = 0, cq_len_ = 0, sqes_len_ = 0;
    unsigned *sq_head_ = nullptr, *sq_tail_ = nullptr, *sq_mask_ = nullptr, *sq_array_ = nullptr;
    unsigned *cq_head_ = nullptr, *cq_tail_ = nullptr, *cq_mask_ = nullptr;
    void *cqes_ = nullptr;
};

}  // namespace edgeai
