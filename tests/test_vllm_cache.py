"""vLLM's KV cache as Dooly keeps it: the block pool's eviction order and prefix cache, prefix hits in `VLLMv1`, and
the engine's cache size. tests/test_vllm_scheduler.py checks the scheduler against vLLM's own."""

import pytest
from helpers import ROOT

from dooly.config import load_config
from dooly.errors import DoolyError
from dooly.sim import Request, VLLMv1, simulate
from dooly.sim.vllm_cache import BlockPool, block_bytes, num_gpu_blocks


def test_freed_prompt_blocks_stay_cached_until_handed_out_again():
    pool = BlockPool(9, 16, caching=True)
    assert pool.total == pool.free == 8  # one block is the engine's null block
    first = pool.take(3)
    pool.cache(first[0], "a")
    pool.cache(first[1], "b")
    pool.release(first)
    assert pool.free == 8 and pool.hits(["a", "b", "c"]) == first[:2]
    assert pool.take(1) == [first[2]]  # the block without a hash is handed out first
    assert pool.hits(["a", "b"]) == first[:2]
    pool.take(pool.free - 1)
    assert pool.hits(["a", "b"]) == first[:1]  # of a request's blocks, its tail is evicted first
    pool.take(1)
    assert pool.hits(["a"]) == []


def test_reusing_a_cached_block_takes_it_out_of_the_free_queue():
    pool = BlockPool(5, 16, caching=True)
    (block,) = pool.take(1)
    pool.cache(block, "a")
    pool.release([block])
    hits = pool.hits(["a"])
    assert pool.evictable(hits) == 1
    pool.touch(hits)
    assert pool.free == 3 and pool.evictable(hits) == 0
    assert block not in pool.take(3)


def first_steps(scheduler, requests):
    seen = {}

    def step(batch):
        for s in scheduler.last:
            seen.setdefault(s.state.request.id, (s.tokens, s.state.cached))
        return 1.0

    schedule = scheduler.schedule

    def recording():
        scheduler.last = schedule()
        return scheduler.last

    scheduler.schedule = recording
    simulate(requests, scheduler, step)
    return seen


@pytest.mark.parametrize("caching", [True, False])
def test_a_shared_prefix_is_computed_once_with_prefix_caching(caching):
    system = list(range(100))
    tokens = {0: system + [1000 + i for i in range(20)], 1: system + [2000 + i for i in range(40)]}
    requests = [Request(0, 0.0, 120, 4), Request(1, 10.0, 140, 4)]
    seen = first_steps(VLLMv1(100, enable_prefix_caching=caching, prompt_tokens=tokens), requests)
    assert seen[0] == (120, 0)
    assert seen[1] == ((44, 96) if caching else (140, 0))  # the 6 full blocks of the prefix are hits


def test_requests_without_token_ids_share_nothing():
    seen = first_steps(VLLMv1(100), [Request(0, 0.0, 120, 4), Request(1, 10.0, 120, 4)])
    assert seen[1] == (120, 0)


def test_prompt_token_ids_must_match_the_prompt():
    with pytest.raises(DoolyError, match="3 prompt token ids for a prompt of 5"):
        simulate([Request(0, 0.0, 5, 1)], VLLMv1(10, prompt_tokens={0: [1, 2, 3]}), lambda batch: 1.0)


def test_cache_size_from_the_memory_left_after_weights_and_profiling():
    cfg = load_config(ROOT / "configs" / "llama-3.1-8b.json")
    per_block = block_bytes(cfg) * cfg.num_layers
    assert per_block == 2 * 16 * 8 * 128 * 2 * 32  # keys and values, 8 KV heads of 128, bf16, 32 layers
    gpu, weights = 80 * 2**30, 16 * 2**30
    blocks = num_gpu_blocks(cfg, gpu, weights)
    assert blocks == int(0.9 * gpu - weights) // per_block
    assert num_gpu_blocks(cfg, gpu, weights, activation_peak_bytes=per_block * 10) == blocks - 10
    assert num_gpu_blocks(cfg, gpu, weights, gpu_memory_utilization=0.5) < blocks


def test_cache_size_refuses_what_it_cannot_size():
    with pytest.raises(DoolyError, match="no room for a KV cache"):
        num_gpu_blocks(load_config(ROOT / "configs" / "llama-3.1-8b.json"), 16 * 2**30, 15 * 2**30)
    with pytest.raises(DoolyError, match="hybrid KV cache"):
        num_gpu_blocks(load_config(ROOT / "configs" / "gemma-2-2b.json"), 80 * 2**30, 6 * 2**30)
