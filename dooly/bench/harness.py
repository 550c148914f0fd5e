"""What generated microbenchmarks call: input builders, the engine's own attention inputs, and `main`.

Inputs are random (never zeros: they hide unwritten outputs and run faster than real data); index inputs hold
valid indices; the attention mask and the cache indices come from the serving engine's own code (its
`PagedAttentionCache` and `ContinuousBatchingIOs` preparing a real batch), not from an imitation of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..ir.graph import DTYPES as IR_DTYPES
from ..transformers_engine import ATTENTION, BLOCK_SIZE, paged_cache

DTYPES = {short: getattr(torch, name.removeprefix("torch.")) for name, short in IR_DTYPES.items()}
FREE_ROWS = 65536  # rows of a gathered-from table whose size does not change the kernel


def tensor(shape, dtype: str, device: str, strides=None, high: int | None = None) -> torch.Tensor:
    """A random tensor: normal floats, integers in [0, high), or random booleans; strided if asked."""
    shape, dt = tuple(int(s) for s in shape), DTYPES[dtype]
    t = torch.empty_strided(shape, tuple(int(s) for s in strides), dtype=dt, device=device) if strides else \
        torch.empty(shape, dtype=dt, device=device)
    base = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,)) if strides else t
    if dt.is_floating_point:
        base.normal_()
    elif dt == torch.bool:
        base.copy_(torch.rand(base.shape, device=device) < 0.5)
    else:
        base.random_(0, high or 2**15)
    return t


def unique_indices(n: int, high: int, device: str) -> torch.Tensor:
    """n distinct slots in [0, high): a scatter target the engine never writes twice in one step."""
    return torch.randperm(max(high, n), device=device)[:n]


def routed_offsets(rows: int, experts: int, skewed: bool, device: str) -> torch.Tensor:
    """Cumulative rows per expert for `rows` token-expert pairs: spread evenly, or Zipf-skewed (a few hot experts,
    as real routers produce)."""
    weights = torch.arange(1, experts + 1, dtype=torch.float64) ** -1.2 if skewed else torch.ones(experts,
                                                                                                   dtype=torch.float64)
    counts = torch.floor(weights / weights.sum() * rows).long()
    counts[0] += rows - counts.sum()
    return torch.cumsum(counts, 0).to(torch.int32).to(device)


_BATCHES: dict = {}


def engine_mask(queries: list[int], keys: list[int], device: str) -> torch.Tensor:
    """The attention mask the engine builds for this batch: its own buffer the first time, then a copy with the same
    strides (rotated input copies need not rebuild the engine)."""
    key = (tuple(queries), tuple(keys), device)
    if key not in _BATCHES:
        _BATCHES.clear()  # one batch at a time: its mask buffer can be gigabytes
        _BATCHES[key] = engine_batch(queries, keys, device)["attention_mask"]
        return _BATCHES[key]
    mask = _BATCHES[key]
    return torch.empty_strided(mask.shape, mask.stride(), dtype=mask.dtype, device=mask.device).copy_(mask)


def engine_batch(queries: list[int], keys: list[int], device: str, sliding_window: int | None = None):
    """The attention mask and cache read/write indices that transformers' continuous-batching engine builds for
    requests with these query and key lengths (keys = past + new), using the engine's own objects."""
    from transformers import LlamaConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
    )
    from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs
    from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState, RequestStatus
    from transformers.generation.logits_process import LogitsProcessorList

    block = BLOCK_SIZE
    blocks = sum(-(-k // block) for k in keys) + len(keys) + 2
    config = LlamaConfig(hidden_size=64, num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                         intermediate_size=64, num_hidden_layers=1, vocab_size=128, sliding_window=sliding_window)
    config._attn_implementation = ATTENTION
    cb = ContinuousBatchingConfig(block_size=block, num_blocks=blocks, max_batch_tokens=max(sum(queries), 256),
                                  max_requests_per_batch=max(len(queries), 1))
    cache = paged_cache(config, cb, device, torch.bfloat16)
    logits = ContinuousBatchingLogitsProcessorList(LogitsProcessorList())
    io = ContinuousBatchingIOs(cache, config, cb, torch.device(device), torch.bfloat16, logits)
    states = []
    for i, (q, k) in enumerate(zip(queries, keys)):
        state = RequestState(request_id=f"r{i}", initial_tokens=[1] * k, max_new_tokens=1)
        state._status = RequestStatus.DECODING if q == 1 and k > 1 else RequestStatus.PREFILLING
        state.tokens_to_process, state.position_offset = [1] * q, k - q
        cache.allocate_blocks(-(-k // block), state.request_id, 0)
        states.append(FutureRequestState(state, has_new_token=True, complete_blocks=0, query_length=q))
    io.prepare_batch_tensors(states, logits, use_decode_fast_path=False, num_q_tokens=sum(queries),
                             max_kv_read=sum(keys) - sum(queries), use_padding=False)
    return io.get_model_kwargs()


def composition(t: int, k: int) -> tuple[list[int], list[int]]:
    """Requests for a step of t query tokens and k keys: decodes when the step is small (one token each), else
    one chunk of t tokens after k - t past ones."""
    if t <= 256 and k >= t:
        per, extra = divmod(k, t)
        return [1] * t, [per + (i < extra) for i in range(t)]
    return [t], [k]


def process_group(device: str, size: int) -> str:
    """The name of the process group a collective benchmark runs in, started on first use: one process a rank, as
    `torchrun --nproc-per-node SIZE bench_<hash>.py ...` starts them (NCCL on GPUs; gloo on the CPU, where RANK and
    WORLD_SIZE can also be set by hand). It must have the signature's group size."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                rank=int(os.environ.get("RANK", "0")),
                                world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if dist.get_world_size() != size:
        sys.exit(f"error: this collective runs over {size} ranks, not {dist.get_world_size()}: "
                 f"torchrun --nproc-per-node {size} ...")
    return dist.group.WORLD.group_name


def main(module_globals: dict) -> None:
    """`python bench_<hash>.py --points M=1,16,256 [--device cuda]`: time the op, one JSON line per point."""
    from .timer import measure

    axes = module_globals["AXES"]
    parser = argparse.ArgumentParser(description=module_globals["__doc__"].splitlines()[0])
    parser.add_argument("--points", required=True,
                        help="AXIS=v1,v2,... per axis (a grid), or a JSON list of points")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.points.lstrip().startswith("["):
        points = json.loads(args.points)
    else:
        import itertools

        grid = dict(part.split("=") for part in args.points.split())
        if set(grid) != set(axes):
            sys.exit(f"error: --points must give the axes {', '.join(axes)}")
        names = sorted(grid)
        points = [dict(zip(names, vals)) for vals in itertools.product(
            *[[int(v) for v in grid[n].split(",")] for n in names])]
    for point in points:
        timing = measure(lambda: module_globals["make_inputs"](point, args.device), module_globals["run"],
                         args.device)
        s = timing.stats()
        print(json.dumps({"point": point, "median_us": round(s.median_us, 3), "min_us": round(s.min_us, 3),
                          "p90_us": round(s.p90_us, 3), "launches": timing.launches, "graph": timing.graph}))
    import torch.distributed as dist

    if dist.is_initialized():  # a collective benchmark: leave the group together
        dist.destroy_process_group()
