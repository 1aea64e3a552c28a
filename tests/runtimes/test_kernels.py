"""The native kernel sets of this CPU against the numpy reference in quant/ (every type, every
instruction set compiled in that the CPU runs), and against each other."""

from __future__ import annotations

import numpy as np
import pytest

from edgeai import _native
from kernel_cases import make_cases, tolerance

ISAS = _native.kernel_isas()
CASES = make_cases()


def test_this_cpu_gets_its_best_kernels():
    assert "scalar" in ISAS
    assert _native.kernel_best() == ISAS[-1]
    if "avx2" in open("/proc/cpuinfo").read().split():
        assert "avx2" in ISAS


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.fmt}-{c.x.size}")
def test_matvec_matches_numpy_reference(isa, case):
    y = _native.kernel_matvec(isa, case.ggml_type, case.rows, case.x, case.n_rows)
    err = np.abs(y.astype(np.float64) - case.expected)
    assert np.all(err <= case.tolerance), f"{isa} {case.fmt}: error {err.max()} > tolerance {case.tolerance[err.argmax()]}"


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.fmt}-{c.x.size}")
def test_gemm_matches_numpy_reference(isa, case, packed):
    """The prefill/decode kernels (rows x tokens): 27 rows (the case's rows, repeated in other
    orders: three 8-row groups, of which the AVX-512 sets take two at once in 512-bit registers, a
    tile and single rows) and token counts 1 to 9 and 15 to 17 (one token, tile remainders, the
    4-token tiles, and the transposed 8-row paths from 16 tokens on). Tokens are the case's
    activations permuted and rescaled, plus an all-zero one. packed: the first 24 rows through the
    kernel set's load-time layout where it has one (the engine's path), the rest plain."""
    rng = np.random.default_rng(case.x.size)
    order = np.array([0, 1, 2, 3, 4, 5, 3, 1, 4, 0, 5, 2, 2, 5, 1, 4, 2, 0, 3, 5, 5, 0, 2, 4, 1, 3, 3])
    rows = np.ascontiguousarray(case.rows.reshape(case.n_rows, -1)[order]).ravel()
    weights = case.weights[order]
    tokens = [case.x]
    for k in range(16):
        tokens.append(np.zeros_like(case.x) if k == 3 else rng.permutation(case.x) * np.float32(10.0 ** rng.integers(-2, 3)))
    X = np.stack(tokens).astype(np.float32)
    quantized = case.fmt not in ("f32", "f16", "bf16")
    for T in [*range(1, 10), 15, 16, 17]:
        Y = _native.kernel_gemm(isa, case.ggml_type, rows, np.ascontiguousarray(X[:T]), len(order), packed)
        assert Y.shape == (T, len(order))
        for t in range(T):
            expected = weights @ X[t].astype(np.float64)
            err = np.abs(Y[t].astype(np.float64) - expected)
            tol = tolerance(weights, X[t], quantized)
            assert np.all(err <= tol), f"{isa} {case.fmt} T={T} token {t}: error {err.max()} > tolerance {tol[err.argmax()]}"


X86_SETS = [i for i in ISAS if i in ("avx2", "avx512", "avx-vnni", "avx512-vnni")]


@pytest.mark.skipif(len(X86_SETS) < 2, reason="this CPU runs fewer than two x86 kernel sets")
@pytest.mark.parametrize("case", [c for c in CASES if c.fmt not in ("f32", "f16", "bf16")], ids=lambda c: f"{c.fmt}-{c.x.size}")
def test_x86_sets_compute_the_same_bits_on_this_cpu(case):
    """The x86 sets are one source (256-bit VEX, EVEX, VNNI, and 512-bit registers for two 8-row groups
    in the AVX-512 sets): on real hardware too they give bit-identical prefill and decode results."""
    rows = np.ascontiguousarray(np.concatenate([case.rows.reshape(case.n_rows, -1)] * 3)[:27]).ravel()
    X = np.stack([np.roll(case.x, k) * np.float32(1 + k) for k in range(9)]).astype(np.float32)
    for T in (1, 4, 9):
        for packed in (False, True):
            got = {isa: _native.kernel_gemm(isa, case.ggml_type, rows, np.ascontiguousarray(X[:T]), 27, packed).tobytes()
                   for isa in X86_SETS}
            assert len(set(got.values())) == 1, f"{case.fmt} T={T} packed={packed}: sets differ"


@pytest.mark.parametrize("case", [c for c in CASES if c.fmt in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")], ids=lambda c: f"{c.fmt}-{c.x.size}")
def test_packed_rows_read_back_exactly(case):
    """A row read back from the packed layout (the embedding of a tied, packed output matrix) is
    the row that was packed, in every position of two 8-row groups, in every set that packs."""
    rows = np.ascontiguousarray(np.concatenate([case.rows.reshape(case.n_rows, -1)[[0, 3, 5, 2, 4, 1, 3, 0]]] * 2)[::-1]).ravel()
    packing = []
    for isa in ISAS:
        back = _native.kernel_packed_rows(isa, case.ggml_type, rows, 16, case.x.size)
        if back is not None:  # None: this set keeps the type's rows plain
            packing.append(isa)
            assert back == rows.tobytes(), isa
    assert ("avx2" in packing) == ("avx2" in ISAS)


@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantizer_is_identical_across_isas(isa):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(32 * 40).astype(np.float32) * 10
    x[:32] = 0
    x[40:45] = 1e5
    x[100] = 0.5 * 127 / 127  # exact halves land on round-half-even
    ref = _native.kernel_quantize_act("scalar", x)
    got = _native.kernel_quantize_act(isa, x)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
    d, _, q = got
    # dequantized activations within half a step of the input
    assert np.all(np.abs(np.repeat(d, 32) * q - x) <= np.repeat(d, 32) / 2 * 1.0001 + 1e-30)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 64, 100, 128])
def test_f16_attention_kernels(isa, n):
    rng = np.random.default_rng(n)
    v = (rng.standard_normal(n) * 4).astype(np.float16)
    x = rng.standard_normal(n).astype(np.float32)
    dot, y = _native.kernel_kv(isa, _native.KVType.F16, v.view(np.uint8), x, 0.75)
    exact = v.astype(np.float64) @ x
    assert abs(dot - exact) <= 1e-5 * (np.abs(v.astype(np.float64)) @ np.abs(x)) + 1e-6
    np.testing.assert_allclose(y, x + 0.75 * v.astype(np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [32, 64, 128])
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_kv_cache_kernels(isa, n, kind):
    """Keys . float query and y += alpha * values over Q8_0 or Q4_0 blocks (the q8_0 and q4_0 KV
    caches), against numpy's decoding of the blocks."""
    from edgeai.quant.formats import FORMATS, dequantize, quantize

    rng = np.random.default_rng(n)
    values = (rng.standard_normal(n) * np.repeat(rng.uniform(0.01, 50, n // 32), 32)).astype(np.float32)
    v = quantize(values, FORMATS[kind])
    decoded = dequantize(v, FORMATS[kind]).astype(np.float64)
    x = rng.standard_normal(n).astype(np.float32)
    dot, y = _native.kernel_kv(isa, _native.KVType[kind.upper()], v, x, -0.625)
    assert abs(dot - decoded @ x) <= 1e-5 * (np.abs(decoded) @ np.abs(x)) + 1e-6
    np.testing.assert_allclose(y, x - 0.625 * decoded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hd", [64, 128, 40, 256])
def test_batched_attention_kernels(hd):
    """Sets with batched f16 attention kernels (x86): scores agree with the float64 dot products and
    give a key the same score whatever its neighbours (every key count from 1 to 19: groups of 8 and
    tails); the weighted sum of values is bit for bit the axpy loop it replaces; the x86 sets agree."""
    rng = np.random.default_rng(hd)
    keys = (rng.standard_normal((19, hd)) * 3).astype(np.float16)
    values = rng.standard_normal((19, hd)).astype(np.float16)
    q = rng.standard_normal(hd).astype(np.float32)
    p = rng.dirichlet(np.ones(19)).astype(np.float32)
    expected = keys.astype(np.float64) @ q.astype(np.float64)
    bound = 1e-6 * (np.abs(keys.astype(np.float64)) @ np.abs(q.astype(np.float64)))  # float32 sums of hd terms
    raw = lambda a: np.ascontiguousarray(a).view(np.uint8).ravel()  # noqa: E731
    found = {}
    for isa in ISAS:
        got = _native.kernel_attention_f16(isa, raw(keys), raw(values), q, p)
        if got is None:
            continue
        scores, out = got[0][0], got[1][0]
        assert np.all(np.abs(scores - expected) <= bound), f"{isa}: {np.abs(scores - expected).max()}"
        for n in range(1, 19):
            part, _ = _native.kernel_attention_f16(isa, raw(keys[19 - n:]), raw(values[19 - n:]), q, p[19 - n:])
            assert part[0].tobytes() == scores[19 - n:].tobytes(), f"{isa}: {n} keys"
        # the query heads of a KV head computed together (1 to 7: groups of 3, 2 and 1): each head's
        # scores and output are the bits it gets alone
        qs = rng.standard_normal((7, hd)).astype(np.float32)
        ps = rng.dirichlet(np.ones(19), 7).astype(np.float32)
        alone = [_native.kernel_attention_f16(isa, raw(keys), raw(values), qs[h], ps[h]) for h in range(7)]
        for heads in range(1, 8):
            s_h, o_h = _native.kernel_attention_f16(isa, raw(keys), raw(values), qs[:heads].ravel(), ps[:heads].ravel(), heads)
            for h in range(heads):
                assert s_h[h].tobytes() == alone[h][0][0].tobytes() and o_h[h].tobytes() == alone[h][1][0].tobytes(), \
                    f"{isa}: head {h} of {heads}"
        axpy = np.zeros(hd, np.float32)
        for j in range(19):
            axpy = _native.kernel_kv(isa, _native.KVType.F16, raw(values[j]), axpy, float(p[j]))[1]
        assert out.tobytes() == axpy.tobytes(), isa
        found[isa] = scores.tobytes() + out.tobytes()
    assert ("avx2" in ISAS) <= bool(found)
    assert len(set(found.values())) <= 1


def test_vector_swiglu():
    """Sets with a vector SwiGLU (x86) against float64 silu(g) * u, over the range activations take and
    past the exponential's (very negative gates give -0, large ones g * u), every length's tail."""
    rng = np.random.default_rng(0)
    g = np.concatenate([rng.standard_normal(200) * 4, [0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0, -88.0, 100.0,
                                                          -100.0, 1e4, -1e4, 3.4e38, -3.4e38]]).astype(np.float32)
    u = rng.standard_normal(g.size).astype(np.float32)
    g64 = g.astype(np.float64)
    with np.errstate(over="ignore"):
        expected = g64 / (1.0 + np.exp(-g64)) * u.astype(np.float64)
    found = {}
    for isa in ISAS:
        got = _native.kernel_silu_mul(isa, g, u)
        if got is None:
            continue
        assert np.all(np.isfinite(got)), isa
        err = np.abs(got - expected)
        assert np.all(err <= 1e-6 * np.abs(expected) + 1e-30), f"{isa}: {err.max()} at {g[err.argmax()]}"
        for n in (1, 7, 9, 15):  # tails shorter than a vector
            assert _native.kernel_silu_mul(isa, g[:n], u[:n]).tobytes() == got[:n].tobytes(), (isa, n)
        found[isa] = got.tobytes()
    assert ("avx2" in ISAS) <= bool(found)
    assert len(set(found.values())) <= 1


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("isa", ISAS)
def test_batches_below_16_tokens_give_the_one_token_results_bit_for_bit(isa, packed):
    """Speculative verification (edgeai/speculative.py, at most 15 tokens a batch) is exact only if
    every token of a batch gets the bits the one-token decode kernel gives it, for every type."""
    order = np.array([0, 1, 2, 3, 4, 5, 3, 1, 4, 0, 5, 2, 2, 5, 1, 4, 2, 0, 3, 5, 5, 0, 2, 4, 1, 3, 3])  # as above
    for case in CASES:
        rng = np.random.default_rng(case.x.size)
        rows = np.ascontiguousarray(case.rows.reshape(case.n_rows, -1)[order]).ravel()
        X = np.stack([case.x] + [rng.permutation(case.x) * np.float32(10.0 ** rng.integers(-2, 3)) for _ in range(14)])
        X = X.astype(np.float32)
        single = [_native.kernel_gemm(isa, case.ggml_type, rows, np.ascontiguousarray(X[t:t + 1]), len(order),
                                      packed)[0] for t in range(len(X))]
        for T in range(2, len(X) + 1):
            Y = _native.kernel_gemm(isa, case.ggml_type, rows, np.ascontiguousarray(X[:T]), len(order), packed)
            for t in range(T):
                assert Y[t].tobytes() == single[t].tobytes(), f"{isa} {case.fmt} T={T} token {t}"
