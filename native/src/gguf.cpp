#include "gguf.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <bitset>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <system_error>
#include <unordered_map>

namespace edgeai::gguf {

std::string valid_utf8(const std::string &s) {
    static const char hex[] = "0123456789ABCDEF";
    std::string out;
    out.reserve(s.size());
    const auto *b = reinterpret_cast<const unsigned char *>(s.data());
    for (size_t i = 0, n = s.size(); i < n;) {
        // length of the sequence a lead byte starts (0: not a lead byte), and the smallest code point it
        // may encode (overlong forms are invalid)
        const unsigned c = b[i];
        const int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        bool ok = len > 0 && i + len <= n;
        uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
        for (int k = 1; ok && k < len; ++k) {
            ok = (b[i + k] & 0xC0) == 0x80;
            cp = (cp << 6) | (b[i + k] & 0x3F);
        }
        static const uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
        ok = ok && cp >= kMin[len] && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
        if (ok) {
            out.append(s, i, len);
            i += len;
        } else {
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
            ++i;
        }
    }
    return out;
}

namespace {

std::atomic<uint64_t> g_parses{0};

// Limits far above any real model; they keep a hostile header from asking for absurd allocations.
constexpr uint64_t MAX_KV = 1u << 20;
constexpr uint64_t MAX_TENSORS = 1u << 20;
constexpr uint32_t MAX_DIMS = 4;

const TypeInfo TYPES[] = {
    /*0*/ {"F32", 1, 4}, /*1*/ {"F16", 1, 2}, /*2*/ {"Q4_0", 32, 18}, /*3*/ {"Q4_1", 32, 20},
    /*4*/ {nullptr, 0, 0}, /*5*/ {nullptr, 0, 0}, /*6*/ {"Q5_0", 32, 22}, /*7*/ {"Q5_1", 32, 24},
    /*8*/ {"Q8_0", 32, 34}, /*9*/ {"Q8_1", 32, 36}, /*10*/ {"Q2_K", 256, 84}, /*11*/ {"Q3_K", 256, 110},
    /*12*/ {"Q4_K", 256, 144}, /*13*/ {"Q5_K", 256, 176}, /*14*/ {"Q6_K", 256, 210}, /*15*/ {"Q8_K", 256, 292},
    /*16*/ {"IQ2_XXS", 256, 66}, /*17*/ {"IQ2_XS", 256, 74}, /*18*/ {"IQ3_XXS", 256, 98}, /*19*/ {"IQ1_S", 256, 50},
    /*20*/ {"IQ4_NL", 32, 18}, /*21*/ {"IQ3_S", 256, 110}, /*22*/ {"IQ2_S", 256, 82}, /*23*/ {"IQ4_XS", 256, 136},
    /*24*/ {"I8", 1, 1}, /*25*/ {"I16", 1, 2}, /*26*/ {"I32", 1, 4}, /*27*/ {"I64", 1, 8},
    /*28*/ {"F64", 1, 8}, /*29*/ {"IQ1_M", 256, 56}, /*30*/ {"BF16", 1, 2}, /*31*/ {nullptr, 0, 0},
    /*32*/ {nullptr, 0, 0}, /*33*/ {nullptr, 0, 0}, /*34*/ {"TQ1_0", 256, 54}, /*35*/ {"TQ2_0", 256, 66},
    /*36*/ {nullptr, 0, 0}, /*37*/ {nullptr, 0, 0}, /*38*/ {nullptr, 0, 0}, /*39*/ {"MXFP4", 32, 17},
    /*40*/ {"NVFP4", 64, 36}, /*41*/ {"Q1_0", 128, 18},
};

// Reads the header through bounds checks; every failure names the file and the byte offset.
class Cursor {
  public:
    Cursor(const uint8_t *base, uint64_t size, const std::string &path) : base_(base), size_(size), path_(path) {}

    template <class Error = FormatError> [[noreturn]] void fail(const std::string &what) const {
        throw Error(path_ + ": not a valid GGUF file: " + what + " (at byte " + std::to_string(pos_) + ")");
    }
    void need(uint64_t n, const char *what) const {
        if (n > size_ - pos_) fail(std::string("truncated while reading ") + what);
    }
    template <class T> T read(const char *what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, base_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }
    std::string string(const char *what) {
        uint64_t n = read<uint64_t>(what);
        need(n, what);
        std::string s(reinterpret_cast<const char *>(base_ + pos_), n);
        pos_ += n;
        return s;
    }
    void skip(uint64_t n, const char *what) {
        need(n, what);
        pos_ += n;
    }
    uint64_t pos() const { return pos_; }
    void seek(uint64_t pos) { pos_ = pos; }

  private:
    const uint8_t *base_;
    uint64_t size_;
    uint64_t pos_ = 0;
    const std::string &path_;
};

// Size of one scalar metadata element, 0 for strings/arrays (variable size).
uint64_t scalar_size(uint32_t vt) {
    switch (vt) {
        case 0: case 1: case 7: return 1;
        case 2: case 3: return 2;
        case 4: case 5: case 6: return 4;
        case 10: case 11: case 12: return 8;
        default: return 0;
    }
}

// The byte a SentencePiece byte token stands for ("<0x0A>" -> 10, as llama.cpp spells them), or -1.
int byte_token(const std::string &text) {
    if (text.size() != 6 || text.compare(0, 3, "<0x") != 0 || text[5] != '>') return -1;
    int b = 0;
    for (int k = 3; k < 5; ++k) {
        const char h = text[k];
        if (!((h >= '0' && h <= '9') || (h >= 'A' && h <= 'F'))) return -1;
        b = 16 * b + (h <= '9' ? h - '0' : h - 'A' + 10);
    }
    return b;
}

Value read_value(Cursor &c, uint32_t vt, const std::string &key, bool in_array, std::bitset<256> &byte_tokens) {
    Value v;
    v.type = vt;
    switch (vt) {
        case 0: v.kind = Value::UINT; v.u = c.read<uint8_t>("u8"); break;
        case 1: v.kind = Value::INT; v.i = c.read<int8_t>("i8"); break;
        case 2: v.kind = Value::UINT; v.u = c.read<uint16_t>("u16"); break;
        case 3: v.kind = Value::INT; v.i = c.read<int16_t>("i16"); break;
        case 4: v.kind = Value::UINT; v.u = c.read<uint32_t>("u32"); break;
        case 5: v.kind = Value::INT; v.i = c.read<int32_t>("i32"); break;
        case 6: v.kind = Value::FLOAT; v.f = c.read<float>("f32"); break;
        case 7: v.kind = Value::BOOL; v.u = c.read<uint8_t>("bool") != 0; break;
        case 8: v.kind = Value::STRING; v.s = c.string("string value"); break;
        case 10: v.kind = Value::UINT; v.u = c.read<uint64_t>("u64"); break;
        case 11: v.kind = Value::INT; v.i = c.read<int64_t>("i64"); break;
        case 12: v.kind = Value::FLOAT; v.f = c.read<double>("f64"); break;
        case 9: {
            if (in_array) c.fail("nested array in metadata key '" + key + "'");
            v.kind = Value::ARRAY;
            v.array_type = c.read<uint32_t>("array type");
            v.array_len = c.read<uint64_t>("array length");
            v.array_offset = c.pos();
            uint64_t elem = scalar_size(v.array_type);
            if (elem) {
                if (v.array_len > UINT64_MAX / elem) c.fail("array length overflows in key '" + key + "'");
                c.skip(v.array_len * elem, "array data");
            } else if (v.array_type == 8 && key == "tokenizer.ggml.tokens") {
                // llama.cpp's vocabulary loader aborts the process when two tokens have the same text
                // (as C strings: up to a NUL), so the reader refuses such a vocabulary first.
                std::unordered_map<std::string, uint64_t> seen;
                for (uint64_t k = 0; k < v.array_len; ++k) {
                    std::string text = c.string("token text");
                    text.resize(std::strlen(text.c_str()));
                    if (const int b = byte_token(text); b >= 0) byte_tokens.set(b);
                    const auto [at, fresh] = seen.emplace(std::move(text), k);
                    if (!fresh)
                        c.fail<VocabularyError>("tokens " + std::to_string(at->second) + " and " + std::to_string(k) +
                                                " of tokenizer.ggml.tokens have the same text (up to any NUL byte); a " +
                                                "vocabulary's tokens must all differ");
                }
            } else if (v.array_type == 8) {
                for (uint64_t k = 0; k < v.array_len; ++k) c.skip(c.read<uint64_t>("string length"), "array string");
            } else {
                c.fail("metadata key '" + key + "' has an array of unknown type " + std::to_string(v.array_type));
            }
            break;
        }
        default: c.fail("metadata key '" + key + "' has unknown value type " + std::to_string(vt));
    }
    return v;
}

}  // namespace

const TypeInfo *type_info(uint32_t type) {
    if (type >= sizeof(TYPES) / sizeof(TYPES[0]) || TYPES[type].name == nullptr) return nullptr;
    return &TYPES[type];
}

uint64_t TensorInfo::n_rows() const {
    uint64_t n = 1;
    for (size_t d = 1; d < ne.size(); ++d) n *= ne[d];
    return n;
}

std::string TensorInfo::shape_str() const {
    std::string s = "[";
    for (size_t d = 0; d < ne.size(); ++d) s += (d ? ", " : "") + std::to_string(ne[d]);
    return s + "]";
}

uint64_t TensorInfo::row_bytes() const {
    const TypeInfo *ti = type_info(type);
    return ne.empty() ? 0 : ne[0] / ti->block_size * ti->type_size;
}

File::File(const std::string &path) : path_(path) {
    g_parses.fetch_add(1, std::memory_order_relaxed);
    fd_ = ::open(path.c_str(), O_RDONLY);
    if (fd_ < 0) throw std::system_error(errno, std::generic_category(), path);
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
        int e = errno;
        ::close(fd_);
        throw std::system_error(e, std::generic_category(), path);
    }
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ < 24) {
        ::close(fd_);
        throw FormatError(path + ": not a GGUF file (" + std::to_string(size_) + " bytes, shorter than a GGUF header)");
    }
    void *m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (m == MAP_FAILED) {
        int e = errno;
        ::close(fd_);
        throw std::system_error(e, std::generic_category(), "mmap " + path);
    }
    base_ = static_cast<const uint8_t *>(m);
    try {
        Cursor c(base_, size_, path_);
        if (std::memcmp(base_, "GGUF", 4) != 0) c.fail("the file does not start with the magic 'GGUF'");
        c.skip(4, "magic");
        version_ = c.read<uint32_t>("version");
        if (version_ != 2 && version_ != 3)
            c.fail("GGUF version " + std::to_string(version_) + " is not supported (2 and 3 are)");
        uint64_t n_tensors = c.read<uint64_t>("tensor count");
        uint64_t n_kv = c.read<uint64_t>("metadata count");
        if (n_tensors > MAX_TENSORS || n_kv > MAX_KV)
            c.fail("implausible counts: " + std::to_string(n_tensors) + " tensors, " + std::to_string(n_kv) + " keys");
        std::bitset<256> byte_tokens;  // the bytes tokenizer.ggml.tokens has a SentencePiece byte token for
        for (uint64_t k = 0; k < n_kv; ++k) {
            std::string key = c.string("metadata key");
            uint32_t vt = c.read<uint32_t>("value type");
            if (kv_.count(key)) c.fail("metadata key '" + key + "' appears twice");
            kv_.emplace(key, read_value(c, vt, key, false, byte_tokens));
        }
        // llama.cpp's SentencePiece tokenizer spells text it has no token for with byte tokens, looked
        // up with unordered_map::at: a missing one throws through its C API and aborts the process.
        const Value *model = find("tokenizer.ggml.model");
        if (model && model->kind == Value::STRING && model->s == "llama" && find("tokenizer.ggml.tokens") &&
            !byte_tokens.all()) {
            int missing = 0;
            while (byte_tokens.test(missing)) ++missing;
            char name[8];
            std::snprintf(name, sizeof name, "<0x%02X>", missing);
            throw VocabularyError(path_ + ": the SentencePiece ('llama') vocabulary of tokenizer.ggml.tokens has " +
                                  std::to_string(byte_tokens.count()) + " of the 256 byte tokens <0x00>..<0xFF> (" + name +
                                  " is missing); llama.cpp's tokenizer aborts the process on text it has to spell in "
                                  "bytes, so the vocabulary needs them all (convert with a byte-fallback tokenizer)");
        }
        if (const Value *a = find("general.alignment")) {
            if (a->kind != Value::UINT || a->u == 0 || (a->u & (a->u - 1)) != 0 || a->u > (1u << 20))
                c.fail("general.alignment must be a power of two");
            alignment_ = a->u;
        }
        tensors_.reserve(n_tensors);
        for (uint64_t k = 0; k < n_tensors; ++k) {
            TensorInfo t;
            t.name = c.string("tensor name");
            uint32_t n_dims = c.read<uint32_t>("tensor dims");
            if (n_dims == 0 || n_dims > MAX_DIMS) c.fail("tensor '" + t.name + "' has " + std::to_string(n_dims) + " dimensions");
            uint64_t n_elem = 1;
            for (uint32_t d = 0; d < n_dims; ++d) {
                uint64_t ne = c.read<uint64_t>("tensor shape");
                if (ne == 0 || ne > (1ull << 40) || n_elem > UINT64_MAX / ne) c.fail("tensor '" + t.name + "' has an invalid shape");
                n_elem *= ne;
                t.ne.push_back(ne);
            }
            t.type = c.read<uint32_t>("tensor type");
            const TypeInfo *ti = type_info(t.type);
            if (!ti) c.fail("tensor '" + t.name + "' has unknown type id " + std::to_string(t.type));
            if (t.ne[0] % ti->block_size != 0)
                c.fail("tensor '" + t.name + "' has rows of " + std::to_string(t.ne[0]) + ", not a multiple of " +
                       ti->name + "'s block of " + std::to_string(ti->block_size));
            // the byte count must fit in 64 bits and in the file (checked with the offset below): a shape
            // whose count wraps around would otherwise pass as a small tensor
            const uint64_t n_blocks = n_elem / ti->block_size;
            if (n_blocks > UINT64_MAX / ti->type_size || n_blocks * ti->type_size > size_)
                c.fail("tensor '" + t.name + "' of shape " + t.shape_str() + " " + ti->name + " needs more bytes (" +
                       (n_blocks > UINT64_MAX / ti->type_size ? std::string("over 2^64") : std::to_string(n_blocks * ti->type_size)) +
                       ") than the file has (" + std::to_string(size_) + "); the file is corrupt or truncated");
            t.nbytes = n_blocks * ti->type_size;
            t.offset = c.read<uint64_t>("tensor offset");
            if (t.offset % alignment_ != 0) c.fail("tensor '" + t.name + "' is not aligned to " + std::to_string(alignment_));
            if (by_name_.count(t.name)) c.fail("tensor '" + t.name + "' appears twice");
            by_name_.emplace(t.name, tensors_.size());
            tensors_.push_back(std::move(t));
        }
        uint64_t data_start = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
        for (TensorInfo &t : tensors_) {
            if (t.offset > size_ || data_start > size_ - t.offset || t.nbytes > size_ - data_start - t.offset)
                throw FormatError(path_ + ": tensor '" + t.name + "' lies beyond the end of the file (" +
                                  std::to_string(size_) + " bytes): the file is truncated");
            t.offset += data_start;
        }
    } catch (...) {
        ::munmap(const_cast<uint8_t *>(base_), size_);
        ::close(fd_);
        throw;
    }
}

void File::release(const uint8_t *p, size_t n) const {
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
    if (p >= base_ && p + n <= base_ + size_ && hi > lo)
        ::madvise(reinterpret_cast<void *>(lo), hi - lo, MADV_DONTNEED);  // a hint: failure changes nothing
}

File::~File() {
    if (base_) ::munmap(const_cast<uint8_t *>(base_), size_);
    if (fd_ >= 0) ::close(fd_);
}

const Value *File::find(const std::string &key) const {
    auto it = kv_.find(key);
    return it == kv_.end() ? nullptr : &it->second;
}

uint64_t File::parse_count() { return g_parses.load(std::memory_order_relaxed); }

std::vector<std::string> File::string_array(const std::string &key) const {
    const Value *v = find(key);
    if (!v || v->kind != Value::ARRAY || v->array_type != 8)
        throw FormatError(path_ + ": metadata " + key + (v ? " is not an array of strings" : " is missing"));
    Cursor c(base_, size_, path_);  // the parse validated every length of this array against the file
    c.seek(v->array_offset);
    std::vector<std::string> out;
    out.reserve(v->array_len);
    for (uint64_t k = 0; k < v->array_len; ++k) out.push_back(c.string("array string"));
    return out;
}

const TensorInfo *File::tensor(const std::string &name) const {
    auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

int64_t File::get_int(const std::string &key, int64_t fallback) const {
    const Value *v = find(key);
    if (!v) return fallback;
    if (v->kind == Value::UINT || v->kind == Value::BOOL) {
        if (v->u > static_cast<uint64_t>(INT64_MAX)) throw FormatError(path_ + ": metadata " + key + " is out of range");
        return static_cast<int64_t>(v->u);
    }
    if (v->kind == Value::INT) return v->i;
    throw FormatError(path_ + ": metadata " + key + " should be an integer");
}

double File::get_float(const std::string &key, double fallback) const {
    const Value *v = find(key);
    if (!v) return fallback;
    if (v->kind == Value::FLOAT) return v->f;
    if (v->kind == Value::INT) return static_cast<double>(v->i);
    if (v->kind == Value::UINT) return static_cast<double>(v->u);
    throw FormatError(path_ + ": metadata " + key + " should be a number");
}

std::string File::get_string(const std::string &key, const std::string &fallback) const {
    const Value *v = find(key);
    if (!v) return fallback;
    if (v->kind != Value::STRING) throw FormatError(path_ + ": metadata " + key + " should be a string");
    return v->s;
}

}  // namespace edgeai::gguf
