"""benchmarks/expert_streaming.py's model writer: the gpt-oss shape with its sizes shrunk (layers,
widths; 32 experts, 4 used and the rest as the benchmark writes them) is a file llama.cpp loads and
computes as our engine does, with MXFP4 experts of the scale the generator aims at."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import expert_streaming as es  # noqa: E402

TINY = dataclasses.replace(es.SHAPES["gpt-oss"], n_embd=128, n_ff_exp=128, n_layer=4, n_head=4, n_head_kv=2,
                           extra={**es.SHAPES["gpt-oss"].extra, "n_ff": 128})


@pytest.fixture(scope="module")
def tiny_gptoss(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "gpt-oss-tiny.gguf"
    return es.make_model(path, 4096, shape=TINY)


def test_the_gpt_oss_shape_writes_what_llama_cpp_reads(tiny_gptoss):
    """gpt-oss's keys and tensors (sinks, biases, untied output), experts MXFP4, the rest Q4_0 and F32."""
    from edgeai.gguf_header import read_header

    header = read_header(tiny_gptoss)
    meta, types = header.metadata, {name: t.type_name for name, t in header.tensors.items()}
    assert meta["general.architecture"] == "gpt-oss"
    assert (meta["gpt-oss.expert_count"], meta["gpt-oss.expert_used_count"]) == (32, 4)
    assert meta["gpt-oss.attention.sliding_window"] == 128 and meta["gpt-oss.attention.sliding_window_pattern"] == 2
    assert meta["gpt-oss.rope.scaling.type"] == "yarn"
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.3.ffn_down_exps.weight"] == "MXFP4"
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == types["token_embd.weight"] == "Q4_0"
    for name in ("blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.bias", "blk.0.ffn_up_exps.bias", "blk.0.attn_q.bias"):
        assert types[name] == "F32"
    # the store reads the expert matrices; their biases stay in memory, so the disk probe skips them
    slices = es.expert_slices(tiny_gptoss)
    assert len(slices) == TINY.n_layer * 3 * TINY.n_expert
    assert {n for _, n in slices} == {128 * 128 // 32 * 17}


def test_random_mxfp4_experts_have_mean_zero_and_the_aimed_scale(tiny_gptoss):
    """Weights of rms gain/sqrt(fan-in): 1 for gate and up, branch_gain for down (as the Q4_0 path)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from edgeai.gguf_header import read_header

    header = read_header(tiny_gptoss)
    for name, gain in (("blk.1.ffn_up_exps.weight", 1.0), ("blk.2.ffn_down_exps.weight", TINY.branch_gain)):
        w = dequantize(np.asarray(header.tensor_data(name)), GGMLQuantizationType.MXFP4)
        assert abs(w.mean()) < 0.02 * w.std()
        assert w.std() == pytest.approx(gain / math.sqrt(128), rel=0.05)


def test_llama_cpp_and_ours_agree_on_the_tiny_gpt_oss(tiny_gptoss):
    """The benchmark's own check: llama.cpp loads the file, the argmax of both engines agrees at
    every position of the text, and streaming changes nothing."""
    check = es.check_model(tiny_gptoss, argparse.Namespace(threads=1))
    assert check["argmax_agree_llama"] == check["text_positions"]
    assert check["greedy"]["ours"] == check["greedy"]["llama.cpp"]
    assert check["streaming_identical"]
    assert len(set(check["greedy"]["ours"])) > 1  # not one repeated token: routing has not collapsed


def test_the_default_shape_is_the_qwen3moe_benchmark_as_before():
    shape = es.SHAPES["qwen3moe"]
    assert es.model_path(Path("w"), 4096) == Path("w/qwen3moe-2gb-q4_0-zm-align4096.gguf")
    assert (shape.n_layer, shape.n_expert, shape.n_expert_used, shape.expert_format) == (12, 64, 8, "q4_0")
    assert shape.policies()[-1] == "next-use:top8"
