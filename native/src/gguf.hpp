// GGUF reader over a read-only memory map.
//
// This parser faces files from the internet: every count, length, offset and shape in the header
// is checked against the file size (with overflow checks) while parsing, before any tensor data is
// touched. A bad file raises gguf::FormatError naming the file and what is wrong; it never crashes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgeai::gguf {

// Header bytes are untrusted: a message quoting them (a tensor name, a key) has every byte that is not
// part of valid UTF-8 written as \xNN, so that Python can show it (PyErr_SetString decodes UTF-8).
std::string valid_utf8(const std::string &s);

class FormatError : public std::runtime_error {
  public:
    explicit FormatError(const std::string &what) : std::runtime_error(valid_utf8(what)) {}
};

// A vocabulary llama.cpp cannot load (it aborts the process on one): told apart so that callers which
// hand the file to llama.cpp can refuse it even where the rest is llama.cpp's to judge.
class VocabularyError : public FormatError {
  public:
    using FormatError::FormatError;
};

// ggml tensor type ids (stable on-disk values).
enum Type : uint32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30, MXFP4 = 39,
};

struct TypeInfo {
    const char *name;
    uint32_t block_size;  // weights per block
    uint32_t type_size;   // bytes per block
};
// Size facts of every ggml type this reader can lay out (more than the engine computes with);
// nullptr for an id it does not know.
const TypeInfo *type_info(uint32_t type);

// One metadata value. Arrays keep their element type and count; the engine never needs array
// contents (the tokenizer lives in Python), so they stay in the file.
struct Value {
    enum Kind { UINT, INT, FLOAT, BOOL, STRING, ARRAY } kind = UINT;
    uint32_t type = 0;  // the GGUF value type id (kind folds u8..u64 into UINT; a writer keeps the id)
    uint64_t u = 0;
    int64_t i = 0;
    double f = 0;
    std::string s;
    uint32_t array_type = 0;
    uint64_t array_len = 0;
    uint64_t array_offset = 0;  // file offset of the first element (validated: the whole array is inside)
};

struct TensorInfo {
    std::string name;
    uint32_t type = 0;
    std::vector<uint64_t> ne;  // ggml order: ne[0] is the row length (contiguous)
    uint64_t offset = 0;       // absolute file offset of the first byte
    uint64_t nbytes = 0;
    uint64_t n_rows() const;   // product of ne[1..]
    uint64_t row_bytes() const;
    std::string shape_str() const;  // "[ne0, ne1, ...]" (ggml order), for messages
};

class File {
  public:
    explicit File(const std::string &path);  // throws FormatError or std::system_error
    ~File();
    File(const File &) = delete;
    File &operator=(const File &) = delete;

    const std::string &path() const { return path_; }
    uint32_t version() const { return version_; }
    uint64_t alignment() const { return alignment_; }
    uint64_t size() const { return size_; }
    const std::map<std::string, Value> &metadata() const { return kv_; }
    const std::vector<TensorInfo> &tensors() const { return tensors_; }

    const Value *find(const std::string &key) const;
    // The elements of a string array (the tokenizer's tokens, merges...), as the raw bytes the file
    // holds; a key that is absent or not a string array is a FormatError naming it.
    std::vector<std::string> string_array(const std::string &key) const;
    // Headers parsed by this process so far (tests hold a load to one parse).
    static uint64_t parse_count();
    const TensorInfo *tensor(const std::string &name) const;  // nullptr if absent
    const uint8_t *data(const TensorInfo &t) const { return base_ + t.offset; }
    const uint8_t *base() const { return base_; }
    // Hint that the mapped bytes [p, p + n) will not be read again (a copy of them is used instead):
    // the whole pages inside the range leave the process's resident set. Harmless if they are read
    // after all (the mapping is read-only: they fault in again from the file).
    void release(const uint8_t *p, size_t n) const;

    // Typed metadata access; a present key of the wrong kind is a FormatError naming the key.
    int64_t get_int(const std::string &key, int64_t fallback) const;
    double get_float(const std::string &key, double fallback) const;
    std::string get_string(const std::string &key, const std::string &fallback) const;

  private:
    std::string path_;
    int fd_ = -1;
    const uint8_t *base_ = nullptr;
    uint64_t size_ = 0;
    uint32_t version_ = 0;
    uint64_t alignment_ = 32;
    std::map<std::string, Value> kv_;
    std::vector<TensorInfo> tensors_;
    std::map<std::string, size_t> by_name_;
};

}  // namespace edgeai::gguf
