"""What generated benchmarks of compiled vLLM pieces call: the torch forms vLLM gives its IR ops, and the compile.

vLLM 0.24 with `custom_ops: none` lowers its IR ops (RMSNorm, fused add + RMSNorm) to their torch implementations
and lets inductor fuse them with their neighbours; a piece is compiled once with the token count dynamic (vLLM
compiles one range, 1 to `max_num_batched_tokens`, and replays it at every captured size), with the inductor options
vLLM sets (`compilation_config.inductor_compile_config` as the engine resolved it on the H200).
"""

from __future__ import annotations

import torch

from ..environment import CAPTURE_SIZES

# vLLM 0.24's max_cudagraph_capture_size on the H200: larger steps launch the kernels one by one
MAX_CAPTURED = CAPTURE_SIZES[-1]

# every captured size (graph replays), and larger steps as vLLM runs them, eagerly ("graph": 0 in the point key: a
# store from before keeps its replayed points apart)
PIECE_POINTS = tuple({"M": m, "graph": 0} for m in (2048, 1536, 1024, 768, 512, 384, 320)) + tuple(
    {"M": m} for m in sorted(CAPTURE_SIZES, reverse=True))
VLLM_INDUCTOR_OPTIONS = {"enable_auto_functionalized_v2": False, "size_asserts": False, "alignment_asserts": False,
                         "scalar_asserts": False, "combo_kernels": True, "benchmark_combo_kernel": True}


def points_left(store, env_name: str, sig) -> list[dict]:
    """The `PIECE_POINTS` a piece's sweep lacks (the points grew since it ran: steps above the captured sizes timed
    as eager launches): a finished piece is profiled again for those points only. None for other signatures, whose
    grids are their own."""
    from ..store import point_key

    if sig.family != "piece":
        return []
    have = set(store.points(sig.hash, env_name, sig.family))
    return [p for p in PIECE_POINTS if point_key(p) not in have]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, epsilon: float = 1e-6) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + epsilon)
    if weight is not None:
        h = h.to(weight.dtype) * weight
    return h.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                       epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x.float() + residual.float()
    return rms_norm(summed, weight, epsilon).to(x.dtype), summed.to(x.dtype)


def _size_oblivious():
    """Sizes 1 and 0 are not special while a piece is traced: one graph for every size, as vLLM compiles it."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(backed_size_oblivious=True)


def piece(forward, dynamic: list[tuple[int, int]]):
    """`forward` compiled on its first call, the (input, dim) pairs sized by the token count marked dynamic. On a
    GPU inductor compiles it as vLLM does; on the CPU (tests) dynamo traces it and runs the graph eagerly. Above
    MAX_CAPTURED tokens it refuses CUDA-graph capture, so the timer times a loop of eager launches, as vLLM runs it."""
    state = {}

    def run(*args):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing() and dynamic \
                and args[dynamic[0][0]].shape[dynamic[0][1]] > MAX_CAPTURED:
            raise RuntimeError("vLLM runs pieces of more than MAX_CAPTURED tokens without a CUDA graph")  # timed eager
        if "failed" in state:  # a piece inductor cannot compile fails every point at once, not after a compile each
            raise RuntimeError(state["failed"])
        fn = state.get("fn")
        if fn is not None:
            with _size_oblivious():
                return fn(*args)
        with _size_oblivious():
            for i, d in dynamic:
                torch._dynamo.mark_dynamic(args[i], d)
            cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
            fn = torch.compile(forward, fullgraph=True, dynamic=False,
                               **({"options": VLLM_INDUCTOR_OPTIONS} if cuda else {"backend": "eager"}))
            try:
                out = fn(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:
                state["failed"] = f"compiling the piece failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                raise RuntimeError(state["failed"]) from None
            state["fn"] = fn
            return out

    return run
