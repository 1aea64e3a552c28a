#include "expert_store.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace edgeai {

namespace {

// Direct reads need the file offset, length and buffer aligned to the device's logical block;
// 4 KiB covers every disk in use (512 B and 4 KiB sectors).
constexpr uint64_t kAlign = 4096;

uint64_t align_down(uint64_t v) { return v & ~(kAlign - 1); }
uint64_t align_up(uint64_t v) { return (v + kAlign - 1) & ~(kAlign - 1); }

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

ExpertWeights MmapExpertStore::acquire(int layer, int expert) {
    const ExpertLayer &l = layers_[layer];
    Matrix m[3];
    for (int p = 0; p < 3; ++p) {
        m[p] = l.stacked[p];
        m[p].data += static_cast<size_t>(expert) * l.slice_bytes(p);
    }
    return {m[0], m[1], m[2]};
}

// A range's region in a slot: its bytes rounded up, plus one block because it may start anywhere
// in a block.
static size_t region_bytes(size_t bytes) { return align_up(bytes) + kAlign; }

size_t stream_slot_bytes(const std::vector<std::vector<size_t>> &unit_range_bytes) {
    size_t widest = 0;
    for (const auto &unit : unit_range_bytes) {
        size_t total = 0;
        for (size_t b : unit) total += region_bytes(b);
        widest = std::max(widest, total);
    }
    return widest;
}

std::vector<Unit> StreamingExpertStore::units(const std::vector<ExpertLayer> &layers, int n_expert) {
    std::vector<Unit> out;
    for (size_t l = 0; l < layers.size(); ++l)
        for (int e = 0; e < n_expert; ++e) {
            Unit u;
            u.layer = static_cast<int>(l);
            u.name = "expert " + std::to_string(e) + " of layer " + std::to_string(l);
            for (int p = 0; p < 3; ++p)
                u.ranges.push_back({layers[l].file_offset[p] + static_cast<uint64_t>(e) * layers[l].slice_bytes(p),
                                    layers[l].slice_bytes(p)});
            out.push_back(std::move(u));
        }
    return out;
}

StreamingExpertStore::StreamingExpertStore(const std::string &path, std::vector<ExpertLayer> layers, int n_expert,
                                           const StreamConfig &cfg)
    : layers_(std::move(layers)), n_expert_(n_expert),
      store_(path, units(layers_, n_expert), static_cast<int>(layers_.size()), cfg) {}

void StreamingExpertStore::request(int layer, const std::vector<int> &experts) {
    keys_.clear();
    for (int e : experts) keys_.push_back(layer * n_expert_ + e);
    store_.request(layer, keys_);
}

void StreamingExpertStore::prefetch(int layer, const std::vector<int> &experts) {
    keys_.clear();
    for (int e : experts) keys_.push_back(layer * n_expert_ + e);
    store_.prefetch(keys_);
}

ExpertWeights StreamingExpertStore::acquire(int layer, int expert) {
    const std::vector<const uint8_t *> at = store_.acquire(layer * n_expert_ + expert);
    Matrix m[3];
    for (int p = 0; p < 3; ++p) {
        m[p] = layers_[layer].stacked[p];
        m[p].data = at[p];
    }
    return {m[0], m[1], m[2]};
}

StreamingStore::StreamingStore(const std::string &path, std::vector<Unit> units, int n_layers, const StreamConfig &cfg)
    : path_(path), units_(std::move(units)), n_layers_(n_layers), cfg_(cfg) {
    if (cfg_.slots < 2)
        throw ModelError("a streaming cache needs at least 2 slots (one unit computed while the next is read); got " +
                         std::to_string(cfg_.slots));
    cfg_.io_threads = std::max(1, cfg_.io_threads);
#ifdef O_DIRECT
    if (cfg_.direct) {
        fd_ = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
        direct_ = fd_ >= 0;
    }
#endif
    if (fd_ < 0) fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);  // no O_DIRECT (tmpfs, macOS)
    if (fd_ < 0) throw ModelError(path + ": cannot open for expert reads: " + std::strerror(errno));
#ifdef F_NOCACHE
    if (cfg_.direct && !direct_) direct_ = ::fcntl(fd_, F_NOCACHE, 1) == 0;  // macOS: uncached reads
#endif
    size_t max_ranges = 0;
    for (const Unit &u : units_) {
        std::vector<size_t> at;
        size_t offset = 0;
        for (const Range &r : u.ranges) {
            at.push_back(offset);
            offset += region_bytes(r.bytes);
        }
        slot_bytes_ = std::max(slot_bytes_, offset);
        max_ranges = std::max(max_ranges, u.ranges.size());
        region_.push_back(std::move(at));
    }
    void *arena = nullptr;
    if (posix_memalign(&arena, kAlign, slot_bytes_ * cfg_.slots) != 0) {
        ::close(fd_);
        throw ModelError("cannot allocate the expert cache (" + std::to_string(cfg_.slots) + " slots of " +
                         std::to_string(slot_bytes_) + " bytes)");
    }
    arena_ = static_cast<uint8_t *>(arena);
    slots_.resize(cfg_.slots);
    for (int i = 0; i < cfg_.slots; ++i) slots_[i].buf = arena_ + slot_bytes_ * i;
    where_.assign(units_.size(), -1);
    layer_units_.resize(n_layers_);
    for (size_t k = 0; k < units_.size(); ++k) layer_units_[units_[k].layer].push_back(static_cast<int>(k));
    use_rate_.resize(units_.size());
    for (size_t k = 0; k < units_.size(); ++k) use_rate_[k] = 1.0 / layer_units_[units_[k].layer].size();
    used_now_.assign(units_.size(), 0);
    faults_left_ = cfg_.inject_read_faults;
    if (cfg_.io != ReadMethod::PREAD) {
        uring_ = std::make_unique<Uring>();
        if (!uring_->open(static_cast<unsigned>(std::max<size_t>(3 * cfg_.io_threads, max_ranges)))) {
            const std::string why = std::strerror(errno);
            uring_.reset();
            if (cfg_.io == ReadMethod::URING) {
                ::close(fd_);
                std::free(arena_);
                throw ModelError("io_uring is not available here (" + why + "); use io='pread' or 'auto'");
            }
        }
    }
    reset_stats();
    if (uring_) readers_.emplace_back([this] { uring_reader(); });
    else for (int i = 0; i < cfg_.io_threads; ++i) readers_.emplace_back([this] { reader(); });
}

StreamingStore::~StreamingStore() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_ = true;
        queue_.clear();
        n_demand_ = 0;
    }
    work_.notify_all();
    for (std::thread &t : readers_) t.join();  // a read in flight finishes first: no thread outlives the store
    ::close(fd_);
    std::free(arena_);
}

// Replacement: the slot with the lowest keep-value among those that are neither pinned, loading,
// nor wanted by the layer being computed.
//  lru:   the least recently used.
//  lfu:   the lowest use count, decayed with a half-life of 16 tokens (16 visits of every layer),
//         so experts that were hot long ago age out.
//  layer: decode visits layers in a cycle, so an expert of the layer just computed is needed again
//         only after every other layer: evict the expert whose layer comes back last, and among
//         those the least (decayed) frequently used. LRU does the opposite under a cyclic scan.
//  next-use: Belady's rule with the future estimated: a unit used at a fraction p of its layer's
//         visits (moving average) is next needed, in layer steps, after d + L (1 - p) / p, d being
//         the layers computed before its own comes back; evict the farthest. It weighs frequency
//         (hot experts stay even in the layer just computed) against the cyclic order.
int StreamingStore::victim(bool for_prefetch) {
    const int L = n_layers_;
    int best = -1;
    double best_keep = 0;
    for (int i = 0; i < static_cast<int>(slots_.size()); ++i) {
        const Slot &s = slots_[i];
        if (s.state == State::EMPTY || s.state == State::FAILED) return i;
        if (s.pins || s.wanted || s.state == State::LOADING) continue;
        const double freq = s.freq * std::exp2(-static_cast<double>(visits_ - s.last_visit) / half_life());
        double keep;
        if (cfg_.policy == CachePolicy::LRU) {
            keep = static_cast<double>(s.last_use);
        } else if (cfg_.policy == CachePolicy::LFU) {
            keep = freq;
        } else if (cfg_.policy == CachePolicy::NEXT_USE) {
            const int distance = (units_[s.key].layer - current_layer_ + L - 1) % L;
            const double p = std::max(use_rate_[s.key], 1e-3);
            const double next_use = distance + L * (1.0 - p) / p;
            // a guess must not push out what will probably be needed within the next token
            if (for_prefetch && next_use < L) continue;
            keep = -next_use;
        } else {  // CachePolicy::LAYER
            // layers computed before it is needed again: 0 for the next layer, L-1 for the current one
            const int distance = (units_[s.key].layer - current_layer_ + L - 1) % L;
            keep = -distance * 1e9 + freq;
        }
        if (best < 0 || keep < best_keep) best = i, best_keep = keep;
    }
    return best;
}

void StreamingStore::touch(Slot &s) {
    s.freq = s.freq * std::exp2(-static_cast<double>(visits_ - s.last_visit) / half_life()) + 1.0;
    s.last_visit = visits_;
    s.last_use = ++clock_;
}

int StreamingStore::load(int key, bool demand) {
    const int i = victim(!demand);
    if (i < 0) return -1;
    Slot &s = slots_[i];
    if (s.key >= 0) where_[s.key] = -1;
    s = Slot{key, State::LOADING, 0, false, !demand, demand, clock_, visits_, 0.0, s.buf, {}};
    where_[key] = i;
    if (demand) queue_.insert(queue_.begin() + n_demand_++, {i, key});  // behind earlier demands: acquire order
    else queue_.emplace_back(i, key);
    int used = 0;
    for (const Slot &x : slots_) used += x.state != State::EMPTY;
    stats_.peak_slots_used = std::max(stats_.peak_slots_used, used);
    work_.notify_one();
    return i;
}

void StreamingStore::count_access(int key, int slot) {
    const int layer = units_[key].layer;
    if (slot >= 0 && slots_[slot].state != State::FAILED) {
        ++stats_.hits;
        ++stats_.layer_hits[layer];
        if (slots_[slot].prefetched) {
            ++stats_.prefetch_used;
            slots_[slot].prefetched = false;
        }
    } else {
        ++stats_.misses;
        ++stats_.layer_misses[layer];
    }
    if (cfg_.trace) trace_.push_back(key);
}

void StreamingStore::request(int layer, const std::vector<int> &keys) {
    std::lock_guard<std::mutex> lock(mu_);
    current_layer_ = layer;
    ++visits_;
    for (Slot &s : slots_) s.wanted = false;  // a previous layer that failed midway leaves none behind
    announced_.clear();
    // how often each unit of this layer is used per visit (for next-use); a 1/8 moving average
    for (int key : keys) used_now_[key] = 1;
    for (int key : layer_units_[layer]) {
        use_rate_[key] += 0.125 * (used_now_[key] - use_rate_[key]);
        used_now_[key] = 0;
    }
    for (int key : keys) {
        int i = find(key);
        count_access(key, i);
        announced_.push_back(key);
        if (i >= 0 && slots_[i].state == State::FAILED) i = -1;
        if (i < 0) i = load(key, true);
        if (i < 0) continue;  // the cache is full of wanted experts: read when acquired
        slots_[i].wanted = true;
        touch(slots_[i]);
        if (slots_[i].state == State::LOADING && !slots_[i].demand) {  // a queued prefetch is now needed first
            auto it = std::find(queue_.begin() + n_demand_, queue_.end(), std::make_pair(i, key));
            if (it != queue_.end()) {
                queue_.erase(it);
                queue_.insert(queue_.begin() + n_demand_++, {i, key});
            }
            slots_[i].demand = true;
        }
    }
}

void StreamingStore::prefetch(const std::vector<int> &keys) {
    std::lock_guard<std::mutex> lock(mu_);
    for (int key : keys) {
        if (find(key) >= 0) continue;
        if (load(key, false) < 0) break;
        ++stats_.prefetch_issued;
    }
}

std::vector<const uint8_t *> StreamingStore::acquire(int key) {
    std::unique_lock<std::mutex> lock(mu_);
    int i = find(key);
    const auto announced = std::find(announced_.begin(), announced_.end(), key);
    if (announced != announced_.end()) {
        announced_.erase(announced);
    } else {  // not announced by request(): count it here
        count_access(key, i);
        if (i >= 0 && slots_[i].state != State::FAILED) touch(slots_[i]);
    }
    const double t0 = now();
    for (;;) {
        if (i >= 0 && slots_[i].state == State::READY) break;
        if (i >= 0 && slots_[i].state == State::FAILED) {
            const std::string error = slots_[i].error;
            slots_[i] = Slot{-1, State::EMPTY, 0, false, false, false, 0, 0, 0.0, slots_[i].buf, {}};
            where_[key] = -1;
            throw ModelError(error);
        }
        if (i < 0) {
            i = load(key, true);
            if (i >= 0) touch(slots_[i]);
        }
        if (i < 0 || slots_[i].state == State::LOADING) ready_.wait(lock);
        i = find(key);
    }
    stats_.stall_seconds += now() - t0;
    Slot &s = slots_[i];
    ++s.pins;
    s.prefetched = false;
    std::vector<const uint8_t *> at;
    for (size_t r = 0; r < units_[key].ranges.size(); ++r)
        at.push_back(s.buf + region_[key][r] + (units_[key].ranges[r].offset - align_down(units_[key].ranges[r].offset)));
    return at;
}

void StreamingStore::release(int key) {
    {
        std::lock_guard<std::mutex> lock(mu_);
        const int i = find(key);
        if (i < 0 || slots_[i].pins == 0) return;
        --slots_[i].pins;
        slots_[i].wanted = false;
    }
    ready_.notify_all();  // a slot may have become evictable
}

// Reads [offset, offset+len) into dst (aligned), retrying after errors; returns the bytes read.
// Fewer than `need` bytes after the retries (the file ended: truncated while running) is an error.
size_t StreamingStore::pread_full(uint64_t offset, uint8_t *dst, size_t len, size_t need) {
    std::string why;
    for (int attempt = 0; attempt <= cfg_.retries; ++attempt) {
        if (attempt) {
            std::lock_guard<std::mutex> lock(mu_);
            ++stats_.read_retries;
        }
        if (attempt) std::this_thread::sleep_for(std::chrono::milliseconds(1 << std::min(attempt, 8)));
        size_t got = 0;
        bool injected = false;
        {
            std::lock_guard<std::mutex> lock(mu_);
            if (faults_left_ > 0) --faults_left_, injected = true;
        }
        if (injected) {
            why = std::string("injected fault: ") + std::strerror(EIO);
            continue;
        }
        while (got < len) {
            const ssize_t r = ::pread(fd_, dst + got, len - got, static_cast<off_t>(offset + got));
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) {
                why = std::strerror(errno);
                break;
            }
            if (r == 0) break;  // end of file
            got += static_cast<size_t>(r);
            if (direct_ && got % kAlign) break;  // a short direct read ends at end of file
        }
        if (got >= need) return got;
        if (why.empty()) why = "the file ends at byte " + std::to_string(offset + got) + " (truncated while running?)";
    }
    throw ModelError(why);
}

std::string StreamingStore::read_error(int key, int range, const std::string &why) const {
    const Range &r = units_[key].ranges[range];
    return path_ + ": reading " + units_[key].name + " (bytes " + std::to_string(r.offset) + ".." +
           std::to_string(r.offset + r.bytes) + ") failed after " + std::to_string(cfg_.retries + 1) + " attempts: " + why;
}

void StreamingStore::read_slot(int slot, int key) {
    const Unit &u = units_[key];
    for (size_t p = 0; p < u.ranges.size(); ++p) {
        const Range &r = u.ranges[p];
        const uint64_t from = align_down(r.offset), to = align_up(r.offset + r.bytes);
        try {
            const size_t got = pread_full(from, slots_[slot].buf + region_[key][p], to - from, r.offset + r.bytes - from);
            std::lock_guard<std::mutex> lock(mu_);
            stats_.bytes_read += got;
            ++stats_.reads;
        } catch (const ModelError &err) {
            throw ModelError(read_error(key, static_cast<int>(p), err.what()));
        }
#if defined(POSIX_FADV_DONTNEED)
        if (!direct_) ::posix_fadvise(fd_, static_cast<off_t>(from), static_cast<off_t>(to - from), POSIX_FADV_DONTNEED);
#endif
    }
}

void StreamingStore::reader() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
        work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (stop_) return;
        const auto [slot, key] = pop_job();
        lock.unlock();
        read_and_finish(slot, key);
        lock.lock();
    }
}

std::pair<int, int> StreamingStore::pop_job() {
    const std::pair<int, int> job = queue_.front();
    queue_.pop_front();
    if (n_demand_) --n_demand_;
    return job;
}

void StreamingStore::read_and_finish(int slot, int key) {
    const double t0 = now();
    std::string error;
    try {
        read_slot(slot, key);
    } catch (const ModelError &err) {
        error = err.what();
    }
    std::lock_guard<std::mutex> lock(mu_);
    stats_.read_seconds += now() - t0;
    finish(slot, error);
}

void StreamingStore::finish(int slot, const std::string &error) {
    Slot &s = slots_[slot];
    if (error.empty()) {
        s.state = State::READY;
    } else {
        ++stats_.read_failures;
        s.state = State::FAILED;
        s.error = error;
    }
    ready_.notify_all();
}

// One thread keeps up to capacity() reads in flight through io_uring: each queued slot becomes
// three reads (gate, up, down). A read that fails or comes back short is redone with pread,
// which retries and reports (the same path as without io_uring); so are reads while faults are
// injected. On stop, reads in flight are waited for: the kernel writes into the slot buffers.
void StreamingStore::uring_reader() {
    struct Part {
        int slot, key, proj;
        uint64_t from;
        size_t len, need;
    };
    struct Job {
        int remaining;
        double t0;
        std::string error;
    };
    std::vector<Part> parts(uring_->capacity());
    std::vector<uint64_t> free_tags;
    for (uint64_t t = 0; t < parts.size(); ++t) free_tags.push_back(t);
    std::vector<Job> jobs(slots_.size());
    unsigned inflight = 0;
    std::vector<std::pair<int, int>> by_pread;
    std::vector<int> done;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
        if (inflight == 0) work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (stop_ && inflight == 0) return;
        by_pread.clear();
        while (!stop_ && !queue_.empty() && free_tags.size() >= units_[queue_.front().second].ranges.size()) {
            const auto [slot, key] = pop_job();
            if (faults_left_ > 0) {
                by_pread.emplace_back(slot, key);
                continue;
            }
            const Unit &u = units_[key];
            jobs[slot] = Job{static_cast<int>(u.ranges.size()), now(), {}};
            for (size_t p = 0; p < u.ranges.size(); ++p) {
                const Range &r = u.ranges[p];
                const uint64_t from = align_down(r.offset), to = align_up(r.offset + r.bytes);
                const uint64_t tag = free_tags.back();
                free_tags.pop_back();
                parts[tag] = Part{slot, key, static_cast<int>(p), from, size_t(to - from), size_t(r.offset + r.bytes - from)};
                uring_->read(fd_, slots_[slot].buf + region_[key][p], static_cast<unsigned>(to - from), from, tag);
                ++inflight;
            }
        }
        lock.unlock();
        for (const auto &[slot, key] : by_pread) read_and_finish(slot, key);  // injected faults are counted there
        done.clear();
        if (inflight) {
            int r;
            while ((r = uring_->submit(1)) == -EAGAIN || r == -EBUSY) std::this_thread::sleep_for(std::chrono::microseconds(200));
            uint64_t tag;
            int res;
            uint64_t bytes = 0;
            while (uring_->reap(&tag, &res)) {
                const Part pt = parts[tag];
                free_tags.push_back(tag);
                --inflight;
                Job &job = jobs[pt.slot];
                if (res >= 0 && static_cast<size_t>(res) >= pt.need) {
                    bytes += static_cast<uint64_t>(res);
                } else {  // failed or short: pread retries it and names what went wrong
                    try {
                        bytes += pread_full(pt.from, slots_[pt.slot].buf + region_[pt.key][pt.proj], pt.len, pt.need);
                    } catch (const ModelError &err) {
                        job.error = read_error(pt.key, pt.proj, err.what());
                    }
                }
                if (--job.remaining == 0) done.push_back(pt.slot);
            }
            lock.lock();
            stats_.bytes_read += bytes;
            for (int slot : done) {
                stats_.reads += units_[slots_[slot].key].ranges.size();
                stats_.read_seconds += now() - jobs[slot].t0;
                finish(slot, jobs[slot].error);
            }
        } else {
            lock.lock();
        }
    }
}

ExpertStoreStats StreamingStore::stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
}

void StreamingStore::reset_stats() {
    std::lock_guard<std::mutex> lock(mu_);
    const int peak = stats_.peak_slots_used;
    stats_ = ExpertStoreStats{};
    stats_.streaming = true;
    stats_.direct = direct_;
    stats_.policy = cfg_.policy;
    stats_.io = uring_ ? "io_uring" : "pread";
    stats_.slots = cfg_.slots;
    stats_.peak_slots_used = peak;
    stats_.layer_hits.assign(n_layers_, 0);
    stats_.layer_misses.assign(n_layers_, 0);
    trace_.clear();
}

std::vector<int32_t> StreamingStore::trace() const {
    std::lock_guard<std::mutex> lock(mu_);
    return trace_;
}

}  // namespace edgeai
