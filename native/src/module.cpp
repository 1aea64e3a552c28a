// edgeai._native: the Python face of the C++ core. Thin: shape checks, then one call with the
// GIL released. Python code imports it through edgeai.native_bridge, never directly.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include "blocks.hpp"
#include "parallel.hpp"
#include "quant.hpp"

namespace nb = nanobind;

void bind_runtime(nb::module_ &m);  // module_runtime.cpp

namespace {

using F32In = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U8In = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U8Out = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U16Out = nb::ndarray<uint16_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using F32Out = nb::ndarray<float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using F32Rows = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

void check_len(const char *what, size_t got, size_t want) {
    if (got != want) {
        throw nb::value_error((std::string(what) + ": expected " + std::to_string(want) +
                               " elements, got " + std::to_string(got)).c_str());
    }
}

size_t whole_blocks(size_t n, size_t block) {
    if (n % block != 0) {
        throw nb::value_error(("length " + std::to_string(n) + " is not a multiple of the block size " +
                               std::to_string(block)).c_str());
    }
    return n / block;
}

}  // namespace

NB_MODULE(_native, m) {
    m.doc() = "edgeai native core: block quantizers and element conversions";
    {
        const uint16_t probe = 1;
        if (*reinterpret_cast<const uint8_t *>(&probe) != 1) {
            throw std::runtime_error("edgeai._native supports little-endian hosts only (GGUF is little-endian)");
        }
    }

    m.def("default_threads", &edgeai::default_threads, "Hardware threads available (at least 1).");

    m.def("quantize_q8_0",
          [](F32In src, U8Out dst, int n_threads) {
              const size_t n_blocks = whole_blocks(src.shape(0), edgeai::QK8_0);
              check_len("dst", dst.shape(0), n_blocks * edgeai::Q8_0_BLOCK_BYTES);
              nb::gil_scoped_release release;
              edgeai::quantize_q8_0(src.data(), dst.data(), n_blocks, n_threads);
          },
          nb::arg("src"), nb::arg("dst"), nb::arg("n_threads") = 0,
          "Quantize float32 `src` (a multiple of 32 long) into Q8_0 blocks in `dst` (34 bytes a block).");

    m.def("dequantize_q8_0",
          [](U8In src, F32Out dst, int n_threads) {
              const size_t n_blocks = whole_blocks(src.shape(0), edgeai::Q8_0_BLOCK_BYTES);
              check_len("dst", dst.shape(0), n_blocks * edgeai::QK8_0);
              nb::gil_scoped_release release;
              edgeai::dequantize_q8_0(src.data(), dst.data(), n_blocks, n_threads);
          },
          nb::arg("src"), nb::arg("dst"), nb::arg("n_threads") = 0,
          "Decode Q8_0 blocks in `src` into float32 `dst`.");

    nb::enum_<edgeai::BlockType>(m, "BlockType", "Block formats of the C++ quantizer.")
        .value("Q4_0", edgeai::BlockType::Q4_0)
        .value("Q4_1", edgeai::BlockType::Q4_1)
        .value("Q5_0", edgeai::BlockType::Q5_0)
        .value("Q5_1", edgeai::BlockType::Q5_1)
        .value("Q4_K", edgeai::BlockType::Q4_K)
        .value("Q5_K", edgeai::BlockType::Q5_K)
        .value("Q6_K", edgeai::BlockType::Q6_K)
        // --- quant3: non-uniform 4-bit grids ---
        .value("IQ4_NL", edgeai::BlockType::IQ4_NL)
        .value("IQ4_XS", edgeai::BlockType::IQ4_XS);
        // --- end quant3 ---
    nb::enum_<edgeai::Fit>(m, "Fit", "How codes and scales are chosen.")
        .value("RTN", edgeai::Fit::RTN)
        .value("SEARCH", edgeai::Fit::SEARCH);

    m.def("quantize_rows",
          [](edgeai::BlockType type, edgeai::Fit fit, F32Rows src, U8Out dst, std::optional<F32In> importance,
             int n_threads) {
              const auto info = edgeai::block_info(type);
              const size_t n_rows = src.shape(0), n_per_row = src.shape(1);
              whole_blocks(n_per_row, static_cast<size_t>(info.block_size));
              check_len("dst", dst.shape(0), n_rows * n_per_row / info.block_size * info.type_size);
              const float *imp = nullptr;
              if (importance) {
                  check_len("importance", importance->shape(0), n_per_row);
                  imp = importance->data();
              }
              nb::gil_scoped_release release;
              edgeai::quantize_rows(type, fit, src.data(), dst.data(), n_rows, n_per_row, imp, n_threads);
          },
          nb::arg("type"), nb::arg("fit"), nb::arg("src"), nb::arg("dst"), nb::arg("importance").none() = nb::none(),
          nb::arg("n_threads") = 0,
          "Quantize the rows of float32 `src` [n_rows, n_per_row] into `dst`; `importance` weighs each column's "
          "squared error (Fit.SEARCH only).");

    m.def("dequantize",
          [](edgeai::BlockType type, U8In src, F32Out dst, int n_threads) {
              const auto info = edgeai::block_info(type);
              const size_t n_blocks = whole_blocks(src.shape(0), static_cast<size_t>(info.type_size));
              check_len("dst", dst.shape(0), n_blocks * info.block_size);
              nb::gil_scoped_release release;
              edgeai::dequantize(type, src.data(), dst.data(), dst.shape(0), n_threads);
          },
          nb::arg("type"), nb::arg("src"), nb::arg("dst"), nb::arg("n_threads") = 0, "Decode blocks into float32.");

    m.def("fp32_to_fp16",
          [](F32In src, U16Out dst, int n_threads) {
              check_len("dst", dst.shape(0), src.shape(0));
              nb::gil_scoped_release release;
              edgeai::convert_fp32_to_fp16(src.data(), dst.data(), src.shape(0), n_threads);
          },
          nb::arg("src"), nb::arg("dst"), nb::arg("n_threads") = 0,
          "float32 -> IEEE half bit patterns, round to nearest even.");

    m.def("fp32_to_bf16",
          [](F32In src, U16Out dst, int n_threads) {
              check_len("dst", dst.shape(0), src.shape(0));
              nb::gil_scoped_release release;
              edgeai::convert_fp32_to_bf16(src.data(), dst.data(), src.shape(0), n_threads);
          },
          nb::arg("src"), nb::arg("dst"), nb::arg("n_threads") = 0,
          "float32 -> bfloat16 bit patterns, round to nearest even.");

    bind_runtime(m);
}
