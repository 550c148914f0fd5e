"""`dooly profile IR... --engine vllm --store PATH [--backend FLASH_ATTN] [--eager] [--budget-s S]`: measure, on this
GPU, what vLLM 0.24 runs for these models (IRs from `dooly compile CONFIG --frontend vllm`) that the store lacks.

- compiled mode (vLLM's default): each compiled piece between splitting ops (`dooly.passes.pieces`), compiled by
  inductor as vLLM compiles it and timed as CUDA-graph replays at every size vLLM captures, and as eager launches
  at larger token counts up to its compile range (`PIECE_POINTS`); `--eager`: the ops one by one, as the
  transformers engine's are;
- both: attention and the KV-cache write through vLLM's own layer, metadata builder and cache layout
  (`dooly.bench.vllm_attention`, needs vLLM importable: `tools/vllm_bundle.py`), and the ops vLLM runs outside the
  model (logits, sampling) as op microbenchmarks.

Every point is committed as it is measured (resumable); the environment records the GPU, driver, CUDA, torch,
triton, vLLM's version, dtype, attention backend and mode.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

from .bench.compiled import PIECE_POINTS, points_left
from .environment import DEFAULT_BACKEND, detect_vllm
from .environment import VLLM_BACKENDS as BACKENDS
from .errors import DoolyError
from .ir import Graph
from .passes.canonicalize import Use, uses
from .passes.pieces import piece_uses

ATTENTION_OPS = {"vllm.unified_attention_with_output"}
KV_WRITE_OPS = {"vllm.unified_kv_cache_update"}
def step_uses(graph: Graph, backend: str, eager: bool) -> list[Use]:
    """What one step of vLLM runs, as profiled: compiled pieces and the ops around them, or every op (eager)."""
    return uses(graph, backend) if eager else piece_uses(graph, backend)


def _attention_dims(graph: Graph, op_index: int) -> tuple[int, int, int, int | None]:
    op = graph.ops[op_index]
    q, k = op.inputs[0], op.inputs[1]
    window = op.attrs.get("sliding_window")
    window = window if isinstance(window, int) else None
    return q.shape[1].value, k.shape[1].value, q.shape[2].value, window


class _AttentionModule:
    """An attention layer's benchmark in the shape `Sweeper.point` times: inputs built at a point, a run."""

    def __init__(self, bench):
        self.bench, self.batches = bench, {}

    def make_inputs(self, point: dict[str, int], device: str):
        import torch

        key = (point["R"], point["q"], point["c"])
        if key not in self.batches:
            self.batches = {key: self.bench.batch([point["q"]] * point["R"], [point["c"]] * point["R"])}
        metadata, cache = self.batches[key]
        t, b = point["R"] * point["q"], self.bench
        return (torch.randn(t, b.heads, b.head_dim, dtype=torch.bfloat16, device=device),
                torch.randn(t, b.kv_heads, b.head_dim, dtype=torch.bfloat16, device=device),
                torch.randn(t, b.kv_heads, b.head_dim, dtype=torch.bfloat16, device=device),
                torch.empty(t, b.heads, b.head_dim, dtype=torch.bfloat16, device=device), cache, metadata)

    def run(self, query, key, value, out, cache, metadata):
        return self.bench.layer.impl.forward(self.bench.layer, query, key, value, cache, metadata, out)


class _KVWriteModule:
    def __init__(self, bench):
        self.bench, self.slots = bench, {}

    def make_inputs(self, point: dict[str, int], device: str):
        import torch

        from .bench.vllm_attention import BLOCK

        m, b = point["M"], self.bench
        if m not in self.slots:
            blocks = -(-m // BLOCK) + 1
            cache = torch.empty(b.backend.get_kv_cache_shape(blocks, BLOCK, b.kv_heads, b.head_dim),
                                dtype=torch.bfloat16, device=device)
            self.slots = {m: (cache, torch.randperm(blocks * BLOCK - BLOCK, device=device)[:m] + BLOCK)}
        cache, slots = self.slots[m]
        return (torch.randn(m, b.kv_heads, b.head_dim, dtype=torch.bfloat16, device=device),
                torch.randn(m, b.kv_heads, b.head_dim, dtype=torch.bfloat16, device=device), cache, slots)

    def run(self, key, value, cache, slots):
        return self.bench.layer.impl.do_kv_cache_update(self.bench.layer, key, value, cache, slots)


def run(args) -> int:
    from .compile import load_model

    if args.backend not in BACKENDS:
        raise DoolyError(f"unknown vLLM attention backend {args.backend!r} (choose from {', '.join(BACKENDS)})")
    graphs = [load_model(path) for path in args.config]
    for path, g in zip(args.config, graphs):
        if g.meta.engine != "vllm":
            raise DoolyError(f"{path}: not a vLLM IR (compile it with --frontend vllm)")
    import torch

    if not torch.cuda.is_available():
        raise DoolyError("no CUDA GPU here: dooly profile measures on a GPU")
    from rich.console import Console

    from .passes import codegen
    from .plan import sweep_limits
    from .profile import Budget, Sweeper, load
    from .store import Store

    start = time.monotonic()
    deadline = start + args.budget_s
    console = Console()
    store = Store(args.store)
    versions = {g.meta.engine_version for g in graphs}
    if len(versions) != 1:
        raise DoolyError(f"the IRs come from different vLLM versions ({', '.join(map(str, versions))})")
    env = store.add_environment(detect_vllm(args.backend, args.eager, versions.pop()))
    done = store.finished_sweeps(env.name)
    by_hash: dict[str, tuple] = {}  # hash -> (signature, graph, use, bindings)
    for g in graphs:
        for u in step_uses(g, args.backend, args.eager):
            by_hash.setdefault(u.signature.hash, (u.signature, g, u, []))[3].append(u.binding)
    todo = {h: v for h, v in by_hash.items() if h not in done or points_left(store, env.name, v[0])}
    console.print(f"[b]{env.name}[/b]: {len(by_hash)} signatures, {len(by_hash) - len(todo)} in the store, "
                  f"{len(todo)} to profile")
    sweeper = Sweeper(store, env.name, DEFAULT_BACKEND, deadline)
    stateful = [v for v in todo.values() if v[0].op in ATTENTION_OPS | KV_WRITE_OPS]
    plain = [v[0] for v in todo.values() if v[0].op not in ATTENTION_OPS | KV_WRITE_OPS]
    bench = Path(args.store).parent / "bench"
    paths = {}
    for sig in list(plain):
        try:
            paths.update(codegen.write([sig], bench))
        except codegen.CodegenError as e:
            console.print(f"[yellow]cannot profile {sig.family} {sig.hash}: {e}[/yellow]")
            plain.remove(sig)
            continue
        store.add_signature(sig)
    finished = 0
    try:
        for sig in sorted(plain, key=lambda s: s.family != "piece"):  # pieces are most of a step: first
            t = time.monotonic()
            module = load(paths[sig.hash])
            if sig.family == "piece":
                for point in PIECE_POINTS:
                    sweeper.point(module, sig, point)
                rows = store.points(sig.hash, env.name, sig.family)
                store.finish_sweep(sig.hash, env.name, sum(r["gpu_s"] for r in rows.values()), len(rows))
            else:
                sweeper.sweep(module, sig, sweep_limits(sig, by_hash[sig.hash][3]))
            finished += 1
            console.print(f"  {sig.family} {sig.hash} {time.monotonic() - t:.0f} s")
        if stateful:
            finished += _stateful(stateful, store, env, sweeper, console)
    except Budget:
        pass
    left = len(todo) - finished
    console.print(f"profiled {finished} signatures in {time.monotonic() - start:.0f} s; "
                  + (f"{left} left for the next run" if left else "all done"))
    print(json.dumps({"environment": env.name, "profiled": finished, "left": left}))
    return 0


def _stateful(todo: list, store, env, sweeper, console) -> int:
    try:
        import vllm  # noqa: F401
    except ImportError:
        console.print(f"[yellow]{len(todo)} attention/KV-write signatures left: they run through vLLM's own layer, "
                      "and vLLM is not importable here (tools/vllm_bundle.py brings it)[/yellow]")
        return 0
    from .bench.vllm_attention import AttentionBench, points

    finished = 0
    benches: dict[tuple, AttentionBench] = {}
    for sig, graph, use, _ in todo:
        t = time.monotonic()
        dims = _attention_dims(graph, use.op_index) if sig.op in ATTENTION_OPS else None
        if dims is None:  # the KV write: its layer's attention dims are the key/value shapes
            k = graph.ops[use.op_index].inputs[0]
            dims = (k.shape[1].value, k.shape[1].value, k.shape[2].value, None)
        heads, kv_heads, head_dim, window = dims
        if dims not in benches:
            config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": heads * head_dim,
                      "intermediate_size": 256, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                      "head_dim": head_dim, "num_hidden_layers": 1, "vocab_size": 256,
                      "max_position_embeddings": 36864, "torch_dtype": "bfloat16"}
            benches[dims] = AttentionBench(config, env.attention_backend, heads, kv_heads, head_dim, window)
        store.add_signature(sig)
        if sig.op in ATTENTION_OPS:
            module, grid = _AttentionModule(benches[dims]), points(benches[dims].vc.scheduler_config.max_num_seqs)
        else:
            module, grid = _KVWriteModule(benches[dims]), [{"M": p["M"]} for p in PIECE_POINTS]
        for point in grid:
            sweeper.point(SimpleNamespace(make_inputs=module.make_inputs, run=module.run), sig, point)
        rows = store.points(sig.hash, env.name, sig.family)
        store.finish_sweep(sig.hash, env.name, sum(r["gpu_s"] for r in rows.values()), len(rows))
        finished += 1
        console.print(f"  {sig.family} {sig.hash} {time.monotonic() - t:.0f} s")
    return finished
