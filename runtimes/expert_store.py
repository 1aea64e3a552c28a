"""The native engine's streaming store options, typed on both sides of the Python/C++ seam.

A user gives `expert_store=` as a mapping of option names (or an `ExpertStoreOptions`);
`checked_store_options` checks every value against its bound and turns the modes into the enums
below, and `native_stream_config` fills the engine's own struct (`_native.StreamConfig`) from that.
No string-keyed dict and no mode string reaches C++: the enums' member names are the bound C++
enums' member names, their values are the names users write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum

from edgeai.errors import OptionError
from edgeai.options import checked_choice, checked_int


class CachePolicy(Enum):
    """Which cached unit a streaming store evicts (the rules are in native/src/expert_store.cpp)."""

    NEXT_USE = "next-use"  # the default: the estimated next use farthest away (chosen by benchmarks/expert_streaming.py)
    LRU = "lru"
    LFU = "lfu"
    LAYER = "layer"


class ReadMethod(Enum):
    """How a streaming store reads the file."""

    AUTO = "auto"  # io_uring where the kernel allows it, else pread
    URING = "uring"  # io_uring or an error
    PREAD = "pread"


@dataclass(frozen=True)
class ExpertStoreOptions:
    """Options of the native engine's streaming store; None leaves the engine's default
    (native/src/expert_store.hpp, StreamConfig)."""

    slots: int | None = None  # experts cached; set: stream with this many whatever the memory plan says
    layer_slots: int | None = None  # dense layers cached when they are streamed too (0: resident)
    policy: CachePolicy | None = None
    io: ReadMethod | None = None
    io_threads: int | None = None  # reads in flight (pread threads; io_uring: 3x this many reads)
    direct: bool | None = None  # bypass the page cache
    trace: bool | None = None  # record demand accesses (`NativeBackend.expert_trace`)
    prefetch: bool | None = None  # False: demand reads only
    prefetch_top: int | None = None  # experts read ahead per layer (0: half of those a token uses)
    retries: int | None = None  # attempts after a failed or short read
    inject_read_faults: int | None = None  # tests: the first N reads fail


OPTION_NAMES = tuple(f.name for f in fields(ExpertStoreOptions))
_FLAGS = ("direct", "trace", "prefetch")
_CHOICES = {"policy": CachePolicy, "io": ReadMethod}


def checked_store_options(options: Mapping | ExpertStoreOptions | None, *, n_layer: int,
                          n_expert: int) -> ExpertStoreOptions:
    """`options` (a mapping of option names, or an ExpertStoreOptions) checked for a model of
    n_layer layers of n_expert experts (0 for a dense model), every value against its bound before
    the engine sizes anything by it. Modes may be given by their names ("lru", "pread") or as
    enum members. Raises OptionError naming the option, and the choices or bounds."""
    if options is None:
        return ExpertStoreOptions()
    if isinstance(options, ExpertStoreOptions):
        options = {name: value for name in OPTION_NAMES if (value := getattr(options, name)) is not None}
    if not isinstance(options, Mapping):
        raise OptionError(f"expert_store must be a mapping of option names or an ExpertStoreOptions, "
                          f"got {type(options).__name__}")
    n_expert = max(1, n_expert)
    counts = {  # option -> (smallest, largest, why)
        "slots": (0, n_layer * n_expert, "one per expert of the model at most; 0 with layer_slots: a dense model"),
        "layer_slots": (0, n_layer, "one per layer at most"),
        "io_threads": (1, 64, "reader threads"),
        "prefetch_top": (0, n_expert, "experts prefetched per layer, at most the layer's experts"),
        "retries": (0, 100, "reads retried after an I/O error"),
        "inject_read_faults": (0, 2**31 - 1, "tests only"),
    }
    out = {}
    for key, value in options.items():
        option = f"expert_store[{key!r}]"
        if key in counts:
            lo, hi, why = counts[key]
            out[key] = checked_int(option, value, minimum=lo, maximum=hi, why=why)
        elif key in _FLAGS:
            if not isinstance(value, bool):
                raise OptionError(f"{option} must be True or False, got {value!r:.40}")
            out[key] = value
        elif key in _CHOICES:
            out[key] = checked_choice(option, value, _CHOICES[key])
        else:
            raise OptionError(f"unknown expert_store option {key!r:.40}; the options are {', '.join(OPTION_NAMES)}")
    return ExpertStoreOptions(**out)


def with_slots(options: ExpertStoreOptions, slots: int, layer_slots: int) -> ExpertStoreOptions:
    """`options` with slot counts where the user gave none (a planner's counts)."""
    return replace(options, slots=slots if options.slots is None else options.slots,
                   layer_slots=layer_slots if options.layer_slots is None else options.layer_slots)


def native_stream_config(options: ExpertStoreOptions):
    """The engine's `_native.StreamConfig` for checked options: the engine's defaults, with every
    option that is set copied over, modes as the bound C++ enums."""
    from edgeai.native_bridge import native

    config = native.StreamConfig()
    for name in OPTION_NAMES:
        value = getattr(options, name)
        if isinstance(value, CachePolicy):
            value = native.CachePolicy[value.name]
        elif isinstance(value, ReadMethod):
            value = native.ReadMethod[value.name]
        if value is not None:
            setattr(config, name, value)
    return config


def policy_name(native_policy) -> str:
    """The user-facing name of a policy the engine reports (its stats); "" for none (no streaming)."""
    return "" if native_policy is None else CachePolicy[native_policy.name].value
