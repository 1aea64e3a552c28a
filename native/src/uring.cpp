#include "uring.hpp"

#include <cerrno>

#if defined(__linux__) && __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#define EDGEAI_HAVE_URING 1
#endif

namespace edgeai {

#ifdef EDGEAI_HAVE_URING

namespace {
// The ring indices are shared with the kernel: loads of what it writes acquire, stores of what
// it reads release.
unsigned load_acquire(const unsigned *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
void store_release(unsigned *p, unsigned v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
}  // namespace

bool Uring::open(unsigned entries) {
    io_uring_params p;
    std::memset(&p, 0, sizeof p);
    const long fd = ::syscall(__NR_io_uring_setup, entries, &p);
    if (fd < 0) return false;
    fd_ = static_cast<int>(fd);
    entries_ = p.sq_entries;
    sq_len_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    cq_len_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) sq_len_ = cq_len_ = sq_len_ > cq_len_ ? sq_len_ : cq_len_;
    sq_ptr_ = ::mmap(nullptr, sq_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, IORING_OFF_SQ_RING);
    if (sq_ptr_ == MAP_FAILED) return sq_ptr_ = nullptr, false;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        cq_ptr_ = sq_ptr_;
    } else {
        cq_ptr_ = ::mmap(nullptr, cq_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, IORING_OFF_CQ_RING);
        if (cq_ptr_ == MAP_FAILED) return cq_ptr_ = nullptr, false;
    }
    sqes_len_ = p.sq_entries * sizeof(io_uring_sqe);
    sqes_ = ::mmap(nullptr, sqes_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, IORING_OFF_SQES);
    if (sqes_ == MAP_FAILED) return sqes_ = nullptr, false;
    auto *sq = static_cast<char *>(sq_ptr_);
    auto *cq = static_cast<char *>(cq_ptr_);
    sq_head_ = reinterpret_cast<unsigned *>(sq + p.sq_off.head);
    sq_tail_ = reinterpret_cast<unsigned *>(sq + p.sq_off.tail);
    sq_mask_ = reinterpret_cast<unsigned *>(sq + p.sq_off.ring_mask);
    sq_array_ = reinterpret_cast<unsigned *>(sq + p.sq_off.array);
    cq_head_ = reinterpret_cast<unsigned *>(cq + p.cq_off.head);
    cq_tail_ = reinterpret_cast<unsigned *>(cq + p.cq_off.tail);
    cq_mask_ = reinterpret_cast<unsigned *>(cq + p.cq_off.ring_mask);
    cqes_ = cq + p.cq_off.cqes;
    return true;
}

Uring::~Uring() {
    if (sqes_) ::munmap(sqes_, sqes_len_);
    if (cq_ptr_ && cq_ptr_ != sq_ptr_) ::munmap(cq_ptr_, cq_len_);
    if (sq_ptr_) ::munmap(sq_ptr_, sq_len_);
    if (fd_ >= 0) ::close(fd_);
}

bool Uring::read(int fd, void *buf, unsigned len, uint64_t off, uint64_t tag) {
    const unsigned tail = *sq_tail_;  // only this thread writes the tail
    if (tail - load_acquire(sq_head_) >= entries_) return false;
    const unsigned index = tail & *sq_mask_;
    io_uring_sqe *sqe = static_cast<io_uring_sqe *>(sqes_) + index;
    std::memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_READ;
    sqe->fd = fd;
    sqe->addr = reinterpret_cast<uint64_t>(buf);
    sqe->len = len;
    sqe->off = off;
    sqe->user_data = tag;
    sq_array_[index] = index;
    store_release(sq_tail_, tail + 1);
    ++to_submit_;
    return true;
}

int Uring::submit(unsigned wait) {
    for (;;) {
        const long r = ::syscall(__NR_io_uring_enter, fd_, to_submit_, wait, wait ? IORING_ENTER_GETEVENTS : 0u, nullptr, 0);
        if (r >= 0) {
            to_submit_ -= static_cast<unsigned>(r) < to_submit_ ? static_cast<unsigned>(r) : to_submit_;
            return static_cast<int>(r);
        }
        if (errno != EINTR) return -errno;
    }
}

bool Uring::reap(uint64_t *tag, int *result) {
    const unsigned head = *cq_head_;
    if (head == load_acquire(cq_tail_)) return false;
    const io_uring_cqe *cqe = static_cast<const io_uring_cqe *>(cqes_) + (head & *cq_mask_);
    *tag = cqe->user_data;
    *result = cqe->res;
    store_release(cq_head_, head + 1);
    return true;
}

#else  // no io_uring on this system: callers use pread threads

bool Uring::open(unsigned) {
    errno = ENOSYS;
    return false;
}
Uring::~Uring() = default;
bool Uring::read(int, void *, unsigned, uint64_t, uint64_t) { return false; }
int Uring::submit(unsigned) { return -ENOSYS; }
bool Uring::reap(uint64_t *, int *) { return false; }

#endif

}  // namespace edgeai
