"""The ONNX exporter: a Hugging Face checkpoint -> an ONNX folder that stock onnxruntime runs on CPU.

    open_plan() (the GGUF path's spec, names and checks) -> calibrate? -> one decoder graph, its
    weights streamed into model.onnx.data one tensor at a time -> onnx.checker (full) -> rename

The folder holds `model.onnx` (graph), `model.onnx.data` (weights), `genai_config.json` (so that
onnxruntime-genai runs it too), the tokenizer files and the chat template; the recipe is in the
model's metadata (`edgeai.recipe`). It appears only when complete (`edgeai.paths.atomic_output_dir`).

The graph, per position batch [batch, seq] (prefill and decode are the same graph):

    input_ids, attention_mask [batch, past+seq], past_key_values.{i}.key/value [batch, n_head_kv, past, head_dim]
    x = embed(input_ids)                                  Gather | GatherBlockQuantized
    per block: h = rms_norm(x)                            RMSNormalization / SkipSimplifiedLayerNormalization
               q, k, v = h @ Wq, Wk, Wv (+ bias, qk-norm)  MatMul | MatMulNBits
               a = attention(q, k, v, past) with RoPE      GroupQueryAttention (rotary inside)
               x += a @ Wo; x += ffn(rms_norm(x))          SwiGLU, or MoE / QMoE (routed experts)
    logits = rms_norm(x) @ Wout                           -> logits [batch, seq, n_vocab], present.{i}.*

q/k rows are in the Hugging Face layout (each head's two halves rotate together), and
GroupQueryAttention runs with `rotary_interleaved=0` for every family: the plan's q/k rows of
NORM-RoPE families (Llama, Mistral, Mixtral), permuted for GGUF so that adjacent pairs rotate, are
put back after encoding (a row order: the codes and scales are the same). The cached keys are then
transformers' too (and the graph the one onnxruntime-genai's builder writes).

Weights: fp32; fp16 (stored as float16, computed in float32: onnxruntime folds the casts when it
loads); int8/int4 as block-wise symmetric `MatMulNBits` (`edgeai.quant.nbits`) whose scales come
from the shared quantizer (32-wide blocks are GGUF's Q4_0/Q8_0 grids, so imatrix search, AWQ and
GPTQ apply unchanged). The embedding is `GatherBlockQuantized` with the same codes; a tied output
matrix shares the embedding's bytes on disk. `accuracy_level` (int8 or float32 activations) follows
the CPU of the device the folder is for (`accuracy_level_for`). Pruning (`--prune`) runs on the plan
first, as for GGUF. MoE layers: the routed experts are one onnxruntime `MoE` (float) or `QMoE`
(int8/int4, block-wise) node per layer, which runs only each token's top-k experts; the router and a
shared expert are standard ops.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from edgeai.version import __version__
from edgeai.errors import CheckpointError, OptionError, OutputError, UnsupportedArchitectureError
from edgeai.paths import atomic_output_dir, check_not_source, check_replaceable
from edgeai.quant.recipes import Method, parse_method

if TYPE_CHECKING:
    from edgeai.quant.prune import PruneSpec

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
OPSET = 23  # RMSNormalization
IR_VERSION = 10
MS = "com.microsoft"
# onnxruntime versions that run every op the graph uses on CPU (RMSNormalization is opset 23)
MIN_ORT = (1, 22)
# the onnxruntime release the MoE layers' CPU MoE / QMoE nodes (interleaved SwiGLU, block-wise
# int4/int8 experts, accuracy_level) were tested with; the export checks by running one tiny node
MIN_ORT_MOE = (1, 31)
ORT_OPS = ("GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized", "SkipSimplifiedLayerNormalization",
           "RMSNormalization (opset 23)")
# files copied from the checkpoint folder when present (tokenizer, chat template, configs)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "config.json")
# Every file an export writes: --force replaces a folder holding only these (a previous export)
OUTPUT_FILES = frozenset((MODEL_FILE, DATA_FILE, GENAI_CONFIG, "chat_template.jinja", *TOKENIZER_FILES))
_EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside model.onnx
_ALIGN = 64  # external tensors start 64-byte aligned (SIMD loads); page alignment would pad ~2 KiB per tensor


class OnnxQuant(str, enum.Enum):
    """`--quant` of the ONNX export: the weight matrices' element type."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.value)


def parse_quant(value: str | OnnxQuant) -> OnnxQuant:
    try:
        return OnnxQuant(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise OptionError(f"--quant {value!r} is not an ONNX weight type; choose one of "
                          f"{', '.join(q.value for q in OnnxQuant)}") from None


def check_onnxruntime() -> str:
    """The installed onnxruntime's version, or OptionError if it is too old for the exported graph."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise OptionError("onnxruntime is not installed; `pip install 'onnxruntime>=1.22'`") from exc
    version = onnxruntime.__version__
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_ORT:
        raise OptionError(
            f"the installed onnxruntime {version} lacks ops the export uses ({', '.join(ORT_OPS)}); "
            f"onnxruntime >= {'.'.join(map(str, MIN_ORT))} is needed: `pip install -U onnxruntime`"
        )
    return version


# ---- graph building --------------------------------------------------------------------------


class _ExternalData:
    """model.onnx.data, written as tensors come: each tensor's bytes once, at an aligned offset."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "wb")
        self.offset = 0

    def write(self, data: np.ndarray) -> tuple[int, int]:
        pad = -self.offset % _ALIGN
        if pad:
            self.fh.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        data = np.ascontiguousarray(data)
        self.fh.write(memoryview(data).cast("B"))
        self.offset += data.nbytes
        return start, data.nbytes

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()


@dataclass
class _Graph:
    """Nodes and initializers of the decoder graph, with unique value names."""

    data: _ExternalData | None
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    counter: int = 0
    weight_bytes: int = 0  # bytes of weight initializers (codes + scales), for bits per weight
    n_weights: int = 0  # weights they encode
    progress: Callable[[int, int, str], None] | None = None  # (weights encoded, weights planned, what)
    planned: int = 0
    what: str = ""

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, *, domain: str = "", name: str | None = None,
             outputs: list[str] | None = None, **attrs) -> list[str]:
        from onnx import helper

        outs = outputs or [self.fresh(f"{name or op}/out{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(name or op), domain=domain, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], **kw) -> str:
        return self.node(op, inputs, **kw)[0]

    def initializer(self, name: str, array: np.ndarray, *, weights: int | None = None) -> str:
        """Add `array` under `name` (external when large). `weights`: the number of model weights it
        encodes (0 for their scales); None for anything else (caches, shapes)."""
        from onnx import TensorProto, helper

        array = np.ascontiguousarray(array)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        if self.data is None or array.nbytes < _EXTERNAL_MIN_BYTES:  # no data file: a graph kept in memory
            t.raw_data = array.tobytes()
        else:
            offset, length = self.data.write(array)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.data.path.name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
        self.initializers.append(t)
        if weights is not None:
            self.weight_bytes += array.nbytes
            self.n_weights += weights
            if self.progress:
                self.progress(min(self.n_weights, self.planned), self.planned, self.what)
        return name

    def const(self, hint: str, array: np.ndarray) -> str:
        return self.initializer(self.fresh(hint), np.asarray(array))


@dataclass(frozen=True)
class _Options:
    quant: OnnxQuant
    block_size: int
    accuracy_level: int


class _Weights:
    """Turns planned tensors into graph operands, one tensor read and encoded at a time."""

    def __init__(self, g: _Graph, plan, opts: _Options, importance, encoded: dict[str, list[np.ndarray]] | None,
                 threads: int):
        self.g, self.plan, self.opts = g, plan, opts
        self.row_orders = _hf_row_orders(plan)
        self.importance, self.encoded, self.threads = importance, encoded, threads
        self.types: dict[str, str] = {}
        self.fallbacks: dict[str, str] = {}
        self.embedding_q: tuple[str, str, int] | None = None  # int: (codes [V, kb, blob], scales [V, kb], block size)
        self.embedding_f: str | None = None  # float: the table's initializer

    # -- encoding
    def _nbits(self, name: str, w: np.ndarray, expert: int | None, block: int | None = None):
        """w [N, K] float32 -> NBits (blocks of `block`, default the export's for rows of K), from
        GPTQ's bytes, the shared block quantizer (32) or nbits.encode."""
        from edgeai.quant import nbits
        from edgeai.quant.formats import FORMATS, Fit, quantize

        bits = self.opts.quant.bits
        n, k = w.shape
        bs = block or block_for(k, self.opts.block_size)
        if self.encoded is not None and name in self.encoded and bs == 32:
            return nbits.from_gguf_blocks(self.encoded[name][expert or 0], bits, n, k)
        imp = self.importance(name, expert or 0) if self.importance else None
        if bs == 32:
            raw = quantize(w, FORMATS[nbits.GGUF_TYPE[bits]], fit=Fit.SEARCH, importance=imp, n_threads=self.threads)
            return nbits.from_gguf_blocks(raw, bits, n, k)
        return nbits.encode(w, bits, bs, imp)

    def _quantized(self, name: str, k: int) -> bool:
        """Whether tensor `name` (rows of k) is written as int codes: every weight matrix but MoE
        routers, unless no block size fits its rows (then it stays float, recorded as a fallback)."""
        if self.opts.quant.bits is None or name.endswith("ffn_gate_inp.weight"):
            return False
        b = block_for(k, self.opts.block_size)
        if b != self.opts.block_size:
            self.fallbacks[name] = (f"row length {k} is not a multiple of {self.opts.block_size}: "
                                    + (f"blocks of {b}" if b else "kept float32"))
        return b is not None

    def _hf_rows(self, name: str, t):
        """`t` (a planned tensor's rows [N, ...] or their NBits encoding) in Hugging Face row order."""
        order = self.row_orders.get(name)
        if order is None:
            return t
        if isinstance(t, np.ndarray):
            return t[order]
        return replace(t, codes=t.codes[order], scales=t.scales[order])

    def _read(self, name: str) -> np.ndarray:
        """A planned tensor as the graph uses it (float32 arrays from the plan, HF row order)."""
        return self._hf_rows(name, self.plan.read(name))

    def _encoded(self, name: str, w: np.ndarray):
        """The NBits encoding of planned matrix `name` (`w`: its rows as the plan gives them), HF row order."""
        return self._hf_rows(name, self._nbits(name, w, None))

    # -- operands
    def linear(self, x: str, name: str, output: str | None = None) -> str:
        """x [.., K] @ W.T for planned weight `name` [N, K] (into value `output` if given)."""
        g, q = self.g, self.opts.quant
        out = {"outputs": [output]} if output else {}
        w = self.plan.read(name)  # plan order: GPTQ's codes and the importance follow it
        n, k = w.shape
        label = name
        if self._quantized(name, k):
            enc = self._encoded(name, w)
            codes = g.initializer(label + ".qweight", enc.codes, weights=n * k)
            scales = g.initializer(label + ".scales", enc.scales.reshape(-1), weights=0)
            self.types[name] = f"int{q.bits}"
            return g.one("MatMulNBits", [x, codes, scales], domain=MS, K=k, N=n, bits=q.bits,
                         block_size=enc.block_size, accuracy_level=self.opts.accuracy_level, **out)
        w = self._hf_rows(name, w)
        if q is OnnxQuant.FP16 and not name.endswith("ffn_gate_inp.weight"):
            wt = g.initializer(label + ".weight_t", w.T.astype(np.float16), weights=n * k)
            self.types[name] = "fp16"
            return g.one("MatMul", [x, g.one("Cast", [wt], to=1)], **out)
        wt = g.initializer(label + ".weight_t", np.ascontiguousarray(w.T, np.float32), weights=n * k)
        self.types[name] = "fp32"
        return g.one("MatMul", [x, wt], **out)

    def fused(self, x: str, names: list[str], label: str) -> str:
        """x @ [W_1; W_2; ...].T as one node for weights that share their input (q, k, v): one
        MatMulNBits instead of three per layer (fewer kernel launches per decode step)."""
        g, q = self.g, self.opts.quant
        ws = [self.plan.read(n) for n in names]  # [N_i, K] each, plan order
        k, n_total = ws[0].shape[1], sum(w.shape[0] for w in ws)
        if all(self._quantized(n, k) for n in names):
            encs = [self._encoded(n, w) for n, w in zip(names, ws)]
            assert len({e.block_size for e in encs}) == 1
            codes = g.initializer(label + ".qweight", np.concatenate([e.codes for e in encs]), weights=n_total * k)
            scales = g.initializer(label + ".scales", np.concatenate([e.scales for e in encs]).reshape(-1), weights=0)
            self.types.update({n: f"int{q.bits}" for n in names})
            return g.one("MatMulNBits", [x, codes, scales], domain=MS, K=k, N=n_total, bits=q.bits,
                         block_size=encs[0].block_size, accuracy_level=self.opts.accuracy_level)
        wt = np.concatenate([self._hf_rows(n, w).T for n, w in zip(names, ws)], axis=1)  # [K, N_total]
        kind = "fp16" if q is OnnxQuant.FP16 else "fp32"
        self.types.update({n: kind for n in names})
        if q is OnnxQuant.FP16:
            return g.one("MatMul", [x, g.one("Cast", [g.initializer(label + ".weight_t", wt.astype(np.float16),
                                                                    weights=n_total * k)], to=1)])
        return g.one("MatMul", [x, g.initializer(label + ".weight_t", wt.astype(np.float32), weights=n_total * k)])

    def vectors(self, names: list[str], label: str) -> str:
        """1-D planned tensors concatenated (the q, k, v biases of a fused projection)."""
        t = np.concatenate([self._read(n).astype(np.float32) for n in names])
        self.types.update({n: "fp32" for n in names})
        return self.g.initializer(label, t, weights=t.size)

    def vector(self, name: str) -> str:
        """A 1-D planned tensor (norm weight, bias) as a float32 initializer."""
        t = self._read(name).astype(np.float32)
        self.types[name] = "fp32"
        return self.g.initializer(name, t, weights=t.size)

    def experts(self, x: str, probs: str, blk: str, k: int) -> str:
        """A block's routed experts as one onnxruntime MoE (float) or QMoE (int8/int4) node:
        x [b, s, n_embd], probs [b*s, n_expert] router logits -> [b, s, n_embd]. The node takes the
        softmax over all experts, keeps the top k, renormalizes their weights to sum to 1 and runs
        SwiGLU experts whose gate and up rows are interleaved in one matrix (the layout its CPU
        kernels take)."""
        g, q = self.g, self.opts.quant
        names = [f"{blk}ffn_{r}_exps.weight" for r in ("gate", "up", "down")]
        gate, up, down = (self.plan.read(n) for n in names)  # [E, F, H], [E, F, H], [E, H, F]
        n_expert, n_ff, n_embd = gate.shape
        # one block size for both matrices: it must divide the rows of both (n_embd and n_ff)
        block = block_for(math.gcd(n_embd, n_ff), self.opts.block_size) if q.bits else None
        if q.bits and block is None:
            self.fallbacks.update({n: f"rows of {n_embd} and {n_ff} share no block size >= 16: kept float32" for n in names})
        elif q.bits and block != self.opts.block_size:
            self.fallbacks.update({n: f"rows of {n_embd} and {n_ff} share no multiple of {self.opts.block_size}: "
                                      f"blocks of {block}" for n in names})
        if block is None:  # float experts: fc1 [E, 2F, H] (gate, up interleaved), fc2 [E, H, F]
            fc1 = np.empty((n_expert, 2 * n_ff, n_embd), np.float32)
            fc1[:, 0::2], fc1[:, 1::2] = gate, up
            kind = "fp16" if q is OnnxQuant.FP16 else "fp32"
            self.types.update({n: kind for n in names})
            fc, fc2 = (fc1, down) if q is not OnnxQuant.FP16 else (fc1.astype(np.float16), down.astype(np.float16))
            op, attrs, inputs = _moe_node(self.g, blk + "ffn_exps", k, fc, fc2)
        else:
            encoded = [[self._nbits(n, w[e], e, block) for e in range(n_expert)] for n, w in zip(names, (gate, up, down))]
            codes = [np.stack([e.codes.reshape(e.codes.shape[0], -1) for e in m]) for m in encoded]  # [E, N, K*bits/8]
            scales = [np.stack([e.scales for e in m]) for m in encoded]  # [E, N, K/block]
            fc1 = (np.empty((n_expert, 2 * n_ff, codes[0].shape[2]), np.uint8),
                   np.empty((n_expert, 2 * n_ff, scales[0].shape[2]), np.float32))
            fc1[0][:, 0::2], fc1[0][:, 1::2] = codes[0], codes[1]
            fc1[1][:, 0::2], fc1[1][:, 1::2] = scales[0], scales[1]
            self.types.update({n: f"int{q.bits}" for n in names})
            op, attrs, inputs = _moe_node(self.g, blk + "ffn_exps", k, fc1, (codes[2], scales[2]),
                                          bits=q.bits, block_size=block, accuracy_level=self.opts.accuracy_level)
        del gate, up, down
        return g.one(op, [x, probs, *inputs], domain=MS, **attrs)

    def embedding(self, ids: str) -> str:
        """input_ids [batch, seq] -> [batch, seq, n_embd]; keeps the codes for a tied output."""
        g, q = self.g, self.opts.quant
        name = "token_embd.weight"
        w = self.plan.read(name)  # [n_vocab, n_embd]
        v, e = w.shape
        if q.bits is not None:
            # stored as MatMulNBits wants them ([V, kb, blob], prepacked when a tied output uses them);
            # the gather reads a 2-D view made by a Reshape that onnxruntime folds at load
            enc = self._nbits(name, w, None)
            codes = g.initializer(name + ".qweight", enc.codes, weights=v * e)  # [V, kb, blob]
            scales = g.initializer(name + ".scales", enc.scales, weights=0)  # [V, kb]
            self.types[name] = f"int{q.bits}"
            self.embedding_q = (codes, scales, enc.block_size)
            rows = g.one("Reshape", [codes, g.const("shape", np.array([v, -1], np.int64))])  # [V, kb*blob]
            return g.one("GatherBlockQuantized", [rows, ids, scales], domain=MS, bits=q.bits,
                         block_size=enc.block_size, gather_axis=0, quantize_axis=1)
        dtype = np.float16 if q is OnnxQuant.FP16 else np.float32
        table = g.initializer(name, w.astype(dtype), weights=v * e)
        self.types[name] = q.value
        self.embedding_f = table
        out = g.one("Gather", [table, ids], axis=0)
        return g.one("Cast", [out], to=1) if dtype == np.float16 else out

    def tied_output(self, x: str, n_vocab: int, n_embd: int, output: str) -> str:
        """x @ token_embd.T into value `output`, from the embedding's own initializers (no second copy on disk)."""
        g, q = self.g, self.opts.quant
        if self.embedding_q is not None:
            codes, scales, block_size = self.embedding_q
            return g.one("MatMulNBits", [x, codes, scales], domain=MS, K=n_embd, N=n_vocab, bits=q.bits,
                         block_size=block_size, accuracy_level=self.opts.accuracy_level, outputs=[output])
        table = self.embedding_f
        if q is OnnxQuant.FP16:
            table = g.one("Cast", [table], to=1)
        return g.one("MatMul", [x, g.one("Transpose", [table], perm=[1, 0])], outputs=[output])


def _hf_row_orders(plan) -> dict[str, np.ndarray]:
    """Row index arrays that put the plan's q/k rows (and biases) back in Hugging Face order, for
    NORM-RoPE families, whose plan permutes each head's rows [x_0, y_0, x_1, y_1, ...] for GGUF
    (`edgeai.architectures._permute_rows`): HF row h*d + s*d/2 + j is plan row h*d + 2j + s."""
    from edgeai.architectures import RopeStyle

    hp = plan.hparams
    if plan.spec.rope is not RopeStyle.NORM:
        return {}
    names = {t.name for t in plan.tensors}
    half = hp.head_dim // 2
    orders = {}
    for role, n_heads in (("attn_q", hp.n_head), ("attn_k", hp.n_head_kv)):
        order = np.arange(n_heads * hp.head_dim).reshape(n_heads, half, 2).swapaxes(1, 2).reshape(-1)
        for i in range(hp.n_layer):
            orders.update({f"blk.{i}.{role}.{kind}": order for kind in ("weight", "bias") if f"blk.{i}.{role}.{kind}" in names})
    return orders


def _build_graph(g: _Graph, plan, w: _Weights, max_pos: int):
    """The decoder graph's nodes (weights streamed by `w`); returns (inputs, outputs) value infos."""
    from onnx import TensorProto, helper

    from edgeai.architectures import QKNorm
    from edgeai.quant.forward import ForwardConfig, RopeTables

    spec, hp = plan.spec, plan.hparams
    cfg = ForwardConfig.from_plan(plan)
    d, eps = hp.head_dim, hp.rms_eps
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", cfg.n_vocab])]
    for i in range(hp.n_layer):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32,
                                                        ["batch", hp.n_head_kv, "past", d]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, ["batch", hp.n_head_kv, "total", d]))

    # GroupQueryAttention's bookkeeping: seqlens_k = valid tokens - 1 per row, total = mask width
    mask_sum = g.one("ReduceSum", ["attention_mask", g.const("axes", np.array([1], np.int64))], keepdims=0)
    seqlens_k = g.one("Cast", [g.one("Sub", [mask_sum, g.const("one", np.array(1, np.int64))])], to=TensorProto.INT32)
    total = g.one("Cast", [g.one("Gather", [g.one("Shape", ["attention_mask"]), g.const("idx", np.array(1, np.int64))],
                                 axis=0)], to=TensorProto.INT32)
    rope_freqs = plan.read("rope_freqs.weight") if cfg.has_rope_freqs else None
    rope = RopeTables.build(cfg, np.arange(max_pos), rope_freqs)  # cos/sin [max_pos, d/2], llama.cpp's angles
    cos = g.initializer("cos_cache", rope.cos)
    sin = g.initializer("sin_cache", rope.sin)

    tied = "output.weight" not in {t.name for t in plan.tensors}
    x = w.embedding("input_ids")
    residual, pending = None, None  # pending: the last sub-layer's output, not yet added to the residual

    def norm(weight: str, last: bool = False) -> str:
        """rms_norm(residual + pending) with `weight`; updates the residual (unless `last`)."""
        nonlocal residual, pending
        if pending is None:
            residual = x
            return g.one("RMSNormalization", [x, w.vector(weight)], axis=-1, epsilon=eps)
        inputs = [pending, residual, w.vector(weight)]
        if last:  # no residual after the last block: the normed output only
            return g.one("SkipSimplifiedLayerNormalization", inputs, domain=MS, epsilon=eps)
        # outputs: normed, mean and inv_std_var (training only: left unnamed, so onnxruntime does
        # not compute them), the sum (the next residual)
        out, _, _, summed = g.node("SkipSimplifiedLayerNormalization", inputs, domain=MS, epsilon=eps,
                                   outputs=[g.fresh("skipnorm/out"), "", "", g.fresh("skipnorm/sum")])
        residual, pending = summed, None
        return out

    def heads_norm(t: str, weight: str, n_heads: int) -> str:
        if spec.qk_norm is QKNorm.FULL:
            return g.one("RMSNormalization", [t, w.vector(weight)], axis=-1, epsilon=eps)
        split = g.one("Reshape", [t, g.const("shape", np.array([0, 0, n_heads, d], np.int64))])
        normed = g.one("RMSNormalization", [split, w.vector(weight)], axis=-1, epsilon=eps)
        return g.one("Reshape", [normed, g.const("shape", np.array([0, 0, n_heads * d], np.int64))])

    def proj(h: str, blk: str, role: str) -> str:
        y = w.linear(h, f"{blk}{role}.weight")
        if hp.attention_bias:
            y = g.one("Add", [y, w.vector(f"{blk}{role}.bias")])
        return y

    def swiglu(h: str, gate: str, up: str, down: str) -> str:
        a, b = w.linear(h, gate), w.linear(h, up)
        act = g.one("Mul", [g.one("Mul", [a, g.one("Sigmoid", [a])]), b])
        return w.linear(act, down)

    for i in range(hp.n_layer):
        blk = f"blk.{i}."
        h = norm(blk + "attn_norm.weight")
        if spec.qk_norm is QKNorm.NONE:  # packed QKV: GroupQueryAttention splits it itself
            roles = ("attn_q", "attn_k", "attn_v")
            q = w.fused(h, [f"{blk}{r}.weight" for r in roles], blk + "attn_qkv")
            if hp.attention_bias:
                q = g.one("Add", [q, w.vectors([f"{blk}{r}.bias" for r in roles], blk + "attn_qkv.bias")])
            k = v = ""
        else:  # q and k are normed before RoPE: three projections
            q, k, v = (proj(h, blk, r) for r in ("attn_q", "attn_k", "attn_v"))
            q = heads_norm(q, blk + "attn_q_norm.weight", hp.n_head)
            k = heads_norm(k, blk + "attn_k_norm.weight", hp.n_head_kv)
        attn = g.node("GroupQueryAttention",
                      [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total, cos, sin],
                      domain=MS, name=f"attn{i}", outputs=[g.fresh(f"attn{i}"), f"present.{i}.key", f"present.{i}.value"],
                      num_heads=hp.n_head, kv_num_heads=hp.n_head_kv, do_rotary=1,
                      rotary_interleaved=0, scale=1.0 / math.sqrt(d))[0]
        pending = w.linear(attn, blk + "attn_output.weight")
        h = norm(blk + "ffn_norm.weight")
        if spec.moe is None:
            pending = swiglu(h, blk + "ffn_gate.weight", blk + "ffn_up.weight", blk + "ffn_down.weight")
        else:
            pending = _moe(g, w, spec.moe, hp, h, blk, swiglu)
    h = norm("output_norm.weight", last=True)
    if tied:
        w.tied_output(h, cfg.n_vocab, hp.n_embd, output="logits")
    else:
        w.linear(h, "output.weight", output="logits")
    return inputs, outputs


def _moe(g: _Graph, w: _Weights, moe, hp, h: str, blk: str, swiglu: Callable) -> str:
    """Routed experts (onnxruntime's MoE / QMoE node) plus the gated shared expert (standard ops):
    h [batch, seq, n_embd] -> [batch, seq, n_embd]."""
    logits = w.linear(h, blk + "ffn_gate_inp.weight")  # [b, s, n_expert], float32 router
    probs = g.one("Reshape", [logits, g.const("shape", np.array([-1, hp.n_expert], np.int64))])  # [b*s, n_expert]
    out = w.experts(h, probs, blk, hp.n_expert_used)  # top-k weights renormalized to sum to 1
    if not moe.renormalizes_top_k:
        # the family weights each expert by its softmax over all experts: scale by the top k's
        # mass. (onnxruntime 1.31's normalize_routing_weights=0 gives wrong outputs whenever the
        # node's output reuses its input's buffer, so the node always renormalizes.)
        top = g.node("TopK", [g.one("Softmax", [logits], axis=-1), g.const("k", np.array([hp.n_expert_used], np.int64))],
                     2, axis=-1)[0]  # [b, s, k]
        out = g.one("Mul", [out, g.one("ReduceSum", [top, g.const("axes", np.array([-1], np.int64))], keepdims=1)])
    if moe.shared_expert:
        shared = swiglu(h, blk + "ffn_gate_shexp.weight", blk + "ffn_up_shexp.weight", blk + "ffn_down_shexp.weight")
        gate_w = w.plan.read(blk + "ffn_gate_inp_shexp.weight").reshape(-1, 1)  # [n_embd, 1]
        gate_t = g.initializer(blk + "ffn_gate_inp_shexp.weight_t", gate_w, weights=gate_w.size)
        gate = g.one("Sigmoid", [g.one("MatMul", [h, gate_t])])
        out = g.one("Add", [out, g.one("Mul", [shared, gate])])
    return out


def _moe_node(g: _Graph, label: str, k: int, fc1, fc2, *, bits: int | None = None,
              block_size: int = 0, accuracy_level: int = 0) -> tuple[str, dict, list[str]]:
    """(op, attributes, weight inputs) of one routed-experts node. Float (MoE): fc1 [E, 2F, H] with
    gate and up rows interleaved, fc2 [E, H, F] (float16 ones are cast to float32 at load). Int
    (QMoE): fc1, fc2 = (codes [E, N, K*bits/8] uint8 in MatMulNBits' nibble order, scales
    [E, N, K/block_size] float32), symmetric (the default zero point 2^(bits-1))."""
    # SwiGLU as SiLU-gated: gate * sigmoid(1.0 * gate) * (up + 0.0), no clamp
    attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=1)
    if bits is None:
        inputs = []
        for name, t in ((label + ".fc1", fc1), (label + ".fc2", fc2)):
            init = g.initializer(name, t, weights=t.size)
            inputs.append(g.one("Cast", [init], to=1) if t.dtype == np.float16 else init)
        return "MoE", attrs, [inputs[0], "", inputs[1]]
    n1, n2 = fc1[1].size * block_size, fc2[1].size * block_size  # weights each encodes
    inputs = [g.initializer(label + ".fc1.qweight", fc1[0], weights=n1), g.initializer(label + ".fc1.scales", fc1[1], weights=0),
              "", g.initializer(label + ".fc2.qweight", fc2[0], weights=n2), g.initializer(label + ".fc2.scales", fc2[1], weights=0)]
    return "QMoE", {**attrs, "expert_weight_bits": bits, "block_size": block_size, "accuracy_level": accuracy_level}, inputs


# ---- the export --------------------------------------------------------------------------------


def _check_block_size(plan, quant: OnnxQuant, block_size: int) -> None:
    """OptionError unless `block_size` is usable and divides the hidden size (the rows of most matrices)."""
    from edgeai.quant import nbits

    if quant.bits is None:
        return
    nbits.check(quant.bits, block_size, plan.hparams.n_embd, f"the hidden size (hidden_size of {plan.source_files[0].parent}/config.json)")


def block_for(k: int, block_size: int) -> int | None:
    """The block size a matrix with rows of `k` weights gets: `block_size`, else the largest smaller
    power of two (>= 16, MatMulNBits' minimum) that divides k, else None (the matrix stays float)."""
    b = block_size
    while b >= 16:
        if k % b == 0:
            return b
        b //= 2
    return None


def _genai_config(plan, hp, n_ctx: int) -> dict:
    meta = {m.key: m.value for m in plan.kv}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = sorted({int(e) for e in ([eos] if eos is not None else [])} | {
        int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if meta.get(k) is not None})
    bos = meta.get("tokenizer.ggml.bos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id", eos_ids[0] if eos_ids else 0)
    return {
        "model": {
            "bos_token_id": int(bos) if bos is not None else None,
            "context_length": n_ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": hp.head_dim,
                "hidden_size": hp.n_embd,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": hp.n_head,
                "num_hidden_layers": hp.n_layer,
                "num_key_value_heads": hp.n_head_kv,
            },
            "eos_token_id": eos_ids if len(eos_ids) != 1 else eos_ids[0],
            "pad_token_id": int(pad),
            "type": plan.spec.gguf_arch if plan.spec.moe is None else "decoder",
            "vocab_size": int(hp.n_vocab),
        },
        # past_present_share_buffer: GroupQueryAttention (every layer's attention here) updates a
        # past buffer of max_length positions in place when it is also bound as the present
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": n_ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


# ISA features (as `edgeai.devices` profiles name them) with int8 dot products, which onnxruntime's
# MatMulNBits kernels use at accuracy_level 4: x86 AVX2 (vpmaddubsw) and VNNI, Armv8.2 dotprod
INT8_DOT_ISA = ("avx2", "avx_vnni", "avx512_vnni", "dotprod")


def accuracy_level_for(isa: tuple[str, ...] | list[str]) -> int:
    """MatMulNBits' `accuracy_level` for a CPU with these ISA features: 4 (int8 activations) where
    onnxruntime has int8 dot-product kernels for it, else 0 (float32 activations: onnxruntime has no
    int8 kernel there and computes in float32 anyway, e.g. a Raspberry Pi 4's Cortex-A72)."""
    return 4 if any(f in isa for f in INT8_DOT_ISA) else 0


def _device_accuracy(device: str | None) -> tuple[str, int]:
    """(device name, accuracy_level) for `--device` (None or "this": this machine's CPU flags)."""
    if device is None or device.strip().lower() in ("this", "this-machine"):
        from edgeai.devices.detect import isa_features

        return "this-machine", accuracy_level_for(isa_features())
    from edgeai.devices import get_profile

    profile = get_profile(device)
    return profile.name, accuracy_level_for(profile.isa)


def _grid_formats(plan, quant: OnnxQuant) -> None:
    """Give the plan's weight matrices the GGUF type with MatMulNBits' block-32 grid (Q4_0 / Q8_0),
    the types GPTQ fills and AWQ's scale search quantizes with; routers and vectors stay F32."""
    from edgeai.quant import nbits
    from edgeai.quant.formats import FORMATS

    for t in plan.tensors:
        quantized = len(t.shape) >= 2 and not t.name.endswith("ffn_gate_inp.weight") and t.shape[-1] % 32 == 0
        t.fmt = FORMATS[nbits.GGUF_TYPE[quant.bits] if quantized else "f32"]


def _check_moe_ops(quant: OnnxQuant, ort_version: str) -> None:
    """OptionError unless the installed onnxruntime runs the MoE / QMoE node the export writes
    (one tiny node, run once: the CPU kernels and their attributes came in several releases)."""
    import onnxruntime
    from onnx import TensorProto, helper

    e, h, f = 2, 32, 32
    g = _Graph(None)  # initializers kept in the graph
    if quant.bits is None:
        op, attrs, inputs = _moe_node(g, "probe", 1, np.zeros((e, 2 * f, h), np.float32), np.zeros((e, h, f), np.float32))
    else:
        def zeros(n: int, k: int):
            return np.zeros((e, n, k * quant.bits // 8), np.uint8), np.ones((e, n, k // 32), np.float32)

        op, attrs, inputs = _moe_node(g, "probe", 1, zeros(2 * f, h), zeros(h, f), bits=quant.bits, block_size=32,
                                      accuracy_level=4)
    node = helper.make_node(op, ["x", "r", *inputs], ["y"], domain=MS, **attrs)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, h]),
                                                 helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, e])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              ir_version=IR_VERSION)
    try:
        opts = onnxruntime.SessionOptions()
        opts.log_severity_level = 4
        session = onnxruntime.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.zeros((1, h), np.float32), "r": np.zeros((1, e), np.float32)})
    except Exception as exc:  # onnxruntime's Fail / NotImplemented / InvalidGraph
        raise OptionError(
            f"the installed onnxruntime {ort_version} cannot run the {op} contrib op the MoE layers are exported with "
            f"({str(exc).splitlines()[0][:200]}); onnxruntime >= {'.'.join(map(str, MIN_ORT_MOE))} runs it: "
            "`pip install -U onnxruntime`"
        ) from exc


def export_onnx(
    src: str | Path | None,
    output: str | Path | None,
    *,
    quant: str | OnnxQuant = OnnxQuant.FP32,
    block_size: int = 32,
    method: str | Method = Method.RTN,
    calib: str | Path | None = None,
    calib_ctx: int = 512,
    prune: str | Sequence[PruneSpec] | None = None,
    device: str | None = None,
    accuracy_level: int | None = None,
    force: bool = False,
    progress=None,
    trust_pickle: bool = False,
    threads: int = 0,
) -> Path:
    """Export a Hugging Face checkpoint as an ONNX folder that onnxruntime (and onnxruntime-genai) runs.

    Args:
        src: a Hugging Face folder (config.json, safetensors, tokenizer.json).
        output: the folder to create; it appears only once complete and checked.
        quant: fp32, fp16 (stored half, computed float32), int8 or int4 (`MatMulNBits`).
        block_size: weights per scale for int8/int4: 32, 64 or 128; must divide every row.
        method: rtn (least-squares scale search, no data), imatrix (the search weighted by the
            calibration text's mean x^2 per column), awq (activation-aware input-channel scales
            folded into the layer before, `edgeai.quant.awq`, then imatrix; the scale search
            measures its error on the 32-wide grid) or gptq (32-wide blocks only).
        calib: calibration text (UTF-8) for imatrix, awq, gptq and the pruning steps that need data.
        calib_ctx: tokens per calibration chunk.
        prune: pruning before quantization, as for GGUF (`edgeai.quant.prune.parse_prune`):
            "wanda:0.5", "2:4", "layers:2", "experts:0.25", steps joined by commas.
        device: the device profile (`edgeai devices`) the folder is for: its CPU sets MatMulNBits'
            accuracy_level (`accuracy_level_for`); None or "this" means this machine.
        accuracy_level: MatMulNBits' compute type, overriding the device's: 4 quantizes activations
            to int8 (CPUs with int8 dot products: AVX2/VNNI, Arm dotprod), 0 computes in float32.
        force: replace `output` if it exists.
        progress: called with (weights written, weights in all, what) as the graph's weights are
            encoded (`converters.convert.Progress`); the CLI draws its bar with it.
        trust_pickle: allow PyTorch `.bin` checkpoints.
        threads: quantization threads; 0 uses every core.

    Returns:
        The folder written.
    """
    from edgeai.converters.pipeline import calibration_text, checked_knobs, prepare
    from edgeai.converters.plan import open_plan
    from edgeai.quant.prune import parse_prune
    from edgeai.quant.recipes import get_recipe

    if output is None:
        raise OptionError("an output folder is needed (-o OUT_DIR)")
    output = Path(output)
    threads, calib_ctx = checked_knobs(threads, calib_ctx)
    quant, method = parse_quant(quant), parse_method(method)
    if quant.bits is None and method is not Method.RTN:
        raise OptionError(f"--method {method.value} only applies to int8/int4; --quant {quant.value} has no codes to choose")
    if method is Method.GPTQ and block_size != 32:
        raise OptionError("--method gptq runs on the Q4_0/Q8_0 grids of 32-wide blocks; use --block-size 32 "
                          "(or --method imatrix / awq for 64/128)")
    device_name, device_level = _device_accuracy(device)
    if accuracy_level is None:
        accuracy_level = device_level
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise OptionError(f"accuracy_level {accuracy_level} must be 0..4 (MatMulNBits)")
    prune_steps = parse_prune(prune)
    calib_text = calibration_text(calib, method, prune_steps)
    ort_version = check_onnxruntime()
    src_path = Path(src) if src is not None else None
    if src_path is not None:
        check_not_source(output, src_path)
    check_replaceable(output, force=force, ours=OUTPUT_FILES)
    if src_path is None or not src_path.is_dir():
        raise CheckpointError(
            f"{src_path or 'the bundled GGUF'}: ONNX export reads a Hugging Face checkpoint folder (config.json, "
            "safetensors, tokenizer.json); GGUF sources carry no tokenizer.json for the ONNX folder"
        )
    if not (src_path / "tokenizer.json").is_file():
        raise CheckpointError(f"{src_path} has no tokenizer.json, which the ONNX folder's runtimes read; "
                              "save the tokenizer with transformers' save_pretrained() first")
    recipe = get_recipe("f32")
    plan = open_plan(src_path, recipe, trust_pickle=trust_pickle)
    try:
        if plan.spec is None or plan.hparams is None:
            raise UnsupportedArchitectureError(f"{src_path}: architecture {plan.arch!r} has no ONNX graph")
        if plan.spec.sandwich_norms or plan.spec.swa_pattern_default is not None:
            raise UnsupportedArchitectureError(f"{src_path}: the ONNX graph has no {plan.spec.family} layers (sliding "
                                               "windows, norms after attention and FFN) yet; convert to GGUF instead")
        _check_block_size(plan, quant, block_size)
        if plan.hparams.head_dim % 16:
            raise UnsupportedArchitectureError(
                f"{src_path}: head_dim {plan.hparams.head_dim} is not a multiple of 16, which onnxruntime's "
                "GroupQueryAttention needs on CPU; the ONNX path does not cover this configuration yet (GGUF does)"
            )
        if plan.spec.moe is not None:
            _check_moe_ops(quant, ort_version)
        started = time.perf_counter()
        # the plan stays F32 (MatMulNBits quantizes); AWQ and GPTQ quantize with its grids
        prepared = prepare(plan, recipe, method, calib=calib, calib_text=calib_text, calib_ctx=calib_ctx,
                           prune_steps=prune_steps, threads=threads, grid=lambda p: _grid_formats(p, quant))
        importance, encoded = prepared.importance, prepared.encoded
        opts = _Options(quant, block_size, accuracy_level)
        plan.extra_recipe["device"] = device_name
        with atomic_output_dir(output, force=force, ours=OUTPUT_FILES) as tmp:
            _write_folder(tmp, plan, opts, method, importance, encoded, threads, ort_version, progress,
                          f"exporting to {output.name}")
        log.info("exported %s in %.1f s", output, time.perf_counter() - started)
        return output
    finally:
        plan.close()


def _write_folder(folder: Path, plan, opts: _Options, method: Method, importance, encoded, threads: int,
                  ort_version: str, progress=None, what: str = "") -> None:
    import onnx
    from onnx import helper

    hp = plan.hparams
    n_ctx = hp.n_ctx_train
    data = _ExternalData(folder / DATA_FILE)
    try:
        planned = sum(int(np.prod(t.shape, dtype=np.int64)) for t in plan.tensors)
        g = _Graph(data, progress=progress, planned=planned, what=what)
        w = _Weights(g, plan, opts, importance, encoded, threads)
        inputs, outputs = _build_graph(g, plan, w, n_ctx)
    finally:
        data.close()
    graph = helper.make_graph(g.nodes, "edgeai-decoder", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              ir_version=IR_VERSION, producer_name="edgeai", producer_version=__version__)
    recipe = {
        "tool": "edgeai",
        "version": __version__,
        "format": "onnx",
        "quant": opts.quant.value,
        "block_size": opts.block_size if opts.quant.bits else None,
        "accuracy_level": opts.accuracy_level if opts.quant.bits else None,
        "method": method.value,
        "source": plan.source_files[0].parent.name,
        "source_format": plan.source_format,
        "architecture": plan.spec.family,
        "tensor_types": w.types,
        "fallbacks": w.fallbacks,
        "n_weights": g.n_weights,
        "weight_bytes": g.weight_bytes,
        "onnxruntime_at_export": ort_version,
        **plan.extra_recipe,
    }
    helper.set_model_props(model, {"edgeai.recipe": json.dumps(recipe, sort_keys=True)})
    model_path = folder / MODEL_FILE
    onnx.save_model(model, str(model_path))
    del model, graph
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise OutputError(f"the exported graph fails onnx.checker: {exc}; nothing was written") from exc
    source = Path(plan.source.path)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    from edgeai.converters.tokenizer import chat_template

    template = chat_template(source)
    if template and not (folder / "chat_template.jinja").exists():
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    (folder / GENAI_CONFIG).write_text(json.dumps(_genai_config(plan, hp, n_ctx), indent=2))
    log.info("%s: %d nodes, %d weights in %.1f MiB (%.2f bits per weight)", folder, len(g.nodes), g.n_weights,
             g.weight_bytes / 2**20, 8 * g.weight_bytes / max(1, g.n_weights))
