"""Which element type each tensor is written in.

Rules shared by every output type (the ones llama.cpp's own converter follows):
- 1-D tensors (norms, biases, the shared-expert gate) stay F32: they are tiny and precision-critical;
- MoE routers (`ffn_gate_inp`) stay F32: a rounding there changes which experts run;
- a tensor whose rows do not fill whole blocks of the chosen type falls back to F16.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edgeai.errors import OptionError
from edgeai.quant.formats import FORMATS, QuantFormat


class OutType(str, enum.Enum):
    """`--outtype` of the converter."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"


@dataclass(frozen=True)
class TypeChoice:
    fmt: QuantFormat
    reason: str  # why, when it is not the requested type


F32_ROLES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "rope_freqs.weight")


def parse_outtype(value: str | OutType) -> OutType:
    try:
        return OutType(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise OptionError(
            f"--outtype {value!r} is not supported; choose one of {', '.join(t.value for t in OutType)}"
        ) from None


def tensor_type(name: str, shape: tuple[int, ...], outtype: OutType) -> TypeChoice:
    """The format tensor `name` (numpy-order `shape`) is written in for `outtype`."""
    if len(shape) <= 1:
        return TypeChoice(FORMATS["f32"], "1-D tensor")
    if name.endswith(F32_ROLES):
        return TypeChoice(FORMATS["f32"], "kept in F32 (router)")
    fmt = FORMATS[outtype.value]
    if shape[-1] % fmt.block_size:
        return TypeChoice(FORMATS["f16"], f"row length {shape[-1]} is not a multiple of {fmt.block_size}")
    return TypeChoice(fmt, "")
