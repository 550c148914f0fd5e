"""Frontend: one step of vLLM's GPU model runner (`GPUModelRunner.execute_model`), on fake tensors.

vLLM's own model classes are built from the config alone, with no weights, under the SymbolTable's FakeTensorMode:
fused qkv / gate_up GEMMs, a flat token batch `[T, hidden]`, attention and MoE experts as one custom op each. The
step is the runner's: attention metadata of the batch, the forward, logits of the R rows it samples from (one per
request), greedy sampling by vLLM's `Sampler`.

vLLM here is its CUDA wheel (0.24.0, with its torch 2.11.0) on a machine without a GPU, on vLLM's CPU platform, which
the frontend selects itself. Where the CPU build would run something else than the GPU engine, the GPU's choice is
set up by hand:

- linear layers and the LM head run `F.linear` (the CPU build picks a GEMM while loading weights, which we skip);
- custom ops run their torch code (`custom_ops=["none"]`, vLLM's default under torch.compile): their CUDA kernels
  live in `vllm._C`, which a CPU torch cannot load;
- attention uses FLASH_ATTN, the backend vLLM picks on an H100 (CudaPlatform's first choice on SM90); the CPU
  platform only offers CPU_ATTN, whose metadata builder calls a `vllm._C` kernel;
- MoE experts run as the `vllm.moe_forward` op, as `MoERunner` picks on a GPU (on a CPU it calls `vllm._C` kernels);
- gated delta-net layers (Qwen3-Next) run their GPU path, the `vllm.qwen_gdn_attention_core` op (the CPU platform's
  is `cpu_gdn_attention_core`); MLA layers (DeepSeek) run as `unified_mla_attention_with_output`, built with
  TRITON_MLA (see MLA_ATTENTION); Llama-4's chunked layers as `unified_attention_with_output` with their chunk size.

Attention request dims: vLLM's own builder. The attention op `vllm.unified_attention_with_output(q, k, v, out,
layer_name)` reads the batch layout from the forward context, not from its arguments, so its recorded inputs carry T
only. The step therefore runs as the engine runs it: a `CommonAttentionMetadata` with symbolic R, T and Kmax
(query_start_loc `[R + 1]`, seq_lens `[R]`, block_table `[R, blocks per request]`, slot_mapping `[T]`) goes through
the FLASH_ATTN metadata builder under the fake mode, which works (without a GPU, FlashAttention's ahead-of-time
scheduler is off and the builder passes the batch through), and the forward runs inside `set_forward_context` with
the result. The lowered op then gets what its kernel call reads from that metadata, see `with_forward_context`.

Config fields are symbols (`SymbolTable.symint`), the head size included: the places where building vLLM's layers
would hash it or pin it with `int()` are patched (`_engine_patches`), so llama, qwen2 and mixtral need no perturbed
re-trace; a field torch still pins (gemma-2's head_dim) goes through `trace_with_fallback`.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Collection
from dataclasses import replace
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
import vllm
import vllm.platforms
from torch.fx.experimental.symbolic_shapes import size_hint
from vllm.platforms.cpu import CpuPlatform
from vllm.utils.platform_utils import is_pin_memory_available

from ..config import ModelConfig, hf_config
from ..errors import DoolyError
from ..ir.graph import Op
from .common import (
    DTYPES,
    Trace,
    decoder_layers,
    prefix_config,
    shape_values,
    structure,
    symbolic_fields,
)
from .lower import attr_value, lower, tensor_spec
from .recorder import Recorder
from .symbolic import SymbolTable

# vLLM's PyPI wheel is its CUDA build, which resolves no platform without a GPU (`import vllm` already did, to
# UnspecifiedPlatform); only a CPU build or macOS would pick the CPU one. Select it before anything reads it.
vllm.platforms._current_platform = CpuPlatform()
is_pin_memory_available.cache_clear()  # cached under the platform resolved at import
from vllm.config import (  # noqa: E402
    CacheConfig,
    CompilationConfig,
    DeviceConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.config import ModelConfig as VllmModelConfig  # noqa: E402
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

ATTENTION = AttentionBackendEnum.FLASH_ATTN
# CudaPlatform's first MLA choice on SM90 is FLASH_ATTN_MLA, whose module needs the CUDA flash-attention extension to
# import; TRITON_MLA (its fourth) imports anywhere. Both run MLA as the same `unified_mla_attention_with_output` op.
MLA_ATTENTION = AttentionBackendEnum.TRITON_MLA
BLOCK_SIZE = CacheConfig.DEFAULT_BLOCK_SIZE  # the engine's default KV-cache block size, which FLASH_ATTN takes
TRACE_SIZES = {"T": 37, "R": 5, "K": 901, "Kmax": 263, "Tmax": 19}  # the IR does not use them
ATTENTION_OPS = {"vllm.unified_attention_with_output", "vllm.unified_mla_attention_with_output"}
KV_WRITE_OPS = {"vllm.unified_kv_cache_update", "vllm.unified_mla_kv_cache_update"}
LINEAR_ATTENTION_OP = "vllm.qwen_gdn_attention_core"  # conv1d and the gated delta rule over each request's state
MOE_OPS = {"vllm.moe_forward", "vllm.moe_forward_shared"}
# What FlashAttention's kernel call takes from the attention metadata (`FlashAttentionImpl.forward`)
KERNEL_TENSORS = ("query_start_loc", "seq_lens", "block_table", "scheduler_metadata")
# Config fields of the architectures only vLLM runs: MLA (DeepSeek), gated delta-net layers (Qwen3-Next), Llama-4
VLLM_FIELDS = (
    "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
    "n_shared_experts", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "shared_expert_intermediate_size", "intermediate_size_mlp",
)
KERNEL_SCALARS = ("max_query_len", "max_seq_len", "causal")


def _distributed():
    """A one-process world, set up once: vLLM's layers ask it for their tensor-parallel rank and size.

    Set up under a config without a model, so that the groups of every kind of model exist (the expert-parallel one
    included).
    """
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.utils.network_utils import get_distributed_init_method, get_open_port

    if not model_parallel_is_initialized():
        with set_current_vllm_config(VllmConfig()):
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=get_distributed_init_method("127.0.0.1",
                                                                                             get_open_port()))
            ensure_model_parallel_initialized(1, 1)


def engine_config(cfg: ModelConfig, n_layers: int, dtype: str, folder: str, **overrides) -> VllmConfig:
    """The engine's config for the model cut to `n_layers` decoder layers, read from a config.json in `folder`."""
    prefix_config(cfg, n_layers, **overrides).save_pretrained(folder)
    try:
        return VllmConfig(
            model_config=VllmModelConfig(model=folder, tokenizer=folder, skip_tokenizer_init=True,
                                         dtype=DTYPES[dtype], enforce_eager=True),
            device_config=DeviceConfig("cpu"), cache_config=CacheConfig(block_size=BLOCK_SIZE),
            compilation_config=CompilationConfig(custom_ops=["none"]))
    except Exception as e:
        raise DoolyError(f"{cfg.name}: vLLM rejects this config: {str(e).splitlines()[0]}") from None


class _KernelStubs:
    """`torch.ops._C` while layers are built: some bind a CUDA kernel in `__init__` (GeluAndMul) that the traced
    `forward_native` never calls, and the CUDA wheel's kernels do not load without a GPU. A stub that is called
    says which kernel the step needed."""

    def __getattr__(self, name):
        def missing(*args, **kwargs):
            raise DoolyError(f"vLLM's kernel _C.{name} runs in this step, and it has no CPU build")

        return missing


def _fused_qkv_a_proj_init(self, input_size, output_size, quant_config=None, prefix=""):
    """`DeepSeekV2FusedQkvAProjLinear.__init__` deciding as on the H100: its fused A-GEMM op for bf16 weights of
    DeepSeek-V3's shape, read from the sizes' values (vLLM's `==` on them would pin hidden_size to 7168)."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    MergedColumnParallelLinear.__init__(self, input_size, output_size, bias=False, quant_config=quant_config,
                                        disable_tp=True, prefix=prefix)
    self._use_min_latency_gemm = (self.weight.dtype == torch.bfloat16
                                  and [size_hint(d) for d in self.weight.shape] == [2112, 7168])


class _PrefillBackendUnbuilt:
    """MLA's prefill kernel wrapper: only the MLA attention op's own body uses it, which runs as one op here, and
    the GPU's (FlashAttention's) needs the CUDA extension to be built."""

    def __init__(self, **kwargs):
        pass


@contextlib.contextmanager
def _engine_patches():
    """What building vLLM's layers on the CPU build, around a symbolic head size, takes.

    - CUDA kernels that layers bind while being built are stubs (`_KernelStubs`, `_PrefillBackendUnbuilt`).
    - Attention layers get the GPU's backend (see the module docstring); going through the backend selector would
      also hash the head size, which a SymInt cannot be, as would vLLM's `*_once` loggers.
    - `get_rope` caches rotary embeddings in a dict keyed by the head size, and computes `rotary_dim =
      int(head_size * partial_rotary_factor)`, which pins a SymInt to its value. The cache is skipped, and with the
      full rotary factor (the default) the head size goes in as `rope_dim`, which vLLM takes as is.
    """
    from vllm import logger
    from vllm.model_executor.layers import rotary_embedding
    from vllm.model_executor.layers.attention import (
        chunked_local_attention,  # noqa: F401 - binds get_attn_backend
        mla_attention,
    )
    from vllm.model_executor.models import deepseek_v2
    from vllm.v1.attention import selector

    original = rotary_embedding.get_rope

    def get_rope(head_size, *args, rope_parameters=None, **kwargs):
        parameters = dict(rope_parameters or {})
        if parameters.get("partial_rotary_factor", 1.0) == 1.0:
            parameters.setdefault("rope_dim", head_size)
        return original(head_size, *args, rope_parameters=parameters, **kwargs)

    class NoCache(dict):
        def __contains__(self, key):
            return False

        def __setitem__(self, key, value):
            pass

    selected = selector.get_attn_backend

    def get_attn_backend(*args, use_mla=False, **kwargs):
        return (MLA_ATTENTION if use_mla else ATTENTION).get_class()

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.ops, "_C", _KernelStubs()))
        stack.enter_context(mock.patch.object(rotary_embedding, "_ROPE_DICT", NoCache()))
        stack.enter_context(mock.patch.object(mla_attention, "get_mla_prefill_backend",
                                              lambda config: _PrefillBackendUnbuilt))
        # MLA picks flashinfer's concat kernel by `num_heads == 128 and ...`, which would pin those fields; the
        # choice is inside the attention op
        stack.enter_context(mock.patch.object(mla_attention, "has_flashinfer", lambda: False))
        stack.enter_context(mock.patch.object(deepseek_v2.DeepSeekV2FusedQkvAProjLinear, "__init__",
                                              _fused_qkv_a_proj_init))
        for once in ("_print_debug_once", "_print_info_once", "_print_warning_once"):  # cached by their arguments
            stack.enter_context(mock.patch.object(logger, once, getattr(logger, once).__wrapped__))
        for name, module in list(sys.modules.items()):  # layer and model modules bind these by name
            if name.startswith("vllm.") and getattr(module, "get_rope", None) is original:
                stack.enter_context(mock.patch.object(module, "get_rope", get_rope))
            if name.startswith("vllm.") and getattr(module, "get_attn_backend", None) is selected:
                stack.enter_context(mock.patch.object(module, "get_attn_backend", get_attn_backend))
        yield


def build_model(vc: VllmConfig, fake_mode=None) -> nn.Module:
    """The model of `vc` without weights: fake tensors under `fake_mode`, else on the meta device."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
    from vllm.model_executor.model_loader.utils import get_model_architecture, initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    _distributed()
    model_class, _ = get_model_architecture(vc.model_config)  # imports its module, for _engine_patches
    with fake_mode or torch.device("meta"), set_default_torch_dtype(vc.model_config.dtype), _engine_patches():
        model = initialize_model(vllm_config=vc, model_class=model_class)
    for m in model.modules():
        if hasattr(m, "quant_method"):  # linear layers and the LM head
            m.cpu_linear = F.linear
        if isinstance(m, QwenGatedDeltaNetAttention):  # its GPU path: the `qwen_gdn_attention_core` op
            m._forward_method = m.forward_cuda
        if isinstance(m, MoERunner):
            m._forward_entry = torch.ops.vllm.moe_forward if m._shared_experts is None else (
                torch.ops.vllm.moe_forward_shared)
    return model


def _meta_layers(cfg: ModelConfig, n_layers: int) -> tuple[list[tuple], set]:
    """Kinds of the first `n_layers` decoder layers, and the sliding windows of their attention layers."""
    from vllm.model_executor.layers.attention import Attention

    with tempfile.TemporaryDirectory() as folder:
        vc = engine_config(cfg, n_layers, "bf16", folder)
        model = build_model(vc)
    windows = {m.sliding_window for m in model.modules() if isinstance(m, Attention)} - {None}
    return [structure(layer) for layer in decoder_layers(model, n_layers)], windows


def _greedy_sampler():
    """vLLM's sampler, for a batch of greedy requests without logprobs or penalties."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    sampler = Sampler()
    sampler.greedy_sample = lambda logits: logits.argmax(dim=-1).view(-1)  # its GPU branch (the CPU one is _C)
    unused = torch.empty(0)
    metadata = SamplingMetadata(
        temperature=None, all_greedy=True, all_random=False, top_p=None, top_k=None, generators={},
        max_num_logprobs=None, no_penalties=True, prompt_token_ids=None, frequency_penalties=unused,
        presence_penalties=unused, repetition_penalties=unused, output_token_ids=[], allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=LogitsProcessors())
    return lambda logits: sampler(logits, metadata)


def metadata_builders(vc: VllmConfig) -> dict:
    """Per FLASH_ATTN layer, its backend's metadata builder, as the engine makes them at startup.

    The builders of MLA, chunked (Llama-4) and gated delta-net layers split the batch into prefills and decodes (or
    virtual chunk batches) from its numbers, which a symbolic batch has not: their ops get the batch layout itself.
    """
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    # No layer names: the builder would hash their head counts (symbols here) to size FlashAttention's ahead-of-time
    # schedule, which is off without a GPU.
    return {name: layer.attn_backend.get_builder_cls()(layer.get_kv_cache_spec(vc), [], vc, torch.device("cpu"))
            for name, layer in get_layers_from_vllm_config(vc, Attention).items()
            if layer.attn_backend is ATTENTION.get_class()}


def batch_layout(vc: VllmConfig, batch: dict, T, R, Kmax, Tmax) -> CommonAttentionMetadata:
    """The runner's `CommonAttentionMetadata` of one step's batch."""
    blocks = -(-vc.model_config.max_model_len // BLOCK_SIZE)  # the runner's BlockTable width
    return CommonAttentionMetadata(
        query_start_loc=batch["query_start_loc"], query_start_loc_cpu=batch["query_start_loc"],
        seq_lens=batch["seq_lens"], num_reqs=R, num_actual_tokens=T, max_query_len=Tmax, max_seq_len=Kmax,
        block_table_tensor=torch.empty(R, blocks, dtype=torch.int32), slot_mapping=batch["slot_mapping"])


def _kernel_inputs(fields, layout: CommonAttentionMetadata) -> tuple[list, dict]:
    """The tensors and scalars an attention kernel reads: from its built metadata, else from the batch layout."""
    if fields is None:
        return ([layout.query_start_loc, layout.seq_lens, layout.block_table_tensor],
                {f: getattr(layout, f) for f in KERNEL_SCALARS})
    return ([getattr(fields, f) for f in KERNEL_TENSORS if getattr(fields, f) is not None],
            {f: getattr(fields, f) for f in KERNEL_SCALARS})


def with_forward_context(ops: list[Op], vc: VllmConfig, metadata: dict, layout: CommonAttentionMetadata,
                         state_indices: torch.Tensor, symbols: SymbolTable, K) -> list[Op]:
    """The ops, with what vLLM's custom ops read from the forward context instead of their arguments.

    - attention (MLA included): the metadata fields FlashAttention's kernel call takes (`_kernel_inputs`),
      `seq_lens_sum` = K (the keys of all requests, which its work and KV-cache reads scale with) and the layer's
      sliding window or attention chunk if it has one;
    - KV-cache write: the slots it writes to;
    - gated delta-net core: where each request's tokens start, and the slot of its recurrent state;
    - MoE experts: their weights (the shared experts' too), and how many experts each token goes to.

    The tensors are engine inputs (the builder passes the batch through), hence no producer. The ops' `layer_name`
    argument goes: the scope names the layer already, and it would keep identical layers apart.
    """
    layers = vc.compilation_config.static_forward_context
    out = []
    for op in ops:
        attrs = {k: v for k, v in op.attrs.items() if k != "layer_name"}
        name = op.attrs.get("layer_name")
        name = getattr(name, "value", name)  # a vLLM LayerName, or its string
        tensors = []
        if op.name in ATTENTION_OPS:
            tensors, scalars = _kernel_inputs(metadata.get(name), layout)
            attrs.update({f: attr_value(v, symbols) for f, v in scalars.items()})
            attrs["seq_lens_sum"] = attr_value(K, symbols)
            for limit in ("sliding_window", "attention_chunk_size"):  # at most that many past keys per request
                if getattr(layers[name], limit, None) is not None:
                    attrs[limit] = attr_value(getattr(layers[name], limit), symbols)
        elif op.name in KV_WRITE_OPS:
            tensors = [layout.slot_mapping]
        elif op.name == LINEAR_ATTENTION_OP:
            tensors = [layout.query_start_loc, state_indices]
        elif op.name in MOE_OPS:
            moe = layers[name]
            tensors = [*moe.routed_experts.parameters(),  # the shared experts run inside the op too
                       *(moe._shared_experts.parameters() if moe._shared_experts is not None else ())]
            attrs.update(top_k=attr_value(moe.moe_config.experts_per_token, symbols),
                         activation=moe.moe_config.activation.value)
        out.append(replace(op, inputs=op.inputs + tuple(tensor_spec(t, symbols, None) for t in tensors), attrs=attrs))
    return out


def trace_step(cfg: ModelConfig, n_layers: int, dtype: str, pinned: dict[str, int]) -> Trace:
    """Record one step of the engine on a model cut to its first `n_layers` decoder layers."""
    symbols = SymbolTable()
    full = hf_config(cfg)
    values = {**shape_values(full), **{f: getattr(full, f) for f in VLLM_FIELDS if type(getattr(full, f, None)) is int},
              **pinned}
    with tempfile.TemporaryDirectory() as folder:
        vc = engine_config(cfg, n_layers, dtype, folder, **pinned)
        symbolic_fields(vc.model_config.hf_config, values, pinned, symbols)
        try:
            model = build_model(vc, symbols.fake_mode)
        except Exception as e:
            raise DoolyError(f"{cfg.name}: vLLM cannot build this model: {type(e).__name__}: {e}") from None

    # The step's inputs, as the runner keeps them on the device
    T, R, K, Kmax, Tmax = (symbols.symint(n, TRACE_SIZES[n]) for n in ("T", "R", "K", "Kmax", "Tmax"))
    with set_current_vllm_config(vc), symbols.fake_mode:
        batch = dict(input_ids=torch.empty(T, dtype=torch.int32), positions=torch.empty(T, dtype=torch.int64),
                     query_start_loc=torch.empty(R + 1, dtype=torch.int32),
                     seq_lens=torch.empty(R, dtype=torch.int32), slot_mapping=torch.empty(T, dtype=torch.int64),
                     state_indices=torch.empty(R, dtype=torch.int32))
        builders = metadata_builders(vc)
        sample = _greedy_sampler()

    rec = Recorder("engine")
    rec.name_tensors(dict([*model.named_parameters(), *model.named_buffers()]))
    rec.name_tensors(batch)
    with set_current_vllm_config(vc), symbols.fake_mode, torch.no_grad(), rec, rec.module_scopes(model):
        with rec.scope("engine.attention_metadata"):
            layout = batch_layout(vc, batch, T, R, Kmax, Tmax)
            metadata = {name: builder.build(0, layout) for name, builder in builders.items()}
        slots = dict.fromkeys(metadata, batch["slot_mapping"])
        with set_forward_context(metadata, vc, slot_mapping=slots), rec.scope("engine.execute_model"):
            logits_indices = batch["query_start_loc"][1:] - 1
            hidden = model(batch["input_ids"], batch["positions"])
            logits = model.compute_logits(hidden[logits_indices])
        with rec.scope("engine.sample"):
            sample(logits)
    ops = with_forward_context(lower(rec.graph, symbols), vc, metadata, layout, batch["state_indices"], symbols, K)
    return Trace(ops, values, symbols.guards(set(TRACE_SIZES), set(values)), symbols.pinned() & set(values))


class VllmFrontend:
    """The `Frontend` of vLLM's GPU model runner."""

    name = "vllm"
    trace_sizes = TRACE_SIZES

    def __init__(self, cfg: ModelConfig, dtype: str):
        self.cfg, self.dtype = cfg, dtype
        self.kinds, self.windows = _meta_layers(cfg, cfg.num_layers)

    def layer_kinds(self, n_layers: int | None) -> list[tuple]:
        return self.kinds if n_layers is None else _meta_layers(self.cfg, n_layers)[0]

    def trace(self, n_layers: int, pinned: dict[str, int]) -> Trace:
        return trace_step(self.cfg, n_layers, self.dtype, pinned)

    def check(self, step: Trace) -> None:
        """vLLM serves every model it builds through its own attention layers."""

    def engine_meta(self, step: Trace, moved: Collection[str]) -> dict:
        return dict(architecture=(self.cfg.data.get("architectures") or [self.cfg.model_type])[0],
                    engine="vllm", engine_version=vllm.__version__, attention=ATTENTION.name, config=step.values,
                    sliding_window=max(self.windows, default=None),
                    engine_config={"block_size": BLOCK_SIZE, "custom_ops": "none", "sampling": "greedy"})
