// The portable kernel set: plain C++, the reference every SIMD set is tested against.
#include "kernels_common.hpp"

namespace edgeai::kern {
namespace {

template <int W> float dot_q(const uint8_t *row, const void *x, size_t n) {
    return dot_q_ref(W, row, static_cast<const BlockQ8A *>(x), n);
}

float dot_f32(const uint8_t *row, const void *xv, size_t n) {
    const float *w = reinterpret_cast<const float *>(row), *x = static_cast<const float *>(xv);
    float acc[4] = {0, 0, 0, 0};
    size_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int k = 0; k < 4; ++k) acc[k] += w[i + k] * x[i + k];
    for (; i < n; ++i) acc[0] += w[i] * x[i];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

float dot_f16_ref(const uint16_t *w, const float *x, size_t n) {
    float acc[4] = {0, 0, 0, 0};
    size_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int k = 0; k < 4; ++k) acc[k] += f16(w[i + k]) * x[i + k];
    for (; i < n; ++i) acc[0] += f16(w[i]) * x[i];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

float dot_f16_row(const uint8_t *row, const void *x, size_t n) {
    return dot_f16_ref(reinterpret_cast<const uint16_t *>(row), static_cast<const float *>(x), n);
}

float dot_bf16(const uint8_t *row, const void *xv, size_t n) {
    const uint16_t *w = reinterpret_cast<const uint16_t *>(row);
    const float *x = static_cast<const float *>(xv);
    float acc = 0.0f;
    for (size_t i = 0; i < n; ++i) acc += bf16(w[i]) * x[i];
    return acc;
}

void axpy_f16_ref(float alpha, const uint16_t *v, float *y, size_t n) {
    for (size_t i = 0; i < n; ++i) y[i] += alpha * f16(v[i]);
}

float dot_q8_0_f32_ref(const uint8_t *k, const float *x, size_t n) {
    float acc = 0.0f;
    for (size_t b = 0; b < n / 32; ++b, k += 34, x += 32) {
        uint16_t dh;
        std::memcpy(&dh, k, 2);
        const int8_t *q = reinterpret_cast<const int8_t *>(k + 2);
        float s = 0.0f;
        for (int i = 0; i < 32; ++i) s += static_cast<float>(q[i]) * x[i];
        acc += f16(dh) * s;
    }
    return acc;
}

void axpy_q8_0_ref(float alpha, const uint8_t *v, float *y, size_t n) {
    for (size_t b = 0; b < n / 32; ++b, v += 34, y += 32) {
        uint16_t dh;
        std::memcpy(&dh, v, 2);
        const float a = alpha * f16(dh);
        const int8_t *q = reinterpret_cast<const int8_t *>(v + 2);
        for (int i = 0; i < 32; ++i) y[i] += a * static_cast<float>(q[i]);
    }
}

float dot_q4_0_f32_ref(const uint8_t *k, const float *x, size_t n) {
    float acc = 0.0f;
    for (size_t b = 0; b < n / 32; ++b, k += 18, x += 32) {
        const uint8_t *q = k + 2;
        float s = 0.0f;
        for (int i = 0; i < 16; ++i)
            s += static_cast<float>((q[i] & 15) - 8) * x[i] + static_cast<float>((q[i] >> 4) - 8) * x[i + 16];
        acc += f16_at(k) * s;
    }
    return acc;
}

void axpy_q4_0_ref(float alpha, const uint8_t *v, float *y, size_t n) {
    for (size_t b = 0; b < n / 32; ++b, v += 18, y += 32) {
        const float a = alpha * f16_at(v);
        const uint8_t *q = v + 2;
        for (int i = 0; i < 16; ++i) {
            y[i] += a * static_cast<float>((q[i] & 15) - 8);
            y[i + 16] += a * static_cast<float>((q[i] >> 4) - 8);
        }
    }
}

const Ops OPS = {
    "scalar",
    {dot_f32, dot_f16_row, dot_bf16, dot_q<W_Q4_0>, dot_q<W_Q4_1>, dot_q<W_Q5_0>, dot_q<W_Q5_1>, dot_q<W_Q8_0>,
     dot_q<W_Q4_K>, dot_q<W_Q5_K>, dot_q<W_Q6_K>, dot_q<W_MXFP4>},
    {gemm_by_dot<dot_f32>, gemm_by_dot<dot_f16_row>, gemm_by_dot<dot_bf16>, gemm_by_dot<dot_q<W_Q4_0>>,
     gemm_by_dot<dot_q<W_Q4_1>>, gemm_by_dot<dot_q<W_Q5_0>>, gemm_by_dot<dot_q<W_Q5_1>>, gemm_by_dot<dot_q<W_Q8_0>>,
     gemm_by_dot<dot_q<W_Q4_K>>, gemm_by_dot<dot_q<W_Q5_K>>, gemm_by_dot<dot_q<W_Q6_K>>, gemm_by_dot<dot_q<W_MXFP4>>},
    quantize_act_ref,
    dot_f16_ref,
    axpy_f16_ref,
    dot_q8_0_f32_ref,
    axpy_q8_0_ref,
    dot_q4_0_f32_ref,
    axpy_q4_0_ref,
};

}  // namespace

const Ops *ops_scalar() { return &OPS; }

}  // namespace edgeai::kern
