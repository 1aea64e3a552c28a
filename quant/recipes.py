"""Which element type each tensor is written in: recipes as data.

A recipe is a default type plus ordered rules (first match wins) keyed by the tensor's role
(its GGUF name without the block number) and, optionally, by which layers get more bits.
Rules shared by every recipe (the ones llama.cpp's own tools follow):
- 1-D tensors (norms, biases, the shared-expert gate) stay F32: tiny and precision-critical;
- MoE routers (`ffn_gate_inp`) stay F32: a rounding there changes which experts run;
- a tensor whose rows do not fill whole blocks of the chosen type falls back along
  `FALLBACK` (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, 32-blocks -> F16), as llama.cpp does.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from edgeai.errors import OptionError
from edgeai.quant.formats import FORMATS, QuantFormat


class OutType(str, enum.Enum):
    """`--outtype` of the converter: one type for every weight matrix."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"


class Method(str, enum.Enum):
    """How block types choose codes and scales (`--method`)."""

    RTN = "rtn"  # no calibration data: scales searched for the least squared error of the weights
    IMATRIX = "imatrix"  # error weighted per input column by the mean x^2 of calibration activations
    AWQ = "awq"  # activation-aware input-channel scales folded into the layer before (quant/awq.py), then IMATRIX
    GPTQ = "gptq"  # column-by-column rounding with Hessian-weighted error feedback (quant/gptq.py)

    @property
    def needs_calibration(self) -> bool:
        return self is not Method.RTN


def parse_method(value: str | Method) -> Method:
    try:
        return Method(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise OptionError(f"--method {value!r} is not supported; choose one of {', '.join(m.value for m in Method)}") from None


class Layers(enum.Enum):
    """Which blocks a rule applies to."""

    ALL = "all"
    # the first and last eighth of the blocks and every third in between: where llama.cpp's
    # *_M mixes spend extra bits (attention V and FFN down matter most there)
    MORE_BITS = "more_bits"
    FIRST_EIGHTH = "first_eighth"


@dataclass(frozen=True)
class Rule:
    role: str  # GGUF name with the block number removed, e.g. "ffn_down.weight"; regex allowed
    type: str
    layers: Layers = Layers.ALL
    moe_only: bool = False  # applies only in models with experts


@dataclass(frozen=True)
class Recipe:
    name: str
    default: str
    rules: tuple[Rule, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class TypeChoice:
    fmt: QuantFormat
    fallback: str = ""  # why, when a fallback replaced the type the recipe asked for


F32_ROLES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "rope_freqs.weight")
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl", "iq4_nl": "f16", "q4_0": "f16", "q4_1": "f16", "q5_0": "f16",
            "q5_1": "f16", "q8_0": "f16", "mxfp4": "f16", "f16": "f32", "bf16": "f32"}

_OUTPUT = Rule(r"(output|token_embd)\.weight", "q6_k")  # applied to token_embd only when it doubles as output
_MOE_ATTENTION = Rule(r"attn_(v|k|q|output)\.weight", "q8_0", moe_only=True)  # attention is a sliver of an MoE

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("f32", "f32", description="everything F32"),
    Recipe("f16", "f16", description="weights F16"),
    Recipe("bf16", "bf16", description="weights BF16"),
    Recipe("q8_0", "q8_0", description="weights Q8_0 (8.5 bits)"),
    Recipe("q4_0", "q4_0", (_OUTPUT,), "Q4_0, output Q6_K"),
    Recipe("q4_1", "q4_1", (_OUTPUT,), "Q4_1, output Q6_K"),
    Recipe("q5_0", "q5_0", (_OUTPUT,), "Q5_0, output Q6_K"),
    Recipe("q5_1", "q5_1", (_OUTPUT,), "Q5_1, output Q6_K"),
    Recipe("q6_k", "q6_k", description="Q6_K everywhere"),
    Recipe("iq4_nl", "iq4_nl", (_OUTPUT,), "IQ4_NL (non-uniform 4-bit grid, 4.5 bits), output Q6_K"),
    Recipe("iq4_xs", "iq4_xs", (_OUTPUT,), "IQ4_XS (IQ4_NL with 6-bit sub-block scales, 4.25 bits), output Q6_K"),
    Recipe("mxfp4", "mxfp4", (_OUTPUT,), "MXFP4 (4-bit floats under a power-of-two scale per 32, 4.25 bits), output Q6_K"),
    # llama.cpp's MXFP4_MOE: the experts as gpt-oss ships them, every other matrix Q8_0
    Recipe("mxfp4_moe", "q8_0", (Rule(r"ffn_(gate|up|down)_exps\.weight", "mxfp4"),), "MoE experts MXFP4, the rest Q8_0"),
    Recipe("q4_k_s", "q4_k", (_OUTPUT, _MOE_ATTENTION, Rule(r"ffn_down(_exps)?\.weight", "q5_k", Layers.FIRST_EIGHTH)),
           "Q4_K, FFN down of the first eighth Q5_K, output Q6_K"),
    Recipe("q4_k_m", "q4_k", (_OUTPUT, _MOE_ATTENTION, Rule(r"attn_v\.weight", "q6_k", Layers.MORE_BITS),
                              Rule(r"ffn_down(_exps)?\.weight", "q6_k", Layers.MORE_BITS)),
           "Q4_K, attention V and FFN down Q6_K in the layers that matter most, output Q6_K"),
    Recipe("q5_k_s", "q5_k", (_OUTPUT, _MOE_ATTENTION), "Q5_K, output Q6_K"),
    Recipe("q5_k_m", "q5_k", (_OUTPUT, _MOE_ATTENTION, Rule(r"attn_v\.weight", "q6_k", Layers.MORE_BITS),
                              Rule(r"ffn_down(_exps)?\.weight", "q6_k", Layers.MORE_BITS)),
           "Q5_K, attention V and FFN down Q6_K in the layers that matter most, output Q6_K"),
)}


def parse_outtype(value: str | OutType) -> OutType:
    try:
        return OutType(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise OptionError(
            f"--outtype {value!r} is not supported; choose one of {', '.join(t.value for t in OutType)}"
        ) from None


def get_recipe(name: str | Recipe) -> Recipe:
    """A preset by name; an OptionError lists the presets."""
    if isinstance(name, Recipe):
        return name
    try:
        return RECIPES[name.lower()]
    except KeyError:
        raise OptionError(f"unknown recipe {name!r}; presets: {', '.join(RECIPES)}") from None


def validate(recipe: Recipe) -> None:
    """Refuse recipes naming unknown types or roles that match nothing."""
    for type_name in (recipe.default, *(r.type for r in recipe.rules)):
        if type_name not in FORMATS:
            raise OptionError(f"recipe {recipe.name!r} names unknown type {type_name!r}; known: {', '.join(FORMATS)}")
    known_roles = ("token_embd.weight", "output.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                   "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
                   "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_shexp.weight",
                   "ffn_up_shexp.weight", "ffn_down_shexp.weight")
    for rule in recipe.rules:
        if not any(re.fullmatch(rule.role, role) for role in known_roles):
            raise OptionError(f"recipe {recipe.name!r}: rule {rule.role!r} matches no tensor class; "
                              f"classes: {', '.join(known_roles)}")


def _layer_selected(layers: Layers, block: int | None, n_blocks: int) -> bool:
    if layers is Layers.ALL:
        return True
    if block is None:
        return False
    eighth = n_blocks // 8
    if layers is Layers.FIRST_EIGHTH:
        return block < eighth
    return block < eighth or block >= 7 * n_blocks // 8 or (block - eighth) % 3 == 2


_BLOCK = re.compile(r"^blk\.(\d+)\.(.*)$")


def tensor_type(name: str, shape: tuple[int, ...], recipe: Recipe | OutType, *, n_blocks: int = 0,
                has_experts: bool = False, has_output: bool = True) -> TypeChoice:
    """The format tensor `name` (numpy-order `shape`) is written in under `recipe`."""
    if isinstance(recipe, OutType):
        recipe = RECIPES[recipe.value]
    if len(shape) <= 1 or name.endswith(".bias"):
        return TypeChoice(FORMATS["f32"])  # 1-D: norms, biases; and stacked experts' biases (gpt-oss)
    if name.endswith(F32_ROLES):
        return TypeChoice(FORMATS["f32"])  # routers
    match = _BLOCK.match(name)
    block, role = (int(match.group(1)), match.group(2)) if match else (None, name)
    wanted, fallback = recipe.default, ""
    for rule in recipe.rules:
        if rule.moe_only and not has_experts:
            continue
        if role == "token_embd.weight" and rule is _OUTPUT and has_output:
            continue  # the embedding is only a lookup when a separate output matrix exists
        if re.fullmatch(rule.role, role) and _layer_selected(rule.layers, block, n_blocks):
            wanted = rule.type
            break
    name_wanted = wanted
    while shape[-1] % FORMATS[wanted].block_size:
        wanted = FALLBACK[wanted]
    if wanted != name_wanted:
        fallback = f"row length {shape[-1]} is not a multiple of {FORMATS[name_wanted].block_size} ({name_wanted})"
    return TypeChoice(FORMATS[wanted], fallback)
