"""The onnxruntime backend: an ONNX folder written by `edgeai convert --format onnx`, run on CPU.

    tokens -> one graph run per batch (input_ids, attention_mask, past_key_values.*) -> logits

The KV cache never goes through Python between steps. Where the folder says its attention updates
the cache in place (genai_config.json `past_present_share_buffer`, true for GroupQueryAttention
graphs: ours and onnxruntime-genai's), each layer's past and present are one buffer of `capacity`
positions, bound as both input and output: a step writes only its new positions, and the buffer
grows (doubling, one copy) only when the context outgrows it. Otherwise present.* of one run are
bound as past_key_values.* of the next (the graph copies the past into each new present).
A decode step reuses one IO binding (token id, logits and cache bound once); only the attention
mask, whose width is the context length, is bound anew.

Sampling is the shared numpy sampler (`edgeai.runtimes.sampling`); the tokenizer is the folder's
tokenizer.json (the `tokenizers` package). `OnnxLogits` gives the evaluator (`edgeai eval`)
every position's logits from the same engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeai.errors import CheckpointError, OptionError
from edgeai.runtimes.base import GREEDY, BackendStats, Sampling, kv_cache_type
from edgeai.runtimes.sampling import make_rng, sample

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
N_BATCH = 512  # prompt tokens per graph run: bounds the logits buffer to N_BATCH * n_vocab floats
# below this memory budget onnxruntime's arena (which keeps peak allocations) is turned off
SMALL_BUDGET = 4 << 30
# positions a shared KV buffer holds at first; it doubles (up to n_ctx) when a step needs more
KV_MIN_CAPACITY = 256
MAX_LAYERS = 1 << 12  # far above any real decoder's


def _folder(path: Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def _read_json(path: Path) -> dict:
    """A JSON object file as a dict ({} if the file is absent); CheckpointError if it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON and UTF-8 errors; too deep a nesting
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object; export the folder again")
    return value


@dataclass(frozen=True)
class FolderConfig:
    """What an ONNX folder's genai_config.json, tokenizer_config.json and chat_template.jinja say,
    checked: the graph's shape of cache, its input/output names, and the tokens a chat needs."""

    n_layer: int
    n_head_kv: int
    head_dim: int
    context_length: int
    n_vocab: int
    past_names: list[str]      # past_key_values.{i}.key, .value for each layer i, in that order
    present_names: list[str]   # present.{i}.key, .value likewise
    logits_name: str
    shared_kv: bool            # search.past_present_share_buffer
    bos_id: int | None
    eos_ids: list[int]         # model.eos_token_id (a list or one id)
    eos_text: str | None       # tokenizer_config.json's eos_token
    chat_template: str | None


def read_folder_config(folder: Path) -> FolderConfig:
    """The configuration of the ONNX folder `folder`, read before its graph is loaded; a missing or
    ill-typed value is a CheckpointError naming the file and the key."""
    path = folder / GENAI_CONFIG
    genai = _read_json(path)

    def section(parent: dict, key: str, where: str) -> dict:
        value = parent.get(key, {})
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: {where}{key} should be an object; export the folder again")
        return value

    def integer(parent: dict, key: str, where: str, default: int | None = None, *, positive: bool = True) -> int | None:
        value = parent.get(key)
        if value is None:  # absent or null: the default (bos_token_id: none)
            if default is None and not positive:
                return None
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or (positive and value <= 0) or value < 0:
            raise CheckpointError(f"{path}: {where}{key} should be a {'positive' if positive else 'non-negative'} "
                                  f"integer, not {value!r:.40}; export the folder again")
        return value

    def names(parent: dict, key: str, default: str, where: str) -> list[str]:
        pattern = parent.get(key, default)
        try:
            if not isinstance(pattern, str):
                raise TypeError
            return [pattern % i for i in range(n_layer)]
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: {where}{key} should be a name with one %d (the layer), not "
                                  f"{pattern!r:.40}") from None

    model = section(genai, "model", "")
    if "model" not in genai or "decoder" not in model:
        raise CheckpointError(f"{path} has no model.decoder section; export the folder again")
    decoder = section(model, "decoder", "model.")
    n_layer = integer(decoder, "num_hidden_layers", "model.decoder.")
    if n_layer > MAX_LAYERS:  # each layer's cache names are made up front: a huge count took minutes and GBs
        raise CheckpointError(f"{path}: model.decoder.num_hidden_layers {n_layer} is implausible (at most {MAX_LAYERS})")
    names_in, names_out = section(decoder, "inputs", "model.decoder."), section(decoder, "outputs", "model.decoder.")
    past_k = names(names_in, "past_key_names", "past_key_values.%d.key", "model.decoder.inputs.")
    past_v = names(names_in, "past_value_names", "past_key_values.%d.value", "model.decoder.inputs.")
    present_k = names(names_out, "present_key_names", "present.%d.key", "model.decoder.outputs.")
    present_v = names(names_out, "present_value_names", "present.%d.value", "model.decoder.outputs.")
    logits = names_out.get("logits", "logits")
    if not isinstance(logits, str):
        raise CheckpointError(f"{path}: model.decoder.outputs.logits should be a name, not {logits!r:.40}")
    eos = model.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in eos_ids):
        raise CheckpointError(f"{path}: model.eos_token_id should be a token id or a list of them, not {eos!r:.40}")
    shared = section(genai, "search", "").get("past_present_share_buffer", False)
    if not isinstance(shared, bool):
        raise CheckpointError(f"{path}: search.past_present_share_buffer should be true or false, not {shared!r:.40}")

    tok_path = folder / "tokenizer_config.json"
    tok_config = _read_json(tok_path)
    eos_text = tok_config.get("eos_token")
    eos_text = eos_text.get("content") if isinstance(eos_text, dict) else eos_text
    if eos_text is not None and not isinstance(eos_text, str):
        raise CheckpointError(f"{tok_path}: eos_token should be a string, not {eos_text!r:.40}")
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        try:
            template = template_file.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{template_file} is not readable UTF-8 text: {exc}") from exc
    else:
        template = tok_config.get("chat_template")
        if template is not None and not isinstance(template, str):
            log.warning("%s: chat_template is not a string; chats use a plain 'role: text' template", tok_path)
            template = None
    return FolderConfig(
        n_layer=n_layer, n_head_kv=integer(decoder, "num_key_value_heads", "model.decoder."),
        head_dim=integer(decoder, "head_size", "model.decoder."),
        context_length=integer(model, "context_length", "model.", 2048),
        n_vocab=integer(model, "vocab_size", "model."),
        past_names=[n for pair in zip(past_k, past_v) for n in pair],
        present_names=[n for pair in zip(present_k, present_v) for n in pair],
        logits_name=logits, shared_kv=shared, bos_id=integer(model, "bos_token_id", "model.", positive=False),
        eos_ids=eos_ids, eos_text=eos_text or None, chat_template=template)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of its bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class _TokenBytes:
    """Token id -> the bytes it stands for, from tokenizer.json: byte-level BPE through GPT-2's
    alphabet, SentencePiece through '▁' and <0xNN> byte tokens; added (special) tokens as their text.
    Pieces are concatenated without stripping a leading space, as llama.cpp's token_to_piece does."""

    def __init__(self, tokenizer, tj: dict):
        decoder = tj.get("decoder") or {}
        steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
        kinds = {s.get("type") for s in steps}
        self.byte_level = "ByteLevel" in kinds
        self.byte_fallback = "ByteFallback" in kinds
        self.added = {t["id"] for t in tj.get("added_tokens", [])}
        self.tokenizer = tokenizer
        self.bytes_of = _byte_decoder() if self.byte_level else None
        self.cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        piece = self.cache.get(token)
        if piece is not None:
            return piece
        text = self.tokenizer.id_to_token(int(token))
        if text is None:
            piece = b""
        elif token in self.added:
            piece = text.encode("utf-8")
        elif self.byte_level:
            piece = bytes(self.bytes_of.get(c, 0x3F) for c in text)
        elif self.byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            piece = bytes([int(text[3:5], 16)])
        else:
            piece = text.replace("\u2581", " ").encode("utf-8")
        self.cache[token] = piece
        return piece


class OnnxBackend:
    """One ONNX folder and one sequence in onnxruntime (`edgeai.runtimes.base.Backend`)."""

    name = "onnxruntime"
    can_evict = False  # see evict()
    can_compact = False
    n_seq = 1  # one sequence: requests run one at a time

    @classmethod
    def can_run(cls, path: Path, header=None) -> str | None:
        """None if this backend can run `path` (an ONNX folder or its model.onnx), else why not.
        header: always None here (a GGUF header), taken as every backend takes it."""
        folder = _folder(Path(path))
        if not (folder / MODEL_FILE).is_file():
            return f"{path} is not an ONNX folder (no {MODEL_FILE})"
        if not (folder / "tokenizer.json").is_file():
            return f"{folder} has no tokenizer.json"
        if not (folder / GENAI_CONFIG).is_file():
            return f"{folder} has no {GENAI_CONFIG} (export it with `edgeai convert --format onnx`)"
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed (`pip install onnxruntime`)"
        return None

    def __init__(self, path: Path, *, n_ctx: int | None = None, threads: int | None = None,
                 memory_budget: int | None = None, kv_cache: str | None = None, header=None):
        """kv_cache: only "f16"/None: the graph fixes its KV cache's type (its float type). header:
        unused (an ONNX folder has no GGUF header), taken as every backend takes it."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        reason = self.can_run(path)
        if reason:
            raise CheckpointError(reason)
        if kv_cache_type(kv_cache) != "f16":
            raise OptionError(f"onnxruntime keeps the KV cache in the graph's float type; a {kv_cache_type(kv_cache)} KV "
                              "cache is for the native and llama.cpp backends (--backend native)")
        self.path = _folder(Path(path))
        config = read_folder_config(self.path)
        self.n_layer, self.n_head_kv, self.head_dim = config.n_layer, config.n_head_kv, config.head_dim
        context = config.context_length
        from edgeai.options import checked_int

        self.n_ctx = context if n_ctx is None else \
            checked_int("n_ctx", n_ctx, minimum=1, maximum=context, why=f"the context length of {self.path.name}")
        from edgeai.devices import checked_threads

        self.threads = checked_threads(threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if memory_budget is not None and memory_budget < SMALL_BUDGET:
            opts.enable_cpu_mem_arena = False
            opts.enable_mem_pattern = False
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(self.path / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
            raise CheckpointError(f"onnxruntime cannot load {self.path / MODEL_FILE}: {exc}") from exc
        self._ort = ort
        # value names as genai_config.json gives them (any onnxruntime-genai decoder folder runs here)
        self._past_names, self._present_names = config.past_names, config.present_names
        self._logits_name = config.logits_name
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        missing = [n for n in [self._logits_name, *self._present_names] if n not in outputs]
        missing += [n for n in ["input_ids", "attention_mask", *self._past_names] if n not in inputs]
        if missing:
            raise CheckpointError(f"{self.path / MODEL_FILE} has no input/output {missing[0]!r}; it is not a decoder "
                                  f"graph as {GENAI_CONFIG} describes it")
        self._has_positions = "position_ids" in inputs
        logits_type = next(o.type for o in self._session.get_outputs() if o.name == self._logits_name)
        self._logits_float32 = logits_type == "tensor(float)"
        self.shared_kv = config.shared_kv
        self._kv_dtype = np.float16 if "float16" in inputs[self._past_names[0]].type else np.float32
        self.n_vocab = config.n_vocab

        self._tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self._token_bytes = _TokenBytes(self._tokenizer, _read_json(self.path / "tokenizer.json"))
        self._llg_tokenizer = None  # made by constraint_tokenizer() on first use
        self.bos_id = config.bos_id
        eog = set(config.eos_ids)
        eos_text = config.eos_text
        if eos_text and self._tokenizer.token_to_id(eos_text) is not None:
            eog.add(self._tokenizer.token_to_id(eos_text))
        self.eog_ids = frozenset(eog)
        # the end-of-sequence token chat templates call eos_token: the tokenizer's own, else the config's first
        eos_ids = config.eos_ids
        self.eos_id = (self._tokenizer.token_to_id(eos_text) if eos_text and self._tokenizer.token_to_id(eos_text) is not None
                       else eos_ids[0] if eos_ids else None)
        self.chat_template = config.chat_template
        self._sampling, self._rng = GREEDY, make_rng(GREEDY)
        self._history: list[int] = []
        self._kv: list = []  # OrtValues [1, n_head_kv, positions or capacity, head_dim], past/present order
        self._kv_arrays: list[np.ndarray] = []  # shared mode: the numpy buffers those OrtValues wrap
        self._decode = None  # shared mode: the decode step's IO binding, made once per buffer size
        self._mask = np.ones((1, self.n_ctx), np.int64)  # attention_mask rows are prefixes of this
        self._last: np.ndarray | None = None
        self._reset_cache()
        data = self.path / (MODEL_FILE + ".data")
        self._weights_bytes = data.stat().st_size if data.is_file() else (self.path / MODEL_FILE).stat().st_size

    def _live(self):
        """The session; OptionError once the backend is closed."""
        if self._session is None:
            raise OptionError(f"the onnxruntime backend for {self.path.name} is closed")
        return self._session

    # ---- the cache ---------------------------------------------------------------------------
    def _empty(self):
        return self._ort.OrtValue.ortvalue_from_numpy(np.zeros((1, self.n_head_kv, 0, self.head_dim), self._kv_dtype))

    def _reset_cache(self) -> None:
        if not self.shared_kv:
            self._kv = [self._empty() for _ in self._past_names]
        elif not self._kv:
            self._reserve(KV_MIN_CAPACITY)
        # a shared buffer keeps its size: positions past n_past are never read and get overwritten
        self._history = []
        self._last = None

    @property
    def capacity(self) -> int:
        """Positions the shared KV buffers hold now (shared mode), else the positions cached."""
        return self._kv_arrays[0].shape[2] if self.shared_kv else self.n_past

    def _reserve(self, n: int) -> None:
        """Shared mode: make the KV buffers hold at least `n` positions (doubling, at most n_ctx),
        keeping the first n_past."""
        if self._kv_arrays and n <= self._kv_arrays[0].shape[2]:
            return
        old = self._kv_arrays[0].shape[2] if self._kv_arrays else 0
        size = min(self.n_ctx, max(n, 2 * old, KV_MIN_CAPACITY))
        keep = self.n_past
        arrays = []
        for previous in self._kv_arrays or [None] * len(self._past_names):
            a = np.zeros((1, self.n_head_kv, size, self.head_dim), self._kv_dtype)
            if previous is not None and keep:
                a[:, :, :keep] = previous[:, :, :keep]
            arrays.append(a)
        # the OrtValues share the arrays' memory (CPU): onnxruntime reads and writes them in place
        self._kv_arrays = arrays
        self._kv = [self._ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        self._decode = None

    @property
    def n_past(self) -> int:
        return len(self._history)

    @property
    def history(self) -> list[int]:
        return list(self._history)

    def truncate(self, n: int) -> None:
        """Keep the first `n` positions of the KV cache."""
        self._live()
        if not 0 <= n <= self.n_past:
            raise OptionError(f"cannot keep {n} positions: the cache holds {self.n_past}")
        if n == self.n_past:
            return
        if n == 0:
            self._reset_cache()
            return
        if not self.shared_kv:
            ort_value = self._ort.OrtValue.ortvalue_from_numpy
            self._kv = [ort_value(np.ascontiguousarray(v.numpy()[:, :, :n])) for v in self._kv]
        self._history = self._history[:n]
        self._last = None

    # ---- running -------------------------------------------------------------------------------
    def _bind_cache(self, binding) -> None:
        """Bind past_key_values.* (and, in shared mode, present.* to the same buffers)."""
        for name, value in zip(self._past_names, self._kv):
            binding.bind_ortvalue_input(name, value)
        if self.shared_kv:
            for name, value in zip(self._present_names, self._kv):
                binding.bind_ortvalue_output(name, value)
        else:
            for name in self._present_names:
                binding.bind_output(name)

    def _decode_binding(self):
        """(binding, token id and position arrays [1, 1], logits array [1, 1, n_vocab]) of a
        shared-mode decode step: bound once; the token and position are written into, and the
        logits read from, these arrays in place."""
        if self._decode is None:
            session, ort_value = self._live(), self._ort.OrtValue.ortvalue_from_numpy
            ids, pos = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
            logits = np.zeros((1, 1, self.n_vocab), np.float32)
            binding = session.io_binding()
            values = [ort_value(ids), ort_value(pos), ort_value(logits)]
            binding.bind_ortvalue_input("input_ids", values[0])
            if self._has_positions:
                binding.bind_ortvalue_input("position_ids", values[1])
            binding.bind_ortvalue_output(self._logits_name, values[2])
            self._bind_cache(binding)
            # the OrtValues stay with the binding: the arrays they wrap must outlive it
            self._decode = (binding, ids, pos, logits, values)
        return self._decode[:4]

    def _run(self, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` (one graph run) and return their logits [len(tokens), n_vocab] (a view)."""
        session = self._live()
        n, total = len(tokens), self.n_past + len(tokens)
        if self.shared_kv:
            self._reserve(total)
        if self.shared_kv and n == 1 and self._logits_float32:
            binding, ids, pos, logits = self._decode_binding()
            ids[0, 0], pos[0, 0] = tokens[0], self.n_past
            binding.bind_cpu_input("attention_mask", self._mask[:, :total])
            session.run_with_iobinding(binding)
            self._history.append(int(tokens[0]))
            return logits[0]
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", self._mask[:, :total])
        if self._has_positions:
            binding.bind_cpu_input("position_ids", np.arange(self.n_past, total, dtype=np.int64)[None])
        binding.bind_output(self._logits_name)
        self._bind_cache(binding)
        session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        if not self.shared_kv:
            self._kv = list(outs[1:])  # present.* become the next run's past_key_values.*
        self._history.extend(int(t) for t in tokens)
        return outs[0].numpy()[0].astype(np.float32, copy=False)

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        self._live()
        if len(tokens) == 0:
            raise OptionError("step() needs at least one token")
        if self.n_past + len(tokens) > self.n_ctx:
            raise OptionError(f"the context is full: {self.n_past} + {len(tokens)} tokens exceed n_ctx {self.n_ctx}; "
                              "truncate() the cache or load with a larger n_ctx")
        bad = [t for t in tokens if not 0 <= int(t) < self.n_vocab]
        if bad:
            raise OptionError(f"token id {bad[0]} is outside the vocabulary [0, {self.n_vocab})")

    def eval_all(self, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` and return the logits of every one of them, [len(tokens), n_vocab] float32."""
        self._check_tokens(tokens)
        parts = [self._run(tokens[i:i + N_BATCH]).copy() for i in range(0, len(tokens), N_BATCH)]
        self._last = parts[-1][-1]
        return np.concatenate(parts)

    def compact(self, keep: int, sink: int, recent: int, probe: Sequence[int] = ()) -> np.ndarray:
        """Refused, as evict."""
        from edgeai.errors import BackendError

        raise BackendError("the onnxruntime backend cannot compact its KV cache (its graph rotates the keys it caches); "
                           "use the native backend")

    def evict(self, start: int, end: int) -> None:
        """Refused: the graph rotates keys inside GroupQueryAttention before caching them, and
        re-rotating the cached keys would need the rotary tables outside the graph."""
        from edgeai.errors import BackendError

        raise BackendError("the onnxruntime backend cannot evict KV positions (its graph rotates the keys it caches); "
                           "use the native or llama.cpp backend")

    def step(self, tokens: Sequence[int], mask: np.ndarray | None = None) -> int:
        """Append `tokens` (prefill in batches of N_BATCH), sample the next token and return it."""
        self._check_tokens(tokens)
        for i in range(0, len(tokens), N_BATCH):
            logits = self._run(tokens[i:i + N_BATCH])
        self._last = np.array(logits[-1], dtype=np.float32)
        return sample(self._last, self._history, self._sampling, self._rng, mask)

    def logits(self) -> np.ndarray:
        if self._last is None:
            raise OptionError("no logits yet: call step() first (truncate() drops them)")
        return self._last.copy()

    def set_sampling(self, sampling: Sampling) -> None:
        self._sampling, self._rng = sampling, make_rng(sampling)

    # ---- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        self._live()
        self._tokenizer.encode_special_tokens = not parse_special
        return list(self._tokenizer.encode(text, add_special_tokens=add_special).ids)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        self._live()
        return b"".join(self._token_bytes(int(t)) for t in tokens)

    def constraint_tokenizer(self):
        """The vocabulary as an llguidance tokenizer (structured output, `edgeai.constraints`), from
        the folder's tokenizer.json, which llguidance reads with the same Rust tokenizers; made once."""
        self._live()
        if self._llg_tokenizer is None:
            import llguidance

            from edgeai.errors import TokenizerError

            try:
                self._llg_tokenizer = llguidance.LLTokenizer(self._tokenizer.to_str(), n_vocab=self.n_vocab,
                                                             eos_token=sorted(self.eog_ids) or None)
            except ValueError as exc:
                raise TokenizerError(f"the tokenizer of {self.path} cannot be mapped for structured output: {exc}") from exc
        return self._llg_tokenizer

    def adds_bos(self) -> bool:
        """Whether tokenize(add_special=True) starts with BOS (the tokenizer's post-processor decides)."""
        ids = self.tokenize("a", add_special=True)
        return self.bos_id is not None and bool(ids) and ids[0] == self.bos_id

    def stats(self) -> BackendStats:
        kv_bytes = sum(int(np.prod(v.shape())) * np.dtype(self._kv_dtype).itemsize for v in self._kv)
        return BackendStats(self.name, self.n_ctx, self.n_past, self.threads, self._weights_bytes,
                            {"kv_bytes": kv_bytes, "onnxruntime": self._ort.__version__})

    def close(self) -> None:
        self._kv, self._kv_arrays, self._decode = [], [], None
        self._session = None  # onnxruntime frees the session with its last reference
        self._history = []


class OnnxLogits:
    """An ONNX folder as the evaluator's `LogitsProvider` (`edgeai.evaluate`)."""

    def __init__(self, path: Path, *, n_ctx: int, threads: int = 0):
        self.path = Path(path)
        self._backend = OnnxBackend(self.path, n_ctx=None, threads=threads or None)
        if n_ctx > self._backend.n_ctx:
            raise OptionError(f"--ctx {n_ctx} exceeds the context length {self._backend.n_ctx} of {self.path}")
        self.n_vocab = self._backend.n_vocab
        self.bos_token = self._backend.bos_id if self._backend.adds_bos() else None

    def tokenize(self, text: str) -> list[int]:
        """BOS as the tokenizer adds it; special-token markup is plain text (as llama-perplexity does)."""
        return self._backend.tokenize(text, add_special=True, parse_special=False)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        self._backend.truncate(0)
        return self._backend.eval_all(list(tokens))

    def close(self) -> None:
        self._backend.close()


def onnx_size(path: Path) -> tuple[int, float]:
    """(bytes of model.onnx + model.onnx.data, bits per weight from the recipe) of an ONNX folder."""
    import onnx

    folder = _folder(Path(path))
    files = [folder / MODEL_FILE, folder / (MODEL_FILE + ".data")]
    size = sum(f.stat().st_size for f in files if f.is_file())
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    recipe = json.loads(props.get("edgeai.recipe", "{}"))
    n_weights, weight_bytes = recipe.get("n_weights"), recipe.get("weight_bytes")
    bpw = 8.0 * weight_bytes / n_weights if n_weights else float("nan")
    return size, bpw
