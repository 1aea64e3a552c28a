// edgeai._native, runtime half: the GGUF reader, the kernel sets (for tests) and the engine.
// Every call that computes releases the GIL; C++ errors become the Python exceptions registered
// here (GGUFFormatError, ModelError), which edgeai.runtimes.native turns into EdgeAIErrors.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <optional>

#include "gguf.hpp"
#include "kernels.hpp"
#include "model.hpp"

namespace nb = nanobind;

namespace {

using F32Array = nb::ndarray<nb::numpy, float, nb::ndim<1>>;
using F32In = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using F32In2 = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using U8In = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U32In = nb::ndarray<const uint32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// A float vector handed to numpy without a copy (the capsule owns it).
template <class T> nb::ndarray<nb::numpy, T> to_numpy(std::vector<T> &&v, std::initializer_list<size_t> shape) {
    auto *owned = new std::vector<T>(std::move(v));
    nb::capsule owner(owned, [](void *p) noexcept { delete static_cast<std::vector<T> *>(p); });
    return nb::ndarray<nb::numpy, T>(owned->data(), shape, owner);
}

const edgeai::kern::Ops &ops_or_throw(const std::string &isa) {
    const edgeai::kern::Ops *o = edgeai::kern::named(isa);
    if (!o) throw nb::value_error(("instruction set '" + isa + "' is not available here").c_str());
    return *o;
}

// Header strings are untrusted bytes: invalid UTF-8 is replaced (U+FFFD), never an exception.
nb::str py_str(const std::string &s) {
    return nb::steal<nb::str>(PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace"));
}

nb::object value_to_python(const edgeai::gguf::Value &v) {
    using V = edgeai::gguf::Value;
    switch (v.kind) {
        case V::UINT: return nb::int_(v.u);
        case V::INT: return nb::int_(v.i);
        case V::FLOAT: return nb::float_(v.f);
        case V::BOOL: return nb::bool_(v.u != 0);
        case V::STRING: return py_str(v.s);
        case V::ARRAY: return nb::make_tuple(nb::str("array"), v.array_type, v.array_len, v.array_offset);
    }
    return nb::none();
}

// Every field from the dict engine_config makes (a missing key is a KeyError).
edgeai::ModelConfig config_from(const nb::dict &d) {
    edgeai::ModelConfig c;
    for (const char *key : edgeai::CONFIG_FIELDS) edgeai::set_config_field(c, key, nb::cast<double>(d[key]));
    return c;
}

nb::dict stats_dict(const edgeai::ExpertStoreStats &s, size_t slot_bytes) {
    nb::dict d;
    d["streaming"] = s.streaming;
    d["direct"] = s.direct;
    d["policy"] = s.streaming ? nb::cast(s.policy) : nb::none();
    d["io"] = s.io;
    d["slots"] = s.slots;
    d["peak_slots_used"] = s.peak_slots_used;
    d["slot_bytes"] = slot_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["bytes_read"] = s.bytes_read;
    d["reads"] = s.reads;
    d["read_retries"] = s.read_retries;
    d["read_failures"] = s.read_failures;
    d["read_seconds"] = s.read_seconds;
    d["stall_seconds"] = s.stall_seconds;
    d["prefetch_issued"] = s.prefetch_issued;
    d["prefetch_used"] = s.prefetch_used;
    d["layer_hits"] = s.layer_hits;
    d["layer_misses"] = s.layer_misses;
    return d;
}

void check_mask(const edgeai::Model &self, const std::optional<U32In> &mask) {
    const size_t words = (size_t(self.config().n_vocab) + 31) / 32;
    if (mask && mask->shape(0) != words)
        throw nb::value_error(("the token mask has " + std::to_string(mask->shape(0)) + " words; a vocabulary of " +
                               std::to_string(self.config().n_vocab) + " tokens takes " + std::to_string(words)).c_str());
}

// One Python call into an engine at a time. An engine's buffers, KV caches and thread pool serve one
// forward pass or cache edit; once a call releases the GIL nothing else stops a second Python thread
// from entering the same engine mid-step (a segfault, or caches silently mixed). A caller that finds
// the engine busy waits with the GIL released, so the busy call can still take the GIL back (a
// step's mask_fn) and finish; that callback, on the holding thread, may call the engine again.
class Exclusive {
  public:
    explicit Exclusive(const edgeai::Model &m) : lock_(m.calls(), std::try_to_lock) {
        if (!lock_.owns_lock()) {
            nb::gil_scoped_release release;
            lock_.lock();
        }
    }

  private:
    std::unique_lock<std::recursive_mutex> lock_;
};

// A member function bound as a method that holds the engine for its call.
template <class R, class... A> auto exclusive(R (edgeai::Model::*f)(A...)) {
    return [f](edgeai::Model &self, A... a) -> R {
        Exclusive call(self);
        return (self.*f)(a...);
    };
}
template <class R, class... A> auto exclusive(R (edgeai::Model::*f)(A...) const) {
    return [f](const edgeai::Model &self, A... a) -> R {
        Exclusive call(self);
        return (self.*f)(a...);
    };
}

}  // namespace

void bind_runtime(nb::module_ &m) {
    nb::exception<edgeai::gguf::FormatError> format_error(m, "GGUFFormatError", PyExc_ValueError);
    nb::exception<edgeai::gguf::VocabularyError>(m, "GGUFVocabularyError", format_error);
    nb::exception<edgeai::ModelError>(m, "ModelError", PyExc_ValueError);

    nb::class_<edgeai::gguf::File>(
        m, "GGUFFile",
        "A GGUF header parsed and validated once (the file stays mapped read-only while this object lives); "
        "the engine and the planner take it instead of parsing the file again.")
        .def("__init__",
             [](edgeai::gguf::File *self, const std::string &path) {
                 nb::gil_scoped_release release;
                 new (self) edgeai::gguf::File(path);
             },
             nb::arg("path"))
        .def_prop_ro("path", [](const edgeai::gguf::File &f) { return f.path(); })
        .def_prop_ro("version", &edgeai::gguf::File::version)
        .def_prop_ro("alignment", &edgeai::gguf::File::alignment)
        .def_prop_ro("size", &edgeai::gguf::File::size)
        .def("metadata",
             [](const edgeai::gguf::File &f) {
                 nb::dict meta;
                 for (const auto &[k, v] : f.metadata())
                     meta[py_str(k)] = nb::make_tuple(v.type, value_to_python(v), nb::bytes(k.data(), k.size()));
                 return meta;
             },
             "{key: (GGUF value type id, value, the key's own bytes)}; keys and strings that are not UTF-8 show "
             "U+FFFD (the bytes name the key to string_array); an array's value is ('array', element type id, "
             "length, file offset of its first element).")
        .def("tensors",
             [](const edgeai::gguf::File &f) {
                 nb::list tensors;
                 for (const auto &t : f.tensors()) {
                     nb::list shape;
                     for (uint64_t d : t.ne) shape.append(d);
                     tensors.append(nb::make_tuple(py_str(t.name), t.type, edgeai::gguf::type_info(t.type)->name,
                                                   nb::tuple(shape), t.offset, t.nbytes));
                 }
                 return tensors;
             },
             "[(name, ggml type id, its name, ggml shape (row length first), absolute file offset, bytes)].")
        .def("string_array",
             [](const edgeai::gguf::File &f, const nb::bytes &raw_key) {
                 const std::string key(raw_key.c_str(), raw_key.size());
                 std::vector<std::string> items;
                 {
                     nb::gil_scoped_release release;
                     items = f.string_array(key);
                 }
                 nb::list out;
                 for (const std::string &s : items) out.append(nb::bytes(s.data(), s.size()));
                 return out;
             },
             nb::arg("key"), "The elements of a string array as bytes (the file's own, undecoded); key: the key's bytes.");
    m.def("gguf_parse_count", &edgeai::gguf::File::parse_count,
          "GGUF headers this process has parsed (every GGUFFile and every engine built from a path).");

    // KV cache types cross the seam typed: Python checks the names users write (OptionError naming the
    // choices, runtimes.base.kv_cache_types) and hands these over (edgeai.native_bridge.kv_types).
    nb::enum_<edgeai::KVType>(m, "KVType", "A KV cache element type.")
        .value("F16", edgeai::KVType::F16)
        .value("Q8_0", edgeai::KVType::Q8_0)
        .value("Q4_0", edgeai::KVType::Q4_0);
    nb::class_<edgeai::KVTypes>(m, "KVTypes", "The KV cache's key type and value type.")
        .def(nb::init<>())
        .def("__init__", [](edgeai::KVTypes *t, edgeai::KVType k, edgeai::KVType v) { new (t) edgeai::KVTypes{k, v}; },
             nb::arg("k"), nb::arg("v"))
        .def_rw("k", &edgeai::KVTypes::k)
        .def_rw("v", &edgeai::KVTypes::v)
        .def("__repr__", [](const edgeai::KVTypes &t) { return "KVTypes(" + edgeai::kv_type_name(t) + ")"; });

    m.def("memory_sizes",
          [](const edgeai::gguf::File &file, const nb::dict &config, int n_ctx, int n_threads, edgeai::KVTypes kv) {
              const edgeai::ModelConfig c = config_from(config);
              edgeai::MemorySizes s;
              {
                  nb::gil_scoped_release release;
                  s = edgeai::Model::memory_sizes(file, c, n_ctx, n_threads, kv);
              }
              nb::dict d;
              d["dense"] = s.dense;
              d["experts"] = s.experts;
              d["slot"] = s.slot;
              d["layer_matrices"] = s.layer_matrices;
              d["layer_slot"] = s.layer_slot;
              d["kv"] = s.kv;
              d["scratch"] = s.scratch;
              return d;
          },
          nb::arg("file"), nb::arg("config"), nb::arg("n_ctx"), nb::arg("n_threads"), nb::arg("kv_type") = edgeai::KVTypes{},
          "Bytes the engine would need for this file: {dense, experts, slot, layer_matrices, layer_slot, kv, scratch} "
          "(the planner's inputs).");
    m.def("kv_bytes",
          [](const nb::dict &config, int n_ctx, edgeai::KVTypes kv_type) {
              return edgeai::Model::kv_bytes_for(config_from(config), n_ctx, kv_type);
          },
          nb::arg("config"), nb::arg("n_ctx"), nb::arg("kv_type"), "Bytes of the KV cache of n_ctx positions of this type.");
    m.def("observe_bytes",
          [](const nb::dict &config, int window) { return edgeai::Model::observe_bytes_for(config_from(config), window, 1); },
          nb::arg("config"), nb::arg("window"), "Bytes one sequence slot's observed queries take (Model.observe(window)).");
    m.def("engine_types",
          [] {
              nb::dict out;
              for (uint32_t t = 0; t < 64; ++t)
                  if (edgeai::kern::wtype_of_ggml(t) >= 0) out[nb::int_(t)] = edgeai::gguf::type_info(t)->name;
              return out;
          },
          "{ggml type id: name} of the tensor types the engine computes with.");
    m.def("kernel_isas", &edgeai::kern::available, "Kernel sets compiled in that this CPU runs, best last.");
    m.def("kernel_best", [] { return std::string(edgeai::kern::best().isa); }, "The kernel set the engine uses.");
    m.def("kernel_matvec",
          [](const std::string &isa, uint32_t ggml_type, U8In rows, F32In x, size_t n_rows) {
              const edgeai::kern::Ops &ops = ops_or_throw(isa);
              const int w = edgeai::kern::wtype_of_ggml(ggml_type);
              if (w < 0) throw nb::value_error("the engine does not compute with this type");
              const size_t n = x.shape(0);
              const edgeai::gguf::TypeInfo *ti = edgeai::gguf::type_info(ggml_type);
              if (n % ti->block_size || (edgeai::kern::takes_q8(w) && n % 32))
                  throw nb::value_error("x length is not a multiple of the block size");
              const size_t row_bytes = n / ti->block_size * ti->type_size;
              if (rows.shape(0) != row_bytes * n_rows) throw nb::value_error("rows has the wrong number of bytes");
              std::vector<float> y(n_rows);
              {
                  nb::gil_scoped_release release;
                  std::vector<edgeai::kern::BlockQ8A> xq(n / 32 + 1);
                  const void *act = x.data();
                  if (edgeai::kern::takes_q8(w)) {
                      ops.quantize_act(x.data(), xq.data(), n);
                      act = xq.data();
                  }
                  for (size_t r = 0; r < n_rows; ++r) y[r] = ops.dot[w](rows.data() + r * row_bytes, act, n);
              }
              return to_numpy(std::move(y), {n_rows});
          },
          nb::arg("isa"), nb::arg("ggml_type"), nb::arg("rows"), nb::arg("x"), nb::arg("n_rows"),
          "y = W x with one kernel set (tests): W is n_rows rows of the type's bytes.");
    m.def("kernel_gemm",
          [](const std::string &isa, uint32_t ggml_type, U8In rows, F32In2 x, size_t n_rows, bool packed) {
              const edgeai::kern::Ops &ops = ops_or_throw(isa);
              const int w = edgeai::kern::wtype_of_ggml(ggml_type);
              if (w < 0) throw nb::value_error("the engine does not compute with this type");
              const size_t T = x.shape(0), n = x.shape(1);
              const edgeai::gguf::TypeInfo *ti = edgeai::gguf::type_info(ggml_type);
              if (n % ti->block_size || (edgeai::kern::takes_q8(w) && n % 32))
                  throw nb::value_error("x rows are not a multiple of the block size");
              const size_t row_bytes = n / ti->block_size * ti->type_size;
              if (rows.shape(0) != row_bytes * n_rows) throw nb::value_error("rows has the wrong number of bytes");
              std::vector<float> y(T * n_rows);
              {
                  nb::gil_scoped_release release;
                  std::vector<edgeai::kern::BlockQ8A> xq(T * (n / 32) + 1);
                  const uint8_t *act = reinterpret_cast<const uint8_t *>(x.data());
                  size_t stride = n * sizeof(float);
                  if (edgeai::kern::takes_q8(w)) {
                      for (size_t t = 0; t < T; ++t) ops.quantize_act(x.data() + t * n, xq.data() + t * (n / 32), n);
                      act = reinterpret_cast<const uint8_t *>(xq.data());
                      stride = (n / 32) * sizeof(edgeai::kern::BlockQ8A);
                  }
                  std::vector<uint8_t> pk;
                  if (packed && ops.pack[w] && n_rows >= 8) {
                      pk.resize(n_rows / 8 * 8 * row_bytes);
                      ops.pack[w](rows.data(), row_bytes, n_rows / 8 * 8, n, pk.data());
                  }
                  edgeai::kern::gemm_rows(ops, w, rows.data(), row_bytes, pk.empty() ? nullptr : pk.data(), 0, n_rows, act, stride,
                                          static_cast<int>(T), y.data(), n_rows, n);
              }
              return to_numpy(std::move(y), {T, n_rows});
          },
          nb::arg("isa"), nb::arg("ggml_type"), nb::arg("rows"), nb::arg("x"), nb::arg("n_rows"), nb::arg("packed") = false,
          "Y = X W^T with one kernel set's tiled kernels (tests): X is [T, n] tokens, W n_rows rows of the type's bytes; "
          "packed: through the set's load-time layout where it has one for the type (as the engine does).");
    m.def("kernel_packed_rows",
          [](const std::string &isa, uint32_t ggml_type, U8In rows, size_t n_rows, size_t n) -> nb::object {
              const edgeai::kern::Ops &ops = ops_or_throw(isa);
              const int w = edgeai::kern::wtype_of_ggml(ggml_type);
              if (w < 0 || !ops.pack[w] || !ops.unpack_row[w]) return nb::none();
              const size_t row_bytes = rows.shape(0) / n_rows;
              if (n_rows % 8 || row_bytes * n_rows != rows.shape(0)) throw nb::value_error("n_rows must be whole 8-row groups of rows");
              std::vector<uint8_t> pk(rows.shape(0)), back(rows.shape(0));
              ops.pack[w](rows.data(), row_bytes, n_rows, n, pk.data());
              for (size_t r = 0; r < n_rows; ++r) ops.unpack_row[w](pk.data(), row_bytes, n, r, back.data() + r * row_bytes);
              return nb::bytes(reinterpret_cast<const char *>(back.data()), back.size());
          },
          nb::arg("isa"), nb::arg("ggml_type"), nb::arg("rows"), nb::arg("n_rows"), nb::arg("n"),
          "Every row read back from one kernel set's packed layout of `rows` (tests of unpack_row); None where the "
          "set does not pack the type.");
    m.def("kernel_quantize_act",
          [](const std::string &isa, F32In x) {
              const edgeai::kern::Ops &ops = ops_or_throw(isa);
              const size_t n = x.shape(0);
              if (n % 32) throw nb::value_error("length must be a multiple of 32");
              std::vector<edgeai::kern::BlockQ8A> q(n / 32);
              ops.quantize_act(x.data(), q.data(), n);
              std::vector<float> d(n / 32), hs(n / 16), qs(n);
              for (size_t b = 0; b < q.size(); ++b) {
                  d[b] = q[b].d;
                  hs[2 * b] = q[b].hs[0];
                  hs[2 * b + 1] = q[b].hs[1];
                  for (int j = 0; j < 32; ++j) qs[32 * b + j] = q[b].qs[j];
              }
              return nb::make_tuple(to_numpy(std::move(d), {n / 32}), to_numpy(std::move(hs), {n / 16}),
                                    to_numpy(std::move(qs), {n}));
          },
          nb::arg("isa"), nb::arg("x"), "Activation blocks (d, half sums, codes) as one kernel set makes them (tests).");
    m.def("kernel_kv",
          [](const std::string &isa, edgeai::KVType t, U8In v, F32In x, float alpha) {
              const edgeai::kern::Ops &ops = ops_or_throw(isa);
              const size_t n = x.shape(0);
              const size_t row = t == edgeai::KVType::Q8_0 ? n / 32 * 34 : t == edgeai::KVType::Q4_0 ? n / 32 * 18 : 2 * n;
              if (v.shape(0) != row || (t != edgeai::KVType::F16 && n % 32))
                  throw nb::value_error("v must hold x's n values of the cache type (q8_0, q4_0: n a multiple of 32)");
              const uint16_t *h = reinterpret_cast<const uint16_t *>(v.data());
              std::vector<float> y(x.data(), x.data() + n);
              float dot;
              switch (t) {
                  case edgeai::KVType::Q8_0:
                      dot = ops.dot_q8_0_f32(v.data(), x.data(), n);
                      ops.axpy_q8_0(alpha, v.data(), y.data(), n);
                      break;
                  case edgeai::KVType::Q4_0:
                      dot = ops.dot_q4_0_f32(v.data(), x.data(), n);
                      ops.axpy_q4_0(alpha, v.data(), y.data(), n);
                      break;
                  default:
                      dot = ops.dot_f16(h, x.data(), n);
                      ops.axpy_f16(alpha, h, y.data(), n);
              }
              return nb::make_tuple(dot, to_numpy(std::move(y), {n}));
          },
          nb::arg("isa"), nb::arg("kv_type"), nb::arg("v"), nb::arg("x"), nb::arg("alpha"),
          "(dot(v, x), x + alpha*v) over one row v of a KV cache of kv_type ('f16', 'q8_0' or 'q4_0', as bytes) with "
          "one kernel set (tests of the attention kernels).");

    m.def("kernel_attention_f16",
          [](const std::string &isa, U8In keys, U8In values, F32In q, F32In p, int heads) -> nb::object {
              const edgeai::kern::Ops &ops = ops_or_throw(isa);
              if (!ops.scores_f16 || !ops.weighted_sum_f16) return nb::none();
              if (heads < 1 || q.shape(0) % size_t(heads) || p.shape(0) % size_t(heads))
                  throw nb::value_error("q and p must hold `heads` equal parts");
              const size_t hd = q.shape(0) / size_t(heads), n = p.shape(0) / size_t(heads);
              if (hd % 8 || keys.shape(0) != 2 * hd * n || values.shape(0) != 2 * hd * n)
                  throw nb::value_error("keys and values must be n rows of a head's length in f16, a multiple of 8");
              std::vector<float> scores(size_t(heads) * n), out(size_t(heads) * hd);
              ops.scores_f16(reinterpret_cast<const uint16_t *>(keys.data()), hd, static_cast<int>(n), q.data(), heads, hd,
                             scores.data(), n);
              ops.weighted_sum_f16(reinterpret_cast<const uint16_t *>(values.data()), hd, static_cast<int>(n), p.data(), n, heads,
                                   hd, out.data());
              return nb::make_tuple(to_numpy(std::move(scores), {size_t(heads), n}), to_numpy(std::move(out), {size_t(heads), hd}));
          },
          nb::arg("isa"), nb::arg("keys"), nb::arg("values"), nb::arg("q"), nb::arg("p"), nb::arg("heads") = 1,
          "([heads, n] keys . q_h, [heads, hd] sum_j p_h[j] values[j]) over n f16 rows shared by `heads` query heads "
          "(q: heads * hd floats, p: heads * n) with one kernel set's batched attention kernels (tests); None where "
          "the set has none.");

    m.def("kernel_silu_mul",
          [](const std::string &isa, F32In g, F32In u) -> nb::object {
              const edgeai::kern::Ops &ops = ops_or_throw(isa);
              if (!ops.silu_mul) return nb::none();
              const size_t n = g.shape(0);
              if (u.shape(0) != n) throw nb::value_error("g and u must have the same length");
              std::vector<float> out(g.data(), g.data() + n);
              ops.silu_mul(out.data(), u.data(), n);
              return nb::cast(to_numpy(std::move(out), {n}));
          },
          nb::arg("isa"), nb::arg("g"), nb::arg("u"),
          "silu(g) * u with one kernel set's vector SwiGLU (tests); None where the set has none.");

    m.def("kernel_gelu_mul",
          [](const std::string &isa, F32In g, F32In u) -> nb::object {
              const edgeai::kern::Ops &ops = ops_or_throw(isa);
              if (!ops.gelu_mul) return nb::none();
              const size_t n = g.shape(0);
              if (u.shape(0) != n) throw nb::value_error("g and u must have the same length");
              std::vector<float> out(g.data(), g.data() + n);
              ops.gelu_mul(out.data(), u.data(), n);
              return nb::cast(to_numpy(std::move(out), {n}));
          },
          nb::arg("isa"), nb::arg("g"), nb::arg("u"),
          "gelu_tanh(g) * u with one kernel set's vector GeGLU (tests); None where the set has none.");

    m.def("sample_logits",
          [](F32In logits, const std::vector<int32_t> &history, float temperature, int top_k, float top_p, float min_p,
             float repeat_penalty, int repeat_last_n, uint64_t seed, int n_draws, std::optional<U32In> mask) {
              std::vector<float> z(logits.data(), logits.data() + logits.shape(0));
              if (mask && mask->shape(0) != (z.size() + 31) / 32) throw nb::value_error("the token mask's length does not fit the logits");
              const uint32_t *m = mask ? mask->data() : nullptr;
              std::mt19937_64 rng(seed);
              std::vector<int32_t> out(n_draws);
              nb::gil_scoped_release release;
              for (int i = 0; i < n_draws; ++i)
                  out[i] = edgeai::sample_token(z, history, {temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed}, rng, m);
              return out;
          },
          nb::arg("logits"), nb::arg("history"), nb::arg("temperature"), nb::arg("top_k"), nb::arg("top_p"),
          nb::arg("min_p"), nb::arg("repeat_penalty"), nb::arg("repeat_last_n"), nb::arg("seed"), nb::arg("n_draws"),
          nb::arg("mask") = nb::none(),
          "n_draws tokens from the engine's sampler over fixed logits (tests against runtimes.sampling).");

    m.def("sampling_distribution",
          [](F32In logits, const std::vector<int32_t> &history, float temperature, int top_k, float top_p, float min_p,
             float repeat_penalty, int repeat_last_n, std::optional<U32In> mask) {
              std::vector<float> z(logits.data(), logits.data() + logits.shape(0));
              if (mask && mask->shape(0) != (z.size() + 31) / 32) throw nb::value_error("the token mask's length does not fit the logits");
              const uint32_t *m = mask ? mask->data() : nullptr;
              std::vector<int> ids;
              std::vector<double> w;
              {
                  nb::gil_scoped_release release;
                  edgeai::sampling_candidates(z, history, {temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, 0}, m, ids, w);
              }
              std::vector<int32_t> ids32(ids.begin(), ids.end());
              const size_t n = ids32.size();
              return nb::make_tuple(to_numpy(std::move(ids32), {n}), to_numpy(std::move(w), {n}));
          },
          nb::arg("logits"), nb::arg("history"), nb::arg("temperature"), nb::arg("top_k"), nb::arg("top_p"),
          nb::arg("min_p"), nb::arg("repeat_penalty"), nb::arg("repeat_last_n"), nb::arg("mask") = nb::none(),
          "(token ids int32 [k], weights float64 [k]): what the engine's sampler draws from after the whole chain "
          "(mask, penalty, top-k, top-p, min-p, temperature), weights unnormalised; greedy: the arg-max, weight 1.");

    // The streaming store's options as a typed struct: Python (edgeai.runtimes.expert_store) checks
    // the user's options and fills one of these, so no option is parsed from a string here.
    nb::enum_<edgeai::CachePolicy>(m, "CachePolicy", "The streaming store's replacement policy (see expert_store.cpp).")
        .value("NEXT_USE", edgeai::CachePolicy::NEXT_USE)
        .value("LRU", edgeai::CachePolicy::LRU)
        .value("LFU", edgeai::CachePolicy::LFU)
        .value("LAYER", edgeai::CachePolicy::LAYER);
    nb::enum_<edgeai::ReadMethod>(m, "ReadMethod", "How the streaming store reads: io_uring where allowed (AUTO), io_uring or pread.")
        .value("AUTO", edgeai::ReadMethod::AUTO)
        .value("URING", edgeai::ReadMethod::URING)
        .value("PREAD", edgeai::ReadMethod::PREAD);
    nb::class_<edgeai::StreamConfig>(m, "StreamConfig",
                                     "Experts (and, with layer_slots, dense layers) streamed from the file into slots; "
                                     "the fields and their defaults are expert_store.hpp's.")
        .def(nb::init<>())
        .def_rw("slots", &edgeai::StreamConfig::slots)
        .def_rw("layer_slots", &edgeai::StreamConfig::layer_slots)
        .def_rw("policy", &edgeai::StreamConfig::policy)
        .def_rw("io_threads", &edgeai::StreamConfig::io_threads)
        .def_rw("io", &edgeai::StreamConfig::io)
        .def_rw("direct", &edgeai::StreamConfig::direct)
        .def_rw("trace", &edgeai::StreamConfig::trace)
        .def_rw("prefetch", &edgeai::StreamConfig::prefetch)
        .def_rw("prefetch_top", &edgeai::StreamConfig::prefetch_top)
        .def_rw("retries", &edgeai::StreamConfig::retries)
        .def_rw("inject_read_faults", &edgeai::StreamConfig::inject_read_faults);

    nb::class_<edgeai::Model>(m, "Engine", "One model and its sequence slots (KV caches) in the native engine.")
        .def("__init__",
             [](edgeai::Model *self, std::shared_ptr<edgeai::gguf::File> file, const nb::dict &config, int n_ctx, int n_threads,
                const std::string &isa, std::optional<edgeai::StreamConfig> stream, edgeai::KVTypes kv, int n_seq) {
                 edgeai::ModelConfig c = config_from(config);
                 nb::gil_scoped_release release;
                 new (self) edgeai::Model(std::move(file), c, n_ctx, n_threads, isa, stream ? &*stream : nullptr, kv, n_seq);
             },
             nb::arg("file"), nb::arg("config"), nb::arg("n_ctx"), nb::arg("n_threads"), nb::arg("isa") = "",
             nb::arg("stream") = nb::none(), nb::arg("kv_type") = edgeai::KVTypes{}, nb::arg("n_seq") = 1,
             "kv_type: a KVTypes, the keys' and the values' element types (edgeai.native_bridge.kv_types('q8_0/q4_0')). "
             "stream: None (experts read in place from the memory map) or a StreamConfig: experts "
             "streamed into a cache of `slots` experts. n_seq: sequence slots (each its own KV cache of n_ctx "
             "positions, history, logits and sampler); every per-sequence method takes `seq` (default 0).")
        .def("store_stats",
             [](edgeai::Model &self) {
                 Exclusive call(self);
                 nb::dict d = stats_dict(self.experts().stats(), self.experts().slot_bytes());
                 if (edgeai::StreamingStore *ls = self.layer_store())  // dense layers streamed too
                     d["layers"] = stats_dict(ls->stats(), ls->slot_bytes());
                 return d;
             },
             "Counters of the expert store since the last reset_store_stats() (zeros for the memory-mapped "
             "store); with dense layers streamed, the layer store's under 'layers'.")
        .def("reset_store_stats",
             [](edgeai::Model &self) {
                 Exclusive call(self);
                 self.experts().reset_stats();
                 if (edgeai::StreamingStore *ls = self.layer_store()) ls->reset_stats();
             })
        .def("store_trace",
             [](edgeai::Model &self) {
                 Exclusive call(self);
                 return self.experts().trace();
             },
             "Demand accesses (layer * n_expert + expert) in order, when the store traces.")
        .def_prop_ro("resident_bytes", exclusive(&edgeai::Model::resident_bytes))
        .def_prop_ro("scratch_bytes", exclusive(&edgeai::Model::scratch_bytes))
        .def("eval",
             [](edgeai::Model &self, const std::vector<int32_t> &tokens, bool all_logits,
                std::optional<std::vector<uint8_t>> skip_layers, int seq) -> nb::object {
                 Exclusive call(self);
                 std::vector<float> all;
                 {
                     nb::gil_scoped_release release;
                     self.eval(tokens, all_logits ? &all : nullptr, skip_layers ? &*skip_layers : nullptr, seq);
                 }
                 if (!all_logits) return nb::none();
                 const size_t V = self.config().n_vocab;
                 return nb::cast(to_numpy(std::move(all), {tokens.size(), V}));
             },
             nb::arg("tokens"), nb::arg("all_logits") = false, nb::arg("skip_layers") = nb::none(), nb::arg("seq") = 0,
             "Append tokens to the KV cache; with all_logits, return their logits [len(tokens), n_vocab]. "
             "skip_layers: [n_layer] flags of layers not computed (self-speculative drafts; truncate after).")
        .def("step",
             [](edgeai::Model &self, const std::vector<int32_t> &tokens, std::optional<U32In> mask, int seq,
                nb::object mask_fn) {
                 Exclusive call(self);
                 check_mask(self, mask);
                 if (mask && !mask_fn.is_none()) throw nb::value_error("give a mask or a mask_fn, not both");
                 const uint32_t *m = mask ? mask->data() : nullptr;  // the array stays alive: the caller holds it
                 {
                     nb::gil_scoped_release release;
                     self.eval(tokens, nullptr, nullptr, seq);
                 }
                 nb::object r;  // mask_fn's answer, alive until sampled
                 std::optional<U32In> late;
                 if (!mask_fn.is_none()) {
                     r = mask_fn();  // the mask computed while the forward pass ran (GIL held)
                     if (r.is_none()) return -1;
                     try {
                         late = nb::cast<U32In>(r);
                     } catch (const nb::cast_error &) {
                         throw nb::type_error("mask_fn must return None or a contiguous 1-d uint32 array of mask words");
                     }
                     check_mask(self, late);
                     m = late->data();
                 }
                 nb::gil_scoped_release release;
                 return self.sample(m, seq);
             },
             nb::arg("tokens"), nb::arg("mask") = nb::none(), nb::arg("seq") = 0, nb::arg("mask_fn") = nb::none(),
             "Append tokens, then sample the next one (one call per decode step). mask: None, or uint32 words "
             "[ceil(n_vocab / 32)], bit t % 32 of word t / 32 allowing token t (applied before every other sampling stage). "
             "mask_fn: instead of mask, called (with the GIL) once the forward pass is done, for the mask that "
             "another thread computed meanwhile; its None means do not sample: the step returns -1.")
        .def("step_batch",
             [](edgeai::Model &self, const std::vector<int> &seqs, const std::vector<std::vector<int32_t>> &tokens,
                const std::vector<bool> &sample, const std::vector<std::optional<U32In>> &masks) {
                 const size_t n = seqs.size();
                 if (tokens.size() != n || sample.size() != n || masks.size() != n)
                     throw nb::value_error("seqs, tokens, sample and masks must have one entry per sequence");
                 Exclusive call(self);
                 std::vector<edgeai::Model::SeqStep> steps(n);
                 for (size_t i = 0; i < n; ++i) {
                     check_mask(self, masks[i]);
                     steps[i] = {seqs[i], tokens[i], sample[i], masks[i] ? masks[i]->data() : nullptr};
                 }
                 nb::gil_scoped_release release;
                 return self.step(steps);
             },
             nb::arg("seqs"), nb::arg("tokens"), nb::arg("sample"), nb::arg("masks"),
             "One batched step over several slots: tokens[i] appended to slot seqs[i] (one token each: one forward "
             "batch for all; more: evaluated on its own first), then where sample[i] its next token drawn with the "
             "slot's sampler under masks[i] (None or uint32 words). Returns a token per entry (-1: not sampled).")
        .def("evict", exclusive(&edgeai::Model::evict), nb::arg("start"), nb::arg("end"), nb::arg("seq") = 0,
             "Drop KV positions [start, end); later positions move down, their keys re-rotated (no recomputation).")
        .def_prop_ro_static("POOL_WIDTH", [](nb::handle) { return edgeai::Model::kPoolWidth; },
                            "Neighbours a compaction max-pools a position's score over (Model::compact).")
        .def("observe", exclusive(&edgeai::Model::observe), nb::arg("window"),
             "Keep the queries of the last `window` positions of each slot, per layer (compaction scores keys by them).")
        .def_prop_ro("observed", exclusive(&edgeai::Model::observed))
        .def("compact",
             [](edgeai::Model &self, int n, int keep, int sink, int recent, int seq, bool scores) {
                 Exclusive call(self);
                 std::vector<float> sc;
                 std::vector<int32_t> kept;
                 {
                     nb::gil_scoped_release release;
                     kept = self.compact(n, keep, sink, recent, seq, scores ? &sc : nullptr);
                 }
                 const size_t L = self.config().n_layer, H = self.config().n_head_kv;
                 nb::object k = nb::cast(to_numpy(std::move(kept), {L, H, size_t(keep)}));
                 if (!scores) return k;
                 return nb::object(nb::make_tuple(k, to_numpy(std::move(sc), {L, H, size_t(n)})));
             },
             nb::arg("n"), nb::arg("keep"), nb::arg("sink"), nb::arg("recent"), nb::arg("seq") = 0, nb::arg("scores") = false,
             "Keep `keep` of the first n positions per layer and KV head (Model::compact: the first `sink`, the last "
             "`recent`, the best scored by the observed queries between); positions n.. are dropped. Returns the kept "
             "positions int32 [n_layer, n_head_kv, keep]; with scores, also the scores float32 [n_layer, n_head_kv, n].")
        .def("logits",
             [](edgeai::Model &self, int seq) {
                 Exclusive call(self);
                 std::vector<float> v(self.logits(seq));
                 return to_numpy(std::move(v), {v.size()});
             },
             nb::arg("seq") = 0, "Logits [n_vocab] of the last evaluated token (a copy).")
        .def("truncate", exclusive(&edgeai::Model::truncate), nb::arg("n"), nb::arg("seq") = 0, "Keep the first n positions of the KV cache.")
        .def("set_sampling",
             [](edgeai::Model &self, float temperature, int top_k, float top_p, float min_p, float repeat_penalty,
                int repeat_last_n, uint64_t seed, int seq) {
                 Exclusive call(self);
                 self.set_sampling({temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed}, seq);
             },
             nb::arg("temperature"), nb::arg("top_k"), nb::arg("top_p"), nb::arg("min_p"), nb::arg("repeat_penalty"),
             nb::arg("repeat_last_n"), nb::arg("seed"), nb::arg("seq") = 0)
        .def_prop_ro("n_past", [](const edgeai::Model &self) { Exclusive call(self); return self.n_past(); })
        .def("past_of", [](const edgeai::Model &self, int seq) { Exclusive call(self); return self.n_past(seq); }, nb::arg("seq"),
             "Positions slot seq's KV cache holds.")
        .def("history_of", [](const edgeai::Model &self, int seq) { Exclusive call(self); return self.history(seq); }, nb::arg("seq"),
             "Token ids in slot seq's KV cache.")
        .def_prop_ro("n_seq", &edgeai::Model::n_seq)
        .def_prop_ro("n_ctx", &edgeai::Model::n_ctx)
        .def_prop_ro("history", [](const edgeai::Model &self) { Exclusive call(self); return self.history(); })
        .def_prop_ro("isa", [](const edgeai::Model &self) { return std::string(self.isa()); })
        .def_prop_ro("threads", &edgeai::Model::threads)
        .def_prop_ro("weight_bytes", &edgeai::Model::weight_bytes)
        .def_prop_ro("kv_bytes", exclusive(&edgeai::Model::kv_bytes))
        .def_prop_ro("kv_type", [](const edgeai::Model &self) { return edgeai::kv_type_name(self.kv_type()); });
}
