"""The GGUF writer: read back by gguf-py, and refusing calls out of order."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from edgeai.gguf_writer import GGUFWriter


def test_round_trip_through_gguf_py(tmp_path):
    path = tmp_path / "x.gguf"
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.arange(5, dtype=np.float32)
    with open(path, "wb+") as f:
        w = GGUFWriter(f, alignment=64)
        w.add("general.architecture", "llama")
        w.add("k.u32", 7)
        w.add("k.i64", -5, GGUFValueType.INT64)
        w.add("k.f32", 0.5)
        w.add("k.bool", True)
        w.add("k.strs", ["a", "ü", ""], GGUFValueType.ARRAY, GGUFValueType.STRING)
        w.add("k.ints", [1, -2, 3], GGUFValueType.ARRAY, GGUFValueType.INT32)
        w.add("k.sha", "0" * 64)
        w.add_tensor("a", a.shape, GGMLQuantizationType.F32, a.nbytes)
        w.add_tensor("b", b.shape, GGMLQuantizationType.F32, b.nbytes)
        w.write_header()
        w.write_tensor_chunks("a", (a[:1], a[1:]))
        w.write_tensor("b", b)
        w.patch_string("k.sha", "f" * 64)
        w.finish()
    r = GGUFReader(path)
    value = lambda k: r.fields[k].contents()  # noqa: E731
    assert value("k.u32") == 7 and value("k.i64") == -5 and value("k.f32") == 0.5 and value("k.bool") is True
    assert value("k.strs") == ["a", "ü", ""] and value("k.ints") == [1, -2, 3]
    assert value("k.sha") == "f" * 64 and value("general.alignment") == 64
    tensors = {t.name: t for t in r.tensors}
    np.testing.assert_array_equal(tensors["a"].data, a)
    np.testing.assert_array_equal(tensors["b"].data, b)
    assert all(t.data_offset % 64 == 0 for t in r.tensors)


def test_refuses_out_of_order_calls(tmp_path):
    with open(tmp_path / "y.gguf", "wb+") as f:
        w = GGUFWriter(f)
        w.add_tensor("a", (4,), GGMLQuantizationType.F32, 16)
        w.add_tensor("b", (4,), GGMLQuantizationType.F32, 16)
        with pytest.raises(ValueError, match="duplicate tensor"):
            w.add_tensor("a", (4,), GGMLQuantizationType.F32, 16)
        with pytest.raises(RuntimeError, match="cannot write tensor"):
            w.write_tensor("a", np.zeros(4, np.float32))
        w.write_header()
        with pytest.raises(RuntimeError, match="cannot add metadata"):
            w.add("late", 1)
        with pytest.raises(RuntimeError, match="expected tensor 'a' next"):
            w.write_tensor("b", np.zeros(4, np.float32))
        with pytest.raises(RuntimeError, match="planned 16 bytes, got 12"):
            w.write_tensor("a", np.zeros(3, np.float32))
    with open(tmp_path / "z.gguf", "wb+") as f:
        w = GGUFWriter(f)
        w.add_tensor("a", (4,), GGMLQuantizationType.F32, 16)
        w.write_header()
        with pytest.raises(RuntimeError, match="1 tensor\\(s\\) not written"):
            w.finish()
