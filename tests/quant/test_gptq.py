"""GPTQ: lower layer-output error than RTN and imatrix search, written as ordinary block types."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader

import edgeai
from edgeai.quant.formats import FORMATS, Fit, dequantize, quantize
from edgeai.quant.gptq import gptq_encode
from helpers import TINY_ARCHS, corpus, llama_cpp_greedy, llama_cpp_model, make_tiny_checkpoint

ARCHS = {a.name: a for a in TINY_ARCHS}
WIDE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4)


def _output_error(raw, fmt, w, x):
    return float(np.mean(((dequantize(raw, fmt).reshape(w.shape) - w) @ x.T) ** 2))


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q4_k", "q5_k", "q6_k", "q8_0"])
def test_gptq_beats_rtn_and_imatrix_on_correlated_inputs(name):
    rng = np.random.default_rng(0)
    n_in, n_out = 512, 128
    mix = rng.standard_normal((n_in, n_in)) * 0.1 + np.eye(n_in)
    x = (rng.standard_normal((2048, n_in)) @ mix * rng.uniform(0.2, 3, n_in)).astype(np.float32)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    fmt = FORMATS[name]
    h = x.T.astype(np.float64) @ x
    rtn = _output_error(quantize(w, fmt, fit=Fit.RTN), fmt, w, x)
    imatrix = _output_error(quantize(w, fmt, fit=Fit.SEARCH, importance=np.diag(h).astype(np.float32)), fmt, w, x)
    gptq = _output_error(gptq_encode(w, h, fmt), fmt, w, x)
    assert gptq < 0.8 * imatrix < 0.8 * rtn or gptq < 0.8 * min(rtn, imatrix), (rtn, imatrix, gptq)


def test_gptq_handles_dead_columns_and_singular_hessians():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[:, 10:20] = 0.0  # inputs that never fire
    x[:, 30] = x[:, 31]  # and a duplicated input: X^T X is singular
    w = rng.standard_normal((32, 256)).astype(np.float32)
    raw = gptq_encode(w, x.T.astype(np.float64) @ x, FORMATS["q4_k"])
    assert np.isfinite(dequantize(raw, FORMATS["q4_k"])).all()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    calib = root / "calib.txt"
    calib.write_text("\n".join(corpus()[:300]), encoding="utf-8")
    return make_tiny_checkpoint(root / "llama", ARCHS["smollm"], **WIDE), calib


def test_gptq_lowers_layer_output_error_on_a_tiny_model(wide):
    """On real calibration activations of a model, GPTQ's W x error is below RTN's, layer by layer."""
    from edgeai.converters.plan import open_plan
    from edgeai.quant.calibrate import collect_statistics
    from edgeai.quant.forward import RowRecorder

    folder, calib = wide
    plan = open_plan(folder, "f32")
    try:
        names = ["blk.1.attn_q.weight", "blk.2.ffn_down.weight", "blk.3.ffn_up.weight"]
        recorder = RowRecorder(names)
        collect_statistics(plan, calib.read_text(), n_ctx=128, max_tokens=2048, observers=[recorder])
        fmt = FORMATS["q4_k"]
        for name in names:
            w, x = plan.read(name), recorder.rows(name)
            rtn = _output_error(quantize(w, fmt, fit=Fit.RTN), fmt, w, x)
            gptq = _output_error(gptq_encode(w, x.T.astype(np.float64) @ x, fmt), fmt, w, x)
            assert gptq < rtn, (name, gptq, rtn)
    finally:
        plan.close()


@pytest.mark.parametrize("arch", ["smollm", "qwen2_moe"])
def test_gptq_file_runs_in_llama_cpp(arch, wide, tmp_path):
    _, calib = wide
    folder = make_tiny_checkpoint(tmp_path / arch, ARCHS[arch], **(WIDE if arch == "smollm" else {}))
    out = edgeai.convert(folder, tmp_path / "g.gguf", quant="q4_k_m", method="gptq", calib=calib, calib_ctx=128)
    recipe = json.loads(GGUFReader(out).fields["edgeai.recipe"].contents())
    assert recipe["method"] == "gptq" and recipe["calibration"]["n_ctx"] == 128
    assert len(llama_cpp_greedy(llama_cpp_model(out, n_ctx=64), list(range(3, 30)), 8)) == 8


def test_gptq_refuses_iq4_types(tmp_path):
    from edgeai.errors import OptionError

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(corpus()[:60]), encoding="utf-8")
    folder = make_tiny_checkpoint(tmp_path / "m", ARCHS["smollm"])
    with pytest.raises(OptionError, match="--method gptq does not write iq4_nl"):
        edgeai.convert(folder, tmp_path / "g.gguf", quant="iq4_nl", method="gptq", calib=calib, calib_ctx=64)
    with pytest.raises(OptionError, match="leave them out of --target-types"):
        edgeai.convert(folder, tmp_path / "g.gguf", target_bpw=5.0, target_types=["q4_0", "iq4_xs"], method="gptq",
                       calib=calib)
    assert not (tmp_path / "g.gguf").exists()
    # without --target-types, a size target under GPTQ picks among the types it can write
    out = edgeai.convert(folder, tmp_path / "t.gguf", target_bpw=6.0, method="gptq", calib=calib, calib_ctx=64,
                         threads=1)
    types = set(json.loads(GGUFReader(out).fields["edgeai.recipe"].contents())["tensor_types"].values())
    assert not types & {"iq4_nl", "iq4_xs"}, types
