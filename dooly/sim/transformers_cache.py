"""How big transformers' engine makes its KV cache on a GPU: its own memory handler, asked on the CPU.

Transformers continuous batching sizes its paged cache at start-up (`PagedAttentionMemoryHandler`): the memory left
after the weights, times `max_memory_percent`, shared between the cache and the activation peaks of a step of
`max_batch_tokens` tokens. Dooly runs that same code with the weights' bytes from the model built on the meta
device. The engine's allocator holds a little more than the weights, so on the H100 the engine resolved 1-3%
fewer blocks than this (tests/test_sim.py checks the ground-truth runs); pass the engine's `num_blocks` where it
is known.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import hf_config
from ..environment import GPU_BYTES
from ..errors import DoolyError
from ..transformers_engine import BLOCK_SIZE, cache_capacity, model_class, no_weight_init

H100_BYTES = GPU_BYTES["NVIDIA H100 80GB HBM3"]


@dataclass(frozen=True)
class CacheSize:
    num_blocks: int
    max_batch_tokens: int
    weight_bytes: int


def weight_bytes(cfg) -> int:
    """Bytes of the model's weights in bf16, from the model built on the meta device."""
    import torch

    config = hf_config(cfg)
    with torch.device("meta"), no_weight_init():
        return sum(p.numel() * p.element_size() for p in model_class(config)(config).to(torch.bfloat16).parameters())


def cache_size(cfg, gpu_bytes: int = H100_BYTES, block_size: int = BLOCK_SIZE, max_batch_tokens: int | None = None,
               max_memory_percent: float = 0.9) -> CacheSize:
    """The cache the engine would allocate for the model of `cfg` (a `dooly.config.ModelConfig`), in bf16."""
    import torch
    from transformers import ContinuousBatchingConfig

    config = hf_config(cfg)
    weights = weight_bytes(cfg)
    available = int((gpu_bytes - weights) * max_memory_percent)
    cb = ContinuousBatchingConfig(block_size=block_size, max_batch_tokens=max_batch_tokens,
                                  max_memory_percent=max_memory_percent)
    try:
        tokens, blocks = cache_capacity(config, cb, torch.bfloat16, available)
    except (MemoryError, ValueError):
        raise DoolyError(f"{cfg.name}: {weights / 2**30:.1f} GiB of weights leave no room for a KV cache in "
                         f"{gpu_bytes / 2**30:.1f} GiB") from None
    return CacheSize(blocks, tokens, weights)
