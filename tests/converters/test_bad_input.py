"""Bad input: a clear error naming the file, tensor or option, and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import edgeai
from edgeai.errors import CheckpointError, OutputError, TensorError, TokenizerError, UnsupportedArchitectureError
from helpers import TINY_ARCHS, make_tiny_checkpoint

ARCHS = {a.name: a for a in TINY_ARCHS}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {name: make_tiny_checkpoint(root / name, ARCHS[name]) for name in ("llama", "qwen3_moe")}


@pytest.fixture
def ckpt(pristine, tmp_path):
    """A fresh copy of the tiny Llama checkpoint that a test may damage."""
    return Path(shutil.copytree(pristine["llama"], tmp_path / "ckpt"))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary file left behind"


def test_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")
    _nothing_written(tmp_path / "o.gguf")


def test_missing_shard(ckpt, tmp_path):
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, ckpt / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[half:]}, ckpt / "model-00002-of-00002.safetensors")
    (ckpt / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {n: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, n in enumerate(names)}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    out = edgeai.convert(ckpt, tmp_path / "sharded.gguf", outtype="f32")  # sharded works
    assert out.stat().st_size > 0
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")
    _nothing_written(tmp_path / "o.gguf")


def test_unknown_architecture(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GPTBigCodeForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="GPTBigCodeForCausalLM.*supported: .*Qwen3MoeForCausalLM"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "'model.layers.1.mlp.up_proj.weight' is missing"),
        (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)}),
         "unexpected tensor 'model.layers.0.mlp.extra.weight'"),
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 63), np.float32)}),
         r"'model.layers.0.self_attn.q_proj.weight' has shape \[64, 63\], expected \[64, 64\]"),
        (lambda t: t.update({"model.layers.0.mlp.down_proj.weight": np.zeros((64, 96), np.int8)}),
         "'model.layers.0.mlp.down_proj.weight' has dtype I8"),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_tensor_problems_name_the_tensor(ckpt, tmp_path, edit, message):
    _edit_tensors(ckpt, edit)
    with pytest.raises(TensorError, match=message):
        edgeai.convert(ckpt, tmp_path / "o.gguf")
    _nothing_written(tmp_path / "o.gguf")


def test_nan_in_weights_names_the_tensor(ckpt, tmp_path):
    def poison(t):
        t["model.layers.1.self_attn.v_proj.weight"][3, 4] = np.nan
    _edit_tensors(ckpt, poison)
    with pytest.raises(TensorError, match="'model.layers.1.self_attn.v_proj.weight' contains 1 NaN/Inf"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")
    _nothing_written(tmp_path / "o.gguf")


def test_truncated_safetensors(ckpt, tmp_path):
    path = ckpt / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="model.safetensors is truncated: tensor '.*' ends at byte"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")
    with open(path, "r+b") as f:
        f.truncate(5)
    with pytest.raises(CheckpointError, match="truncated"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")


ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header,message", [
    ([1, 2], "the safetensors header is a JSON list, not an object of tensors"),
    (7, "the safetensors header is a JSON int, not an object of tensors"),
    ({"__metadata__": [1], "w": ENTRY}, "the safetensors header.s __metadata__ is not an object"),
    ({"w": [1]}, "tensor 'w' has a malformed header entry: a JSON list, not an object"),
    ({"w": {"dtype": "F32", "shape": [4]}}, "tensor 'w' has a malformed header entry: no 'data_offsets'"),
    ({"w": {**ENTRY, "dtype": 5}}, "tensor 'w' .*dtype 5 is not a string"),
    ({"w": {**ENTRY, "shape": "2x2"}}, "tensor 'w' .*shape '2x2' is not a list of whole numbers >= 0"),
    ({"w": {**ENTRY, "shape": [2, -2]}}, "tensor 'w' .*shape \\[2, -2\\] is not a list"),
    ({"w": {**ENTRY, "shape": [2.0, 2]}}, "tensor 'w' .*shape \\[2.0, 2\\] is not a list"),
    ({"w": {**ENTRY, "data_offsets": [0.5, 16]}}, "tensor 'w' .*data_offsets \\[0.5, 16\\] is not \\[begin, end\\]"),
    ({"w": {**ENTRY, "data_offsets": [16, 0]}}, "tensor 'w' .*data_offsets \\[16, 0\\]"),
    ({"w": {**ENTRY, "data_offsets": 16}}, "tensor 'w' .*data_offsets 16"),
    ({"w": {**ENTRY, "shape": [2**40, 2**40]}}, "tensor 'w' of shape .* should take 4835703278458516698824704 bytes"),
])
def test_malformed_safetensors_headers_name_the_file_and_tensor(ckpt, tmp_path, header, message):
    """A header that is JSON but not what safetensors writes was a TypeError traceback."""
    import struct

    (ckpt / "model.safetensors").unlink()
    raw = json.dumps(header).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(CheckpointError, match=f"model.safetensors: {message}"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")
    _nothing_written(tmp_path / "o.gguf")


def test_truncated_gguf(ckpt, tmp_path):
    """convert, inspect and fit read GGUF headers with the one validating reader: a truncated file
    is the same clear error from each (the file, what is wrong, where), never a numpy internal."""
    from edgeai.devices import get_profile
    from edgeai.fit import fit
    from edgeai.inspect import inspect as inspect_artifact

    good = edgeai.convert(ckpt, tmp_path / "good.gguf", outtype="f32")
    data = good.read_bytes()
    for cut, why in ((10, "shorter than a GGUF header"), (len(data) // 50, r"truncated while reading .* \(at byte \d+\)"),
                     (len(data) - 100, "lies beyond the end of the file")):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        for call in (lambda: edgeai.convert(bad, tmp_path / "o.gguf"), lambda: inspect_artifact(bad),
                     lambda: fit(bad, get_profile("pi5-8gb-sd"))):
            with pytest.raises(CheckpointError, match=f"cut{cut}.gguf: .*{why}"):
                call()
    _nothing_written(tmp_path / "o.gguf")


def test_pickle_refused_unless_trusted(ckpt, tmp_path):
    import torch

    tensors = load_file(ckpt / "model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")
    _nothing_written(tmp_path / "o.gguf")
    out = edgeai.convert(ckpt, tmp_path / "o.gguf", outtype="f32", trust_pickle=True)
    reference = edgeai.convert(_safetensors_twin(ckpt, tensors, tmp_path), tmp_path / "ref.gguf", outtype="f32")
    assert _tensor_bytes(out) == _tensor_bytes(reference)


def _safetensors_twin(ckpt: Path, tensors, tmp_path: Path) -> Path:
    twin = Path(shutil.copytree(ckpt, tmp_path / "twin"))
    (twin / "pytorch_model.bin").unlink()
    save_file(tensors, twin / "model.safetensors")
    return twin


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    from gguf import GGUFReader

    return {t.name: bytes(t.data) for t in GGUFReader(path).tensors}


def test_output_exists_needs_force(ckpt, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="--force"):
        edgeai.convert(ckpt, out)
    assert out.read_bytes() == b"precious"
    edgeai.convert(ckpt, out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_interrupt_mid_write_leaves_nothing(ckpt, tmp_path, monkeypatch):
    """Ctrl-C while tensors are being written: the old file is kept, no partial file appears."""
    import edgeai.converters.convert as convert_module

    out = tmp_path / "o.gguf"
    out.write_bytes(b"old")
    calls = {"n": 0}
    real = convert_module.quantize

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edgeai.convert(ckpt, out, force=True)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_never_writes_over_its_source(ckpt, tmp_path):
    """convert X.gguf -o X.gguf --force used to overwrite its own source."""
    gguf = edgeai.convert(ckpt, tmp_path / "m.gguf", outtype="f32")
    before = gguf.read_bytes()
    with pytest.raises(OutputError, match="the output .*m.gguf is the source .*m.gguf; converting would write over"):
        edgeai.convert(gguf, gguf, outtype="q8_0", force=True)
    (tmp_path / "link.gguf").symlink_to(gguf)
    with pytest.raises(OutputError, match="is the source"):
        edgeai.convert(gguf, tmp_path / "link.gguf", outtype="q8_0", force=True)
    assert gguf.read_bytes() == before
    weights = (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="is model.safetensors of the source folder"):
        edgeai.convert(ckpt, ckpt / "model.safetensors", force=True)
    assert (ckpt / "model.safetensors").read_bytes() == weights
    assert not [p for p in tmp_path.rglob(".*")]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 300 KiB tmpfs: a real full disk. Needs root and mount(2) (skipped elsewhere)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root; the disk-full path is then untested here")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); disk-full path untested")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_leaves_nothing(ckpt, tiny_disk):
    out = tiny_disk / "o.gguf"
    with pytest.raises(OutputError, match="could not write .*o.gguf.*nothing was written"):
        edgeai.convert(ckpt, out, outtype="f32")
    assert list(tiny_disk.iterdir()) == []


def test_moe_routing_mismatch_refused(pristine, tmp_path):
    ckpt = Path(shutil.copytree(pristine["qwen3_moe"], tmp_path / "moe"))
    config = json.loads((ckpt / "config.json").read_text())
    config["norm_topk_prob"] = False
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="norm_topk_prob=False.*qwen3moe graph always renormalizes"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")


def _set_config(ckpt: Path, **values) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config.update(values)
    (ckpt / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("layers", [3, 1, 4096])
def test_config_claims_other_layers(ckpt, tmp_path, layers):
    _set_config(ckpt, num_hidden_layers=layers)
    with pytest.raises(TensorError, match=f"config.json: num_hidden_layers is {layers}, but the tensors hold 2 layer"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")
    _nothing_written(tmp_path / "o.gguf")


def test_config_claims_other_experts(pristine, tmp_path):
    ckpt = Path(shutil.copytree(pristine["qwen3_moe"], tmp_path / "moe"))
    _set_config(ckpt, num_local_experts=4000)
    with pytest.raises(TensorError, match="config.json: num_local_experts is 4000, but the tensors hold 4 expert"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")


@pytest.mark.parametrize("key,value,expected", [
    # 10^12 layers planned for over a minute and 1.5 GB before failing; 10^6: 38 s, 4.5 GB
    ("num_hidden_layers", 10**12, "num_hidden_layers is 1000000000000, outside 1..4,096, the range a model can have"),
    ("num_attention_heads", 0, "num_attention_heads is 0, outside 1..4,096"),
    ("num_attention_heads", -4, "num_attention_heads is -4"),
    ("num_key_value_heads", 0, "num_key_value_heads is 0"),
    ("hidden_size", 64.5, r"hidden_size is 64.5, not a whole number \(float\)"),
    ("vocab_size", "400", r"vocab_size is '400', not a whole number \(str\)"),
    ("intermediate_size", True, r"intermediate_size is True, not a whole number \(bool\)"),
    ("head_dim", 10**9, "head_dim is 1000000000"),
    ("head_dim", 15, "cannot convert this Llama checkpoint: head_dim 15 is odd"),
    ("max_position_embeddings", -1, "max_position_embeddings is -1"),
    ("rms_norm_eps", 0, "rms_norm_eps is 0; it must be a finite number > 0"),
    ("rope_parameters", {"rope_theta": "big"}, "rope_theta is 'big'; it must be a finite number > 0"),
    ("rope_parameters", {"rope_type": "linear"}, "rope_scaling.factor is None"),
    ("rope_scaling", [1, 2], "rope_parameters / rope_scaling must be JSON objects"),
])
def test_config_values_out_of_bounds_are_refused_before_any_work(ckpt, tmp_path, key, value, expected):
    import time

    _set_config(ckpt, **{key: value})
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"config.json: {expected}"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")
    assert time.perf_counter() - t0 < 5
    _nothing_written(tmp_path / "o.gguf")


def _gguf_with(path: Path, out: Path, key: str, value: int) -> Path:
    """A copy of the GGUF `path` with the UINT32 metadata `key` set to `value`."""
    import struct

    data = bytearray(path.read_bytes())
    name = key.encode()
    at = data.find(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUF type UINT32
    struct.pack_into("<I", data, at + 4, value)
    out.write_bytes(bytes(data))
    return out


def test_gguf_head_count_zero_is_refused_naming_the_key(ckpt, tmp_path):
    """It was a ZeroDivisionError traceback in convert, load and fit."""
    from edgeai.devices import get_profile
    from edgeai.fit import fit

    good = edgeai.convert(ckpt, tmp_path / "good.gguf", outtype="f32")
    bad = _gguf_with(good, tmp_path / "bad.gguf", "llama.attention.head_count", 0)
    expected = "bad.gguf: llama.attention.head_count is 0, outside 1..4,096"
    with pytest.raises(CheckpointError, match=expected):
        edgeai.convert(bad, tmp_path / "o.gguf")
    _nothing_written(tmp_path / "o.gguf")
    with pytest.raises(CheckpointError, match=expected):
        fit(bad, get_profile("pi4-4gb"))
    for backend in ("auto", "native"):  # corrupt: no "llama.cpp can run it" advice either
        with pytest.raises(CheckpointError, match=expected):
            edgeai.load(bad, backend=backend)


def test_missing_tokenizer(ckpt, tmp_path):
    for name in ("tokenizer.json", "tokenizer.model"):
        (ckpt / name).unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="neither a Hugging Face checkpoint folder nor a .gguf"):
        edgeai.convert(tmp_path / "notes.txt", tmp_path / "o.gguf")
    with pytest.raises(CheckpointError, match="does not exist"):
        edgeai.convert(tmp_path / "nowhere", tmp_path / "o.gguf")


def test_output_gets_ordinary_permissions(ckpt, tmp_path):
    """The temporary file is renamed into place: it must not keep mkstemp's private 0600 mode."""
    old = os.umask(0o022)
    try:
        out = edgeai.convert(ckpt, tmp_path / "o.gguf")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_head_counts_must_group(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        edgeai.convert(ckpt, tmp_path / "o.gguf")
