"""Dooly's `VLLMv1` against vLLM 0.24's own scheduler, step for step.

vLLM's `Scheduler` (or `AsyncScheduler`) runs on the CPU over a KV cache config made by hand, driven as the engine
core drives it (with async scheduling, step N+1 is scheduled before step N's tokens are read back), with a fake
model runner that samples one token for every request whose prefill a step completes. Time is counted in steps:
a request arriving at step t is added before the first schedule at t. At every step both must schedule the same
requests with the same tokens on top of the same computed (or prefix-cached) tokens, and every request must get
its first token at the same step.

Needs the `vllm` extra (its own venv); skipped elsewhere.
"""

import json
import os
import random

import pytest
from helpers import ROOT

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
vllm = pytest.importorskip("vllm")

from dooly.sim import Request, VLLMv1, simulate  # noqa: E402

pytestmark = pytest.mark.vllm

BLOCK = 16
MAX_MODEL_LEN = 32768


def vllm_scheduler(folder, num_blocks, budget, seqs, caching, async_scheduling, threshold):
    import torch
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 1000,
        "max_position_embeddings": MAX_MODEL_LEN, "torch_dtype": "bfloat16"}))
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=caching)
    cache.num_gpu_blocks = num_blocks  # what the engine sets after profiling the GPU's memory
    config = VllmConfig(
        model_config=ModelConfig(model=str(folder), tokenizer=str(folder), skip_tokenizer_init=True,
                                 max_model_len=MAX_MODEL_LEN, dtype="bfloat16"),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, max_model_len=MAX_MODEL_LEN,
                                         is_encoder_decoder=False, async_scheduling=async_scheduling,
                                         long_prefill_token_threshold=threshold),
        cache_config=cache, device_config=DeviceConfig("cpu"))
    assert config.scheduler_config.scheduler_reserve_full_isl and config.scheduler_config.watermark == 0
    layer = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=16, dtype=torch.bfloat16)
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], layer)])
    cls = config.scheduler_config.get_scheduler_cls()
    return cls(vllm_config=config, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(config),
               block_size=BLOCK)


def run_vllm(scheduler, requests, tokens, async_scheduling):
    """[(step time, sorted [(request, scheduled tokens, computed tokens)])], {request: time of its first token}."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request as VRequest

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    pending = sorted(requests, key=lambda r: (r.arrival, r.id))
    steps, first = [], {}

    def read_back(launched):
        out, samples, when = launched
        ids = list(out.num_scheduled_tokens)
        sampled = [[10_000_000 + int(i)] if i in samples else [] for i in ids]  # each request's tokens are its own
        scheduler.update_from_output(out, ModelRunnerOutput(req_ids=ids, req_id_to_index={i: n for n, i in
                                                                                          enumerate(ids)},
                                                            sampled_token_ids=sampled))
        for i in samples:
            first.setdefault(int(i), when)

    now, i, in_flight = 0.0, 0, None
    while True:
        while i < len(pending) and pending[i].arrival <= now:
            r = pending[i]
            scheduler.add_request(VRequest(str(r.id), list(tokens[r.id]), SamplingParams(max_tokens=r.output,
                                                                                         ignore_eos=True),
                                           None, arrival_time=r.arrival, block_hasher=hasher))
            i += 1
        if not scheduler.get_num_unfinished_requests() and in_flight is None:
            if i == len(pending):
                return steps, first
            now = pending[i].arrival
            continue
        out = scheduler.schedule()
        if not out.total_num_scheduled_tokens:
            if in_flight is not None:  # the engine waits for the step in flight
                read_back(in_flight)
                in_flight = None
            elif not out.preempted_req_ids:
                assert i < len(pending), "vLLM's scheduler is stuck"
                now = pending[i].arrival
            continue
        now += 1
        composition = []
        samples = set()
        for rid, n in out.num_scheduled_tokens.items():
            request = scheduler.requests[rid]
            composition.append((int(rid), n, request.num_computed_tokens - n))
            if not request.is_prefill_chunk:
                samples.add(rid)
        steps.append((now, sorted(composition)))
        launched = (out, samples, now)
        if async_scheduling:
            if in_flight is not None:
                read_back(in_flight)
            in_flight = launched
        else:
            read_back(launched)


class Recording(VLLMv1):
    """Keeps what the step it last scheduled holds."""

    def schedule(self):
        out = super().schedule()
        self.compositions = sorted((s.state.request.id, s.tokens, s.state.cached) for s in out)
        return out


def run_dooly(requests, num_blocks, budget, seqs, caching, async_scheduling, threshold, prompt_tokens):
    scheduler = Recording(num_blocks, BLOCK, budget, seqs, enable_prefix_caching=caching,
                          async_scheduling=async_scheduling, long_prefill_token_threshold=threshold,
                          prompt_tokens=prompt_tokens)
    steps = []

    def one_step(batch):
        steps.append(scheduler.compositions)
        return 1.0

    out = simulate(requests, scheduler, one_step)
    assert scheduler.blocks.free == scheduler.blocks.total  # every block came back
    times = [s["time"] for s in out.steps]
    return list(zip(times, steps)), {r["id"]: r["arrival"] + r["ttft"] for r in out.requests}


def unique_tokens(requests):
    return {r.id: [r.id * 100_000 + j for j in range(r.prompt)] for r in requests}


def lengths(rng, n, median, sigma, floor=1):
    return [max(floor, int(median * rng.lognormvariate(0, sigma))) for _ in range(n)]


def burst(rng):
    prompts, outputs = lengths(rng, 24, 200, 0.8), lengths(rng, 24, 30, 0.6)
    return [Request(i, 0.0, p, o) for i, (p, o) in enumerate(zip(prompts, outputs))], None


def poisson(rng):
    t, out = 0.0, []
    for i, (p, o) in enumerate(zip(lengths(rng, 40, 120, 0.7), lengths(rng, 40, 25, 0.7))):
        out.append(Request(i, float(round(t)), p, o))
        t += rng.expovariate(0.4)
    return out, None


def long_prompts(rng):
    prompts = [1500, 4700, 333, 2900, 5000, 1024]
    return [Request(i, float(2 * i), p, 12 + i) for i, p in enumerate(prompts)], None


def pressure(rng):
    prompts, outputs = lengths(rng, 16, 150, 0.4, 20), lengths(rng, 16, 80, 0.3, 20)
    return [Request(i, float(i // 4), p, o) for i, (p, o) in enumerate(zip(prompts, outputs))], None


def tight(rng):
    """A cache of 14 blocks, where a request finishing in the step in flight can be the one preempted."""
    shapes = [(3, 10, 13), (5, 113, 14), (3, 15, 20), (5, 77, 40), (1, 97, 21), (6, 48, 16), (0, 75, 33), (3, 104, 10)]
    return [Request(i, float(t), p, o) for i, (t, p, o) in enumerate(shapes)], None


def shared_prefixes(rng):
    systems = [[900_000 + j for j in range(n)] for n in (100, 256, 37)]  # a prompt of whole blocks is never all hit
    requests, tokens, t = [], {}, 0.0
    for i in range(30):
        system = systems[i % 3]
        suffix = [] if i % 7 == 6 else [i * 100_000 + j for j in range(rng.randint(10, 200))]  # some repeat a prompt
        tokens[i] = system + suffix
        requests.append(Request(i, float(round(t)), len(tokens[i]), rng.randint(5, 60)))
        t += rng.expovariate(0.5)
    return requests, tokens


WORKLOADS = {  # name: (workload, num_blocks, budget, max_num_seqs, long_prefill_token_threshold)
    "burst": (burst, 2000, 512, 8, 0),
    "poisson": (poisson, 2000, 256, 16, 0),
    "long prompts": (long_prompts, 2000, 1024, 8, 0),
    "long prompts, threshold": (long_prompts, 2000, 1024, 8, 300),
    "memory pressure": (pressure, 60, 1024, 32, 0),
    "tight cache": (tight, 15, 256, 8, 0),
    "shared prefixes": (shared_prefixes, 2000, 384, 12, 0),
    "shared prefixes, memory pressure": (shared_prefixes, 48, 384, 12, 0),
}


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("caching", [True, False], ids=["prefix caching", "no caching"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_dooly_schedules_as_vllm_does(name, caching, async_scheduling, tmp_path):
    make, num_blocks, budget, seqs, threshold = WORKLOADS[name]
    requests, shared = make(random.Random(name))
    tokens = shared or unique_tokens(requests)
    scheduler = vllm_scheduler(tmp_path, num_blocks, budget, seqs, caching, async_scheduling, threshold)
    expected_steps, expected_first = run_vllm(scheduler, requests, tokens, async_scheduling)
    steps, first = run_dooly(requests, num_blocks, budget, seqs, caching, async_scheduling, threshold, shared)
    assert len(steps) == len(expected_steps)
    for n, (step, expected) in enumerate(zip(steps, expected_steps)):
        assert step == expected, f"step {n}"
    assert first == pytest.approx(expected_first)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b", "qwen3-30b-a3b", "phi-3-mini"])
def test_cache_size_is_vllms_arithmetic(name, tmp_path):
    """Dooly's block bytes are vLLM's page size for the model, and its block count what vLLM's `request_memory` and
    `get_num_blocks` make of the same measurements."""
    from types import SimpleNamespace

    import torch
    from vllm.config import CacheConfig, ModelConfig, ParallelConfig
    from vllm.v1.core.kv_cache_utils import get_num_blocks
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.utils import request_memory

    from dooly.config import load_config
    from dooly.sim.vllm_cache import block_bytes, num_gpu_blocks

    path = ROOT / "configs" / f"{name}.json"
    (tmp_path / "config.json").write_text(path.read_text())
    model = ModelConfig(model=str(tmp_path), tokenizer=str(tmp_path), skip_tokenizer_init=True, dtype="bfloat16")
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=model.get_num_kv_heads(ParallelConfig()),
                             head_size=model.get_head_size(), dtype=torch.bfloat16)
    cfg = load_config(path)
    assert block_bytes(cfg) == spec.page_size_bytes
    gpu, weights, activations, non_torch, graphs = 143_771 * 2**20, 15 * 2**30, 3 * 2**30 + 12345, 2**29, 2**28
    cache = CacheConfig(gpu_memory_utilization=0.9)
    requested = request_memory(SimpleNamespace(total_memory=gpu, free_memory=gpu, device_=0), cache)
    expected = get_num_blocks(SimpleNamespace(cache_config=cache), model.get_num_layers(ParallelConfig()),
                              requested - weights - activations - non_torch - graphs, spec.page_size_bytes)
    assert num_gpu_blocks(cfg, gpu, weights, activations, non_torch, graphs) == expected
