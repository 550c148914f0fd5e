"""vLLM's attention, set up by the engine's own code and timed over batch compositions (GPU, vLLM 0.24).

The engine's config comes from `EngineArgs(...).create_engine_config()` for a one-layer copy of the model, as
`vllm serve` would resolve it (compilation mode, CUDA-graph mode and sizes, the attention backend asked for); one
`Attention` layer is built under it, its backend's metadata builder turns each batch's `CommonAttentionMetadata`
(query starts, sequence lengths, a block table of distinct random blocks, slot mapping) into the backend's metadata,
and the layer's `impl.forward` runs over a paged KV cache of the backend's own shape. So FLASH_ATTN gets its
ahead-of-time FA3 schedule and its CUDA-graph split bound, FLASHINFER its plan, TRITON_ATTN its launch grid, exactly
as in a serving step. `dooly.vllm_profile` times the layer over `batch`'s metadata with `dooly.bench.timer.measure`.

Compositions (`POINTS`) are uniform: R requests, each with q new tokens after c cached ones (decodes: q = 1; one
prefill chunk: R = 1), keyed `{"R", "q", "c"}` under the attention op's signature in the vLLM environment; the
layer's KV-cache write (`impl.do_kv_cache_update`) is timed at token counts `{"M"}` under its own.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import torch

BLOCK = 16  # vLLM's default KV-cache block size, which the frontend's IR assumes
MAX_CACHED_TOKENS = 1 << 20  # R * (c + q) per point: the KV cache of one layer stays under a few GB
DECODE_R = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_C = (16, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768)
PREFILL_Q = (16, 64, 128, 256, 512, 1024, 2048)
PREFILL_C = (0, 512, 2048, 8192, 32768)


def points(max_requests: int) -> list[dict[str, int]]:
    """The grid, with no more requests than the engine batches (FLASHINFER's builder sizes its buffers by it)."""
    decode = [{"R": r, "q": 1, "c": c} for r in DECODE_R for c in DECODE_C
              if r * (c + 1) <= MAX_CACHED_TOKENS and r <= max_requests]
    prefill = [{"R": 1, "q": q, "c": c} for q in PREFILL_Q for c in PREFILL_C]
    return decode + prefill


class AttentionBench:
    """One attention layer of a model under the engine's resolved config, for one backend."""

    def __init__(self, config: dict, backend: str, heads: int, kv_heads: int, head_dim: int,
                 sliding_window: int | None = None, max_model_len: int = 32768 + 2048):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import EngineArgs
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.attention import Attention

        from .vllm_engine import model_folder

        self.folder = tempfile.TemporaryDirectory()
        folder = model_folder({**config, "max_position_embeddings": max(max_model_len,
                                                                        config.get("max_position_embeddings", 0))},
                              1, Path(self.folder.name))
        self.vc = EngineArgs(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                             max_model_len=max_model_len, attention_backend=backend).create_engine_config()
        _distributed(self.vc)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        name = "model.layers.0.self_attn.attn"
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # the layer takes its dtype from it, as under the engine's loader
        with set_current_vllm_config(self.vc):
            self.layer = Attention(heads, head_dim, head_dim ** -0.5, num_kv_heads=kv_heads,
                                   cache_config=self.vc.cache_config, per_layer_sliding_window=sliding_window,
                                   prefix=name).cuda()
            spec = self.layer.get_kv_cache_spec(self.vc)
            self.builder = self.layer.attn_backend.get_builder_cls()(spec, [name], self.vc, torch.device("cuda"))
        torch.set_default_dtype(default)
        self.backend = self.layer.attn_backend

    def batch(self, queries: list[int], cached: list[int]):
        """The backend's metadata and a KV cache for requests with these new and cached token counts."""
        from vllm.config import set_current_vllm_config
        from vllm.v1.attention.backend import CommonAttentionMetadata

        keys = [q + c for q, c in zip(queries, cached)]
        per = [-(-k // BLOCK) for k in keys]
        blocks = sum(per) + 1
        shape = self.backend.get_kv_cache_shape(blocks, BLOCK, self.kv_heads, self.head_dim)
        cache = torch.empty(shape, dtype=torch.bfloat16, device="cuda").normal_()
        order = torch.randperm(blocks - 1, device="cuda").to(torch.int32) + 1  # block 0 stays a null block
        table = torch.zeros(len(keys), max(per), dtype=torch.int32, device="cuda")
        slots, start = [], 0
        for r, (q, k, n) in enumerate(zip(queries, keys, per)):
            table[r, :n] = order[start:start + n]
            start += n
            pos = torch.arange(k - q, k, device="cuda")
            slots.append(table[r, pos // BLOCK].long() * BLOCK + pos % BLOCK)
        qsl = torch.tensor([0, *itertools.accumulate(queries)], dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=qsl.cuda(), query_start_loc_cpu=qsl, seq_lens=torch.tensor(keys, dtype=torch.int32,
                                                                                       device="cuda"),
            num_reqs=len(keys), num_actual_tokens=sum(queries), max_query_len=max(queries), max_seq_len=max(keys),
            block_table_tensor=table, slot_mapping=torch.cat(slots), causal=True)
        with set_current_vllm_config(self.vc):
            metadata = self.builder.build(common_prefix_len=0, common_attn_metadata=common)
        return metadata, cache

    def close(self) -> None:
        self.folder.cleanup()


def _distributed(vc) -> None:
    """A one-process world: vLLM's layers ask it for their tensor-parallel rank and size."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.utils.network_utils import get_distributed_init_method, get_open_port

    if not model_parallel_is_initialized():
        with set_current_vllm_config(vc):
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="nccl",
                                         distributed_init_method=get_distributed_init_method("127.0.0.1",
                                                                                             get_open_port()))
            ensure_model_parallel_initialized(1, 1)
