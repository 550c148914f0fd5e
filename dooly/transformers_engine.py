"""transformers' continuous-batching engine as Dooly builds its pieces: the model class and the paged KV cache.

Capture traces the engine's step, the benchmarks build the engine's own attention inputs and the simulator asks its
memory handler how big a cache it allocates; all three build the same objects here. The engine sizes its cache
from the device's free memory; Dooly decides that memory instead (`available_memory`), so the cache has the blocks
asked for on any machine, GPU or not.
"""

from __future__ import annotations

import contextlib

from .errors import DoolyError

ENGINE = "transformers-cb"  # the engine's name in IR metadata and in store environments
ATTENTION = "paged|sdpa"  # the engine's attention implementation
FALLBACK_ATTENTION = "paged|eager"  # what the engine runs for a model class that refuses sdpa
BLOCK_SIZE = 256  # the engine's default KV-cache block size
UNLIMITED = 1 << 40  # memory enough for any cache: its size then comes from `num_blocks` alone


def model_class(config):
    """The causal-LM class of a (text) config: registered for its type, or, for the text part of a composite
    config (Mllama's `MllamaTextConfig`), the class registered for its family that takes it."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        pass
    family = type(config).__module__.split(".")[-2]  # transformers.models.<family>.configuration_<family>
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(family)
    cls = getattr(transformers, name, None) if name else None
    if cls is None or getattr(cls, "config_class", None) is not type(config):
        raise DoolyError(f"{config.model_type}: transformers has no causal-LM class for it")
    return cls


@contextlib.contextmanager
def no_weight_init():
    """Skip weight init: it does float math on sizes (sqrt(fan_in)), which would pin symbolic sizes to numbers."""
    import torch.nn as nn
    from transformers.initialization import no_init_weights

    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None
        with no_init_weights():
            yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


@contextlib.contextmanager
def available_memory(nbytes: int):
    """The engine's memory handler sees `nbytes` free on the device, whatever the device has."""
    from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler

    saved = PagedAttentionMemoryHandler.get_available_memory
    PagedAttentionMemoryHandler.get_available_memory = lambda self: nbytes
    try:
        yield
    finally:
        PagedAttentionMemoryHandler.get_available_memory = saved


def paged_cache(config, cb, device, dtype):
    """The engine's `PagedAttentionCache` of `cb.num_blocks` blocks, on one device (no tensor parallelism)."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.distributed import DistributedHelper

    with available_memory(UNLIMITED):
        return PagedAttentionCache(config, cb, device, DistributedHelper(None, None), tp_plan={}, dtype=dtype)


def cache_capacity(config, cb, dtype, nbytes: int) -> tuple[int, int]:
    """(max batch tokens, blocks) the engine's memory handler gives the cache when `nbytes` are free."""
    from transformers.generation.continuous_batching.cache import (
        PagedAttentionMemoryHandler,
        group_layers_by_attn_type,
    )

    groups, types = group_layers_by_attn_type(config)
    with available_memory(nbytes):
        handler = PagedAttentionMemoryHandler(config, cb, dtype, types, len(groups[0]))
        return handler.infer_max_batch_tokens_and_num_blocks()
