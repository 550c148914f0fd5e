"""vLLM 0.24's KV cache, as its scheduler sees it: the pool of blocks with its prefix cache, and how many blocks the
engine allocates on a GPU.

`BlockPool` keeps the accounting of `v1/core/block_pool.py` for full-attention layers: block 0 is the engine's
null block, never handed out; free blocks wait in an eviction queue (a request's blocks are freed tail first; blocks
without a hash go to the front, hashed ones to the back, so a freed prompt stays cached longest); a full block whose
tokens are known gets the hash of its prefix and can be reused by any later request starting with the same tokens,
until the block is handed out again.

`num_gpu_blocks` follows the worker's memory profiling (`Worker.determine_available_memory`, `get_num_blocks`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable

from ..config import ModelConfig
from ..errors import DoolyError


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, caching: bool):
        if num_blocks < 2:
            raise DoolyError(f"vLLM needs at least 2 KV cache blocks (one is its null block), got {num_blocks}")
        self.size, self.caching = block_size, caching
        self.total = num_blocks - 1
        self.queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, Hashable] = {}
        self.by_hash: dict[Hashable, list[int]] = {}  # duplicates kept in insertion order; a lookup takes the first

    @property
    def free(self) -> int:
        return len(self.queue)

    def hits(self, hashes: Iterable[Hashable]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (the engine's `find_longest_cache_hit`)."""
        out = []
        for h in hashes:
            blocks = self.by_hash.get(h)
            if not blocks:
                break
            out.append(blocks[0])
        return out

    def evictable(self, blocks: list[int]) -> int:
        """How many of `blocks` sit in the free queue: reusing them takes them out of it."""
        return sum(self.refs[b] == 0 for b in blocks)

    def touch(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refs[b] == 0:
                del self.queue[b]
            self.refs[b] += 1

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            b, _ = self.queue.popitem(last=False)
            h = self.hash_of.pop(b, None)
            if h is not None:  # handing a cached block out evicts it from the prefix cache
                self.by_hash[h].remove(b)
                if not self.by_hash[h]:
                    del self.by_hash[h]
            self.refs[b] = 1
            out.append(b)
        return out

    def cache(self, block: int, h: Hashable) -> None:
        self.hash_of[block] = h
        self.by_hash.setdefault(h, []).append(block)

    def release(self, blocks: list[int]) -> None:
        """Give back a request's blocks (in the request's order), tail first."""
        front, back = [], []
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                (back if b in self.hash_of else front).append(b)
        for b in reversed(front):
            self.queue[b] = None
            self.queue.move_to_end(b, last=False)
        for b in back:
            self.queue[b] = None


def block_bytes(cfg: ModelConfig, block_size: int = 16, dtype_bytes: int = 2) -> int:
    """Bytes of one block in one layer: keys and values of `block_size` tokens (`FullAttentionSpec.page_size_bytes`)."""
    d = cfg.data
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    return 2 * block_size * kv_heads * head_dim * dtype_bytes


def num_gpu_blocks(cfg: ModelConfig, gpu_bytes: int, weight_bytes: int, activation_peak_bytes: int = 0,
                   non_torch_bytes: int = 0, cudagraph_bytes: int = 0, gpu_memory_utilization: float = 0.9,
                   block_size: int = 16, dtype_bytes: int = 2) -> int:
    """The `num_gpu_blocks` vLLM resolves for the model of `cfg` (a `dooly.config.ModelConfig`) on one GPU of
    `gpu_bytes`: the requested share of the GPU, less the weights, the profiling run's activation peak, memory
    outside torch's allocator and the CUDA graphs' estimate, in blocks of all layers.

    The last three are measured by the engine on the GPU; left at 0 this is an upper bound."""
    d = cfg.data
    if len(set(d.get("layer_types") or ())) > 1 or cfg.model_type in ("gemma2", "cohere2"):
        raise DoolyError(f"{cfg.name}: layers of several attention kinds share vLLM's hybrid KV cache, which Dooly "
                         "does not size")
    requested = math.ceil(gpu_bytes * gpu_memory_utilization)
    available = requested - weight_bytes - activation_peak_bytes - non_torch_bytes - cudagraph_bytes
    blocks = available // block_bytes(cfg, block_size, dtype_bytes) // cfg.num_layers
    if blocks < 2:
        raise DoolyError(f"{cfg.name}: {weight_bytes / 2**30:.1f} GiB of weights leave no room for a KV cache in "
                         f"{gpu_memory_utilization:.0%} of {gpu_bytes / 2**30:.1f} GiB")
    return int(blocks)
