// Where MoE expert weights come from.
//
// The forward pass reaches experts only through ExpertStore: it says which experts a layer needs
// (request), which the next layer will probably need (prefetch), then acquires and releases them
// one at a time. Two stores implement it:
//  - MmapExpertStore: the experts in place in the memory map (the whole file is resident or paged
//    by the kernel, as llama.cpp does);
//  - StreamingExpertStore: a fixed number of expert slots in memory, filled by direct reads
//    (O_DIRECT, or F_NOCACHE on macOS, so the page cache keeps no second copy) from the stacked
//    expert tensors of the GGUF by a pool of reader threads. Slot count comes from the planner
//    (runtimes/plan.py); the replacement policy is an option.
#pragma once
#include <array>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "uring.hpp"

namespace edgeai {

class ModelError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

// A weight matrix in place: rows of `cols` weights, each `row_bytes` long, of kernel type wtype.
struct Matrix {
    const uint8_t *data = nullptr;
    int wtype = -1;
    int64_t rows = 0, cols = 0;
    size_t row_bytes = 0;
    const uint8_t *packed = nullptr;  // the kernel set's load-time layout of whole 8-row groups, if any
    const uint8_t *row(int64_t r) const { return data + static_cast<size_t>(r) * row_bytes; }
    explicit operator bool() const { return data != nullptr; }
};

// How a streaming store picks the slot to refill (see StreamingStore::victim). The Python side
// (edgeai.runtimes.expert_store) names each value for users and binds the same member names.
enum class CachePolicy { NEXT_USE, LRU, LFU, LAYER };

// How a streaming store reads: io_uring where the kernel allows it else pread (AUTO), or one of them.
enum class ReadMethod { AUTO, URING, PREAD };

// One expert's three projections.
struct ExpertWeights {
    Matrix gate, up, down;
};

// One layer's stacked expert tensors [n_expert][rows][cols]: gate, up, down.
struct ExpertLayer {
    Matrix stacked[3];            // data: in the memory map (row count: one expert's)
    uint64_t file_offset[3] = {};  // absolute file offset of expert 0's slice
    size_t slice_bytes(int p) const { return static_cast<size_t>(stacked[p].rows) * stacked[p].row_bytes; }
};

struct ExpertStoreStats {
    bool streaming = false, direct = false;
    CachePolicy policy = CachePolicy::NEXT_USE;    // meaningful when streaming
    std::string io;                                // the reads issued: "io_uring" or "pread" (a report, not an option)
    int slots = 0, peak_slots_used = 0;            // slots holding or loading an expert, at most `slots`
    uint64_t hits = 0, misses = 0;                 // demand accesses: resident (or being prefetched) or not
    uint64_t bytes_read = 0, reads = 0;            // reads issued to the file (alignment included)
    uint64_t read_retries = 0, read_failures = 0;
    double read_seconds = 0, stall_seconds = 0;    // summed over readers; forward pass waiting on reads
    uint64_t prefetch_issued = 0, prefetch_used = 0;  // expert loads the prefetcher issued / that a demand then used
    std::vector<uint64_t> layer_hits, layer_misses;
};

class ExpertStore {
  public:
    virtual ~ExpertStore() = default;
    // The experts `layer` needs now, in the order they will be acquired.
    virtual void request(int, const std::vector<int> &) {}
    // Experts `layer` will probably need soon (speculative; never displaces a requested expert).
    virtual void prefetch(int, const std::vector<int> &) {}
    // Blocks until the expert is in memory; valid until release(). Throws ModelError when reads fail.
    virtual ExpertWeights acquire(int layer, int expert) = 0;
    virtual void release(int layer, int expert) = 0;
    virtual bool streams() const { return false; }
    virtual size_t slot_bytes() const { return 0; }  // memory one cached expert takes (streaming)
    virtual ExpertStoreStats stats() const { return {}; }
    virtual void reset_stats() {}
    // Demand accesses as layer * n_expert + expert, in order (when tracing is on): for replays.
    virtual std::vector<int32_t> trace() const { return {}; }
};

class MmapExpertStore : public ExpertStore {
  public:
    explicit MmapExpertStore(std::vector<ExpertLayer> layers) : layers_(std::move(layers)) {}
    ExpertWeights acquire(int layer, int expert) override;
    void release(int, int) override {}

  private:
    std::vector<ExpertLayer> layers_;
};

struct StreamConfig {
    int slots = 0;                 // experts held in memory at once
    int layer_slots = 0;           // dense layers held at once when they are streamed too (0: resident)
    CachePolicy policy = CachePolicy::NEXT_USE;  // see expert_store.cpp; chosen by benchmarks/expert_streaming.py
    int io_threads = 4;            // reads in flight (pread threads; io_uring: 3x this many reads)
    ReadMethod io = ReadMethod::AUTO;
    bool direct = true;            // bypass the page cache (falls back when the file system refuses)
    bool trace = false;            // record demand accesses (replays, benchmarks)
    bool prefetch = true;          // predict the next layer's experts and read them ahead (off: demand reads only)
    // read ahead only this many of the likeliest experts (0: half of those a token uses). On the
    // 2 GB benchmark (random router, prediction precision under 50%) reading all 8 predicted
    // experts cost a third of the decode speed at 20% and 50% budgets: wasted reads compete with
    // demand reads; 4 was as fast as no prefetch there (benchmarks/expert_streaming.py --policies).
    int prefetch_top = 0;
    int retries = 3;               // attempts after a failed or short read, before the error is reported
    int inject_read_faults = 0;    // tests: the first N reads fail with EIO
};

// One contiguous byte range of the file a cache unit needs (a projection of one expert, or one
// matrix of a layer).
struct Range {
    uint64_t offset = 0;
    size_t bytes = 0;
};

// What a streaming store caches: units (an expert, or a layer's dense matrices), each a few ranges
// of the file, each unit belonging to a layer (for the layer-aware policy and per-layer counts).
struct Unit {
    int layer = 0;
    std::vector<Range> ranges;
    std::string name;  // for errors: "expert 3 of layer 2", "layer 5"
};

// Bytes one slot takes for these units: the largest unit, each range rounded out to the read alignment.
size_t stream_slot_bytes(const std::vector<std::vector<size_t>> &unit_range_bytes);

// The stacked expert tensors (ffn_{gate,up,down}_exps), the ones a streaming store reads from disk.
// stacked expert matrices; their biases (gpt-oss, [n_expert][rows] F32) are small and stay resident
inline bool is_expert_tensor(const std::string &name) { return name.find("_exps.weight") != std::string::npos; }

// A fixed number of slots filled by direct reads of units, shared by the expert store and the
// dense-layer streamer. Thread-safe between the forward pass (one thread) and its readers.
class StreamingStore {
  public:
    StreamingStore(const std::string &path, std::vector<Unit> units, int n_layers, const StreamConfig &cfg);
    ~StreamingStore();
    StreamingStore(const StreamingStore &) = delete;
    StreamingStore &operator=(const StreamingStore &) = delete;

    // The units the layer being computed needs now, in the order they will be acquired.
    void request(int layer, const std::vector<int> &keys);
    // Units probably needed soon (speculative; never displaces a requested unit).
    void prefetch(const std::vector<int> &keys);
    // Blocks until the unit is in memory: one pointer per range, valid until release(key).
    std::vector<const uint8_t *> acquire(int key);
    void release(int key);
    size_t slot_bytes() const { return slot_bytes_; }
    ExpertStoreStats stats() const;
    void reset_stats();
    std::vector<int32_t> trace() const;

  private:
    enum class State { EMPTY, LOADING, READY, FAILED };
    struct Slot {
        int key = -1;  // unit index
        State state = State::EMPTY;
        int pins = 0;
        bool wanted = false;      // requested for the layer being computed, not yet released
        bool prefetched = false;  // loaded by the prefetcher and not yet used
        bool demand = false;      // queued ahead of prefetches
        uint64_t last_use = 0;    // demand accesses so far, at the last one (lru)
        uint64_t last_visit = 0;  // layer visits so far, at the last use (frequency decay)
        double freq = 0;
        uint8_t *buf = nullptr;
        std::string error;
    };

    int find(int key) const { return where_[key]; }
    int victim(bool for_prefetch);             // an evictable slot, -1 if none (lock held)
    std::pair<int, int> pop_job();             // next (slot, key) to read (lock held)
    double half_life() const { return 16.0 * n_layers_; }  // frequency decay: 16 tokens' layer visits
    int load(int key, bool demand);            // assigns a slot and queues the read; -1 if no slot free (lock held)
    void touch(Slot &s);                       // policy bookkeeping on a demand access (lock held)
    void count_access(int key, int slot);      // hit/miss accounting (lock held)
    void reader();                             // pread thread body
    void uring_reader();                       // the io_uring thread body
    void finish(int slot, const std::string &error);  // a slot's read is over (lock held)
    void read_slot(int slot, int key);         // reads outside the lock; throws ModelError
    void read_and_finish(int slot, int key);   // read_slot, then the slot is READY or FAILED (lock not held)
    std::string read_error(int key, int range, const std::string &why) const;
    size_t pread_full(uint64_t offset, uint8_t *dst, size_t len, size_t need);

    std::string path_;
    int fd_ = -1;
    bool direct_ = false;
    std::vector<Unit> units_;
    std::vector<std::vector<size_t>> region_;  // per unit: offset of each range's region in a slot
    int n_layers_;
    StreamConfig cfg_;
    size_t slot_bytes_ = 0;
    uint8_t *arena_ = nullptr;

    mutable std::mutex mu_;
    std::condition_variable ready_, work_;
    std::vector<Slot> slots_;
    std::vector<int> where_;  // key -> slot, -1 when not held
    std::deque<std::pair<int, int>> queue_;  // (slot, key): demand reads at the front
    std::vector<std::thread> readers_;
    std::unique_ptr<Uring> uring_;  // set when reads go through io_uring
    bool stop_ = false;
    uint64_t clock_ = 0, visits_ = 0;
    size_t n_demand_ = 0;  // demand reads at the front of queue_, in acquire order
    int current_layer_ = 0;
    int faults_left_ = 0;
    ExpertStoreStats stats_;
    std::vector<int32_t> trace_;
    std::vector<int> announced_;  // keys request() counted that acquire() has not yet taken
    std::vector<std::vector<int>> layer_units_;  // per layer: its units
    std::vector<double> use_rate_;               // per unit: fraction of its layer's visits that used it
    std::vector<char> used_now_;                 // scratch for request()
};

// Experts streamed through a StreamingStore: unit layer * n_expert + expert = its three slices.
class StreamingExpertStore : public ExpertStore {
  public:
    StreamingExpertStore(const std::string &path, std::vector<ExpertLayer> layers, int n_expert, const StreamConfig &cfg);
    void request(int layer, const std::vector<int> &experts) override;
    void prefetch(int layer, const std::vector<int> &experts) override;
    ExpertWeights acquire(int layer, int expert) override;
    void release(int layer, int expert) override { store_.release(layer * n_expert_ + expert); }
    bool streams() const override { return true; }
    size_t slot_bytes() const override { return store_.slot_bytes(); }
    ExpertStoreStats stats() const override { return store_.stats(); }
    void reset_stats() override { store_.reset_stats(); }
    std::vector<int32_t> trace() const override { return store_.trace(); }

    static std::vector<Unit> units(const std::vector<ExpertLayer> &layers, int n_expert);

  private:
    std::vector<ExpertLayer> layers_;
    int n_expert_;
    std::vector<int> keys_;  // scratch
    StreamingStore store_;
};

}  // namespace edgeai
