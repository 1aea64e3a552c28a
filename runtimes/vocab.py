"""A GGUF's tokenizer, through llama.cpp loaded with `vocab_only` (no weights are read).

Used by every backend that runs a GGUF, so that they all turn text into the same ids llama.cpp
does: token ids are part of a format claim, and llama.cpp is the reference consumer of GGUF."""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from edgeai.errors import CheckpointError, OptionError, TokenizerError

log = logging.getLogger(__name__)

_init_lock = threading.Lock()
_initialized = False


def llama_cpp():
    """llama_cpp, initialised once, with its C log routed to the `llama-cpp-python` logger at ERROR."""
    global _initialized
    import llama_cpp as ll

    with _init_lock:
        if not _initialized:
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
            ll.llama_backend_init()
            _initialized = True
    return ll


def check_vocabulary(path: Path) -> None:
    """Refuse, with a TokenizerError naming the tokens, a GGUF whose vocabulary llama.cpp's loader
    would abort the process on (two tokens of the same text). Any other problem this reader finds is
    left to llama.cpp, which knows tensor types the native reader does not."""
    from edgeai.gguf_header import read_header

    try:
        read_header(path)
    except TokenizerError:
        raise
    except CheckpointError:
        pass


class GGUFVocab:
    """Tokenizer, special tokens and chat template of a GGUF, from llama.cpp.

    `model` is a loaded llama.cpp model to take the vocabulary from; without it the file is
    loaded with `vocab_only` (cheap: no tensor data is touched). checked: the caller has read the
    file's header with `edgeai.gguf_header.read_header`, which refuses what `check_vocabulary` refuses."""

    def __init__(self, path: Path, model=None, *, checked: bool = False) -> None:
        ll = llama_cpp()
        self._ll = ll
        self._owned = None
        if model is None:
            if not checked:
                check_vocabulary(path)
            params = ll.llama_model_default_params()
            params.vocab_only = True
            params.n_gpu_layers = 0
            model = ll.llama_model_load_from_file(str(path).encode(), params)
            if not model:
                raise CheckpointError(f"llama.cpp could not read the vocabulary of {path}")
            self._owned = model
        self._vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        bos = int(ll.llama_vocab_bos(self._vocab))
        self.bos_id = None if bos == ll.LLAMA_TOKEN_NULL else bos
        eos = int(ll.llama_vocab_eos(self._vocab))
        self.eos_id = None if eos == ll.LLAMA_TOKEN_NULL else eos
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))  # tokenize() starts with BOS
        self.eog_ids = frozenset(t for t in range(self.n_vocab) if ll.llama_vocab_is_eog(self._vocab, t))
        template = ll.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8", "replace") if template else None
        if self.chat_template is None:  # a file without one (the Gemma 3 270M on PyPI): its family's format
            from edgeai.architectures import family_chat_template

            buf = ctypes.create_string_buffer(128)
            n = ll.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf))
            self.chat_template = family_chat_template(buf.value.decode("utf-8", "replace")) if n > 0 else None
            if self.chat_template is not None:
                log.info("%s has no chat template; using its architecture's (%s)", path, buf.value.decode())

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text -> ids, as llama.cpp tokenizes it."""
        ll = self._ll
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            cap = -n  # llama.cpp says how many it needs

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """llama.cpp's detokenizer: special tokens rendered as text, the first token's tokenizer-added
        leading space (SentencePiece) removed, so tokenize -> detokenize gives the text back."""
        ll = self._ll
        if not tokens:
            return b""
        # llama.cpp aborts the process (std::out_of_range) on an id outside the vocabulary
        tokens = [int(t) for t in tokens]
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise OptionError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        arr = (ll.llama_token * len(tokens))(*tokens)
        cap = 16 * len(tokens) + 16
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = ll.llama_detokenize(self._vocab, arr, len(tokens), buf, cap, False, True)
            if n >= 0:
                return buf.raw[:n]
            cap = -n

    def constraint_tokenizer(self, n_vocab: int, eog_ids: Sequence[int]):
        """This vocabulary as an llguidance LLTokenizer (structured output, `edgeai.constraints`):
        every token's bytes from llama.cpp, control tokens (and user-defined `<...>` ones) marked
        with a leading 0xff byte, llguidance's convention, so no grammar text can produce them, and
        llama.cpp's tokenizer for the grammar's literals. About 0.3 s for 49k tokens: callers cache it."""
        import llguidance

        ll = self._ll
        buf = ctypes.create_string_buffer(4096)
        tokens = []
        for t in range(self.n_vocab):
            n = ll.llama_token_to_piece(self._vocab, t, buf, len(buf), 0, True)
            if n < 0:
                raise TokenizerError(f"token {t} is longer than {len(buf)} bytes; structured output cannot map it")
            piece = buf.raw[:n]
            attr = ll.llama_vocab_get_attr(self._vocab, t)
            if attr & ll.LLAMA_TOKEN_ATTR_CONTROL or (attr & ll.LLAMA_TOKEN_ATTR_USER_DEFINED
                                                      and piece.startswith(b"<") and piece.endswith(b">")):
                piece = b"\xff" + piece
            tokens.append(piece)
        tokens += [b""] * (n_vocab - len(tokens))  # output rows past the vocabulary (padding) are never allowed
        tokenize = ctypes.cast(ll.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
        try:
            return llguidance.LLTokenizer.from_llamacpp(tokens=tokens, vocab_ptr=self._vocab, tokenize_fptr=tokenize,
                                                        eos_token=sorted(eog_ids) or None, slices=None)
        except ValueError as exc:
            raise TokenizerError(f"the vocabulary cannot be mapped for structured output: {exc}") from exc

    def close(self) -> None:
        """Free the vocabulary-only model, if this object loaded one."""
        if self._owned is not None:
            self._ll.llama_model_free(self._owned)
            self._owned = None


class VocabText:
    """tokenize/detokenize for a backend whose text work is a GGUFVocab (`self._vocab`) and whose
    `_live()` raises once it is closed: the llama.cpp and native backends."""

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        self._live()
        return self._vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        self._live()
        return self._vocab.detokenize(tokens)

    def constraint_tokenizer(self):
        """The vocabulary as an llguidance tokenizer (see `GGUFVocab.constraint_tokenizer`), made once."""
        self._live()
        if getattr(self, "_llg_tokenizer", None) is None:
            self._llg_tokenizer = self._vocab.constraint_tokenizer(self.n_vocab, self.eog_ids)
        return self._llg_tokenizer
