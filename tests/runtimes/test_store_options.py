"""The streaming store's options across the Python/C++ seam (runtimes/expert_store.py): checked
and typed in Python, handed to the engine as its own struct with its own enums, never as strings."""

from __future__ import annotations

import pytest

from edgeai.errors import OptionError
from edgeai.native_bridge import native
from edgeai.options import checked_choice
from edgeai.runtimes.expert_store import (OPTION_NAMES, CachePolicy, ExpertStoreOptions, ReadMethod,
                                          checked_store_options, native_stream_config, policy_name)


def test_python_enums_name_the_same_members_as_the_engines():
    assert [m.name for m in CachePolicy] == [m.name for m in native.CachePolicy]
    assert [m.name for m in ReadMethod] == [m.name for m in native.ReadMethod]
    engine_fields = {name for name in dir(native.StreamConfig()) if not name.startswith("_")}
    assert engine_fields == set(OPTION_NAMES)


def test_modes_are_taken_by_name_or_member_and_refused_with_the_choices():
    opts = checked_store_options({"policy": "LRU", "io": ReadMethod.PREAD, "slots": 3}, n_layer=2, n_expert=4)
    assert opts == ExpertStoreOptions(slots=3, policy=CachePolicy.LRU, io=ReadMethod.PREAD)
    assert checked_store_options(opts, n_layer=2, n_expert=4) == opts  # already typed: checked again, unchanged
    for options, message in (({"policy": "fifo"}, r"expert_store\['policy'\] must be one of next-use, lru, lfu, layer, got 'fifo'"),
                             ({"io": 1}, r"expert_store\['io'\] must be one of auto, uring, pread, got 1"),
                             ({"polcy": "lru"}, "unknown expert_store option 'polcy'; the options are slots, layer_slots, policy"),
                             (ExpertStoreOptions(slots=10**6), r"expert_store\['slots'\] must be a whole number in 0\.\.8")):
        with pytest.raises(OptionError, match=message):
            checked_store_options(options, n_layer=2, n_expert=4)
    with pytest.raises(OptionError, match="expert_store must be a mapping"):
        checked_store_options([("slots", 2)], n_layer=2, n_expert=4)
    assert checked_choice("mode", "Pread", ReadMethod) is ReadMethod.PREAD
    with pytest.raises(OptionError, match="mode must be one of auto, uring, pread, got <CachePolicy.LRU"):
        checked_choice("mode", CachePolicy.LRU, ReadMethod)  # another enum's member is not a choice


def test_the_engine_gets_its_own_struct_with_unset_options_at_its_defaults():
    default = native.StreamConfig()
    config = native_stream_config(ExpertStoreOptions(slots=5, policy=CachePolicy.LAYER, io=ReadMethod.PREAD, trace=True))
    assert (config.slots, config.policy, config.io, config.trace) == (5, native.CachePolicy.LAYER, native.ReadMethod.PREAD, True)
    for name in ("io_threads", "direct", "prefetch", "prefetch_top", "retries", "inject_read_faults", "layer_slots"):
        assert getattr(config, name) == getattr(default, name), name
    with pytest.raises(TypeError):  # no mode string crosses the seam
        default.policy = "lru"
    assert policy_name(native.CachePolicy.NEXT_USE) == "next-use" and policy_name(None) == ""
