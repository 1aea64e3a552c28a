"""Recipes: which type each tensor gets, every preset's file running in llama.cpp, calibrated methods."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader

import edgeai
from edgeai.errors import OptionError
from edgeai.quant.recipes import RECIPES, Layers, Recipe, Rule, get_recipe, tensor_type, validate
from helpers import TINY_ARCHS, corpus, llama_cpp_greedy, llama_cpp_logits, llama_cpp_model, make_tiny_checkpoint

ARCHS = {a.name: a for a in TINY_ARCHS}
# rows of 256 so that K-quants apply (the tiny default of 64 would fall back everywhere)
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "llama", ARCHS["smollm"], **WIDE,
                                num_hidden_layers=8)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(corpus()[:300]), encoding="utf-8")
    return path


def _types(path):
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def test_q4_k_m_rules():
    shape = (256, 256)
    q4km = RECIPES["q4_k_m"]
    # 8 blocks: the first and last eighth and every third in between get Q6_K
    v_types = [tensor_type(f"blk.{i}.attn_v.weight", shape, q4km, n_blocks=8).fmt.name for i in range(8)]
    assert v_types == ["q6_k", "q4_k", "q4_k", "q6_k", "q4_k", "q4_k", "q6_k", "q6_k"]
    assert tensor_type("blk.3.attn_q.weight", shape, q4km, n_blocks=8).fmt.name == "q4_k"
    assert tensor_type("output.weight", shape, q4km, n_blocks=8).fmt.name == "q6_k"
    # the embedding is Q6_K only when it doubles as the output matrix (tied)
    assert tensor_type("token_embd.weight", shape, q4km, n_blocks=8, has_output=True).fmt.name == "q4_k"
    assert tensor_type("token_embd.weight", shape, q4km, n_blocks=8, has_output=False).fmt.name == "q6_k"
    # attention in an MoE model is a sliver of the weights: Q8_0
    assert tensor_type("blk.0.attn_q.weight", shape, q4km, n_blocks=8, has_experts=True).fmt.name == "q8_0"
    assert tensor_type("blk.0.ffn_gate_inp.weight", shape, q4km, n_blocks=8, has_experts=True).fmt.name == "f32"


def test_fallback_for_rows_that_do_not_fill_blocks():
    q4km = RECIPES["q4_k_m"]
    choice = tensor_type("blk.1.attn_q.weight", (576, 576), q4km, n_blocks=8)
    assert choice.fmt.name == "q5_0" and "576 is not a multiple of 256" in choice.fallback
    assert tensor_type("blk.0.attn_v.weight", (192, 576), q4km, n_blocks=8).fmt.name == "q8_0"  # q6_k -> q8_0
    assert tensor_type("blk.0.ffn_down.weight", (576, 48), RECIPES["q4_0"], n_blocks=8).fmt.name == "f16"
    assert tensor_type("blk.0.ffn_down.weight", (576, 1536), q4km, n_blocks=8).fmt.name == "q6_k"


def test_bad_recipes_are_refused():
    with pytest.raises(OptionError, match="unknown recipe 'q3_xx'; presets: .*q4_k_m"):
        get_recipe("q3_xx")
    with pytest.raises(OptionError, match="unknown type 'q7_k'"):
        validate(Recipe("mine", "q4_k", (Rule("ffn_down.weight", "q7_k"),)))
    with pytest.raises(OptionError, match="rule 'ffn_middle.weight' matches no tensor class"):
        validate(Recipe("mine", "q4_k", (Rule("ffn_middle.weight", "q6_k", Layers.ALL),)))


@pytest.mark.parametrize("name", [n for n in RECIPES if n not in ("f32", "bf16")])
def test_every_preset_loads_and_generates_in_llama_cpp(name, wide_llama, tmp_path):
    out = edgeai.convert(wide_llama, tmp_path / f"{name}.gguf", quant=name)
    llm = llama_cpp_model(out, n_ctx=64)
    assert len(llama_cpp_greedy(llm, list(range(3, 30)), 8)) == 8
    types = _types(out)
    recipe = json.loads(GGUFReader(out).fields["edgeai.recipe"].contents())
    assert recipe["recipe"] == name and recipe["tensor_types"]["blk.0.attn_q.weight"] == types["blk.0.attn_q.weight"].lower()
    default = RECIPES[name].default
    assert types["blk.2.attn_q.weight"].lower() == default  # rows of 256 fit every block type


def test_quantized_logits_stay_close_in_llama_cpp(wide_llama, tmp_path):
    """More bits, less error (q8_0 < q6_k < q5_k_m < q4_k_m; q4_0 above q5_k_m), measured by llama.cpp;
    IQ4_NL's grid below Q4_0's at the same size (llama.cpp reads our IQ4 blocks as we mean them).
    A random 8-layer model amplifies weight noise, so only the order is meaningful here."""
    tokens = list(range(3, 60))
    ref = llama_cpp_logits(llama_cpp_model(edgeai.convert(wide_llama, tmp_path / "f32.gguf", outtype="f32")), tokens)
    errors = {}
    for name in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_nl", "iq4_xs"):
        out = edgeai.convert(wide_llama, tmp_path / f"{name}.gguf", quant=name)
        errors[name] = float(np.sqrt(np.mean((llama_cpp_logits(llama_cpp_model(out), tokens) - ref) ** 2)))
    ordered = [errors[n] for n in ("q8_0", "q6_k", "q5_k_m", "q4_k_m")]
    assert ordered == sorted(ordered), errors
    assert errors["q4_0"] > errors["q5_k_m"], errors
    assert errors["q5_k_m"] < errors["iq4_xs"] and errors["iq4_nl"] < errors["q4_0"], errors


def _layer_output_error(plan, stats_rows, name, raw, fmt):
    """Mean squared error of W x over calibration inputs x, for the quantized weight."""
    from edgeai.quant.formats import dequantize

    w = plan.read(name)
    wq = dequantize(raw, fmt).reshape(w.shape)
    x = stats_rows
    return float(np.mean((x @ (wq - w).T) ** 2))


def test_imatrix_lowers_layer_output_error(wide_llama, calib_file):
    """Weighting the scale search by activation importance lowers the error of W x on real inputs."""
    from edgeai.converters.plan import open_plan
    from edgeai.quant.calibrate import collect_statistics
    from edgeai.quant.formats import FORMATS, Fit, quantize
    from edgeai.quant.forward import RowRecorder

    plan = open_plan(wide_llama, "f32")
    try:
        names = ["blk.3.ffn_down.weight", "blk.5.attn_q.weight", "blk.1.ffn_gate.weight"]
        recorder = RowRecorder(names, max_rows=4096)
        stats = collect_statistics(plan, calib_file.read_text(), n_ctx=128, max_tokens=4096, observers=[recorder])
        for name in names:
            rows = recorder.rows(name)
            fmt = FORMATS["q4_k"]
            w = plan.read(name)
            plain = _layer_output_error(plan, rows, name, quantize(w, fmt, fit=Fit.SEARCH), fmt)
            weighted = _layer_output_error(plan, rows, name, quantize(w, fmt, fit=Fit.SEARCH, importance=stats.importance(name)), fmt)
            assert weighted < plain, (name, weighted, plain)
    finally:
        plan.close()


def test_imatrix_conversion_records_calibration(wide_llama, calib_file, tmp_path):
    out = edgeai.convert(wide_llama, tmp_path / "im.gguf", quant="q4_k_m", method="imatrix", calib=calib_file,
                         calib_ctx=128)
    recipe = json.loads(GGUFReader(out).fields["edgeai.recipe"].contents())
    import hashlib

    assert recipe["method"] == "imatrix"
    assert recipe["calibration"]["text_sha256"] == hashlib.sha256(calib_file.read_text().encode()).hexdigest()
    assert recipe["calibration"]["file"] == "calib.txt" and recipe["calibration"]["n_ctx"] == 128
    assert len(llama_cpp_greedy(llama_cpp_model(out, n_ctx=64), list(range(3, 30)), 4)) == 4


def test_calibration_options_checked(wide_llama, calib_file, tmp_path):
    with pytest.raises(OptionError, match="--method imatrix needs a calibration text"):
        edgeai.convert(wide_llama, tmp_path / "a.gguf", quant="q4_0", method="imatrix")
    with pytest.raises(OptionError, match="--method rtn ignores it"):
        edgeai.convert(wide_llama, tmp_path / "a.gguf", quant="q4_0", calib=calib_file)
    with pytest.raises(OptionError, match="calibration text .*nowhere.txt does not exist"):
        edgeai.convert(wide_llama, tmp_path / "a.gguf", quant="q4_0", method="imatrix", calib=tmp_path / "nowhere.txt")
    with pytest.raises(OptionError, match="either --outtype .* or --quant"):
        edgeai.convert(wide_llama, tmp_path / "a.gguf", outtype="f16", quant="q4_0")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    from edgeai.errors import CalibrationError

    with pytest.raises(CalibrationError, match="tokens long"):
        edgeai.convert(wide_llama, tmp_path / "a.gguf", quant="q4_0", method="imatrix", calib=short)
    assert not (tmp_path / "a.gguf").exists()


def test_imatrix_is_skipped_when_no_type_uses_it(wide_llama, calib_file, tmp_path):
    """Q8_0 ignores importance (as llama.cpp's does): no calibration pass, the same bytes as RTN."""
    import time

    start = time.perf_counter()
    out = edgeai.convert(wide_llama, tmp_path / "im.gguf", quant="q8_0", method="imatrix", calib=calib_file,
                         calib_ctx=128, threads=1)
    took = time.perf_counter() - start
    rtn = edgeai.convert(wide_llama, tmp_path / "rtn.gguf", quant="q8_0", threads=1)
    recipe = json.loads(GGUFReader(out).fields["edgeai.recipe"].contents())
    assert recipe["method"] == "imatrix" and "skipped" in recipe["calibration"]
    a, b = ({t.name: bytes(t.data) for t in GGUFReader(p).tensors} for p in (out, rtn))
    assert a == b
    assert took < 10, took  # the calibration pass of this model alone takes longer
