"""--target-bpw: a mix of types that meets the size with the least measured error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader

import edgeai
from edgeai.errors import OptionError
from edgeai.inspect import describe_gguf
from edgeai.quant.allocate import _hull
from helpers import TINY_ARCHS, llama_cpp_greedy, llama_cpp_logits, llama_cpp_model, make_tiny_checkpoint

ARCHS = {a.name: a for a in TINY_ARCHS}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("alloc")
    return make_tiny_checkpoint(root / "m", ARCHS["qwen3"], hidden_size=256, intermediate_size=768, head_dim=64,
                                num_hidden_layers=4)


def test_hull_keeps_only_efficient_options():
    options = [(10, 5.0, "a"), (12, 5.0, "b"), (14, 1.0, "c"), (16, 0.9, "d"), (13, 4.0, "e")]
    # b costs more for no gain; e lies above the segment a-c
    assert [o[2] for o in _hull(options)] == ["a", "c", "d"]


@pytest.mark.parametrize("target", [4.8, 6.0])
def test_target_met_and_beats_a_uniform_recipe_of_the_same_size(wide, tmp_path, target):
    out = edgeai.convert(wide, tmp_path / "t.gguf", quant="q4_0", target_bpw=target)
    summary = describe_gguf(out)
    assert target - 0.35 < summary.bits_per_weight <= target
    recipe = json.loads(GGUFReader(out).fields["edgeai.recipe"].contents())
    assert recipe["target_bpw"] == target and abs(recipe["bits_per_weight"] - summary.bits_per_weight) < 1e-3
    assert len(set(recipe["tensor_types"].values())) > 2  # a real mix

    tokens = list(range(3, 60))
    ref = llama_cpp_logits(llama_cpp_model(edgeai.convert(wide, tmp_path / "f32.gguf", outtype="f32")), tokens)
    uniform_name = "q4_0" if target < 5 else "q5_1"  # 4.5+ and 6.0 bits: the closest uniform types
    uniform = edgeai.convert(wide, tmp_path / "u.gguf", quant=uniform_name)
    assert describe_gguf(uniform).bits_per_weight >= summary.bits_per_weight - 0.35
    err = lambda path: float(np.mean((llama_cpp_logits(llama_cpp_model(path), tokens) - ref) ** 2))  # noqa: E731
    assert err(out) < err(uniform)
    assert len(llama_cpp_greedy(llama_cpp_model(out), tokens, 4)) == 4


def test_unreachable_target_names_the_smallest(wide, tmp_path):
    with pytest.raises(OptionError, match=r"--target-bpw 2.0 cannot be reached: the smallest mix .* is \d+\.\d+ bits"):
        edgeai.convert(wide, tmp_path / "t.gguf", quant="q4_0", target_bpw=2.0)
    assert not (tmp_path / "t.gguf").exists()
    with pytest.raises(OptionError, match="drop --outtype"):
        edgeai.convert(wide, tmp_path / "t.gguf", outtype="f16", target_bpw=5.0)


def test_target_types_limit_the_mix(wide, tmp_path):
    out = edgeai.convert(wide, tmp_path / "t.gguf", quant="q4_0", target_bpw=5.5, target_types=["q4_0", "q8_0"],
                         threads=1)
    recipe = json.loads(GGUFReader(out).fields["edgeai.recipe"].contents())
    assert recipe["target_types"] == ["q4_0", "q8_0"]
    assert {v for k, v in recipe["tensor_types"].items() if v != "f32"} == {"q4_0", "q8_0"}
    with pytest.raises(OptionError, match="unknown tensor type 'q9_9'"):
        edgeai.convert(wide, tmp_path / "u.gguf", target_bpw=5.5, target_types=["q9_9"])
    with pytest.raises(OptionError, match="needs block types"):
        edgeai.convert(wide, tmp_path / "u.gguf", target_bpw=5.5, target_types=["f16"])
    with pytest.raises(OptionError, match="give --target-bpw too"):
        edgeai.convert(wide, tmp_path / "u.gguf", quant="q4_0", target_types=["q4_0"])
    assert not (tmp_path / "u.gguf").exists()
