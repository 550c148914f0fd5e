"""Where a latency was measured: the serving engine, its attention backend and the GPU, each named here once.

An attention backend has three names: the one commands take (`--backend sdpa-efficient`), the one stores record as
an environment's `attention_backend` and in its name (`paged|sdpa:efficient`), and the SDPA kernel it forces
(torch's `SDPBackend.EFFICIENT_ATTENTION`). Commands take the first (`backend`), passes and predictors the second
(`attention`: it is part of an attention op's signature); vLLM's backends have one name for both
(`FLASH_ATTN`). A store's environment is named
`<gpu>/torch-<version>/transformers-<version>/<dtype>/<attention>`; stored names never change.
"""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass

from .errors import DoolyError
from .store.db import Environment
from .transformers_engine import ATTENTION, BLOCK_SIZE, ENGINE


@dataclass(frozen=True)
class Backend:
    name: str  # what `--backend` takes
    attention: str  # the environment's attention_backend
    sdpa_kernel: str | None  # the SDPBackend member it forces; None: torch chooses
    sweep_divisor: int = 1  # attention sweeps stop at the sweeps' T*K bound divided by this


# On the H100 with torch 2.11, torch picks cuDNN for the engine's masked call; flash attention refuses a float mask;
# the math kernel is ~17x slower than cuDNN, so its sweep stops earlier.
BACKENDS = {b.name: b for b in (
    Backend("sdpa", ATTENTION, None),
    Backend("sdpa-efficient", f"{ATTENTION}:efficient", "EFFICIENT_ATTENTION"),
    Backend("sdpa-cudnn", f"{ATTENTION}:cudnn", "CUDNN_ATTENTION"),
    Backend("sdpa-math", f"{ATTENTION}:math", "MATH", sweep_divisor=16),
    Backend("sdpa-flash", f"{ATTENTION}:flash", "FLASH_ATTENTION"),
)}
DEFAULT_BACKEND = BACKENDS["sdpa"]
MATH = BACKENDS["sdpa-math"].attention  # torch's decomposition: several kernels a call, not one
VLLM_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")  # vLLM's attention backends its harness runs
VLLM_MODES = {False: "vllm", True: "vllm-eager"}  # the engine field: compiled (default) and eager are apart in a store
CAPTURE_SIZES = (1, 2, 4, *range(8, 257, 8))  # vLLM 0.24's default cudagraph_capture_sizes on the H200
# vLLM 0.24 runs these on its V2 model runner and every other architecture on the V1 one, whose host work per step
# differs (`DEFAULT_V2_MODEL_RUNNER_ARCHITECTURES`)
VLLM_V2_RUNNER_ARCHITECTURES = frozenset({"Qwen3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen2MoeForCausalLM",
                                          "GraniteMoeForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"})
GPU_BYTES = {"NVIDIA H100 80GB HBM3": 81559 * 2**20, "NVIDIA H200": 143771 * 2**20}  # nvidia-smi's totals


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise DoolyError(f"unknown attention backend {name!r} (choose from {', '.join(BACKENDS)})")
    return BACKENDS[name]


def backend_name(attention: str) -> str:
    """The `--backend` name of a stored attention_backend; a backend this registry does not know keeps its own."""
    return next((b.name for b in BACKENDS.values() if b.attention == attention), attention)


def gpu_of(env: Environment) -> str:
    """The GPU part of an environment's name (`h100-80gb-hbm3`)."""
    return env.name.split("/")[0]


def environment_name(store, backend_name: str | None = None) -> str:
    """The store's environment measured with a `--backend` (default: the engine's default SDPA)."""
    wanted = backend(backend_name or DEFAULT_BACKEND.name)
    envs = store.environments()
    name = next((e.name for e in envs if e.attention_backend == wanted.attention), None)
    if name is None:
        known = ", ".join(e.attention_backend for e in envs) or "none"
        raise DoolyError(f"{store.path} has no measurements for the {wanted.name} backend (it has: {known})")
    return name


def resolve_environment(store, name: str) -> str:
    """An environment named in full, or by its `--backend` name (sdpa, sdpa-efficient, ...)."""
    if name in BACKENDS and name not in {e.name for e in store.environments()}:
        return environment_name(store, name)
    return store.environment(name)[1].name


def sdpa_context(backend: Backend):
    """Force the backend's SDPA kernel for what runs inside (process-wide, so the engine's thread sees it too)."""
    if backend.sdpa_kernel is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, backend.sdpa_kernel)])


def nvidia_smi(query: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def detect(backend: Backend, dtype: str = "bf16") -> Environment:
    """This machine's environment for the transformers engine with `backend`: its GPU, driver and versions."""
    import torch
    import transformers
    import triton

    gpu = torch.cuda.get_device_name()
    cc = "{}.{}".format(*torch.cuda.get_device_capability())
    name = (f"{gpu.replace('NVIDIA ', '').replace(' ', '-').lower()}/torch-{torch.__version__}/"
            f"transformers-{transformers.__version__}/{dtype}/{backend.attention}")
    clocks = {"sm_mhz_max": nvidia_smi("clocks.max.sm"), "mem_mhz_max": nvidia_smi("clocks.max.memory"),
              "power_limit": nvidia_smi("power.limit")}
    return Environment(name=name, gpu=gpu, compute_capability=cc, driver=nvidia_smi("driver_version"),
                       cuda=str(torch.version.cuda), torch=torch.__version__, triton=triton.__version__,
                       engine=ENGINE, engine_version=transformers.__version__, dtype=dtype,
                       kv_cache_dtype=dtype, block_size=BLOCK_SIZE, attention_backend=backend.attention, extra=clocks)


def vllm_model_runner(architecture: str) -> str:
    """The model runner vLLM 0.24 serves an architecture with: "v2" or "v1"."""
    return "v2" if architecture in VLLM_V2_RUNNER_ARCHITECTURES else "v1"


def vllm_environment_name(gpu: str, torch_version: str, eager: bool, engine_version: str, backend: str) -> str:
    return (f"{gpu.replace('NVIDIA ', '').replace(' ', '-').lower()}/torch-{torch_version}/"
            f"{VLLM_MODES[eager]}-{engine_version}/bf16/{backend}")


def detect_vllm(backend: str, eager: bool, engine_version: str) -> Environment:
    """This machine's environment for vLLM with one of its attention backends, compiled or eager."""
    import torch
    import triton

    gpu = torch.cuda.get_device_name()
    engine = VLLM_MODES[eager]
    name = vllm_environment_name(gpu, torch.__version__, eager, engine_version, backend)
    extra = {"mode": "enforce_eager" if eager else "torch.compile+cudagraphs FULL_AND_PIECEWISE",
             "capture_sizes": list(CAPTURE_SIZES), "sm_mhz_max": nvidia_smi("clocks.max.sm"),
             "mem_mhz_max": nvidia_smi("clocks.max.memory"), "power_limit": nvidia_smi("power.limit")}
    return Environment(name=name, gpu=gpu, compute_capability="{}.{}".format(*torch.cuda.get_device_capability()),
                       driver=nvidia_smi("driver_version"), cuda=str(torch.version.cuda), torch=torch.__version__,
                       triton=triton.__version__, engine=engine, engine_version=engine_version, dtype="bf16",
                       kv_cache_dtype="bf16", block_size=16, attention_backend=backend, extra=extra)
